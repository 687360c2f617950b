//! Auto mode never fails a capture over one volume it cannot rebuild: a GPT disk (`sgdisk`)
//! holding an ext4 with inline data, an ext4 with bigalloc (both made by `mke2fs -d`, both
//! beyond what the ext4 writer recreates) and an ext4 whose superblock is damaged is captured
//! in auto mode: the first two are copied by blocks, the third sector by sector, each with a
//! note; `e2fsck -fn` passes on the first two copies, `qemu-img check` on the image, and
//! verify compares them clean.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_imaging::pipeline::{Mode, OutputOptions};
use diskferry_imaging::progress::Silent;
use diskferry_imaging::{capture, CaptureOptions, CaptureSummary};
use diskferry_vdisk::ImageFormat;

mod common;
use common::{as_raw, extract, place, run};

const MIB: u64 = 1 << 20;

/// `mke2fs -d TREE` with `features` into a new 32 MiB file.
fn ext4(dir: &Path, name: &str, features: &str) -> std::path::PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/tiny"), "inline\n").unwrap();
    std::fs::write(tree.join("etc/big.bin"), vec![0x3cu8; 1 << 20]).unwrap();
    let img = dir.join(name);
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-O", features, "-d"])
        .arg(&tree)
        .arg(&img));
    img
}

#[test]
fn volumes_the_writer_cannot_recreate_are_copied_by_blocks_or_sectors_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:1M:+32M", "-n", "2:0:+32M", "-n", "3:0:+32M"])
        .arg(&disk));
    place(&disk, &ext4(dir.path(), "inline.img", "inline_data"), MIB);
    place(
        &disk,
        &ext4(dir.path(), "bigalloc.img", "bigalloc"),
        33 * MIB,
    );
    let damaged = ext4(dir.path(), "damaged.img", "^metadata_csum");
    // A superblock whose blocks-per-group is zero: detected as ext4, unreadable.
    let dev = FileDevice::open(&damaged, true).unwrap();
    dev.write_at(&[0, 0, 0, 0], 1024 + 0x20).unwrap();
    dev.flush().unwrap();
    place(&disk, &damaged, 65 * MIB);

    let source: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&disk, false).unwrap());
    let out = dir.path().join("out.qcow2");
    let options = CaptureOptions {
        output: OutputOptions {
            format: ImageFormat::Qcow2,
            compress: false,
            overwrite: false,
        },
        mode: Mode::Auto,
        size: None,
        verify: true,
        chunk_map: false,
        base: None,
        transform: None,
    };
    let done = capture(source, &out, &options, &Silent).unwrap();
    let CaptureSummary::Partitions(report) = &done.summary else {
        panic!("{done:?}");
    };
    let part = |n: u32| report.partitions.iter().find(|p| p.number == n).unwrap();
    let note = |n: u32| part(n).note.clone().unwrap_or_default();
    assert_eq!(part(1).mode, Mode::Blocks, "{report:?}");
    assert!(note(1).contains("inline data"), "{}", note(1));
    assert_eq!(part(2).mode, Mode::Blocks, "{report:?}");
    assert!(note(2).contains("bigalloc"), "{}", note(2));
    assert_eq!(part(3).mode, Mode::Sectors, "{report:?}");
    assert!(note(3).contains("cannot be read"), "{}", note(3));
    assert_eq!(done.verify.unwrap().differences, 0);

    let raw = as_raw(&out);
    for n in [1, 2] {
        run(Command::new("e2fsck").arg("-fn").arg(extract(&raw, n)));
    }
    let tiny = run(Command::new("debugfs")
        .args(["-R", "cat /etc/tiny"])
        .arg(extract(&raw, 1)));
    assert!(tiny.contains("inline"), "{tiny}");
}
