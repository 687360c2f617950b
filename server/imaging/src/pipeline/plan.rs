//! Planning a disk copy: the source's partition table read and each partition's mode decided
//! (auto picks files for ext4 and FAT, blocks for NTFS, sectors for the rest; in-partition boot
//! loaders keep their blocks), the table resized to the destination where the last partition
//! is recreated file by file, and the boot bytes outside partitions found.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use super::capture::CaptureError;
use super::disk::Mode;
use diskferry_blockdev::{BlockDevice, BlockError, SliceDevice};
use diskferry_fs::{self as fs, FsKind};
use diskferry_partition::{self as partition, Partition, PartitionTable, Scheme};

/// The mode a partition gets: what was asked, or for auto what its filesystem allows; files
/// falls back to blocks for NTFS (no writer) and to sectors for unreadable contents.
fn mode_for(asked: Mode, kind: FsKind, bios_boot: bool, boot_code: bool) -> (Mode, Option<String>) {
    // A boot loader in the volume's first sectors (extlinux, syslinux, GRUB, LILO) finds its
    // next stage by block numbers: recreating the filesystem would move those blocks.
    if boot_code && asked == Mode::Auto && kind != FsKind::Ntfs {
        return (
            Mode::Blocks,
            Some(format!(
                "{} holds a boot loader in its first sectors: copied its used blocks, in place",
                kind.name()
            )),
        );
    }
    if boot_code && asked == Mode::Files {
        let (m, note) = mode_for(asked, kind, bios_boot, false);
        let warn = "its boot loader points at fixed blocks and will not boot from the recreated copy (use --mode blocks)";
        return (
            m,
            Some(note.map_or(warn.to_string(), |n| format!("{n}; {warn}"))),
        );
    }
    let files_ok = matches!(
        kind,
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 | FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32
    );
    let blocks_ok = files_ok || kind == FsKind::Ntfs;
    match asked {
        _ if bios_boot => (Mode::Sectors, None),
        Mode::Sectors => (Mode::Sectors, None),
        Mode::Auto | Mode::Files if files_ok => (Mode::Files, None),
        Mode::Auto if blocks_ok => (Mode::Blocks, None),
        Mode::Files if blocks_ok => (
            Mode::Blocks,
            Some(format!(
                "{} has no writer yet: copied its used blocks",
                kind.name()
            )),
        ),
        Mode::Blocks if blocks_ok => (Mode::Blocks, None),
        Mode::Auto => (Mode::Sectors, None),
        _ => (
            Mode::Sectors,
            Some(format!(
                "{} cannot be read as a filesystem: copied every non-zero sector",
                kind.name()
            )),
        ),
    }
}

/// Checks a files- or blocks-mode decision against the opened filesystem: a volume the
/// writer cannot recreate faithfully (its [`fs::Filesystem::rebuild_obstacle`]) is copied by
/// blocks, and in auto mode one the reader cannot open is copied sector by sector — both with
/// a note — so auto never fails a capture over one volume it cannot rebuild. An explicit
/// files or blocks mode on an unreadable volume keeps its mode and fails with the reader's
/// error when copied.
fn refine_mode(
    dev: &Arc<dyn BlockDevice>,
    kind: FsKind,
    asked: Mode,
    mode: Mode,
    note: Option<String>,
) -> (Mode, Option<String>) {
    if !matches!(mode, Mode::Files | Mode::Blocks) {
        return (mode, note);
    }
    match fs::open(Arc::clone(dev)) {
        Ok(opened) => match opened.rebuild_obstacle() {
            Some(why) if mode == Mode::Files => (
                Mode::Blocks,
                Some(format!(
                    "{} cannot be recreated file by file ({why}): copied its used blocks",
                    kind.name()
                )),
            ),
            _ => (mode, note),
        },
        Err(e) if asked == Mode::Auto => (
            Mode::Sectors,
            Some(format!(
                "{} cannot be read ({e}): copied every non-zero sector",
                kind.name()
            )),
        ),
        Err(_) => (mode, note),
    }
}

