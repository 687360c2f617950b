//! Reading the superblock and the group descriptor table (after the superblock, or with
//! `meta_bg` one block in each meta group), and checking that the geometry they describe holds
//! together before anything else trusts it; which groups hold superblock backups
//! (`sparse_super`, `sparse_super2`) and which blocks a group's backup and descriptors take.
//! Free block and inode counts are hints (e2fsck recomputes them) and are not checked.

use super::super::{FsError, FsKind, Result};
use super::error::{Corruption, Place};
use super::ondisk::{gd, sb};
use diskferry_blockdev::BlockDevice;

/// What the reader takes from the superblock.
#[derive(Debug, Clone)]
pub(super) struct Superblock {
    pub kind: FsKind,
    pub block_size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub first_data_block: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u64,
    pub inodes: u64,
    pub inode_size: u64,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    /// Blocks per cluster, the allocation unit of the block bitmaps (1 without bigalloc).
    pub cluster_ratio: u64,
    /// meta_bg: the first descriptor block kept in its meta group.
    pub first_meta_bg: u64,
    /// sparse_super2: the two groups besides group 0 with backups (0: none).
    pub backup_bgs: [u64; 2],
    pub journal_inum: u64,
    pub reserved_gdt: u64,
    pub desc_size: u64,
    pub uuid: [u8; 16],
    pub label: String,
    pub hash_seed: [u8; 16],
    /// The journal's size in blocks (0 without one, or when the superblock keeps no backup
    /// of the journal inode).
    pub journal_blocks: u64,
}

/// One block group's locations.
#[derive(Debug, Clone, Copy)]
pub(super) struct Group {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub flags: u16,
}

fn corrupt(what: Corruption) -> FsError {
    what.at(Place::Superblock)
}

/// Refuses the features this reader does not understand.
fn check_features(incompat: u32) -> Result<()> {
    if incompat & sb::INCOMPAT_ENCRYPT != 0 {
        return Err(FsError::Unsupported(
            "ext4 with the encryption feature cannot be read yet".into(),
        ));
    }
    Ok(())
}

/// Blocks per cluster: `2^(log cluster size - log block size)` with bigalloc, else 1.
fn cluster_ratio(raw: &[u8], log_block_size: u32) -> Result<u64> {
    if sb::FEATURE_RO_COMPAT.get(raw) & sb::RO_COMPAT_BIGALLOC == 0 {
        return Ok(1);
    }
    let log_cluster_size = sb::LOG_CLUSTER_SIZE.get(raw);
    match log_cluster_size.checked_sub(log_block_size) {
        Some(shift) if shift <= MAX_CLUSTER_SHIFT => Ok(1 << shift),
        _ => Err(corrupt(Corruption::ClusterSize { log_cluster_size })),
    }
}

/// Largest cluster: 2^16 blocks (mke2fs allows far less).
const MAX_CLUSTER_SHIFT: u32 = 16;

/// The label: the volume name up to its first NUL.
fn label(raw: &[u8]) -> String {
    let name = sb::VOLUME_NAME.get(raw);
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..len]).into_owned()
}

impl Superblock {
    /// Reads and checks the primary superblock of `dev`.
    pub fn read(dev: &dyn BlockDevice) -> Result<Superblock> {
        if dev.size() < sb::OFFSET + sb::SIZE as u64 {
            return Err(corrupt(Corruption::DeviceTooSmall));
        }
        let mut raw = vec![0u8; sb::SIZE];
        dev.read_at(&mut raw, sb::OFFSET)?;
        let parsed = Superblock::parse(&raw)?;
        parsed.check_geometry(dev.size())?;
        Ok(parsed)
    }

