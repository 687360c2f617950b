//! The per-group metadata, written last from what the rest left behind: the used part of each
//! inode table, block and inode bitmaps, the group descriptor table, and the superblock with
//! its backups — checksums included.

use std::collections::HashMap;

use super::super::super::Result;
use super::super::ondisk::{gd, inode, sb};
use super::emit::write_sparse;
use super::{csum, layout, now, Extent, Job, EXTRA_ISIZE, FIRST_INO, JOURNAL_INO};
use diskferry_blockdev::BlockDevice;

/// Inode records by inode number.
pub(super) type Inodes = HashMap<u32, Vec<u8>>;

/// What the group metadata describes.
pub(super) struct Contents<'a> {
    pub inodes: Inodes,
    /// Directory inodes.
    pub dirs: Vec<u32>,
    /// Per block: in use.
    pub used_blocks: Vec<bool>,
    pub journal: &'a [Extent],
    /// The journal inode's `i_block`, backed up in the superblock.
    pub journal_i_block: [u8; inode::I_BLOCK_LEN],
}

/// Free blocks and inodes over all groups.
#[derive(Debug, Default, Clone, Copy)]
struct Free {
    blocks: u64,
    inodes: u64,
}

/// Writes the reserved inodes, the inode tables, bitmaps, group descriptors and superblocks.
pub(super) fn write_metadata(dev: &dyn BlockDevice, job: &Job, mut c: Contents) -> Result<()> {
    add_reserved_inodes(job, &mut c.inodes);
    let inodes = &c.inodes;
    let used_inodes = write_inode_tables(dev, job, inodes)?;
    let mut dirs = vec![0u64; job.geo.groups as usize];
    for &ino in &c.dirs {
        dirs[((ino - 1) as u64 / job.geo.inodes_per_group) as usize] += 1;
    }
    let mut gdt = vec![0u8; (job.geo.gdt_blocks * job.geo.block_size) as usize];
    let mut free = Free::default();
    for g in 0..job.geo.groups {
        let group = GroupCounts {
            dirs: dirs[g as usize],
            used_inodes: used_inodes[g as usize],
            ..write_bitmaps(dev, job, g, &c.used_blocks, inodes)?
        };
        free.blocks += group.free_blocks;
        free.inodes += group.free_inodes;
        let at = (g * job.geo.desc_size) as usize;
        let d = &mut gdt[at..at + job.geo.desc_size as usize];
        group_descriptor(d, job, g, &group);
    }
    write_superblocks(dev, job, &superblock(job, free, &c), &gdt)
}

/// Reserved inodes other than the root, the journal and lost+found: empty but checksummed.
fn add_reserved_inodes(job: &Job, inodes: &mut Inodes) {
    for ino in 1..FIRST_INO {
        inodes.entry(ino).or_insert_with(|| {
            let mut raw = vec![0u8; job.geo.inode_size as usize];
            inode::EXTRA_ISIZE.set(&mut raw, EXTRA_ISIZE);
            csum::set_inode(job.id.csum_seed, ino, &mut raw);
            raw
        });
    }
}

/// Writes the used part of each group's inode table (up to its highest inode); returns that
/// count per group.
fn write_inode_tables(dev: &dyn BlockDevice, job: &Job, inodes: &Inodes) -> Result<Vec<u64>> {
    let geo = &job.geo;
    let ipg = geo.inodes_per_group;
    let mut highest = vec![0u64; geo.groups as usize];
    for &ino in inodes.keys() {
        let (g, idx) = ((u64::from(ino) - 1) / ipg, (u64::from(ino) - 1) % ipg);
        highest[g as usize] = highest[g as usize].max(idx + 1);
    }
    for g in 0..geo.groups {
        let used = highest[g as usize];
        if used == 0 {
            continue;
        }
        let mut table =
            vec![0u8; (used * geo.inode_size).next_multiple_of(geo.block_size) as usize];
        for idx in 0..used {
            if let Some(raw) = inodes.get(&((g * ipg + idx + 1) as u32)) {
                let at = (idx * geo.inode_size) as usize;
                table[at..at + raw.len()].copy_from_slice(raw);
            }
        }
        write_sparse(dev, &table, geo.inode_table[g as usize] * geo.block_size)?;
    }
    Ok(highest)
}

/// What a group descriptor counts.
#[derive(Debug, Default, Clone, Copy)]
struct GroupCounts {
    free_blocks: u64,
    free_inodes: u64,
    dirs: u64,
    /// Inodes up to the highest used one (the rest of the table is unused).
    used_inodes: u64,
    block_bitmap_csum: u32,
    inode_bitmap_csum: u32,
}

