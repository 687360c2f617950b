//! Writing a partition table equivalent to one read from another disk: the same scheme, type
//! GUIDs/IDs, partition GUIDs, names, attributes and flags, the same disk GUID or MBR
//! signature, partitions at the same numbers and offsets — laid out for the destination's
//! size, so a capture or deploy onto a larger or smaller disk gets a valid table (the caller
//! may first move the last partition's end with [`PartitionTable::resize_last`]).
//!
//! GPT: protective MBR, primary header and entry array at LBA 1 and 2, backup array and header
//! at the end, both CRC32-checked. MBR: the four slots, the 0x55AA signature and, for logical
//! partitions, one extended boot record each at the offsets the source used, then sector 0, and
//! then the headers of a GPT the disk held before are cleared. Bytes 0..440 of sector 0 (boot
//! code) are left as they are on the destination.
//!
//! Crash ordering (`tests/crash.rs` reads every prefix of the writes): a GPT's backup array
//! and header, then the primary array and header, then the protective MBR; an MBR's boot
//! records, then sector 0. Until sector 0 is written the disk reads as its old table (or, for
//! a GPT, as the new one from its backup header), after it as the new one.

use super::ondisk::{gpt_entry, gpt_header, mbr, mbr_entry};
use super::{
    Guid, MbrExtended, Partition, PartitionError, PartitionTable, PartitionType, Result, Scheme,
};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::field::Records;

fn invalid(why: String) -> PartitionError {
    PartitionError::Damaged(why)
}

impl PartitionTable {
    /// The usable byte range on a disk of `disk_size` bytes for this table's scheme.
    pub fn usable_range(&self, disk_size: u64) -> (u64, u64) {
        let sector = u64::from(self.sector_size);
        match self.scheme {
            Scheme::Gpt => {
                let array = gpt_array_sectors(self.gpt_entries.max(128), sector);
                let last = disk_size / sector - 1;
                ((2 + array) * sector, (last - array) * sector)
            }
            _ => (sector, disk_size / sector * sector),
        }
    }

    /// Moves the end of the partition that ends last to `new_end` (bytes), growing or shrinking
    /// it; refuses to go below its start or into another partition.
    pub fn resize_last(&mut self, new_end: u64) -> Result<&Partition> {
        let sector = u64::from(self.sector_size);
        let others_end = |t: &PartitionTable, skip: u32| {
            t.partitions
                .iter()
                .filter(|p| p.number != skip)
                .map(Partition::end)
                .max()
                .unwrap_or(0)
        };
        let last = self
            .partitions
            .iter()
            .max_by_key(|p| p.end())
            .map(|p| p.number)
            .ok_or_else(|| invalid("the table has no partitions to resize".into()))?;
        let floor = others_end(self, last);
        let p = self
            .partitions
            .iter_mut()
            .find(|p| p.number == last)
            .expect("found above");
        let new_end = new_end / sector * sector;
        if new_end <= p.start || new_end <= floor.max(p.start) {
            return Err(invalid(format!(
                "partition {} cannot end at byte {new_end}: it starts at {}",
                p.number, p.start
            )));
        }
        p.size = new_end - p.start;
        if let Some(ext) = &mut self.mbr_extended {
            if p.number >= 5 {
                ext.size = new_end - ext.start;
            }
        }
        Ok(self
            .partitions
            .iter()
            .find(|p| p.number == last)
            .expect("found above"))
    }
}

fn gpt_array_sectors(entries: u32, sector: u64) -> u64 {
    (u64::from(entries) * gpt_entry::LEN as u64).div_ceil(sector)
}

/// Writes `table` onto `disk`, checking first that every partition fits its usable area and
/// none overlap.
pub fn write_table(disk: &dyn BlockDevice, table: &PartitionTable) -> Result<()> {
    check_layout(disk, table, None)?;
    match table.scheme {
        Scheme::Gpt => write_gpt(disk, table),
        Scheme::Mbr => write_mbr(disk, table),
        Scheme::None => Ok(()),
    }
}

/// Checks a `table` in which partition `nested` lies inside another one (see
/// [`crate::nested`]); the others must not overlap.
pub(crate) fn check_nested(
    disk: &dyn BlockDevice,
    table: &PartitionTable,
    nested: u32,
) -> Result<()> {
    check_layout(disk, table, Some(nested))
}

