//! Planning a disk copy: the source's partition table read and each partition's mode decided
//! (auto picks files for ext4, FAT and swap, blocks for NTFS and for volumes the writer cannot
//! recreate, sectors for the rest; in-partition boot loaders keep their blocks), the layout
//! fitted to the destination's size (the last partition recreated file by file takes the
//! difference, those after it move), and the bytes outside partitions mapped to their place.

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
    if kind == FsKind::Swap && asked != Mode::Sectors && !bios_boot {
        return (
            Mode::Files,
            Some("swap recreated with its UUID and label; its old pages are scratch and were left out".into()),
        );
    }
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
    if kind == FsKind::Swap {
        return match fs::swap::read_identity(&**dev) {
            Ok(_) => (mode, note),
            Err(e) => (
                Mode::Sectors,
                Some(format!(
                    "swap cannot be recreated ({e}): copied every non-zero sector"
                )),
            ),
        };
    }
    match fs::open(Arc::clone(dev)) {
        Ok(opened) => {
            let (mode, note) = match opened.rebuild_obstacle() {
                Some(why) if mode == Mode::Files => (
                    Mode::Blocks,
                    Some(format!(
                        "{} cannot be recreated file by file ({why}): copied its used blocks",
                        kind.name()
                    )),
                ),
                _ => (mode, note),
            };
            // What the reader did to see the volume consistently (a journal replayed).
            let notes: Vec<String> = note.into_iter().chain(opened.view_notes()).collect();
            (mode, (!notes.is_empty()).then(|| notes.join("; ")))
        }
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

/// One run of bytes outside partitions to copy: `from` on the source to `to` on the
/// destination (the same offset unless the partitions around it moved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OutsideCopy {
    pub from: Range<u64>,
    pub to: u64,
}

/// The bytes outside partitions a copy carries: sector 0's boot code (the table itself is
/// rewritten) and every gap that is neither table nor partition — the boot loader's gap after
/// the MBR, gaps between partitions, the space after the last one — each moved with the
/// partition it precedes. Returns the gaps that have no place in the destination (a smaller
/// disk) too, so their data can be reported as left out.
pub(super) fn outside_copies(
    source: &PartitionTable,
    source_size: u64,
    dest: &PartitionTable,
    dest_size: u64,
) -> (Vec<OutsideCopy>, Vec<Range<u64>>) {
    let mut copies = Vec::from([OutsideCopy {
        from: 0..440.min(source_size).min(dest_size),
        to: 0,
    }]);
    let mut left_out = Vec::new();
    for gap in source.gaps(source_size) {
        match gap.placed_in(source, dest, dest_size) {
            Some(to) => copies.push(OutsideCopy {
                from: gap.range,
                to,
            }),
            None => left_out.push(gap.range),
        }
    }
    (copies, left_out)
}

/// Fits the layout to `out_size`: the last partition recreated file by file (not swap) takes
/// the difference, and the partitions after it — swap, copied ones, logical partitions with
/// their extended boot records — move by whole MiB so they keep their alignment. With no such
/// partition the layout must fit as it is.
fn resize_layout(
    table: &mut PartitionTable,
    parts: &[PartPlan],
    out_size: u64,
) -> Result<(), CaptureError> {
    const ALIGN: u64 = 1 << 20;
    let (_, usable_end) = table.usable_range(out_size);
    let resizable = parts
        .iter()
        .filter(|pp| pp.mode == Mode::Files && pp.kind != FsKind::Swap)
        .max_by_key(|pp| pp.part.end())
        .map(|pp| pp.part.number);
    match resizable {
        Some(number) => table
            .resize_partition(number, usable_end, ALIGN)
            .map(drop)
            .map_err(|source| CaptureError::Resize {
                size: out_size,
                source,
            }),
        None if table.partitions.iter().all(|p| p.end() <= usable_end) => Ok(()),
        None => Err(CaptureError::CutsPartition { size: out_size }),
    }
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
    /// The source's table, as read.
    pub source_table: PartitionTable,
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
    let source_table = table.clone();
    if out_size != src.size() {
        resize_layout(&mut table, &parts, out_size)?;
    }
    Ok(DiskPlan {
        source_table,
        table,
        parts,
        out_size,
    })
}
