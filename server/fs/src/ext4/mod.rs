//! A reader for ext2, ext3 and ext4 of our own: superblock, group descriptors (32- and 64-byte),
//! inodes, extent trees and classic block maps, directories (linear; hashed directories read
//! linearly too), fast and slow symlinks, extended attributes (in the inode and in an xattr
//! block, POSIX ACLs given in the form tools see), and the block allocation map.
//!
//! Why not the `ext4-view` crate: it exposes neither inode numbers, link counts, extended
//! attributes, physical extents nor the block bitmaps, all of which capture needs; the on-disk
//! structures here are also the ones the ext4 writer produces. Refused with a clear message:
//! `meta_bg`, `bigalloc`, inline data, encrypted and compressed files.

mod inode;
pub mod write;

use std::sync::Arc;

use super::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId,
    Result, VolumeInfo,
};
use diskferry_blockdev::BlockDevice;
use inode::{extent_header, le16, le32, parse_xattrs, Inode, RawExtent, XATTR_MAGIC};

const ROOT: u64 = 2;
/// Most directory bytes read for one directory (a directory of millions of entries).
const MAX_DIR_BYTES: u64 = 1 << 30;
/// Most extents gathered for one file.
const MAX_EXTENTS: usize = 1 << 22;

const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const BLOCK_UNINIT: u16 = 0x2;

/// One block group's locations.
#[derive(Debug, Clone, Copy)]
struct Group {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
}

/// An ext2/3/4 filesystem opened for reading.
pub struct Ext4 {
    dev: Arc<dyn BlockDevice>,
    kind: FsKind,
    block_size: u64,
    blocks: u64,
    free_blocks: u64,
    first_data_block: u64,
    blocks_per_group: u64,
    inodes_per_group: u64,
    inodes: u64,
    inode_size: u64,
    ro_compat: u32,
    reserved_gdt: u64,
    desc_size: u64,
    groups: Vec<Group>,
    uuid: [u8; 16],
    label: String,
    hash_seed: [u8; 16],
    journal_blocks: u64,
}

