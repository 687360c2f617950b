//! The block device abstraction every layer speaks: positional reads and writes of bytes, a
//! size, flush, discard, and an optional cheap "which ranges are zero" query.
//!
//! Remote client disks, local files and devices, memory buffers, slices (partitions) — and in
//! later layers virtual disk formats — are all [`BlockDevice`]s. The trait is synchronous:
//! filesystem crates are synchronous, so they run on blocking threads; the remote
//! implementation bridges to the async connection internally. [`BlockReader`] adapts any device
//! to `Read + Write + Seek` with a position of its own.

mod cancel;
mod cow;
mod file;
mod hybrid;
mod memory;
mod reader;
mod recording;
mod slice;
mod zero;

use std::ops::Range;

use bytes::Bytes;
use diskferry_protocol::chunks::{self, ChunkHash};

pub use cancel::{CancelFlag, CancellableDevice};
pub use cow::CowDevice;
pub use diskferry_localdisk::Region;
pub use file::FileDevice;
pub use hybrid::{HybridError, HybridOptions, HybridStats, HybridVolume, CLUSTER};
pub use memory::MemoryDevice;
pub use reader::BlockReader;
pub use recording::{crash_seed, Op, RecordingDevice};
pub use slice::SliceDevice;
pub use zero::{is_zero, nonzero_runs};

/// A run of bytes with one known [`Region`] state, at an absolute offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub region: Region,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Why a block operation failed. Carries enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{op}{} on {device}: {source}", at(*offset))]
    Io {
        op: &'static str,
        offset: Option<u64>,
        device: String,
        source: std::io::Error,
    },
    #[error("range {offset}+{len} is beyond the end of the device ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("the client refused {op}{}: {message} ({code})", at(*offset))]
    Remote {
        op: &'static str,
        offset: Option<u64>,
        code: diskferry_protocol::ErrorCode,
        message: String,
    },
    #[error("lost the connection to the client: {0}")]
    Disconnected(String),
    #[error("the client broke the protocol: {0}")]
    Protocol(String),
    /// A malformed image or on-disk structure below the device; the source (an image
    /// format's typed error) names the file and says where and what.
    #[error("{0}")]
    Format(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("this device cannot {0}")]
    Unsupported(&'static str),
    #[error("cancelled")]
    Cancelled,
}

/// " at offset N" where an operation has one.
fn at(offset: Option<u64>) -> String {
    offset
        .map(|o| format!(" at offset {o}"))
        .unwrap_or_default()
}

/// Result of block operations.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// Checks that `offset..offset+len` lies within a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// Default chunk for [`BlockDevice::read_ranges`] on devices without a faster way.
const DEFAULT_RANGE_CHUNK: u64 = 4 << 20;

/// A disk-like thing addressed by byte offsets. All methods take `&self`: implementations are
/// safe to share between threads, and no call depends on a previous seek.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// The logical sector size (the smallest unit the device addresses).
    fn logical_sector_size(&self) -> u32 {
        512
    }

    fn is_read_only(&self) -> bool;

    /// Reads exactly `buf.len()` bytes at `offset`; short reads are errors.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    /// Makes previous writes durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Changes the size (image containers grow as they allocate). Fixed-size devices refuse.
    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(BlockError::Unsupported("change size"))
    }

    /// Declares a range unneeded. Devices that cannot deallocate ignore it; afterwards the
    /// range's contents are unspecified unless [`BlockDevice::block_status`] says `Zero`.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Makes the range read as zeros. Devices that can do it without moving zeros (hole
    /// punching, a remote client's own zeroing) override this; the default writes zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size(), offset, len)?;
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// What is cheaply known about `offset..offset+len` (clipped to the size): consecutive
    /// extents from `offset`, possibly ending early (ask again from the end). The honest
    /// default is "unknown".
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            len: end - offset,
            region: Region::Unknown,
        }])
    }

    /// The hash of each `chunk`-byte piece of `offset..offset+len` (the last one shorter), as
    /// [`diskferry_protocol::chunks`] defines it — what an incremental capture or a delta
    /// deploy compares to learn which chunks changed. Within the protocol's limits (a
    /// power-of-two chunk, at most `MAX_HASHES` chunks). By default the bytes are read and
    /// hashed here; remote devices have the agent hash them, so no data crosses the wire.
    fn chunk_hashes(&self, offset: u64, len: u64, chunk: u32) -> Result<Vec<ChunkHash>> {
        chunks::hash_count(len, chunk).map_err(BlockError::Protocol)?;
        check_range(self.size(), offset, len)?;
        chunks::hash_range(offset, len, chunk, |buf, at| self.read_at(buf, at))
    }

    /// Reads many ranges, handing each piece to `sink` in order, as owned buffers the sink
    /// may pass to other threads. Remote devices override this to keep many requests in
    /// flight; sinks must accept pieces of any size.
    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> Result<()>,
    ) -> Result<()> {
        for r in ranges {
            let mut pos = r.start;
            while pos < r.end {
                let n = (r.end - pos).min(DEFAULT_RANGE_CHUNK) as usize;
                let mut buf = vec![0u8; n];
                self.read_at(&mut buf, pos)?;
                sink(pos, Bytes::from(buf))?;
                pos += n as u64;
            }
        }
        Ok(())
    }
}

