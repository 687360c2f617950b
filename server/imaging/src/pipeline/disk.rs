//! Capture of a whole disk, partition by partition: the destination gets an equivalent
//! partition table (same identifiers; with `--size`, the last partition recreated file by file
//! grows or shrinks and the partitions after it move down or up by whole MiB), the bytes
//! outside partitions (boot code in sector 0, the gap after it where GRUB lives, gaps between
//! partitions and after the last one, each moved with its neighbour), and each partition by
//! mode:
//!
//! - **files**: the same filesystem type recreated with the source's parameters and identity
//!   through our writers (ext2/3/4 → ext4 writer, FAT → FAT writer);
//! - **blocks**: the clusters the filesystem's allocation map marks used, at their offsets;
//! - **sectors**: every range the source does not report as zero;
//! - **auto**: files for ext4 and FAT (blocks when the volume has what the writer cannot
//!   recreate), swap recreated from its header (UUID, label), blocks for NTFS, sectors
//!   otherwise (BIOS boot, unknown, ...).
//!
//! Verification ([`verify`]) compares each partition of the source and the output afterwards.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::capture::{
    copy_ranges, data_bytes_in, data_ranges_or_whole, CaptureError, CopyError, OutputOptions,
};
use super::delta::{write_delta, Confirmed};
use super::output::PartialOutput;
use super::partition_copy::{
    capture_partition, copy_plan, staging_device, zero, Copied, LayoutFrom, Overall, PartError,
    RebuildHow,
};
use super::plan::{outside_copies, plan_disk, DiskPlan, PartPlan};
use super::reuse::Previous;
use crate::progress::Progress;
use diskferry_blockdev::{BlockDevice, BlockError, SliceDevice};
use diskferry_fs::overlay::TreeTransform;
use diskferry_partition::{self as partition, Partition, PartitionTable};
use diskferry_vdisk::create_image;

/// How partitions are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Files,
    Blocks,
    Sectors,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Files => "files",
            Mode::Blocks => "blocks",
            Mode::Sectors => "sectors",
        }
    }
}

/// What happened to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReport {
    pub number: u32,
    pub filesystem: &'static str,
    pub mode: Mode,
    /// Bytes read from the source for it.
    pub read: u64,
    /// Bytes of unchanged files taken from the previous capture instead of the source
    /// (files-mode incremental captures).
    pub reused: u64,
    /// Deploys: bytes sent to the target for it (the rest of its data the target already
    /// held, as hashes showed).
    pub sent: Option<u64>,
    pub note: Option<String>,
    /// What a tree transform (customization, the EFI fallback loader) changed in its files,
    /// a line each.
    pub changes: Vec<String>,
}

impl std::fmt::Display for PartitionReport {
    /// `partition 2: ext4 by files, 1.6 MiB (1698216 bytes) read — note`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {}: {} by {}, {} ({} bytes) read",
            self.number,
            self.filesystem,
            self.mode.name(),
            crate::units::human_bytes(self.read),
            self.read
        )?;
        if self.reused > 0 {
            write!(
                f,
                ", {} of unchanged files from the previous capture",
                crate::units::human_bytes(self.reused)
            )?;
        }
        if let Some(sent) = self.sent {
            write!(f, ", {} sent", crate::units::human_bytes(sent))?;
        }
        if !self.changes.is_empty() {
            write!(f, ", {} change(s) to its files", self.changes.len())?;
        }
        if let Some(n) = &self.note {
            write!(f, " — {n}")?;
        }
        Ok(())
    }
}

/// What a disk capture did.
#[derive(Debug, Clone, Default)]
pub struct DiskReport {
    pub source_size: u64,
    pub output_size: u64,
    pub scheme: &'static str,
    pub partitions: Vec<PartitionReport>,
    /// Bytes copied from outside partitions: boot code and the gaps' data.
    pub boot_bytes: u64,
    /// What the user should know about the disk as a whole (data left out of a smaller copy).
    pub notes: Vec<String>,
    pub elapsed: Duration,
}

/// Where [`write_disk`] writes: a new sparse image (reads as zeros where nothing is written),
/// or a disk that may hold anything (deploys), whose ranges are zeroed before they are
/// written and whose filesystems are built in a local staging file first, so the many small
/// writes of the filesystem writers never cross the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Destination {
    FreshImage,
    UsedDisk,
}

/// The two ends of a disk copy, and how their failures are named: reading `src` fails as a
/// source error, writing `dst` as a write error on `dst_name` (the partial output file, or the
/// target disk), where an interrupted copy is left.
pub(super) struct CopyEnds<'a> {
    pub src: &'a Arc<dyn BlockDevice>,
    pub dst: &'a Arc<dyn BlockDevice>,
    pub dst_name: &'a Path,
    pub destination: Destination,
    /// The previous capture, for a files-mode incremental capture.
    pub previous: Option<&'a Previous>,
    /// Deploys: where partitions confirmed equal to their stage by hash are recorded.
    pub confirmed: Option<&'a Confirmed>,
    /// Edits made to the trees of partitions recreated file by file.
    pub transform: Option<&'a dyn TreeTransform>,
}

