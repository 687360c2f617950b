//! Where a file's blocks are: extent trees (ext4) and block maps of direct and indirect
//! pointers (ext2/3), gathered into extents in logical order and checked against the volume;
//! inline data (in the inode) has none. Extents count in blocks, bigalloc or not.

use super::super::{NodeId, Result};
use super::error::Corruption;
use super::inode::Inode;
use super::ondisk::{extent, inode};
use super::Ext4;

/// Most extents gathered for one file.
const MAX_EXTENTS: usize = 1 << 22;

/// A file's mapping: its extents in logical order, and the blocks that map them (extent tree
/// nodes below the root, indirect blocks).
#[derive(Default)]
struct Mapping {
    extents: Vec<RawExtent>,
    tree: Vec<u64>,
}

/// One leaf extent: logical block, physical block, block count, unwritten.
#[derive(Debug, Clone, Copy)]
pub struct RawExtent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub unwritten: bool,
}

/// An extent tree node's header: (entries, depth), checked against the node's size. `block`
/// is where the node was read from (`None` for the root in the inode).
pub fn extent_header(node: &[u8], block: Option<u64>) -> Result<(usize, u16), Corruption> {
    if node.len() < extent::HEADER_SIZE || extent::MAGIC.get(node) != extent::MAGIC_VALUE {
        return Err(Corruption::ExtentMagic { block });
    }
    let (entries, max, depth) = (
        usize::from(extent::ENTRIES.get(node)),
        usize::from(extent::MAX.get(node)),
        extent::DEPTH.get(node),
    );
    if entries > max || extent::entry_at(max) > node.len() || depth > extent::MAX_DEPTH {
        return Err(Corruption::ExtentHeader {
            block,
            entries,
            max,
            depth,
        });
    }
    Ok((entries, depth))
}

/// A leaf entry as (logical block, extent).
fn leaf(e: &[u8]) -> RawExtent {
    let raw_len = extent::LEAF_LEN.get(e);
    let (len, unwritten) = if raw_len > extent::MAX_INIT_LEN {
        (raw_len - extent::MAX_INIT_LEN, true)
    } else {
        (raw_len, false)
    };
    RawExtent {
        logical: u64::from(extent::LEAF_BLOCK.get(e)),
        physical: extent::LEAF_START.get(e),
        len: u64::from(len),
        unwritten,
    }
}

impl Ext4 {
    /// The file's extents in logical order, in blocks.
    pub(super) fn raw_extents(&self, node: NodeId, ino: &Inode) -> Result<Vec<RawExtent>> {
        Ok(self.mapping(node, ino)?.extents)
    }

    /// Every block the file takes as runs of (first block, count): data, unwritten extents,
    /// extent tree nodes and indirect blocks.
    pub(super) fn all_blocks(&self, node: NodeId, ino: &Inode) -> Result<Vec<(u64, u64)>> {
        let m = self.mapping(node, ino)?;
        let data = m.extents.iter().map(|e| (e.physical, e.len));
        Ok(data.chain(m.tree.iter().map(|&b| (b, 1))).collect())
    }

    fn mapping(&self, node: NodeId, ino: &Inode) -> Result<Mapping> {
        let mut out = Mapping::default();
        if ino.has_inline_data() {
            return Ok(out);
        }
        if ino.flags & inode::EXTENTS_FL != 0 {
            self.walk_extents(node, ino.i_block(), None, &mut out)?;
        } else {
            self.walk_block_map(node, ino, &mut out)?;
        }
        Ok(out)
    }

    /// Gathers the leaves below the extent tree node `tree`: the root in the inode, or — with
    /// `parent` (block number, parent's depth) — a node read from a block.
    fn walk_extents(
        &self,
        node: NodeId,
        tree: &[u8],
        parent: Option<(u64, u16)>,
        out: &mut Mapping,
    ) -> Result<()> {
        let block = parent.map(|p| p.0);
        let (entries, depth) = extent_header(tree, block).map_err(|e| e.in_inode(node))?;
        if let Some((block, parent_depth)) = parent {
            if depth + 1 != parent_depth {
                return Err(Corruption::ExtentDepth { block }.in_inode(node));
            }
        }
        for i in 0..entries {
            let e = &tree[extent::entry_at(i)..extent::entry_at(i + 1)];
            if depth == 0 {
                self.push_extent(node, leaf(e), &mut out.extents)?;
            } else {
                let child = extent::INDEX_LEAF.get(e);
                let child_node = self.read_block(child)?;
                push_tree_block(node, child, &mut out.tree)?;
                self.walk_extents(node, &child_node, Some((child, depth)), out)?;
            }
        }
        if out
            .extents
            .windows(2)
            .any(|w| w[0].logical + w[0].len > w[1].logical)
        {
            return Err(Corruption::ExtentOrder.in_inode(node));
        }
        Ok(())
    }

