//! Writing a partition table equivalent to one read from another disk: the same scheme, type
//! GUIDs/IDs, partition GUIDs, names, attributes and flags, the same disk GUID or MBR
//! signature, partitions at the same numbers and offsets — laid out for the destination's
//! size, so a capture or deploy onto a larger or smaller disk gets a valid table (the caller
//! may first move the last partition's end with [`PartitionTable::resize_last`]).
//!
//! GPT: protective MBR, primary header and entry array at LBA 1 and 2, backup array and header
//! at the end, both CRC32-checked. MBR: the four slots, the 0x55AA signature and, for logical
//! partitions, one extended boot record each at the offsets the source used. Bytes 0..440 of
//! sector 0 (boot code) are left as they are on the destination.

use super::{Partition, PartitionError, PartitionTable, PartitionType, Result, Scheme};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::le::{put32, put64};

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
    (u64::from(entries) * 128).div_ceil(sector)
}

/// Writes `table` onto `disk`, checking first that every partition fits its usable area and
/// none overlap.
pub fn write_table(disk: &dyn BlockDevice, table: &PartitionTable) -> Result<()> {
    let sector = u64::from(table.sector_size);
    if sector != u64::from(disk.logical_sector_size()) && disk.logical_sector_size() != 512 {
        return Err(invalid(format!(
            "the table is laid out in {sector}-byte sectors but the disk uses {}",
            disk.logical_sector_size()
        )));
    }
    let (first, end) = table.usable_range(disk.size());
    let mut sorted: Vec<&Partition> = table.partitions.iter().collect();
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
    match table.scheme {
        Scheme::Gpt => write_gpt(disk, table),
        Scheme::Mbr => write_mbr(disk, table),
        Scheme::None => Ok(()),
    }
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
    let mut array = vec![0u8; (array_sectors * sector) as usize];
    for p in &table.partitions {
        let PartitionType::Gpt(ty) = p.kind else {
            return Err(invalid(format!(
                "partition {} has an MBR type in a GPT",
                p.number
            )));
        };
        let e = &mut array[(p.number as usize - 1) * 128..p.number as usize * 128];
        e[..16].copy_from_slice(&ty.0);
        e[16..32].copy_from_slice(&p.guid.unwrap_or_default().0);
        put64(e, 32, p.start / sector);
        put64(e, 40, p.end() / sector - 1);
        put64(e, 48, p.attributes);
        for (i, unit) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let array_crc = crc32fast::hash(&array[..entries as usize * 128]);
    let header = |me: u64, alternate: u64, array_at: u64| {
        let mut h = vec![0u8; sector as usize];
        h[..8].copy_from_slice(b"EFI PART");
        put32(&mut h, 8, 0x0001_0000);
        put32(&mut h, 12, 92);
        put64(&mut h, 24, me);
        put64(&mut h, 32, alternate);
        put64(&mut h, 40, 2 + array_sectors);
        put64(&mut h, 48, last - array_sectors - 1);
        h[56..72].copy_from_slice(&table.disk_guid.unwrap_or_default().0);
        put64(&mut h, 72, array_at);
        put32(&mut h, 80, entries);
        put32(&mut h, 84, 128);
        put32(&mut h, 88, array_crc);
        let crc = crc32fast::hash(&h[..92]);
        put32(&mut h, 16, crc);
        h
    };
    // Protective MBR: one 0xEE entry covering the disk (boot code left alone).
    let mut mbr = vec![0u8; 512];
    disk.read_at(&mut mbr, 0)?;
    mbr[440..510].fill(0);
    if let Some(sig) = table.mbr_signature {
        put32(&mut mbr, 440, sig);
    }
    mbr[446 + 1..446 + 4].copy_from_slice(&[0x00, 0x02, 0x00]);
    mbr[446 + 4] = 0xEE;
    mbr[446 + 5..446 + 8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    put32(&mut mbr, 446 + 8, 1);
    put32(&mut mbr, 446 + 12, last.min(u64::from(u32::MAX)) as u32);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    // Backup first, primary last: a crash in between leaves the old primary or a valid backup.
    disk.write_at(&array, (last - array_sectors) * sector)?;
    disk.write_at(&header(last, 1, last - array_sectors), last * sector)?;
    disk.write_at(&array, 2 * sector)?;
    disk.write_at(&header(1, last, 2), sector)?;
    disk.write_at(&mbr, 0)?;
    disk.flush()?;
    Ok(())
}

/// A 16-byte MBR entry (CHS fields set to the LBA-only marker).
fn mbr_entry(bootable: bool, id: u8, first_lba: u64, sectors: u64) -> Result<[u8; 16]> {
    let (Ok(first), Ok(count)) = (u32::try_from(first_lba), u32::try_from(sectors)) else {
        return Err(invalid(format!(
            "a partition at sector {first_lba} of {sectors} sectors is beyond what MBR can address"
        )));
    };
    let mut e = [0u8; 16];
    e[0] = if bootable { 0x80 } else { 0 };
    e[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    e[4] = id;
    e[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    e[8..12].copy_from_slice(&first.to_le_bytes());
    e[12..16].copy_from_slice(&count.to_le_bytes());
    Ok(e)
}

fn write_mbr(disk: &dyn BlockDevice, table: &PartitionTable) -> Result<()> {
    let sector = u64::from(table.sector_size);
    let id_of = |p: &Partition| match p.kind {
        PartitionType::Mbr(id) => Ok(id),
        PartitionType::Gpt(_) => Err(invalid(format!(
            "partition {} has a GPT type in an MBR",
            p.number
        ))),
    };
    let mut mbr = vec![0u8; 512];
    disk.read_at(&mut mbr, 0)?;
    mbr[440..510].fill(0);
    put32(&mut mbr, 440, table.mbr_signature.unwrap_or(0));
    for p in table.partitions.iter().filter(|p| p.number <= 4) {
        let e = mbr_entry(p.bootable, id_of(p)?, p.start / sector, p.size / sector)?;
        let at = 446 + 16 * (p.number as usize - 1);
        mbr[at..at + 16].copy_from_slice(&e);
    }
    let logical: Vec<&Partition> = table.partitions.iter().filter(|p| p.number >= 5).collect();
    if let Some(ext) = &table.mbr_extended {
        if !(1..=4).contains(&ext.slot) || ext.ebrs.len() != logical.len() {
            return Err(invalid(
                "the extended partition does not match its logical partitions".into(),
            ));
        }
        let e = mbr_entry(false, ext.system_id, ext.start / sector, ext.size / sector)?;
        let at = 446 + 16 * (ext.slot as usize - 1);
        mbr[at..at + 16].copy_from_slice(&e);
        for (i, p) in logical.iter().enumerate() {
            let ebr_at = ext.ebrs[i];
            if ebr_at < ext.start || ebr_at >= p.start || p.end() > ext.start + ext.size {
                return Err(invalid(format!(
                    "logical partition {} does not sit after its boot record inside the extended partition",
                    p.number
                )));
            }
            let mut ebr = vec![0u8; 512];
            let this = mbr_entry(
                p.bootable,
                id_of(p)?,
                (p.start - ebr_at) / sector,
                p.size / sector,
            )?;
            ebr[446..462].copy_from_slice(&this);
            if let (Some(next), Some(next_ebr)) = (logical.get(i + 1), ext.ebrs.get(i + 1)) {
                let link = mbr_entry(
                    false,
                    0x05,
                    (next_ebr - ext.start) / sector,
                    (next.end() - next_ebr) / sector,
                )?;
                ebr[462..478].copy_from_slice(&link);
            }
            ebr[510] = 0x55;
            ebr[511] = 0xAA;
            disk.write_at(&ebr, ebr_at)?;
        }
    } else if !logical.is_empty() {
        return Err(invalid(
            "logical partitions without an extended partition".into(),
        ));
    }
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    disk.write_at(&mbr, 0)?;
    disk.flush()?;
    Ok(())
}
