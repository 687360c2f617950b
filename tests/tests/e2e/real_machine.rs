//! The "real machine" acceptance scenario (issue 15): a minimal Debian debootstrapped onto a
//! GRUB-booted MBR disk in the installer's layout (ext4 root first, swap last in a logical
//! partition), its power cut leaving files only in an unreplayed journal, is captured smaller in
//! auto mode into qcow2. The fixture is proved first (debugfs sees the stale tree, dumpe2fs
//! `needs_recovery`, e2fsck's replay of a copy brings the files; the source disk itself boots
//! under QEMU TCG to the marker its systemd unit prints). The capture is then judged by
//! qemu-img check, sfdisk (root shrunk, swap moved down and still last), e2fsck -fn and debugfs
//! on its root, blkid on its swap, and by booting it under TCG to the same marker: the power-cut
//! files there with their contents, the swap active with its UUID and label.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use diskferry_e2e::debian::{
    debugfs, installer_disk, Boot, InstalledDisk, Marker, DISK_MIB, ROOT_MIB, ROOT_UUID,
    SWAP_LABEL, SWAP_MIB, SWAP_START_MIB, SWAP_UUID,
};
use diskferry_e2e::fixtures::extract;
use diskferry_e2e::nbd::Exported;
use diskferry_e2e::{diskferry, qemu_img_to_raw, run_ok};

const MIB: u64 = 1 << 20;
/// The capture's size: well under the source's 3 GiB, well over the root's ~450 MiB in use.
const CAPTURE_MIB: u64 = 2048;
/// A TCG boot takes about a minute alone; CI runs other tests beside it.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// One partition of an `sfdisk --json` listing, in sectors.
#[derive(Debug, PartialEq)]
struct Part {
    node: String,
    start: u64,
    size: u64,
    kind: String,
    bootable: bool,
}

fn partitions(raw: &Path) -> Vec<Part> {
    let json: serde_json::Value = serde_json::from_str(&run_ok("sfdisk", &["--json", p(raw)]))
        .expect("sfdisk --json prints JSON");
    json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Part {
            node: v["node"].as_str().unwrap().to_string(),
            start: v["start"].as_u64().unwrap(),
            size: v["size"].as_u64().unwrap(),
            kind: v["type"].as_str().unwrap().to_string(),
            bootable: v["bootable"].as_bool().unwrap_or(false),
        })
        .collect()
}

/// The power-cut construction, judged by e2fsprogs: the stale tree has none of the files,
/// the superblock says `needs_recovery`, and e2fsck's replay of a copy brings them all back
/// with their contents and leaves a clean filesystem.
fn check_construction(m: &InstalledDisk, work: &Path) {
    let ls = debugfs(&m.root_fs, "ls /root");
    assert!(!ls.contains("powercut"), "stale /root: {ls}");
    let header = run_ok("dumpe2fs", &["-h", p(&m.root_fs)]);
    assert!(header.contains("needs_recovery"), "{header}");
    let copy = work.join("replayed.ext4");
    run_ok("cp", &["--sparse=always", p(&m.root_fs), p(&copy)]);
    let fsck = Command::new("e2fsck")
        .args(["-fy", p(&copy)])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&fsck.stdout);
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1) && said.contains("recovering journal"),
        "e2fsck -fy: {said}"
    );
    run_ok("e2fsck", &["-fn", p(&copy)]);
    assert_powercut_files_in(&copy, m);
    std::fs::remove_file(&copy).unwrap();
}

/// Every power-cut file is in the filesystem image `fs`, as debugfs reads it.
fn assert_powercut_files_in(fs: &Path, m: &InstalledDisk) {
    for f in &m.powercut {
        let got = Command::new("debugfs")
            .args(["-R", &format!("cat {}", f.guest), p(fs)])
            .output()
            .unwrap()
            .stdout;
        assert!(
            got == std::fs::read(&f.host).unwrap(),
            "{} in {}",
            f.guest,
            fs.display()
        );
    }
}

/// `cksum` of a host file as the marker prints it for `guest`: "CRC SIZE GUEST".
fn cksum(host: &Path, guest: &str) -> String {
    let out = run_ok("cksum", &[p(host)]);
    let mut words = out.split_whitespace();
    format!(
        "{} {} {guest}",
        words.next().unwrap(),
        words.next().unwrap()
    )
}

