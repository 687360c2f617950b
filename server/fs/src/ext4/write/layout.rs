//! Where an ext4 filesystem's metadata goes: block groups, superblock backups (sparse_super),
//! the group descriptor table and the GDT blocks reserved after it for growth, and — with flex_bg — each flex group's block bitmaps, inode
//! bitmaps and inode tables packed at the start of its first group. Then a block allocator that
//! hands out the rest in ascending order, so a file's blocks are contiguous and directories sit
//! right before their files.

use super::super::super::{FsError, Result};
use super::super::ondisk::gd;

/// The geometry of a filesystem to write.
#[derive(Debug, Clone)]
pub struct Geometry {
    pub block_size: u64,
    pub blocks: u64,
    pub first_data_block: u64,
    pub blocks_per_group: u64,
    pub groups: u64,
    pub inodes_per_group: u64,
    pub inode_size: u64,
    pub desc_size: u64,
    pub gdt_blocks: u64,
    /// Blocks reserved after each descriptor table for online growth (resize_inode).
    pub reserved_gdt: u64,
    pub log_groups_per_flex: u32,
    /// Blocks the filesystem must never use or write (first, count), sorted and disjoint:
    /// they are listed in the bad-block inode.
    pub bad: Vec<(u64, u64)>,
    /// Per group: block bitmap, inode bitmap, inode table.
    pub block_bitmap: Vec<u64>,
    pub inode_bitmap: Vec<u64>,
    pub inode_table: Vec<u64>,
}

/// Whether group `g` holds a superblock backup (sparse_super: 0, 1, powers of 3, 5, 7).
pub fn has_super(g: u64) -> bool {
    if g <= 1 {
        return true;
    }
    [3u64, 5, 7].iter().any(|&b| {
        let mut p = b;
        while p < g {
            p *= b;
        }
        p == g
    })
}

/// Refuses block and inode sizes the writer does not make.
fn check_sizes(block_size: u64, inode_size: u64) -> Result<()> {
    if ![1024, 2048, 4096].contains(&block_size) {
        return Err(FsError::Unsupported(format!(
            "block size {block_size} (use 1024, 2048 or 4096)"
        )));
    }
    if !(128..=block_size).contains(&inode_size)
        || !inode_size.is_power_of_two()
        || inode_size < 256
    {
        return Err(FsError::Unsupported(format!(
            "inode size {inode_size} (use 256 up to the block size)"
        )));
    }
    Ok(())
}

/// The block count and group count, without a last group too small to hold its own metadata
/// (dropped, as mke2fs does).
fn whole_groups(blocks: u64, first_data_block: u64, blocks_per_group: u64) -> (u64, u64) {
    let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
    let last = blocks - first_data_block - (groups - 1) * blocks_per_group;
    if groups > 1 && last < 512 {
        (
            first_data_block + (groups - 1) * blocks_per_group,
            groups - 1,
        )
    } else {
        (blocks, groups)
    }
}

/// Inodes per group for at least `wanted` inodes over `groups` groups: at least 16, whole
/// inode table blocks, a multiple of 8 (whole bitmap bytes).
fn inodes_per_group(block_size: u64, inode_size: u64, groups: u64, wanted: u64) -> u64 {
    let inodes_per_block = block_size / inode_size;
    wanted
        .div_ceil(groups)
        .max(16)
        .next_multiple_of(inodes_per_block.max(8))
        .next_multiple_of(8)
}

impl Geometry {
    /// Lays out a filesystem of `blocks` blocks with at least `min_inodes` inodes, or as many
    /// as its groups hold when that is fewer (callers check what they need against
    /// [`Geometry::inodes`]).
    pub fn new(
        block_size: u64,
        blocks: u64,
        inode_size: u64,
        min_inodes: u64,
        bytes_per_inode: u64,
    ) -> Result<Geometry> {
        check_sizes(block_size, inode_size)?;
        let first_data_block = u64::from(block_size == 1024);
        let blocks_per_group = 8 * block_size;
        if blocks < 64 + first_data_block {
            return Err(FsError::Unsupported(format!(
                "{blocks} blocks is too small for ext4"
            )));
        }
        let (blocks, groups) = whole_groups(blocks, first_data_block, blocks_per_group);
        let wanted = min_inodes.max(blocks * block_size / bytes_per_inode.max(1024));
        // A group's inode bitmap is one block.
        let ipg = inodes_per_group(block_size, inode_size, groups, wanted).min(8 * block_size);
        let desc_size = gd::SIZE_64 as u64;
        let mut geo = Geometry {
            block_size,
            blocks,
            first_data_block,
            blocks_per_group,
            groups,
            inodes_per_group: ipg,
            inode_size,
            desc_size,
            gdt_blocks: (groups * desc_size).div_ceil(block_size),
            reserved_gdt: 0,
            log_groups_per_flex: 4,
            bad: Vec::new(),
            block_bitmap: Vec::new(),
            inode_bitmap: Vec::new(),
            inode_table: Vec::new(),
        };
        geo.place_flex_groups()?;
        Ok(geo)
    }

