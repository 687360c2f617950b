//! MBR, EBR and GPT on-disk layouts (UEFI 2.10 §5), one field table per structure, shared by
//! the readers (`mbr.rs`, `gpt.rs`) and the writer (`write.rs`). Little-endian; GUIDs in the
//! mixed-endian [`Guid`](diskferry_layout::Guid) order.

use diskferry_layout::field::{Bytes, Field, GuidField, Records, Utf16};

/// Sector 0 of an MBR disk, and an extended boot record (the same layout, with entry 0 the
/// logical partition and entry 1 the link to the next EBR).
pub mod mbr {
    use super::*;
    pub const LEN: usize = 512;
    /// Bytes 0..440: boot code, left as they are on the destination.
    pub const BOOT_CODE_LEN: usize = 440;
    pub const DISK_SIGNATURE: Field<u32> = Field::at(440);
    /// The four partition entries ([`mbr_entry`]).
    pub const ENTRIES: Records = Records::new(446, mbr_entry::LEN);
    pub const BOOT_SIGNATURE: Bytes<2> = Bytes::at(510);
    pub const BOOT_SIGNATURE_VALUE: [u8; 2] = [0x55, 0xAA];
    /// In an EBR: the logical partition (relative to the EBR) and the link to the next EBR
    /// (relative to the extended partition).
    pub const EBR_LOGICAL: usize = 0;
    pub const EBR_NEXT: usize = 1;

    /// Fields of a filesystem's boot sector, which sector 0 holds instead of a partition table
    /// on a disk formatted whole: the OEM name (NTFS, exFAT) and the FAT12/16 and FAT32 file
    /// system type strings (as in the FAT BPB).
    pub const FS_OEM_NAME: Bytes<8> = Bytes::at(3);
    pub const FAT16_FS_TYPE: Bytes<5> = Bytes::at(54);
    pub const FAT32_FS_TYPE: Bytes<5> = Bytes::at(82);
}

/// One 16-byte MBR partition entry.
pub mod mbr_entry {
    use super::*;
    pub const LEN: usize = 16;
    /// 0x80: active (bootable); 0: not.
    pub const STATUS: Field<u8> = Field::at(0);
    pub const FIRST_CHS: Bytes<3> = Bytes::at(1);
    pub const SYSTEM_ID: Field<u8> = Field::at(4);
    pub const LAST_CHS: Bytes<3> = Bytes::at(5);
    pub const FIRST_LBA: Field<u32> = Field::at(8);
    pub const SECTORS: Field<u32> = Field::at(12);

    pub const STATUS_ACTIVE: u8 = 0x80;
    /// The CHS value that says "use the LBA fields".
    pub const CHS_LBA_ONLY: [u8; 3] = [0xFE, 0xFF, 0xFF];
    /// The protective MBR's one entry: type 0xEE from CHS 0/0/2 to the largest CHS.
    pub const PROTECTIVE_ID: u8 = 0xEE;
    pub const PROTECTIVE_FIRST_CHS: [u8; 3] = [0x00, 0x02, 0x00];
    pub const PROTECTIVE_LAST_CHS: [u8; 3] = [0xFF, 0xFF, 0xFF];
    /// System IDs of an extended partition (CHS, LBA, Linux).
    pub const EXTENDED_IDS: [u8; 3] = [0x05, 0x0F, 0x85];
    /// The system ID of the link entries we write in EBRs (extended, CHS addressed).
    pub const EBR_LINK_ID: u8 = 0x05;
}

/// The GPT header, at LBA 1 and (the backup) at the last LBA.
pub mod gpt_header {
    use super::*;
    /// Bytes the header fields cover (the rest of its sector is reserved).
    pub const LEN: usize = 92;
    pub const SIGNATURE: Bytes<8> = Bytes::at(0);
    pub const SIGNATURE_VALUE: &[u8; 8] = b"EFI PART";
    pub const REVISION: Field<u32> = Field::at(8);
    pub const REVISION_1_0: u32 = 0x0001_0000;
    pub const HEADER_SIZE: Field<u32> = Field::at(12);
    /// CRC32 over `HEADER_SIZE` bytes with this field as zero.
    pub const HEADER_CRC32: Field<u32> = Field::at(16);
    pub const MY_LBA: Field<u64> = Field::at(24);
    pub const ALTERNATE_LBA: Field<u64> = Field::at(32);
    pub const FIRST_USABLE_LBA: Field<u64> = Field::at(40);
    pub const LAST_USABLE_LBA: Field<u64> = Field::at(48);
    pub const DISK_GUID: GuidField = GuidField::at(56);
    pub const PARTITION_ENTRY_LBA: Field<u64> = Field::at(72);
    pub const NUMBER_OF_PARTITION_ENTRIES: Field<u32> = Field::at(80);
    pub const SIZE_OF_PARTITION_ENTRY: Field<u32> = Field::at(84);
    /// CRC32 of the whole entry array.
    pub const PARTITION_ENTRY_ARRAY_CRC32: Field<u32> = Field::at(88);
}

/// One GPT partition entry (at least 128 bytes; the header gives the stride).
pub mod gpt_entry {
    use super::*;
    pub const LEN: usize = 128;
    /// All zeros: an unused entry.
    pub const TYPE_GUID: GuidField = GuidField::at(0);
    pub const UNIQUE_GUID: GuidField = GuidField::at(16);
    pub const STARTING_LBA: Field<u64> = Field::at(32);
    /// Inclusive.
    pub const ENDING_LBA: Field<u64> = Field::at(40);
    pub const ATTRIBUTES: Field<u64> = Field::at(48);
    pub const NAME: Utf16<36> = Utf16::at(56);
}

/// CRC32 of `data` with its 4-byte checksum `field` taken as zero.
pub fn crc32_with_zero_field(data: &[u8], field: Field<u32>) -> u32 {
    let (before, after) = field.around(data);
    let mut h = crc32fast::Hasher::new();
    h.update(before);
    h.update(&[0; 4]);
    h.update(after);
    h.finalize()
}
