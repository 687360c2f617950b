//! Writing a laid-out filesystem: each inode's blocks (directory, slow symlink, extent tree
//! and xattr blocks) and its record, file data (in the source's disk order when it has a
//! device), the journal, then the group metadata ([`super::tables`]) — checksums included.

use super::super::super::{FileKind, Filesystem, FsError, Result, Timestamp};
use super::super::ondisk::{inode, journal_sb};
use super::layout::Allocator;
use super::place::Placed;
use super::resize::MappedInode;
use super::tables::{self, Inodes};
use super::{
    csum, own_metadata, xattr, Ext4Report, Extent, Item, Job, JournalFeatures, COPIED_FLAGS,
    EXTRA_ISIZE, INLINE_XATTRS_AT, JOURNAL_INO,
};
use diskferry_blockdev::{BlockDevice, BlockError};

/// Writes everything `placed` holds, then the group metadata and superblocks.
pub(super) fn write_all(
    dev: &dyn BlockDevice,
    job: &Job,
    placed: Placed,
    report: &mut Ext4Report,
) -> Result<()> {
    let mut inodes = Inodes::new();
    for &ino in &placed.order {
        let item = &placed.items[&ino];
        write_blocks(dev, job, ino, item)?;
        count(report, ino, item);
        inodes.insert(ino, inode_record(job, ino, item));
        if let Some(c) = &job.opts.counters {
            c.wrote(1);
        }
    }
    if job.opts.map_file_data {
        report.data_map = map_file_data(&placed, job.geo.block_size);
    } else {
        copy_file_data(dev, job.source, &placed, job.geo.block_size)?;
    }
    let journal_i_block = write_journal(dev, job, &placed.journal, &mut inodes)?;
    for m in &placed.mapped {
        write_mapped_inode(dev, job, m, &mut inodes)?;
    }
    let dirs: Vec<u32> = placed
        .order
        .iter()
        .copied()
        .filter(|ino| placed.items[ino].kind == FileKind::Dir)
        .collect();
    tables::write_metadata(
        dev,
        job,
        tables::Contents {
            inodes,
            dirs,
            used_blocks: placed.alloc.into_used(),
            journal: &placed.journal,
            journal_i_block,
        },
    )?;
    dev.flush()?;
    Ok(())
}

/// Adds the item to the report's counts.
fn count(report: &mut Ext4Report, ino: u32, item: &Item) {
    match item.kind {
        FileKind::File => {
            report.files += 1;
            report.bytes += item.size;
        }
        // lost+found counts when it came from the source.
        FileKind::Dir if ino != super::LOST_FOUND_INO || item.src != 0 => report.dirs += 1,
        FileKind::Dir => {}
        FileKind::Symlink => report.symlinks += 1,
        _ => report.special += 1,
    }
}

/// Writes an item's blocks other than file data (copied afterwards, in the source's disk
/// order): directory blocks, a slow symlink's block, extent tree and xattr blocks.
fn write_blocks(dev: &dyn BlockDevice, job: &Job, ino: u32, item: &Item) -> Result<()> {
    let bs = job.geo.block_size;
    match item.kind {
        FileKind::Dir => {
            for (i, block) in item.dir_blocks.iter().enumerate() {
                let phys = locate(&item.extents, i as u64)
                    .ok_or_else(|| FsError::Unsupported(format!("directory {ino} lost a block")))?;
                dev.write_at(block, phys * bs)?;
            }
        }
        FileKind::Symlink => {
            if let Some(&(_, physical, _)) = item.extents.first() {
                let mut block = vec![0u8; bs as usize];
                block[..item.target.len()].copy_from_slice(&item.target);
                dev.write_at(&block, physical * bs)?;
            }
        }
        _ => {}
    }
    let seed_i = csum::inode_seed(job.id.csum_seed, ino, 0);
    for (nr, block) in &item.tree {
        let mut block = block.clone();
        csum::set_extent_tail(seed_i, &mut block);
        dev.write_at(&block, nr * bs)?;
    }
    if let Some((nr, block)) = &item.xattr_block {
        let mut block = block.clone();
        csum::set_xattr_block(job.id.csum_seed, *nr, &mut block);
        dev.write_at(&block, nr * bs)?;
    }
    Ok(())
}

