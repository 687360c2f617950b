//! Which firmware a disk boots with, from its sectors and its EFI System Partitions:
//! - **BIOS:** boot code in the MBR (the real one, or GPT's protective one — a BIOS runs
//!   those 440 bytes and nothing else); on a disk without a table, code in the volume's boot
//!   sector (mkfs.fat's "not a bootable disk" stub does not count). A GPT BIOS boot partition
//!   is reported as evidence, but without MBR code no BIOS can reach it.
//! - **UEFI:** an EFI System Partition (GPT `C12A7328-…` or MBR 0xEF; or a table-less FAT
//!   volume) holding a loader `\EFI\*\*.efi`; shim or the Windows Boot Manager among them
//!   means Secure Boot firmware accepts it.
//!
//! Directory listings of the ESP are bounded ([`MAX_ENTRIES`]).

use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_customize::compat::FirmwareReport;
use diskferry_fs::{self as fs, FileKind, Filesystem, FsKind};
use diskferry_partition::{self as partition, PartitionTable, Scheme};

use super::Volume;

/// Most entries of one ESP directory looked at.
const MAX_ENTRIES: usize = 512;
/// Bytes of an MBR that are boot code (the disk signature follows).
const MBR_CODE: usize = 440;
/// What mkfs.fat writes as the boot code of a volume that cannot boot.
const FAT_STUB: &[u8] = b"This is not a bootable disk";

/// The firmware types `disk` (read as `table` and `volumes`) boots with.
pub fn firmware(
    disk: &Arc<dyn BlockDevice>,
    table: &PartitionTable,
    volumes: &[Volume],
) -> FirmwareReport {
    let mut r = FirmwareReport::default();
    let mut sector = [0u8; 512];
    if let Err(e) = disk.read_at(&mut sector, 0) {
        r.evidence.push(format!("sector 0 unreadable: {e}"));
        return r;
    }
    match table.scheme {
        Scheme::None => volume_boot_code(disk, &sector, &mut r),
        scheme => {
            r.bios = sector[..MBR_CODE].iter().any(|&b| b != 0);
            let mbr = if scheme == Scheme::Gpt {
                "the protective MBR"
            } else {
                "the MBR"
            };
            r.evidence.push(if r.bios {
                format!("boot code in {mbr}")
            } else {
                format!("no boot code in {mbr}")
            });
        }
    }
    for (p, dev) in volumes {
        if partition::is_bios_boot(&p.kind) {
            r.evidence.push(format!("BIOS boot partition {}", p.number));
        }
        let tableless_fat = table.scheme == Scheme::None
            && matches!(
                fs::detect(&**dev),
                Ok(FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32)
            );
        if partition::is_efi_system(&p.kind) || tableless_fat {
            esp(p.number, dev, &mut r);
        }
    }
    r
}

/// A table-less disk: the volume's own boot sector is what a BIOS runs.
fn volume_boot_code(disk: &Arc<dyn BlockDevice>, sector: &[u8; 512], r: &mut FirmwareReport) {
    let code = match fs::detect(&**disk) {
        // The code follows the BIOS parameter block (FAT32's is longer: no root entry count).
        Ok(FsKind::Fat12 | FsKind::Fat16) => &sector[0x3e..0x1fe],
        Ok(FsKind::Fat32) => &sector[0x5a..0x1fe],
        Ok(FsKind::Ntfs) => &sector[0x54..0x1fe],
        _ => &sector[..MBR_CODE],
    };
    let stub = code.windows(FAT_STUB.len()).any(|w| w == FAT_STUB);
    r.bios = !stub && code.iter().any(|&b| b != 0);
    r.evidence.push(
        match (r.bios, stub) {
            (true, _) => "boot code in the volume's boot sector",
            (false, true) => "the volume's boot sector says it is not bootable",
            (false, false) => "no boot code in sector 0",
        }
        .into(),
    );
}

/// Entries of `dir` whose names match `want` without regard to ASCII case, at most
/// [`MAX_ENTRIES`] looked at.
fn entries(
    f: &dyn Filesystem,
    dir: fs::NodeId,
    want: impl Fn(&str, FileKind) -> bool,
) -> Vec<(String, fs::NodeId)> {
    f.read_dir(dir)
        .unwrap_or_default()
        .into_iter()
        .take(MAX_ENTRIES)
        .filter_map(|e| {
            let name = e.name_lossy();
            want(&name.to_ascii_lowercase(), e.kind).then_some((name, e.node))
        })
        .collect()
}

/// The loaders of the ESP `number`: `/EFI/VENDOR/NAME.efi`.
fn esp(number: u32, dev: &Arc<dyn BlockDevice>, r: &mut FirmwareReport) {
    let f = match fs::open(Arc::clone(dev)) {
        Ok(f) => f,
        Err(e) => {
            r.evidence
                .push(format!("EFI System Partition {number} unreadable: {e}"));
            return;
        }
    };
    let mut loaders = Vec::new();
    for (efi, node) in entries(&*f, f.root(), |n, k| n == "efi" && k == FileKind::Dir) {
        for (vendor, vnode) in entries(&*f, node, |_, k| k == FileKind::Dir) {
            for (file, _) in entries(&*f, vnode, |n, k| {
                n.ends_with(".efi") && k == FileKind::File
            }) {
                let lower = file.to_ascii_lowercase();
                r.shim |= lower.starts_with("shim") || lower == "bootmgfw.efi";
                loaders.push(format!("/{efi}/{vendor}/{file}"));
            }
        }
    }
    if loaders.is_empty() {
        r.evidence
            .push(format!("EFI System Partition {number} holds no loader"));
    } else {
        r.uefi = true;
        r.evidence.push(format!(
            "EFI System Partition {number} with {}",
            loaders.join(", ")
        ));
    }
}