impl CopyEnds<'_> {
    pub(super) fn read_err(&self, source: BlockError) -> CaptureError {
        CaptureError::Source {
            source,
            partial: self.dst_name.to_path_buf(),
        }
    }

    pub(super) fn write_err(&self, source: BlockError) -> CaptureError {
        CaptureError::Write {
            path: self.dst_name.to_path_buf(),
            source,
        }
    }

    fn copy_err(&self, e: CopyError) -> CaptureError {
        match e {
            CopyError::Read(e) => self.read_err(e),
            CopyError::Write(e) => self.write_err(e),
        }
    }

    fn part_err(&self, e: PartError, partition: u32) -> CaptureError {
        match e {
            PartError::Read(e) => self.read_err(e),
            PartError::Write(e) => self.write_err(e),
            PartError::Fs(source) => CaptureError::Filesystem { partition, source },
        }
    }

    fn used_disk(&self) -> bool {
        self.destination == Destination::UsedDisk
    }
}

/// Writes the plan onto the destination: the bytes outside partitions, the table, every
/// partition; then flushes. Returns the partitions' reports, the outside bytes copied and
/// notes about the disk as a whole.
pub(super) fn write_disk(
    ends: &CopyEnds<'_>,
    plan: DiskPlan,
    progress: &dyn Progress,
) -> Result<(Vec<PartitionReport>, u64, Vec<String>), CaptureError> {
    let DiskPlan {
        source_table,
        table,
        parts,
        ..
    } = plan;
    let (boot_bytes, outside_note) =
        write_outside_and_table(ends, &source_table, &table, progress)?;
    // The whole job's expected bytes, so progress can show an overall figure.
    let mut copies = Vec::with_capacity(parts.len());
    for pp in &parts {
        let copy = copy_plan(&pp.dev, pp.mode).map_err(|e| ends.part_err(e, pp.part.number))?;
        copies.push(copy);
    }
    let grand_total: u64 = copies.iter().map(|c| c.1).sum();
    let progress = &Overall::new(progress, grand_total);
    let mut reports = Vec::new();
    for (pp, (ranges, _)) in parts.into_iter().zip(copies) {
        let target = table
            .partitions
            .iter()
            .find(|t| t.number == pp.part.number)
            .cloned()
            .unwrap_or(pp.part.clone());
        let copied = write_partition(ends, &pp, &target, ranges, progress)?;
        reports.push(PartitionReport {
            number: pp.part.number,
            filesystem: pp.kind.name(),
            mode: pp.mode,
            read: copied.read,
            reused: copied.reused,
            sent: copied.sent,
            note: pp.note,
            changes: copied.changes,
        });
    }
    ends.dst.flush().map_err(|e| ends.write_err(e))?;
    Ok((reports, boot_bytes, outside_note.into_iter().collect()))
}

/// The bytes outside partitions (boot code, the boot loader's gap, gaps between and after
/// partitions, each where its partition went), then the table (which keeps sector 0's boot
/// code). Returns the bytes copied and, when some gaps holding data have no place in a
/// smaller destination, a note saying how much was left out.
fn write_outside_and_table(
    ends: &CopyEnds<'_>,
    source_table: &PartitionTable,
    table: &PartitionTable,
    progress: &dyn Progress,
) -> Result<(u64, Option<String>), CaptureError> {
    let (copies, left_out) = outside_copies(source_table, ends.src.size(), table, ends.dst.size());
    let mut copied = 0;
    for c in copies.iter().filter(|c| c.from.start < c.from.end) {
        let len = c.from.end - c.from.start;
        let from: Arc<dyn BlockDevice> = Arc::new(
            SliceDevice::new(Arc::clone(ends.src), c.from.start, len)
                .map_err(|e| ends.read_err(e))?,
        );
        let to: Arc<dyn BlockDevice> = Arc::new(
            SliceDevice::new(Arc::clone(ends.dst), c.to, len).map_err(|e| ends.write_err(e))?,
        );
        if ends.used_disk() {
            zero(&*to, 0..len).map_err(|e| ends.write_err(e))?;
        }
        let ranges = data_ranges_or_whole(&*from);
        copy_ranges(&*from, &to, &ranges, progress).map_err(|e| ends.copy_err(e))?;
        copied += ranges.iter().map(|r| r.end - r.start).sum::<u64>();
    }
    partition::write_table(&**ends.dst, table).map_err(|source| CaptureError::WriteTable {
        path: ends.dst_name.to_path_buf(),
        source,
    })?;
    let mut lost = 0;
    for r in &left_out {
        lost += data_bytes_in(ends.src, r).map_err(|e| ends.read_err(e))?;
    }
    let note = (lost > 0).then(|| {
        format!(
            "{} ({lost} bytes) of data outside partitions had no place on the smaller disk and were left out",
            crate::units::human_bytes(lost)
        )
    });
    Ok((copied, note))
}

