//! Hostile filesystems whose directories contain themselves or an ancestor (issue 14, finding
//! 3): an ext4 volume with hard links from a directory to itself and to the root (made with
//! debugfs), and a FAT volume with a directory entry whose start cluster is its own parent's.
//! The web's compare and tar download and the CLI's `get` must each end with the loop error,
//! in bounded time and memory (peak RSS read from /proc or GNU time), instead of walking
//! forever.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use diskferry_e2e::fixtures::{gpt_disk, place};
use diskferry_e2e::http::{request, Server};
use diskferry_e2e::{bin, run_ok, sh};

/// The acceptance bound: peak memory of the process walking the loop.
const MAX_RSS_KIB: u64 = 256 * 1024;
/// Hang guard for one walk.
const GUARD: Duration = Duration::from_secs(120);

/// A GPT disk: partition 1 ext4 with `/dir/loop` → `/dir` and `/dir/up` → `/`, partition 2
/// FAT16 with `/D/LOOP` → `/D`.
fn looping_disk(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    sh(&format!(
        "mkdir -p {t}/dir/sub && echo hello > {t}/dir/file && echo x > {t}/dir/sub/y",
        t = tree.display()
    ));
    let ext4 = dir.join("loop.ext4");
    let e = ext4.to_str().unwrap();
    run_ok(
        "mkfs.ext4",
        &["-q", "-b", "4096", "-d", tree.to_str().unwrap(), e, "8M"],
    );
    run_ok("debugfs", &["-w", "-R", "link /dir /dir/loop", e]);
    run_ok("debugfs", &["-w", "-R", "link / /dir/up", e]);
    let listing = run_ok("debugfs", &["-R", "ls -l /dir", e]);
    assert!(
        listing.contains("loop") && listing.contains("up"),
        "{listing}"
    );

    let fat = dir.join("loop.fat");
    let f = fat.to_str().unwrap();
    run_ok("truncate", &["-s", "16M", f]);
    run_ok("mkfs.vfat", &["-F", "16", f]);
    sh(&format!("MTOOLS_SKIP_CHECK=1 mmd -i {f} ::/D ::/D/LOOP"));
    fat_point_at_parent(&fat, b"D          ", b"LOOP       ");

    let disk = dir.join("captures").join("loops.img");
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    let offsets = gpt_disk(&disk, 32, &[(8, "8300", "ext4"), (16, "0700", "fat")]);
    place(&disk, offsets[0], &ext4);
    place(&disk, offsets[1], &fat);
    disk
}

/// Points the FAT directory entry named `child` (inside directory `parent`) at `parent`'s
/// first cluster, by patching the image's bytes.
fn fat_point_at_parent(image: &Path, parent: &[u8; 11], child: &[u8; 11]) {
    let mut bytes = std::fs::read(image).unwrap();
    let find = |bytes: &[u8], name: &[u8; 11]| {
        (0..bytes.len() - 32)
            .step_by(32)
            .find(|&at| &bytes[at..at + 11] == name && bytes[at + 11] & 0x10 != 0)
            .unwrap_or_else(|| panic!("no directory entry {}", String::from_utf8_lossy(name)))
    };
    let p = find(&bytes, parent);
    let cluster = [bytes[p + 26], bytes[p + 27]];
    let c = find(&bytes, child);
    bytes[c + 26..c + 28].copy_from_slice(&cluster);
    std::fs::write(image, bytes).unwrap();
}

/// Runs `work` on a thread; fails the test if it is not done within [`GUARD`].
fn within<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.recv_timeout(GUARD)
        .unwrap_or_else(|_| panic!("{what}: still walking after {GUARD:?}"))
}

/// A process's peak resident memory, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn web_compare_and_tar_of_a_self_containing_directory_end_with_the_loop_error() {
    let data = tempfile::tempdir().unwrap();
    looping_disk(data.path());
    let s = Server::start(data.path()).unwrap();
    let caps = s.get("/api/captures");
    assert_eq!(caps.status, 200, "{}", caps.text());
    let id = caps.json()[0]["id"].as_i64().unwrap();
    for partition in ["1", "2"] {
        let target = format!("/api/compare?a={id}&b={id}&partition={partition}");
        let r = s.get(&target);
        assert_eq!(
            r.status,
            422,
            "compare, partition {partition}: {}",
            r.text()
        );
        assert!(r.text().contains("directory loop"), "{}", r.text());

        let (addr, token) = (s.addr.clone(), format!("Bearer {}", s.token));
        let tar = format!("/api/captures/{id}/partitions/{partition}/tar?path=/");
        let answer = within("tar download", move || {
            request(&addr, "GET", &tar, &[("Authorization", &token)], b"")
        });
        // The stream is cut with an error instead of ending like a whole archive.
        match answer {
            Err(_) => {}
            Ok(r) => assert_ne!(
                r.status,
                200,
                "a whole archive of a loop: {} bytes",
                r.body.len()
            ),
        }
    }
    let peak = peak_rss_kib(s.pid());
    eprintln!("server peak RSS after compare and tar of the loops: {peak} KiB");
    assert!(peak < MAX_RSS_KIB, "server peak RSS {peak} KiB");
}

#[test]
fn cli_get_of_a_self_containing_directory_ends_with_the_loop_error() {
    let dir = tempfile::tempdir().unwrap();
    let disk = looping_disk(dir.path());
    for partition in ["1", "2"] {
        let dest = dir.path().join(format!("out{partition}"));
        let args: Vec<String> = [
            "-f",
            "maxrss=%M",
            bin("diskferry").to_str().unwrap(),
            "get",
            disk.to_str().unwrap(),
            "-p",
            partition,
            "/",
            dest.to_str().unwrap(),
        ]
        .map(str::to_string)
        .to_vec();
        let out = within("diskferry get", move || {
            Command::new("/usr/bin/time").args(&args).output().unwrap()
        });
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "get of a loop succeeded: {err}");
        assert!(err.contains("directory loop"), "{err}");
        let peak: u64 = err
            .lines()
            .find_map(|l| l.strip_prefix("maxrss="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no maxrss in {err}"));
        eprintln!("get, partition {partition}: peak RSS {peak} KiB");
        assert!(peak < MAX_RSS_KIB, "get peak RSS {peak} KiB");
    }
}
