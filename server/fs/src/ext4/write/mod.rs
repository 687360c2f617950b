//! The ext4 writer: formats a block device and fills it from any [`Filesystem`] (a captured
//! volume or a host directory) in one pass — no mkfs, no mount.
//!
//! 1. **Plan**: walk the source; give every directory and file an inode number (root 2,
//!    `lost+found` 11, the rest from 12 in walk order; hard links share one), read metadata,
//!    link targets and extended attributes.
//! 2. **Lay out** ([`layout`]): block groups with flex_bg and sparse_super backups, then an
//!    ascending allocator — the journal first, then each directory's blocks followed by its
//!    files' data, each file contiguous. Holes in the source stay holes.
//! 3. **Write**: file data (all-zero blocks are skipped so the output stays sparse), directory
//!    blocks, extent tree blocks, xattr blocks, the used part of each inode table, bitmaps,
//!    group descriptors, superblocks and the journal superblock — every checksum
//!    (metadata_csum, [`csum`]) included.
//!
//! Features: has_journal, ext_attr, dir_index, filetype, extents, 64bit, flex_bg,
//! sparse_super, large_file, huge_file, dir_nlink, extra_isize, metadata_csum. A directory
//! that needs more than one block gets a hash index ([`htree`]).

pub mod csum;
mod emit;
pub mod htree;
pub mod layout;
mod plan;
pub mod xattr;

use std::collections::HashMap;
use std::sync::Arc;

use super::super::{FileKind, Filesystem, FsError, Metadata, NodeId, Result, Timestamp};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::le::{put16, put32};
use layout::{Allocator, Geometry};
use xattr::Attr;

const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const LOST_FOUND_INO: u32 = 11;
const FIRST_INO: u32 = 11;
use super::inode::EXTENTS_FL;
const INDEX_FL: u32 = 0x0000_1000;
/// The longest initialized extent.
const MAX_EXTENT: u64 = 32768;
/// Inode flags carried over from an ext4 source (immutable, append-only, nodump, noatime,
/// sync, dirsync, ...).
const COPIED_FLAGS: u32 = 0x0003_00FB;

/// How to format.
#[derive(Debug, Clone)]
pub struct Ext4Options {
    pub block_size: u64,
    pub inode_size: u64,
    pub label: Option<String>,
    pub uuid: Option<[u8; 16]>,
    pub hash_seed: Option<[u8; 16]>,
    /// Journal blocks; `None` picks mke2fs's default for the size, `Some(0)` writes none.
    pub journal_blocks: Option<u64>,
    /// At least this many inodes (on top of what the tree needs).
    pub min_inodes: u64,
    pub bytes_per_inode: u64,
    /// Blocks reserved for root, in percent.
    pub reserved_percent: u64,
    /// Kept up to date with entries planned and written, when given.
    pub counters: Option<Arc<super::super::WriteCounters>>,
}

