//! Reading the superblock and the group descriptor table, and checking that the geometry they
//! describe holds together before anything else trusts it; which blocks a group's superblock
//! backup takes.

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
    pub ro_compat: u32,
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
fn check_features(incompat: u32, ro_compat: u32) -> Result<()> {
    for (bad, what) in [
        (incompat & sb::INCOMPAT_META_BG != 0, "meta_bg"),
        (ro_compat & sb::RO_COMPAT_BIGALLOC != 0, "bigalloc"),
        (incompat & sb::INCOMPAT_ENCRYPT != 0, "encryption"),
    ] {
        if bad {
            return Err(FsError::Unsupported(format!(
                "ext4 with the {what} feature cannot be read yet"
            )));
        }
    }
    Ok(())
}

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
        let superblock = Superblock {
            kind: classify(raw),
            block_size,
            blocks: sb::BLOCKS_COUNT.get_if(raw, is64),
            free_blocks: sb::FREE_BLOCKS_COUNT.get_if(raw, is64),
            first_data_block: u64::from(sb::FIRST_DATA_BLOCK.get(raw)),
            blocks_per_group: u64::from(sb::BLOCKS_PER_GROUP.get(raw)),
            inodes_per_group: u64::from(sb::INODES_PER_GROUP.get(raw)),
            inodes: u64::from(sb::INODES_COUNT.get(raw)),
            inode_size,
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
        check_features(incompat, ro_compat)?;
        Ok(superblock)
    }

    /// Refuses a geometry that does not fit the device or contradicts itself.
    fn check_geometry(&self, device_size: u64) -> Result<()> {
        let s = self;
        if s.blocks == 0
            || s.first_data_block >= s.blocks
            || s.blocks.saturating_mul(s.block_size) > device_size
            || s.blocks_per_group == 0
            || s.blocks_per_group > 8 * s.block_size
            || s.inodes_per_group == 0
            || s.inodes_per_group > 8 * s.block_size
            || !(128..=s.block_size).contains(&s.inode_size)
            || !s.inode_size.is_power_of_two()
            || !(32..=1024).contains(&s.desc_size)
            || s.free_blocks > s.blocks
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
        Ok(())
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
        let mut table = vec![0u8; (self.group_count() * self.desc_size) as usize];
        dev.read_at(&mut table, (self.first_data_block + 1) * self.block_size)?;
        let wide = self.desc_size >= gd::SIZE_64 as u64;
        let mut groups = Vec::with_capacity(self.group_count() as usize);
        for d in table.chunks_exact(self.desc_size as usize) {
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
                let group = groups.len() as u64;
                return Err(Corruption::GroupOutside { group }.at(Place::GroupDescriptors));
            }
            groups.push(g);
        }
        Ok(groups)
    }

    /// Blocks used by group `g`'s superblock backup and group descriptor table, if it has one.
    pub fn backup_blocks(&self, g: u64) -> u64 {
        let sparse = self.ro_compat & sb::RO_COMPAT_SPARSE_SUPER != 0;
        if sparse && !super::write::layout::has_super(g) {
            return 0;
        }
        let gdt = (self.group_count() * self.desc_size).div_ceil(self.block_size);
        1 + gdt + self.reserved_gdt
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
