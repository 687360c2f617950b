//! The VHDX on-disk layout (MS-VHDX 1.0), one field table per structure, shared by the reader
//! ([`super::open`], [`super::log`]) and the writer ([`super::create`], [`super::write`]).
//! Everything is little-endian; GUIDs are stored in the mixed-endian [`Guid`] order.

use diskferry_layout::field::{Bytes, Field, GuidField, Records, Utf16};
use diskferry_layout::Guid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// The file type identifier: the first 64 KiB of the file.
pub mod ident {
    use super::*;
    pub const LEN: usize = 64 * KIB as usize;
    pub const SIGNATURE: Bytes<8> = Bytes::at(0);
    pub const SIGNATURE_VALUE: &[u8; 8] = b"vhdxfile";
    /// Who created the file, free text.
    pub const CREATOR: Utf16<256> = Utf16::at(8);
}

/// The two headers (4 KiB each, at 64 and 128 KiB): the current one has a valid checksum and
/// the higher sequence number.
pub mod header {
    use super::*;
    pub const OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
    pub const LEN: usize = 4096;
    pub const SIGNATURE: Bytes<4> = Bytes::at(0);
    pub const SIGNATURE_VALUE: &[u8; 4] = b"head";
    /// CRC32C over the 4 KiB header with this field as zero.
    pub const CHECKSUM: Field<u32> = Field::at(4);
    pub const SEQUENCE_NUMBER: Field<u64> = Field::at(8);
    pub const FILE_WRITE_GUID: GuidField = GuidField::at(16);
    pub const DATA_WRITE_GUID: GuidField = GuidField::at(32);
    /// Non-zero when the log holds entries that may need replaying.
    pub const LOG_GUID: GuidField = GuidField::at(48);
    pub const LOG_VERSION: Field<u16> = Field::at(64);
    pub const VERSION: Field<u16> = Field::at(66);
    pub const LOG_LENGTH: Field<u32> = Field::at(68);
    pub const LOG_OFFSET: Field<u64> = Field::at(72);
}

/// The two region tables (64 KiB each, at 192 and 256 KiB): where the BAT and the metadata
/// region are.
pub mod region_table {
    use super::*;
    pub const OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
    pub const LEN: usize = 64 * KIB as usize;
    pub const SIGNATURE: Bytes<4> = Bytes::at(0);
    pub const SIGNATURE_VALUE: &[u8; 4] = b"regi";
    /// CRC32C over the 64 KiB table with this field as zero.
    pub const CHECKSUM: Field<u32> = Field::at(4);
    pub const ENTRY_COUNT: Field<u32> = Field::at(8);
    /// The entries ([`region_entry`]) after the 16-byte table header.
    pub const ENTRIES: Records = Records::new(16, region_entry::LEN);
    /// Most entries the specification allows.
    pub const MAX_ENTRIES: usize = 2047;
}

/// One region table entry.
pub mod region_entry {
    use super::*;
    pub const LEN: usize = 32;
    pub const GUID: GuidField = GuidField::at(0);
    pub const FILE_OFFSET: Field<u64> = Field::at(16);
    pub const LENGTH: Field<u32> = Field::at(24);
    /// Bit 0: a reader that does not know the region must refuse the file.
    pub const REQUIRED: Field<u32> = Field::at(28);

