//! Which blocks an ext2/3/4 volume uses, for copying it block by block: what the block bitmaps
//! mark (one bit per cluster with bigalloc), and — whatever the bitmaps say, so that a damaged
//! or uninitialized bitmap cannot drop them — the metadata the layout defines: the superblock
//! and descriptor blocks (reserved ones included) of every group with a backup, every group's
//! bitmaps and inode table wherever flex_bg put them, and the blocks of the journal inode and
//! of the resize inode.

use super::super::{AllocationMap, Result};
use super::ondisk::{gd, sb};
use super::superblock::Group;
use super::Ext4;

/// The resize inode, which holds the reserved descriptor blocks.
const RESIZE_INO: u64 = 7;

/// A set of blocks, one bit each.
struct Used {
    words: Vec<u64>,
    blocks: u64,
}

impl Used {
    fn new(blocks: u64) -> Used {
        Used {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    /// Marks `count` blocks from `from` (clipped to the volume), a word at a time.
    fn mark(&mut self, from: u64, count: u64) {
        let end = from.saturating_add(count).min(self.blocks);
        let mut b = from;
        while b < end {
            let (word, bit) = ((b / 64) as usize, b % 64);
            let n = (64 - bit).min(end - b);
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[word] |= bits;
            b += n;
        }
    }

    /// The marked blocks as sorted runs of (first block, count).
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            for bit in 0..64 {
                let b = w as u64 * 64 + bit;
                if word & (1 << bit) == 0 || b >= self.blocks {
                    continue;
                }
                match runs.last_mut() {
                    Some(r) if r.0 + r.1 == b => r.1 += 1,
                    _ => runs.push((b, 1)),
                }
            }
        }
        runs
    }
}

impl Ext4 {
    /// The blocks in use (see the module documentation).
    pub(super) fn used_blocks(&self) -> Result<AllocationMap> {
        let mut used = Used::new(self.sb.blocks);
        for (g, group) in self.groups.iter().enumerate() {
            let g = g as u64;
            self.mark_bitmap(g, group, &mut used)?;
            for (from, count) in self.sb.backup_runs(g) {
                used.mark(from, count);
            }
            used.mark(group.block_bitmap, 1);
            used.mark(group.inode_bitmap, 1);
            used.mark(group.inode_table, self.sb.itable_blocks());
        }
        let journal = self.sb.compat & sb::COMPAT_HAS_JOURNAL != 0 && self.sb.journal_inum != 0;
        let resize = self.sb.compat & sb::COMPAT_RESIZE_INODE != 0;
        for (wanted, node) in [(journal, self.sb.journal_inum), (resize, RESIZE_INO)] {
            if wanted {
                self.mark_inode_blocks(node, &mut used);
            }
        }
        Ok(AllocationMap {
            block_size: self.sb.block_size as u32,
            runs: used.runs(),
        })
    }

    /// Marks the clusters group `g`'s block bitmap marks (none when it is uninitialized).
    fn mark_bitmap(&self, g: u64, group: &Group, used: &mut Used) -> Result<()> {
        if group.flags & gd::BLOCK_UNINIT != 0 {
            return Ok(());
        }
        let ratio = self.sb.cluster_ratio;
        let first = self.sb.first_data_block + g * self.sb.blocks_per_group;
        let clusters = (self.sb.blocks_per_group.min(self.sb.blocks - first)).div_ceil(ratio);
        let bitmap = self.read_block(group.block_bitmap)?;
        for (i, &byte) in bitmap
            .iter()
            .enumerate()
            .take(clusters.div_ceil(8) as usize)
        {
            if byte == 0 {
                continue;
            }
            for bit in 0..8 {
                let cluster = i as u64 * 8 + bit;
                if byte & (1 << bit) != 0 && cluster < clusters {
                    used.mark(first + cluster * ratio, ratio);
                }
            }
        }
        Ok(())
    }

    /// Marks every block of inode `node`, tree and indirect blocks included. An inode that
    /// cannot be walked is left to its bitmap, with a warning: the rest of the map stands.
    fn mark_inode_blocks(&self, node: u64, used: &mut Used) {
        let blocks = self.inode(node).and_then(|ino| self.all_blocks(node, &ino));
        match blocks {
            Ok(runs) => runs.into_iter().for_each(|(b, n)| used.mark(b, n)),
            Err(e) => tracing::warn!("ext4 allocation map: inode {node} is not walked: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_blocks_come_back_as_runs_clipped_to_the_volume() {
        let mut u = Used::new(200);
        u.mark(3, 2);
        u.mark(5, 1);
        u.mark(62, 4);
        u.mark(198, 10);
        assert_eq!(u.runs(), [(3, 3), (62, 4), (198, 2)]);
    }
}
