//! Incremental capture, sector level: the agent hashes its disk in chunks (no data crosses
//! the wire for that), the hashes are compared with the base capture's chunk map, and only
//! the chunks that differ are read and written — into a qcow2 overlay whose backing file is
//! the base, so the chain reads as the source does now. The new capture gets its own chunk
//! map, so chains grow one capture at a time.
//!
//! This increment works on whole-disk (sectors-mode) captures, where the image holds the
//! source's bytes at the source's offsets; a files-mode capture recreates its filesystems
//! elsewhere on the disk and cannot take source chunks on top.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::{BlockDevice, BlockError};

use super::capture::{copy_ranges, CopyError};
use super::output::{OutputError, PartialOutput};
use crate::chunkmap::{self, ChunkMap, ChunkMapError};
use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum IncrementalError {
    #[error("the base {base} has no chunk map: capture it with --chunk-map (or as an incremental capture) first")]
    NoMap { base: PathBuf },
    #[error(transparent)]
    Map(ChunkMapError),
    #[error("the base {base} changed since it was captured (its size or modification time is not what its chunk map recorded): an overlay on it would not read as the source")]
    BaseChanged { base: PathBuf },
    #[error("the base {base} was captured from a disk of {then} bytes; this source has {now}")]
    SizeDiffers { base: PathBuf, then: u64, now: u64 },
    #[error("opening the base {base}: {source}")]
    Base {
        base: PathBuf,
        source: diskferry_vdisk::ImageError,
    },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("creating the overlay {path}: {source}")]
    Create {
        path: PathBuf,
        source: diskferry_vdisk::ImageError,
    },
    #[error("reading the source: {0}")]
    Read(BlockError),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: BlockError },
}

/// What an incremental capture did.
#[derive(Debug, Clone)]
pub struct IncrementalStats {
    pub chunks: usize,
    pub changed_chunks: usize,
    /// Bytes of the changed chunks, read from the source and written.
    pub changed_bytes: u64,
    pub elapsed: Duration,
}

/// Captures `source` into a qcow2 overlay at `out` on the base capture `base`, copying only
/// the chunks that changed since `base` was captured.
pub fn capture_incremental(
    source: &Arc<dyn BlockDevice>,
    out: &Path,
    base: &Path,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<IncrementalStats, IncrementalError> {
    let started = Instant::now();
    let map = base_map(base, source.size())?;
    progress.start("hashing", source.size());
    let now =
        diskferry_blockdev::hash_device(&**source, map.chunk).map_err(IncrementalError::Read)?;
    progress.advance(source.size());
    let changed = map.changed(&now);
    let changed_bytes: u64 = changed.iter().map(|r| r.end - r.start).sum();
    tracing::info!(
        "{} of {} chunks changed since {}",
        changed_bytes.div_ceil(u64::from(map.chunk)),
        now.len(),
        base.display()
    );
    let output = PartialOutput::create(out, overwrite)?;
    let partial = output.partial_path().to_path_buf();
    let werr = |source| IncrementalError::Write {
        path: partial.clone(),
        source,
    };
    let file = output
        .file()
        .try_clone()
        .map_err(|e| werr(io(e, &partial)))?;
    let dst = diskferry_vdisk::create_overlay(file, &partial, base).map_err(|source| {
        IncrementalError::Create {
            path: partial.clone(),
            source,
        }
    })?;
    // A changed chunk may now read as zeros where the base holds data: zero it first, then
    // copy (the copy skips all-zero blocks).
    for r in &changed {
        dst.write_zeroes(r.start, r.end - r.start).map_err(werr)?;
    }
    progress.start("changed chunks", changed_bytes);
    copy_ranges(&**source, &dst, &changed, progress).map_err(|e| match e {
        CopyError::Read(e) => IncrementalError::Read(e),
        CopyError::Write(e) => werr(e),
    })?;
    progress.finish();
    dst.flush().map_err(werr)?;
    drop(dst);
    let out = output.commit()?;
    ChunkMap {
        chunk: map.chunk,
        source_size: source.size(),
        image_stamp: chunkmap::stamp_of(&out).map_err(IncrementalError::Map)?,
        hashes: now,
    }
    .save(&out)
    .map_err(IncrementalError::Map)?;
    Ok(IncrementalStats {
        chunks: map.hashes.len(),
        changed_chunks: changed_bytes.div_ceil(u64::from(map.chunk)) as usize,
        changed_bytes,
        elapsed: started.elapsed(),
    })
}

/// The base's chunk map, checked against the base image and the source.
fn base_map(base: &Path, source_size: u64) -> Result<ChunkMap, IncrementalError> {
    if !chunkmap::path_for(base).exists() {
        return Err(IncrementalError::NoMap {
            base: base.to_path_buf(),
        });
    }
    let map = ChunkMap::load(base).map_err(IncrementalError::Map)?;
    if chunkmap::stamp_of(base).map_err(IncrementalError::Map)? != map.image_stamp {
        return Err(IncrementalError::BaseChanged {
            base: base.to_path_buf(),
        });
    }
    if map.source_size != source_size {
        return Err(IncrementalError::SizeDiffers {
            base: base.to_path_buf(),
            then: map.source_size,
            now: source_size,
        });
    }
    // The chain must open (a vanished backing file of the base is refused here).
    diskferry_vdisk::open_image(base, true).map_err(|source| IncrementalError::Base {
        base: base.to_path_buf(),
        source,
    })?;
    Ok(map)
}

fn io(source: std::io::Error, path: &Path) -> BlockError {
    BlockError::Io {
        op: "reopen",
        offset: None,
        device: path.display().to_string(),
        source,
    }
}