    fn parse(raw: &[u8]) -> Result<Superblock> {
        if sb::MAGIC.get(raw) != sb::MAGIC_VALUE {
            return Err(corrupt(Corruption::NoMagic));
        }
        let log_block_size = sb::LOG_BLOCK_SIZE.get(raw);
        if log_block_size > 6 {
            return Err(corrupt(Corruption::BlockSize { log_block_size }));
        }
        let block_size = 1024u64 << log_block_size;
        let (incompat, ro_compat) = (
            sb::FEATURE_INCOMPAT.get(raw),
            sb::FEATURE_RO_COMPAT.get(raw),
        );
        let is64 = incompat & sb::INCOMPAT_64BIT != 0;
        let inode_size = if sb::REV_LEVEL.get(raw) == sb::REV_GOOD_OLD {
            128
        } else {
            u64::from(sb::INODE_SIZE.get(raw))
        };
        let cluster_ratio = cluster_ratio(raw, log_block_size)?;
        let superblock = Superblock {
            kind: classify(raw),
            block_size,
            blocks: sb::BLOCKS_COUNT.get_if(raw, is64),
            free_blocks: sb::FREE_BLOCKS_COUNT.get_if(raw, is64),
            first_data_block: u64::from(sb::FIRST_DATA_BLOCK.get(raw)),
            blocks_per_group: u64::from(sb::BLOCKS_PER_GROUP.get(raw)),
            cluster_ratio,
            first_meta_bg: if incompat & sb::INCOMPAT_META_BG != 0 {
                u64::from(sb::FIRST_META_BG.get(raw))
            } else {
                0
            },
            backup_bgs: sb::BACKUP_BGS.map(|f| u64::from(f.get(raw))),
            journal_inum: u64::from(sb::JOURNAL_INUM.get(raw)),
            inodes_per_group: u64::from(sb::INODES_PER_GROUP.get(raw)),
            inodes: u64::from(sb::INODES_COUNT.get(raw)),
            inode_size,
            compat: sb::FEATURE_COMPAT.get(raw),
            incompat,
            ro_compat,
            reserved_gdt: u64::from(sb::RESERVED_GDT_BLOCKS.get(raw)),
            desc_size: if is64 {
                u64::from(sb::DESC_SIZE.get(raw))
            } else {
                gd::SIZE_32 as u64
            },
            uuid: sb::UUID.get(raw),
            label: label(raw),
            hash_seed: sb::HASH_SEED.get(raw),
            journal_blocks: journal_blocks(raw, block_size),
        };
        check_features(incompat)?;
        Ok(superblock)
    }

    /// Refuses a geometry that does not fit the device or contradicts itself.
    fn check_geometry(&self, device_size: u64) -> Result<()> {
        let s = self;
        if s.blocks == 0
            || s.first_data_block >= s.blocks
            || s.blocks.saturating_mul(s.block_size) > device_size
            || s.blocks_per_group == 0
            || !s.blocks_per_group.is_multiple_of(s.cluster_ratio)
            || s.blocks_per_group / s.cluster_ratio > 8 * s.block_size
            || s.inodes_per_group == 0
            || s.inodes_per_group > 8 * s.block_size
            || !(128..=s.block_size).contains(&s.inode_size)
            || !s.inode_size.is_power_of_two()
            || !(32..=1024).contains(&s.desc_size)
            || !s.desc_size.is_power_of_two()
        {
            return Err(corrupt(Corruption::Geometry {
                blocks: s.blocks,
                block_size: s.block_size,
                device_size,
                blocks_per_group: s.blocks_per_group,
                inodes_per_group: s.inodes_per_group,
                inode_size: s.inode_size,
                desc_size: s.desc_size,
            }));
        }
        let groups = self.group_count();
        if s.inodes > groups * s.inodes_per_group {
            return Err(corrupt(Corruption::TooManyInodes {
                inodes: s.inodes,
                groups,
            }));
        }
        self.check_backup_size()
    }

    /// Refuses a superblock backup and descriptor table that would not fit in a group (and,
    /// with meta_bg, descriptors kept after the superblock beyond the table's end).
    fn check_backup_size(&self) -> Result<()> {
        let after_super = if self.meta_bg() {
            self.first_meta_bg
        } else {
            self.desc_blocks() + self.reserved_gdt
        };
        let past_table = self.meta_bg() && self.first_meta_bg > self.desc_blocks();
        if past_table || 1 + after_super > self.blocks_per_group {
            return Err(corrupt(Corruption::DescriptorBlocks {
                blocks: after_super,
                blocks_per_group: self.blocks_per_group,
            }));
        }
        Ok(())
    }