/// Every partition sector aligned, inside the usable area, and apart from the others — but
/// `nested`, which must lie wholly inside one other partition.
fn check_layout(disk: &dyn BlockDevice, table: &PartitionTable, nested: Option<u32>) -> Result<()> {
    let sector = u64::from(table.sector_size);
    if sector != u64::from(disk.logical_sector_size()) && disk.logical_sector_size() != 512 {
        return Err(invalid(format!(
            "the table is laid out in {sector}-byte sectors but the disk uses {}",
            disk.logical_sector_size()
        )));
    }
    let (first, end) = table.usable_range(disk.size());
    if let Some(n) = nested {
        let inner = table
            .partitions
            .iter()
            .find(|p| p.number == n)
            .ok_or_else(|| invalid(format!("no partition {n} to nest")))?;
        let holders = table
            .partitions
            .iter()
            .filter(|p| p.number != n && p.start <= inner.start && inner.end() <= p.end())
            .count();
        if holders != 1 {
            return Err(invalid(format!(
                "partition {n} does not lie inside exactly one other partition"
            )));
        }
    }
    let mut sorted: Vec<&Partition> = table
        .partitions
        .iter()
        .filter(|p| Some(p.number) != nested)
        .collect();
    sorted.sort_by_key(|p| p.start);
    for (i, p) in sorted.iter().enumerate() {
        if p.start % sector != 0 || p.size % sector != 0 || p.size == 0 {
            return Err(invalid(format!(
                "partition {} is not sector aligned",
                p.number
            )));
        }
        if p.start < first || p.end() > end {
            return Err(invalid(format!(
                "partition {} ({}..{}) does not fit the destination's usable bytes {first}..{end}",
                p.number,
                p.start,
                p.end()
            )));
        }
        if let Some(next) = sorted.get(i + 1) {
            if p.end() > next.start {
                return Err(invalid(format!(
                    "partitions {} and {} overlap",
                    p.number, next.number
                )));
            }
        }
    }
    Ok(())
}

/// The GPT entry array of `table`, `array_sectors` long, entry `number - 1` per partition.
fn gpt_entry_array(table: &PartitionTable, array_sectors: u64) -> Result<Vec<u8>> {
    let sector = u64::from(table.sector_size);
    let entries = Records::new(0, gpt_entry::LEN);
    let mut array = vec![0u8; (array_sectors * sector) as usize];
    for p in &table.partitions {
        let PartitionType::Gpt(ty) = p.kind else {
            return Err(invalid(format!(
                "partition {} has an MBR type in a GPT",
                p.number
            )));
        };
        let e = entries.get_mut(&mut array, p.number as usize - 1);
        gpt_entry::TYPE_GUID.set(e, ty);
        gpt_entry::UNIQUE_GUID.set(e, p.guid.unwrap_or_default());
        gpt_entry::STARTING_LBA.set(e, p.start / sector);
        gpt_entry::ENDING_LBA.set(e, p.end() / sector - 1);
        gpt_entry::ATTRIBUTES.set(e, p.attributes);
        gpt_entry::NAME.set(e, &p.name);
    }
    Ok(array)
}

/// Where a GPT header lies, where its copy is, and what the table around it looks like.
struct GptHeader {
    me: u64,
    alternate: u64,
    array_at: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries: u32,
    array_crc: u32,
}

impl GptHeader {
    /// The header's sector, CRC32 sealed.
    fn encode(&self, sector: u64) -> Vec<u8> {
        let mut h = vec![0u8; sector as usize];
        gpt_header::SIGNATURE.set(&mut h, gpt_header::SIGNATURE_VALUE);
        gpt_header::REVISION.set(&mut h, gpt_header::REVISION_1_0);
        gpt_header::HEADER_SIZE.set(&mut h, gpt_header::LEN as u32);
        gpt_header::MY_LBA.set(&mut h, self.me);
        gpt_header::ALTERNATE_LBA.set(&mut h, self.alternate);
        gpt_header::FIRST_USABLE_LBA.set(&mut h, self.first_usable);
        gpt_header::LAST_USABLE_LBA.set(&mut h, self.last_usable);
        gpt_header::DISK_GUID.set(&mut h, self.disk_guid);
        gpt_header::PARTITION_ENTRY_LBA.set(&mut h, self.array_at);
        gpt_header::NUMBER_OF_PARTITION_ENTRIES.set(&mut h, self.entries);
        gpt_header::SIZE_OF_PARTITION_ENTRY.set(&mut h, gpt_entry::LEN as u32);
        gpt_header::PARTITION_ENTRY_ARRAY_CRC32.set(&mut h, self.array_crc);
        let crc = crc32fast::hash(&h[..gpt_header::LEN]);
        gpt_header::HEADER_CRC32.set(&mut h, crc);
        h
    }
}