impl Ext4 {
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Ext4> {
        let corrupt = |what: String| FsError::Corrupt("ext4 superblock".into(), what);
        let mut sb = vec![0u8; 1024];
        if dev.size() < 2048 {
            return Err(corrupt("the device is too small".into()));
        }
        dev.read_at(&mut sb, 1024)?;
        if le16(&sb, 56) != 0xEF53 {
            return Err(corrupt("no ext2/3/4 magic".into()));
        }
        let kind = super::detect::classify(&{
            let mut b = vec![0u8; 68 * 1024];
            b[1024..2048].copy_from_slice(&sb);
            b
        });
        let log_block = le32(&sb, 24);
        if log_block > 6 {
            return Err(corrupt(format!(
                "block size 2^{} is absurd",
                10 + log_block
            )));
        }
        let block_size = 1024u64 << log_block;
        let (incompat, ro_compat) = (le32(&sb, 96), le32(&sb, 100));
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let hi = |at: usize| {
            if is64 {
                u64::from(le32(&sb, at)) << 32
            } else {
                0
            }
        };
        let blocks = u64::from(le32(&sb, 4)) | hi(0x150);
        let free_blocks = u64::from(le32(&sb, 12)) | hi(0x158);
        let inodes = u64::from(le32(&sb, 0));
        let first_data_block = u64::from(le32(&sb, 20));
        let blocks_per_group = u64::from(le32(&sb, 32));
        let inodes_per_group = u64::from(le32(&sb, 40));
        let rev = le32(&sb, 76);
        let inode_size = if rev == 0 {
            128
        } else {
            u64::from(le16(&sb, 88))
        };
        let desc_size = if is64 { u64::from(le16(&sb, 254)) } else { 32 };
        for (bad, what) in [
            (incompat & INCOMPAT_META_BG != 0, "meta_bg"),
            (ro_compat & RO_COMPAT_BIGALLOC != 0, "bigalloc"),
            (incompat & INCOMPAT_ENCRYPT != 0, "encryption"),
        ] {
            if bad {
                return Err(FsError::Unsupported(format!(
                    "ext4 with the {what} feature cannot be read yet"
                )));
            }
        }
        if blocks == 0
            || blocks.saturating_mul(block_size) > dev.size()
            || blocks_per_group == 0
            || blocks_per_group > 8 * block_size
            || inodes_per_group == 0
            || inodes_per_group > 8 * block_size
            || !(128..=block_size).contains(&inode_size)
            || !inode_size.is_power_of_two()
            || !(32..=1024).contains(&desc_size)
            || free_blocks > blocks
        {
            return Err(corrupt(format!(
                "geometry does not hold together ({blocks} blocks of {block_size} bytes on a {}-byte device, {blocks_per_group} blocks and {inodes_per_group} inodes per group, inode size {inode_size}, descriptor size {desc_size})",
                dev.size()
            )));
        }
        let group_count = (blocks - first_data_block).div_ceil(blocks_per_group);
        if inodes > group_count * inodes_per_group {
            return Err(corrupt(format!(
                "{inodes} inodes do not fit {group_count} groups"
            )));
        }
        let mut gdt = vec![0u8; (group_count * desc_size) as usize];
        dev.read_at(&mut gdt, (first_data_block + 1) * block_size)?;
        let mut groups = Vec::with_capacity(group_count as usize);
        for d in gdt.chunks_exact(desc_size as usize) {
            let hi = |at: usize| {
                if desc_size >= 64 {
                    u64::from(le32(d, at)) << 32
                } else {
                    0
                }
            };
            let g = Group {
                block_bitmap: u64::from(le32(d, 0)) | hi(32),
                inode_bitmap: u64::from(le32(d, 4)) | hi(36),
                inode_table: u64::from(le32(d, 8)) | hi(40),
                flags: le16(d, 18),
            };
            let itable_blocks = (inodes_per_group * inode_size).div_ceil(block_size);
            if g.block_bitmap >= blocks
                || g.inode_bitmap >= blocks
                || g.inode_table.saturating_add(itable_blocks) > blocks
            {
                return Err(FsError::Corrupt(
                    "ext4 group descriptors".into(),
                    format!("group {} points outside the filesystem", groups.len()),
                ));
            }
            groups.push(g);
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&sb[104..120]);
        let label_bytes: Vec<u8> = sb[120..136]
            .iter()
            .copied()
            .take_while(|&b| b != 0)
            .collect();
        Ok(Ext4 {
            dev,
            kind,
            block_size,
            blocks,
            free_blocks,
            first_data_block,
            blocks_per_group,
            inodes_per_group,
            inodes,
            inode_size,
            ro_compat,
            reserved_gdt: u64::from(le16(&sb, 0xCE)),
            desc_size,
            groups,
            uuid,
            label: String::from_utf8_lossy(&label_bytes).into_owned(),
            hash_seed: {
                let mut h = [0u8; 16];
                h.copy_from_slice(&sb[0xEC..0xFC]);
                h
            },
            // The journal's size from the superblock's backup of the journal inode (its i_size).
            journal_blocks: if le32(&sb, 0x5C) & 0x4 != 0 && sb[0xFD] == 1 {
                (u64::from(le32(&sb, 0x10C + 16 * 4))
                    | (u64::from(le32(&sb, 0x10C + 15 * 4)) << 32))
                    / block_size
            } else {
                0
            },
        })
    }

    /// Options that make the writer produce a filesystem with this one's parameters and
    /// identity: block and inode size, UUID, label, directory hash seed, journal size, and at
    /// least as many inodes.
    pub fn format_options(&self) -> write::Ext4Options {
        write::Ext4Options {
            block_size: self.block_size,
            inode_size: self.inode_size.max(256),
            label: Some(self.label.clone()).filter(|l| !l.is_empty()),
            uuid: Some(self.uuid),
            hash_seed: Some(self.hash_seed),
            journal_blocks: Some(self.journal_blocks),
            min_inodes: self.inodes,
            ..write::Ext4Options::default()
        }
    }