/// One partition onto its place `target` in the destination.
fn write_partition(
    ends: &CopyEnds<'_>,
    pp: &PartPlan,
    target: &Partition,
    ranges: Option<Vec<Range<u64>>>,
    progress: &dyn Progress,
) -> Result<Copied, CaptureError> {
    let werr = |e| ends.write_err(e);
    let number = pp.part.number;
    let ddev: Arc<dyn BlockDevice> =
        Arc::new(SliceDevice::new(Arc::clone(ends.dst), target.start, target.size).map_err(werr)?);
    let layout = match (&ranges, ends.previous) {
        _ if ends.used_disk() => LayoutFrom::Source,
        (None, Some(p)) => p
            .partition(&pp.part, pp.kind)
            .map_or(LayoutFrom::Fresh, LayoutFrom::Previous),
        _ => LayoutFrom::Fresh,
    };
    let how = RebuildHow {
        layout,
        transform: ends.transform,
    };
    if !ends.used_disk() {
        return capture_partition(target, &pp.dev, &ddev, pp.kind, ranges, how, progress)
            .map_err(|e| ends.part_err(e, number));
    }
    // Built locally, then only the chunks that differ from what the disk holds are sent.
    let stage = staging_device(ddev.size()).map_err(werr)?;
    let copied = capture_partition(target, &pp.dev, &stage, pp.kind, ranges, how, progress)
        .map_err(|e| ends.part_err(e, number))?;
    let delta = write_delta(&stage, &ddev).map_err(|e| match e {
        CopyError::Read(e) | CopyError::Write(e) => werr(e),
    })?;
    tracing::info!(
        partition = number,
        "sent {} of the {} the partition holds (the rest was already on the disk)",
        crate::units::human_bytes(delta.sent_bytes),
        crate::units::human_bytes(delta.data_bytes)
    );
    let copied = Copied {
        sent: Some(delta.sent_bytes),
        ..copied
    };
    match ends.confirmed {
        Some(confirmed) if delta.confirmed => {
            let range = target.start..target.start + target.size;
            confirmed.lock().expect("confirmed").push((range, stage));
        }
        _ => {}
    }
    Ok(copied)
}

/// How a partition-by-partition capture is asked to go.
#[derive(Clone, Copy)]
pub struct DiskCapture<'a> {
    pub output: OutputOptions,
    pub mode: Mode,
    /// A new virtual size for the output.
    pub size: Option<u64>,
    /// The previous capture of this source: unchanged files of partitions recreated file by
    /// file are read there instead of the source.
    pub previous: Option<&'a Previous>,
    /// Edits made to the trees of partitions recreated file by file (customization).
    pub transform: Option<&'a dyn TreeTransform>,
}

/// Captures `src` into a new image at `out`, partition by partition.
pub fn capture_disk(
    src: Arc<dyn BlockDevice>,
    out: &Path,
    how: &DiskCapture<'_>,
    progress: &dyn Progress,
) -> Result<DiskReport, CaptureError> {
    let DiskCapture {
        output,
        mode,
        size,
        previous,
        transform,
    } = *how;
    let started = Instant::now();
    let partial = super::output::partial_path_for(out);
    let plan = plan_disk(&src, mode, size.unwrap_or(src.size()), &partial)?;
    let out_size = plan.out_size;
    let scheme = plan.table.scheme.name();

    let output_file = PartialOutput::create(out, output.overwrite)?;
    let werr = |source| CaptureError::Write {
        path: partial.clone(),
        source,
    };
    let file = output_file.file().try_clone().map_err(|source| {
        werr(BlockError::Io {
            op: "reopen",
            offset: None,
            device: partial.display().to_string(),
            source,
        })
    })?;
    let dst = create_image(
        output.format,
        file,
        &partial,
        out_size,
        output.compress,
        src.logical_sector_size(),
    )
    .map_err(|e| werr(e.into()))?;
    let ends = CopyEnds {
        src: &src,
        dst: &dst,
        dst_name: &partial,
        destination: Destination::FreshImage,
        previous,
        confirmed: None,
        transform,
    };
    let (partitions, boot_bytes, notes) = write_disk(&ends, plan, progress)?;
    drop(dst);
    output_file.commit()?;
    Ok(DiskReport {
        source_size: src.size(),
        output_size: out_size,
        scheme,
        partitions,
        boot_bytes,
        notes,
        elapsed: started.elapsed(),
    })
}
