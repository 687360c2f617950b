//! Formatting a FAT12/16/32 volume of 512-byte sectors for the writer (`fatfs` 0.3 cannot
//! choose the reserved sectors, hidden sectors or OEM name): the layout worked out from the
//! options ([`Layout::plan`]) — a rebuild's source fields ([`BootFields`]: reserved sectors,
//! FAT count and size, root directory entries, media, geometry, OEM name) kept — then the boot
//! sector, on FAT32 the FSInfo sector and the backup boot sector, empty FATs and an empty
//! root directory holding the volume label. Free clusters are left as they are.
//! [`finish_fsinfo`] sets FSInfo's free count and last-allocated hint from the finished
//! volume.

use super::FatOptions;
use crate::fat::ondisk::{bpb, dirent, fat16, fat32, fsinfo};
use crate::{FsError, FsKind, Result};
use diskferry_blockdev::BlockDevice;
use std::sync::Arc;

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

/// The boot-sector fields a rebuild keeps from its source (whose sectors are 512 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFields {
    pub oem_name: [u8; 8],
    pub reserved_sectors: u16,
    pub fats: u8,
    /// Entries of the fixed root directory (0 on FAT32).
    pub root_entries: u16,
    /// Sectors of one FAT, kept when the volume needs no more (a larger FAT than needed keeps
    /// the source's data area where it was, e.g. aligned to clusters).
    pub fat_sectors: u32,
    /// The volume's sectors (the layout sets them from the device).
    pub total_sectors: u32,
    /// Sectors of the device past the volume's end, kept past the new volume's end: on a
    /// device of the source's size the volume has the source's size; on a resized one it
    /// follows the size.
    pub spare_sectors: u32,
    pub media: u8,
    pub sectors_per_track: u16,
    pub heads: u16,
    pub drive_number: u8,
    /// The source's own; [`FatOptions::hidden_sectors`] takes precedence.
    pub hidden_sectors: u32,
    /// FAT32: the sectors of FSInfo and of the backup boot sector (0: none).
    pub fs_info_sector: u16,
    pub backup_boot_sector: u16,
}

impl BootFields {
    /// The fields of boot sector `b` of a `kind` volume on a device of `device_bytes`;
    /// `None` unless its sectors are 512 bytes (the only size the writer makes).
    pub fn from_boot_sector(b: &[u8], kind: FsKind, device_bytes: u64) -> Option<BootFields> {
        if u64::from(bpb::BYTES_PER_SECTOR.get(b)) != SECTOR {
            return None;
        }
        let fat32 = kind == FsKind::Fat32;
        let total = match bpb::TOTAL_SECTORS_16.get(b) {
            0 => bpb::TOTAL_SECTORS_32.get(b),
            n => u32::from(n),
        };
        let device_sectors = u32::try_from(device_bytes / SECTOR).unwrap_or(u32::MAX);
        Some(BootFields {
            oem_name: bpb::OEM_NAME.get(b),
            reserved_sectors: bpb::RESERVED_SECTORS.get(b),
            fats: bpb::NUM_FATS.get(b),
            root_entries: bpb::ROOT_ENTRIES.get(b),
            fat_sectors: match bpb::FAT_SIZE_16.get(b) {
                0 => fat32::FAT_SIZE_32.get(b),
                n => u32::from(n),
            },
            total_sectors: total,
            spare_sectors: device_sectors.saturating_sub(total),
            media: bpb::MEDIA.get(b),
            sectors_per_track: bpb::SECTORS_PER_TRACK.get(b),
            heads: bpb::NUM_HEADS.get(b),
            drive_number: if fat32 {
                fat32::DRIVE_NUMBER.get(b)
            } else {
                fat16::DRIVE_NUMBER.get(b)
            },
            hidden_sectors: bpb::HIDDEN_SECTORS.get(b),
            fs_info_sector: if fat32 { fat32::FS_INFO.get(b) } else { 0 },
            backup_boot_sector: if fat32 {
                fat32::BACKUP_BOOT_SECTOR.get(b)
            } else {
                0
            },
        })
    }