    fn push_extent(&self, node: NodeId, e: RawExtent, out: &mut Vec<RawExtent>) -> Result<()> {
        if e.physical.saturating_add(e.len) > self.sb.blocks {
            return Err(Corruption::ExtentBeyond {
                start: e.physical,
                len: e.len,
            }
            .in_inode(node));
        }
        if out.len() >= MAX_EXTENTS {
            return Err(Corruption::TooManyExtents.in_inode(node));
        }
        out.push(e);
        Ok(())
    }

    /// ext2/3 block maps: 12 direct blocks, then single, double and triple indirect blocks.
    fn walk_block_map(&self, node: NodeId, ino: &Inode, out: &mut Mapping) -> Result<()> {
        let per_block = self.sb.block_size / inode::POINTER_SIZE as u64;
        let mut walk = BlockMapWalk {
            fs: self,
            node,
            file_blocks: ino.size.div_ceil(self.sb.block_size),
            out,
        };
        let ib = ino.i_block();
        for i in 0..inode::DIRECT_POINTERS {
            walk.pointer(u64::from(inode::pointer(i).get(ib)), 0, i as u64)?;
        }
        let mut logical = inode::DIRECT_POINTERS as u64;
        for level in 1..=3u32 {
            let slot = inode::DIRECT_POINTERS + level as usize - 1;
            walk.pointer(u64::from(inode::pointer(slot).get(ib)), level, logical)?;
            logical += per_block.pow(level);
        }
        Ok(())
    }
}

/// Gathers the extents of a file mapped by ext2/3 block pointers.
struct BlockMapWalk<'a> {
    fs: &'a Ext4,
    node: NodeId,
    file_blocks: u64,
    out: &'a mut Mapping,
}

impl BlockMapWalk<'_> {
    /// Follows pointer `p`, which maps `per_block^level` blocks from `logical`.
    fn pointer(&mut self, p: u64, level: u32, logical: u64) -> Result<()> {
        if p == 0 || logical >= self.file_blocks {
            return Ok(());
        }
        if p >= self.fs.sb.blocks {
            return Err(Corruption::PointerBeyond { block: p }.in_inode(self.node));
        }
        if level == 0 {
            return self.data_block(p, logical);
        }
        let per_block = self.fs.sb.block_size as usize / inode::POINTER_SIZE;
        let span = (per_block as u64).pow(level - 1);
        let table = self.fs.read_block(p)?;
        push_tree_block(self.node, p, &mut self.out.tree)?;
        for i in 0..per_block {
            let child = u64::from(inode::pointer(i).get(&table));
            self.pointer(child, level - 1, logical + i as u64 * span)?;
        }
        Ok(())
    }

    /// Adds data block `p` at `logical`, extending the last extent when it continues it.
    fn data_block(&mut self, p: u64, logical: u64) -> Result<()> {
        let extents = &mut self.out.extents;
        match extents.last_mut() {
            Some(last) if last.logical + last.len == logical && last.physical + last.len == p => {
                last.len += 1
            }
            _ => {
                if extents.len() >= MAX_EXTENTS {
                    return Err(Corruption::TooManyExtents.in_inode(self.node));
                }
                extents.push(RawExtent {
                    logical,
                    physical: p,
                    len: 1,
                    unwritten: false,
                })
            }
        }
        Ok(())
    }
}

/// Records a tree or indirect block, bounded like the extents.
fn push_tree_block(node: NodeId, block: u64, tree: &mut Vec<u64>) -> Result<()> {
    if tree.len() >= MAX_EXTENTS {
        return Err(Corruption::TooManyExtents.in_inode(node));
    }
    tree.push(block);
    Ok(())
}
