//! Extent tree nodes: a header, then entries — index entries in interior nodes, extents in
//! leaves. The root lives in the inode's `i_block`, other nodes fill a block and end in a
//! checksum after their `max` entries.

use super::{inode, Halves};
use diskferry_layout::field::Field;

pub const HEADER_SIZE: usize = 12;
pub const ENTRY_SIZE: usize = 12;
/// Entries in the root (in `i_block`).
pub const ROOT_ENTRIES: usize = (inode::I_BLOCK_LEN - HEADER_SIZE) / ENTRY_SIZE;

// The header.
pub const MAGIC: Field<u16> = Field::at(0);
pub const ENTRIES: Field<u16> = Field::at(2);
pub const MAX: Field<u16> = Field::at(4);
pub const DEPTH: Field<u16> = Field::at(6);
pub const MAGIC_VALUE: u16 = 0xF30A;
/// The deepest tree the kernel builds.
pub const MAX_DEPTH: u16 = 5;

// A leaf entry (`ext4_extent`).
pub const LEAF_BLOCK: Field<u32> = Field::at(0);
/// Block count; above `MAX_INIT_LEN` the extent is unwritten, `len - MAX_INIT_LEN` long.
pub const LEAF_LEN: Field<u16> = Field::at(4);
pub const LEAF_START: Halves<u32, u16> = Halves::at(8, 6);
pub const MAX_INIT_LEN: u16 = 32768;

// An index entry (`ext4_extent_idx`).
pub const INDEX_BLOCK: Field<u32> = Field::at(0);
pub const INDEX_LEAF: Halves<u32, u16> = Halves::at(4, 8);

/// Where entry `i` of a node starts.
pub const fn entry_at(i: usize) -> usize {
    HEADER_SIZE + i * ENTRY_SIZE
}

/// The checksum of a node holding at most `max` entries.
pub const fn tail(max: usize) -> Field<u32> {
    Field::at(entry_at(max))
}
