//! Naming the filesystem (or other content) on a device from its on-disk signatures, plus the
//! label and UUID where the signature block carries them.

use crate::ext4::ondisk::sb as ext_sb;
use crate::fat::ondisk::{bpb, fat32};
use diskferry_blockdev::{BlockDevice, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsKind {
    Ntfs,
    Ext2,
    Ext3,
    Ext4,
    Fat12,
    Fat16,
    Fat32,
    ExFat,
    Xfs,
    Btrfs,
    Swap,
    LvmPv,
    Luks,
    Unknown,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ntfs => "ntfs",
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Fat12 => "fat12",
            FsKind::Fat16 => "fat16",
            FsKind::Fat32 => "fat32",
            FsKind::ExFat => "exfat",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Swap => "swap",
            FsKind::LvmPv => "lvm2-pv",
            FsKind::Luks => "luks",
            FsKind::Unknown => "unknown",
        }
    }

    /// Whether diskferry can read files from it.
    pub fn readable(self) -> bool {
        matches!(
            self,
            FsKind::Ext2
                | FsKind::Ext3
                | FsKind::Ext4
                | FsKind::Fat12
                | FsKind::Fat16
                | FsKind::Fat32
                | FsKind::Ntfs
        )
    }
}

/// Names what `dev` holds by the signatures in its first 68 KiB.
pub fn detect(dev: &dyn BlockDevice) -> Result<FsKind> {
    let len = dev.size().min(68 * 1024) as usize;
    let mut b = vec![0u8; 68 * 1024];
    dev.read_at(&mut b[..len], 0)?;
    Ok(classify(&b))
}

/// The classification of a device's first 68 KiB (zero-padded if shorter).
pub fn classify(b: &[u8]) -> FsKind {
    // NTFS and exFAT keep the BPB's OEM-name slot for their signature.
    let oem = bpb::OEM_NAME.get(b);
    if &oem == b"NTFS    " {
        return FsKind::Ntfs;
    }
    if &oem == b"EXFAT   " {
        return FsKind::ExFat;
    }
    if &b[..6] == b"LUKS\xba\xbe" {
        return FsKind::Luks;
    }
    if &b[..4] == b"XFSB" {
        return FsKind::Xfs;
    }
    let sb = &b[ext_sb::OFFSET as usize..ext_sb::OFFSET as usize + ext_sb::SIZE];
    if ext_sb::MAGIC.get(sb) == ext_sb::MAGIC_VALUE {
        let compat = ext_sb::FEATURE_COMPAT.get(sb);
        let incompat = ext_sb::FEATURE_INCOMPAT.get(sb);
        let ro_compat = ext_sb::FEATURE_RO_COMPAT.get(sb);
        // Features beyond ext3's (filetype, recover, journal device; sparse_super,
        // large_file, btree_dir) — extents, 64bit, flex_bg, huge_file, metadata_csum, ... —
        // mark ext4.
        return if incompat & !0x16 != 0 || ro_compat & !0x7 != 0 {
            FsKind::Ext4
        } else if compat & ext_sb::COMPAT_HAS_JOURNAL != 0 {
            FsKind::Ext3
        } else {
            FsKind::Ext2
        };
    }
    if &b[65536 + 64..65536 + 72] == b"_BHRfS_M" {
        return FsKind::Btrfs;
    }
    if (0..4).any(|s| {
        &b[s * 512..s * 512 + 8] == b"LABELONE" && &b[s * 512 + 24..s * 512 + 32] == b"LVM2 001"
    }) {
        return FsKind::LvmPv;
    }
    if &b[4096 - 10..4096] == b"SWAPSPACE2" || &b[4096 - 10..4096] == b"SWAP-SPACE" {
        return FsKind::Swap;
    }
    if let Some(kind) = fat_kind(b) {
        return kind;
    }
    FsKind::Unknown
}

/// FAT12/16/32 by the BPB's geometry (the type string is only a hint): FAT32 when the BPB has
/// no 16-bit FAT size, otherwise the cluster count decides, as the specification says.
fn fat_kind(b: &[u8]) -> Option<FsKind> {
    if bpb::BOOT_SIGNATURE.get(b) != bpb::BOOT_SIGNATURE_VALUE || !(b[0] == 0xEB || b[0] == 0xE9) {
        return None;
    }
    let bytes_per_sector = u32::from(bpb::BYTES_PER_SECTOR.get(b));
    let per_cluster = u32::from(bpb::SECTORS_PER_CLUSTER.get(b));
    let reserved = u32::from(bpb::RESERVED_SECTORS.get(b));
    let fats = u32::from(bpb::NUM_FATS.get(b));
    let root_entries = u32::from(bpb::ROOT_ENTRIES.get(b));
    let total16 = u32::from(bpb::TOTAL_SECTORS_16.get(b));
    let fat16 = u32::from(bpb::FAT_SIZE_16.get(b));
    let total = if total16 != 0 {
        total16
    } else {
        bpb::TOTAL_SECTORS_32.get(b)
    };
    let fat_size = if fat16 != 0 {
        fat16
    } else {
        fat32::FAT_SIZE_32.get(b)
    };
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        || !per_cluster.is_power_of_two()
        || reserved == 0
        || !(1..=4).contains(&fats)
        || total == 0
        || fat_size == 0
    {
        return None;
    }
    let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
    let data = total.checked_sub(reserved + fats * fat_size + root_sectors)?;
    let clusters = data / per_cluster;
    // A BPB without a 16-bit FAT size is laid out as FAT32 whatever its cluster count (what
    // mkfs.vfat -F 32 writes on small volumes, and what Linux and mtools go by).
    if fat16 == 0 {
        return Some(FsKind::Fat32);
    }
    Some(if clusters < 4085 {
        FsKind::Fat12
    } else if clusters < 65525 {
        FsKind::Fat16
    } else {
        FsKind::Fat32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_classify_without_panicking() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut b = vec![0u8; 68 * 1024];
        for _ in 0..200 {
            rng.fill(&mut b[..]);
            b[510] = 0x55;
            b[511] = 0xAA;
            b[0] = 0xEB;
            let _ = classify(&b);
        }
        assert_eq!(classify(&vec![0u8; 68 * 1024]), FsKind::Unknown);
    }
}
