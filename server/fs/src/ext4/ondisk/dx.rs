//! Hashed directories (htree): block 0 is a root holding `.`, `..`, a `dx_root_info` and
//! index entries; interior nodes are a fake empty directory entry and index entries. Each
//! index starts with a count/limit header in place of entry 0's hash, and every index block
//! ends (after `limit` entries) in an 8-byte tail with its checksum.

use diskferry_layout::field::Field;

/// `.` is 12 bytes at 0, `..` follows and covers the rest of the root block.
pub const DOT: usize = 0;
pub const DOT_REC_LEN: usize = 12;
pub const DOTDOT: usize = 12;
// dx_root_info.
pub const HASH_VERSION: Field<u8> = Field::at(0x1C);
pub const INFO_LENGTH: Field<u8> = Field::at(0x1D);
pub const INDIRECT_LEVELS: Field<u8> = Field::at(0x1E);
pub const INFO_LENGTH_VALUE: u8 = 8;
/// Where the index begins in the root and in an interior node.
pub const ROOT_INDEX: usize = 0x20;
pub const NODE_INDEX: usize = 8;

// The index, relative to its start: count/limit in place of entry 0's hash.
pub const LIMIT: Field<u16> = Field::at(0);
pub const COUNT: Field<u16> = Field::at(2);
pub const ENTRY_SIZE: usize = 8;
/// Entry `i`'s hash (not for entry 0) and logical block.
pub const fn hash(i: usize) -> Field<u32> {
    Field::at(i * ENTRY_SIZE)
}
pub const fn block(i: usize) -> Field<u32> {
    Field::at(i * ENTRY_SIZE + 4)
}

/// The tail after `limit` entries: reserved, then the checksum.
pub const TAIL_SIZE: usize = 8;
pub const TAIL_CHECKSUM: Field<u32> = Field::at(4);

/// Entries an index at `index_at` of a `block_size` block can hold.
pub const fn limit(block_size: usize, index_at: usize) -> usize {
    (block_size - index_at - TAIL_SIZE) / ENTRY_SIZE
}
