//! What the imaging tests share: running a tool, placing a filesystem image into a disk image,
//! converting an output to raw, taking a partition out of it, and a GPT disk in memory with a
//! FAT and an ext4 partition made by our writers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice, MemoryDevice, SliceDevice};
use diskferry_fs::ext4::write::{write_ext4, Ext4Options};
use diskferry_fs::fat_write::{write_fat, FatOptions};
use diskferry_fs::host::HostFs;
use diskferry_partition as partition;
use diskferry_partition::{gpt_types, Guid, Partition, PartitionTable, PartitionType, Scheme};

const MIB: u64 = 1 << 20;

fn gpt_part(number: u32, start: u64, size: u64, kind: &str) -> Partition {
    Partition {
        number,
        start,
        size,
        kind: PartitionType::Gpt(Guid::parse(kind).unwrap()),
        guid: Some(Guid::parse(&format!("1F2E3D4C-0000-4000-8000-00000000000{number}")).unwrap()),
        name: format!("part{number}"),
        attributes: 0,
        bootable: false,
    }
}

/// A 64 MiB GPT disk in memory: a 16 MiB EFI system partition (FAT, from the host directory
/// `fat`) and an ext4 partition to the end (from `ext4`).
pub fn gpt_fat_ext4(fat: &Path, ext4: &Path) -> Arc<dyn BlockDevice> {
    let disk: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new((64 * MIB) as usize));
    let table = PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: 512,
        disk_guid: Guid::parse("5D1F0A3E-7C44-4B8E-9A61-2F3B4C5D6E7F"),
        mbr_signature: None,
        partitions: vec![
            gpt_part(1, MIB, 16 * MIB, gpt_types::EFI_SYSTEM),
            gpt_part(2, 17 * MIB, 46 * MIB, gpt_types::LINUX_FILESYSTEM),
        ],
        gpt_entries: 128,
        mbr_extended: None,
        warnings: Vec::new(),
    };
    partition::write_table(&*disk, &table).unwrap();
    let slice = |p: &Partition| -> Arc<dyn BlockDevice> {
        Arc::new(SliceDevice::new(Arc::clone(&disk), p.start, p.size).unwrap())
    };
    let fat = HostFs::open(fat).unwrap();
    write_fat(slice(&table.partitions[0]), &fat, &FatOptions::default()).unwrap();
    let ext4 = HostFs::open(ext4).unwrap();
    write_ext4(slice(&table.partitions[1]), &ext4, &Ext4Options::default()).unwrap();
    disk
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Writes `file` into `disk` at byte `at`.
pub fn place(disk: &Path, file: &Path, at: u64) {
    run(Command::new("dd")
        .arg(format!("if={}", file.display()))
        .arg(format!("of={}", disk.display()))
        .args([
            "bs=1M",
            "conv=notrunc,sparse",
            "status=none",
            "oflag=seek_bytes",
        ])
        .arg(format!("seek={at}")));
}

/// The image converted to raw with qemu-img, after `qemu-img check`.
pub fn as_raw(image: &Path) -> PathBuf {
    run(Command::new("qemu-img").arg("check").arg(image));
    let raw = image.with_extension("raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    raw
}

/// Extracts partition `number` of a raw disk into its own file.
pub fn extract(raw: &Path, number: u32) -> PathBuf {
    let table = partition::read_table(&FileDevice::open(raw, false).unwrap()).unwrap();
    let p = table
        .partitions
        .iter()
        .find(|p| p.number == number)
        .unwrap();
    let out = raw.with_extension(format!("p{number}"));
    run(Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "status=none", "iflag=skip_bytes,count_bytes"])
        .arg(format!("skip={}", p.start))
        .arg(format!("count={}", p.size)));
    out
}