/// The item's inode, checksummed.
fn inode_record(job: &Job, ino: u32, item: &Item) -> Vec<u8> {
    let blocks: u64 = item.extents.iter().map(|e| e.2).sum::<u64>()
        + item.tree.len() as u64
        + u64::from(item.xattr_block.is_some());
    let mut flags = item.meta.flags & COPIED_FLAGS;
    if matches!(item.kind, FileKind::File | FileKind::Dir)
        || (item.kind == FileKind::Symlink && item.target.len() >= inode::I_BLOCK_LEN)
    {
        flags |= inode::EXTENTS_FL;
    }
    if item.indexed {
        flags |= inode::INDEX_FL;
    } else {
        flags &= !inode::INDEX_FL;
    }
    let bs = job.geo.block_size;
    let mut raw = inode_bytes(job.geo.inode_size, item, blocks * bs / 512, flags);
    csum::set_inode(job.id.csum_seed, ino, &mut raw);
    raw
}

/// An inode's bytes (checksum not yet set).
fn inode_bytes(inode_size: u64, item: &Item, blocks_512: u64, flags: u32) -> Vec<u8> {
    let m = &item.meta;
    let mut b = vec![0u8; inode_size as usize];
    inode::MODE.set(
        &mut b,
        inode::mode_type(item.kind) | (m.mode & 0o7777) as u16,
    );
    inode::UID.set(&mut b, m.uid);
    inode::GID.set(&mut b, m.gid);
    inode::SIZE.set(&mut b, item.size);
    let zero = Timestamp { secs: 0, nanos: 0 };
    inode::ATIME.set(&mut b, m.atime.unwrap_or(zero));
    inode::CTIME.set(&mut b, m.ctime.or(m.mtime).unwrap_or(zero));
    inode::MTIME.set(&mut b, m.mtime.unwrap_or(zero));
    let crtime = m.crtime.or(m.ctime).or(m.mtime);
    inode::CRTIME.set(&mut b, crtime.unwrap_or(zero));
    inode::LINKS_COUNT.set(&mut b, item.links.min(65535) as u16);
    inode::BLOCKS.set(&mut b, blocks_512);
    inode::FLAGS.set(&mut b, flags);
    inode::I_BLOCK.set(&mut b, &item.i_block);
    if let Some((nr, _)) = &item.xattr_block {
        inode::FILE_ACL.set(&mut b, *nr);
    }
    inode::EXTRA_ISIZE.set(&mut b, EXTRA_ISIZE);
    if item.inline_attrs && !item.attrs.is_empty() {
        xattr::write_inline(&mut b[INLINE_XATTRS_AT..], &item.attrs);
    }
    b
}

/// Writes a block-mapped inode's blocks and adds the inode.
fn write_mapped_inode(
    dev: &dyn BlockDevice,
    job: &Job,
    m: &MappedInode,
    inodes: &mut Inodes,
) -> Result<()> {
    for (nr, block) in &m.blocks {
        dev.write_at(block, nr * job.geo.block_size)?;
    }
    let mut raw = inode_bytes(job.geo.inode_size, &m.item, m.blocks_512, 0);
    if m.typeless {
        inode::MODE.set(&mut raw, 0);
        inode::LINKS_COUNT.set(&mut raw, 0);
        raw[inode::GOOD_OLD_SIZE..].fill(0);
    }
    csum::set_inode(job.id.csum_seed, m.ino, &mut raw);
    inodes.insert(m.ino, raw);
    Ok(())
}

