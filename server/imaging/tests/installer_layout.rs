//! The Debian installer's disk layout, made by real tools, captured smaller and larger in auto
//! mode: `sfdisk` lays out an ext4 root then an extended partition whose logical partition is
//! swap; `mke2fs -d` fills the root, `mkswap` labels the swap, and the boot loader's gap after
//! the MBR holds bytes as GRUB's core image would. Checked with `qemu-img check`, `sfdisk
//! --verify`, `e2fsck -fn`, `swaplabel` and `cmp` of the gap — and `verify` finds a byte
//! changed in that gap. A root left with an unreplayed journal (a committed transaction
//! written by debugfs's `jo`/`jw`/`jc`, as a power cut leaves it) is captured with the
//! transaction replayed, read back by `debugfs cat`, the source untouched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_imaging::pipeline::verify::verify_disks;
use diskferry_imaging::pipeline::{Mode, OutputOptions};
use diskferry_imaging::progress::Silent;
use diskferry_imaging::{capture, CaptureOptions, CaptureSummary};
use diskferry_partition as partition;
use diskferry_vdisk::ImageFormat;

mod common;
use common::{as_raw, extract, place, run};

const MIB: u64 = 1 << 20;
const SWAP_UUID: &str = "0b7e8f6a-1c2d-4e3f-8a9b-0c1d2e3f4a5b";

/// A 256 MiB MBR disk: root ext4 at 1 MiB (160 MiB), extended partition after it holding a
/// swap logical partition to the end; a GRUB-like core image in the gap after sector 0.
fn installer_disk(dir: &Path, journal: bool) -> PathBuf {
    let disk = dir.join("source.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (apt: fdisk)");
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=327680, type=83, bootable\nstart=331776, type=5\nstart=333824, type=82\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let table = partition::read_table(&FileDevice::open(&disk, false).unwrap()).unwrap();
    let root = table.partitions.iter().find(|p| p.number == 1).unwrap();
    let swap = table.partitions.iter().find(|p| p.number == 5).unwrap();

    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "installed\n").unwrap();
    std::fs::write(tree.join("etc/data.bin"), vec![0x5au8; 3 << 20]).unwrap();
    let root_img = dir.join("root.img");
    std::fs::File::create(&root_img)
        .unwrap()
        .set_len(root.size)
        .unwrap();
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", "root", "-d"])
        .arg(&tree)
        .arg(&root_img));
    let swap_img = dir.join("swap.img");
    std::fs::File::create(&swap_img)
        .unwrap()
        .set_len(swap.size)
        .unwrap();
    run(Command::new("mkswap")
        .args(["-L", "theswap", "-U", SWAP_UUID])
        .arg(&swap_img));
    if journal {
        leave_unreplayed(dir, &root_img);
    }
    place(&disk, &root_img, root.start);
    place(&disk, &swap_img, swap.start);
    let core: Vec<u8> = (0..200_000u32).map(|i| (i * 13 + 7) as u8).collect();
    let dev = FileDevice::open(&disk, true).unwrap();
    dev.write_at(&core, 512).unwrap();
    dev.write_at(&[0xeb, 0x63, 0x90], 0).unwrap();
    dev.flush().unwrap();
    disk
}

/// Leaves `/etc/powercut` (a new file) and a new `/etc/hostname` in the journal of the ext4
/// image `img` as one committed, unreplayed transaction — what a power cut after the commit
/// leaves: the blocks a `debugfs -w` copy changed, logged with `jo`/`jw`/`jc`.
fn leave_unreplayed(dir: &Path, img: &Path) {
    let later = dir.join("later.img");
    std::fs::copy(img, &later).unwrap();
    let (cut, host) = (dir.join("powercut"), dir.join("hostname"));
    std::fs::write(&cut, "written just before the power cut\n").unwrap();
    std::fs::write(&host, "after-the-cut\n").unwrap();
    let script = format!(
        "cd /etc\nrm hostname\nwrite {} hostname\nwrite {} powercut\n",
        host.display(),
        cut.display()
    );
    run(Command::new("debugfs")
        .args(["-w", "-f"])
        .arg(write_tmp(dir, "s1", &script))
        .arg(&later));
    let (a, b) = (std::fs::read(img).unwrap(), std::fs::read(&later).unwrap());
    let bs = 4096;
    let changed: Vec<usize> = (0..a.len() / bs)
        .filter(|i| a[i * bs..(i + 1) * bs] != b[i * bs..(i + 1) * bs])
        .collect();
    let data: Vec<u8> = changed
        .iter()
        .flat_map(|i| b[i * bs..(i + 1) * bs].to_vec())
        .collect();
    let blocks: Vec<String> = changed.iter().map(usize::to_string).collect();
    let tx = write_tmp(dir, "tx", "");
    std::fs::write(&tx, data).unwrap();
    let journal = format!("jo\njw -b {} {}\njc\n", blocks.join(","), tx.display());
    run(Command::new("debugfs")
        .args(["-w", "-f"])
        .arg(write_tmp(dir, "s2", &journal))
        .arg(img));
    let state = run(Command::new("dumpe2fs").arg("-h").arg(img));
    assert!(state.contains("needs_recovery"), "{state}");
}