    /// The same geometry with `n` GDT blocks reserved after each descriptor table (at most
    /// a block's worth of pointers, as the resize inode's index holds).
    pub fn with_reserved_gdt(mut self, n: u64) -> Result<Geometry> {
        self.reserved_gdt = n.min(self.block_size / 4);
        self.log_groups_per_flex = 4;
        self.place_flex_groups()?;
        Ok(self)
    }

    /// The same geometry keeping off `bad` blocks (first, count): the metadata is placed
    /// around them. Refused when they touch the primary superblock or descriptor table.
    pub fn with_bad_blocks(mut self, bad: &[(u64, u64)]) -> Result<Geometry> {
        if bad.is_empty() {
            return Ok(self);
        }
        let mut ranges: Vec<(u64, u64)> = bad
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(b, n)| (b, n.min(self.blocks.saturating_sub(b))))
            .filter(|r| r.1 > 0)
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (b, n) in ranges {
            match merged.last_mut() {
                Some(m) if b <= m.0 + m.1 => m.1 = m.1.max(b + n - m.0),
                _ => merged.push((b, n)),
            }
        }
        let head = self.first_data_block + self.backup_len(0);
        if merged.first().is_some_and(|r| r.0 < head) {
            return Err(FsError::Unsupported(format!(
                "blocks below {head} (the superblock and group descriptors) cannot be bad"
            )));
        }
        self.bad = merged;
        self.log_groups_per_flex = 4;
        self.place_flex_groups()?;
        Ok(self)
    }

    /// Places the flex groups' metadata, with smaller flex groups when a flex group's
    /// metadata would not fit its first group.
    fn place_flex_groups(&mut self) -> Result<()> {
        while !self.place() {
            if self.log_groups_per_flex == 0 {
                return Err(FsError::Unsupported(
                    "the inode tables do not fit the block groups: give a larger size or fewer inodes"
                        .into(),
                ));
            }
            self.log_groups_per_flex -= 1;
        }
        Ok(())
    }

    /// Places each flex group's bitmaps and inode tables after its first group's backup,
    /// packed, around bad blocks; false when they do not fit that group (without bad blocks)
    /// or the filesystem.
    fn place(&mut self) -> bool {
        self.block_bitmap.clear();
        self.inode_bitmap.clear();
        self.inode_table.clear();
        let flex = 1u64 << self.log_groups_per_flex;
        let itable = self.itable_blocks();
        if (0..self.groups).any(|g| self.backup_len(g) > self.group_len(g)) {
            return false;
        }
        // Where the metadata placed so far ends: bad blocks may push a flex group's metadata
        // past the start of the next one, which must then start after it.
        let mut placed_to = 0;
        for g0 in (0..self.groups).step_by(flex as usize) {
            let members = flex.min(self.groups - g0);
            let mut at = (self.group_start(g0) + self.backup_len(g0)).max(placed_to);
            let limit = if self.bad.is_empty() {
                self.group_start(g0) + self.group_len(g0)
            } else {
                self.blocks
            };
            for (len, list) in [(1, 0), (1, 1), (itable, 2)] {
                for _ in 0..members {
                    let Some(b) = self.free_run(at, len, limit) else {
                        return false;
                    };
                    match list {
                        0 => self.block_bitmap.push(b),
                        1 => self.inode_bitmap.push(b),
                        _ => self.inode_table.push(b),
                    }
                    at = b + len;
                }
            }
            placed_to = at;
        }
        true
    }

    /// The first block from `from` starting `len` blocks that end by `limit` and hold no bad
    /// block and no superblock backup.
    fn free_run(&self, mut from: u64, len: u64, limit: u64) -> Option<u64> {
        loop {
            let end = from + len;
            if end > limit {
                return None;
            }
            match self.obstacle(from, end) {
                Some(past) => from = past,
                None => return Some(from),
            }
        }
    }

    /// The end of the first bad range or backup that `from..end` overlaps, if any.
    fn obstacle(&self, from: u64, end: u64) -> Option<u64> {
        let i = self.bad.partition_point(|r| r.0 + r.1 <= from);
        if let Some(&(b, n)) = self.bad.get(i).filter(|r| r.0 < end) {
            return Some(b + n);
        }
        let group =
            |b: u64| (b.max(self.first_data_block) - self.first_data_block) / self.blocks_per_group;
        (group(from)..=group(end - 1)).find_map(|g| {
            let start = self.group_start(g);
            let past = start + self.backup_len(g);
            (start < end && from < past).then_some(past)
        })
    }

    /// Whether any of `len` blocks from `from` is bad.
    pub fn touches_bad(&self, from: u64, len: u64) -> bool {
        let i = self.bad.partition_point(|r| r.0 + r.1 <= from);
        self.bad.get(i).is_some_and(|r| r.0 < from + len)
    }

    pub fn group_start(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    pub fn group_len(&self, g: u64) -> u64 {
        self.blocks_per_group.min(self.blocks - self.group_start(g))
    }

    /// Blocks a group's superblock backup, descriptor table and reserved GDT blocks take (0
    /// without a backup).
    pub fn backup_len(&self, g: u64) -> u64 {
        if has_super(g) {
            1 + self.gdt_blocks + self.reserved_gdt
        } else {
            0
        }
    }

    pub fn itable_blocks(&self) -> u64 {
        self.inodes_per_group * self.inode_size / self.block_size
    }

    pub fn inodes(&self) -> u64 {
        self.groups * self.inodes_per_group
    }

    /// A bitmap of the blocks metadata occupies.
    pub fn metadata_bitmap(&self) -> Vec<bool> {
        let mut used = vec![false; self.blocks as usize];
        let mut mark = |from: u64, n: u64| {
            for b in from..from + n {
                used[b as usize] = true;
            }
        };
        mark(0, self.first_data_block);
        for g in 0..self.groups {
            mark(self.group_start(g), self.backup_len(g));
            mark(self.block_bitmap[g as usize], 1);
            mark(self.inode_bitmap[g as usize], 1);
            mark(self.inode_table[g as usize], self.itable_blocks());
        }
        for &(b, n) in &self.bad {
            mark(b, n);
        }
        used
    }
}

