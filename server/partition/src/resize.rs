//! Changing a table's layout for a destination of another size, and knowing what lies between
//! partitions: [`PartitionTable::resize_partition`] grows or shrinks one partition and moves
//! every partition after it (logical ones and their extended boot records included) by the
//! same whole number of alignment units; [`PartitionTable::structures`] lists the bytes the
//! table itself occupies and [`PartitionTable::gaps`] the bytes that are neither table nor
//! partition (the boot loader's gap after the MBR, alignment gaps, the space after the last
//! partition), each anchored to the partition that follows it so a moved layout can carry it.

use std::ops::Range;

use super::{PartitionError, PartitionTable, Result, Scheme};

/// Where a gap lies relative to the layout: before partition `number` (it moves with it), or
/// after the last partition (it follows the last partition's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    Before(u32),
    AfterLast,
}

/// Bytes outside every partition and every table structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub range: Range<u64>,
    pub anchor: Anchor,
}

impl Gap {
    /// The same gap placed in `other`, a table with the same partition numbers (possibly
    /// moved): `None` when the partition it is anchored to is missing or the gap would not fit
    /// before `disk_end` or would overlap a structure or partition of `other`.
    pub fn placed_in(
        &self,
        this: &PartitionTable,
        other: &PartitionTable,
        disk_end: u64,
    ) -> Option<u64> {
        let at = match self.anchor {
            Anchor::Before(n) => {
                let here = this.partitions.iter().find(|p| p.number == n)?;
                let there = other.partitions.iter().find(|p| p.number == n)?;
                (there.start + self.range.start).checked_sub(here.start)?
            }
            Anchor::AfterLast => {
                let here = this.partitions.iter().map(|p| p.end()).max().unwrap_or(0);
                let there = other.partitions.iter().map(|p| p.end()).max().unwrap_or(0);
                (there + self.range.start).checked_sub(here)?
            }
        };
        let end = at.checked_add(self.range.end - self.range.start)?;
        let free = other.gaps(disk_end);
        free.iter()
            .any(|g| g.range.start <= at && end <= g.range.end)
            .then_some(at)
    }
}

impl PartitionTable {
    /// The byte ranges the table occupies on a disk of `disk_size` bytes: sector 0 (MBR or
    /// protective MBR), the GPT headers and entry arrays, and each extended boot record.
    pub fn structures(&self, disk_size: u64) -> Vec<Range<u64>> {
        let sector = u64::from(self.sector_size);
        let mut out = Vec::with_capacity(4);
        out.push(0..sector.min(disk_size));
        match self.scheme {
            Scheme::Gpt => {
                let (first_usable, last_usable) = self.usable_range(disk_size);
                out.push(sector..first_usable);
                out.push(last_usable..disk_size / sector * sector);
            }
            Scheme::Mbr => {
                if let Some(ext) = &self.mbr_extended {
                    out.extend(ext.ebrs.iter().map(|&e| e..e + sector));
                }
            }
            Scheme::None => return Vec::new(),
        }
        out
    }

    /// Every byte range of a disk of `disk_size` bytes that is neither a partition nor a table
    /// structure, in disk order, each anchored to the partition after it.
    pub fn gaps(&self, disk_size: u64) -> Vec<Gap> {
        let mut taken: Vec<Range<u64>> = self.structures(disk_size);
        taken.extend(self.partitions.iter().map(|p| p.start..p.end()));
        taken.sort_by_key(|r| r.start);
        let mut out = Vec::new();
        let mut at = 0;
        for r in &taken {
            if r.start > at {
                out.push(at..r.start.min(disk_size));
            }
            at = at.max(r.end);
        }
        if at < disk_size {
            out.push(at..disk_size);
        }
        out.into_iter()
            .filter(|r| r.start < r.end)
            .map(|range| {
                let anchor = self
                    .partitions
                    .iter()
                    .filter(|p| p.start >= range.end)
                    .min_by_key(|p| p.start)
                    .map_or(Anchor::AfterLast, |p| Anchor::Before(p.number));
                Gap { range, anchor }
            })
            .collect()
    }

    /// Grows or shrinks partition `number` so that the layout fits before `usable_end`: the
    /// partitions after it (and the extended partition with its boot records, when it lies
    /// after it or holds it) move by the same distance, a whole number of `align` bytes so
    /// their alignment is kept, and it ends where it did relative to them. When it is the
    /// last partition it simply ends at `usable_end`. Returns the distance moved.
    pub fn resize_partition(&mut self, number: u32, usable_end: u64, align: u64) -> Result<i64> {
        let p = self
            .partitions
            .iter()
            .find(|p| p.number == number)
            .cloned()
            .ok_or_else(|| PartitionError::Damaged(format!("there is no partition {number}")))?;
        let old_end = p.end();
        let followers: Vec<u32> = self
            .partitions
            .iter()
            .filter(|q| q.number != number && q.start >= old_end)
            .map(|q| q.number)
            .collect();
        if followers.is_empty() {
            let before = p.size;
            let after = self.resize_last(usable_end)?.size;
            return Ok(after as i64 - before as i64);
        }
        let delta = self.distance_to_fit(number, old_end, usable_end, align)?;
        for q in self.partitions.iter_mut() {
            if q.number == number {
                q.size = q
                    .size
                    .checked_add_signed(delta)
                    .expect("checked by distance_to_fit");
            } else if q.start >= old_end {
                q.start = q
                    .start
                    .checked_add_signed(delta)
                    .expect("checked by distance_to_fit");
            }
        }
        if let Some(ext) = &mut self.mbr_extended {
            for e in ext.ebrs.iter_mut().filter(|e| **e >= old_end) {
                *e = e
                    .checked_add_signed(delta)
                    .expect("checked by distance_to_fit");
            }
            if ext.start >= old_end {
                ext.start = ext.start.checked_add_signed(delta).expect("checked");
            } else if ext.start + ext.size >= old_end {
                ext.size = ext.size.checked_add_signed(delta).expect("checked");
            }
        }
        Ok(delta)
    }

    /// How far everything after `old_end` must move (a multiple of `align`, as far as it can
    /// go) for the layout to end by `usable_end`, checked against the partition `number`
    /// keeping a size above zero.
    fn distance_to_fit(
        &self,
        number: u32,
        old_end: u64,
        usable_end: u64,
        align: u64,
    ) -> Result<i64> {
        let mut tail_end = self.partitions.iter().map(|q| q.end()).max().unwrap_or(0);
        if let Some(ext) = &self.mbr_extended {
            if ext.start + ext.size >= old_end {
                tail_end = tail_end.max(ext.start + ext.size);
            }
        }
        let align = i128::from(align.max(u64::from(self.sector_size)));
        let room = i128::from(usable_end) - i128::from(tail_end);
        let delta = room.div_euclid(align) * align;
        let size = self
            .partitions
            .iter()
            .find(|q| q.number == number)
            .map_or(0, |q| q.size);
        if i128::from(size) + delta < align {
            return Err(PartitionError::Damaged(format!(
                "partition {number} cannot shrink by {} bytes to make room for the partitions after it",
                -delta
            )));
        }
        i64::try_from(delta).map_err(|_| PartitionError::Damaged("the disk is too large".into()))
    }
}