    /// What a new `kind` volume of `total` sectors gets.
    fn defaults(kind: FsKind, total: u32) -> BootFields {
        let fat32 = kind == FsKind::Fat32;
        BootFields {
            oem_name: *b"MSWIN4.1",
            reserved_sectors: if fat32 { 32 } else { 1 },
            fats: 2,
            root_entries: if fat32 { 0 } else { 512 },
            fat_sectors: 0,
            total_sectors: total,
            spare_sectors: 0,
            media: 0xF8,
            sectors_per_track: 32,
            heads: 64,
            drive_number: if kind == FsKind::Fat12 { 0 } else { 0x80 },
            hidden_sectors: 0,
            fs_info_sector: if fat32 { 1 } else { 0 },
            backup_boot_sector: if fat32 { 6 } else { 0 },
        }
    }

    /// Why these fields cannot make a `kind` volume, if they cannot.
    fn check(&self, kind: FsKind) -> std::result::Result<(), String> {
        let fat32 = kind == FsKind::Fat32;
        let backup_ok = |s: u16| s == 0 || s == 0xFFFF || s < self.reserved_sectors;
        if self.reserved_sectors == 0 || !(1..=4).contains(&self.fats) {
            return Err(format!(
                "{} reserved sectors and {} FATs",
                self.reserved_sectors, self.fats
            ));
        }
        if fat32 && self.root_entries != 0 {
            return Err("FAT32 has no fixed root directory".into());
        }
        let fs_info_ok = (1..self.reserved_sectors).contains(&self.fs_info_sector);
        if fat32 && !(fs_info_ok && backup_ok(self.backup_boot_sector)) {
            return Err(
                "FSInfo or the backup boot sector lies outside the reserved sectors".into(),
            );
        }
        if !fat32 && self.root_entries == 0 {
            return Err("FAT12 and FAT16 need a root directory".into());
        }
        Ok(())
    }
}

/// Where everything of a new volume goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub kind: FsKind,
    pub sectors_per_cluster: u32,
    pub fat_sectors: u32,
    pub clusters: u32,
    pub boot: BootFields,
}

impl Layout {
    /// The layout `opts` asks for on a device of `device_sectors` sectors. Without a type,
    /// the first of FAT32, FAT16 and FAT12 whose cluster count suits it.
    pub fn plan(device_sectors: u32, opts: &FatOptions) -> Result<Layout> {
        if let Some(label) = &opts.label {
            if label.len() > 11 || !label.is_ascii() {
                return Err(FsError::Unsupported(format!(
                    "FAT label {label:?} must be at most 11 ASCII characters"
                )));
            }
        }
        let total = opts.boot.as_ref().map_or(device_sectors, |b| {
            device_sectors.saturating_sub(b.spare_sectors)
        });
        let guess = opts
            .kind
            .unwrap_or_else(|| estimated_kind(u64::from(total) * SECTOR));
        let cluster = match opts.cluster_size {
            Some(c) if c.is_power_of_two() && (512..=32768).contains(&c) => c,
            Some(c) => {
                return Err(FsError::Unsupported(format!(
                    "cluster size {c} is not a power of two from 512 to 32768"
                )))
            }
            None => default_cluster(guess, u64::from(total) * SECTOR),
        };
        let kinds = match opts.kind {
            Some(k) => vec![k],
            None => vec![FsKind::Fat32, FsKind::Fat16, FsKind::Fat12],
        };
        let mut why = String::new();
        for kind in kinds {
            let mut boot = opts
                .boot
                .clone()
                .unwrap_or_else(|| BootFields::defaults(kind, total));
            boot.total_sectors = total;
            if let Some(h) = opts.hidden_sectors {
                boot.hidden_sectors = h;
            }
            match Layout::fit(kind, cluster / SECTOR as u32, boot, opts.kind.is_some()) {
                Ok(layout) => return Ok(layout),
                Err(e) => why = e,
            }
        }
        Err(FsError::Unsupported(format!(
            "no FAT volume fits {total} sectors with {cluster}-byte clusters: {why}"
        )))
    }

