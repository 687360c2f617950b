//! A partition lying inside another one: how a live deploy makes its new system, written
//! into a file of the running system's partition, a partition the kernel and GRUB find —
//! and how it goes away again.
//!
//! Only the table changes, as little as it can: on a GPT the new entry goes in the first free
//! slot, named [`NESTED_NAME`], patched into both entry arrays where they are, with both
//! headers' checksums updated and every other header field kept (backup first); on an MBR it
//! goes in a free primary slot of sector 0 (type 0x83), and nothing else is written — the
//! extended boot records of logical partitions stay as they are. Boot code is never touched.
//!
//! Once the new system is committed it can take the disk over
//! (`diskferry_imaging::live::takeover`): the nested entry and the one holding it swap their
//! ranges ([`swap_ranges`]) — the slot GRUB's core image names (by
//! number) then holds the new filesystem — and, once the machine booted that way, the old
//! entry goes ([`remove_entry`]): the old filesystem is gone and its space is free.

use super::ondisk::{crc32_with_zero_field, gpt_entry, gpt_header, mbr as layout, mbr_entry};
use super::write::{check_nested, mbr_entry as encode_entry};
use super::{
    gpt_types, read_table, Guid, Partition, PartitionError, PartitionType, Result, Scheme,
};
use diskferry_blockdev::BlockDevice;

/// The GPT name of a nested partition.
pub const NESTED_NAME: &str = "diskferry-live";
/// The MBR system ID of a nested partition (Linux).
const LINUX: u8 = 0x83;

fn invalid(why: String) -> PartitionError {
    PartitionError::Damaged(why)
}

/// Adds a partition of `size` bytes at byte `start` of `disk`, inside the partition holding
/// that range; returns its number (the kernel's `sdaN`). An entry already there for the same
/// range is kept, one for another range replaced.
pub fn add_nested(disk: &dyn BlockDevice, start: u64, size: u64, guid: Guid) -> Result<u32> {
    remove_nested_except(disk, Some((start, size)))?;
    let table = read_table(disk)?;
    if let Some(p) = table
        .partitions
        .iter()
        .find(|p| p.start == start && p.size == size && is_nested(&table.partitions, p))
    {
        return Ok(p.number);
    }
    let sector = u64::from(table.sector_size);
    if !start.is_multiple_of(sector) || !size.is_multiple_of(sector) || size == 0 {
        return Err(invalid(format!("{start}+{size} is not whole sectors")));
    }
    match table.scheme {
        Scheme::Gpt => {
            let number = (1..=table.gpt_entries.max(128))
                .find(|n| table.partitions.iter().all(|p| p.number != *n))
                .ok_or_else(|| invalid("the GPT has no free entry".into()))?;
            let mut table = table;
            let p = Partition {
                number,
                start,
                size,
                kind: PartitionType::Gpt(Guid::parse(gpt_types::LINUX_FILESYSTEM).expect("a GUID")),
                guid: Some(guid),
                name: NESTED_NAME.into(),
                attributes: 0,
                bootable: false,
            };
            table.partitions.push(p.clone());
            check_nested(disk, &table, number)?;
            patch_gpt(disk, sector, number, Some(&p))?;
            Ok(number)
        }
        Scheme::Mbr => {
            let mut sector0 = vec![0u8; layout::LEN];
            disk.read_at(&mut sector0, 0)?;
            let slot = (0..4)
                .find(|&i| mbr_entry::SYSTEM_ID.get(layout::ENTRIES.get(&sector0, i)) == 0)
                .ok_or_else(|| {
                    invalid("the MBR has no free primary slot (all four are used)".into())
                })?;
            let holders = table
                .partitions
                .iter()
                .filter(|p| p.start <= start && start + size <= p.end())
                .count();
            if holders != 1 {
                return Err(invalid(format!(
                    "{start}+{size} does not lie inside exactly one partition"
                )));
            }
            let e = encode_entry(false, LINUX, start / sector, size / sector)?;
            layout::ENTRIES
                .get_mut(&mut sector0, slot)
                .copy_from_slice(&e);
            disk.write_at(&sector0, 0)?;
            disk.flush()?;
            Ok(slot as u32 + 1)
        }
        Scheme::None => Err(invalid("the disk has no partition table".into())),
    }
}

