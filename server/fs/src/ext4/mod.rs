//! A reader for ext2, ext3 and ext4 of our own: superblock, group descriptors (32- and 64-byte,
//! after the superblock or per meta group with `meta_bg`), block sizes from 1 to 64 KiB,
//! clusters (`bigalloc`), inodes, extent trees and classic block maps, inline data (files,
//! directories and symlinks kept in the inode), directories (linear; hashed directories read
//! linearly too), fast and slow symlinks, extended attributes (in the inode, in an xattr block
//! or, with `ea_inode`, values in inodes of their own; POSIX ACLs given in the form tools
//! see), and the block allocation map.
//!
//! Why not the `ext4-view` crate: it exposes neither inode numbers, link counts, extended
//! attributes, physical extents nor the block bitmaps, all of which capture needs; the on-disk
//! structures here are also the ones the ext4 writer produces. A journal still holding
//! committed transactions is replayed in memory first (`journal`), so every read sees the
//! volume as e2fsck would leave it. Refused with a clear message: encrypted volumes. Read, but
//! named by [`Filesystem::rebuild_obstacle`] because the writer cannot recreate them: inline
//! data, `bigalloc`, blocks over 4 KiB, `casefold`, `ea_inode`, a fast-commit journal area or
//! an external journal.
//!
//! The superblock and group descriptors are read in `superblock`, a file's blocks found in
//! `blocks`, directories in `dir`, inodes and extended attributes in `inode`, inline data in
//! `inline`, the blocks in use in `alloc` — every structure through the field tables of
//! [`ondisk`], which the writer ([`write`](mod@write)) uses too. What is malformed is a typed
//! [`Corruption`] at a [`Place`].

mod alloc;
mod blocks;
mod dir;
mod error;
mod identity;
mod inline;
mod inode;
mod journal;
pub mod ondisk;
mod superblock;
pub mod write;

use std::sync::Arc;

use super::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, Metadata, NodeId, Result,
    VolumeInfo,
};
use diskferry_blockdev::BlockDevice;
pub use error::{Corruption, Place};
use inode::{parse_xattrs, Inode};
pub use journal::{JournalError, JournalView, LogEnd, ReplayedDevice};
use ondisk::{sb, xattr};
use superblock::{Group, Superblock};

const ROOT: u64 = 2;

/// An ext2/3/4 filesystem opened for reading.
pub struct Ext4 {
    dev: Arc<dyn BlockDevice>,
    sb: Superblock,
    groups: Vec<Group>,
    /// What opening did about the journal; reads already go through any replay.
    journal: JournalView,
}

impl Ext4 {
    /// Opens the volume as e2fsck would leave it: a journal that still holds committed
    /// transactions is replayed in memory ([`JournalView`]); the device is never written.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Ext4> {
        Ext4::open_unreplayed(dev)?.replay_journal()
    }

    /// Opens the volume as its blocks are, without replaying its journal.
    pub fn open_unreplayed(dev: Arc<dyn BlockDevice>) -> Result<Ext4> {
        let sb = Superblock::read(&*dev)?;
        let groups = sb.read_groups(&*dev)?;
        let journal = JournalView::Clean;
        Ok(Ext4 {
            dev,
            sb,
            groups,
            journal,
        })
    }

    /// What opening did about the journal.
    pub fn journal_view(&self) -> &JournalView {
        &self.journal
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>> {
        if block >= self.sb.blocks {
            return Err(Corruption::BlockBeyond { block }.at(Place::Volume));
        }
        let mut b = vec![0u8; self.sb.block_size as usize];
        self.dev.read_at(&mut b, block * self.sb.block_size)?;
        Ok(b)
    }

    fn inode(&self, node: NodeId) -> Result<Inode> {
        if node == 0 || node > self.sb.inodes {
            return Err(Corruption::InodeOutOfRange.in_inode(node));
        }
        let index = node - 1;
        let group = &self.groups[(index / self.sb.inodes_per_group) as usize];
        let at = group.inode_table * self.sb.block_size
            + (index % self.sb.inodes_per_group) * self.sb.inode_size;
        let mut raw = vec![0u8; self.sb.inode_size as usize];
        self.dev.read_at(&mut raw, at)?;
        Inode::parse(raw).map_err(|e| e.in_inode(node))
    }

    fn kind_of(&self, node: NodeId, ino: &Inode) -> Result<FileKind> {
        ino.kind()
            .ok_or_else(|| Corruption::UnknownFileType { mode: ino.mode }.in_inode(node))
    }

    /// A file's extents in bytes, from its already-read inode.
    fn extents_of(&self, node: NodeId, ino: &Inode) -> Result<Vec<FileExtent>> {
        if self.kind_of(node, ino)? == FileKind::Symlink && self.is_fast_symlink(ino) {
            return Ok(Vec::new());
        }
        let bs = self.sb.block_size;
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
            self.sb.block_size / 512
        } else {
            0
        };
        ino.flags & (ondisk::inode::EXTENTS_FL | ondisk::inode::INLINE_DATA_FL) == 0
            && ino.size < ondisk::inode::I_BLOCK_LEN as u64
            && ino.blocks.saturating_sub(xattr_blocks) == 0
    }

    /// Bytes the file occupies on disk, from its block count.
    fn allocated(&self, ino: &Inode) -> u64 {
        let huge = ino.flags & ondisk::inode::HUGE_FILE_FL != 0
            && self.sb.ro_compat & sb::RO_COMPAT_HUGE_FILE != 0;
        if huge {
            ino.blocks.saturating_mul(self.sb.block_size)
        } else {
            ino.blocks.saturating_mul(512)
        }
    }
}