    /// The FAT size and cluster count of a `kind` volume with these fields; FAT12 and FAT16
    /// need a cluster count in their range (readers tell them apart by it), FAT32 too unless
    /// it was asked for by name.
    fn fit(
        kind: FsKind,
        sectors_per_cluster: u32,
        boot: BootFields,
        named: bool,
    ) -> std::result::Result<Layout, String> {
        let bits: u64 = match kind {
            FsKind::Fat12 => 12,
            FsKind::Fat16 => 16,
            FsKind::Fat32 => 32,
            other => return Err(format!("{} is not a FAT type", other.name())),
        };
        boot.check(kind)?;
        let fixed = u64::from(boot.reserved_sectors)
            + (u64::from(boot.root_entries) * dirent::LEN as u64).div_ceil(SECTOR);
        let spc = u64::from(sectors_per_cluster);
        let mut fat = u64::from(boot.fat_sectors).max(1);
        // Each round the FAT grows to what the clusters left need, which leaves fewer
        // clusters: a few rounds settle it.
        for _ in 0..16 {
            let used = fixed + u64::from(boot.fats) * fat;
            let clusters = u64::from(boot.total_sectors)
                .checked_sub(used)
                .ok_or("the FATs do not fit")?
                / spc;
            let need = ((clusters + 2) * bits).div_ceil(8 * SECTOR);
            if need > fat {
                fat = need;
                continue;
            }
            let range = match kind {
                FsKind::Fat12 => 1..=4084,
                FsKind::Fat16 => 4085..=65524,
                _ if named => 1..=0x0FFF_FFF4,
                _ => 65525..=0x0FFF_FFF4,
            };
            if !range.contains(&clusters) {
                return Err(format!("{clusters} clusters do not suit {}", kind.name()));
            }
            if kind != FsKind::Fat32 && fat > u64::from(u16::MAX) {
                return Err(format!(
                    "a {}-sector FAT is too large for {}",
                    fat,
                    kind.name()
                ));
            }
            return Ok(Layout {
                kind,
                sectors_per_cluster,
                fat_sectors: fat as u32,
                clusters: clusters as u32,
                boot,
            });
        }
        Err("the FAT size does not settle".into())
    }

    fn root_dir_at(&self) -> u64 {
        (u64::from(self.boot.reserved_sectors)
            + u64::from(self.boot.fats) * u64::from(self.fat_sectors))
            * SECTOR
    }

    fn root_dir_len(&self) -> u64 {
        (u64::from(self.boot.root_entries) * dirent::LEN as u64).div_ceil(SECTOR) * SECTOR
    }

    /// Byte offset of cluster 2.
    fn data_at(&self) -> u64 {
        self.root_dir_at() + self.root_dir_len()
    }
}

/// The type a volume of `bytes` gets by default, for choosing its cluster size.
fn estimated_kind(bytes: u64) -> FsKind {
    if bytes < 4 * MIB {
        FsKind::Fat12
    } else if bytes < 512 * MIB {
        FsKind::Fat16
    } else {
        FsKind::Fat32
    }
}

/// The default cluster size of a `kind` volume of `bytes`: about 2000 clusters on FAT12; 2
/// KiB up to 128 MiB then doubling every doubling of the size on FAT16; 512 bytes up to
/// 260 MiB, then 4 KiB up to 8 GiB, then doubling on FAT32; at most 32 KiB.
fn default_cluster(kind: FsKind, bytes: u64) -> u32 {
    let size = match kind {
        FsKind::Fat12 => bytes.next_power_of_two() / MIB * 512,
        FsKind::Fat16 if bytes <= 16 * MIB => 1024,
        FsKind::Fat16 if bytes <= 128 * MIB => 2048,
        FsKind::Fat16 => bytes.next_power_of_two() / (64 * MIB) * 1024,
        _ if bytes <= 260 * MIB => 512,
        _ if bytes <= 8 << 30 => 4096,
        _ => bytes.next_power_of_two() / (2 << 30) * 1024,
    };
    size.clamp(512, 32768) as u32
}