impl Default for Ext4Options {
    fn default() -> Self {
        Ext4Options {
            block_size: 4096,
            inode_size: 256,
            label: None,
            uuid: None,
            hash_seed: None,
            journal_blocks: None,
            min_inodes: 0,
            bytes_per_inode: 16384,
            reserved_percent: 5,
            counters: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ext4Report {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub special: u64,
    pub bytes: u64,
    pub skipped: Vec<(String, String)>,
}

/// mke2fs's default journal size for a filesystem of `blocks` 4 KiB-equivalent blocks.
pub fn default_journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 2048 => 0,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131_072,
        _ => 262_144,
    }
}

/// A filesystem size (bytes) that holds `data` bytes of file data (each file rounded up to a
/// block) and `entries` files and directories with room to spare, with the default options:
/// the data, a directory entry per entry, inode tables for one inode per 16 KiB (at least
/// `entries`, and a block group per 32,768 inodes), and mke2fs's journal for that size.
pub fn suggested_size(data: u64, entries: u64) -> u64 {
    let base = data + entries * 512;
    let base = base + base / 64 + (4 << 20);
    let groups_for_inodes = (entries + 64).div_ceil(32768);
    let base = base.max((groups_for_inodes - 1) * (128 << 20) + (8 << 20));
    let with_journal = base + default_journal_blocks(base / 4096) * 4096;
    (with_journal + with_journal / 10).next_multiple_of(1 << 20)
}

/// One inode to write.
struct Item {
    src: NodeId,
    meta: Metadata,
    kind: FileKind,
    links: u32,
    /// Directories: parent inode and entries (name, inode, kind).
    parent: u32,
    entries: Vec<(Vec<u8>, u32, FileKind)>,
    target: Vec<u8>,
    attrs: Vec<Attr>,
    /// Decided at layout: data extents (logical block, physical block, count), tree blocks,
    /// the xattr block, and the i_block area.
    extents: Vec<(u64, u64, u64)>,
    tree: TreeBlocks,
    xattr_block: Option<(u64, Vec<u8>)>,
    inline_attrs: bool,
    /// A hashed (htree) directory.
    indexed: bool,
    size: u64,
}

impl Item {
    fn new(src: NodeId, meta: Metadata, parent: u32) -> Item {
        Item {
            src,
            kind: meta.kind,
            meta,
            links: 1,
            parent,
            entries: Vec::new(),
            target: Vec::new(),
            attrs: Vec::new(),
            extents: Vec::new(),
            tree: Vec::new(),
            xattr_block: None,
            inline_attrs: true,
            indexed: false,
            size: 0,
        }
    }
}

fn file_type(kind: FileKind) -> u8 {
    match kind {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::CharDevice => 3,
        FileKind::BlockDevice => 4,
        FileKind::Fifo => 5,
        FileKind::Socket => 6,
        FileKind::Symlink => 7,
    }
}

fn mode_bits(kind: FileKind) -> u16 {
    match kind {
        FileKind::File => 0x8000,
        FileKind::Dir => 0x4000,
        FileKind::Symlink => 0xA000,
        FileKind::CharDevice => 0x2000,
        FileKind::BlockDevice => 0x6000,
        FileKind::Fifo => 0x1000,
        FileKind::Socket => 0xC000,
    }
}

/// Metadata for an inode the writer makes itself (lost+found, the journal): root's, created
/// now.
fn own_metadata(kind: FileKind, mode: u32, size: u64, links: u32) -> Metadata {
    let t = Some(now());
    Metadata {
        node: 0,
        kind,
        size,
        mode,
        uid: 0,
        gid: 0,
        links,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        device: None,
        flags: 0,
        allocated: 0,
    }
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: d.as_secs() as i64,
        nanos: d.subsec_nanos(),
    }
}

/// The tree to write, with inode numbers.
struct Plan {
    items: HashMap<u32, Item>,
    next_ino: u32,
}

/// Extent tree blocks to write: (block number, bytes without the checksum).
type TreeBlocks = Vec<(u64, Vec<u8>)>;

/// The 60-byte `i_block` for `extents` (logical, physical, count), and the tree blocks
/// (block number, bytes without checksum) when more than four extents need an index.
fn extent_tree(
    extents: &[(u64, u64, u64)],
    bs: u64,
    alloc: &mut Allocator,
) -> Result<([u8; 60], TreeBlocks)> {
    let node = |max: usize, depth: u16, entries: &[[u8; 12]], size: usize| {
        let mut b = vec![0u8; size];
        put16(&mut b, 0, 0xF30A);
        put16(&mut b, 2, entries.len() as u16);
        put16(&mut b, 4, max as u16);
        put16(&mut b, 6, depth);
        for (i, e) in entries.iter().enumerate() {
            b[12 + 12 * i..24 + 12 * i].copy_from_slice(e);
        }
        b
    };
    let mut level: Vec<(u64, [u8; 12])> = extents
        .iter()
        .map(|&(logical, physical, count)| {
            let mut e = [0u8; 12];
            put32(&mut e, 0, logical as u32);
            put16(&mut e, 4, count as u16);
            put16(&mut e, 6, (physical >> 32) as u16);
            put32(&mut e, 8, physical as u32);
            (logical, e)
        })
        .collect();
    let per_block = ((bs - 12) / 12) as usize;
    let mut blocks = Vec::new();
    let mut depth = 0u16;
    while level.len() > 4 {
        let mut upper = Vec::new();
        for chunk in level.chunks(per_block) {
            let nr = alloc.one()?;
            let entries: Vec<[u8; 12]> = chunk.iter().map(|c| c.1).collect();
            blocks.push((nr, node(per_block, depth, &entries, bs as usize)));
            let mut idx = [0u8; 12];
            put32(&mut idx, 0, chunk[0].0 as u32);
            put32(&mut idx, 4, nr as u32);
            put16(&mut idx, 8, (nr >> 32) as u16);
            upper.push((chunk[0].0, idx));
        }
        level = upper;
        depth += 1;
    }
    let entries: Vec<[u8; 12]> = level.iter().map(|c| c.1).collect();
    let root = node(4, depth, &entries, 60);
    let mut i_block = [0u8; 60];
    i_block.copy_from_slice(&root);
    Ok((i_block, blocks))
}

