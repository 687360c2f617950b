//! The MBR: four primary entries in sector 0, and logical partitions in a chain of extended
//! boot records (EBRs) inside an extended partition. Sector addresses are in 512-byte units
//! unless the disk's logical sector size says otherwise.

use std::collections::HashSet;

use super::{Partition, PartitionError, PartitionTable, PartitionType, Result, Scheme};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::le::le32;

/// Most logical partitions followed in an EBR chain.
pub const MAX_LOGICAL: usize = 128;

/// One 16-byte partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub status: u8,
    pub system_id: u8,
    pub first_lba: u32,
    pub sectors: u32,
}

/// Sector 0, parsed.
#[derive(Debug, Clone)]
pub struct Mbr {
    pub signature: u32,
    pub entries: [Entry; 4],
    /// The sector is a filesystem's boot sector (FAT, NTFS, exFAT) rather than a partition
    /// table: a disk formatted without partitions.
    pub looks_like_boot_sector: bool,
}

fn entry(b: &[u8], i: usize) -> Entry {
    let e = &b[446 + 16 * i..462 + 16 * i];
    Entry {
        status: e[0],
        system_id: e[4],
        first_lba: le32(e, 8),
        sectors: le32(e, 12),
    }
}

/// Parses a 512-byte sector 0; `None` without the 0x55AA signature.
pub fn parse_sector(b: &[u8]) -> Option<Mbr> {
    if b.len() < 512 || b[510] != 0x55 || b[511] != 0xAA {
        return None;
    }
    let entries = [entry(b, 0), entry(b, 1), entry(b, 2), entry(b, 3)];
    let oem = &b[3..11];
    let fs_boot_sector = oem == b"NTFS    "
        || oem == b"EXFAT   "
        || &b[54..59] == b"FAT12"
        || &b[54..59] == b"FAT16"
        || &b[82..87] == b"FAT32";
    let bad_status = entries.iter().any(|e| e.status != 0 && e.status != 0x80);
    Some(Mbr {
        signature: le32(b, 440),
        entries,
        looks_like_boot_sector: fs_boot_sector || bad_status,
    })
}

fn is_extended(id: u8) -> bool {
    matches!(id, 0x05 | 0x0F | 0x85)
}

/// The partitions of an MBR disk: primaries numbered by slot, logicals from 5.
pub fn read(disk: &dyn BlockDevice, mbr: &Mbr) -> Result<PartitionTable> {
    let sector = u64::from(disk.logical_sector_size());
    let disk_size = disk.size();
    let mut partitions = Vec::new();
    let mut warnings = Vec::new();
    let mut push = |partitions: &mut Vec<Partition>, number: u32, e: &Entry, base: u64| {
        let start = (base + u64::from(e.first_lba)) * sector;
        let size = u64::from(e.sectors) * sector;
        if e.first_lba == 0 || size == 0 || start + size > disk_size {
            warnings.push(format!(
                "partition {number} ({start}+{size} bytes) does not fit the {disk_size}-byte disk; skipped"
            ));
            return;
        }
        partitions.push(Partition {
            number,
            start,
            size,
            kind: PartitionType::Mbr(e.system_id),
            guid: None,
            name: String::new(),
            attributes: 0,
            bootable: e.status == 0x80,
        });
    };
    let mut extended: Option<(u32, Entry)> = None;
    let mut mbr_extended = None;
    for (i, e) in mbr.entries.iter().enumerate() {
        if e.system_id == 0 {
            continue;
        }
        if is_extended(e.system_id) {
            if extended.is_some() {
                return Err(PartitionError::Damaged(
                    "the MBR has more than one extended partition".into(),
                ));
            }
            extended = Some((i as u32 + 1, *e));
            continue;
        }
        push(&mut partitions, i as u32 + 1, e, 0);
    }
    if let Some((slot, ext)) = extended {
        let mut ebrs = Vec::new();
        let ext_start = u64::from(ext.first_lba);
        let ext_end = ext_start + u64::from(ext.sectors);
        let mut seen = HashSet::new();
        let mut ebr_at = ext_start;
        let mut number = 5;
        let mut buf = vec![0u8; 512];
        loop {
            if !seen.insert(ebr_at) || seen.len() > MAX_LOGICAL {
                return Err(PartitionError::Damaged(format!(
                    "the chain of extended boot records loops or exceeds {MAX_LOGICAL} entries"
                )));
            }
            if ebr_at >= ext_end || (ebr_at + 1) * sector > disk_size {
                return Err(PartitionError::Damaged(format!(
                    "an extended boot record at sector {ebr_at} lies outside the extended partition"
                )));
            }
            disk.read_at(&mut buf, ebr_at * sector)?;
            if buf[510] != 0x55 || buf[511] != 0xAA {
                return Err(PartitionError::Damaged(format!(
                    "the extended boot record at sector {ebr_at} has no 0x55AA signature"
                )));
            }
            let (logical, next) = (entry(&buf, 0), entry(&buf, 1));
            if logical.system_id != 0 {
                let before = partitions.len();
                push(&mut partitions, number, &logical, ebr_at);
                if partitions.len() > before {
                    ebrs.push(ebr_at * sector);
                }
                number += 1;
            }
            if next.system_id == 0 || next.first_lba == 0 {
                break;
            }
            ebr_at = ext_start + u64::from(next.first_lba);
        }
        mbr_extended = Some(super::MbrExtended {
            slot,
            start: ext_start * sector,
            size: u64::from(ext.sectors) * sector,
            system_id: ext.system_id,
            ebrs,
        });
    }
    Ok(PartitionTable {
        scheme: Scheme::Mbr,
        sector_size: sector as u32,
        disk_guid: None,
        mbr_signature: Some(mbr.signature),
        partitions,
        gpt_entries: 0,
        mbr_extended,
        warnings,
    })
}
