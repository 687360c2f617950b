//! The resize inode (inode 7) that `resize_inode` volumes keep for online growth, laid out as
//! mke2fs lays it out: its double-indirect block lists the GDT blocks reserved after the
//! primary group descriptor table (entry `(gdt_blocks + i) % pointers-per-block` for reserved
//! block `i`), and each of those blocks lists the same reserved block in every backup group,
//! in backup order (1, 3, 5, 7, 9, 25, 27, ...). The reserved blocks in the backup groups
//! stay zero; its size is the largest a double-indirect file reaches.

use super::super::super::{FileKind, Result};
use super::layout::{has_super, Allocator, Geometry};
use super::{own_metadata, Item};

/// Inode 7.
pub(super) const RESIZE_INO: u32 = 7;

/// A block-mapped inode the writer makes itself (the resize inode, the bad-block inode):
/// its number, its blocks to write (block number, contents), and the inode before its
/// checksum (without the extents flag).
pub(super) struct MappedInode {
    pub ino: u32,
    pub blocks: Vec<(u64, Vec<u8>)>,
    pub item: Item,
    /// Blocks it owns, in 512-byte units (`i_blocks`).
    pub blocks_512: u64,
    /// Mode and link count 0, no extra fields: how mke2fs writes the bad-block inode.
    pub typeless: bool,
}

/// The resize inode for `geo`, its double-indirect block taken from `alloc`; `None` without
/// reserved GDT blocks.
pub(super) fn resize_inode(geo: &Geometry, alloc: &mut Allocator) -> Result<Option<MappedInode>> {
    if geo.reserved_gdt == 0 {
        return Ok(None);
    }
    let bs = geo.block_size;
    let per_block = bs / 4;
    let backups: Vec<u64> = (1..geo.groups).filter(|&g| has_super(g)).collect();
    let dind_at = alloc.one()?;
    let mut dind = vec![0u8; bs as usize];
    let mut blocks = Vec::new();
    for i in 0..geo.reserved_gdt {
        let primary = geo.first_data_block + 1 + geo.gdt_blocks + i;
        let slot = ((geo.gdt_blocks + i) % per_block) as usize * 4;
        dind[slot..slot + 4].copy_from_slice(&(primary as u32).to_le_bytes());
        let mut list = vec![0u8; bs as usize];
        for (n, g) in backups.iter().take(per_block as usize).enumerate() {
            let copy = primary + g * geo.blocks_per_group;
            list[n * 4..n * 4 + 4].copy_from_slice(&(copy as u32).to_le_bytes());
        }
        blocks.push((primary, list));
    }
    blocks.push((dind_at, dind));
    let owned = 1 + geo.reserved_gdt * (1 + backups.len() as u64);
    let size = (per_block * per_block + per_block + 12) * bs;
    let mut item = Item::new(0, own_metadata(FileKind::File, 0o600, size, 1), 0);
    item.size = size;
    // i_block[13]: the double-indirect pointer.
    item.i_block[13 * 4..14 * 4].copy_from_slice(&(dind_at as u32).to_le_bytes());
    Ok(Some(MappedInode {
        ino: RESIZE_INO,
        blocks,
        item,
        blocks_512: owned * bs / 512,
        typeless: false,
    }))
}
