//! Deciding where everything goes, before anything is written: the journal first, then
//! directories breadth first, each followed by its files' data (each file contiguous, holes
//! left out), then extent tree blocks and xattr blocks. Directory blocks and `i_block` areas
//! are built here too, so writing is a matter of copying.

use std::collections::{HashMap, HashSet, VecDeque};

use super::super::super::{FileKind, Filesystem, Result};
use super::super::ondisk::inode;
use super::dir::{directory_blocks, Shape};
use super::extent::extent_tree;
use super::layout::Allocator;
use super::resize::{resize_inode, ResizeInode};
use super::{
    csum, default_journal_blocks, xattr, Ext4Report, Extent, Item, Job, INLINE_XATTRS_AT,
    MAX_EXTENT, ROOT_INO,
};

/// Everything decided: each inode's blocks and contents, the order to write them in, the
/// journal's extents, and which blocks are in use.
pub(super) struct Placed {
    pub items: HashMap<u32, Item>,
    /// Inode numbers in the order their blocks were placed (directories breadth first, each
    /// followed by its other entries).
    pub order: Vec<u32>,
    pub journal: Vec<Extent>,
    /// The resize inode, with reserved GDT blocks.
    pub resize: Option<ResizeInode>,
    pub alloc: Allocator,
}

/// Places the journal and every item of the plan.
pub(super) fn place(
    job: &Job,
    items: HashMap<u32, Item>,
    report: &mut Ext4Report,
) -> Result<Placed> {
    let mut p = Placer {
        job,
        items,
        alloc: Allocator::new(job.geo.metadata_bitmap()),
        order: Vec::new(),
        placed: HashSet::new(),
        report,
    };
    let journal = p.journal()?;
    let resize = resize_inode(&job.geo, &mut p.alloc)?;
    p.tree()?;
    for ino in p.order.clone() {
        p.i_block_and_xattrs(ino)?;
    }
    Ok(Placed {
        items: p.items,
        order: p.order,
        journal,
        resize,
        alloc: p.alloc,
    })
}

struct Placer<'a> {
    job: &'a Job<'a>,
    items: HashMap<u32, Item>,
    alloc: Allocator,
    order: Vec<u32>,
    /// Non-directories already placed (hard links are placed once).
    placed: HashSet<u32>,
    report: &'a mut Ext4Report,
}

