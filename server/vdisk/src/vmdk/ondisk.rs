//! The VMDK hosted sparse extent layout (VMware's Virtual Disk Format 5.0): the "KDMV" header,
//! grain directory and grain table entries, the stream-optimized markers, and the embedded
//! descriptor we write. Everything is little-endian; offsets and sizes count 512-byte sectors.

use diskferry_layout::field::{Bytes, Field};

pub const SECTOR: u64 = 512;

/// The sparse extent header (the first sector; a stream-optimized image repeats it as its
/// footer, with the grain directory's real offset).
pub mod header {
    use super::*;
    pub const LEN: usize = 512;
    pub const MAGIC: Bytes<4> = Bytes::at(0);
    pub const MAGIC_VALUE: &[u8; 4] = b"KDMV";
    pub const VERSION: Field<u32> = Field::at(4);
    pub const FLAGS: Field<u32> = Field::at(8);
    /// The extent's size in sectors.
    pub const CAPACITY: Field<u64> = Field::at(12);
    /// Sectors per grain.
    pub const GRAIN_SIZE: Field<u64> = Field::at(20);
    pub const DESCRIPTOR_OFFSET: Field<u64> = Field::at(28);
    pub const DESCRIPTOR_SIZE: Field<u64> = Field::at(36);
    pub const GTES_PER_GT: Field<u32> = Field::at(44);
    /// The redundant grain directory.
    pub const RGD_OFFSET: Field<u64> = Field::at(48);
    /// The grain directory, or [`GD_AT_END`] in a stream-optimized header.
    pub const GD_OFFSET: Field<u64> = Field::at(56);
    /// Sectors of metadata before the first grain.
    pub const OVERHEAD: Field<u64> = Field::at(64);
    pub const UNCLEAN_SHUTDOWN: Field<u8> = Field::at(72);
    /// "\n \r\n": a file mangled by a text-mode transfer fails this check.
    pub const NEWLINE_CHECK: Bytes<4> = Bytes::at(73);
    pub const NEWLINE_CHECK_VALUE: &[u8; 4] = b"\n \r\n";
    pub const COMPRESS_ALGORITHM: Field<u16> = Field::at(77);

    pub const FLAG_NEWLINE_CHECK: u32 = 1 << 0;
    pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
    /// Grain table entries of 1 mean "zeros".
    pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
    pub const FLAG_COMPRESSED: u32 = 1 << 16;
    pub const FLAG_MARKERS: u32 = 1 << 17;
    pub const COMPRESS_DEFLATE: u16 = 1;
    pub const GD_AT_END: u64 = u64::MAX;
}

/// Stream-optimized markers, each at the start of a sector. A grain marker is followed by the
/// grain's zlib stream; a metadata marker fills its sector and precedes `VALUE` sectors of
/// metadata.
pub mod marker {
    use super::*;
    pub const LEN: usize = 512;
    /// A grain's first virtual sector, or a metadata marker's length in sectors.
    pub const VALUE: Field<u64> = Field::at(0);
    /// A grain's compressed bytes; zero in a metadata marker.
    pub const SIZE: Field<u32> = Field::at(8);
    pub const TYPE: Field<u32> = Field::at(12);
    /// Where a grain's compressed data starts.
    pub const GRAIN_DATA: usize = 12;

    pub const END_OF_STREAM: u32 = 0;
    pub const GRAIN_TABLE: u32 = 1;
    pub const GRAIN_DIRECTORY: u32 = 2;
    pub const FOOTER: u32 = 3;
}

/// Grain table entries: a grain's sector, 0 when never written.
pub mod gte {
    pub const LEN: u64 = 4;
    pub const UNALLOCATED: u32 = 0;
    /// With [`super::header::FLAG_ZERO_GRAIN`]: the grain reads as zeros.
    pub const ZERO: u32 = 1;
}

/// Our images' grains (64 KiB), grain tables (512 entries) and embedded descriptor (20
/// sectors from sector 1), as qemu-img and VMware lay them out.
pub const GRAIN_SECTORS: u64 = 128;
pub const GTES_PER_GT: u64 = 512;
pub const DESCRIPTOR_OFFSET: u64 = 1;
pub const DESCRIPTOR_SECTORS: u64 = 20;

/// The embedded descriptor of a one-extent image of `capacity` sectors named `file_name`.
pub fn descriptor(cid: u32, create_type: &str, capacity: u64, file_name: &str) -> String {
    let cylinders = (capacity / (255 * 63)).clamp(1, 65535);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
         createType=\"{create_type}\"\n\n# Extent description\n\
         RW {capacity} SPARSE \"{file_name}\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"lsilogic\"\n"
    )
}
