//! The bad-block inode (inode 1), as `mke2fs -l` writes it: block-mapped (no extents), mode
//! and link count 0, its size the bad blocks' bytes, listing every bad block in order —
//! twelve in `i_block` itself, then through a single-indirect block and a double-indirect
//! one. Blocks listed there are in use, so the filesystem never allocates them; a live
//! deploy lists the blocks of its range that belong to the running system's other files.

use super::super::super::{FileKind, FsError, Result};
use super::layout::{Allocator, Geometry};
use super::resize::MappedInode;
use super::{own_metadata, Item};

/// Inode 1.
pub(super) const BAD_INO: u32 = 1;
/// Pointers held in `i_block` itself.
const DIRECT: usize = 12;

/// The bad-block inode for `geo`'s bad blocks, its indirect blocks taken from `alloc`;
/// `None` without bad blocks.
pub(super) fn bad_blocks_inode(
    geo: &Geometry,
    alloc: &mut Allocator,
) -> Result<Option<MappedInode>> {
    let count: u64 = geo.bad.iter().map(|r| r.1).sum();
    if count == 0 {
        return Ok(None);
    }
    let bs = geo.block_size;
    let per_block = (bs / 4) as usize;
    if count > (DIRECT + per_block + per_block * per_block) as u64 {
        return Err(FsError::Unsupported(format!(
            "{count} bad blocks are more than one bad-block inode lists"
        )));
    }
    let list: Vec<u64> = geo.bad.iter().flat_map(|&(b, n)| b..b + n).collect();
    let mut i_block = [0u8; super::inode::I_BLOCK_LEN];
    for (i, b) in list.iter().take(DIRECT).enumerate() {
        put(&mut i_block, i, *b);
    }
    let mut blocks = Vec::new();
    let rest = list.get(DIRECT..).unwrap_or_default();
    if let Some(single) = rest
        .get(..per_block.min(rest.len()))
        .filter(|s| !s.is_empty())
    {
        let at = alloc.one()?;
        blocks.push((at, pointers(single, bs)));
        put(&mut i_block, DIRECT, at);
    }
    let double = rest.get(per_block..).unwrap_or_default();
    if !double.is_empty() {
        let mut index = Vec::new();
        for chunk in double.chunks(per_block) {
            let at = alloc.one()?;
            blocks.push((at, pointers(chunk, bs)));
            index.push(at);
        }
        let at = alloc.one()?;
        blocks.push((at, pointers(&index, bs)));
        put(&mut i_block, DIRECT + 1, at);
    }
    let size = list.len() as u64 * bs;
    let mut item = Item::new(0, own_metadata(FileKind::File, 0, size, 0), 0);
    item.size = size;
    item.i_block = i_block;
    Ok(Some(MappedInode {
        ino: BAD_INO,
        blocks_512: (list.len() + blocks.len()) as u64 * bs / 512,
        blocks,
        item,
        typeless: true,
    }))
}

/// Pointer `i` of a block map.
fn put(map: &mut [u8], i: usize, block: u64) {
    map[i * 4..i * 4 + 4].copy_from_slice(&(block as u32).to_le_bytes());
}

/// A block of pointers.
fn pointers(list: &[u64], bs: u64) -> Vec<u8> {
    let mut b = vec![0u8; bs as usize];
    for (i, &p) in list.iter().enumerate() {
        put(&mut b, i, p);
    }
    b
}
