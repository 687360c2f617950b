//! The journal (jbd2), big-endian: its superblock in the journal's first block, and the log
//! blocks after it — the common block header, descriptor block tags, commit blocks, revoke
//! blocks and the checksum tail of descriptor and revoke blocks.

use diskferry_layout::field::{Be, Bytes, Field};

pub const MAGIC: Field<u32, Be> = Field::at(0x0);
pub const BLOCKTYPE: Field<u32, Be> = Field::at(0x4);
/// The transaction a log block belongs to (`h_sequence`, in every block's header).
pub const HEADER_SEQUENCE: Field<u32, Be> = Field::at(0x8);
/// Bytes of the header every journal block starts with.
pub const HEADER_SIZE: usize = 12;
pub const BLOCKSIZE: Field<u32, Be> = Field::at(0xC);
pub const MAXLEN: Field<u32, Be> = Field::at(0x10);
pub const FIRST: Field<u32, Be> = Field::at(0x14);
pub const SEQUENCE: Field<u32, Be> = Field::at(0x18);
/// The log block where recovery starts; 0 when the journal is empty.
pub const START: Field<u32, Be> = Field::at(0x1C);
pub const FEATURE_COMPAT: Field<u32, Be> = Field::at(0x24);
pub const FEATURE_INCOMPAT: Field<u32, Be> = Field::at(0x28);
pub const UUID: Bytes<16> = Bytes::at(0x30);
pub const NR_USERS: Field<u32, Be> = Field::at(0x40);
pub const CHECKSUM_TYPE: Field<u8, Be> = Field::at(0x50);
/// Blocks of the fast-commit area at the journal's end (0 means the default, 256).
pub const NUM_FC_BLKS: Field<u32, Be> = Field::at(0x54);
pub const CHECKSUM: Field<u32, Be> = Field::at(0xFC);
/// Bytes of the journal superblock the checksum covers.
pub const SUPERBLOCK_SIZE: usize = 1024;

pub const MAGIC_VALUE: u32 = 0xC03B_3998;
pub const DESCRIPTOR_BLOCK: u32 = 1;
pub const COMMIT_BLOCK: u32 = 2;
pub const SUPERBLOCK_V1: u32 = 3;
pub const SUPERBLOCK_V2: u32 = 4;
pub const REVOKE_BLOCK: u32 = 5;

/// `s_feature_compat`: the old CRC32 of a transaction's blocks in its commit block.
pub const COMPAT_CHECKSUM: u32 = 0x1;
pub const INCOMPAT_REVOKE: u32 = 0x1;
pub const INCOMPAT_64BIT: u32 = 0x2;
pub const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
pub const INCOMPAT_CSUM_V2: u32 = 0x8;
pub const INCOMPAT_CSUM_V3: u32 = 0x10;
pub const INCOMPAT_FAST_COMMIT: u32 = 0x20;
/// Checksum types: of a commit block under `COMPAT_CHECKSUM`, of the superblock under csum
/// v2/v3.
pub const CHECKSUM_CRC32: u8 = 1;
pub const CHECKSUM_CRC32C: u8 = 4;
pub const DEFAULT_FC_BLOCKS: u32 = 256;

/// A descriptor block tag (`journal_block_tag_t`; `journal_block_tag3_t` with csum v3).
pub mod tag {
    use diskferry_layout::field::{Be, Field};

    pub const BLOCKNR: Field<u32, Be> = Field::at(0x0);
    pub const CHECKSUM16: Field<u16, Be> = Field::at(0x4);
    pub const FLAGS16: Field<u16, Be> = Field::at(0x6);
    pub const BLOCKNR_HIGH: Field<u32, Be> = Field::at(0x8);
    pub const FLAGS32: Field<u32, Be> = Field::at(0x4);
    pub const CHECKSUM32: Field<u32, Be> = Field::at(0xC);
    /// Bytes of a v3 tag, and of the older tag with its high block half.
    pub const V3_SIZE: usize = 16;
    pub const SIZE: usize = 12;
    pub const UUID_SIZE: usize = 16;

    /// The block's first four bytes were the journal magic, stored as zeros.
    pub const FLAG_ESCAPE: u32 = 0x1;
    /// No UUID follows the tag.
    pub const FLAG_SAME_UUID: u32 = 0x2;
    pub const FLAG_LAST_TAG: u32 = 0x8;
}

/// A commit block's checksum type and size (`COMPAT_CHECKSUM`), and its first checksum
/// (`h_chksum[0]`).
pub const COMMIT_CHECKSUM_TYPE: Field<u8, Be> = Field::at(0xC);
pub const COMMIT_CHECKSUM_SIZE: Field<u8, Be> = Field::at(0xD);
/// When the transaction committed (`h_commit_sec`).
pub const COMMIT_SEC: Field<u64, Be> = Field::at(0x30);
pub const COMMIT_CHECKSUM: Field<u32, Be> = Field::at(0x10);
/// A revoke block's bytes in use, header included (`r_count`).
pub const REVOKE_COUNT: Field<u32, Be> = Field::at(0xC);
pub const REVOKE_HEADER_SIZE: usize = 16;
/// The checksum tail at the end of descriptor and revoke blocks (csum v2/v3).
pub const TAIL_SIZE: usize = 4;
