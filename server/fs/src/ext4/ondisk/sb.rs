//! The superblock: 1024 bytes at byte 1024 of the volume, copies at the start of backup groups.

use super::Halves;
use diskferry_layout::field::{Bytes, Field};

/// Where the primary superblock starts on the volume, and its size.
pub const OFFSET: u64 = 1024;
pub const SIZE: usize = 1024;

pub const INODES_COUNT: Field<u32> = Field::at(0x00);
pub const BLOCKS_COUNT: Halves<u32, u32> = Halves::at(0x04, 0x150);
pub const R_BLOCKS_COUNT: Halves<u32, u32> = Halves::at(0x08, 0x154);
pub const FREE_BLOCKS_COUNT: Halves<u32, u32> = Halves::at(0x0C, 0x158);
pub const FREE_INODES_COUNT: Field<u32> = Field::at(0x10);
pub const FIRST_DATA_BLOCK: Field<u32> = Field::at(0x14);
/// Block size is `1024 << LOG_BLOCK_SIZE`.
pub const LOG_BLOCK_SIZE: Field<u32> = Field::at(0x18);
pub const LOG_CLUSTER_SIZE: Field<u32> = Field::at(0x1C);
pub const BLOCKS_PER_GROUP: Field<u32> = Field::at(0x20);
pub const CLUSTERS_PER_GROUP: Field<u32> = Field::at(0x24);
pub const INODES_PER_GROUP: Field<u32> = Field::at(0x28);
pub const MTIME: Field<u32> = Field::at(0x2C);
pub const WTIME: Field<u32> = Field::at(0x30);
pub const MNT_COUNT: Field<u16> = Field::at(0x34);
pub const MAX_MNT_COUNT: Field<u16> = Field::at(0x36);
pub const MAGIC: Field<u16> = Field::at(0x38);
pub const STATE: Field<u16> = Field::at(0x3A);
pub const ERRORS: Field<u16> = Field::at(0x3C);
pub const LASTCHECK: Field<u32> = Field::at(0x40);
pub const REV_LEVEL: Field<u32> = Field::at(0x4C);
pub const FIRST_INO: Field<u32> = Field::at(0x54);
pub const INODE_SIZE: Field<u16> = Field::at(0x58);
pub const BLOCK_GROUP_NR: Field<u16> = Field::at(0x5A);
pub const FEATURE_COMPAT: Field<u32> = Field::at(0x5C);
pub const FEATURE_INCOMPAT: Field<u32> = Field::at(0x60);
pub const FEATURE_RO_COMPAT: Field<u32> = Field::at(0x64);
pub const UUID: Bytes<16> = Bytes::at(0x68);
pub const VOLUME_NAME: Bytes<16> = Bytes::at(0x78);
/// Where the volume was last mounted (`s_last_mounted`), NUL-padded.
pub const LAST_MOUNTED: Bytes<64> = Bytes::at(0x88);
pub const RESERVED_GDT_BLOCKS: Field<u16> = Field::at(0xCE);
pub const JOURNAL_UUID: Bytes<16> = Bytes::at(0xD0);
pub const JOURNAL_INUM: Field<u32> = Field::at(0xE0);
pub const JOURNAL_DEV: Field<u32> = Field::at(0xE4);
pub const HASH_SEED: Bytes<16> = Bytes::at(0xEC);
pub const DEF_HASH_VERSION: Field<u8> = Field::at(0xFC);
pub const JNL_BACKUP_TYPE: Field<u8> = Field::at(0xFD);
pub const DESC_SIZE: Field<u16> = Field::at(0xFE);
pub const DEFAULT_MOUNT_OPTS: Field<u32> = Field::at(0x100);
pub const MKFS_TIME: Field<u32> = Field::at(0x108);
/// The journal inode's `i_block`, backed up (`s_jnl_blocks[0..15]`).
pub const JNL_BLOCKS: Bytes<60> = Bytes::at(0x10C);
/// The journal inode's `i_size` (`s_jnl_blocks[16]`, high half in `[15]`).
pub const JNL_SIZE: Halves<u32, u32> = Halves::at(0x14C, 0x148);
pub const MIN_EXTRA_ISIZE: Field<u16> = Field::at(0x15C);
pub const WANT_EXTRA_ISIZE: Field<u16> = Field::at(0x15E);
pub const FLAGS: Field<u32> = Field::at(0x160);
pub const LOG_GROUPS_PER_FLEX: Field<u8> = Field::at(0x174);
pub const CHECKSUM_TYPE: Field<u8> = Field::at(0x175);
pub const CHECKSUM: Field<u32> = Field::at(0x3FC);

pub const MAGIC_VALUE: u16 = 0xEF53;
/// `s_rev_level`: 0 is the original format with fixed 128-byte inodes.
pub const REV_GOOD_OLD: u32 = 0;
pub const REV_DYNAMIC: u32 = 1;
pub const STATE_CLEAN: u16 = 1;
pub const ERRORS_CONTINUE: u16 = 1;
/// `s_jnl_backup_type`: the backup holds the journal inode's `i_block`.
pub const JNL_BACKUP_BLOCKS: u8 = 1;
pub const HASH_HALF_MD4: u8 = 1;
/// `s_flags`: directory hashes treat name bytes as signed, or as unsigned.
pub const FLAGS_SIGNED_HASH: u32 = 0x1;
pub const FLAGS_UNSIGNED_HASH: u32 = 0x2;
pub const CHECKSUM_CRC32C: u8 = 1;
/// Default mount options: user_xattr, acl.
pub const DEFMOUNT_XATTR_USER_ACL: u32 = 0x0C;

pub const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub const COMPAT_EXT_ATTR: u32 = 0x8;
/// Reserved GDT blocks and the resize inode that owns them.
pub const COMPAT_RESIZE_INODE: u32 = 0x10;
pub const COMPAT_DIR_INDEX: u32 = 0x20;
pub const INCOMPAT_FILETYPE: u32 = 0x2;
/// The journal holds transactions not yet written to their places (`needs_recovery`).
pub const INCOMPAT_RECOVER: u32 = 0x4;
/// This is an external journal device, not a filesystem.
pub const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
/// The journal has a fast-commit area after its full commits.
pub const COMPAT_FAST_COMMIT: u32 = 0x400;
pub const INCOMPAT_META_BG: u32 = 0x10;
pub const INCOMPAT_EXTENTS: u32 = 0x40;
pub const INCOMPAT_64BIT: u32 = 0x80;
pub const INCOMPAT_FLEX_BG: u32 = 0x200;
pub const INCOMPAT_ENCRYPT: u32 = 0x10000;
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub const RO_COMPAT_LARGE_FILE: u32 = 0x2;
pub const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub const RO_COMPAT_DIR_NLINK: u32 = 0x20;
pub const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
pub const RO_COMPAT_BIGALLOC: u32 = 0x200;
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

// Layouts beyond the classic one: clusters (bigalloc), descriptor blocks kept per meta group
// (meta_bg), at most two backups (sparse_super2), data inside inodes (inline_data).
/// With meta_bg, the first descriptor block kept in its meta group rather than after the
/// superblock.
pub const FIRST_META_BG: Field<u32> = Field::at(0x104);
/// sparse_super2: the only two groups with backups (0: none).
pub const BACKUP_BGS: [Field<u32>; 2] = [Field::at(0x24C), Field::at(0x250)];
pub const COMPAT_SPARSE_SUPER2: u32 = 0x200;
pub const INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub const INCOMPAT_CASEFOLD: u32 = 0x2_0000;
pub const INCOMPAT_EA_INODE: u32 = 0x400;
