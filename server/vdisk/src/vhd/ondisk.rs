//! The VHD on-disk layout (Microsoft's Virtual Hard Disk Image Format Specification 1.0): the
//! 512-byte footer, the dynamic disk header, BAT entries, the footer checksum and the CHS
//! geometry the specification derives from a size. Everything is big-endian.

use diskferry_layout::field::{Be, Bytes, Field};

pub const SECTOR: u64 = 512;

/// The hard disk footer: the last 512 bytes of every VHD, and for dynamic disks a copy in the
/// first 512 bytes.
pub mod footer {
    use super::*;
    pub const LEN: usize = 512;
    pub const COOKIE: Bytes<8> = Bytes::at(0);
    pub const COOKIE_VALUE: &[u8; 8] = b"conectix";
    /// Bit 1 is reserved and always set.
    pub const FEATURES: Field<u32, Be> = Field::at(8);
    pub const FEATURES_RESERVED: u32 = 2;
    pub const VERSION: Field<u32, Be> = Field::at(12);
    pub const VERSION_1_0: u32 = 0x0001_0000;
    /// The dynamic disk header's offset; all ones for a fixed disk.
    pub const DATA_OFFSET: Field<u64, Be> = Field::at(16);
    /// Seconds since 2000-01-01 00:00 UTC.
    pub const TIMESTAMP: Field<u32, Be> = Field::at(24);
    pub const CREATOR_APP: Bytes<4> = Bytes::at(28);
    pub const CREATOR_VERSION: Field<u32, Be> = Field::at(32);
    pub const CREATOR_OS: Bytes<4> = Bytes::at(36);
    pub const ORIGINAL_SIZE: Field<u64, Be> = Field::at(40);
    pub const CURRENT_SIZE: Field<u64, Be> = Field::at(48);
    pub const CYLINDERS: Field<u16, Be> = Field::at(56);
    pub const HEADS: Field<u8, Be> = Field::at(58);
    pub const SECTORS_PER_TRACK: Field<u8, Be> = Field::at(59);
    pub const DISK_TYPE: Field<u32, Be> = Field::at(60);
    /// One's complement of the byte sum of the footer with this field as zero.
    pub const CHECKSUM: Field<u32, Be> = Field::at(64);
    pub const UNIQUE_ID: Bytes<16> = Bytes::at(68);

    pub const TYPE_FIXED: u32 = 2;
    pub const TYPE_DYNAMIC: u32 = 3;
    pub const TYPE_DIFFERENCING: u32 = 4;
    /// Seconds from the Unix epoch to the VHD epoch (2000-01-01).
    pub const EPOCH: u64 = 946_684_800;
}

/// The dynamic disk header (1 KiB, where the footer's data offset points).
pub mod dynamic {
    use super::*;
    pub const LEN: usize = 1024;
    pub const COOKIE: Bytes<8> = Bytes::at(0);
    pub const COOKIE_VALUE: &[u8; 8] = b"cxsparse";
    /// Unused; all ones.
    pub const DATA_OFFSET: Field<u64, Be> = Field::at(8);
    pub const TABLE_OFFSET: Field<u64, Be> = Field::at(16);
    pub const VERSION: Field<u32, Be> = Field::at(24);
    pub const MAX_TABLE_ENTRIES: Field<u32, Be> = Field::at(28);
    pub const BLOCK_SIZE: Field<u32, Be> = Field::at(32);
    pub const CHECKSUM: Field<u32, Be> = Field::at(36);
}

/// BAT entries: the sector of a block's bitmap, which the block's data follows.
pub mod bat {
    pub const ENTRY_LEN: u64 = 4;
    pub const UNUSED: u32 = u32::MAX;
}

/// The block size of the dynamic disks we create (the specification's default).
pub const BLOCK_SIZE: u64 = 2 << 20;

/// Bytes of the sector bitmap before each block: one bit per sector, in whole sectors.
pub fn bitmap_len(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR)
}

/// The checksum of a footer or dynamic header: the one's complement of the sum of its bytes,
/// the checksum field counted as zero.
pub fn checksum(b: &[u8], field: Field<u32, Be>) -> u32 {
    let (before, after) = field.around(b);
    let sum = before
        .iter()
        .chain(after)
        .fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
    !sum
}

/// Stores the checksum of `b` in its `field`.
pub fn seal(b: &mut [u8], field: Field<u32, Be>) {
    let sum = checksum(b, field);
    field.set(b, sum);
}

/// Cylinders, heads and sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chs {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Chs {
    /// The largest geometry: images this size or larger are sized by the footer alone.
    pub const MAX: Chs = Chs {
        cylinders: 65535,
        heads: 16,
        sectors: 255,
    };

    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }

    /// The geometry the specification computes for `total` sectors (it may cover fewer).
    pub fn for_sectors(total: u64) -> Chs {
        let total = total.min(Chs::MAX.total_sectors());
        let (sectors, heads, cyl_heads) = if total >= 65535 * 16 * 63 {
            (255, 16, total / 255)
        } else {
            let mut spt = 17;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                (spt, heads) = (31, 16);
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                (spt, heads) = (63, 16);
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        Chs {
            cylinders: (cyl_heads / heads).min(65535) as u16,
            heads: heads as u8,
            sectors: sectors as u8,
        }
    }
}

/// The creator applications whose images are sized by the footer's current size rather than
/// by their geometry, as qemu reads them (Hyper-V, qemu with force-size, Disk2vhd, XenConverter,
/// XenServer). Other images are as large as their geometry, unless it is [`Chs::MAX`].
pub const SIZED_BY_FOOTER: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];

/// The creator application we record.
pub const CREATOR_APP: &[u8; 4] = b"dfry";
