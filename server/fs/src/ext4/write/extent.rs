//! Extent trees: the root in the inode's `i_block` (four entries), and when a file has more
//! extents than that, levels of index blocks allocated as they are built.

use super::super::super::Result;
use super::super::ondisk::{extent, inode};
use super::layout::Allocator;
use super::{Extent, TreeBlocks};

/// A node of `size` bytes holding `entries` (each `extent::ENTRY_SIZE` bytes) at `depth`,
/// with room for `max`.
fn node(max: usize, depth: u16, entries: &[[u8; extent::ENTRY_SIZE]], size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    extent::MAGIC.set(&mut b, extent::MAGIC_VALUE);
    extent::ENTRIES.set(&mut b, entries.len() as u16);
    extent::MAX.set(&mut b, max as u16);
    extent::DEPTH.set(&mut b, depth);
    for (i, e) in entries.iter().enumerate() {
        b[extent::entry_at(i)..extent::entry_at(i + 1)].copy_from_slice(e);
    }
    b
}

/// A leaf entry for (logical, physical, count).
fn leaf((logical, physical, count): Extent) -> [u8; extent::ENTRY_SIZE] {
    let mut e = [0u8; extent::ENTRY_SIZE];
    extent::LEAF_BLOCK.set(&mut e, logical as u32);
    extent::LEAF_LEN.set(&mut e, count as u16);
    extent::LEAF_START.set(&mut e, physical);
    e
}

/// An index entry pointing at the node in block `nr`, which maps from `logical`.
fn index(logical: u64, nr: u64) -> [u8; extent::ENTRY_SIZE] {
    let mut e = [0u8; extent::ENTRY_SIZE];
    extent::INDEX_BLOCK.set(&mut e, logical as u32);
    extent::INDEX_LEAF.set(&mut e, nr);
    e
}

/// The `i_block` for `extents`, and the tree blocks (block number, bytes without checksum)
/// when more than four extents need an index.
pub(super) fn extent_tree(
    extents: &[Extent],
    bs: u64,
    alloc: &mut Allocator,
) -> Result<([u8; inode::I_BLOCK_LEN], TreeBlocks)> {
    // Each level: (first logical block, entry).
    let mut level: Vec<(u64, [u8; extent::ENTRY_SIZE])> =
        extents.iter().map(|&e| (e.0, leaf(e))).collect();
    let per_block = (bs as usize - extent::HEADER_SIZE) / extent::ENTRY_SIZE;
    let mut blocks = Vec::new();
    let mut depth = 0u16;
    while level.len() > extent::ROOT_ENTRIES {
        let mut upper = Vec::new();
        for chunk in level.chunks(per_block) {
            let nr = alloc.one()?;
            let entries: Vec<_> = chunk.iter().map(|c| c.1).collect();
            blocks.push((nr, node(per_block, depth, &entries, bs as usize)));
            upper.push((chunk[0].0, index(chunk[0].0, nr)));
        }
        level = upper;
        depth += 1;
    }
    let entries: Vec<_> = level.iter().map(|c| c.1).collect();
    let root = node(extent::ROOT_ENTRIES, depth, &entries, inode::I_BLOCK_LEN);
    let mut i_block = [0u8; inode::I_BLOCK_LEN];
    i_block.copy_from_slice(&root);
    Ok((i_block, blocks))
}

#[cfg(test)]
mod tests {
    use super::super::super::blocks::extent_header;
    use super::*;

    #[test]
    fn four_extents_fit_the_inode_and_more_take_a_block() {
        let mut alloc = Allocator::new(vec![false; 100]);
        let four: Vec<Extent> = (0..4).map(|i| (i * 10, 50 + i * 10, 5)).collect();
        let (root, tree) = extent_tree(&four, 1024, &mut alloc).unwrap();
        assert!(tree.is_empty());
        assert_eq!(extent_header(&root, None), Ok((4, 0)));
        assert_eq!(extent::LEAF_START.get(&root[extent::entry_at(3)..]), 80);
        let five: Vec<Extent> = (0..5).map(|i| (i * 10, 50 + i * 10, 5)).collect();
        let (root, tree) = extent_tree(&five, 1024, &mut alloc).unwrap();
        assert_eq!(extent_header(&root, None), Ok((1, 1)));
        assert_eq!(tree.len(), 1);
        assert_eq!(
            extent::INDEX_LEAF.get(&root[extent::entry_at(0)..]),
            tree[0].0
        );
        assert_eq!(extent_header(&tree[0].1, Some(tree[0].0)), Ok((5, 0)));
    }
}
