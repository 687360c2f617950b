//! The journal (jbd2) superblock, big-endian, in the journal's first block.

use diskferry_layout::field::{Be, Bytes, Field};

pub const MAGIC: Field<u32, Be> = Field::at(0x0);
pub const BLOCKTYPE: Field<u32, Be> = Field::at(0x4);
pub const BLOCKSIZE: Field<u32, Be> = Field::at(0xC);
pub const MAXLEN: Field<u32, Be> = Field::at(0x10);
pub const FIRST: Field<u32, Be> = Field::at(0x14);
pub const SEQUENCE: Field<u32, Be> = Field::at(0x18);
pub const UUID: Bytes<16> = Bytes::at(0x30);
pub const NR_USERS: Field<u32, Be> = Field::at(0x40);

pub const MAGIC_VALUE: u32 = 0xC03B_3998;
pub const SUPERBLOCK_V2: u32 = 4;
