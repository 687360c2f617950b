//! The one imaging API every front end calls: [`capture`] (a source disk into a new image) and
//! [`deploy`] (an image onto a disk). They own the whole decision — whole disk or partition by
//! partition, modes, resizing, verification — and report what they did; the CLI prints the
//! outcome, the daemon's jobs log it. Both log their steps through `tracing` (a job's log
//! receives them when the daemon runs the job inside its span).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_fs::overlay::TreeTransform;
use diskferry_partition::{self as partition, Scheme};

use diskferry_vdisk::ImageFormat;

use crate::chunkmap::{self, ChunkMap, ChunkMapError, Layout};
use crate::pipeline::verify::{verify_disks_with, VerifyError, VerifyReport};
use crate::pipeline::{
    capture_disk, capture_overlay, capture_sectors, deploy_disk, Base, CaptureError, CaptureStats,
    DeployError, DeployHow, DeployReport, DiskCapture, DiskReport, IncrementalError,
    IncrementalStats, Mode, OutputOptions, Previous,
};
use crate::progress::Progress;
use crate::units::human_bytes;

/// What a capture is asked to do.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub output: OutputOptions,
    /// How partitions are copied; `Sectors` copies the whole disk as it is.
    pub mode: Mode,
    /// A new virtual size for the output (partitioned sources, not in sectors mode).
    pub size: Option<u64>,
    /// Compare the source and the written image afterwards.
    pub verify: bool,
    /// Also write the source's chunk map beside the output (`OUT.chunks`), so a later
    /// capture can be incremental on this one.
    pub chunk_map: bool,
    /// Capture incrementally on this previous capture of the source (it needs a chunk map):
    /// an overlay of the changed chunks for a whole-disk base, else a new image that takes
    /// unchanged files from the base. The output always gets its own chunk map.
    pub base: Option<PathBuf>,
    /// Edits made to the trees of partitions recreated file by file (customization); the
    /// verification compares against the edited trees.
    pub transform: Option<Arc<dyn TreeTransform>>,
}

/// How a capture went about it.
#[derive(Debug, Clone)]
pub enum CaptureSummary {
    /// Every non-zero sector at its own offset (sectors mode, or a disk without a table).
    WholeDisk(CaptureStats),
    /// Partition by partition.
    Partitions(DiskReport),
    /// The changed chunks, into a qcow2 overlay on a whole-disk base.
    Overlay,
}

/// What a capture did.
#[derive(Debug, Clone)]
pub struct CaptureOutcome {
    pub out: PathBuf,
    pub summary: CaptureSummary,
    /// For an incremental capture: its base and how much of the source changed since.
    pub incremental: Option<(PathBuf, IncrementalStats)>,
    /// The chunk map written beside the output, when one was.
    pub chunk_map: Option<PathBuf>,
    /// The comparison, when one was asked for (it found no differences: those are errors).
    pub verify: Option<VerifyReport>,
}