/// Writes the journal's superblock and adds its inode; returns the inode's `i_block` for the
/// superblock's backup of it (zeros without a journal).
fn write_journal(
    dev: &dyn BlockDevice,
    job: &Job,
    extents: &[Extent],
    inodes: &mut Inodes,
) -> Result<[u8; inode::I_BLOCK_LEN]> {
    let Some(&(_, first, _)) = extents.first() else {
        return Ok([0; inode::I_BLOCK_LEN]);
    };
    let bs = job.geo.block_size;
    let mut no_blocks = Allocator::new(Vec::new());
    let (i_block, tree) = super::extent::extent_tree(extents, bs, &mut no_blocks)?;
    if !tree.is_empty() {
        return Err(FsError::Unsupported("the journal is too fragmented".into()));
    }
    let blocks: u64 = extents.iter().map(|e| e.2).sum();
    let mut j = Item::new(0, own_metadata(FileKind::File, 0o600, blocks * bs, 1), 0);
    j.size = blocks * bs;
    j.i_block = i_block;
    let mut raw = inode_bytes(job.geo.inode_size, &j, blocks * bs / 512, inode::EXTENTS_FL);
    csum::set_inode(job.id.csum_seed, JOURNAL_INO, &mut raw);
    inodes.insert(JOURNAL_INO, raw);
    let mut jsb = vec![0u8; bs as usize];
    journal_sb::MAGIC.set(&mut jsb, journal_sb::MAGIC_VALUE);
    journal_sb::BLOCKTYPE.set(&mut jsb, journal_sb::SUPERBLOCK_V2);
    journal_sb::BLOCKSIZE.set(&mut jsb, bs as u32);
    journal_sb::MAXLEN.set(&mut jsb, blocks as u32);
    journal_sb::FIRST.set(&mut jsb, 1);
    journal_sb::SEQUENCE.set(&mut jsb, 1);
    journal_sb::UUID.set(&mut jsb, &job.id.uuid);
    journal_sb::NR_USERS.set(&mut jsb, 1);
    set_journal_features(&mut jsb, job.opts.journal_features);
    dev.write_at(&jsb, first * bs)?;
    Ok(i_block)
}

/// The journal superblock's features: the old commit CRC32, revoke records, 64-bit block
/// numbers, csum v2 or v3 (with crc32c and the superblock's own checksum); the rest are
/// dropped.
fn set_journal_features(jsb: &mut [u8], f: JournalFeatures) {
    let csum = journal_sb::INCOMPAT_CSUM_V2 | journal_sb::INCOMPAT_CSUM_V3;
    let kept = journal_sb::INCOMPAT_REVOKE | journal_sb::INCOMPAT_64BIT | csum;
    let mut incompat = f.incompat & kept;
    if incompat & csum == csum {
        incompat &= !journal_sb::INCOMPAT_CSUM_V2;
    }
    let compat = if incompat & csum == 0 {
        f.compat & journal_sb::COMPAT_CHECKSUM
    } else {
        0
    };
    journal_sb::FEATURE_COMPAT.set(jsb, compat);
    journal_sb::FEATURE_INCOMPAT.set(jsb, incompat);
    if incompat & csum != 0 {
        journal_sb::CHECKSUM_TYPE.set(jsb, journal_sb::CHECKSUM_CRC32C);
        let c = csum::crc32c_le(!0, &jsb[..journal_sb::SUPERBLOCK_SIZE]);
        journal_sb::CHECKSUM.set(jsb, c);
    }
}

/// One run of file data: where it is on the source device, how long, where it goes.
struct Run {
    src: u64,
    len: u64,
    dst: u64,
}

/// The files with data, in placement order.
fn files(placed: &Placed) -> impl Iterator<Item = &Item> {
    placed
        .order
        .iter()
        .map(|ino| &placed.items[ino])
        .filter(|i| i.kind == FileKind::File && !i.extents.is_empty())
}

