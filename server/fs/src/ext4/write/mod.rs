//! The ext4 writer: formats a block device and fills it from any [`Filesystem`] (a captured
//! volume or a host directory) in one pass — no mkfs, no mount.
//!
//! 1. **Plan** (`plan`): walk the source; give every directory and file an inode number
//!    (root 2, `lost+found` 11, the rest from 12 in walk order; hard links share one), read
//!    metadata, link targets and extended attributes.
//! 2. **Lay out** ([`layout`], `place`): block groups with flex_bg and sparse_super backups,
//!    then an ascending allocator — the journal first, then each directory's blocks (built
//!    here, `dir` and [`htree`]) followed by its files' data, each file contiguous, then
//!    extent tree blocks (`extent`) and xattr blocks ([`xattr`]). Holes in the source stay
//!    holes.
//! 3. **Write** (`emit`, then `tables`): directory, symlink, extent tree and xattr blocks,
//!    file data (all-zero blocks are skipped so the output stays sparse), the journal
//!    superblock, the used part of each inode table, bitmaps, group descriptors and
//!    superblocks — every checksum (metadata_csum, [`csum`]) included.
//!
//! Every structure is written through the field tables of [`super::ondisk`], which the reader
//! uses too.
//!
//! Features: has_journal, ext_attr, dir_index, filetype, extents, 64bit, flex_bg,
//! sparse_super, large_file, huge_file, dir_nlink, extra_isize, metadata_csum, and
//! resize_inode when reserved GDT blocks are asked for (`resize`). A directory that needs
//! more than one block gets a hash index ([`htree`]), hashed signed or unsigned as asked.
//! A source's identity carries over through [`Ext4Options`]: UUID, label, hash seed and hash
//! signedness, inode count, reserved GDT blocks, last mount point, journal size and journal
//! features.

mod badblocks;
pub mod csum;
mod dir;
mod emit;
mod extent;
pub mod htree;
pub mod layout;
mod place;
mod plan;
mod resize;
mod tables;
pub mod xattr;

use std::collections::HashMap;
use std::sync::Arc;

use super::super::{FileKind, Filesystem, FsError, Metadata, NodeId, Result, Timestamp};
use super::ondisk::inode;
use diskferry_blockdev::BlockDevice;
use layout::Geometry;
use xattr::Attr;

const ROOT_INO: u32 = 2;
const JOURNAL_INO: u32 = 8;
const LOST_FOUND_INO: u32 = 11;
const FIRST_INO: u32 = 11;
/// The longest initialized extent.
const MAX_EXTENT: u64 = super::ondisk::extent::MAX_INIT_LEN as u64;
/// Inode flags carried over from an ext4 source.
const COPIED_FLAGS: u32 = inode::SECRM_FL
    | inode::UNRM_FL
    | inode::SYNC_FL
    | inode::IMMUTABLE_FL
    | inode::APPEND_FL
    | inode::NODUMP_FL
    | inode::NOATIME_FL
    | inode::DIRSYNC_FL
    | inode::TOPDIR_FL;
/// The extra inode fields written (`i_extra_isize`): up to and including the creation time.
const EXTRA_ISIZE: u16 = 32;
/// Where extended attributes stored in the inode begin.
const INLINE_XATTRS_AT: usize = inode::GOOD_OLD_SIZE + EXTRA_ISIZE as usize;

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
    /// At least this many inodes in all (more when the tree needs more).
    pub min_inodes: u64,
    /// This many inodes in all (a source's count) — more when the groups round it up; on a
    /// device smaller than `inodes * bytes_per_inode`, as many as that density gives (and
    /// fit), never fewer than the tree needs.
    pub inodes: Option<u64>,
    /// Directory names hash as signed chars (`signed_directory_hash`), else as unsigned.
    pub signed_hash: bool,
    /// Blocks reserved after each group descriptor table for online growth (with a resize
    /// inode); 0 for none.
    pub reserved_gdt_blocks: u64,
    /// The superblock's "last mounted on" (`s_last_mounted`).
    pub last_mounted: Option<[u8; 64]>,
    /// Journal superblock features.
    pub journal_features: JournalFeatures,
    pub bytes_per_inode: u64,
    /// Blocks reserved for root, in percent.
    pub reserved_percent: u64,
    /// Kept up to date with entries planned and written, when given.
    pub counters: Option<Arc<super::super::WriteCounters>>,
    /// Put each file's data where the source keeps it when those blocks are free (and no
    /// `placement_hint` says otherwise): deploying a capture keeps its layout, so deploys of
    /// successive captures differ only where files changed.
    pub keep_source_layout: bool,
    /// Write no file data: record where each file's data goes (`Ext4Report::data_map`) and
    /// leave those blocks unwritten — the metadata of a skeleton disk, whose data blocks are
    /// read from the source's files when asked for.
    pub map_file_data: bool,
    /// Blocks (first, count) the filesystem must never use or write: listed in its bad-block
    /// inode, with the metadata placed around them (a live deploy's range holds blocks of
    /// the running system's other files). No resize inode is made with them, and superblock
    /// backups that fall on them are not written.
    pub bad_blocks: Vec<(u64, u64)>,
}

pub use crate::MappedData;

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
            inodes: None,
            signed_hash: false,
            reserved_gdt_blocks: 0,
            last_mounted: None,
            journal_features: JournalFeatures::default(),
            bytes_per_inode: 16384,
            reserved_percent: 5,
            counters: None,
            keep_source_layout: false,
            map_file_data: false,
            bad_blocks: Vec::new(),
        }
    }
}