/// Why a capture job failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureJobError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("cannot reopen the written image {path} to verify it: {source}")]
    Reopen {
        path: PathBuf,
        source: diskferry_vdisk::ImageError,
    },
    #[error("verifying: {0}")]
    Verify(#[from] VerifyError),
    #[error("verification found {} difference(s); first: {}", .0.differences, .0.listed.first().map_or("", String::as_str))]
    Differs(VerifyReport),
    #[error(transparent)]
    Incremental(#[from] IncrementalError),
    #[error("writing the chunk map: {0}")]
    ChunkMap(#[from] ChunkMapError),
    #[error("{base} is a whole-disk capture: an incremental capture on it is a qcow2 overlay of the changed chunks (give OUT a .qcow2 name; --mode sectors or none)")]
    OverlayOnly { base: PathBuf },
    #[error("{base} was captured partition by partition: an incremental capture on it recreates the filesystems too (--mode auto or files, not sectors)")]
    PartitionsOnly { base: PathBuf },
    #[error("customizing needs the partitions recreated file by file (--mode auto or files, a disk with a partition table), not a copy by {0}")]
    CannotCustomize(&'static str),
}

/// Captures `source` into a new image at `out`: the whole disk by sectors when asked or when
/// it has no partition table, else partition by partition — incrementally on a base when one
/// is given; then writes the chunk map and verifies when asked.
pub fn capture(
    source: Arc<dyn BlockDevice>,
    out: &Path,
    options: &CaptureOptions,
    progress: &dyn Progress,
) -> Result<CaptureOutcome, CaptureJobError> {
    let base = match &options.base {
        Some(path) => Some(Base::open(path, &source, progress)?),
        None => None,
    };
    let partitioned = partition::read_table(&*source).is_ok_and(|t| t.scheme != Scheme::None);
    let whole_disk = match &base {
        Some(b) => base_is_whole_disk(b, options, partitioned)?,
        None => options.mode == Mode::Sectors || !partitioned,
    };
    if options.transform.is_some() && (whole_disk || options.mode == Mode::Blocks) {
        let how = if options.mode == Mode::Blocks {
            "blocks"
        } else {
            "sectors"
        };
        return Err(CaptureJobError::CannotCustomize(how));
    }
    if !partitioned && options.mode != Mode::Sectors {
        tracing::info!("the source has no partition table: copying every non-zero sector");
    }
    let summary = capture_image(&source, out, options, base.as_ref(), whole_disk, progress)?;
    let chunk_map = write_chunk_map(&source, out, options, base.as_ref(), whole_disk)?;
    let verify = if options.verify {
        Some(verify_output(&source, out, options.transform.as_deref())?)
    } else {
        None
    };
    Ok(CaptureOutcome {
        out: out.to_path_buf(),
        summary,
        incremental: base.map(|b| (b.path, b.stats)),
        chunk_map,
        verify,
    })
}

/// Whether an incremental capture on `base` is whole-disk (an overlay), refusing what the
/// base's layout cannot take.
fn base_is_whole_disk(
    base: &Base,
    options: &CaptureOptions,
    partitioned: bool,
) -> Result<bool, CaptureJobError> {
    let path = base.path.clone();
    match base.map.layout {
        Layout::WholeDisk => {
            let sectors = matches!(options.mode, Mode::Sectors | Mode::Auto);
            if !sectors || options.output.format != ImageFormat::Qcow2 || options.size.is_some() {
                return Err(CaptureJobError::OverlayOnly { base: path });
            }
            Ok(true)
        }
        Layout::Partitions if options.mode == Mode::Sectors || !partitioned => {
            Err(CaptureJobError::PartitionsOnly { base: path })
        }
        Layout::Partitions => Ok(false),
    }
}

/// Writes the image: an overlay of the changed chunks, every non-zero sector, or partition
/// by partition (unchanged files from a partition-by-partition base).
fn capture_image(
    source: &Arc<dyn BlockDevice>,
    out: &Path,
    options: &CaptureOptions,
    base: Option<&Base>,
    whole_disk: bool,
    progress: &dyn Progress,
) -> Result<CaptureSummary, CaptureJobError> {
    if let Some(base) = base.filter(|_| whole_disk) {
        capture_overlay(&**source, out, base, options.output.overwrite, progress)?;
        return Ok(CaptureSummary::Overlay);
    }
    if whole_disk {
        if options.size.is_some_and(|s| s != source.size()) {
            return Err(CaptureError::ResizeNeedsTable.into());
        }
        let stats = capture_sectors(&**source, out, options.output, progress)?;
        tracing::info!(
            read = stats.read,
            written = stats.written,
            "whole disk by sectors: {} bytes read, {} written",
            stats.read,
            stats.written
        );
        return Ok(CaptureSummary::WholeDisk(stats));
    }
    let previous = base.map(open_previous).transpose()?;
    let how = DiskCapture {
        output: options.output,
        mode: options.mode,
        size: options.size,
        previous: previous.as_ref(),
        transform: options.transform.as_deref(),
    };
    let report = capture_disk(Arc::clone(source), out, &how, progress)?;
    log_partitions(&report.partitions);
    for n in &report.notes {
        tracing::warn!("{n}");
    }
    Ok(CaptureSummary::Partitions(report))
}

/// Each partition's line, and each change made in its files (customization, the EFI
/// fallback loader).
fn log_partitions(partitions: &[crate::pipeline::PartitionReport]) {
    for p in partitions {
        tracing::info!(partition = p.number, "{p}");
        for c in &p.changes {
            tracing::info!(partition = p.number, "changed: {c}");
        }
    }
}

/// A partition-by-partition base opened for its files.
fn open_previous(base: &Base) -> Result<Previous, IncrementalError> {
    let image = diskferry_vdisk::open_image(&base.path, true)
        .map_err(|source| IncrementalError::Base {
            base: base.path.clone(),
            source: Box::new(source),
        })?
        .1;
    Previous::new(image, base.changed.clone()).map_err(|source| IncrementalError::BaseTable {
        base: base.path.clone(),
        source,
    })
}

/// The chunk map beside the output: the base's hashes of now for an incremental capture,
/// the source hashed when asked for, else none.
fn write_chunk_map(
    source: &Arc<dyn BlockDevice>,
    out: &Path,
    options: &CaptureOptions,
    base: Option<&Base>,
    whole_disk: bool,
) -> Result<Option<PathBuf>, CaptureJobError> {
    let layout = if whole_disk {
        Layout::WholeDisk
    } else {
        Layout::Partitions
    };
    let map = match base {
        Some(b) => b.map_for(out, layout)?,
        None if options.chunk_map => ChunkMap::of_source(source, out, layout)?,
        None => return Ok(None),
    };
    map.save(out)?;
    Ok(Some(chunkmap::path_for(out)))
}

/// Reopens the written image and compares it with the source; differences are an error.
fn verify_output(
    source: &Arc<dyn BlockDevice>,
    out: &Path,
    transform: Option<&dyn TreeTransform>,
) -> Result<VerifyReport, CaptureJobError> {
    tracing::info!("verifying");
    let (_, written) =
        diskferry_vdisk::open_image(out, true).map_err(|source| CaptureJobError::Reopen {
            path: out.to_path_buf(),
            source,
        })?;
    let report = verify_disks_with(source, &written, transform)?;
    for n in &report.notes {
        tracing::warn!("verify: {n}");
    }
    if report.differences > 0 {
        for d in report.listed.iter().take(50) {
            tracing::warn!("difference: {d}");
        }
        return Err(CaptureJobError::Differs(report));
    }
    tracing::info!("{}", verified(&report));
    Ok(report)
}

/// The line a clean verification logs.
fn verified(report: &VerifyReport) -> String {
    format!(
        "verify: no differences ({} files, {} compared)",
        report.files_compared,
        human_bytes(report.bytes_compared)
    )
}

/// Deploys `image` onto `target` (named `target_name` in messages): the image's table scaled
/// to the target, each partition as `how` says, then verified by reading the target back.
pub fn deploy(
    image: Arc<dyn BlockDevice>,
    target: Arc<dyn BlockDevice>,
    target_name: &str,
    how: &DeployHow,
    progress: &dyn Progress,
) -> Result<DeployReport, DeployError> {
    tracing::info!(
        "deploying {} bytes onto {target_name} ({} bytes)",
        image.size(),
        target.size()
    );
    let report = deploy_disk(image, target, target_name, how, progress)?;
    log_partitions(&report.disk.partitions);
    for n in report.disk.notes.iter().chain(&report.verify.notes) {
        tracing::warn!("{n}");
    }
    tracing::info!("{}", verified(&report.verify));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use diskferry_blockdev::MemoryDevice;
    use diskferry_vdisk::ImageFormat;

    fn options(mode: Mode, verify: bool) -> CaptureOptions {
        CaptureOptions {
            output: OutputOptions {
                format: ImageFormat::Qcow2,
                compress: false,
                overwrite: false,
            },
            mode,
            size: None,
            verify,
            chunk_map: false,
            base: None,
            transform: None,
        }
    }

    #[test]
    fn a_disk_without_a_table_is_copied_whole_and_verified() {
        let mut data = vec![0u8; 4 << 20];
        data[4096..8192].fill(0x5a);
        let src: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(data));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.qcow2");
        let done = capture(src, &out, &options(Mode::Auto, true), &Silent).unwrap();
        assert!(matches!(done.summary, CaptureSummary::WholeDisk(ref s) if s.written == 4096));
        assert!(done.verify.is_some());
        assert!(out.exists());
    }

    #[test]
    fn a_new_size_without_a_table_is_refused_and_leaves_nothing() {
        let src: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(vec![1u8; 1 << 20]));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.qcow2");
        let mut opts = options(Mode::Auto, false);
        opts.size = Some(2 << 20);
        let err = capture(src, &out, &opts, &Silent).unwrap_err();
        assert!(matches!(
            err,
            CaptureJobError::Capture(CaptureError::ResizeNeedsTable)
        ));
        assert!(!out.exists());
        assert!(!crate::pipeline::partial_path_for(&out).exists());
    }
}