    pub const BAT: Guid = Guid::from_fields(
        0x2DC2_7766,
        0xF623,
        0x4200,
        [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
    );
    pub const METADATA: Guid = Guid::from_fields(
        0x8B7C_A206,
        0x4790,
        0x4B9A,
        [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
    );
}

/// The metadata table at the start of the metadata region; item values follow at the
/// offsets its entries give (from 64 KiB into the region).
pub mod metadata_table {
    use super::*;
    pub const SIGNATURE: Bytes<8> = Bytes::at(0);
    pub const SIGNATURE_VALUE: &[u8; 8] = b"metadata";
    pub const ENTRY_COUNT: Field<u16> = Field::at(10);
    /// The entries ([`metadata_entry`]) after the 32-byte table header.
    pub const ENTRIES: Records = Records::new(32, metadata_entry::LEN);
    pub const MAX_ENTRIES: usize = 2047;
    /// Where item values start (the table itself is 64 KiB).
    pub const VALUES_OFFSET: usize = 64 * KIB as usize;
}

/// One metadata table entry, and the items diskferry reads and writes.
pub mod metadata_entry {
    use super::*;
    pub const LEN: usize = 32;
    pub const ITEM_ID: GuidField = GuidField::at(0);
    /// Offset of the value from the start of the metadata region.
    pub const OFFSET: Field<u32> = Field::at(16);
    pub const LENGTH: Field<u32> = Field::at(20);
    pub const FLAGS: Field<u32> = Field::at(24);
    pub const FLAG_IS_USER: u32 = 1 << 0;
    pub const FLAG_IS_VIRTUAL_DISK: u32 = 1 << 1;
    pub const FLAG_IS_REQUIRED: u32 = 1 << 2;

    /// Value: [`file_parameters`](super::file_parameters).
    pub const FILE_PARAMETERS: Guid = Guid::from_fields(
        0xCAA1_6737,
        0xFA36,
        0x4D43,
        [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
    );
    /// Value: the virtual size in bytes, `u64`.
    pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
        0x2FA5_4224,
        0xCD1B,
        0x4876,
        [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
    );
    /// Value: a GUID naming the virtual disk.
    pub const VIRTUAL_DISK_ID: Guid = Guid::from_fields(
        0xBECA_12AB,
        0xB2E6,
        0x4523,
        [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
    );
    /// Value: 512 or 4096, `u32`.
    pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
        0x8141_BF1D,
        0xA96F,
        0x4709,
        [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
    );
    /// Value: 512 or 4096, `u32`.
    pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
        0xCDA3_48C7,
        0x445D,
        0x4471,
        [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
    );
}

/// The file parameters item.
pub mod file_parameters {
    use super::*;
    pub const LEN: usize = 8;
    pub const BLOCK_SIZE: Field<u32> = Field::at(0);
    pub const FLAGS: Field<u32> = Field::at(4);
    pub const FLAG_LEAVE_BLOCKS_ALLOCATED: u32 = 1 << 0;
    pub const FLAG_HAS_PARENT: u32 = 1 << 1;
}

/// Items holding one integer at their start (virtual disk size, sector sizes).
pub mod scalar_item {
    use super::*;
    pub const U64: Field<u64> = Field::at(0);
    pub const U32: Field<u32> = Field::at(0);
}

/// BAT entries: a state in bits 0..3 and the block's file offset in MiB in bits 20..64.
/// Payload block `b` is entry `b + b / chunk_ratio`: after every chunk ratio payload entries
/// comes one sector-bitmap entry.
pub mod bat {
    use super::MIB;
    pub const ENTRY_LEN: u64 = 8;
    pub const NOT_PRESENT: u64 = 0;
    pub const UNDEFINED: u64 = 1;
    pub const ZERO: u64 = 2;
    pub const UNMAPPED: u64 = 3;
    pub const FULLY_PRESENT: u64 = 6;
    pub const PARTIALLY_PRESENT: u64 = 7;
    const STATE_MASK: u64 = 7;
    const OFFSET_SHIFT: u32 = 20;

    pub fn state(entry: u64) -> u64 {
        entry & STATE_MASK
    }

    /// The block's offset in the file, in bytes.
    pub fn file_offset(entry: u64) -> u64 {
        (entry >> OFFSET_SHIFT) * MIB
    }

    /// An entry for a block in `state` at `file_offset` (a multiple of 1 MiB).
    pub fn entry(state: u64, file_offset: u64) -> u64 {
        state | ((file_offset / MIB) << OFFSET_SHIFT)
    }

    /// Payload blocks per sector-bitmap block: one bitmap sector maps 2^23 logical sectors.
    pub fn chunk_ratio(logical_sector: u32, block_size: u64) -> u64 {
        ((1u64 << 23) * u64::from(logical_sector)) / block_size
    }

    /// The BAT index of payload block `block`.
    pub fn index(block: u64, chunk_ratio: u64) -> u64 {
        block + block / chunk_ratio
    }

    /// Entries needed to map `blocks` payload blocks (the last one's index plus one).
    pub fn entries(blocks: u64, chunk_ratio: u64) -> u64 {
        blocks + (blocks - 1) / chunk_ratio
    }
}

/// A log entry's header, at the start of its first 4 KiB sector.
pub mod log_entry {
    use super::*;
    pub const SIGNATURE: Bytes<4> = Bytes::at(0);
    pub const SIGNATURE_VALUE: &[u8; 4] = b"loge";
    /// CRC32C over the whole entry with this field as zero.
    pub const CHECKSUM: Field<u32> = Field::at(4);
    pub const ENTRY_LENGTH: Field<u32> = Field::at(8);
    pub const TAIL: Field<u32> = Field::at(12);
    pub const SEQUENCE_NUMBER: Field<u64> = Field::at(16);
    pub const DESCRIPTOR_COUNT: Field<u32> = Field::at(24);
    pub const LOG_GUID: GuidField = GuidField::at(32);
    pub const FLUSHED_FILE_OFFSET: Field<u64> = Field::at(48);
    pub const LAST_FILE_OFFSET: Field<u64> = Field::at(56);
    /// The descriptors ([`log_descriptor`]) after the 64-byte header.
    pub const DESCRIPTORS: Records = Records::new(64, log_descriptor::LEN);
}

/// A log descriptor: `zero` (zero a range) or `desc` (write one 4 KiB sector, whose middle
/// comes from the next data sector and whose first 8 and last 4 bytes are kept here).
pub mod log_descriptor {
    use super::*;
    pub const LEN: usize = 32;
    pub const SIGNATURE: Bytes<4> = Bytes::at(0);
    pub const ZERO_SIGNATURE: &[u8; 4] = b"zero";
    pub const DATA_SIGNATURE: &[u8; 4] = b"desc";
    /// `desc`: the sector's last 4 bytes.
    pub const TRAILING_BYTES: Bytes<4> = Bytes::at(4);
    /// `desc`: the sector's first 8 bytes.
    pub const LEADING_BYTES: Bytes<8> = Bytes::at(8);
    /// `zero`: how many bytes to zero.
    pub const ZERO_LENGTH: Field<u64> = Field::at(8);
    pub const FILE_OFFSET: Field<u64> = Field::at(16);
    pub const SEQUENCE_NUMBER: Field<u64> = Field::at(24);
}

/// A log data sector: the middle 4084 bytes of a sector a `desc` descriptor writes, between
/// the two halves of the entry's sequence number.
pub mod log_data {
    use super::*;
    pub const SIGNATURE: Bytes<4> = Bytes::at(0);
    pub const SIGNATURE_VALUE: &[u8; 4] = b"data";
    pub const SEQUENCE_HIGH: Field<u32> = Field::at(4);
    /// The data: bytes 8..4092 of the sector written.
    pub const DATA: std::ops::Range<usize> = 8..4092;
    pub const SEQUENCE_LOW: Field<u32> = Field::at(4092);
}

/// CRC32C of `data` with its 4-byte checksum `field` taken as zero.
pub fn checksum(data: &[u8], field: Field<u32>) -> u32 {
    let (before, after) = field.around(data);
    let c = crc32c::crc32c(before);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, after)
}

/// Stores the checksum of `data` in its `field`.
pub fn seal(data: &mut [u8], field: Field<u32>) {
    let crc = checksum(data, field);
    field.set(data, crc);
}