/// Removes the nested partitions (on a GPT, those named [`NESTED_NAME`]); returns their
/// numbers.
pub fn remove_nested(disk: &dyn BlockDevice) -> Result<Vec<u32>> {
    remove_nested_except(disk, None)
}

/// Whether `p` lies inside another of `all` (and is named as a nested one on a GPT).
fn is_nested(all: &[Partition], p: &Partition) -> bool {
    let inside = all.iter().any(|o| {
        o.number != p.number && o.start <= p.start && p.end() <= o.end() && o.size > p.size
    });
    let named = matches!(p.kind, PartitionType::Mbr(_)) || p.name == NESTED_NAME;
    inside && named
}

/// Removes nested partitions but one covering `keep` (start, size).
fn remove_nested_except(disk: &dyn BlockDevice, keep: Option<(u64, u64)>) -> Result<Vec<u32>> {
    let table = read_table(disk)?;
    let gone: Vec<u32> = table
        .partitions
        .iter()
        .filter(|p| is_nested(&table.partitions, p) && keep != Some((p.start, p.size)))
        .map(|p| p.number)
        .collect();
    if gone.is_empty() {
        return Ok(gone);
    }
    match table.scheme {
        Scheme::Gpt => {
            let sector = u64::from(table.sector_size);
            for n in &gone {
                patch_gpt(disk, sector, *n, None)?;
            }
        }
        _ => {
            let mut sector0 = vec![0u8; layout::LEN];
            disk.read_at(&mut sector0, 0)?;
            for n in gone.iter().filter(|n| (1..=4).contains(*n)) {
                layout::ENTRIES
                    .get_mut(&mut sector0, *n as usize - 1)
                    .fill(0);
            }
            disk.write_at(&sector0, 0)?;
            disk.flush()?;
        }
    }
    Ok(gone)
}

/// Swaps the ranges of entries `a` and `b` (both primary on an MBR); everything else of each
/// entry (type, flags, GUIDs, name) stays in its slot. Doing it twice undoes it.
pub fn swap_ranges(disk: &dyn BlockDevice, a: u32, b: u32) -> Result<()> {
    let table = read_table(disk)?;
    for n in [a, b] {
        if !table.partitions.iter().any(|p| p.number == n) {
            return Err(invalid(format!("the table has no partition {n}")));
        }
    }
    match table.scheme {
        Scheme::Gpt => patch_gpt_arrays(disk, u64::from(table.sector_size), a.max(b), |array| {
            let slot = |n: u32| (n as usize - 1) * gpt_entry::LEN;
            for field in [gpt_entry::STARTING_LBA, gpt_entry::ENDING_LBA] {
                let (x, y) = (field.get(&array[slot(a)..]), field.get(&array[slot(b)..]));
                field.set(&mut array[slot(a)..], y);
                field.set(&mut array[slot(b)..], x);
            }
        }),
        Scheme::Mbr => patch_mbr(disk, [a, b], |sector0| {
            let (ea, eb) = (a as usize - 1, b as usize - 1);
            let (x, y) = (
                layout::ENTRIES.get(sector0, ea).to_vec(),
                layout::ENTRIES.get(sector0, eb).to_vec(),
            );
            // The range: CHS start (1..4), CHS end (5..8), LBA and sectors (8..16).
            let range = |e: &[u8]| [e[1..4].to_vec(), e[5..16].to_vec()];
            for (slot, from) in [(ea, &y), (eb, &x)] {
                let [chs, rest] = range(from);
                let e = layout::ENTRIES.get_mut(sector0, slot);
                e[1..4].copy_from_slice(&chs);
                e[5..16].copy_from_slice(&rest);
            }
        }),
        Scheme::None => Err(invalid("the disk has no partition table".into())),
    }
}

