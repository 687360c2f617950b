//! The qcow2 on-disk layout (qemu's `docs/interop/qcow2.txt`), big-endian throughout: the
//! header and its extensions, shared by the parser and the encoder in `header.rs`, and the
//! bits of L1, L2 and refcount entries.

use diskferry_layout::field::{Be, Bytes, Field};

/// The header at the start of the file (versions 2 and 3).
pub mod header {
    use super::*;
    pub const MAGIC: Bytes<4> = Bytes::at(0);
    pub const MAGIC_VALUE: &[u8; 4] = b"QFI\xfb";
    pub const VERSION: Field<u32, Be> = Field::at(4);
    /// Where the backing file's name is (0: not an overlay), and its length.
    pub const BACKING_FILE_OFFSET: Field<u64, Be> = Field::at(8);
    pub const BACKING_FILE_SIZE: Field<u32, Be> = Field::at(16);
    pub const CLUSTER_BITS: Field<u32, Be> = Field::at(20);
    /// The virtual size in bytes.
    pub const SIZE: Field<u64, Be> = Field::at(24);
    /// 0: not encrypted.
    pub const CRYPT_METHOD: Field<u32, Be> = Field::at(32);
    pub const L1_SIZE: Field<u32, Be> = Field::at(36);
    pub const L1_TABLE_OFFSET: Field<u64, Be> = Field::at(40);
    pub const REFCOUNT_TABLE_OFFSET: Field<u64, Be> = Field::at(48);
    pub const REFCOUNT_TABLE_CLUSTERS: Field<u32, Be> = Field::at(56);
    pub const NB_SNAPSHOTS: Field<u32, Be> = Field::at(60);
    pub const SNAPSHOTS_OFFSET: Field<u64, Be> = Field::at(64);
    /// A version 2 header ends here.
    pub const V2_LEN: usize = 72;

    pub const INCOMPATIBLE_FEATURES: Field<u64, Be> = Field::at(72);
    pub const COMPATIBLE_FEATURES: Field<u64, Be> = Field::at(80);
    pub const AUTOCLEAR_FEATURES: Field<u64, Be> = Field::at(88);
    /// Refcounts are `1 << refcount_order` bits wide.
    pub const REFCOUNT_ORDER: Field<u32, Be> = Field::at(96);
    pub const HEADER_LENGTH: Field<u32, Be> = Field::at(100);
    /// A version 3 header is at least this long.
    pub const V3_MIN_LEN: usize = 104;
    /// Present when the header length reaches past it: 0 zlib, 1 zstd.
    pub const COMPRESSION_TYPE: Field<u8, Be> = Field::at(104);
    /// The version 3 header we write: through the compression type, padded to 8 bytes.
    pub const V3_LEN: usize = 112;

    /// Incompatible feature bits.
    pub const INCOMPAT_DIRTY: u64 = 1 << 0;
    pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
    pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
    pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
    pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
}

/// A header extension after the header (version 3): type, length, data padded to 8 bytes.
/// A type of [`extension::END`] ends the list.
pub mod extension {
    use super::*;
    pub const TYPE: Field<u32, Be> = Field::at(0);
    pub const LENGTH: Field<u32, Be> = Field::at(4);
    /// Where the data starts.
    pub const DATA: usize = 8;
    pub const END: u32 = 0;
    /// Data: the backing file's format name (`raw`, `qcow2`).
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
}

/// L1 and L2 table entries (8 bytes each).
pub mod entry {
    /// Offset bits of L1 and standard L2 entries (bits 9..=55).
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    /// The cluster's refcount is exactly one: it may be written in place.
    pub const COPIED: u64 = 1 << 63;
    /// An L2 entry of a compressed cluster (see [`compressed`](super::compressed)).
    pub const COMPRESSED: u64 = 1 << 62;
    /// Version 3 L2 entries: the cluster reads as zeros.
    pub const ZERO: u64 = 1;
}

/// A compressed cluster's L2 entry: below bit 62, the host offset in the low `62 - (cluster
/// bits - 8)` bits, and above it the number of 512-byte sectors the data touches, minus one.
pub mod compressed {
    /// Where the sector count starts.
    pub fn shift(cluster_bits: u32) -> u32 {
        62 - (cluster_bits - 8)
    }

    /// Host offset and stored-sector count of an entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> (u64, u64) {
        let x = shift(cluster_bits);
        let host = entry & ((1 << x) - 1);
        let sectors = (entry >> x) & ((1 << (cluster_bits - 8)) - 1);
        (host, sectors + 1)
    }

    /// The entry for compressed data of `len` bytes at `host`.
    pub fn encode(host: u64, len: u64, cluster_bits: u32) -> u64 {
        let sectors = ((host % 512) + len).div_ceil(512);
        super::entry::COMPRESSED | ((sectors - 1) << shift(cluster_bits)) | host
    }
}

/// Refcount blocks hold 16-bit big-endian counts (refcount order 4, the only width written).
pub const REFCOUNT_BYTES: u64 = 2;
