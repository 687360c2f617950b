//! The FAT on-disk layout (Microsoft's FAT specification, "FAT: General Overview of On-Disk
//! Format" 1.03), one field table per structure, shared by the reader (`fat.rs`) and the
//! writer's finishing pass (`fat_write.rs`; `fatfs` formats). Little-endian.

use diskferry_layout::field::{Bytes, Field};

/// The BIOS parameter block fields every FAT type shares, in the boot sector.
pub mod bpb {
    use super::*;
    pub const JUMP: Bytes<3> = Bytes::at(0);
    pub const OEM_NAME: Bytes<8> = Bytes::at(3);
    pub const BYTES_PER_SECTOR: Field<u16> = Field::at(11);
    pub const SECTORS_PER_CLUSTER: Field<u8> = Field::at(13);
    pub const RESERVED_SECTORS: Field<u16> = Field::at(14);
    pub const NUM_FATS: Field<u8> = Field::at(16);
    /// Entries of the fixed root directory (FAT12/16; 0 on FAT32).
    pub const ROOT_ENTRIES: Field<u16> = Field::at(17);
    /// 0: the count is in [`TOTAL_SECTORS_32`].
    pub const TOTAL_SECTORS_16: Field<u16> = Field::at(19);
    pub const MEDIA: Field<u8> = Field::at(21);
    /// 0 on FAT32: the size is in [`fat32::FAT_SIZE_32`](super::fat32::FAT_SIZE_32).
    pub const FAT_SIZE_16: Field<u16> = Field::at(22);
    pub const SECTORS_PER_TRACK: Field<u16> = Field::at(24);
    pub const NUM_HEADS: Field<u16> = Field::at(26);
    pub const HIDDEN_SECTORS: Field<u32> = Field::at(28);
    pub const TOTAL_SECTORS_32: Field<u32> = Field::at(32);
    /// The boot sector ends with 0x55 0xAA.
    pub const BOOT_SIGNATURE: Bytes<2> = Bytes::at(510);
    pub const BOOT_SIGNATURE_VALUE: [u8; 2] = [0x55, 0xAA];
    /// Bytes of the boot sector.
    pub const LEN: usize = 512;
}

/// The extended BPB of FAT12 and FAT16, from byte 36.
pub mod fat16 {
    use super::*;
    pub const DRIVE_NUMBER: Field<u8> = Field::at(36);
    /// 0x29: the three fields after it are present.
    pub const BOOT_SIGNATURE: Field<u8> = Field::at(38);
    pub const VOLUME_ID: Field<u32> = Field::at(39);
    pub const VOLUME_LABEL: Bytes<11> = Bytes::at(43);
    /// "FAT12   ", "FAT16   " or "FAT     " (informational only).
    pub const FS_TYPE: Bytes<8> = Bytes::at(54);
}

/// The extended BPB of FAT32, from byte 36.
pub mod fat32 {
    use super::*;
    pub const FAT_SIZE_32: Field<u32> = Field::at(36);
    pub const EXT_FLAGS: Field<u16> = Field::at(40);
    pub const FS_VERSION: Field<u16> = Field::at(42);
    /// The first cluster of the root directory.
    pub const ROOT_CLUSTER: Field<u32> = Field::at(44);
    pub const FS_INFO: Field<u16> = Field::at(48);
    pub const BACKUP_BOOT_SECTOR: Field<u16> = Field::at(50);
    pub const DRIVE_NUMBER: Field<u8> = Field::at(64);
    pub const BOOT_SIGNATURE: Field<u8> = Field::at(66);
    pub const VOLUME_ID: Field<u32> = Field::at(67);
    pub const VOLUME_LABEL: Bytes<11> = Bytes::at(71);
    /// "FAT32   " (informational only).
    pub const FS_TYPE: Bytes<8> = Bytes::at(82);
}

/// A 32-byte short directory entry.
pub mod dirent {
    use super::*;
    pub const LEN: usize = 32;
    /// The 8.3 name: base padded with spaces, then the extension.
    pub const NAME: Bytes<11> = Bytes::at(0);
    pub const BASE: Bytes<8> = Bytes::at(0);
    pub const EXTENSION: Bytes<3> = Bytes::at(8);
    pub const ATTR: Field<u8> = Field::at(11);
    /// Windows NT case flags: [`NT_LOWER_BASE`], [`NT_LOWER_EXTENSION`].
    pub const NT_CASE: Field<u8> = Field::at(12);
    /// Hundredths of a second (0..=199) added to the creation time.
    pub const CREATION_CENTIS: Field<u8> = Field::at(13);
    pub const CREATION_TIME: Field<u16> = Field::at(14);
    pub const CREATION_DATE: Field<u16> = Field::at(16);
    pub const ACCESS_DATE: Field<u16> = Field::at(18);
    /// The high 16 bits of the first cluster (FAT32; zero on FAT12/16).
    pub const FIRST_CLUSTER_HI: Field<u16> = Field::at(20);
    pub const WRITE_TIME: Field<u16> = Field::at(22);
    pub const WRITE_DATE: Field<u16> = Field::at(24);
    pub const FIRST_CLUSTER_LO: Field<u16> = Field::at(26);
    pub const FILE_SIZE: Field<u32> = Field::at(28);