/// Removes entry `number` (a primary one on an MBR).
pub fn remove_entry(disk: &dyn BlockDevice, number: u32) -> Result<()> {
    let table = read_table(disk)?;
    if !table.partitions.iter().any(|p| p.number == number) {
        return Err(invalid(format!("the table has no partition {number}")));
    }
    match table.scheme {
        Scheme::Gpt => patch_gpt(disk, u64::from(table.sector_size), number, None),
        Scheme::Mbr => patch_mbr(disk, [number, number], |sector0| {
            layout::ENTRIES
                .get_mut(sector0, number as usize - 1)
                .fill(0);
        }),
        Scheme::None => Err(invalid("the disk has no partition table".into())),
    }
}

/// Edits the primary entries `slots` of sector 0 with `edit` and writes it back.
fn patch_mbr(disk: &dyn BlockDevice, slots: [u32; 2], edit: impl FnOnce(&mut [u8])) -> Result<()> {
    if let Some(n) = slots.iter().find(|n| !(1..=4).contains(*n)) {
        return Err(invalid(format!(
            "partition {n} is a logical one: only primary entries are changed here"
        )));
    }
    let mut sector0 = vec![0u8; layout::LEN];
    disk.read_at(&mut sector0, 0)?;
    edit(&mut sector0);
    disk.write_at(&sector0, 0)?;
    disk.flush()?;
    Ok(())
}

/// Sets entry `number` of both GPT entry arrays to `p` (or clears it), where the headers say
/// the arrays are, and updates the arrays' and headers' checksums; the backup first.
fn patch_gpt(
    disk: &dyn BlockDevice,
    sector: u64,
    number: u32,
    p: Option<&Partition>,
) -> Result<()> {
    if let Some(Partition {
        kind: PartitionType::Mbr(_),
        ..
    }) = p
    {
        return Err(invalid("an MBR type in a GPT".into()));
    }
    patch_gpt_arrays(disk, sector, number, |array| {
        let e =
            &mut array[(number as usize - 1) * gpt_entry::LEN..number as usize * gpt_entry::LEN];
        e.fill(0);
        if let Some(p) = p {
            if let PartitionType::Gpt(ty) = p.kind {
                gpt_entry::TYPE_GUID.set(e, ty);
            }
            gpt_entry::UNIQUE_GUID.set(e, p.guid.unwrap_or_default());
            gpt_entry::STARTING_LBA.set(e, p.start / sector);
            gpt_entry::ENDING_LBA.set(e, p.end() / sector - 1);
            gpt_entry::NAME.set(e, &p.name);
        }
    })
}

/// Applies `edit` to both GPT entry arrays (which must have entry `highest`), where the
/// headers say they are, and updates the arrays' and headers' checksums; the backup first.
fn patch_gpt_arrays(
    disk: &dyn BlockDevice,
    sector: u64,
    highest: u32,
    edit: impl Fn(&mut [u8]),
) -> Result<()> {
    let primary = read_header(disk, sector, 1)?;
    let backup_lba = gpt_header::ALTERNATE_LBA.get(&primary);
    let backup = read_header(disk, sector, backup_lba)?;
    // Both tables are read and checked before either is written.
    let tables = [(backup_lba, backup), (1, primary)]
        .into_iter()
        .map(|(lba, header)| GptCopy::read(disk, sector, lba, header, highest))
        .collect::<Result<Vec<_>>>()?;
    for (i, table) in tables.iter().enumerate() {
        if let Err(e) = table.write_edited(disk, sector, &edit) {
            // Put back what was written (the backup, or a half-written primary): the two
            // tables never stay different.
            for t in &tables[..=i] {
                t.restore(disk, sector);
            }
            let _ = disk.flush();
            return Err(e);
        }
    }
    disk.flush()?;
    Ok(())
}