    fn corrupt(&self, node: NodeId, what: impl Into<String>) -> FsError {
        FsError::Corrupt(format!("ext4 inode {node}"), what.into())
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>> {
        if block >= self.blocks {
            return Err(FsError::Corrupt(
                "ext4".into(),
                format!("block {block} is beyond the filesystem"),
            ));
        }
        let mut b = vec![0u8; self.block_size as usize];
        self.dev.read_at(&mut b, block * self.block_size)?;
        Ok(b)
    }

    fn inode(&self, node: NodeId) -> Result<Inode> {
        if node == 0 || node > self.inodes {
            return Err(self.corrupt(node, "inode number out of range"));
        }
        let index = node - 1;
        let group = &self.groups[(index / self.inodes_per_group) as usize];
        let at =
            group.inode_table * self.block_size + (index % self.inodes_per_group) * self.inode_size;
        let mut raw = vec![0u8; self.inode_size as usize];
        self.dev.read_at(&mut raw, at)?;
        Inode::parse(raw).map_err(|e| self.corrupt(node, e))
    }

    /// The file's extents in logical order, in blocks.
    fn raw_extents(&self, node: NodeId, ino: &Inode) -> Result<Vec<RawExtent>> {
        if ino.flags & inode::INLINE_DATA_FL != 0 {
            return Err(FsError::Unsupported(format!(
                "ext4 inode {node}: inline data cannot be read yet"
            )));
        }
        let mut out = Vec::new();
        if ino.flags & inode::EXTENTS_FL != 0 {
            self.walk_extents(node, ino.i_block(), None, &mut out)?;
        } else {
            self.walk_block_map(node, ino, &mut out)?;
        }
        Ok(out)
    }

    fn walk_extents(
        &self,
        node: NodeId,
        tree: &[u8],
        parent_depth: Option<u16>,
        out: &mut Vec<RawExtent>,
    ) -> Result<()> {
        let (entries, depth) = extent_header(tree).map_err(|e| self.corrupt(node, e))?;
        if parent_depth.is_some_and(|p| depth + 1 != p) {
            return Err(self.corrupt(node, "extent tree depths do not descend"));
        }
        for i in 0..entries {
            let e = &tree[12 + i * 12..24 + i * 12];
            if depth == 0 {
                let raw_len = u64::from(le16(e, 4));
                let (len, unwritten) = if raw_len > 32768 {
                    (raw_len - 32768, true)
                } else {
                    (raw_len, false)
                };
                let physical = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                if physical.saturating_add(len) > self.blocks {
                    return Err(self.corrupt(node, "an extent points beyond the filesystem"));
                }
                if out.len() >= MAX_EXTENTS {
                    return Err(self.corrupt(node, "too many extents"));
                }
                out.push(RawExtent {
                    logical: u64::from(le32(e, 0)),
                    physical,
                    len,
                    unwritten,
                });
            } else {
                let child = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
                let block = self.read_block(child)?;
                self.walk_extents(node, &block, Some(depth), out)?;
            }
        }
        if out
            .windows(2)
            .any(|w| w[0].logical + w[0].len > w[1].logical)
        {
            return Err(self.corrupt(node, "extents overlap or are out of order"));
        }
        Ok(())
    }

    /// ext2/3 block maps: 12 direct blocks, then single, double and triple indirect blocks.
    fn walk_block_map(&self, node: NodeId, ino: &Inode, out: &mut Vec<RawExtent>) -> Result<()> {
        let per_block = self.block_size / 4;
        let mut walk = BlockMapWalk {
            fs: self,
            node,
            file_blocks: ino.size.div_ceil(self.block_size),
            out,
        };
        let ib = ino.i_block();
        for i in 0..12u64 {
            walk.pointer(u64::from(le32(ib, i as usize * 4)), 0, i)?;
        }
        let mut logical = 12u64;
        for (level, slot) in [(1u32, 12usize), (2, 13), (3, 14)] {
            walk.pointer(u64::from(le32(ib, slot * 4)), level, logical)?;
            logical += per_block.pow(level);
        }
        Ok(())
    }

    fn kind_of(&self, node: NodeId, ino: &Inode) -> Result<FileKind> {
        ino.kind()
            .ok_or_else(|| self.corrupt(node, format!("unknown file type in mode {:o}", ino.mode)))
    }

    /// A file's extents in bytes, from its already-read inode.
    fn extents_of(&self, node: NodeId, ino: &Inode) -> Result<Vec<FileExtent>> {
        if self.kind_of(node, ino)? == FileKind::Symlink && self.is_fast_symlink(ino) {
            return Ok(Vec::new());
        }
        let bs = self.block_size;
        Ok(self
            .raw_extents(node, ino)?
            .into_iter()
            .filter(|e| e.logical * bs < ino.size)
            .map(|e| FileExtent {
                file_offset: e.logical * bs,
                disk_offset: e.physical * bs,
                len: (e.len * bs).min(ino.size - e.logical * bs),
                unwritten: e.unwritten,
            })
            .collect())
    }

    /// Whether a symlink keeps its target in `i_block` (a "fast" symlink).
    fn is_fast_symlink(&self, ino: &Inode) -> bool {
        let xattr_blocks = if ino.file_acl != 0 {
            self.block_size / 512
        } else {
            0
        };
        ino.flags & (inode::EXTENTS_FL | inode::INLINE_DATA_FL) == 0
            && ino.size < 60
            && ino.blocks.saturating_sub(xattr_blocks) == 0
    }

    /// Blocks used by group `g`'s superblock backup and group descriptor table, if it has one.
    fn backup_blocks(&self, g: u64) -> u64 {
        let has_backup = g == 0
            || self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0
            || [3u64, 5, 7].iter().any(|&base| {
                let mut p = 1;
                while p < g {
                    p *= base;
                }
                p == g
            });
        if !has_backup {
            return 0;
        }
        let gdt = (self.groups.len() as u64 * self.desc_size).div_ceil(self.block_size);
        1 + gdt + self.reserved_gdt
    }
}

impl Filesystem for Ext4 {
    fn info(&self) -> VolumeInfo {
        let u = &self.uuid;
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            hex(&u[..4]),
            hex(&u[4..6]),
            hex(&u[6..8]),
            hex(&u[8..10]),
            hex(&u[10..])
        );
        VolumeInfo {
            kind: self.kind,
            label: self.label.clone(),
            uuid,
            block_size: self.block_size as u32,
            total_bytes: self.blocks * self.block_size,
            used_bytes: (self.blocks - self.free_blocks) * self.block_size,
        }
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn flags_are_linux_inode_flags(&self) -> bool {
        true
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        let ino = self.inode(node)?;
        let kind = self.kind_of(node, &ino)?;
        let allocated =
            if ino.flags & inode::HUGE_FILE_FL != 0 && self.ro_compat & RO_COMPAT_HUGE_FILE != 0 {
                ino.blocks.saturating_mul(self.block_size)
            } else {
                ino.blocks.saturating_mul(512)
            };
        Ok(Metadata {
            node,
            kind,
            size: ino.size,
            mode: u32::from(ino.mode & 0o7777),
            uid: ino.uid(),
            gid: ino.gid(),
            links: u32::from(ino.links),
            atime: Some(ino.atime()),
            mtime: Some(ino.mtime()),
            ctime: Some(ino.ctime()),
            crtime: ino.crtime(),
            device: matches!(kind, FileKind::CharDevice | FileKind::BlockDevice)
                .then(|| ino.device()),
            flags: ino.flags,
            allocated,
        })
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let ino = self.inode(dir)?;
        if self.kind_of(dir, &ino)? != FileKind::Dir {
            return Err(FsError::NotADirectory(format!("inode {dir}")));
        }
        if ino.size > MAX_DIR_BYTES {
            return Err(self.corrupt(dir, format!("directory of {} bytes", ino.size)));
        }
        let mut out = Vec::new();
        for e in self.raw_extents(dir, &ino)? {
            for b in 0..e.len {
                if (e.logical + b) * self.block_size >= ino.size {
                    break;
                }
                let block = self.read_block(e.physical + b)?;
                let mut at = 0usize;
                while at + 8 <= block.len() {
                    let inode_no = u64::from(le32(&block, at));
                    let rec_len = usize::from(le16(&block, at + 4));
                    let name_len = usize::from(block[at + 6]);
                    if rec_len < 8 || at + rec_len > block.len() || 8 + name_len > rec_len {
                        return Err(self.corrupt(
                            dir,
                            format!(
                                "directory entry at byte {at} of block {} is malformed",
                                e.physical + b
                            ),
                        ));
                    }
                    let name = &block[at + 8..at + 8 + name_len];
                    if inode_no != 0 && name != b"." && name != b".." {
                        let kind = match block[at + 7] {
                            1 => FileKind::File,
                            2 => FileKind::Dir,
                            3 => FileKind::CharDevice,
                            4 => FileKind::BlockDevice,
                            5 => FileKind::Fifo,
                            6 => FileKind::Socket,
                            7 => FileKind::Symlink,
                            // No file type in the entry (ext2 without `filetype`): ask the inode.
                            _ => match self.inode(inode_no) {
                                Ok(i) => self.kind_of(inode_no, &i)?,
                                Err(e) => return Err(e),
                            },
                        };
                        out.push(DirEntry {
                            name: name.to_vec(),
                            node: inode_no,
                            kind,
                        });
                    }
                    at += rec_len;
                }
            }
        }
        Ok(out)
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let ino = self.inode(node)?;
        if self.kind_of(node, &ino)? == FileKind::Dir {
            return Err(FsError::Unsupported(format!("inode {node} is a directory")));
        }
        if offset >= ino.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(ino.size - offset) as usize;
        let buf = &mut buf[..want];
        buf.fill(0);
        for e in self.extents_of(node, &ino)? {
            let (start, end) = (
                e.file_offset.max(offset),
                (e.file_offset + e.len).min(offset + want as u64),
            );
            if start >= end || e.unwritten {
                continue;
            }
            let dst = &mut buf[(start - offset) as usize..(end - offset) as usize];
            self.dev
                .read_at(dst, e.disk_offset + (start - e.file_offset))?;
        }
        Ok(want)
    }

