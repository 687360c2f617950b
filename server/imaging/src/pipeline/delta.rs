//! Delta writes onto a used disk: a partition built locally (the staging device) reaches the
//! target by writing only what differs. Chunks (1 MiB) where the stage holds nothing are
//! zeroed on the target (the agent zeroes: nothing crosses the wire); chunks where it holds
//! data are hashed on both sides — the target's by the agent, `HashChunks` — and only those
//! whose hashes differ are sent. A target that cannot hash (an agent before `HashChunks`)
//! gets every data chunk, as before.

use std::ops::Range;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_protocol::chunks::MAX_HASHES;

use super::capture::{copy_ranges, data_ranges, CopyError};
use super::partition_copy::zero;

/// The chunk size deltas are found in.
const CHUNK: u32 = 1 << 20;

/// What a delta write did: bytes in the stage's data chunks, and bytes of them sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub data_bytes: u64,
    pub sent_bytes: u64,
}

/// Makes `target` (the same size as `stage`) read as `stage`, sending only changed chunks.
pub(super) fn write_delta(
    stage: &Arc<dyn BlockDevice>,
    target: &Arc<dyn BlockDevice>,
) -> Result<DeltaStats, CopyError> {
    let size = stage.size();
    let data_chunks = chunk_runs(&data_ranges(&**stage).map_err(CopyError::Read)?, size);
    for gap in complement(&data_chunks, size) {
        zero(&**target, gap).map_err(CopyError::Write)?;
    }
    let mut stats = DeltaStats::default();
    for run in &data_chunks {
        stats.data_bytes += run.end - run.start;
        for changed in changed_chunks(stage, target, run.clone())? {
            zero(&**target, changed.clone()).map_err(CopyError::Write)?;
            let mut pieces = data_ranges(
                &diskferry_blockdev::SliceDevice::new(
                    Arc::clone(stage),
                    changed.start,
                    changed.end - changed.start,
                )
                .map_err(CopyError::Read)?,
            )
            .map_err(CopyError::Read)?;
            pieces
                .iter_mut()
                .for_each(|p| *p = p.start + changed.start..p.end + changed.start);
            copy_ranges(&**stage, target, &pieces, &crate::progress::Silent)?;
            stats.sent_bytes += changed.end - changed.start;
        }
    }
    Ok(stats)
}

/// The chunks of `run` whose bytes differ between `stage` and `target`, joined; all of `run`
/// when the target cannot hash.
fn changed_chunks(
    stage: &Arc<dyn BlockDevice>,
    target: &Arc<dyn BlockDevice>,
    run: Range<u64>,
) -> Result<Vec<Range<u64>>, CopyError> {
    let span = MAX_HASHES as u64 * u64::from(CHUNK);
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut at = run.start;
    while at < run.end {
        let n = (run.end - at).min(span);
        let theirs = match target.chunk_hashes(at, n, CHUNK) {
            Ok(h) => h,
            Err(BlockError::Remote { .. } | BlockError::Unsupported(_)) => {
                tracing::debug!("the target cannot hash chunks: sending every data chunk");
                return Ok(vec![run]);
            }
            Err(e) => return Err(CopyError::Read(e)),
        };
        let ours = stage.chunk_hashes(at, n, CHUNK).map_err(CopyError::Read)?;
        crate::chunkmap::add_differing(&mut out, &ours, &theirs, at..at + n, CHUNK);
        at += n;
    }
    Ok(out)
}

/// `ranges` widened to whole chunks (the last one clipped to `size`) and joined.
fn chunk_runs(ranges: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let c = u64::from(CHUNK);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges.iter().filter(|r| r.start < r.end) {
        let start = r.start / c * c;
        let end = r.end.div_ceil(c).saturating_mul(c).min(size);
        match out.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
    }
    out
}

/// What of `0..size` the sorted, disjoint `runs` leave.
fn complement(runs: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in runs {
        if r.start > at {
            out.push(at..r.start);
        }
        at = r.end;
    }
    if at < size {
        out.push(at..size);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    const MIB: u64 = 1 << 20;

    fn device(size: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MemoryDevice::new(size as usize))
    }

    fn bytes(dev: &dyn BlockDevice) -> Vec<u8> {
        let mut b = vec![0u8; dev.size() as usize];
        dev.read_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn runs_and_complements() {
        let runs = chunk_runs(
            &[10..20, MIB + 5..MIB + 6, 5 * MIB..5 * MIB + 1],
            5 * MIB + 100,
        );
        assert_eq!(runs, [0..2 * MIB, 5 * MIB..5 * MIB + 100]);
        let gaps = complement(&runs, 5 * MIB + 100);
        assert_eq!((gaps.len(), gaps[0].clone()), (1, 2 * MIB..5 * MIB));
    }

    #[test]
    fn only_changed_chunks_are_sent_and_the_target_ends_equal() {
        // A sparse file, as deploys stage in: it knows where its data is.
        let stage = crate::pipeline::partition_copy::staging_device(8 * MIB + 4096).unwrap();
        stage.write_at(&vec![7u8; 3 * MIB as usize], MIB).unwrap();
        stage.write_at(&[9u8; 4096], 8 * MIB).unwrap();
        let target = device(8 * MIB + 4096);
        // First write: the target holds garbage everywhere; every data chunk is sent.
        target
            .write_at(&vec![0xa5; (8 * MIB + 4096) as usize], 0)
            .unwrap();
        let first = write_delta(&stage, &target).unwrap();
        assert_eq!(first.sent_bytes, 3 * MIB + 4096);
        assert_eq!(bytes(&*target), bytes(&*stage));
        // One byte changed in one chunk: one chunk sent.
        stage.write_at(&[1], 2 * MIB + 17).unwrap();
        let second = write_delta(&stage, &target).unwrap();
        assert_eq!(
            second,
            DeltaStats {
                data_bytes: 3 * MIB + 4096,
                sent_bytes: MIB
            }
        );
        assert_eq!(bytes(&*target), bytes(&*stage));
    }
}