/// Whether a volume's first sectors hold a boot loader that addresses blocks directly: any
/// bytes in an ext2/3/4 volume's boot block (its first 1024 bytes, unused by the filesystem),
/// or a syslinux/extlinux/GRUB/LILO signature in a FAT boot sector.
fn has_boot_loader(dev: &dyn BlockDevice, kind: FsKind) -> Result<bool, BlockError> {
    if dev.size() < 1024 {
        return Ok(false);
    }
    let mut head = [0u8; 1024];
    dev.read_at(&mut head, 0)?;
    Ok(match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => head.iter().any(|&b| b != 0),
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
            [&b"SYSLINUX"[..], b"EXTLINUX", b"GRUB", b"LILO"]
                .iter()
                .any(|sig| head[..512].windows(sig.len()).any(|w| w == *sig))
        }
        _ => false,
    })
}

/// The byte ranges outside partitions that boot needs: sector 0's boot code (the table itself
/// is rewritten) and the gap between the table and the first partition.
pub(super) fn boot_ranges(table: &PartitionTable, disk_size: u64) -> Vec<Range<u64>> {
    let sector = u64::from(table.sector_size);
    let first = table
        .partitions
        .iter()
        .map(|p| p.start)
        .min()
        .unwrap_or(disk_size)
        .min(disk_size);
    let table_end = match table.scheme {
        Scheme::Gpt => {
            (2 + (u64::from(table.gpt_entries.max(128)) * 128).div_ceil(sector)) * sector
        }
        _ => sector,
    };
    let boot_code: Range<u64> = 0..440.min(disk_size);
    let mut out = Vec::from([boot_code]);
    if table_end < first {
        out.push(table_end..first);
    }
    out
}

/// One partition's part of a disk copy: the source partition, a device reading it, its
/// filesystem and the mode it gets (with a note when that is not what was asked).
pub(super) struct PartPlan {
    pub part: Partition,
    pub dev: Arc<dyn BlockDevice>,
    pub kind: FsKind,
    pub mode: Mode,
    pub note: Option<String>,
}

/// What a disk copy will do: the destination's table (resized to `out_size` where allowed)
/// and each partition's plan.
pub(super) struct DiskPlan {
    pub table: PartitionTable,
    pub parts: Vec<PartPlan>,
    pub out_size: u64,
}

/// Reads the source's table and decides each partition's mode; with a destination size
/// different from the source's, the last partition follows it when it is recreated file by
/// file, and anything else must fit as it is.
pub(super) fn plan_disk(
    src: &Arc<dyn BlockDevice>,
    mode: Mode,
    out_size: u64,
    dst_name: &Path,
) -> Result<DiskPlan, CaptureError> {
    let source_err = |source| CaptureError::Source {
        source,
        partial: dst_name.to_path_buf(),
    };
    let mut table = partition::read_table(&**src).map_err(CaptureError::SourceTable)?;
    // Decide every partition's mode first: resizing depends on them.
    let mut parts = Vec::new();
    for p in &table.partitions {
        let dev: Arc<dyn BlockDevice> =
            Arc::new(SliceDevice::new(Arc::clone(src), p.start, p.size).map_err(source_err)?);
        let kind = fs::detect(&*dev).map_err(source_err)?;
        let boot_code = has_boot_loader(&*dev, kind).map_err(source_err)?;
        let (m, note) = mode_for(mode, kind, partition::is_bios_boot(&p.kind), boot_code);
        let (m, note) = refine_mode(&dev, kind, mode, m, note);
        parts.push(PartPlan {
            part: p.clone(),
            dev,
            kind,
            mode: m,
            note,
        });
    }
    if table.scheme == Scheme::None {
        return Err(CaptureError::NoTable);
    }
    if out_size != src.size() {
        let last = table
            .partitions
            .iter()
            .max_by_key(|p| p.end())
            .map(|p| p.number);
        let last_files = parts
            .iter()
            .any(|pp| Some(pp.part.number) == last && pp.mode == Mode::Files);
        let (_, usable_end) = table.usable_range(out_size);
        let fits = table.partitions.iter().all(|p| p.end() <= usable_end);
        if last_files {
            table
                .resize_last(usable_end)
                .map_err(|source| CaptureError::Resize {
                    size: out_size,
                    source,
                })?;
        } else if !fits {
            return Err(CaptureError::CutsPartition { size: out_size });
        }
    }
    Ok(DiskPlan {
        table,
        parts,
        out_size,
    })
}
