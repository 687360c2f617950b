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
pub mod htree;
pub mod layout;
pub mod xattr;

use std::collections::HashMap;
use std::sync::Arc;

use super::super::{FileKind, Filesystem, FsError, Metadata, NodeId, Result, Timestamp};
use crate::blockdev::BlockDevice;
use layout::{Allocator, Geometry};
use xattr::Attr;

const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const LOST_FOUND_INO: u32 = 11;
const FIRST_INO: u32 = 11;
const EXTENTS_FL: u32 = 0x0008_0000;
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

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: d.as_secs() as i64,
        nanos: d.subsec_nanos(),
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// The tree to write, with inode numbers.
struct Plan {
    items: HashMap<u32, Item>,
    next_ino: u32,
}

fn plan(source: &dyn Filesystem, report: &mut Ext4Report, from_ext4: bool) -> Result<Plan> {
    let root_meta = source.metadata(source.root())?;
    let mut items: HashMap<u32, Item> = HashMap::new();
    let mut root = Item::new(source.root(), root_meta, ROOT_INO);
    root.attrs = attrs_of(source, source.root(), "/", report);
    items.insert(ROOT_INO, root);
    let mut dirs: HashMap<String, u32> = HashMap::from([(String::new(), ROOT_INO)]);
    let mut seen: HashMap<NodeId, u32> = HashMap::new();
    let mut next_ino = FIRST_INO + 1;
    let mut walk_errors = Vec::new();
    super::super::tree::walk(
        source,
        source.root(),
        &mut |path, e| {
            let parent_path = path.rsplit_once('/').map_or("", |(p, _)| p);
            let Some(&parent) = dirs.get(parent_path) else {
                return Ok(()); // its directory was skipped
            };
            if e.name.len() > 255 {
                report
                    .skipped
                    .push((path.into(), "name longer than 255 bytes".into()));
                return Ok(());
            }
            if e.kind != FileKind::Dir {
                if let Some(&ino) = seen.get(&e.node) {
                    if let Some(item) = items.get_mut(&ino) {
                        item.links += 1;
                    }
                    if let Some(p) = items.get_mut(&parent) {
                        p.entries.push((e.name.clone(), ino, e.kind));
                    }
                    return Ok(());
                }
            }
            let meta = match source.metadata(e.node) {
                Ok(m) => m,
                Err(err) => {
                    report.skipped.push((path.into(), err.to_string()));
                    return Ok(());
                }
            };
            let ino = if e.kind == FileKind::Dir && parent == ROOT_INO && e.name == b"lost+found" {
                LOST_FOUND_INO
            } else {
                next_ino += 1;
                next_ino - 1
            };
            let mut item = Item::new(e.node, meta, parent);
            item.kind = e.kind;
            if !from_ext4 {
                item.meta.flags = 0;
            }
            match e.kind {
                FileKind::Symlink => match source.read_link(e.node) {
                    Ok(t) if !t.is_empty() && t.len() < 4096 => item.target = t,
                    Ok(t) => {
                        report
                            .skipped
                            .push((path.into(), format!("symlink target of {} bytes", t.len())));
                        return Ok(());
                    }
                    Err(err) => {
                        report.skipped.push((path.into(), err.to_string()));
                        return Ok(());
                    }
                },
                FileKind::Dir => {
                    dirs.insert(path.to_string(), ino);
                }
                _ => {
                    seen.insert(e.node, ino);
                }
            }
            item.attrs = attrs_of(source, e.node, path, report);
            items.insert(ino, item);
            if let Some(p) = items.get_mut(&parent) {
                p.entries.push((e.name.clone(), ino, e.kind));
            }
            Ok(())
        },
        &mut |path, err| walk_errors.push((path.to_string(), err.to_string())),
    )?;
    report.skipped.extend(walk_errors);
    if let std::collections::hash_map::Entry::Vacant(slot) = items.entry(LOST_FOUND_INO) {
        let t = now();
        let meta = Metadata {
            node: 0,
            kind: FileKind::Dir,
            size: 0,
            mode: 0o700,
            uid: 0,
            gid: 0,
            links: 2,
            atime: Some(t),
            mtime: Some(t),
            ctime: Some(t),
            crtime: Some(t),
            device: None,
            flags: 0,
            allocated: 0,
        };
        slot.insert(Item::new(0, meta, ROOT_INO));
        if let Some(root) = items.get_mut(&ROOT_INO) {
            root.entries
                .push((b"lost+found".to_vec(), LOST_FOUND_INO, FileKind::Dir));
        }
    }
    // Directory link counts: itself, its parent's entry, and each subdirectory's "..".
    let subdirs: Vec<(u32, u32)> = items
        .iter()
        .filter(|(_, i)| i.kind == FileKind::Dir)
        .map(|(&ino, i)| {
            let n = i.entries.iter().filter(|e| e.2 == FileKind::Dir).count() as u32;
            (ino, n)
        })
        .collect();
    for (ino, n) in subdirs {
        if let Some(i) = items.get_mut(&ino) {
            let links = 2 + n;
            i.links = if links >= 65000 { 1 } else { links };
        }
    }
    Ok(Plan { items, next_ino })
}

