//! Incremental captures over the wire (issue 16): the agent hashes its disk, only what changed
//! crosses the wire. Files mode: a GPT disk with a kernel-written ext4 is captured with its
//! chunk map; after the kernel appends to two files, the incremental capture takes the other
//! files from the base, verifies against the source, and its partition passes `e2fsck -fn`.
//! Sectors mode: the client is killed while an incremental capture runs and started again;
//! the capture reconnects, completes, verifies, and `qemu-img compare` finds the chain equal
//! to the disk.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use diskferry_e2e::fixtures::{ext4_image, extract, gpt_disk, linux_tree, place};
use diskferry_e2e::{
    bin, diskferry, make_disk, make_key, pattern, qemu_img_to_raw, run_ok, sh, Client,
};

const MIB: u64 = 1 << 20;

/// `diskferry capture SOURCE OUT --key-file KEY EXTRA…`, which must succeed; its stderr.
fn capture(source: &str, out: &Path, key: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "capture".as_ref(),
        source.as_ref(),
        out.as_os_str(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let (ok, _, err) = diskferry(&args);
    assert!(ok, "{err}");
    err
}

#[test]
fn a_files_mode_increment_over_the_wire_takes_unchanged_files_from_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let tree = linux_tree(dir.path());
    sh(&format!(
        "mkdir {t}/bulk; for i in $(seq 1 40); do head -c 262144 /dev/urandom > {t}/bulk/f$i; done",
        t = tree.display()
    ));
    let fs = dir.path().join("root.ext4");
    ext4_image(&tree, &fs, 64, "root");
    let disk = dir.path().join("disk.raw");
    let offsets = gpt_disk(&disk, 80, &[(64, "8300", "root")]);
    place(&disk, offsets[0], &fs);
    let key = make_key(dir.path(), "key");
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let source = client.source(&disk);
    let full = dir.path().join("full.qcow2");
    capture(&source, &full, &key, &["--chunk-map", "--verify"]);

    // The kernel appends to two files (new data, new times).
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "mount -o loop {fs} {m}; trap 'umount {m}' EXIT; echo more >> {m}/bulk/f5; echo more >> {m}/bulk/f25",
        fs = fs.display(),
        m = mnt.display()
    ));
    place(&disk, offsets[0], &fs);
    let inc = dir.path().join("inc.qcow2");
    let err = capture(
        &source,
        &inc,
        &key,
        &["--base", full.to_str().unwrap(), "--verify"],
    );
    assert!(err.contains("verify: no differences"), "{err}");
    assert!(
        err.contains("of unchanged files taken from the base"),
        "{err}"
    );
    assert!(err.contains("incremental on"), "{err}");
    let raw = dir.path().join("inc.raw");
    qemu_img_to_raw(&inc, &raw);
    let part = extract(&raw, offsets[0], 64 * MIB, &dir.path().join("p1.ext4"));
    run_ok("e2fsck", &["-fn", part.to_str().unwrap()]);
}

#[test]
fn killing_the_client_mid_incremental_capture_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 2 << 30, &[(0, 1536 * MIB)]).unwrap();
    let key = make_key(dir.path(), "key");
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let addr = client.addr.clone();
    let source = client.source(&disk);
    let full = dir.path().join("full.qcow2");
    capture(&source, &full, &key, &["--mode", "sectors", "--chunk-map"]);

    // 1 GiB rewritten, so the increment is still running when the client goes.
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    for i in 0..256u64 {
        pattern(&mut buf, 0xabcd_0000 + i);
        f.write_all_at(&buf, 256 * MIB + i * (4 << 20)).unwrap();
    }
    drop(f);
    let inc = dir.path().join("inc.qcow2");
    let run = Command::new(bin("diskferry"))
        .args([
            "capture",
            &source,
            inc.to_str().unwrap(),
            "--verify",
            "--base",
        ])
        .arg(&full)
        .arg("--key-file")
        .arg(&key)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    drop(client.stop());
    std::thread::sleep(Duration::from_millis(700));
    let _again = Client::start_at(&addr, &key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let result = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{err}");
    assert!(err.contains("reconnected"), "{err}");
    assert!(err.contains("verify: no differences"), "{err}");
    // 1 GiB of the 2 GiB disk rewritten, in 64 KiB chunks.
    assert!(err.contains("16384 of 32768 chunks changed"), "{err}");
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            disk.to_str().unwrap(),
            inc.to_str().unwrap(),
        ],
    );
}
