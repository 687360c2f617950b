//! The imaging API without root or a network: a GPT disk in memory with an ext4 and a FAT
//! partition (made by our writers from a host directory) is captured file by file into a
//! qcow2, deployed onto a smaller disk full of garbage, and verified — and `verify` finds a
//! byte changed in a file, a file missing and a table that differs.

use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_fs::ext4::write::{write_ext4, Ext4Options};
use diskferry_fs::host::HostFs;
use diskferry_imaging::pipeline::verify::verify_disks;
use diskferry_imaging::pipeline::{DeployHow, Mode, OutputOptions};
use diskferry_imaging::progress::Silent;
use diskferry_imaging::{capture, deploy, CaptureOptions, CaptureSummary};
use diskferry_partition::{self as partition, Guid};

mod common;
use diskferry_vdisk::ImageFormat;

const MIB: u64 = 1 << 20;

fn tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc/deep/er")).unwrap();
    std::fs::write(dir.join("etc/hostname"), b"memory-host\n").unwrap();
    std::fs::write(dir.join("etc/deep/er/data.bin"), vec![0xa5u8; 300_000]).unwrap();
    for i in 0..40 {
        std::fs::write(dir.join(format!("etc/f{i}")), format!("file {i}\n")).unwrap();
    }
}

/// A 64 MiB GPT disk: a 16 MiB FAT partition and an ext4 partition to the end.
fn sample_disk(dir: &Path) -> Arc<dyn BlockDevice> {
    let src = dir.join("tree");
    tree(&src);
    common::gpt_fat_ext4(&src, &src)
}

fn files_mode_qcow2() -> CaptureOptions {
    CaptureOptions {
        output: OutputOptions {
            format: ImageFormat::Qcow2,
            compress: false,
            overwrite: false,
        },
        mode: Mode::Files,
        size: None,
        verify: true,
        chunk_map: false,
        base: None,
        transform: None,
    }
}

#[test]
fn a_partitioned_disk_is_captured_file_by_file_deployed_smaller_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let source = sample_disk(dir.path());
    let out = dir.path().join("disk.qcow2");
    let done = capture(Arc::clone(&source), &out, &files_mode_qcow2(), &Silent).unwrap();
    let CaptureSummary::Partitions(report) = &done.summary else {
        panic!("a partitioned source is captured partition by partition: {done:?}");
    };
    let modes: Vec<Mode> = report.partitions.iter().map(|p| p.mode).collect();
    assert_eq!(modes, [Mode::Files, Mode::Files], "{report:?}");
    let verified = done.verify.expect("verify was asked for");
    assert_eq!(verified.differences, 0);
    assert!(verified.files_compared >= 2 * 44, "{verified:?}");

    // Deploy onto a smaller disk holding garbage: the ext4 partition shrinks to fit.
    let mut garbage = vec![0u8; (48 * MIB) as usize];
    garbage
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7 + 3) as u8);
    let target: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(garbage.len()));
    target.write_at(&garbage, 0).unwrap();
    let (_, image) = diskferry_vdisk::open_image(&out, false).unwrap();
    // The rebuilt FAT's boot sector names the partition's start as its hidden sectors.
    let mut boot = [0u8; 512];
    image.read_at(&mut boot, MIB).unwrap();
    assert_eq!(boot[28..32], ((MIB / 512) as u32).to_le_bytes());
    let deployed = deploy(
        image,
        Arc::clone(&target),
        "memory",
        &DeployHow::mode(Mode::Auto),
        &Silent,
    )
    .unwrap();
    assert_eq!(deployed.verify.differences, 0);
    let table = partition::read_table(&*target).unwrap();
    assert_eq!(table.partitions.len(), 2);
    assert!(table.partitions[1].start + table.partitions[1].size <= 48 * MIB);
    // And the deployed disk compares equal to the original source, file by file.
    assert_eq!(verify_disks(&source, &target).unwrap().differences, 0);
}