/// Directory blocks for `entries` (with `.` and `..` first), each ending in the checksum tail.
fn dir_blocks(entries: &[(Vec<u8>, u32, FileKind)], bs: usize, seed: u32) -> Vec<Vec<u8>> {
    let usable = bs - 12;
    let mut blocks = Vec::new();
    let mut b = vec![0u8; bs];
    let mut at = 0usize;
    let mut last = 0usize;
    for (name, ino, kind) in entries {
        let len = (8 + name.len()).next_multiple_of(4);
        if at + len > usable {
            let rec = (usable - last) as u16;
            put16(&mut b, last + 4, rec);
            csum::set_dir_tail(seed, &mut b);
            blocks.push(std::mem::replace(&mut b, vec![0u8; bs]));
            at = 0;
        }
        put32(&mut b, at, *ino);
        put16(&mut b, at + 4, len as u16);
        b[at + 6] = name.len() as u8;
        b[at + 7] = file_type(*kind);
        b[at + 8..at + 8 + name.len()].copy_from_slice(name);
        last = at;
        at += len;
    }
    let rec = (usable - last) as u16;
    put16(&mut b, last + 4, rec);
    csum::set_dir_tail(seed, &mut b);
    blocks.push(b);
    blocks
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
fn place_ranges(ranges: &[(u64, u64)], alloc: &mut Allocator) -> Result<Vec<(u64, u64, u64)>> {
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

/// Formats `dev` as ext4 and copies the tree of `source` into it.
pub fn write_ext4(
    dev: Arc<dyn BlockDevice>,
    source: &dyn Filesystem,
    opts: &Ext4Options,
) -> Result<Ext4Report> {
    let mut report = Ext4Report::default();
    let from_ext4 = source.flags_are_linux_inode_flags();
    let Plan {
        mut items,
        next_ino,
    } = plan::plan(source, &mut report, from_ext4)?;
    if let Some(c) = &opts.counters {
        c.plan(items.len() as u64);
    }
    let bs = opts.block_size;
    let geo = Geometry::new(
        bs,
        dev.size() / bs,
        opts.inode_size,
        u64::from(next_ino) + opts.min_inodes,
        opts.bytes_per_inode,
    )?;
    if u64::from(next_ino) > geo.inodes() {
        return Err(FsError::Unsupported(format!(
            "{} files need more inodes than fit: give a larger size",
            next_ino
        )));
    }
    let mut uuid = opts.uuid.unwrap_or_default();
    if opts.uuid.is_none() {
        getrandom::fill(&mut uuid)
            .map_err(|e| FsError::Unsupported(format!("no random source: {e}")))?;
        uuid[6] = (uuid[6] & 0x0F) | 0x40;
        uuid[8] = (uuid[8] & 0x3F) | 0x80;
    }
    let seed = csum::fs_seed(&uuid);
    let mut hash_seed = opts.hash_seed.unwrap_or_default();
    if opts.hash_seed.is_none() {
        getrandom::fill(&mut hash_seed)
            .map_err(|e| FsError::Unsupported(format!("no random source: {e}")))?;
    }
    let seed_words: [u32; 4] = std::array::from_fn(|i| {
        u32::from_le_bytes([
            hash_seed[4 * i],
            hash_seed[4 * i + 1],
            hash_seed[4 * i + 2],
            hash_seed[4 * i + 3],
        ])
    });
    let mut indexed_dirs = std::collections::HashSet::new();
    let mut alloc = Allocator::new(geo.metadata_bitmap());

    // The journal first, contiguous.
    let journal_blocks = opts
        .journal_blocks
        .unwrap_or_else(|| default_journal_blocks(geo.blocks * bs / 4096) * 4096 / bs);
    let journal_extents = if journal_blocks > 0 {
        place_ranges(&[(0, journal_blocks)], &mut alloc)?
    } else {
        Vec::new()
    };

    // Directories breadth first, each followed by its files.
    let area = (geo.inode_size - 160) as usize;
    let mut dir_data: HashMap<u32, Vec<Vec<u8>>> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([ROOT_INO]);
    let mut placed = std::collections::HashSet::new();
    let mut order = Vec::new();
    while let Some(d) = queue.pop_front() {
        let item = items.get(&d).expect("directories are planned");
        let mut entries = vec![
            (b".".to_vec(), d, FileKind::Dir),
            (b"..".to_vec(), item.parent, FileKind::Dir),
        ];
        entries.extend(item.entries.iter().cloned());
        let dseed = csum::inode_seed(seed, d, 0);
        let mut blocks = dir_blocks(&entries, bs as usize, dseed);
        if blocks.len() > 1 {
            let typed: Vec<(Vec<u8>, u32, u8)> = entries[2..]
                .iter()
                .map(|(n, i, k)| (n.clone(), *i, file_type(*k)))
                .collect();
            match htree::indexed_dir(d, item.parent, &typed, bs as usize, dseed, seed_words) {
                Some(indexed) => {
                    blocks = indexed;
                    indexed_dirs.insert(d);
                }
                None => report.skipped.push((
                    format!("directory inode {d}"),
                    "too large for a two-level hash index; written unindexed".into(),
                )),
            }
        }
        let n = blocks.len() as u64;
        dir_data.insert(d, blocks);
        let children: Vec<(u32, FileKind)> = item.entries.iter().map(|e| (e.1, e.2)).collect();
        let extents = place_ranges(&[(0, n)], &mut alloc)?;
        let item = items.get_mut(&d).expect("planned");
        item.size = n * bs;
        item.extents = extents;
        order.push(d);
        for (ino, kind) in children {
            if kind == FileKind::Dir {
                queue.push_back(ino);
            } else if placed.insert(ino) {
                let item = items.get_mut(&ino).expect("planned");
                match kind {
                    FileKind::File => {
                        item.size = item.meta.size;
                        let ranges = data_blocks(source, item, bs)?;
                        item.extents = place_ranges(&ranges, &mut alloc)?;
                    }
                    FileKind::Symlink => {
                        item.size = item.target.len() as u64;
                        if item.target.len() >= 60 {
                            item.extents = place_ranges(&[(0, 1)], &mut alloc)?;
                        }
                    }
                    _ => {}
                }
                order.push(ino);
            }
        }
    }
    for d in &indexed_dirs {
        if let Some(item) = items.get_mut(d) {
            item.indexed = true;
        }
    }
    // Extent trees and xattr blocks, after the data.
    let mut i_blocks: HashMap<u32, [u8; 60]> = HashMap::new();
    for &ino in &order {
        let item = items.get_mut(&ino).expect("planned");
        let fast_link = item.kind == FileKind::Symlink && item.target.len() < 60;
        let mut ib = [0u8; 60];
        if fast_link {
            ib[..item.target.len()].copy_from_slice(&item.target);
        } else if matches!(item.kind, FileKind::CharDevice | FileKind::BlockDevice) {
            let (major, minor) = item.meta.device.unwrap_or((0, 0));
            if major < 256 && minor < 256 {
                put32(&mut ib, 0, (major << 8) | minor);
            } else {
                put32(
                    &mut ib,
                    4,
                    (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12),
                );
            }
        } else if matches!(
            item.kind,
            FileKind::File | FileKind::Dir | FileKind::Symlink
        ) {
            let (root, tree) = extent_tree(&item.extents, bs, &mut alloc)?;
            ib = root;
            item.tree = tree;
        }
        i_blocks.insert(ino, ib);
        if !item.attrs.is_empty() {
            let mut probe = vec![0u8; area];
            if !xattr::write_inline(&mut probe, &item.attrs) {
                item.inline_attrs = false;
                match xattr::block(bs as usize, &item.attrs) {
                    Some(b) => item.xattr_block = Some((alloc.one()?, b)),
                    None => {
                        report.skipped.push((
                            format!("inode {ino}"),
                            "extended attributes larger than one block are not written".into(),
                        ));
                        item.attrs.clear();
                    }
                }
            }
        }
    }
    // Nothing has been written yet: everything fits.
    emit::write_all(
        &dev,
        source,
        &geo,
        opts,
        &uuid,
        &hash_seed,
        seed,
        &mut items,
        &order,
        &dir_data,
        &i_blocks,
        &journal_extents,
        alloc,
        &mut report,
    )?;
    Ok(report)
}
