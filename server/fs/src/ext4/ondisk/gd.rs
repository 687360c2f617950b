//! A group descriptor: the 32-byte original, and with `64bit` a 64-byte one whose second half
//! holds the high halves.

use super::Halves;
use diskferry_layout::field::Field;

pub const SIZE_32: usize = 32;
pub const SIZE_64: usize = 64;

pub const BLOCK_BITMAP: Halves<u32, u32> = Halves::at(0x00, 0x20);
pub const INODE_BITMAP: Halves<u32, u32> = Halves::at(0x04, 0x24);
pub const INODE_TABLE: Halves<u32, u32> = Halves::at(0x08, 0x28);
pub const FREE_BLOCKS_COUNT: Halves<u16, u16> = Halves::at(0x0C, 0x2C);
pub const FREE_INODES_COUNT: Halves<u16, u16> = Halves::at(0x0E, 0x2E);
pub const USED_DIRS_COUNT: Halves<u16, u16> = Halves::at(0x10, 0x30);
pub const FLAGS: Field<u16> = Field::at(0x12);
pub const BLOCK_BITMAP_CSUM: Halves<u16, u16> = Halves::at(0x18, 0x38);
pub const INODE_BITMAP_CSUM: Halves<u16, u16> = Halves::at(0x1A, 0x3A);
pub const ITABLE_UNUSED: Halves<u16, u16> = Halves::at(0x1C, 0x32);
pub const CHECKSUM: Field<u16> = Field::at(0x1E);

/// `bg_flags`: the block bitmap is not initialized (reads as the group's metadata only).
pub const BLOCK_UNINIT: u16 = 0x2;
/// `bg_flags`: the inode table is zeroed.
pub const INODE_ZEROED: u16 = 0x4;