    /// The name's first byte, which also marks the entry: [`END`], [`DELETED`], or
    /// [`E5_ESCAPE`] for a name that starts with 0xE5.
    pub const FIRST_BYTE: Field<u8> = Field::at(0);
    /// First name byte: the end of the directory; a deleted entry; a name starting with 0xE5.
    pub const END: u8 = 0x00;
    pub const DELETED: u8 = 0xE5;
    pub const E5_ESCAPE: u8 = 0x05;

    pub const ATTR_READ_ONLY: u8 = 0x01;
    pub const ATTR_HIDDEN: u8 = 0x02;
    pub const ATTR_SYSTEM: u8 = 0x04;
    pub const ATTR_VOLUME_ID: u8 = 0x08;
    pub const ATTR_DIRECTORY: u8 = 0x10;
    pub const ATTR_ARCHIVE: u8 = 0x20;
    /// Read-only, hidden, system and volume ID together mark a long-name entry.
    pub const ATTR_LONG_NAME: u8 = 0x0F;
    /// The attribute bits that describe a file rather than the entry's kind.
    pub const ATTR_FILE_BITS: u8 = ATTR_READ_ONLY | ATTR_HIDDEN | ATTR_SYSTEM | ATTR_ARCHIVE;

    pub const NT_LOWER_BASE: u8 = 0x08;
    pub const NT_LOWER_EXTENSION: u8 = 0x10;

    /// The names of a directory's first two entries.
    pub const DOT_NAME: &[u8; 11] = b".          ";
    pub const DOTDOT_NAME: &[u8; 11] = b"..         ";
}

/// A long-name entry: 13 UTF-16 units of the name in three pieces, stored before the short
/// entry in reverse order.
pub mod lfn {
    use super::*;
    /// The piece's number from 1, with [`LAST`] on the first entry stored (the name's end).
    pub const ORDER: Field<u8> = Field::at(0);
    pub const ORDER_MASK: u8 = 0x1F;
    pub const LAST: u8 = 0x40;
    /// Equal to [`dirent::ATTR_LONG_NAME`](super::dirent::ATTR_LONG_NAME) in its low six bits
    /// ([`ATTR_MASK`]; the two high bits are reserved).
    pub const ATTR: Field<u8> = Field::at(11);
    pub const ATTR_MASK: u8 = 0x3F;
    /// The checksum of the short name this long name belongs to.
    pub const CHECKSUM: Field<u8> = Field::at(13);
    /// Byte offsets of the 13 UTF-16 units: 5 at 1, 6 at 14, 2 at 28.
    pub const UNITS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
    pub const UNITS_PER_ENTRY: usize = 13;

    /// Whether the 32-byte entry `e` is a long-name entry.
    pub fn is_long_name(e: &[u8]) -> bool {
        ATTR.get(e) & ATTR_MASK == super::dirent::ATTR_LONG_NAME
    }

    /// The `i`-th UTF-16 unit of this entry's piece of the name.
    pub fn unit(e: &[u8], i: usize) -> u16 {
        Field::<u16>::at(UNITS[i]).get(e)
    }
}

/// The FAT32 FSInfo sector: the free cluster count and where to look for a free cluster, as
/// hints (0xFFFFFFFF: unknown).
pub mod fsinfo {
    use super::*;
    pub const LEAD_SIGNATURE: Field<u32> = Field::at(0);
    pub const LEAD_SIGNATURE_VALUE: u32 = 0x4161_5252;
    pub const STRUCT_SIGNATURE: Field<u32> = Field::at(484);
    pub const STRUCT_SIGNATURE_VALUE: u32 = 0x6141_7272;
    pub const FREE_COUNT: Field<u32> = Field::at(488);
    /// The last cluster allocated: a search for a free one starts after it.
    pub const NEXT_FREE: Field<u32> = Field::at(492);
    pub const TRAIL_SIGNATURE: Field<u32> = Field::at(508);
    pub const TRAIL_SIGNATURE_VALUE: u32 = 0xAA55_0000;
    pub const UNKNOWN: u32 = 0xFFFF_FFFF;
}