/// An 11-byte label field: the label (at most 11 ASCII characters, checked by
/// [`Layout::plan`]) upper-cased and padded, or `NO NAME`.
fn label_field(label: Option<&str>) -> [u8; 11] {
    let mut l = *b"NO NAME    ";
    if let Some(label) = label {
        l = [b' '; 11];
        l[..label.len()].copy_from_slice(label.to_ascii_uppercase().as_bytes());
    }
    l
}

/// The boot sector of the volume.
fn boot_sector(l: &Layout, label: [u8; 11], serial: u32) -> [u8; bpb::LEN] {
    let b = &l.boot;
    let fat32 = l.kind == FsKind::Fat32;
    let mut s = [0u8; bpb::LEN];
    // A jump over the BPB to code that asks the BIOS for the next boot device (int 18h).
    let code_at: u8 = if fat32 { 90 } else { 62 };
    bpb::JUMP.set(&mut s, &[0xEB, code_at - 2, 0x90]);
    s[usize::from(code_at)..usize::from(code_at) + 4].copy_from_slice(&[0xCD, 0x18, 0xEB, 0xFE]);
    bpb::OEM_NAME.set(&mut s, &b.oem_name);
    bpb::BYTES_PER_SECTOR.set(&mut s, SECTOR as u16);
    bpb::SECTORS_PER_CLUSTER.set(&mut s, l.sectors_per_cluster as u8);
    bpb::RESERVED_SECTORS.set(&mut s, b.reserved_sectors);
    bpb::NUM_FATS.set(&mut s, b.fats);
    bpb::ROOT_ENTRIES.set(&mut s, b.root_entries);
    match u16::try_from(b.total_sectors) {
        Ok(n) if !fat32 => bpb::TOTAL_SECTORS_16.set(&mut s, n),
        _ => bpb::TOTAL_SECTORS_32.set(&mut s, b.total_sectors),
    }
    bpb::MEDIA.set(&mut s, b.media);
    bpb::SECTORS_PER_TRACK.set(&mut s, b.sectors_per_track);
    bpb::NUM_HEADS.set(&mut s, b.heads);
    bpb::HIDDEN_SECTORS.set(&mut s, b.hidden_sectors);
    if fat32 {
        fat32::FAT_SIZE_32.set(&mut s, l.fat_sectors);
        fat32::ROOT_CLUSTER.set(&mut s, 2);
        fat32::FS_INFO.set(&mut s, b.fs_info_sector);
        fat32::BACKUP_BOOT_SECTOR.set(&mut s, b.backup_boot_sector);
        fat32::DRIVE_NUMBER.set(&mut s, b.drive_number);
        fat32::BOOT_SIGNATURE.set(&mut s, 0x29);
        fat32::VOLUME_ID.set(&mut s, serial);
        fat32::VOLUME_LABEL.set(&mut s, &label);
        fat32::FS_TYPE.set(&mut s, b"FAT32   ");
    } else {
        bpb::FAT_SIZE_16.set(&mut s, l.fat_sectors as u16);
        fat16::DRIVE_NUMBER.set(&mut s, b.drive_number);
        fat16::BOOT_SIGNATURE.set(&mut s, 0x29);
        fat16::VOLUME_ID.set(&mut s, serial);
        fat16::VOLUME_LABEL.set(&mut s, &label);
        let name = if l.kind == FsKind::Fat12 {
            b"FAT12   "
        } else {
            b"FAT16   "
        };
        fat16::FS_TYPE.set(&mut s, name);
    }
    bpb::BOOT_SIGNATURE.set(&mut s, &bpb::BOOT_SIGNATURE_VALUE);
    s
}

