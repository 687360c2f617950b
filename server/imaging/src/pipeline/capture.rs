//! Whole-disk sector capture (`--mode sectors`, and sources without a partition table): every
//! sector that is not zero, at its own offset, into a raw, qcow2 or VHDX image; and
//! [`copy_ranges`], the pipelined sparse copy every capture mode uses.
//!
//! The source is mapped first (block status: ranges known to be zero never cross the wire),
//! then the remaining ranges are read in disk order with many requests in flight; blocks that
//! turn out to be all zeros are not written, so the output stays sparse.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::output::{OutputError, PartialOutput};
use super::writer::SparseWriter;
use crate::progress::Progress;
use diskferry_blockdev::{map_device, BlockDevice, BlockError, Region};
use diskferry_fs::FsError;
use diskferry_partition::PartitionError;
use diskferry_vdisk::{create_image, ImageFormat};

/// What a capture did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Size of the source (and virtual size of the output).
    pub size: u64,
    /// Bytes the source reported as zero without being read.
    pub skipped_by_status: u64,
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the output (read bytes minus all-zero blocks).
    pub written: u64,
    pub elapsed: Duration,
}

/// Why a capture failed. The output then exists only as `OUT.partial`, if at all.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("reading the source failed: {source} (incomplete output left at {partial})")]
    Source {
        source: BlockError,
        partial: PathBuf,
    },
    #[error("writing {path} failed: {source}")]
    Write { path: PathBuf, source: BlockError },
    #[error("{format} images cannot be compressed: write a .qcow2 (or pass --format qcow2)")]
    CannotCompress { format: &'static str },
    #[error("reading the source's partition table: {0}")]
    SourceTable(#[source] PartitionError),
    #[error("the source has no partition table: capture it with --mode sectors")]
    NoTable,
    #[error("a new size needs a partitioned source and mode auto, files or blocks (--size with --mode sectors, or a disk without a table)")]
    ResizeNeedsTable,
    #[error("cannot fit a disk of {size} bytes: {source}")]
    Resize { size: u64, source: PartitionError },
    #[error("a disk of {size} bytes cuts into a partition and no partition is recreated file by file to make room (an ext2/3/4 or FAT partition in auto or files mode can shrink or grow; the partitions after it move)")]
    CutsPartition { size: u64 },
    #[error("writing the partition table to {path}: {source}")]
    WriteTable {
        path: PathBuf,
        source: PartitionError,
    },
    #[error("partition {partition}: {source}")]
    Filesystem { partition: u32, source: FsError },
}

/// How a capture writes its image.
#[derive(Debug, Clone, Copy)]
pub struct OutputOptions {
    pub format: ImageFormat,
    /// Store data compressed where the format can (qcow2).
    pub compress: bool,
    /// Replace an existing output.
    pub overwrite: bool,
}

/// Output writer threads. Buffered writes to one file serialise in the kernel, so one thread
/// (decoupled from reading) is as fast as more: see `writer`.
const WRITER_THREADS: usize = 1;

/// Copies every non-zero sector of `src`, at its own offset, into a new image at `out`.
pub fn capture_sectors(
    src: &dyn BlockDevice,
    out: &Path,
    output: OutputOptions,
    progress: &dyn Progress,
) -> Result<CaptureStats, CaptureError> {
    let OutputOptions {
        format,
        compress,
        overwrite,
    } = output;
    if compress && format != ImageFormat::Qcow2 {
        return Err(CaptureError::CannotCompress {
            format: format.name(),
        });
    }
    let started = Instant::now();
    let output = PartialOutput::create(out, overwrite)?;
    let partial = output.partial_path().to_path_buf();
    let write_err = |source| CaptureError::Write {
        path: partial.clone(),
        source,
    };
    let size = src.size();
    let file = output.file().try_clone().map_err(|source| {
        write_err(BlockError::Io {
            op: "reopen",
            offset: None,
            device: partial.display().to_string(),
            source,
        })
    })?;
    let device = create_image(
        format,
        file,
        &partial,
        size,
        compress,
        src.logical_sector_size(),
    )
    .map_err(|e| write_err(e.into()))?;

    let source_err = |source| CaptureError::Source {
        source,
        partial: partial.clone(),
    };
    let ranges = data_ranges(src).map_err(source_err)?;
    let to_read: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    progress.start("sectors", to_read);
    let copied = copy_ranges(src, &device, &ranges, progress);
    progress.finish();
    let written = match copied {
        Ok(w) => w,
        Err(CopyError::Read(e)) => return Err(source_err(e)),
        Err(CopyError::Write(e)) => return Err(write_err(e)),
    };
    device.flush().map_err(write_err)?;
    drop(device);
    output.commit()?;
    Ok(CaptureStats {
        size,
        skipped_by_status: size - to_read,
        read: written.submitted,
        written: written.written,
        elapsed: started.elapsed(),
    })
}

/// The byte ranges of `src` that may hold data (its block status says what is zero).
pub fn data_ranges(src: &dyn BlockDevice) -> Result<Vec<Range<u64>>, BlockError> {
    Ok(map_device(src)?
        .into_iter()
        .filter(|e| e.region != Region::Zero)
        .map(|e| e.offset..e.end())
        .collect())
}

/// Like [`data_ranges`], for regions outside partitions: a device that cannot say where its
/// data is (an agent refusing block status) is taken as all data, so a missing hint never
/// skips bytes. A real read failure shows when the ranges are read.
pub(crate) fn data_ranges_or_whole(dev: &dyn BlockDevice) -> Vec<Range<u64>> {
    data_ranges(dev).unwrap_or_else(|e| {
        tracing::debug!(
            "no block status ({e}): treating {} bytes as data",
            dev.size()
        );
        std::iter::once(0..dev.size()).collect()
    })
}

/// How many bytes of `range` of `dev` hold data (all of it when `dev` cannot say).
pub(crate) fn data_bytes_in(
    dev: &Arc<dyn BlockDevice>,
    range: &Range<u64>,
) -> Result<u64, BlockError> {
    let slice = diskferry_blockdev::SliceDevice::new(
        Arc::clone(dev),
        range.start,
        range.end - range.start,
    )?;
    Ok(data_ranges_or_whole(&slice)
        .iter()
        .map(|r| r.end - r.start)
        .sum())
}

/// Which side of a copy failed.
#[derive(Debug)]
pub enum CopyError {
    Read(BlockError),
    Write(BlockError),
}

/// Copies `ranges` of `src` to the same offsets of `dst`: reads in the given (disk) order with
/// many requests in flight, all-zero blocks not written. Advances `progress` by bytes read.
pub fn copy_ranges(
    src: &dyn BlockDevice,
    dst: &Arc<dyn BlockDevice>,
    ranges: &[Range<u64>],
    progress: &dyn Progress,
) -> Result<super::writer::WriteStats, CopyError> {
    let mut writer = SparseWriter::new(Arc::clone(dst), WRITER_THREADS);
    let mut write_failed = None;
    let read = src.read_ranges(ranges, &mut |offset, data| {
        let len = data.len() as u64;
        writer.submit(offset, data).map_err(|e| {
            write_failed = Some(e);
            BlockError::Protocol("stopped: the output could not be written".into())
        })?;
        progress.advance(len);
        Ok(())
    });
    let written = writer.finish();
    if let Some(e) = write_failed {
        return Err(CopyError::Write(e));
    }
    read.map_err(CopyError::Read)?;
    written.map_err(CopyError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use diskferry_blockdev::MemoryDevice;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_data_skips_zeros_and_renames_only_when_done() {
        let mut data = vec![0u8; 8 << 20];
        data[100..200].fill(0xab);
        data[(5 << 20)..(5 << 20) + 4096].fill(0xcd);
        let src = MemoryDevice::read_only(data.clone());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.raw");
        let stats = capture_sectors(
            &src,
            &out,
            OutputOptions {
                format: ImageFormat::Raw,
                compress: false,
                overwrite: false,
            },
            &Silent,
        )
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(
            stats.read,
            8 << 20,
            "memory devices know no holes: everything is read"
        );
        assert_eq!(
            stats.written, 8192,
            "only the two non-zero blocks are written"
        );
        assert!(
            std::fs::metadata(&out).unwrap().blocks() * 512 <= 64 << 10,
            "the output is sparse"
        );
        assert!(!dir.path().join("disk.raw.partial").exists());
        let mode = std::fs::metadata(&out).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "an image holds a whole disk: owner only");
        // A second capture to the same name is refused without overwrite.
        assert!(matches!(
            capture_sectors(
                &src,
                &out,
                OutputOptions {
                    format: ImageFormat::Raw,
                    compress: false,
                    overwrite: false
                },
                &Silent
            ),
            Err(CaptureError::Output(OutputError::Exists(_)))
        ));
    }
}