/// One copy of a GPT as it was read: its header's LBA, the header, where its entry array is,
/// the array (whole sectors) and how much of it is entries.
struct GptCopy {
    lba: u64,
    header: Vec<u8>,
    at: u64,
    array: Vec<u8>,
    used: usize,
}

impl GptCopy {
    /// Reads the entry array `header` (at `lba`) names, checked to hold entry `highest` and
    /// to lie on the disk.
    fn read(
        disk: &dyn BlockDevice,
        sector: u64,
        lba: u64,
        header: Vec<u8>,
        highest: u32,
    ) -> Result<GptCopy> {
        let entries = gpt_header::NUMBER_OF_PARTITION_ENTRIES.get(&header);
        if gpt_header::SIZE_OF_PARTITION_ENTRY.get(&header) != gpt_entry::LEN as u32
            || highest == 0
            || highest > entries
            || entries > 4096
        {
            return Err(invalid(format!("the GPT has no usable entry {highest}")));
        }
        let used = entries as usize * gpt_entry::LEN;
        let len = (used as u64).next_multiple_of(sector);
        let at = gpt_header::PARTITION_ENTRY_LBA
            .get(&header)
            .checked_mul(sector)
            .filter(|at| at.checked_add(len).is_some_and(|end| end <= disk.size()))
            .ok_or_else(|| {
                invalid(format!(
                    "the GPT header at sector {lba} puts its entries off the disk"
                ))
            })?;
        let mut array = vec![0u8; len as usize];
        disk.read_at(&mut array, at)?;
        if crc32fast::hash(&array[..used]) != gpt_header::PARTITION_ENTRY_ARRAY_CRC32.get(&header) {
            return Err(invalid(format!(
                "the GPT entries of the header at sector {lba} fail their checksum: repair the table first (sgdisk -v)"
            )));
        }
        Ok(GptCopy {
            lba,
            header,
            at,
            array,
            used,
        })
    }

    /// Writes this copy with `edit` applied, its checksums updated.
    fn write_edited(
        &self,
        disk: &dyn BlockDevice,
        sector: u64,
        edit: &impl Fn(&mut [u8]),
    ) -> Result<()> {
        let (mut array, mut header) = (self.array.clone(), self.header.clone());
        edit(&mut array[..self.used]);
        gpt_header::PARTITION_ENTRY_ARRAY_CRC32
            .set(&mut header, crc32fast::hash(&array[..self.used]));
        let len =
            (gpt_header::HEADER_SIZE.get(&header) as usize).clamp(gpt_header::LEN, header.len());
        let crc = crc32_with_zero_field(&header[..len], gpt_header::HEADER_CRC32);
        gpt_header::HEADER_CRC32.set(&mut header, crc);
        disk.write_at(&array, self.at)?;
        disk.write_at(&header, self.lba * sector)?;
        Ok(())
    }

    /// Writes this copy back as it was read (best effort: the disk already failed once).
    fn restore(&self, disk: &dyn BlockDevice, sector: u64) {
        let _ = disk.write_at(&self.array, self.at);
        let _ = disk.write_at(&self.header, self.lba * sector);
    }
}

/// The GPT header sector at `lba`, checked to be one.
fn read_header(disk: &dyn BlockDevice, sector: u64, lba: u64) -> Result<Vec<u8>> {
    let mut h = vec![0u8; sector as usize];
    disk.read_at(&mut h, lba * sector)?;
    if gpt_header::SIGNATURE.get(&h) != *gpt_header::SIGNATURE_VALUE
        || gpt_header::MY_LBA.get(&h) != lba
    {
        return Err(invalid(format!(
            "no GPT header at sector {lba}: repair the table first (sgdisk -v)"
        )));
    }
    Ok(h)
}