fn write_tmp(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn auto_qcow2(size: u64) -> CaptureOptions {
    CaptureOptions {
        output: OutputOptions {
            format: ImageFormat::Qcow2,
            compress: false,
            overwrite: false,
        },
        mode: Mode::Auto,
        size: Some(size),
        verify: true,
        chunk_map: false,
        base: None,
        transform: None,
    }
}

fn check_copy(src: &Path, out: &Path, size: u64) {
    let raw = as_raw(out);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
    run(Command::new("sfdisk").arg("--verify").arg(&raw));
    run(Command::new("e2fsck").arg("-fn").arg(extract(&raw, 1)));
    let labels = run(Command::new("swaplabel").arg(extract(&raw, 5)));
    assert!(
        labels.contains("theswap") && labels.contains(SWAP_UUID),
        "{labels}"
    );
    // The boot loader's gap, byte for byte.
    run(Command::new("cmp").args(["-n", "440"]).arg(src).arg(&raw));
    run(Command::new("cmp")
        .args(["-i", "512", "-n", "1048064"])
        .arg(src)
        .arg(&raw));
}

#[test]
fn the_installers_layout_is_captured_smaller_with_swap_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let src = installer_disk(dir.path(), false);
    let source: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&src, false).unwrap());
    let out = dir.path().join("small.qcow2");
    let done = capture(Arc::clone(&source), &out, &auto_qcow2(128 * MIB), &Silent).unwrap();
    let CaptureSummary::Partitions(report) = &done.summary else {
        panic!("{done:?}");
    };
    let swap = report.partitions.iter().find(|p| p.number == 5).unwrap();
    assert_eq!(
        (swap.filesystem, swap.mode),
        ("swap", Mode::Files),
        "{report:?}"
    );
    assert!(
        swap.read <= 4096,
        "the swap's old pages are not read: {swap:?}"
    );
    assert_eq!(done.verify.unwrap().differences, 0);
    check_copy(&src, &out, 128 * MIB);
}

#[test]
fn the_installers_layout_is_captured_larger_with_swap_staying_last() {
    let dir = tempfile::tempdir().unwrap();
    let src = installer_disk(dir.path(), false);
    let source: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&src, false).unwrap());
    let out = dir.path().join("big.qcow2");
    capture(Arc::clone(&source), &out, &auto_qcow2(512 * MIB), &Silent).unwrap();
    check_copy(&src, &out, 512 * MIB);
    let (_, image) = diskferry_vdisk::open_image(&out, false).unwrap();
    let table = partition::read_table(&*image).unwrap();
    let swap = table.partitions.iter().find(|p| p.number == 5).unwrap();
    assert_eq!(swap.end(), 512 * MIB);
}

#[test]
fn a_power_cut_journal_is_replayed_into_the_smaller_capture() {
    let dir = tempfile::tempdir().unwrap();
    let src = installer_disk(dir.path(), true);
    let source: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&src, false).unwrap());
    let out = dir.path().join("replayed.qcow2");
    let done = capture(Arc::clone(&source), &out, &auto_qcow2(160 * MIB), &Silent).unwrap();
    let CaptureSummary::Partitions(report) = &done.summary else {
        panic!("{done:?}");
    };
    let root = &report.partitions[0];
    assert_eq!(root.mode, Mode::Files, "{report:?}");
    assert!(
        root.note.as_deref().unwrap_or("").contains("replayed"),
        "{root:?}"
    );
    assert_eq!(done.verify.unwrap().differences, 0);
    check_copy(&src, &out, 160 * MIB);
    let part = extract(&out.with_extension("raw"), 1);
    let cut = run(Command::new("debugfs")
        .args(["-R", "cat /etc/powercut"])
        .arg(&part));
    assert!(cut.contains("written just before the power cut"), "{cut}");
    let host = run(Command::new("debugfs")
        .args(["-R", "cat /etc/hostname"])
        .arg(&part));
    assert!(host.contains("after-the-cut"), "{host}");
    // The source was not written: its journal still waits for recovery.
    let state = run(Command::new("dumpe2fs").arg("-h").arg(extract(&src, 1)));
    assert!(state.contains("needs_recovery"), "{state}");
}

#[test]
fn verify_finds_a_byte_changed_in_the_boot_loaders_gap() {
    let dir = tempfile::tempdir().unwrap();
    let src = installer_disk(dir.path(), false);
    let copy = dir.path().join("copy.img");
    std::fs::copy(&src, &copy).unwrap();
    let b: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&copy, true).unwrap());
    b.write_at(&[0xff], 600_000).unwrap();
    let a: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&src, false).unwrap());
    let report = verify_disks(&a, &b).unwrap();
    assert_eq!(report.differences, 1, "{report:?}");
    assert!(
        report.listed[0].contains("outside partitions"),
        "{report:?}"
    );
}