/// What the booted machine reported: the power-cut files with their contents, the swap active
/// with its UUID and label, the root mounted from the first partition.
fn assert_marker(marker: &Marker, m: &InstalledDisk, what: &str) {
    let text = |guest: &str| {
        let f = m.powercut.iter().find(|f| f.guest == guest).unwrap();
        String::from_utf8(std::fs::read(&f.host).unwrap()).unwrap()
    };
    assert_eq!(
        marker.one("powercut"),
        text("/var/log/powercut-marker").trim_end(),
        "{what}"
    );
    assert_eq!(marker.one("motd"), text("/etc/motd").trim_end(), "{what}");
    let mut expected: Vec<String> = m
        .powercut
        .iter()
        .filter(|f| f.guest.starts_with("/root/powercut/"))
        .map(|f| cksum(&f.host, f.guest))
        .collect();
    expected.sort();
    let mut files: Vec<String> = marker.all("file").iter().map(|s| s.to_string()).collect();
    files.sort();
    assert_eq!(files, expected, "{what}: /root/powercut");
    // swapon counts the area without its header page.
    let swap = format!(
        "/dev/vda5 partition {} {SWAP_UUID} {SWAP_LABEL};",
        SWAP_MIB * MIB - 4096
    );
    assert_eq!(marker.one("swaps"), swap, "{what}: active swap");
    assert!(
        marker.one("root").starts_with("/dev/vda1 ext4 "),
        "{what}: {:?}",
        marker.lines
    );
}

/// The capture's partition table, by sfdisk: the same layout with the root shrunk and the
/// swap, the same size, moved down to stay last in its extended partition at the disk's end.
fn check_layout(raw: &Path, source: &Path) {
    let before = partitions(source);
    let after = partitions(raw);
    let nodes: Vec<_> = after.iter().map(|x| &x.node[x.node.len() - 1..]).collect();
    assert_eq!(nodes, ["1", "2", "5"], "{after:?}");
    let (root, ext, swap) = (&after[0], &after[1], &after[2]);
    let sectors = CAPTURE_MIB * MIB / 512;
    assert!(root.bootable && root.kind == "83", "{after:?}");
    assert_eq!(root.start, before[0].start, "{after:?}");
    assert!(
        root.size < ROOT_MIB * MIB / 512,
        "root not shrunk: {after:?}"
    );
    assert_eq!(ext.kind, "5", "{after:?}");
    assert!(ext.start >= root.start + root.size, "{after:?}");
    assert_eq!(swap.kind, "82", "{after:?}");
    assert_eq!(swap.size, SWAP_MIB * MIB / 512, "swap size kept: {after:?}");
    assert!(swap.start > ext.start && swap.start + swap.size <= ext.start + ext.size);
    assert!(swap.start < SWAP_START_MIB * MIB / 512, "swap moved down");
    assert!(
        ext.start + ext.size <= sectors && sectors - (swap.start + swap.size) < MIB / 512,
        "swap last, at the end of the {CAPTURE_MIB} MiB disk: {after:?}"
    );
}

/// The capture's filesystems, by e2fsprogs and blkid: the root clean, replayed (no
/// `needs_recovery`), the power-cut files in it; the swap area with its UUID and label.
fn check_filesystems(raw: &Path, m: &InstalledDisk, work: &Path) {
    let after = partitions(raw);
    let (root, swap) = (&after[0], &after[2]);
    let root_fs = extract(
        raw,
        root.start * 512,
        root.size * 512,
        &work.join("out-root.ext4"),
    );
    run_ok("e2fsck", &["-fn", p(&root_fs)]);
    let header = run_ok("dumpe2fs", &["-h", p(&root_fs)]);
    assert!(!header.contains("needs_recovery"), "{header}");
    assert!(header.contains(ROOT_UUID), "{header}");
    assert_powercut_files_in(&root_fs, m);
    std::fs::remove_file(&root_fs).unwrap();
    let swap_img = extract(
        raw,
        swap.start * 512,
        swap.size * 512,
        &work.join("out-swap.img"),
    );
    let id = run_ok("blkid", &["-p", "-o", "export", p(&swap_img)]);
    for want in [
        "TYPE=swap".to_string(),
        format!("UUID={SWAP_UUID}"),
        format!("LABEL={SWAP_LABEL}"),
    ] {
        assert!(id.lines().any(|l| l == want), "{want} in {id}");
    }
    std::fs::remove_file(&swap_img).unwrap();
}