/// An FSInfo sector with these hints.
fn fsinfo_sector(free: u32, last_allocated: u32) -> [u8; bpb::LEN] {
    let mut s = [0u8; bpb::LEN];
    fsinfo::LEAD_SIGNATURE.set(&mut s, fsinfo::LEAD_SIGNATURE_VALUE);
    fsinfo::STRUCT_SIGNATURE.set(&mut s, fsinfo::STRUCT_SIGNATURE_VALUE);
    fsinfo::FREE_COUNT.set(&mut s, free);
    fsinfo::NEXT_FREE.set(&mut s, last_allocated);
    fsinfo::TRAIL_SIGNATURE.set(&mut s, fsinfo::TRAIL_SIGNATURE_VALUE);
    s
}

/// The first bytes of each FAT: entry 0 holds the media byte, entry 1 end-of-chain, and on
/// FAT32 entry 2 ends the root directory's one-cluster chain.
fn fat_head(kind: FsKind, media: u8) -> Vec<u8> {
    match kind {
        FsKind::Fat12 => vec![media, 0xFF, 0xFF],
        FsKind::Fat16 => vec![media, 0xFF, 0xFF, 0xFF],
        _ => {
            let mut v = (0x0FFF_FF00 | u32::from(media)).to_le_bytes().to_vec();
            v.extend(0x0FFF_FFFFu32.to_le_bytes());
            v.extend(0x0FFF_FFF8u32.to_le_bytes());
            v
        }
    }
}

/// Writes the empty volume `l` describes onto `dev`.
pub fn format(dev: &dyn BlockDevice, l: &Layout, opts: &FatOptions) -> Result<()> {
    let label = label_field(opts.label.as_deref());
    let serial = match opts.serial {
        Some(s) => s,
        None => {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b)
                .map_err(|e| FsError::Unsupported(format!("no random source: {e}")))?;
            u32::from_le_bytes(b)
        }
    };
    let b = &l.boot;
    let boot = boot_sector(l, label, serial);
    dev.write_zeroes(0, u64::from(b.reserved_sectors) * SECTOR)?;
    dev.write_at(&boot, 0)?;
    if l.kind == FsKind::Fat32 {
        // The root directory's cluster is the one in use.
        let info = fsinfo_sector(l.clusters - 1, 2);
        write_fsinfo_and_backup(dev, b, &boot, &info)?;
    }
    let head = fat_head(l.kind, b.media);
    let fat_len = u64::from(l.fat_sectors) * SECTOR;
    for i in 0..u64::from(b.fats) {
        let at = u64::from(b.reserved_sectors) * SECTOR + i * fat_len;
        dev.write_zeroes(at, fat_len)?;
        dev.write_at(&head, at)?;
    }
    let (root_at, root_len) = if l.kind == FsKind::Fat32 {
        (l.data_at(), u64::from(l.sectors_per_cluster) * SECTOR)
    } else {
        (l.root_dir_at(), l.root_dir_len())
    };
    dev.write_zeroes(root_at, root_len)?;
    if opts.label.is_some() {
        let mut entry = [0u8; dirent::LEN];
        dirent::NAME.set(&mut entry, &label);
        dirent::ATTR.set(&mut entry, dirent::ATTR_VOLUME_ID);
        dev.write_at(&entry, root_at)?;
    }
    Ok(())
}

/// Writes FSInfo, and the backup boot sector with an FSInfo copy after it as the backup's
/// own FSInfo, where the fields place them.
fn write_fsinfo_and_backup(
    dev: &dyn BlockDevice,
    b: &BootFields,
    boot: &[u8],
    info: &[u8],
) -> Result<()> {
    let reserved = b.reserved_sectors;
    let sector = |s: u16| u64::from(s) * SECTOR;
    dev.write_at(info, sector(b.fs_info_sector))?;
    let backup = b.backup_boot_sector;
    if backup != 0 && backup != 0xFFFF {
        dev.write_at(boot, sector(backup))?;
        let info_copy = backup
            .checked_add(b.fs_info_sector)
            .filter(|&s| s < reserved);
        if let Some(s) = info_copy {
            dev.write_at(info, sector(s))?;
        }
    }
    Ok(())
}