/// Writes group `g`'s block and inode bitmaps; returns their free counts and checksums.
fn write_bitmaps(
    dev: &dyn BlockDevice,
    job: &Job,
    g: u64,
    used_blocks: &[bool],
    inodes: &Inodes,
) -> Result<GroupCounts> {
    let geo = &job.geo;
    let bs = geo.block_size;
    let (start, len) = (geo.group_start(g), geo.group_len(g));
    // Bits past the group's end (a short last group) are set, as are those of used blocks.
    let blocks = bitmap(bs, geo.blocks_per_group, |i| {
        i >= len || used_blocks[(start + i) as usize]
    });
    let ipg = geo.inodes_per_group;
    let inode_bits = bitmap(bs, ipg, |idx| {
        inodes.contains_key(&((g * ipg + idx + 1) as u32))
    });
    dev.write_at(&blocks.0, geo.block_bitmap[g as usize] * bs)?;
    dev.write_at(&inode_bits.0, geo.inode_bitmap[g as usize] * bs)?;
    let seed = job.id.csum_seed;
    Ok(GroupCounts {
        free_blocks: blocks.1,
        free_inodes: inode_bits.1,
        block_bitmap_csum: csum::crc32c_le(seed, &blocks.0[..(geo.blocks_per_group / 8) as usize]),
        inode_bitmap_csum: csum::crc32c_le(seed, &inode_bits.0[..(ipg / 8) as usize]),
        ..GroupCounts::default()
    })
}

/// A bitmap block of `bs` bytes for `bits` entries, `used(i)` for each, the padding set;
/// and how many are free.
fn bitmap(bs: u64, bits: u64, used: impl Fn(u64) -> bool) -> (Vec<u8>, u64) {
    let mut b = vec![0xFFu8; bs as usize];
    let mut free = 0;
    for i in 0..bits {
        if !used(i) {
            b[(i / 8) as usize] &= !(1 << (i % 8));
            free += 1;
        }
    }
    (b, free)
}

/// Fills group `g`'s descriptor `d`, checksum included.
fn group_descriptor(d: &mut [u8], job: &Job, g: u64, c: &GroupCounts) {
    let geo = &job.geo;
    gd::BLOCK_BITMAP.set(d, geo.block_bitmap[g as usize]);
    gd::INODE_BITMAP.set(d, geo.inode_bitmap[g as usize]);
    gd::INODE_TABLE.set(d, geo.inode_table[g as usize]);
    gd::FREE_BLOCKS_COUNT.set(d, c.free_blocks as u32);
    gd::FREE_INODES_COUNT.set(d, c.free_inodes as u32);
    gd::USED_DIRS_COUNT.set(d, c.dirs as u32);
    // The unused part of the inode table was never written: it reads as zeros.
    gd::FLAGS.set(d, gd::INODE_ZEROED);
    gd::BLOCK_BITMAP_CSUM.set(d, c.block_bitmap_csum);
    gd::INODE_BITMAP_CSUM.set(d, c.inode_bitmap_csum);
    gd::ITABLE_UNUSED.set(d, (geo.inodes_per_group - c.used_inodes) as u32);
    csum::set_group_desc(job.id.csum_seed, g as u32, d);
}

/// The features written: has_journal (with a journal), resize_inode (with reserved GDT
/// blocks), ext_attr, dir_index; filetype, extents, 64bit, flex_bg; sparse_super,
/// large_file, huge_file, dir_nlink, extra_isize, metadata_csum.
fn features(has_journal: bool, resize_inode: bool) -> (u32, u32, u32) {
    let journal = if has_journal {
        sb::COMPAT_HAS_JOURNAL
    } else {
        0
    };
    let resize = if resize_inode {
        sb::COMPAT_RESIZE_INODE
    } else {
        0
    };
    (
        sb::COMPAT_EXT_ATTR | sb::COMPAT_DIR_INDEX | journal | resize,
        sb::INCOMPAT_FILETYPE | sb::INCOMPAT_EXTENTS | sb::INCOMPAT_64BIT | sb::INCOMPAT_FLEX_BG,
        sb::RO_COMPAT_SPARSE_SUPER
            | sb::RO_COMPAT_LARGE_FILE
            | sb::RO_COMPAT_HUGE_FILE
            | sb::RO_COMPAT_DIR_NLINK
            | sb::RO_COMPAT_EXTRA_ISIZE
            | sb::RO_COMPAT_METADATA_CSUM,
    )
}