    /// What the writer cannot recreate, if anything: it makes 1, 2 and 4 KiB blocks, no
    /// clusters, no inline data, no case-insensitive directories, no attribute inodes.
    pub fn rebuild_obstacle(&self) -> Option<String> {
        let why = if self.block_size > 4096 {
            format!("its {} KiB blocks", self.block_size / 1024)
        } else if self.cluster_ratio > 1 {
            format!(
                "its {} KiB clusters (bigalloc)",
                self.cluster_ratio * self.block_size / 1024
            )
        } else if self.incompat & sb::INCOMPAT_INLINE_DATA != 0 {
            "inline data".to_string()
        } else if self.incompat & sb::INCOMPAT_CASEFOLD != 0 {
            "case-insensitive directories (casefold)".to_string()
        } else if self.incompat & sb::INCOMPAT_EA_INODE != 0 {
            "extended attributes kept in their own inodes (ea_inode)".to_string()
        } else {
            return None;
        };
        Some(format!("the ext4 writer cannot recreate {why}"))
    }

    pub fn group_count(&self) -> u64 {
        (self.blocks - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    /// Blocks each group's inode table takes.
    pub fn itable_blocks(&self) -> u64 {
        (self.inodes_per_group * self.inode_size).div_ceil(self.block_size)
    }

    /// Reads the group descriptor table, checking that each group's bitmaps and inode table
    /// lie inside the volume.
    pub fn read_groups(&self, dev: &dyn BlockDevice) -> Result<Vec<Group>> {
        let wide = self.desc_size >= gd::SIZE_64 as u64;
        let per_block = self.descs_per_block();
        let mut groups = Vec::new();
        for i in 0..self.desc_blocks() {
            let table = self.read_block_at(dev, self.desc_block(i))?;
            let wanted = (self.group_count() - i * per_block).min(per_block) as usize;
            for d in table.chunks_exact(self.desc_size as usize).take(wanted) {
                groups.push(self.group_from(d, wide, groups.len() as u64)?);
            }
        }
        Ok(groups)
    }

    fn read_block_at(&self, dev: &dyn BlockDevice, block: u64) -> Result<Vec<u8>> {
        if block >= self.blocks {
            return Err(Corruption::BlockBeyond { block }.at(Place::GroupDescriptors));
        }
        let mut b = vec![0u8; self.block_size as usize];
        dev.read_at(&mut b, block * self.block_size)?;
        Ok(b)
    }

    /// Group `group`'s descriptor `d`, refused when it points outside the volume.
    fn group_from(&self, d: &[u8], wide: bool, group: u64) -> Result<Group> {
        let g = Group {
            block_bitmap: gd::BLOCK_BITMAP.get_if(d, wide),
            inode_bitmap: gd::INODE_BITMAP.get_if(d, wide),
            inode_table: gd::INODE_TABLE.get_if(d, wide),
            flags: gd::FLAGS.get(d),
        };
        if g.block_bitmap >= self.blocks
            || g.inode_bitmap >= self.blocks
            || g.inode_table.saturating_add(self.itable_blocks()) > self.blocks
        {
            return Err(Corruption::GroupOutside { group }.at(Place::GroupDescriptors));
        }
        Ok(g)
    }

    pub fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    /// Blocks the whole descriptor table takes.
    pub fn desc_blocks(&self) -> u64 {
        self.group_count().div_ceil(self.descs_per_block())
    }

    fn meta_bg(&self) -> bool {
        self.incompat & sb::INCOMPAT_META_BG != 0
    }

    /// The first block of group `g` that is the filesystem's: with 1 KiB blocks and bigalloc
    /// group 0 starts at block 0, which holds the boot sector, and its superblock is block 1.
    fn group_base(&self, g: u64) -> u64 {
        let first = self.first_data_block + g * self.blocks_per_group;
        first.max(u64::from(self.block_size == 1024))
    }

    /// Where descriptor block `i` is: after the primary superblock, or with meta_bg (from
    /// `first_meta_bg` on) in the first group of its meta group, after any superblock backup.
    fn desc_block(&self, i: u64) -> u64 {
        if !self.meta_bg() || i < self.first_meta_bg {
            return self.group_base(0) + 1 + i;
        }
        let g = i * self.descs_per_block();
        self.group_base(g) + u64::from(self.has_super(g))
    }

    /// Whether group `g` holds a superblock backup.
    pub fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & sb::COMPAT_SPARSE_SUPER2 != 0 {
            return self.backup_bgs.contains(&g);
        }
        self.ro_compat & sb::RO_COMPAT_SPARSE_SUPER == 0 || super::write::layout::has_super(g)
    }

    /// The runs of blocks (first, count) that group `g`'s superblock backup and descriptor
    /// blocks take (with reserved descriptor blocks, and block 0 before group 0), as e2fsck
    /// reserves them.
    pub fn backup_runs(&self, g: u64) -> Vec<(u64, u64)> {
        let base = self.group_base(g);
        let mut runs = Vec::new();
        if g == 0 && base > 0 {
            runs.push((0, base));
        }
        let has_super = self.has_super(g);
        if has_super {
            runs.push((base, 1));
        }
        let per_block = self.descs_per_block();
        if !self.meta_bg() || g / per_block < self.first_meta_bg {
            let old_desc_blocks = if self.meta_bg() {
                self.first_meta_bg
            } else {
                self.desc_blocks() + self.reserved_gdt
            };
            if has_super {
                runs.push((base + 1, old_desc_blocks));
            }
        } else if [0, 1, per_block - 1].contains(&(g % per_block)) {
            runs.push((base + u64::from(has_super), 1));
        }
        runs
    }
}

/// ext2, ext3 or ext4, by the features the superblock lists.
fn classify(raw: &[u8]) -> FsKind {
    // `detect::classify` looks at the first 68 KiB of a volume, superblock at 1 KiB.
    let mut head = vec![0u8; 68 * 1024];
    head[sb::OFFSET as usize..sb::OFFSET as usize + sb::SIZE].copy_from_slice(raw);
    super::super::detect::classify(&head)
}

/// The journal's size from the superblock's backup of the journal inode (its `i_size`).
fn journal_blocks(raw: &[u8], block_size: u64) -> u64 {
    let has_journal = sb::FEATURE_COMPAT.get(raw) & sb::COMPAT_HAS_JOURNAL != 0;
    if has_journal && sb::JNL_BACKUP_TYPE.get(raw) == sb::JNL_BACKUP_BLOCKS {
        sb::JNL_SIZE.get(raw) / block_size
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw superblock: 1 KiB blocks, `groups` groups of 1024 blocks, sparse_super, 32-byte
    /// descriptors, with `incompat` and `compat` features.
    fn raw(groups: u32, incompat: u32, compat: u32) -> Vec<u8> {
        let mut r = vec![0u8; sb::SIZE];
        sb::MAGIC.set(&mut r, sb::MAGIC_VALUE);
        sb::REV_LEVEL.set(&mut r, sb::REV_DYNAMIC);
        sb::INODE_SIZE.set(&mut r, 256);
        sb::BLOCKS_COUNT.set(&mut r, 1 + u64::from(groups) * 1024);
        sb::FIRST_DATA_BLOCK.set(&mut r, 1);
        sb::BLOCKS_PER_GROUP.set(&mut r, 1024);
        sb::CLUSTERS_PER_GROUP.set(&mut r, 1024);
        sb::INODES_PER_GROUP.set(&mut r, 256);
        sb::INODES_COUNT.set(&mut r, groups * 256);
        sb::FEATURE_RO_COMPAT.set(&mut r, sb::RO_COMPAT_SPARSE_SUPER);
        sb::FEATURE_INCOMPAT.set(&mut r, incompat);
        sb::FEATURE_COMPAT.set(&mut r, compat);
        r
    }

    fn checked(raw: &[u8]) -> Result<Superblock> {
        let s = Superblock::parse(raw)?;
        s.check_geometry(1 << 40)?;
        Ok(s)
    }

    #[test]
    fn meta_bg_keeps_descriptors_in_the_first_second_and_last_group_of_each_meta_group() {
        let s = checked(&raw(100, sb::INCOMPAT_META_BG, 0)).unwrap();
        assert_eq!(s.descs_per_block(), 32);
        let base = |g: u64| 1 + g * 1024;
        // Group 0 (superblock, then its meta group's descriptors), 32 (no backup), 96.
        assert_eq!(
            (0..4).map(|i| s.desc_block(i)).collect::<Vec<_>>(),
            [2, base(32), base(64), base(96)]
        );
        assert_eq!(s.backup_runs(0), [(0, 1), (1, 1), (2, 1)]);
        assert_eq!(s.backup_runs(1), [(base(1), 1), (base(1) + 1, 1)]);
        assert_eq!(s.backup_runs(33), [(base(33), 1)]);
        assert_eq!(s.backup_runs(63), [(base(63), 1)]);
        // A backup superblock alone: its meta group keeps its descriptors elsewhere.
        assert_eq!(s.backup_runs(25), [(base(25), 1)]);
        assert_eq!(s.backup_runs(2), []);
    }

    #[test]
    fn sparse_super2_backs_up_in_two_named_groups_only() {
        let mut r = raw(10, 0, sb::COMPAT_SPARSE_SUPER2);
        sb::BACKUP_BGS[0].set(&mut r, 1);
        sb::BACKUP_BGS[1].set(&mut r, 9);
        sb::RESERVED_GDT_BLOCKS.set(&mut r, 7);
        let s = checked(&r).unwrap();
        let with: Vec<u64> = (0..10).filter(|&g| s.has_super(g)).collect();
        assert_eq!(with, [0, 1, 9]);
        // Superblock, one descriptor block, 7 reserved.
        assert_eq!(s.backup_runs(9), [(9217, 1), (9218, 8)]);
    }

    #[test]
    fn lying_counts_are_read_and_impossible_layouts_refused() {
        let mut r = raw(4, 0, 0);
        sb::FREE_BLOCKS_COUNT.set(&mut r, u64::from(u32::MAX));
        sb::FREE_INODES_COUNT.set(&mut r, u32::MAX);
        assert!(checked(&r).is_ok(), "free counts are hints");

        sb::RESERVED_GDT_BLOCKS.set(&mut r, 1023);
        assert!(matches!(
            checked(&r),
            Err(FsError::Ext4 {
                source: Corruption::DescriptorBlocks { .. },
                ..
            })
        ));

        let mut r = raw(4, sb::INCOMPAT_META_BG, 0);
        sb::FIRST_META_BG.set(&mut r, 2);
        assert!(
            checked(&r).is_err(),
            "first_meta_bg beyond the one descriptor block"
        );

        let mut r = raw(4, 0, 0);
        sb::FEATURE_RO_COMPAT.set(&mut r, sb::RO_COMPAT_BIGALLOC);
        sb::LOG_CLUSTER_SIZE.set(&mut r, 30);
        assert!(matches!(
            Superblock::parse(&r),
            Err(FsError::Ext4 {
                source: Corruption::ClusterSize { .. },
                ..
            })
        ));
    }

    #[test]
    fn bigalloc_counts_clusters_per_group_and_names_the_obstacle() {
        let mut r = raw(1, 0, 0);
        sb::FEATURE_RO_COMPAT.set(&mut r, sb::RO_COMPAT_BIGALLOC);
        sb::LOG_CLUSTER_SIZE.set(&mut r, 4);
        sb::BLOCKS_PER_GROUP.set(&mut r, 8192 * 16);
        sb::FIRST_DATA_BLOCK.set(&mut r, 0);
        sb::BLOCKS_COUNT.set(&mut r, 8192 * 16);
        let s = checked(&r).unwrap();
        assert_eq!(s.cluster_ratio, 16);
        // 1 KiB blocks with clusters: block 0 is outside the filesystem, the superblock is 1.
        assert_eq!(s.backup_runs(0), [(0, 1), (1, 1), (2, 1)]);
        assert!(s.rebuild_obstacle().unwrap().contains("bigalloc"));
    }
}