/// The chunk hashes of a whole device, by as many [`BlockDevice::chunk_hashes`] calls as the
/// protocol's per-request limit needs.
pub fn hash_device(dev: &dyn BlockDevice, chunk: u32) -> Result<Vec<ChunkHash>> {
    hash_ranges(dev, chunk, std::slice::from_ref(&(0..dev.size())))
}

/// What [`hash_ranges`] puts for a chunk it was not asked to hash. No chunk's BLAKE3 hash is
/// all ones in practice; comparisons must still treat it as "unknown", never as equal.
pub const NOT_HASHED: ChunkHash = [0xff; 32];

/// Chunks of unasked bytes between two asked ranges that are hashed anyway, to save a round
/// trip: hashing 1 MiB costs less than asking twice.
const HASH_GAP_CHUNKS: u64 = 16;

/// One hash per `chunk` of the device: the chunks that touch `ranges` hashed (on the agent,
/// for a remote disk), the others [`NOT_HASHED`]. Filesystem-aware callers pass the blocks in
/// use, so free space is never read.
pub fn hash_ranges(
    dev: &dyn BlockDevice,
    chunk: u32,
    ranges: &[Range<u64>],
) -> Result<Vec<ChunkHash>> {
    let size = dev.size();
    let c = u64::from(chunk.max(1));
    let mut out = vec![NOT_HASHED; size.div_ceil(c) as usize];
    for run in chunk_runs(ranges, c, size) {
        let mut at = run.start;
        while at < run.end {
            let n = (run.end - at).min(chunks::MAX_HASHES as u64);
            let len = (n * c).min(size - at * c);
            let hashes = dev.chunk_hashes(at * c, len, chunk)?;
            if hashes.len() as u64 != n {
                return Err(BlockError::Protocol(format!(
                    "{} chunk hashes for {n} chunks",
                    hashes.len()
                )));
            }
            out[at as usize..(at + n) as usize].copy_from_slice(&hashes);
            at += n;
        }
    }
    Ok(out)
}

/// The chunk indices touching `ranges` (clipped to `size`), sorted and joined across gaps of
/// a few chunks (hashing those costs less than another request).
pub fn chunk_runs(ranges: &[Range<u64>], chunk: u64, size: u64) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges
        .iter()
        .filter(|r| r.start < r.end.min(size))
        .map(|r| r.start / chunk..r.end.min(size).div_ceil(chunk))
        .collect();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last.end + HASH_GAP_CHUNKS => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The whole-device map: every extent from 0 to the end, by repeated `block_status` calls.
pub fn map_device(dev: &dyn BlockDevice) -> Result<Vec<Extent>> {
    let size = dev.size();
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let extents = dev.block_status(pos, size - pos)?;
        if extents.is_empty() {
            return Err(BlockError::Protocol(format!(
                "block status at offset {pos} returned nothing"
            )));
        }
        for e in extents {
            if e.offset != pos || e.len == 0 || e.end() > size {
                return Err(BlockError::Protocol(format!(
                    "block status extent {e:?} does not continue at offset {pos}"
                )));
            }
            pos = e.end();
            match out.last_mut() {
                Some(last) if last.region == e.region => last.len += e.len,
                _ => out.push(e),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod hash_tests {
    use super::*;

    #[test]
    fn only_chunks_touching_the_ranges_are_hashed_and_the_rest_are_marked_unknown() {
        let chunk = 4096u32;
        let mut data = vec![7u8; 200 * 4096 + 100];
        data[150 * 4096] = 1;
        let dev = memory::MemoryDevice::read_only(data);
        let all = hash_device(&dev, chunk).unwrap();
        assert_eq!(all.len(), 201);
        // Chunk 3 (one byte of it), chunks 100..=130 and the short last chunk.
        let some = hash_ranges(
            &dev,
            chunk,
            &[
                100 * 4096..130 * 4096 + 1,
                3 * 4096 + 5..3 * 4096 + 6,
                200 * 4096..200 * 4096 + 100,
            ],
        )
        .unwrap();
        for (i, (a, b)) in all.iter().zip(&some).enumerate() {
            if i == 3 || (100..=130).contains(&i) || i == 200 {
                assert_eq!(a, b, "chunk {i}");
            } else if (4..=19).contains(&i) || i < 3 {
                // Within the gap joined to chunk 3's request, or before it: either way not
                // asked, so hashed only as part of a joined run.
                assert!(b == a || *b == NOT_HASHED, "chunk {i}");
            } else {
                assert_eq!(*b, NOT_HASHED, "chunk {i}");
            }
        }
        assert_ne!(some[150], all[150]);
    }

    #[test]
    fn runs_join_small_gaps_and_stay_apart_across_large_ones() {
        let runs = chunk_runs(
            &[50..60, 0..10, 10 * 4096..11 * 4096, 1 << 40..(1 << 40) + 1],
            4096,
            1 << 20,
        );
        assert_eq!(runs, vec![0..11]); // a 9-chunk gap is hashed through
        let runs = chunk_runs(
            &[0..4096, 17 * 4096..18 * 4096, 35 * 4096..36 * 4096],
            4096,
            1 << 20,
        );
        assert_eq!(runs, vec![0..18, 35..36]);
    }
}
