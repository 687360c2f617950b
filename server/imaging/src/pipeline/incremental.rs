//! Incremental capture: the agent hashes its disk in chunks (no data crosses the wire for
//! that) and the hashes are compared with the base capture's chunk map ([`Base`]).
//!
//! A whole-disk base holds the source's bytes at the source's offsets: only the chunks that
//! differ are read and written, into a qcow2 overlay whose backing file is the base, so the
//! chain reads as the source does now ([`capture_overlay`]). A partition-by-partition base
//! recreated its filesystems elsewhere on its disk and cannot take source chunks on top: its
//! incremental capture is a new image whose unchanged files come from the base (`reuse`).
//! Either way the new capture gets its own chunk map, so chains grow one capture at a time.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::{BlockDevice, BlockError, NOT_HASHED};
use diskferry_protocol::chunks::ChunkHash;

use super::capture::{copy_ranges, CopyError};
use super::output::{OutputError, PartialOutput};
use crate::chunkmap::{self, ChunkMap, ChunkMapError, Layout};
use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum IncrementalError {
    #[error("the base {base} has no chunk map: capture it with --chunk-map (or as an incremental capture) first")]
    NoMap { base: PathBuf },
    #[error(transparent)]
    Map(ChunkMapError),
    #[error("the base {base} changed since it was captured (its size or modification time is not what its chunk map recorded): capture a full image again, or give a base that did not change")]
    BaseChanged { base: PathBuf },
    #[error("the base {base} was captured from a disk of {then} bytes; this source has {now}")]
    SizeDiffers { base: PathBuf, then: u64, now: u64 },
    #[error("opening the base {base}: {source}")]
    Base {
        base: PathBuf,
        source: Box<diskferry_vdisk::ImageError>,
    },
    #[error("reading the partition table of the base {base}: {source}")]
    BaseTable {
        base: PathBuf,
        source: diskferry_partition::PartitionError,
    },
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("creating the overlay {path}: {source}")]
    Create {
        path: PathBuf,
        source: Box<diskferry_vdisk::ImageError>,
    },
    #[error("reading the source: {0}")]
    Read(BlockError),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: BlockError },
}

/// What an incremental capture did.
#[derive(Debug, Clone)]
pub struct IncrementalStats {
    /// Chunks hashed now (a files-mode base hashes only blocks its filesystems use).
    pub chunks: usize,
    pub changed_chunks: usize,
    /// Bytes of the changed chunks.
    pub changed_bytes: u64,
    /// Hashing the source and comparing.
    pub elapsed: Duration,
}

/// The previous capture of a source, checked, and what changed on the source since.
pub struct Base {
    pub path: PathBuf,
    pub map: ChunkMap,
    /// The source's chunk hashes now.
    pub now: Vec<ChunkHash>,
    /// Source byte ranges whose chunks changed, joined.
    pub changed: Vec<Range<u64>>,
    pub stats: IncrementalStats,
}

impl Base {
    /// Checks the base capture at `path` against `source` (its chunk map, its stamp, the
    /// source's size, the chain opening) and hashes the source (on the agent, for a remote
    /// disk) to find what changed.
    pub fn open(
        path: &Path,
        source: &Arc<dyn BlockDevice>,
        progress: &dyn Progress,
    ) -> Result<Base, IncrementalError> {
        let started = Instant::now();
        let map = base_map(path, source.size())?;
        progress.start("hashing", source.size());
        let now =
            chunkmap::hash_source(source, map.layout, map.chunk).map_err(IncrementalError::Read)?;
        progress.advance(source.size());
        progress.finish();
        let changed = map.changed(&now);
        // Chunks not hashed now hold no file data (free space, swap): they count as changed
        // for safety but are not reported as changes.
        let hashed = |i: &usize| now[*i] != NOT_HASHED;
        let chunks = (0..now.len()).filter(hashed).count();
        let differs = (0..now.len())
            .filter(hashed)
            .filter(|&i| now[i] != map.hashes[i]);
        let (changed_chunks, changed_bytes) = differs.fold((0, 0), |(n, b), i| {
            let start = i as u64 * u64::from(map.chunk);
            (
                n + 1,
                b + (start + u64::from(map.chunk)).min(map.source_size) - start,
            )
        });
        tracing::info!(
            "{changed_chunks} of {chunks} chunks changed since {}",
            path.display()
        );
        Ok(Base {
            path: path.to_path_buf(),
            stats: IncrementalStats {
                chunks,
                changed_chunks,
                changed_bytes,
                elapsed: started.elapsed(),
            },
            map,
            now,
            changed,
        })
    }

    /// The chunk map of a capture of this source made now, for the image at `image`.
    pub fn map_for(&self, image: &Path, layout: Layout) -> Result<ChunkMap, ChunkMapError> {
        Ok(ChunkMap {
            chunk: self.map.chunk,
            source_size: self.map.source_size,
            image_stamp: chunkmap::stamp_of(image)?,
            layout,
            hashes: self.now.clone(),
        })
    }
}

/// Captures the chunks of `source` that changed since the whole-disk capture `base` into a
/// qcow2 overlay at `out` whose backing file is the base.
pub fn capture_overlay(
    source: &dyn BlockDevice,
    out: &Path,
    base: &Base,
    overwrite: bool,
    progress: &dyn Progress,
) -> Result<(), IncrementalError> {
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
    let dst = diskferry_vdisk::create_overlay(file, &partial, &base.path).map_err(|source| {
        IncrementalError::Create {
            path: partial.clone(),
            source: Box::new(source),
        }
    })?;
    // A changed chunk may now read as zeros where the base holds data: zero it first, then
    // copy (the copy skips all-zero blocks).
    for r in &base.changed {
        dst.write_zeroes(r.start, r.end - r.start).map_err(werr)?;
    }
    progress.start("changed chunks", base.stats.changed_bytes);
    copy_ranges(source, &dst, &base.changed, progress).map_err(|e| match e {
        CopyError::Read(e) => IncrementalError::Read(e),
        CopyError::Write(e) => werr(e),
    })?;
    progress.finish();
    dst.flush().map_err(werr)?;
    drop(dst);
    output.commit()?;
    Ok(())
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
        source: Box::new(source),
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