    fn read_link(&self, node: NodeId) -> Result<Vec<u8>> {
        let ino = self.inode(node)?;
        if self.kind_of(node, &ino)? != FileKind::Symlink {
            return Err(FsError::Unsupported(format!(
                "inode {node} is not a symlink"
            )));
        }
        if ino.size > 4096 {
            return Err(self.corrupt(node, format!("symlink target of {} bytes", ino.size)));
        }
        if self.is_fast_symlink(&ino) {
            return Ok(ino.i_block()[..ino.size as usize].to_vec());
        }
        let mut target = vec![0u8; ino.size as usize];
        let n = self.read_at(node, 0, &mut target)?;
        target.truncate(n);
        Ok(target)
    }

    fn xattrs(&self, node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        let ino = self.inode(node)?;
        let mut out = Vec::new();
        if let Some(area) = ino.inline_xattr_area() {
            out = parse_xattrs(area, area).map_err(|e| self.corrupt(node, e))?;
        }
        if ino.file_acl != 0 {
            let block = self.read_block(ino.file_acl)?;
            if le32(&block, 0) != XATTR_MAGIC {
                return Err(self.corrupt(node, "its extended attribute block has no magic"));
            }
            out.extend(parse_xattrs(&block[32..], &block).map_err(|e| self.corrupt(node, e))?);
        }
        Ok(out)
    }

    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        let ino = self.inode(node)?;
        self.extents_of(node, &ino)
    }

