//! Writing a laid-out filesystem: file data (in the source's disk order when it has a
//! device), directory blocks, extent tree and xattr blocks, inode tables, the journal inode
//! and superblock, bitmaps, group descriptors and superblock backups — checksums included.

use std::collections::HashMap;
use std::sync::Arc;

use super::super::super::{FileKind, Filesystem, FsError, Result, Timestamp};
use super::layout::{self, Allocator, Geometry};
use super::{
    csum, extent_tree, mode_bits, now, own_metadata, put16, put32, xattr, Ext4Options, Ext4Report,
    Item, COPIED_FLAGS, EXTENTS_FL, FIRST_INO, INDEX_FL, JOURNAL_INO, LOST_FOUND_INO,
};
use diskferry_blockdev::BlockDevice;

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
                    other => diskferry_blockdev::BlockError::Format(other.to_string()),
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
    for run in diskferry_blockdev::nonzero_runs(data) {
        dev.write_at(&data[run.clone()], at + run.start as u64)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn write_all(
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
        let meta = own_metadata(FileKind::File, 0o600, jblocks * bs, 1);
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
