//! The NBD server checked by tools nobody here wrote: `qemu-img compare` and `qemu-io` (qemu's
//! NBD client), `nbdinfo --map` and `nbdcopy` (libnbd), against qcow2 images qemu made.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_nbd::{Export, Exports, Limits, Server};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Serves `exports` on a free loopback port, in the background, for the rest of the test.
fn serve(exports: Vec<Export>) -> SocketAddr {
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        Exports::new(exports),
        Limits::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run(&AtomicBool::new(false)));
    addr
}

fn export(name: &str, device: Arc<dyn BlockDevice>, writable: bool) -> Export {
    Export {
        name: name.into(),
        description: format!("test export {name}"),
        device,
        writable,
    }
}

/// A 64 MiB qcow2 made by qemu: data at 1 MiB (3 MiB of 0x5a) and 40 MiB (64 KiB of 0x33),
/// a zeroed cluster, holes elsewhere.
fn qemu_image(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 3M",
            "-c",
            "write -P 0x33 40M 64k",
        ])
        .args(["-c", "write -z 50M 64k"])
        .arg(&image));
    image
}

fn open(image: &Path) -> Arc<dyn BlockDevice> {
    diskferry_vdisk::open_image(image, true).unwrap().1
}

#[test]
fn qemu_img_finds_the_export_identical_to_the_image_and_nbdcopy_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path());
    let addr = serve(vec![export("disk", open(&image), false)]);
    let url = format!("nbd://{addr}/disk");
    run(Command::new("qemu-img")
        .args(["compare", "-F", "qcow2"])
        .arg(&url)
        .arg(&image));
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(&url).arg(&copy));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&copy)
        .arg(&image));
    // The default export (empty name) is the first one.
    run(Command::new("qemu-img")
        .args(["compare", "-F", "qcow2"])
        .arg(format!("nbd://{addr}"))
        .arg(&image));
}

/// `nbdinfo --map` lines: (offset, length, is data).
fn nbd_map(url: &str) -> Vec<(u64, u64, bool)> {
    run(Command::new("nbdinfo").args(["--map", url]))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2] == "0")
        })
        .collect()
}

/// The data ranges of a map, joined.
fn data_ranges(map: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len, data) in map.into_iter().filter(|m| m.2 && m.1 > 0) {
        let _ = data;
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = start + len,
            _ => out.push((start, start + len)),
        }
    }
    out
}

#[test]
fn nbdinfo_map_agrees_with_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path());
    let addr = serve(vec![export("disk", open(&image), false)]);
    let ours = data_ranges(nbd_map(&format!("nbd://{addr}/disk")));
    let json = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&image));
    let theirs = data_ranges(json.lines().filter(|l| l.contains("\"start\"")).map(|l| {
        let num = |key: &str| -> u64 {
            let at = l.find(key).unwrap() + key.len();
            l[at..]
                .trim_start_matches([':', ' '])
                .split([',', ' ', '}'])
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        (
            num("\"start\""),
            num("\"length\""),
            l.contains("\"data\": true") && l.contains("\"zero\": false"),
        )
    }));
    assert_eq!(ours, theirs);
    assert_eq!(
        ours,
        [(1 << 20, 4 << 20), (40 << 20, (40 << 20) + (64 << 10))]
    );
}

#[test]
fn qemu_io_writes_reach_a_writable_export_and_a_read_only_one_refuses_them() {
    let dev = Arc::new(MemoryDevice::new(16 << 20));
    let ro = Arc::new(MemoryDevice::read_only(vec![7u8; 16 << 20]));
    let addr = serve(vec![
        export("rw", dev.clone(), true),
        export("ro", ro.clone(), false),
    ]);
    run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args([
            "-c",
            "write -P 0x11 4096 65536",
            "-c",
            "read -P 0x11 4096 65536",
        ])
        .args([
            "-c",
            "write -z 8M 1M",
            "-c",
            "discard 0 4096",
            "-c",
            "flush",
        ])
        .arg(format!("nbd://{addr}/rw")));
    let got = dev.contents();
    assert!(got[4096..4096 + 65536].iter().all(|&b| b == 0x11));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 0 4096"])
        .arg(format!("nbd://{addr}/ro"))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("ermission") || said.contains("read-only") || said.contains("Read-only"),
        "{said}"
    );
    assert!(ro.contents().iter().all(|&b| b == 7));
}

#[test]
fn nbdinfo_lists_every_export_with_its_size() {
    let a = Arc::new(MemoryDevice::new(1 << 20));
    let b = Arc::new(MemoryDevice::new(2 << 20));
    let addr = serve(vec![export("first", a, false), export("second", b, true)]);
    let list = run(Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(format!("nbd://{addr}")));
    assert!(
        list.contains("\"first\"") && list.contains("\"second\""),
        "{list}"
    );
    assert!(list.contains("2097152"), "{list}");
    let info = run(Command::new("nbdinfo")
        .args(["--json"])
        .arg(format!("nbd://{addr}/second")));
    assert!(info.contains("\"is_read_only\": false"), "{info}");
    assert!(info.contains("\"can_multi_conn\": true"), "{info}");
}

#[test]
fn a_unix_socket_export_is_reachable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path());
    let socket = dir.path().join("nbd.sock");
    let addr = diskferry_nbd::ListenAddr::Unix(socket.clone());
    let exports = Exports::new(vec![export("disk", open(&image), false)]);
    let server = Server::bind_to(&addr, exports, Limits::default()).unwrap();
    assert_eq!(server.listen_addr().unwrap(), addr);
    std::thread::spawn(move || server.run(&AtomicBool::new(false)));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the server's user may connect");
    let url = addr.url("disk");
    assert!(url.starts_with("nbd+unix:///disk?socket="), "{url}");
    run(Command::new("qemu-img")
        .args(["compare", "-F", "qcow2"])
        .arg(&url)
        .arg(&image));
    let info = run(Command::new("nbdinfo").arg(&url));
    assert!(info.contains("is_read_only: true"), "{info}");
}
