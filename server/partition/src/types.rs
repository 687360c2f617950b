//! Readable names for MBR system IDs and GPT partition type GUIDs.

use super::{Guid, PartitionType};

/// Well-known GPT partition type GUIDs.
pub mod gpt_types {
    pub const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    pub const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
    pub const MICROSOFT_BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
    pub const MICROSOFT_RESERVED: &str = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE";
    pub const WINDOWS_RECOVERY: &str = "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC";
    pub const LINUX_FILESYSTEM: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    pub const LINUX_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
    pub const LINUX_LVM: &str = "E6D6D379-F507-44C2-A23C-238F2A3DF928";
    pub const LINUX_RAID: &str = "A19D880F-05FC-4D3B-A006-743F0F84911E";
    pub const LINUX_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    pub const LINUX_HOME: &str = "933AC7E1-2EB4-4F13-B844-0E14E2AEF915";
    pub const LINUX_LUKS: &str = "CA7D7CCB-63ED-4C53-861C-1742536059CC";
}

const GPT_NAMES: &[(&str, &str)] = &[
    (gpt_types::EFI_SYSTEM, "EFI System"),
    (gpt_types::BIOS_BOOT, "BIOS boot"),
    (gpt_types::MICROSOFT_BASIC_DATA, "Microsoft basic data"),
    (gpt_types::MICROSOFT_RESERVED, "Microsoft reserved"),
    (gpt_types::WINDOWS_RECOVERY, "Windows recovery"),
    (gpt_types::LINUX_FILESYSTEM, "Linux filesystem"),
    (gpt_types::LINUX_SWAP, "Linux swap"),
    (gpt_types::LINUX_LVM, "Linux LVM"),
    (gpt_types::LINUX_RAID, "Linux RAID"),
    (gpt_types::LINUX_ROOT_X86_64, "Linux root (x86-64)"),
    (gpt_types::LINUX_HOME, "Linux home"),
    (gpt_types::LINUX_LUKS, "Linux LUKS"),
];

const MBR_NAMES: &[(u8, &str)] = &[
    (0x01, "FAT12"),
    (0x04, "FAT16 <32M"),
    (0x05, "Extended"),
    (0x06, "FAT16"),
    (0x07, "HPFS/NTFS/exFAT"),
    (0x0B, "W95 FAT32"),
    (0x0C, "W95 FAT32 (LBA)"),
    (0x0E, "W95 FAT16 (LBA)"),
    (0x0F, "W95 extended (LBA)"),
    (0x11, "Hidden FAT12"),
    (0x17, "Hidden HPFS/NTFS"),
    (0x1B, "Hidden W95 FAT32"),
    (0x1C, "Hidden W95 FAT32 (LBA)"),
    (0x27, "Windows recovery"),
    (0x82, "Linux swap"),
    (0x83, "Linux"),
    (0x85, "Linux extended"),
    (0x8E, "Linux LVM"),
    (0xA5, "FreeBSD"),
    (0xEE, "GPT protective"),
    (0xEF, "EFI System"),
    (0xFD, "Linux RAID"),
];

/// "EFI System", "Linux filesystem", ... or the raw code when unknown.
pub fn type_name(kind: &PartitionType) -> String {
    match kind {
        PartitionType::Mbr(id) => MBR_NAMES
            .iter()
            .find(|(code, _)| code == id)
            .map_or_else(|| format!("type 0x{id:02X}"), |(_, n)| (*n).to_string()),
        PartitionType::Gpt(guid) => {
            let text = guid.to_string();
            GPT_NAMES
                .iter()
                .find(|(g, _)| *g == text)
                .map_or(text, |(_, n)| (*n).to_string())
        }
    }
}

/// Whether `kind` is an EFI System Partition (GPT type `C12A7328-…` or MBR type 0xEF).
pub fn is_efi_system(kind: &PartitionType) -> bool {
    match kind {
        PartitionType::Gpt(g) => Some(*g) == Guid::parse(gpt_types::EFI_SYSTEM),
        PartitionType::Mbr(id) => *id == 0xef,
    }
}

/// Whether `kind` is a BIOS boot partition (GRUB's core image, no filesystem).
pub fn is_bios_boot(kind: &PartitionType) -> bool {
    matches!(kind, PartitionType::Gpt(g) if Some(*g) == Guid::parse(gpt_types::BIOS_BOOT))
}