    fn device(&self) -> Option<Arc<dyn BlockDevice>> {
        Some(Arc::clone(&self.dev))
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        let mut used = vec![false; 0];
        used.resize(self.blocks as usize, false);
        let mut mark = |from: u64, count: u64| {
            for b in from..(from + count).min(self.blocks) {
                used[b as usize] = true;
            }
        };
        mark(0, self.first_data_block);
        let itable_blocks = (self.inodes_per_group * self.inode_size).div_ceil(self.block_size);
        for (g, group) in self.groups.iter().enumerate() {
            let g = g as u64;
            let first = self.first_data_block + g * self.blocks_per_group;
            let in_group = self.blocks_per_group.min(self.blocks - first);
            if group.flags & BLOCK_UNINIT != 0 {
                mark(first, self.backup_blocks(g));
            } else {
                let bitmap = self.read_block(group.block_bitmap)?;
                for i in 0..in_group {
                    if bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                        mark(first + i, 1);
                    }
                }
            }
            // Bitmaps and inode tables, wherever flex_bg put them.
            mark(group.block_bitmap, 1);
            mark(group.inode_bitmap, 1);
            mark(group.inode_table, itable_blocks);
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (b, &u) in used.iter().enumerate() {
            if !u {
                continue;
            }
            let b = b as u64;
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == b => r.1 += 1,
                _ => runs.push((b, 1)),
            }
        }
        Ok(AllocationMap {
            block_size: self.block_size as u32,
            runs,
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Gathers the extents of a file mapped by ext2/3 block pointers.
struct BlockMapWalk<'a> {
    fs: &'a Ext4,
    node: NodeId,
    file_blocks: u64,
    out: &'a mut Vec<RawExtent>,
}

impl BlockMapWalk<'_> {
    /// Follows pointer `p`, which maps `per_block^level` blocks from `logical`.
    fn pointer(&mut self, p: u64, level: u32, logical: u64) -> Result<()> {
        if p == 0 || logical >= self.file_blocks {
            return Ok(());
        }
        if p >= self.fs.blocks {
            return Err(self
                .fs
                .corrupt(self.node, "a block pointer points beyond the filesystem"));
        }
        if level == 0 {
            match self.out.last_mut() {
                Some(last)
                    if last.logical + last.len == logical && last.physical + last.len == p =>
                {
                    last.len += 1
                }
                _ => {
                    if self.out.len() >= MAX_EXTENTS {
                        return Err(self.fs.corrupt(self.node, "too many extents"));
                    }
                    self.out.push(RawExtent {
                        logical,
                        physical: p,
                        len: 1,
                        unwritten: false,
                    })
                }
            }
            return Ok(());
        }
        let per_block = self.fs.block_size / 4;
        let span = per_block.pow(level - 1);
        let table = self.fs.read_block(p)?;
        for i in 0..per_block {
            let child = u64::from(le32(&table, (i * 4) as usize));
            self.pointer(child, level - 1, logical + i * span)?;
        }
        Ok(())
    }
}