impl Filesystem for Ext4 {
    fn info(&self) -> VolumeInfo {
        let u = &self.sb.uuid;
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            hex(&u[..4]),
            hex(&u[4..6]),
            hex(&u[6..8]),
            hex(&u[8..10]),
            hex(&u[10..])
        );
        VolumeInfo {
            kind: self.sb.kind,
            label: self.sb.label.clone(),
            uuid,
            block_size: self.sb.block_size as u32,
            total_bytes: self.sb.blocks * self.sb.block_size,
            // A free count is a hint (e2fsck recomputes it); it may be wrong.
            used_bytes: self.sb.blocks.saturating_sub(self.sb.free_blocks) * self.sb.block_size,
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
            allocated: self.allocated(&ino),
        })
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        self.read_directory(dir)
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
        if ino.has_inline_data() {
            let data = self.inline_data(node, &ino)?;
            let from = (offset as usize).min(data.len());
            let n = (data.len() - from).min(want);
            buf[..n].copy_from_slice(&data[from..from + n]);
            return Ok(want);
        }
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
            return Err(Corruption::SymlinkTooLong { size: ino.size }.in_inode(node));
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
        let mut raw = Vec::new();
        if let Some(area) = ino.inline_xattr_area() {
            raw = parse_xattrs(area, area).map_err(|e| e.in_inode(node))?;
        }
        if ino.file_acl != 0 {
            let block = self.read_block(ino.file_acl)?;
            if xattr::MAGIC.get(&block) != xattr::MAGIC_VALUE {
                let block = ino.file_acl;
                return Err(Corruption::XattrBlockMagic { block }.in_inode(node));
            }
            let entries = &block[xattr::BLOCK_HEADER_SIZE..];
            raw.extend(parse_xattrs(entries, &block).map_err(|e| e.in_inode(node))?);
        }
        // Inline data's continuation is file data, not an attribute.
        raw.retain(|(name, _)| name != inline::DATA_ATTR);
        raw.into_iter()
            .map(|(name, value)| Ok((name, self.xattr_value(node, value)?)))
            .collect()
    }

    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        let ino = self.inode(node)?;
        self.extents_of(node, &ino)
    }

    fn data_ranges(&self, node: NodeId) -> Result<Vec<(u64, u64)>> {
        let ino = self.inode(node)?;
        if ino.has_inline_data() {
            let whole = (ino.size > 0).then_some((0, ino.size));
            return Ok(whole.into_iter().collect());
        }
        Ok(super::written_ranges(self.extents_of(node, &ino)?))
    }

    fn device(&self) -> Option<Arc<dyn BlockDevice>> {
        Some(Arc::clone(&self.dev))
    }

    fn view_notes(&self) -> Vec<String> {
        self.journal.notes()
    }

    fn rebuild_obstacle(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .sb
            .rebuild_obstacle()
            .into_iter()
            .chain(self.journal.obstacle())
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        self.used_blocks()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