/// The primary superblock (group number and checksum not yet set).
fn superblock(job: &Job, free: Free, c: &Contents) -> Vec<u8> {
    let (geo, opts) = (&job.geo, job.opts);
    let t = now().secs as u32;
    let mut b = vec![0u8; sb::SIZE];
    sb::INODES_COUNT.set(&mut b, geo.inodes() as u32);
    sb::BLOCKS_COUNT.set(&mut b, geo.blocks);
    sb::R_BLOCKS_COUNT.set(&mut b, geo.blocks * opts.reserved_percent / 100);
    sb::FREE_BLOCKS_COUNT.set(&mut b, free.blocks);
    sb::FREE_INODES_COUNT.set(&mut b, free.inodes as u32);
    sb::FIRST_DATA_BLOCK.set(&mut b, geo.first_data_block as u32);
    let log = (geo.block_size / 1024).trailing_zeros();
    sb::LOG_BLOCK_SIZE.set(&mut b, log);
    sb::LOG_CLUSTER_SIZE.set(&mut b, log);
    sb::BLOCKS_PER_GROUP.set(&mut b, geo.blocks_per_group as u32);
    sb::CLUSTERS_PER_GROUP.set(&mut b, geo.blocks_per_group as u32);
    sb::INODES_PER_GROUP.set(&mut b, geo.inodes_per_group as u32);
    sb::WTIME.set(&mut b, t);
    sb::MAX_MNT_COUNT.set(&mut b, 0xFFFF); // unchecked
    sb::MAGIC.set(&mut b, sb::MAGIC_VALUE);
    sb::STATE.set(&mut b, sb::STATE_CLEAN);
    sb::ERRORS.set(&mut b, sb::ERRORS_CONTINUE);
    sb::LASTCHECK.set(&mut b, t);
    sb::REV_LEVEL.set(&mut b, sb::REV_DYNAMIC);
    sb::FIRST_INO.set(&mut b, FIRST_INO);
    sb::INODE_SIZE.set(&mut b, geo.inode_size as u16);
    let (compat, incompat, ro_compat) = features(!c.journal.is_empty(), geo.reserved_gdt > 0);
    sb::RESERVED_GDT_BLOCKS.set(&mut b, geo.reserved_gdt as u16);
    sb::FEATURE_COMPAT.set(&mut b, compat);
    sb::FEATURE_INCOMPAT.set(&mut b, incompat);
    sb::FEATURE_RO_COMPAT.set(&mut b, ro_compat);
    sb::UUID.set(&mut b, &job.id.uuid);
    if let Some(label) = &opts.label {
        let mut name = [0u8; 16];
        let l = &label.as_bytes()[..label.len().min(16)];
        name[..l.len()].copy_from_slice(l);
        sb::VOLUME_NAME.set(&mut b, &name);
    }
    if let Some(path) = &opts.last_mounted {
        sb::LAST_MOUNTED.set(&mut b, path);
    }
    set_journal(&mut b, job, c);
    sb::HASH_SEED.set(&mut b, &job.id.hash_seed);
    sb::DEF_HASH_VERSION.set(&mut b, sb::HASH_HALF_MD4);
    sb::DESC_SIZE.set(&mut b, geo.desc_size as u16);
    sb::DEFAULT_MOUNT_OPTS.set(&mut b, sb::DEFMOUNT_XATTR_USER_ACL);
    sb::MKFS_TIME.set(&mut b, t);
    sb::MIN_EXTRA_ISIZE.set(&mut b, EXTRA_ISIZE);
    sb::WANT_EXTRA_ISIZE.set(&mut b, EXTRA_ISIZE);
    // Directory hashes as htree.rs computes them.
    let hash = if job.id.signed_hash {
        sb::FLAGS_SIGNED_HASH
    } else {
        sb::FLAGS_UNSIGNED_HASH
    };
    sb::FLAGS.set(&mut b, hash);
    sb::LOG_GROUPS_PER_FLEX.set(&mut b, geo.log_groups_per_flex as u8);
    sb::CHECKSUM_TYPE.set(&mut b, sb::CHECKSUM_CRC32C);
    b
}

/// The journal inode's number and a backup of its blocks and size, when there is a journal.
fn set_journal(b: &mut [u8], job: &Job, c: &Contents) {
    if c.journal.is_empty() {
        return;
    }
    sb::JOURNAL_INUM.set(b, JOURNAL_INO);
    sb::JNL_BACKUP_TYPE.set(b, sb::JNL_BACKUP_BLOCKS);
    sb::JNL_BLOCKS.set(b, &c.journal_i_block);
    let blocks: u64 = c.journal.iter().map(|e| e.2).sum();
    sb::JNL_SIZE.set(b, blocks * job.geo.block_size);
}

/// Writes the superblock and the group descriptor table to group 0 and every backup group.
fn write_superblocks(dev: &dyn BlockDevice, job: &Job, primary: &[u8], gdt: &[u8]) -> Result<()> {
    let (geo, bs) = (&job.geo, job.geo.block_size);
    for g in (0..geo.groups).filter(|&g| layout::has_super(g)) {
        let mut copy = primary.to_vec();
        sb::BLOCK_GROUP_NR.set(&mut copy, g as u16);
        csum::set_superblock(&mut copy);
        let (sb_at, gdt_at) = if g == 0 {
            (sb::OFFSET, (geo.first_data_block + 1) * bs)
        } else {
            (geo.group_start(g) * bs, (geo.group_start(g) + 1) * bs)
        };
        if g > 0 && geo.touches_bad(geo.group_start(g), geo.backup_len(g)) {
            // mke2fs leaves such a backup too; e2fsck notes it and uses the others.
            continue;
        }
        dev.write_at(&copy, sb_at)?;
        dev.write_at(gdt, gdt_at)?;
    }
    Ok(())
}