/// Sets the FAT32 FSInfo sector (and its backup copy) of the finished volume on `dev` to its
/// true free cluster count and last allocated cluster, from the FAT itself.
pub fn finish_fsinfo(dev: &Arc<dyn BlockDevice>, l: &Layout) -> Result<()> {
    if l.kind != FsKind::Fat32 {
        return Ok(());
    }
    let (free, last) = crate::fat::Fat::open(Arc::clone(dev))?.cluster_usage();
    let info = fsinfo_sector(free, last.unwrap_or(fsinfo::UNKNOWN));
    let b = &l.boot;
    let mut boot = [0u8; bpb::LEN];
    dev.read_at(&mut boot, 0)?;
    write_fsinfo_and_backup(&**dev, b, &boot, &info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kind: Option<FsKind>, cluster: Option<u32>) -> FatOptions {
        FatOptions {
            kind,
            cluster_size: cluster,
            ..FatOptions::default()
        }
    }

    #[test]
    fn fat_size_covers_every_cluster_and_no_more() {
        for (kind, sectors) in [
            (FsKind::Fat12, 8192),
            (FsKind::Fat16, 81920),
            (FsKind::Fat32, 614_400),
        ] {
            let l = Layout::plan(sectors, &opts(Some(kind), None)).unwrap();
            let bits = match kind {
                FsKind::Fat12 => 12,
                FsKind::Fat16 => 16,
                _ => 32,
            };
            let need = (u64::from(l.clusters) + 2) * bits;
            let have = u64::from(l.fat_sectors) * 512 * 8;
            assert!(need <= have && have - need < 512 * 8 * 2, "{l:?}");
            assert!(
                l.data_at() + u64::from(l.clusters) * u64::from(l.sectors_per_cluster) * 512
                    <= u64::from(sectors) * 512
            );
        }
    }

    #[test]
    fn the_type_follows_the_cluster_count_when_not_named() {
        // 4 MiB with 1 KiB clusters is too few clusters for FAT16.
        let l = Layout::plan(8192, &opts(None, Some(1024))).unwrap();
        assert_eq!(l.kind, FsKind::Fat12);
        let l = Layout::plan(65536, &opts(None, Some(512))).unwrap();
        assert_eq!(l.kind, FsKind::Fat16);
        assert!(Layout::plan(65536, &opts(Some(FsKind::Fat12), Some(512))).is_err());
    }

    #[test]
    fn source_fields_are_kept_and_checked() {
        let mut boot = BootFields::defaults(FsKind::Fat16, 81920);
        boot.reserved_sectors = 4;
        boot.fat_sectors = 100;
        boot.spare_sectors = 7;
        let o = FatOptions {
            kind: Some(FsKind::Fat16),
            cluster_size: Some(2048),
            boot: Some(boot.clone()),
            hidden_sectors: Some(2048),
            ..FatOptions::default()
        };
        let l = Layout::plan(81927, &o).unwrap();
        assert_eq!((l.boot.reserved_sectors, l.fat_sectors), (4, 100));
        assert_eq!((l.boot.total_sectors, l.boot.hidden_sectors), (81920, 2048));
        // A grown partition: the volume follows, its FAT grows with it.
        let l = Layout::plan(200_007, &o).unwrap();
        assert_eq!(l.boot.total_sectors, 200_000);
        assert!(l.fat_sectors > 100 && l.clusters > 81920 / 4, "{l:?}");
        let mut bad = boot;
        bad.fats = 0;
        let o = FatOptions {
            boot: Some(bad),
            ..o
        };
        assert!(Layout::plan(100_000, &o).is_err());
    }
}