impl Placer<'_> {
    fn item(&mut self, ino: u32) -> &mut Item {
        self.items.get_mut(&ino).expect("planned")
    }

    /// The journal, contiguous, at the start: the blocks the options ask for, or mke2fs's
    /// default for the size.
    fn journal(&mut self) -> Result<Vec<Extent>> {
        let (geo, opts) = (&self.job.geo, self.job.opts);
        let bs = geo.block_size;
        let blocks = opts
            .journal_blocks
            .unwrap_or_else(|| default_journal_blocks(geo.blocks * bs / 4096) * 4096 / bs);
        if blocks == 0 {
            return Ok(Vec::new());
        }
        place_ranges(&[(0, blocks)], &mut self.alloc)
    }

    /// Directories breadth first, each followed by its other entries.
    fn tree(&mut self) -> Result<()> {
        let mut queue = VecDeque::from([ROOT_INO]);
        while let Some(d) = queue.pop_front() {
            self.directory(d)?;
            let children: Vec<(u32, FileKind)> =
                self.item(d).entries.iter().map(|e| (e.1, e.2)).collect();
            for (ino, kind) in children {
                if kind == FileKind::Dir {
                    queue.push_back(ino);
                } else if self.placed.insert(ino) {
                    self.child(ino, kind)?;
                    self.order.push(ino);
                }
            }
        }
        Ok(())
    }

    /// Builds directory `d`'s blocks (hashed when it needs more than one) and places them.
    fn directory(&mut self, d: u32) -> Result<()> {
        let (job, bs) = (self.job, self.job.geo.block_size);
        let item = self.items.get(&d).expect("directories are planned");
        let dseed = csum::inode_seed(job.id.csum_seed, d, 0);
        let (blocks, shape) = directory_blocks(
            d,
            item.parent,
            &item.entries,
            bs as usize,
            dseed,
            job.id.hash_key(),
        );
        if shape == Shape::TooLargeToIndex {
            self.report.skipped.push((
                format!("directory inode {d}"),
                "too large for a two-level hash index; written unindexed".into(),
            ));
        }
        let n = blocks.len() as u64;
        let extents = place_ranges(&[(0, n)], &mut self.alloc)?;
        let item = self.item(d);
        item.size = n * bs;
        item.extents = extents;
        item.dir_blocks = blocks;
        item.indexed = shape == Shape::Indexed;
        self.order.push(d);
        Ok(())
    }

    /// Places a file's data blocks (only those holding data) or a slow symlink's block.
    fn child(&mut self, ino: u32, kind: FileKind) -> Result<()> {
        let (source, bs) = (self.job.source, self.job.geo.block_size);
        let item = self.items.get_mut(&ino).expect("planned");
        match kind {
            FileKind::File => {
                item.size = item.meta.size;
                let ranges = data_blocks(source, item, bs)?;
                item.extents = place_ranges(&ranges, &mut self.alloc)?;
            }
            FileKind::Symlink => {
                item.size = item.target.len() as u64;
                if item.target.len() >= inode::I_BLOCK_LEN {
                    item.extents = place_ranges(&[(0, 1)], &mut self.alloc)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Fills the inode's `i_block` (fast symlink target, device number or extent tree, whose
    /// index blocks are placed now) and places its xattr block when the attributes do not
    /// fit the inode.
    fn i_block_and_xattrs(&mut self, ino: u32) -> Result<()> {
        let bs = self.job.geo.block_size;
        let item = self.items.get_mut(&ino).expect("planned");
        let mut ib = [0u8; inode::I_BLOCK_LEN];
        match item.kind {
            FileKind::Symlink if item.target.len() < inode::I_BLOCK_LEN => {
                ib[..item.target.len()].copy_from_slice(&item.target);
            }
            FileKind::CharDevice | FileKind::BlockDevice => {
                inode::set_device(&mut ib, item.meta.device.unwrap_or((0, 0)));
            }
            FileKind::File | FileKind::Dir | FileKind::Symlink => {
                let (root, tree) = extent_tree(&item.extents, bs, &mut self.alloc)?;
                ib = root;
                item.tree = tree;
            }
            FileKind::Fifo | FileKind::Socket => {}
        }
        item.i_block = ib;
        self.xattr_block(ino)
    }

    /// Keeps the attributes in the inode when they fit, else places a block for them; drops
    /// them (reported) when not even a block holds them.
    fn xattr_block(&mut self, ino: u32) -> Result<()> {
        let (bs, inode_size) = (self.job.geo.block_size, self.job.geo.inode_size);
        let item = self.items.get_mut(&ino).expect("planned");
        if item.attrs.is_empty() {
            return Ok(());
        }
        let mut probe = vec![0u8; inode_size as usize - INLINE_XATTRS_AT];
        if xattr::write_inline(&mut probe, &item.attrs) {
            return Ok(());
        }
        item.inline_attrs = false;
        match xattr::block(bs as usize, &item.attrs) {
            Some(b) => item.xattr_block = Some((self.alloc.one()?, b)),
            None => {
                self.report.skipped.push((
                    format!("inode {ino}"),
                    "extended attributes larger than one block are not written".into(),
                ));
                item.attrs.clear();
            }
        }
        Ok(())
    }
}

/// Block ranges (first block, end block) holding the file's data, merged.
fn data_blocks(source: &dyn Filesystem, item: &Item, bs: u64) -> Result<Vec<(u64, u64)>> {
    let size = item.meta.size;
    let last = size.div_ceil(bs);
    let mut ranges: Vec<(u64, u64)> = source
        .data_ranges(item.src)?
        .into_iter()
        .filter(|r| r.1 > 0 && r.0 < size)
        .map(|(off, len)| (off / bs, (off + len).div_ceil(bs).min(last)))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(m) if r.0 <= m.1 => m.1 = m.1.max(r.1),
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// Allocates `ranges` (logical block ranges) and returns extents of at most MAX_EXTENT blocks.
fn place_ranges(ranges: &[(u64, u64)], alloc: &mut Allocator) -> Result<Vec<Extent>> {
    let mut extents = Vec::new();
    for &(start, end) in ranges {
        let mut logical = start;
        for (phys, count) in alloc.alloc(end - start)? {
            let mut done = 0;
            while done < count {
                let n = (count - done).min(MAX_EXTENT);
                extents.push((logical, phys + done, n));
                logical += n;
                done += n;
            }
        }
    }
    Ok(extents)
}