#[test]
fn an_installed_debian_cut_off_mid_write_is_captured_smaller_and_boots_with_its_last_files() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let started = Instant::now();
    let m = installer_disk(w);
    eprintln!(
        "fixture: {:.1} s (debootstrap cache {})",
        started.elapsed().as_secs_f64(),
        if m.built_cache { "built" } else { "reused" }
    );
    check_construction(&m, w);
    assert_eq!(std::fs::metadata(&m.disk).unwrap().len(), DISK_MIB * MIB);

    // The source boots (the kernel replays the journal) while it is captured.
    let source_boot = Boot::start(&m.disk, "raw", &w.join("source-console.log"));
    let out = w.join("captured.qcow2");
    let t = Instant::now();
    let (ok, stdout, stderr) = diskferry(&[
        "capture".as_ref(),
        m.disk.as_os_str(),
        out.as_os_str(),
        "--mode".as_ref(),
        "auto".as_ref(),
        "--size".as_ref(),
        format!("{CAPTURE_MIB}M").as_ref(),
        "--verify".as_ref(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    let capture_time = t.elapsed();
    let (marker, boot_time) = source_boot.finish(BOOT_LIMIT);
    eprintln!(
        "source disk: booted to its marker in {:.1} s",
        boot_time.as_secs_f64()
    );
    assert_marker(&marker, &m, "source disk");
    assert!(ok, "capture failed:\n{stdout}{stderr}");
    eprintln!("capture: {:.1} s\n{stderr}", capture_time.as_secs_f64());
    assert!(stderr.contains("verify: no differences"), "{stderr}");

    let check = run_ok("qemu-img", &["check", "-f", "qcow2", p(&out)]);
    assert!(check.contains("No errors were found"), "{check}");
    let raw = w.join("captured.raw");
    qemu_img_to_raw(&out, &raw);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), CAPTURE_MIB * MIB);
    check_layout(&raw, &m.disk);
    check_filesystems(&raw, &m, w);
    std::fs::remove_file(&raw).unwrap();

    let (marker, boot_time) =
        Boot::start(&out, "qcow2", &w.join("capture-console.log")).finish(BOOT_LIMIT);
    eprintln!(
        "capture: booted to its marker in {:.1} s",
        boot_time.as_secs_f64()
    );
    assert_marker(&marker, &m, "captured disk");
    let root_bytes: u64 = marker
        .one("root")
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        root_bytes < CAPTURE_MIB * MIB,
        "the booted root is the shrunk one: {root_bytes} bytes"
    );
    boots_over_nbd_with_a_redo_log(&out, &m, w);
    boots_from_a_skeleton_of_it(&out, &m, w);
}

/// Boots what `diskferry export ARGS` serves to its marker (`what` names it in messages) and
/// stops the export cleanly; the capture's bytes never change. Returns the export's log.
fn boots_exported(
    capture: &Path,
    args: &[&str],
    m: &InstalledDisk,
    console: &Path,
    what: &str,
) -> String {
    let before = sha256(capture);
    let export = Exported::start_with(args).unwrap();
    let drive = format!("file={},format=raw,if=virtio", export.url);
    let (marker, boot_time) = Boot::start_drive(&drive, console).finish(BOOT_LIMIT);
    eprintln!(
        "{what}: booted to its marker in {:.1} s",
        boot_time.as_secs_f64()
    );
    assert_marker(&marker, m, what);
    let (stopped, log) = export.stop();
    assert!(stopped, "the export stops cleanly on SIGINT: {log}");
    assert_eq!(sha256(capture), before, "the capture never changes");
    log
}

/// A skeleton of the capture — its table, GRUB's boot code and gap and the swap kept, the
/// root ext4 synthesized in memory with every file's data read from the capture's files —
/// boots over NBD with its writes in memory.
fn boots_from_a_skeleton_of_it(capture: &Path, m: &InstalledDisk, w: &Path) {
    let args = ["--files", p(capture), "--writable", "--redo", "ram:256M"];
    let what = "skeleton of the capture over NBD";
    let log = boots_exported(capture, &args, m, &w.join("skeleton-console.log"), what);
    eprintln!(
        "{}",
        log.lines()
            .find(|l| l.contains("skeleton of"))
            .unwrap_or_default()
    );
}

/// The capture served by `diskferry export --writable --redo` boots over NBD; the system's
/// writes land in the redo log, a qcow2 overlay qemu-img checks.
fn boots_over_nbd_with_a_redo_log(capture: &Path, m: &InstalledDisk, w: &Path) {
    let redo = w.join("redo.qcow2");
    let args = [p(capture), "--writable", "--redo", p(&redo)];
    let what = "capture over NBD with a redo log";
    boots_exported(capture, &args, m, &w.join("nbd-console.log"), what);
    let check = run_ok("qemu-img", &["check", "-f", "qcow2", p(&redo)]);
    assert!(check.contains("No errors were found"), "{check}");
    let chain = run_ok("qemu-img", &["info", "--backing-chain", p(&redo)]);
    assert!(chain.contains(p(capture)), "{chain}");
    let map = run_ok("qemu-img", &["map", "--output=json", p(&redo)]);
    assert!(
        map.contains("\"depth\": 0, \"present\": true"),
        "the boot wrote to the redo log: {map}"
    );
}

fn sha256(path: &Path) -> String {
    run_ok("sha256sum", &[p(path)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