/// Sector 0 as `disk` has it (boot code kept) with one 0xEE entry covering the disk up to
/// `last` (LBA), and the table's disk signature.
fn protective_mbr(disk: &dyn BlockDevice, signature: Option<u32>, last: u64) -> Result<Vec<u8>> {
    let mut sector0 = vec![0u8; mbr::LEN];
    disk.read_at(&mut sector0, 0)?;
    sector0[mbr::BOOT_CODE_LEN..].fill(0);
    if let Some(sig) = signature {
        mbr::DISK_SIGNATURE.set(&mut sector0, sig);
    }
    let e = mbr::ENTRIES.get_mut(&mut sector0, 0);
    mbr_entry::FIRST_CHS.set(e, &mbr_entry::PROTECTIVE_FIRST_CHS);
    mbr_entry::SYSTEM_ID.set(e, mbr_entry::PROTECTIVE_ID);
    mbr_entry::LAST_CHS.set(e, &mbr_entry::PROTECTIVE_LAST_CHS);
    mbr_entry::FIRST_LBA.set(e, 1);
    mbr_entry::SECTORS.set(e, last.min(u64::from(u32::MAX)) as u32);
    mbr::BOOT_SIGNATURE.set(&mut sector0, &mbr::BOOT_SIGNATURE_VALUE);
    Ok(sector0)
}

fn write_gpt(disk: &dyn BlockDevice, table: &PartitionTable) -> Result<()> {
    let sector = u64::from(table.sector_size);
    let entries = table.gpt_entries.max(128);
    let highest = table.partitions.iter().map(|p| p.number).max().unwrap_or(0);
    if highest > entries {
        return Err(invalid(format!(
            "partition {highest} needs more than {entries} entries"
        )));
    }
    let array_sectors = gpt_array_sectors(entries, sector);
    let last = disk.size() / sector - 1;
    let array = gpt_entry_array(table, array_sectors)?;
    let primary = GptHeader {
        me: 1,
        alternate: last,
        array_at: 2,
        first_usable: 2 + array_sectors,
        last_usable: last - array_sectors - 1,
        disk_guid: table.disk_guid.unwrap_or_default(),
        entries,
        array_crc: crc32fast::hash(&array[..entries as usize * gpt_entry::LEN]),
    };
    let backup = GptHeader {
        me: last,
        alternate: 1,
        array_at: last - array_sectors,
        ..primary
    };
    let sector0 = protective_mbr(disk, table.mbr_signature, last)?;
    // Backup first, primary last: a crash in between leaves the old primary or a valid backup.
    disk.write_at(&array, backup.array_at * sector)?;
    disk.write_at(&backup.encode(sector), last * sector)?;
    disk.write_at(&array, primary.array_at * sector)?;
    disk.write_at(&primary.encode(sector), sector)?;
    disk.write_at(&sector0, 0)?;
    disk.flush()?;
    Ok(())
}

/// A 16-byte MBR entry (CHS fields set to the LBA-only marker).
pub(crate) fn mbr_entry(bootable: bool, id: u8, first_lba: u64, sectors: u64) -> Result<[u8; 16]> {
    let (Ok(first), Ok(count)) = (u32::try_from(first_lba), u32::try_from(sectors)) else {
        return Err(invalid(format!(
            "a partition at sector {first_lba} of {sectors} sectors is beyond what MBR can address"
        )));
    };
    let mut e = [0u8; mbr_entry::LEN];
    let status = if bootable {
        mbr_entry::STATUS_ACTIVE
    } else {
        0
    };
    mbr_entry::STATUS.set(&mut e, status);
    mbr_entry::FIRST_CHS.set(&mut e, &mbr_entry::CHS_LBA_ONLY);
    mbr_entry::SYSTEM_ID.set(&mut e, id);
    mbr_entry::LAST_CHS.set(&mut e, &mbr_entry::CHS_LBA_ONLY);
    mbr_entry::FIRST_LBA.set(&mut e, first);
    mbr_entry::SECTORS.set(&mut e, count);
    Ok(e)
}

/// The MBR system ID of a partition.
fn id_of(p: &Partition) -> Result<u8> {
    match p.kind {
        PartitionType::Mbr(id) => Ok(id),
        PartitionType::Gpt(_) => Err(invalid(format!(
            "partition {} has a GPT type in an MBR",
            p.number
        ))),
    }
}