/// Journal superblock features to write (jbd2 flags): `compat` may hold the old commit
/// CRC32, `incompat` revoke records, 64-bit block numbers and checksums v2 or v3; others
/// are dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalFeatures {
    pub compat: u32,
    pub incompat: u32,
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
    /// With `map_file_data`: every file's data pieces, by volume offset.
    pub data_map: Vec<MappedData>,
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
    /// the xattr block, the i_block area and a directory's blocks.
    extents: Vec<Extent>,
    tree: TreeBlocks,
    xattr_block: Option<(u64, Vec<u8>)>,
    inline_attrs: bool,
    i_block: [u8; inode::I_BLOCK_LEN],
    dir_blocks: Vec<Vec<u8>>,
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
            i_block: [0; inode::I_BLOCK_LEN],
            dir_blocks: Vec::new(),
            indexed: false,
            size: 0,
        }
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

/// A run of a file's blocks: (first logical block, first physical block, count).
type Extent = (u64, u64, u64);

/// Extent tree blocks to write: (block number, bytes without the checksum).
type TreeBlocks = Vec<(u64, Vec<u8>)>;

/// The volume's identity: its UUID, the directory hash seed and signedness, and the checksum
/// seed derived from the UUID.
struct Identity {
    uuid: [u8; 16],
    hash_seed: [u8; 16],
    signed_hash: bool,
    csum_seed: u32,
}

impl Identity {
    /// The options' UUID and hash seed, random ones where they give none.
    fn new(opts: &Ext4Options) -> Result<Identity> {
        let random = |b: &mut [u8]| {
            getrandom::fill(b).map_err(|e| FsError::Unsupported(format!("no random source: {e}")))
        };
        let uuid = match opts.uuid {
            Some(u) => u,
            None => {
                let mut u = [0u8; 16];
                random(&mut u)?;
                u[6] = (u[6] & 0x0F) | 0x40; // version 4
                u[8] = (u[8] & 0x3F) | 0x80; // RFC 4122 variant
                u
            }
        };
        let hash_seed = match opts.hash_seed {
            Some(h) => h,
            None => {
                let mut h = [0u8; 16];
                random(&mut h)?;
                h
            }
        };
        Ok(Identity {
            csum_seed: csum::fs_seed(&uuid),
            uuid,
            hash_seed,
            signed_hash: opts.signed_hash,
        })
    }

    /// How the directory hash takes the seed: four words, and the signedness.
    fn hash_key(&self) -> htree::HashKey {
        htree::HashKey {
            seed: std::array::from_fn(|i| {
                let w = &self.hash_seed[4 * i..4 * i + 4];
                u32::from_le_bytes([w[0], w[1], w[2], w[3]])
            }),
            signed: self.signed_hash,
        }
    }
}

/// What every step of writing reads: the source tree, the geometry, the options and the
/// identity.
struct Job<'a> {
    source: &'a dyn Filesystem,
    geo: Geometry,
    opts: &'a Ext4Options,
    id: Identity,
}

/// The geometry for `dev` and the options, refused when it has too few inodes for the
/// `next_ino - 1` inodes the tree needs. An inode count asked for (`opts.inodes`) that does
/// not fit becomes the most that do.
fn geometry(dev: &dyn BlockDevice, opts: &Ext4Options, next_ino: u32) -> Result<Geometry> {
    let bs = opts.block_size;
    let with = |inodes: u64| {
        Geometry::new(
            bs,
            dev.size() / bs,
            opts.inode_size,
            inodes,
            opts.bytes_per_inode,
        )?
        .with_reserved_gdt(if opts.bad_blocks.is_empty() {
            opts.reserved_gdt_blocks
        } else {
            0
        })?
        .with_bad_blocks(&opts.bad_blocks)
    };
    let needed = u64::from(next_ino).max(opts.min_inodes);
    let by_size = dev.size() / opts.bytes_per_inode.max(1024);
    let geo = match opts.inodes.map(|w| w.min(by_size)) {
        Some(wanted) if wanted > needed => most_inodes(needed, wanted, with)?,
        _ => with(needed)?,
    };
    if u64::from(next_ino) > geo.inodes() {
        return Err(FsError::Unsupported(format!(
            "{next_ino} files need more inodes than fit: give a larger size"
        )));
    }
    Ok(geo)
}

/// The geometry with `wanted` inodes, or with the most between `needed` and `wanted` that fit.
fn most_inodes(
    needed: u64,
    wanted: u64,
    with: impl Fn(u64) -> Result<Geometry>,
) -> Result<Geometry> {
    if let Ok(geo) = with(wanted) {
        return Ok(geo);
    }
    let (mut fits, mut too_many) = (with(needed)?, wanted);
    let mut low = needed;
    while too_many - low > 1 {
        let mid = low + (too_many - low) / 2;
        match with(mid) {
            Ok(geo) => (low, fits) = (mid, geo),
            Err(_) => too_many = mid,
        }
    }
    Ok(fits)
}

/// Formats `dev` as ext4 and copies the tree of `source` into it.
pub fn write_ext4(
    dev: Arc<dyn BlockDevice>,
    source: &dyn Filesystem,
    opts: &Ext4Options,
) -> Result<Ext4Report> {
    let mut report = Ext4Report::default();
    let plan = plan::plan(source, &mut report, source.flags_are_linux_inode_flags())?;
    if let Some(c) = &opts.counters {
        c.plan(plan.items.len() as u64);
    }
    let job = Job {
        source,
        geo: geometry(&*dev, opts, plan.next_ino)?,
        opts,
        id: Identity::new(opts)?,
    };
    let placed = place::place(&job, plan.items, &mut report)?;
    // Nothing has been written yet: everything fits.
    emit::write_all(&*dev, &job, placed, &mut report)?;
    Ok(report)
}