/// Hands out free blocks in ascending order.
pub struct Allocator {
    used: Vec<bool>,
    next: u64,
}

impl Allocator {
    pub fn new(used: Vec<bool>) -> Allocator {
        Allocator { used, next: 0 }
    }

    /// `n` blocks as runs of (first block, count), as contiguous as the metadata allows.
    pub fn alloc(&mut self, n: u64) -> Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut left = n;
        while left > 0 {
            while (self.next as usize) < self.used.len() && self.used[self.next as usize] {
                self.next += 1;
            }
            if self.next as usize >= self.used.len() {
                return Err(FsError::Unsupported(
                    "the filesystem is full: give a larger size".into(),
                ));
            }
            let b = self.next;
            self.used[b as usize] = true;
            self.next += 1;
            left -= 1;
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == b => r.1 += 1,
                _ => runs.push((b, 1)),
            }
        }
        Ok(runs)
    }

    /// Takes the `n` blocks from `first` when every one of them is free; false (nothing
    /// taken) otherwise.
    pub fn claim(&mut self, first: u64, n: u64) -> bool {
        let Some(end) = first
            .checked_add(n)
            .filter(|&e| e <= self.used.len() as u64)
        else {
            return false;
        };
        let blocks = &mut self.used[first as usize..end as usize];
        if blocks.iter().any(|&u| u) {
            return false;
        }
        blocks.fill(true);
        true
    }

    /// One block.
    pub fn one(&mut self) -> Result<u64> {
        Ok(self.alloc(1)?[0].0)
    }

    pub fn into_used(self) -> Vec<bool> {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_live_in_groups_0_1_and_powers_of_3_5_7() {
        let with: Vec<u64> = (0..50).filter(|&g| has_super(g)).collect();
        assert_eq!(with, [0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn flex_metadata_is_packed_and_never_overlaps() {
        let geo = Geometry::new(4096, 300_000, 256, 1000, 16384).unwrap();
        assert_eq!(geo.groups, 10);
        assert_eq!(geo.block_bitmap[1], geo.block_bitmap[0] + 1);
        let used = geo.metadata_bitmap();
        let count = used.iter().filter(|&&u| u).count() as u64;
        let expect: u64 = (0..geo.groups).map(|g| geo.backup_len(g)).sum::<u64>()
            + geo.groups * (2 + geo.itable_blocks());
        assert_eq!(count, expect);
    }
}