#[test]
fn verify_reports_a_changed_byte_inside_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let source = sample_disk(dir.path());
    let copy: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(source.size() as usize));
    let mut buf = vec![0u8; source.size() as usize];
    source.read_at(&mut buf, 0).unwrap();
    // Change one byte of data.bin (its 0xa5 bytes sit in the ext4 partition).
    let ext4 = (17 * MIB) as usize..(63 * MIB) as usize;
    let at = ext4.start + buf[ext4].windows(64).position(|w| w == [0xa5; 64]).unwrap();
    buf[at] ^= 0xff;
    copy.write_at(&buf, 0).unwrap();
    let report = verify_disks(&source, &copy).unwrap();
    assert_eq!(report.differences, 1, "{report:?}");
    assert!(
        report.listed[0].contains("data.bin") && report.listed[0].contains("content differs"),
        "{report:?}"
    );
}

#[test]
fn verify_reports_a_table_that_differs() {
    let dir = tempfile::tempdir().unwrap();
    let source = sample_disk(dir.path());
    let blank: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(source.size() as usize));
    let other_dir = tempfile::tempdir().unwrap();
    let other = sample_disk(other_dir.path());
    // Same layout, other disk GUID.
    let mut table = partition::read_table(&*other).unwrap();
    table.disk_guid = Guid::parse("00000000-1111-4222-8333-444444444444");
    partition::write_table(&*other, &table).unwrap();
    let report = verify_disks(&source, &other).unwrap();
    assert!(
        report.differences > 0,
        "a different disk GUID is a difference"
    );
    let blank_verdict = verify_disks(&source, &blank);
    assert!(
        blank_verdict.as_ref().map_or(true, |r| r.differences > 0),
        "a disk without a table never verifies equal: {blank_verdict:?}"
    );
}

/// Two bare filesystems (no partition table) built from different trees must differ; a disk
/// of bare sectors is compared byte for byte.
#[test]
fn verify_compares_whole_disk_volumes_and_never_passes_on_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ext4 = |tree_dir: &Path| -> Arc<dyn BlockDevice> {
        let disk: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new((32 * MIB) as usize));
        let host = HostFs::open(tree_dir).unwrap();
        write_ext4(Arc::clone(&disk), &host, &Ext4Options::default()).unwrap();
        disk
    };
    let (ta, tb) = (dir.path().join("a"), dir.path().join("b"));
    tree(&ta);
    tree(&tb);
    std::fs::write(tb.join("etc/hostname"), b"another-host\n").unwrap();
    let (a, b) = (ext4(&ta), ext4(&tb));
    let report = verify_disks(&a, &b).unwrap();
    assert!(report.files_compared > 40, "{report:?}");
    assert!(report.differences >= 1, "{report:?}");
    assert!(
        report.listed.iter().any(|l| l.contains("hostname")),
        "{report:?}"
    );

    let mut bytes = vec![0u8; (4 * MIB) as usize];
    bytes[MIB as usize..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 253) as u8 + 1);
    let raw_a: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(bytes.len()));
    raw_a.write_at(&bytes, 0).unwrap();
    let raw_b: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(bytes.len()));
    raw_b.write_at(&bytes, 0).unwrap();
    let same = verify_disks(&raw_a, &raw_b).unwrap();
    assert_eq!(same.differences, 0, "{same:?}");
    assert!(same.bytes_compared >= 3 * MIB, "{same:?}");
    bytes[2 * MIB as usize] ^= 1;
    raw_b.write_at(&bytes, 0).unwrap();
    assert_eq!(verify_disks(&raw_a, &raw_b).unwrap().differences, 1);

    let (za, zb): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) = (
        Arc::new(MemoryDevice::new(MIB as usize)),
        Arc::new(MemoryDevice::new(MIB as usize)),
    );
    // Two blank disks agree (a device that cannot tell zeros compares their bytes).
    assert_eq!(verify_disks(&za, &zb).unwrap().differences, 0);
}