/// Copies every file's data. With a source device, the runs of all files are sorted by their
/// place on it and read in that order with many requests in flight (a remote source streams);
/// without one (a host tree), file by file through `read_at`.
fn copy_file_data(
    dev: &dyn BlockDevice,
    source: &dyn Filesystem,
    placed: &Placed,
    bs: u64,
) -> Result<()> {
    if let Some(src_dev) = source.device() {
        if let Some((runs, inline)) = source_runs(source, placed, bs) {
            let ranges: Vec<std::ops::Range<u64>> =
                runs.iter().map(|r| r.src..r.src + r.len).collect();
            let mut to = RunCursor::default();
            src_dev.read_ranges(&ranges, &mut |off, data| {
                let at = to.place(&runs, off, data.len() as u64)?;
                write_sparse(dev, &data, at)
            })?;
            let mut buf = vec![0u8; 1 << 20];
            for item in inline {
                copy_through_read_at(dev, source, item, bs, &mut buf)?;
            }
            return Ok(());
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    for item in files(placed) {
        copy_through_read_at(dev, source, item, bs, &mut buf)?;
    }
    Ok(())
}

/// Where every file's data goes, by volume offset, instead of copying it.
fn map_file_data(placed: &Placed, bs: u64) -> Vec<super::MappedData> {
    let mut map: Vec<super::MappedData> = files(placed)
        .flat_map(|item| {
            item.extents
                .iter()
                .map(move |&(logical, physical, count)| super::MappedData {
                    fs_offset: physical * bs,
                    len: count * bs,
                    node: item.src,
                    file_offset: logical * bs,
                })
        })
        .collect();
    map.sort_by_key(|m| m.fs_offset);
    map
}

/// Where the pieces `read_ranges` hands over go: they arrive in the order of the runs, each
/// run's pieces one after another. Runs are followed by position in the list, not by source
/// offset, because two files may share source blocks (runs with the same `src`): each gets
/// its own copy.
#[derive(Default)]
struct RunCursor {
    run: usize,
    done: u64,
}

impl RunCursor {
    /// The destination of the piece of `len` bytes read at `off`.
    fn place(&mut self, runs: &[Run], off: u64, len: u64) -> std::result::Result<u64, BlockError> {
        while runs.get(self.run).is_some_and(|r| self.done >= r.len) {
            self.run += 1;
            self.done = 0;
        }
        match runs.get(self.run) {
            Some(r) if off == r.src + self.done && self.done + len <= r.len => {
                self.done += len;
                Ok(r.dst + (off - r.src))
            }
            _ => Err(BlockError::Protocol(format!(
                "a piece read at {off} is not the next one of the file data asked for"
            ))),
        }
    }
}

/// The runs of all files on the source device, sorted by their place there, and the files
/// with data but no extents there (ext4 inline data: copied through `read_at`); `None` when a
/// file's source extents cannot be had or do not match our allocation.
fn source_runs<'p>(
    source: &dyn Filesystem,
    placed: &'p Placed,
    bs: u64,
) -> Option<(Vec<Run>, Vec<&'p Item>)> {
    let mut runs = Vec::new();
    let mut inline = Vec::new();
    for item in files(placed) {
        let extents = source.extents(item.src).ok()?;
        if extents.is_empty() {
            inline.push(item);
        }
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
    runs.sort_by_key(|r| r.src);
    Some((runs, inline))
}

/// Copies one file's data through the source's `read_at`, extent by extent.
fn copy_through_read_at(
    dev: &dyn BlockDevice,
    source: &dyn Filesystem,
    item: &Item,
    bs: u64,
    buf: &mut [u8],
) -> Result<()> {
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
    Ok(())
}

/// Writes `data` at byte `at`, leaving out 4 KiB pieces that are all zeros (one write per run
/// of non-zero pieces).
pub(super) fn write_sparse(
    dev: &dyn BlockDevice,
    data: &[u8],
    at: u64,
) -> std::result::Result<(), BlockError> {
    for run in diskferry_blockdev::nonzero_runs(data) {
        dev.write_at(&data[run.clone()], at + run.start as u64)?;
    }
    Ok(())
}

/// The physical block of logical block `n` in `extents`.
fn locate(extents: &[Extent], n: u64) -> Option<u64> {
    extents
        .iter()
        .find(|e| n >= e.0 && n < e.0 + e.2)
        .map(|e| e.1 + (n - e.0))
}
