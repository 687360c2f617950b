//! Deciding where everything goes, before anything is written: the journal first, then the
//! files whose source knows where an earlier copy put them (`placement_hint`: kept there
//! where those blocks are free), then directories breadth first, each followed by its other
//! files' data (each file contiguous, holes left out), then extent tree blocks and xattr
//! blocks. Directory blocks and `i_block` areas
//! are built here too, so writing is a matter of copying.

use std::collections::{HashMap, HashSet, VecDeque};

use super::super::super::{FileExtent, FileKind, Filesystem, Result};
use super::super::ondisk::inode;
use super::badblocks::bad_blocks_inode;
use super::dir::{directory_blocks, Shape};
use super::extent::extent_tree;
use super::layout::Allocator;
use super::resize::{resize_inode, MappedInode};
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
    /// The resize inode (with reserved GDT blocks) and the bad-block inode (with bad
    /// blocks).
    pub mapped: Vec<MappedInode>,
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
        pending: HashMap::new(),
        report,
    };
    let journal = p.journal()?;
    let mapped = resize_inode(&job.geo, &mut p.alloc)?
        .into_iter()
        .chain(bad_blocks_inode(&job.geo, &mut p.alloc)?)
        .collect();
    p.hinted()?;
    p.tree()?;
    for ino in p.order.clone() {
        p.i_block_and_xattrs(ino)?;
    }
    Ok(Placed {
        items: p.items,
        order: p.order,
        journal,
        mapped,
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
    /// Files placed by their hint: the logical block ranges the hint did not cover.
    pending: HashMap<u32, Vec<(u64, u64)>>,
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

    /// Files whose source says where an earlier copy keeps them: each block range the hint
    /// covers goes to the same blocks when they are free; the rest waits for `child`.
    fn hinted(&mut self) -> Result<()> {
        let (source, bs) = (self.job.source, self.job.geo.block_size);
        let keep = self.job.opts.keep_source_layout;
        let mut files: Vec<u32> = self
            .items
            .iter()
            .filter(|(_, i)| i.kind == FileKind::File)
            .map(|(&ino, _)| ino)
            .collect();
        files.sort_unstable();
        for ino in files {
            let item = &self.items[&ino];
            let own = || keep.then(|| source.extents(item.src).ok()).flatten();
            let Some(hint) = source.placement_hint(item.src).or_else(own) else {
                continue;
            };
            let hint = hint_blocks(&hint, bs);
            let mut extents = Vec::new();
            let mut pending = Vec::new();
            for range in data_blocks(source, item, bs)? {
                for (l, end, phys) in through_hint(range, &hint) {
                    match phys.filter(|&p| self.alloc.claim(p, end - l)) {
                        Some(p) => push_extents(&mut extents, l, p, end - l),
                        None => pending.push((l, end)),
                    }
                }
            }
            self.item(ino).extents = extents;
            self.pending.insert(ino, pending);
        }
        Ok(())
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
                let ranges = match self.pending.remove(&ino) {
                    Some(left) => left,
                    None => data_blocks(source, item, bs)?,
                };
                let more = place_ranges(&ranges, &mut self.alloc)?;
                item.extents.extend(more);
                item.extents.sort_unstable_by_key(|e| e.0);
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
            push_extents(&mut extents, logical, phys, count);
            logical += count;
        }
    }
    Ok(extents)
}

/// Adds `count` blocks from logical `logical` at `phys` as extents of at most MAX_EXTENT.
fn push_extents(extents: &mut Vec<Extent>, logical: u64, phys: u64, count: u64) {
    let mut done = 0;
    while done < count {
        let n = (count - done).min(MAX_EXTENT);
        extents.push((logical + done, phys + done, n));
        done += n;
    }
}

/// A placement hint in blocks: (first logical block, end logical block, first physical
/// block) for each extent that is block-aligned (others cannot be kept).
fn hint_blocks(hint: &[FileExtent], bs: u64) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = hint
        .iter()
        .filter(|e| !e.unwritten && e.file_offset % bs == 0 && e.disk_offset % bs == 0)
        .map(|e| {
            let l = e.file_offset / bs;
            (l, l + e.len.div_ceil(bs), e.disk_offset / bs)
        })
        .collect();
    out.sort_unstable();
    out
}

/// `range` (logical blocks) cut along the hint: (first, end, physical block or `None` where
/// the hint says nothing).
fn through_hint(range: (u64, u64), hint: &[(u64, u64, u64)]) -> Vec<(u64, u64, Option<u64>)> {
    let mut out = Vec::new();
    let mut l = range.0;
    for &(start, end, phys) in hint {
        if end <= l || start >= range.1 {
            continue;
        }
        if start > l {
            out.push((l, start, None));
            l = start;
        }
        let stop = end.min(range.1);
        out.push((l, stop, Some(phys + (l - start))));
        l = stop;
    }
    if l < range.1 {
        out.push((l, range.1, None));
    }
    out
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn a_range_is_cut_along_the_hint() {
        let hint = [(0, 4, 100), (6, 10, 200)];
        assert_eq!(
            through_hint((2, 12), &hint),
            [
                (2, 4, Some(102)),
                (4, 6, None),
                (6, 10, Some(200)),
                (10, 12, None)
            ]
        );
        assert_eq!(through_hint((4, 6), &hint), [(4, 6, None)]);
    }
}
