//! The MBR: four primary entries in sector 0, and logical partitions in a chain of extended
//! boot records (EBRs) inside an extended partition. Sector addresses are in 512-byte units
//! unless the disk's logical sector size says otherwise.

use std::collections::HashSet;

use super::ondisk::{mbr as layout, mbr_entry};
use super::{
    MbrExtended, Partition, PartitionError, PartitionTable, PartitionType, Result, Scheme,
};
use diskferry_blockdev::BlockDevice;

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

/// Entry `i` of the MBR or EBR sector `b`.
fn entry(b: &[u8], i: usize) -> Entry {
    let e = layout::ENTRIES.get(b, i);
    Entry {
        status: mbr_entry::STATUS.get(e),
        system_id: mbr_entry::SYSTEM_ID.get(e),
        first_lba: mbr_entry::FIRST_LBA.get(e),
        sectors: mbr_entry::SECTORS.get(e),
    }
}

/// Whether `b` ends with the 0x55AA boot signature.
fn signed(b: &[u8]) -> bool {
    b.len() >= layout::LEN && layout::BOOT_SIGNATURE.get(b) == layout::BOOT_SIGNATURE_VALUE
}

/// Parses a 512-byte sector 0; `None` without the 0x55AA signature.
pub fn parse_sector(b: &[u8]) -> Option<Mbr> {
    if !signed(b) {
        return None;
    }
    let entries = [entry(b, 0), entry(b, 1), entry(b, 2), entry(b, 3)];
    let oem = layout::FS_OEM_NAME.get(b);
    let fat = layout::FAT16_FS_TYPE.get(b);
    let fs_boot_sector = &oem == b"NTFS    "
        || &oem == b"EXFAT   "
        || &fat == b"FAT12"
        || &fat == b"FAT16"
        || &layout::FAT32_FS_TYPE.get(b) == b"FAT32";
    let bad_status = entries
        .iter()
        .any(|e| e.status != 0 && e.status != mbr_entry::STATUS_ACTIVE);
    Some(Mbr {
        signature: layout::DISK_SIGNATURE.get(b),
        entries,
        looks_like_boot_sector: fs_boot_sector || bad_status,
    })
}

fn is_extended(id: u8) -> bool {
    mbr_entry::EXTENDED_IDS.contains(&id)
}

/// Partitions found so far, and what was skipped.
struct Found {
    sector: u64,
    disk_size: u64,
    partitions: Vec<Partition>,
    warnings: Vec<String>,
}

impl Found {
    /// Adds partition `number` from entry `e`, whose first LBA counts from sector `base`;
    /// false (with a warning) when it does not fit the disk.
    fn push(&mut self, number: u32, e: &Entry, base: u64) -> bool {
        let start = (base + u64::from(e.first_lba)) * self.sector;
        let size = u64::from(e.sectors) * self.sector;
        if e.first_lba == 0 || size == 0 || start + size > self.disk_size {
            self.warnings.push(format!(
                "partition {number} ({start}+{size} bytes) does not fit the {}-byte disk; skipped",
                self.disk_size
            ));
            return false;
        }
        self.partitions.push(Partition {
            number,
            start,
            size,
            kind: PartitionType::Mbr(e.system_id),
            guid: None,
            name: String::new(),
            attributes: 0,
            bootable: e.status == mbr_entry::STATUS_ACTIVE,
        });
        true
    }
}

/// The partitions of an MBR disk: primaries numbered by slot, logicals from 5.
pub fn read(disk: &dyn BlockDevice, mbr: &Mbr) -> Result<PartitionTable> {
    let sector = u64::from(disk.logical_sector_size());
    let mut found = Found {
        sector,
        disk_size: disk.size(),
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    let mut extended: Option<(u32, Entry)> = None;
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
        found.push(i as u32 + 1, e, 0);
    }
    let mbr_extended = match extended {
        Some((slot, ext)) => Some(logical_chain(disk, slot, &ext, &mut found)?),
        None => None,
    };
    Ok(PartitionTable {
        scheme: Scheme::Mbr,
        sector_size: sector as u32,
        disk_guid: None,
        mbr_signature: Some(mbr.signature),
        partitions: found.partitions,
        gpt_entries: 0,
        mbr_extended,
        warnings: found.warnings,
    })
}

/// Follows the chain of extended boot records inside the extended partition `ext` (in MBR
/// slot `slot`), adding its logical partitions from number 5.
fn logical_chain(
    disk: &dyn BlockDevice,
    slot: u32,
    ext: &Entry,
    found: &mut Found,
) -> Result<MbrExtended> {
    let sector = found.sector;
    let mut ebrs = Vec::new();
    let ext_start = u64::from(ext.first_lba);
    let ext_end = ext_start + u64::from(ext.sectors);
    let mut seen = HashSet::new();
    let mut ebr_at = ext_start;
    let mut number = 5;
    let mut buf = vec![0u8; layout::LEN];
    loop {
        if !seen.insert(ebr_at) || seen.len() > MAX_LOGICAL {
            return Err(PartitionError::Damaged(format!(
                "the chain of extended boot records loops or exceeds {MAX_LOGICAL} entries"
            )));
        }
        if ebr_at >= ext_end || (ebr_at + 1) * sector > found.disk_size {
            return Err(PartitionError::Damaged(format!(
                "an extended boot record at sector {ebr_at} lies outside the extended partition"
            )));
        }
        disk.read_at(&mut buf, ebr_at * sector)?;
        if !signed(&buf) {
            return Err(PartitionError::Damaged(format!(
                "the extended boot record at sector {ebr_at} has no 0x55AA signature"
            )));
        }
        let (logical, next) = (
            entry(&buf, layout::EBR_LOGICAL),
            entry(&buf, layout::EBR_NEXT),
        );
        if logical.system_id != 0 {
            if found.push(number, &logical, ebr_at) {
                ebrs.push(ebr_at * sector);
            }
            number += 1;
        }
        if next.system_id == 0 || next.first_lba == 0 {
            break;
        }
        ebr_at = ext_start + u64::from(next.first_lba);
    }
    Ok(MbrExtended {
        slot,
        start: ext_start * sector,
        size: u64::from(ext.sectors) * sector,
        system_id: ext.system_id,
        ebrs,
    })
}