fn attrs_of(
    source: &dyn Filesystem,
    node: NodeId,
    path: &str,
    report: &mut Ext4Report,
) -> Vec<Attr> {
    match source.xattrs(node) {
        Ok(list) => list
            .iter()
            .filter_map(|(name, value)| match xattr::split(name, value) {
                Ok(a) => Some(a),
                Err(why) => {
                    report.skipped.push((path.to_string(), why));
                    None
                }
            })
            .collect(),
        Err(e) => {
            report
                .skipped
                .push((path.to_string(), format!("extended attributes: {e}")));
            Vec::new()
        }
    }
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

/// An inode's bytes (checksum not yet set).
fn inode_bytes(
    geo: &Geometry,
    item: &Item,
    i_block: &[u8; 60],
    blocks_512: u64,
    flags: u32,
) -> Vec<u8> {
    let m = &item.meta;
    let mut b = vec![0u8; geo.inode_size as usize];
    put16(&mut b, 0, mode_bits(item.kind) | (m.mode & 0o7777) as u16);
    put16(&mut b, 2, m.uid as u16);
    put32(&mut b, 4, item.size as u32);
    let time = |b: &mut [u8], base: usize, extra: usize, t: Option<Timestamp>| {
        let t = t.unwrap_or(Timestamp { secs: 0, nanos: 0 });
        put32(b, base, t.secs as i32 as u32);
        let epoch = (((t.secs - i64::from(t.secs as i32)) >> 32) & 3) as u32;
        put32(b, extra, epoch | (t.nanos.min(999_999_999) << 2));
    };
    time(&mut b, 8, 140, m.atime);
    time(&mut b, 12, 132, m.ctime.or(m.mtime));
    time(&mut b, 16, 136, m.mtime);
    time(&mut b, 144, 148, m.crtime.or(m.ctime).or(m.mtime));
    put16(&mut b, 24, m.gid as u16);
    put16(&mut b, 26, item.links.min(65535) as u16);
    put32(&mut b, 28, blocks_512 as u32);
    put32(&mut b, 32, flags);
    b[40..100].copy_from_slice(i_block);
    if let Some((nr, _)) = &item.xattr_block {
        put32(&mut b, 104, *nr as u32);
        put16(&mut b, 118, (*nr >> 32) as u16);
    }
    put32(&mut b, 108, (item.size >> 32) as u32);
    put16(&mut b, 116, (blocks_512 >> 32) as u16);
    put16(&mut b, 120, (m.uid >> 16) as u16);
    put16(&mut b, 122, (m.gid >> 16) as u16);
    put16(&mut b, 128, 32); // i_extra_isize
    if item.inline_attrs && !item.attrs.is_empty() {
        xattr::write_inline(&mut b[160..], &item.attrs);
    }
    b
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
    } = plan(source, &mut report, from_ext4)?;
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
    write_all(
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

/// One run of file data: where it is on the source device, how long, where it goes.
struct Run {
    src: u64,
    len: u64,
    dst: u64,
}

/// Copies every file's data. With a source device, the runs of all files are sorted by their
/// place on it and read in that order with many requests in flight (a remote source streams);
/// without one (a host tree), file by file through `read_at`.
fn copy_file_data(
    dev: &dyn BlockDevice,
    source: &dyn Filesystem,
    items: &HashMap<u32, Item>,
    order: &[u32],
    bs: u64,
    buf: &mut [u8],
) -> Result<()> {
    let files: Vec<&Item> = order
        .iter()
        .map(|ino| &items[ino])
        .filter(|i| i.kind == FileKind::File && !i.extents.is_empty())
        .collect();
    let runs = source.device().and_then(|src_dev| {
        let mut runs = Vec::new();
        for item in &files {
            let extents = source.extents(item.src).ok()?;
            for e in extents.iter().filter(|e| !e.unwritten) {
                // Our extents map the same file offsets (block-rounded): split the source
                // extent wherever our allocation is not contiguous.
                let mut off = e.file_offset;
                let end = e.file_offset + e.len;
                while off < end {
                    let block = off / bs;
                    let (l, p, n) = *item
                        .extents
                        .iter()
                        .find(|x| block >= x.0 && block < x.0 + x.2)?;
                    let piece_end = end.min((l + n) * bs);
                    runs.push(Run {
                        src: e.disk_offset + (off - e.file_offset),
                        len: piece_end - off,
                        dst: p * bs + (off - l * bs),
                    });
                    off = piece_end;
                }
            }
        }
        runs.sort_unstable_by_key(|r| r.src);
        Some((src_dev, runs))
    });
    if let Some((src_dev, runs)) = runs {
        let ranges: Vec<std::ops::Range<u64>> = runs.iter().map(|r| r.src..r.src + r.len).collect();
        return src_dev
            .read_ranges(&ranges, &mut |off, data| {
                let i = runs.partition_point(|r| r.src + r.len <= off);
                let r = &runs[i];
                write_sparse(dev, &data, r.dst + (off - r.src)).map_err(|e| match e {
                    FsError::Io(e) => e,
                    other => crate::blockdev::BlockError::Format(other.to_string()),
                })
            })
            .map_err(FsError::from);
    }
    for item in files {
        for &(logical, physical, count) in &item.extents {
            let start = logical * bs;
            let end = ((logical + count) * bs).min(item.size);
            let mut pos = start;
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                let got = source.read_at(item.src, pos, &mut buf[..n])?;
                if got < n {
                    buf[got..n].fill(0);
                }
                write_sparse(dev, &buf[..n], (physical * bs) + (pos - start))?;
                pos += n as u64;
            }
        }
    }
    Ok(())
}

/// Writes `data` at byte `at`, leaving out 4 KiB pieces that are all zeros (one write per run
/// of non-zero pieces).
fn write_sparse(dev: &dyn BlockDevice, data: &[u8], at: u64) -> Result<()> {
    for run in crate::pipeline::nonzero_runs(data) {
        dev.write_at(&data[run.clone()], at + run.start as u64)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    dev: &Arc<dyn BlockDevice>,
    source: &dyn Filesystem,
    geo: &Geometry,
    opts: &Ext4Options,
    uuid: &[u8; 16],
    hash_seed: &[u8; 16],
    seed: u32,
    items: &mut HashMap<u32, Item>,
    order: &[u32],
    dir_data: &HashMap<u32, Vec<Vec<u8>>>,
    i_blocks: &HashMap<u32, [u8; 60]>,
    journal_extents: &[(u64, u64, u64)],
    alloc: Allocator,
    report: &mut Ext4Report,
) -> Result<()> {
    let bs = geo.block_size;
    let mut buf = vec![0u8; 1 << 20];
    let mut inodes: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut dirs_per_group = vec![0u64; geo.groups as usize];
    for &ino in order {
        let item = items.get(&ino).expect("planned");
        // Contents (file data is copied afterwards, in the source's disk order).
        match item.kind {
            FileKind::File => {
                report.files += 1;
                report.bytes += item.size;
            }
            FileKind::Dir => {
                for (i, block) in dir_data[&ino].iter().enumerate() {
                    let phys = locate(&item.extents, i as u64).ok_or_else(|| {
                        FsError::Unsupported(format!("directory {ino} lost a block"))
                    })?;
                    dev.write_at(block, phys * bs)?;
                }
                if ino != LOST_FOUND_INO || item.src != 0 {
                    report.dirs += 1;
                }
                dirs_per_group[((ino - 1) as u64 / geo.inodes_per_group) as usize] += 1;
            }
            FileKind::Symlink => {
                if let Some(&(_, physical, _)) = item.extents.first() {
                    let mut block = vec![0u8; bs as usize];
                    block[..item.target.len()].copy_from_slice(&item.target);
                    dev.write_at(&block, physical * bs)?;
                }
                report.symlinks += 1;
            }
            _ => report.special += 1,
        }
        let seed_i = csum::inode_seed(seed, ino, 0);
        for (nr, block) in &item.tree {
            let mut block = block.clone();
            csum::set_extent_tail(seed_i, &mut block);
            dev.write_at(&block, nr * bs)?;
        }
        if let Some((nr, block)) = &item.xattr_block {
            let mut block = block.clone();
            csum::set_xattr_block(seed, *nr, &mut block);
            dev.write_at(&block, nr * bs)?;
        }
        let data_blocks: u64 = item.extents.iter().map(|e| e.2).sum::<u64>()
            + item.tree.len() as u64
            + u64::from(item.xattr_block.is_some());
        let mut flags = item.meta.flags & COPIED_FLAGS;
        if matches!(item.kind, FileKind::File | FileKind::Dir)
            || (item.kind == FileKind::Symlink && item.target.len() >= 60)
        {
            flags |= EXTENTS_FL;
        }
        if item.indexed {
            flags |= INDEX_FL;
        } else {
            flags &= !INDEX_FL;
        }
        let mut raw = inode_bytes(geo, item, &i_blocks[&ino], data_blocks * bs / 512, flags);
        csum::set_inode(seed, ino, &mut raw);
        inodes.insert(ino, raw);
        if let Some(c) = &opts.counters {
            c.wrote(1);
        }
    }
    copy_file_data(&**dev, source, items, order, bs, &mut buf)?;
    // The journal inode and its superblock.
    let mut journal_ib = [0u8; 60];
    if !journal_extents.is_empty() {
        let mut dummy = Allocator::new(Vec::new());
        let (ib, tree) = extent_tree(journal_extents, bs, &mut dummy)?;
        if !tree.is_empty() {
            return Err(FsError::Unsupported("the journal is too fragmented".into()));
        }
        journal_ib = ib;
        let jblocks: u64 = journal_extents.iter().map(|e| e.2).sum();
        let t = now();
        let meta = Metadata {
            node: 0,
            kind: FileKind::File,
            size: jblocks * bs,
            mode: 0o600,
            uid: 0,
            gid: 0,
            links: 1,
            atime: Some(t),
            mtime: Some(t),
            ctime: Some(t),
            crtime: Some(t),
            device: None,
            flags: 0,
            allocated: 0,
        };
        let mut j = Item::new(0, meta, 0);
        j.size = jblocks * bs;
        let mut raw = inode_bytes(geo, &j, &ib, jblocks * bs / 512, EXTENTS_FL);
        csum::set_inode(seed, JOURNAL_INO, &mut raw);
        inodes.insert(JOURNAL_INO, raw);
        let mut jsb = vec![0u8; bs as usize];
        let be = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        be(&mut jsb, 0, 0xC03B_3998);
        be(&mut jsb, 4, 4); // superblock v2
        be(&mut jsb, 0xC, bs as u32);
        be(&mut jsb, 0x10, jblocks as u32);
        be(&mut jsb, 0x14, 1); // first log block
        be(&mut jsb, 0x18, 1); // sequence
        jsb[0x30..0x40].copy_from_slice(uuid);
        be(&mut jsb, 0x40, 1); // users
        dev.write_at(&jsb, journal_extents[0].1 * bs)?;
    }
    // Reserved inodes other than the root, the journal and lost+found: empty but checksummed.
    for ino in 1..FIRST_INO {
        if inodes.contains_key(&ino) {
            continue;
        }
        let mut raw = vec![0u8; geo.inode_size as usize];
        put16(&mut raw, 128, 32);
        csum::set_inode(seed, ino, &mut raw);
        inodes.insert(ino, raw);
    }
    // Inode tables: the used part of each group's.
    let ipg = geo.inodes_per_group;
    let mut highest = vec![0u64; geo.groups as usize];
    for &ino in inodes.keys() {
        let g = (u64::from(ino) - 1) / ipg;
        let idx = (u64::from(ino) - 1) % ipg;
        highest[g as usize] = highest[g as usize].max(idx + 1);
    }
    for g in 0..geo.groups {
        let used = highest[g as usize];
        if used == 0 {
            continue;
        }
        let mut table = vec![0u8; (used * geo.inode_size).next_multiple_of(bs) as usize];
        for idx in 0..used {
            let ino = (g * ipg + idx + 1) as u32;
            if let Some(raw) = inodes.get(&ino) {
                let at = (idx * geo.inode_size) as usize;
                table[at..at + raw.len()].copy_from_slice(raw);
            }
        }
        write_sparse(&**dev, &table, geo.inode_table[g as usize] * bs)?;
    }
    // Bitmaps and group descriptors.
    let used_blocks = alloc.into_used();
    let mut gdt = vec![0u8; (geo.gdt_blocks * bs) as usize];
    let (mut free_blocks_total, mut free_inodes_total) = (0u64, 0u64);
    for g in 0..geo.groups {
        let start = geo.group_start(g);
        let len = geo.group_len(g);
        let mut bb = vec![0xFFu8; bs as usize];
        let mut free_b = 0u64;
        for i in 0..geo.blocks_per_group {
            let used = i >= len || used_blocks[(start + i) as usize];
            if !used {
                bb[(i / 8) as usize] &= !(1 << (i % 8));
                free_b += 1;
            }
        }
        let mut ib = vec![0xFFu8; bs as usize];
        let mut free_i = 0u64;
        for idx in 0..ipg {
            let ino = (g * ipg + idx + 1) as u32;
            if !inodes.contains_key(&ino) {
                ib[(idx / 8) as usize] &= !(1 << (idx % 8));
                free_i += 1;
            }
        }
        free_blocks_total += free_b;
        free_inodes_total += free_i;
        let bcsum = csum::crc32c_le(seed, &bb[..(geo.blocks_per_group / 8) as usize]);
        let icsum = csum::crc32c_le(seed, &ib[..(ipg / 8) as usize]);
        dev.write_at(&bb, geo.block_bitmap[g as usize] * bs)?;
        dev.write_at(&ib, geo.inode_bitmap[g as usize] * bs)?;
        let d = &mut gdt[(g * geo.desc_size) as usize..((g + 1) * geo.desc_size) as usize];
        let split = |d: &mut [u8], lo: usize, hi: usize, v: u64| {
            put32(d, lo, v as u32);
            put32(d, hi, (v >> 32) as u32);
        };
        split(d, 0x00, 0x20, geo.block_bitmap[g as usize]);
        split(d, 0x04, 0x24, geo.inode_bitmap[g as usize]);
        split(d, 0x08, 0x28, geo.inode_table[g as usize]);
        put16(d, 0x0C, free_b as u16);
        put16(d, 0x2C, (free_b >> 16) as u16);
        put16(d, 0x0E, free_i as u16);
        put16(d, 0x2E, (free_i >> 16) as u16);
        let dirs = dirs_per_group[g as usize];
        put16(d, 0x10, dirs as u16);
        put16(d, 0x30, (dirs >> 16) as u16);
        put16(d, 0x12, 0x4); // inode table zeroed (it reads as zeros)
        put16(d, 0x18, bcsum as u16);
        put16(d, 0x38, (bcsum >> 16) as u16);
        put16(d, 0x1A, icsum as u16);
        put16(d, 0x3A, (icsum >> 16) as u16);
        let unused = ipg - highest[g as usize];
        put16(d, 0x1C, unused as u16);
        put16(d, 0x32, (unused >> 16) as u16);
        csum::set_group_desc(seed, g as u32, d);
    }
    // Superblock and its backups.
    let t = now();
    let mut sb = vec![0u8; 1024];
    let s32 = |b: &mut [u8], at: usize, v: u64| put32(b, at, v as u32);
    s32(&mut sb, 0x00, geo.inodes());
    s32(&mut sb, 0x04, geo.blocks);
    s32(&mut sb, 0x150, geo.blocks >> 32);
    let reserved = geo.blocks * opts.reserved_percent / 100;
    s32(&mut sb, 0x08, reserved);
    s32(&mut sb, 0x154, reserved >> 32);
    s32(&mut sb, 0x0C, free_blocks_total);
    s32(&mut sb, 0x158, free_blocks_total >> 32);
    s32(&mut sb, 0x10, free_inodes_total);
    s32(&mut sb, 0x14, geo.first_data_block);
    let log = u64::from((bs / 1024).trailing_zeros());
    s32(&mut sb, 0x18, log);
    s32(&mut sb, 0x1C, log);
    s32(&mut sb, 0x20, geo.blocks_per_group);
    s32(&mut sb, 0x24, geo.blocks_per_group);
    s32(&mut sb, 0x28, ipg);
    s32(&mut sb, 0x30, t.secs as u64);
    put16(&mut sb, 0x36, 0xFFFF); // max mount count: unchecked
    put16(&mut sb, 0x38, 0xEF53);
    put16(&mut sb, 0x3A, 1); // clean
    put16(&mut sb, 0x3C, 1); // errors: continue
    s32(&mut sb, 0x40, t.secs as u64);
    s32(&mut sb, 0x4C, 1); // dynamic revision
    s32(&mut sb, 0x54, u64::from(FIRST_INO));
    put16(&mut sb, 0x58, geo.inode_size as u16);
    let has_journal = !journal_extents.is_empty();
    let compat = 0x8 | 0x20 | if has_journal { 0x4 } else { 0 }; // ext_attr, dir_index, has_journal
    s32(&mut sb, 0x5C, compat);
    s32(&mut sb, 0x60, 0x2 | 0x40 | 0x80 | 0x200); // filetype, extents, 64bit, flex_bg
    s32(&mut sb, 0x64, 0x1 | 0x2 | 0x8 | 0x20 | 0x40 | 0x400); // sparse_super, large_file, huge_file, dir_nlink, extra_isize, metadata_csum
    sb[0x68..0x78].copy_from_slice(uuid);
    if let Some(label) = &opts.label {
        let l = label.as_bytes();
        sb[0x78..0x78 + l.len().min(16)].copy_from_slice(&l[..l.len().min(16)]);
    }
    if has_journal {
        s32(&mut sb, 0xE0, u64::from(JOURNAL_INO));
        sb[0xFD] = 1; // journal backup: the inode's blocks
        sb[0x10C..0x10C + 60].copy_from_slice(&journal_ib);
        let jsize: u64 = journal_extents.iter().map(|e| e.2).sum::<u64>() * bs;
        s32(&mut sb, 0x10C + 15 * 4, jsize >> 32);
        s32(&mut sb, 0x10C + 16 * 4, jsize);
    }
    sb[0xEC..0xFC].copy_from_slice(hash_seed);
    sb[0xFC] = 1; // half_md4
    put16(&mut sb, 0xFE, geo.desc_size as u16);
    s32(&mut sb, 0x100, 0x0C); // default mount options: user_xattr, acl
    s32(&mut sb, 0x108, t.secs as u64);
    put16(&mut sb, 0x15C, 32);
    put16(&mut sb, 0x15E, 32);
    s32(&mut sb, 0x160, 0x2); // unsigned directory hash (what htree.rs computes)
    sb[0x174] = geo.log_groups_per_flex as u8;
    sb[0x175] = 1; // crc32c
    for g in 0..geo.groups {
        if !layout::has_super(g) {
            continue;
        }
        let mut copy = sb.clone();
        put16(&mut copy, 0x5A, g as u16);
        csum::set_superblock(&mut copy);
        let (sb_at, gdt_at) = if g == 0 {
            (1024, (geo.first_data_block + 1) * bs)
        } else {
            (geo.group_start(g) * bs, (geo.group_start(g) + 1) * bs)
        };
        dev.write_at(&copy, sb_at)?;
        dev.write_at(&gdt, gdt_at)?;
    }
    dev.flush()?;
    Ok(())
}

/// The physical block of logical block `n` in `extents`.
fn locate(extents: &[(u64, u64, u64)], n: u64) -> Option<u64> {
    extents
        .iter()
        .find(|e| n >= e.0 && n < e.0 + e.2)
        .map(|e| e.1 + (n - e.0))
}