fn write_mbr(disk: &dyn BlockDevice, table: &PartitionTable) -> Result<()> {
    let sector = u64::from(table.sector_size);
    let mut sector0 = vec![0u8; mbr::LEN];
    disk.read_at(&mut sector0, 0)?;
    sector0[mbr::BOOT_CODE_LEN..].fill(0);
    mbr::DISK_SIGNATURE.set(&mut sector0, table.mbr_signature.unwrap_or(0));
    for p in table.partitions.iter().filter(|p| p.number <= 4) {
        let e = mbr_entry(p.bootable, id_of(p)?, p.start / sector, p.size / sector)?;
        mbr::ENTRIES
            .get_mut(&mut sector0, p.number as usize - 1)
            .copy_from_slice(&e);
    }
    let logical: Vec<&Partition> = table.partitions.iter().filter(|p| p.number >= 5).collect();
    if let Some(ext) = &table.mbr_extended {
        if !(1..=4).contains(&ext.slot) || ext.ebrs.len() != logical.len() {
            return Err(invalid(
                "the extended partition does not match its logical partitions".into(),
            ));
        }
        let e = mbr_entry(false, ext.system_id, ext.start / sector, ext.size / sector)?;
        mbr::ENTRIES
            .get_mut(&mut sector0, ext.slot as usize - 1)
            .copy_from_slice(&e);
        for (i, p) in logical.iter().enumerate() {
            let next = logical.get(i + 1).zip(ext.ebrs.get(i + 1));
            let ebr = ebr(ext, ext.ebrs[i], p, next, sector)?;
            disk.write_at(&ebr, ext.ebrs[i])?;
        }
    } else if !logical.is_empty() {
        return Err(invalid(
            "logical partitions without an extended partition".into(),
        ));
    }
    mbr::BOOT_SIGNATURE.set(&mut sector0, &mbr::BOOT_SIGNATURE_VALUE);
    disk.write_at(&sector0, 0)?;
    clear_stale_gpt(disk, table)?;
    disk.flush()?;
    Ok(())
}

/// Clears the headers of a GPT the disk held before an MBR replaced it (where no new partition
/// lies): other tools (sgdisk, parted) still find them behind a non-protective MBR and take
/// the pair for a broken hybrid. After the MBR is written, so a crash in between still reads
/// as the new table.
fn clear_stale_gpt(disk: &dyn BlockDevice, table: &PartitionTable) -> Result<()> {
    let ext = table
        .mbr_extended
        .as_ref()
        .map(|e| (e.start, e.start + e.size));
    let in_use = |at: u64, len: u64| {
        table
            .partitions
            .iter()
            .map(|p| (p.start, p.end()))
            .chain(ext)
            .any(|(start, end)| at < end && start < at + len)
    };
    for sector in [512u64, 4096] {
        if disk.size() < 3 * sector {
            continue;
        }
        for lba in [1, disk.size() / sector - 1] {
            let mut h = vec![0u8; sector as usize];
            disk.read_at(&mut h, lba * sector)?;
            if gpt_header::SIGNATURE.get(&h) == *gpt_header::SIGNATURE_VALUE
                && !in_use(lba * sector, sector)
            {
                disk.write_at(&vec![0u8; sector as usize], lba * sector)?;
            }
        }
    }
    Ok(())
}

/// The extended boot record at byte `ebr_at` for logical partition `p`, linking to the `next`
/// logical partition and its EBR's byte offset.
fn ebr(
    ext: &MbrExtended,
    ebr_at: u64,
    p: &Partition,
    next: Option<(&&Partition, &u64)>,
    sector: u64,
) -> Result<Vec<u8>> {
    if ebr_at < ext.start || ebr_at >= p.start || p.end() > ext.start + ext.size {
        return Err(invalid(format!(
            "logical partition {} does not sit after its boot record inside the extended partition",
            p.number
        )));
    }
    let mut ebr = vec![0u8; mbr::LEN];
    let this = mbr_entry(
        p.bootable,
        id_of(p)?,
        (p.start - ebr_at) / sector,
        p.size / sector,
    )?;
    mbr::ENTRIES
        .get_mut(&mut ebr, mbr::EBR_LOGICAL)
        .copy_from_slice(&this);
    if let Some((next, &next_ebr)) = next {
        let link = mbr_entry(
            false,
            mbr_entry::EBR_LINK_ID,
            (next_ebr - ext.start) / sector,
            (next.end() - next_ebr) / sector,
        )?;
        mbr::ENTRIES
            .get_mut(&mut ebr, mbr::EBR_NEXT)
            .copy_from_slice(&link);
    }
    mbr::BOOT_SIGNATURE.set(&mut ebr, &mbr::BOOT_SIGNATURE_VALUE);
    Ok(ebr)
}
