//! Delta writes onto a used disk: a partition built locally (the staging device) reaches the
//! target by writing only what differs. The chunks (64 KiB) holding blocks the stage's
//! filesystem uses are hashed on both sides — the target's by the agent, `HashChunks`, so no
//! data crosses the wire for it — and only chunks whose hashes differ are written: zeroed by
//! the agent, then given the stage's data, if any. Free blocks of the new filesystem are
//! neither hashed nor written: nothing reads them (not the system, not the verification), and
//! a full restore by partclone leaves them as they were too. A stage whose filesystem does
//! not open is compared whole; of a swap area only the header counts. A target that cannot hash (an
//! agent before `HashChunks`) is zeroed whole and gets every data chunk.
//!
//! Afterwards the agent hashes the written chunks again and each hash must equal the stage's
//! (the others did before writing): within the blocks in use the target then provably holds
//! the stage's bytes, and the deploy's file-level verification — which reads only blocks in
//! use — reads those partitions from the stage ([`ConfirmedView`]) instead of moving them back
//! over the wire. Partitions of a target that cannot hash are read back.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use diskferry_blockdev::{BlockDevice, BlockError, Result as BlockResult};
use diskferry_protocol::chunks::MAX_HASHES;

use super::capture::{copy_ranges, data_ranges, CopyError};
use super::partition_copy::zero;

/// The chunk size deltas are found in.
const CHUNK: u32 = crate::chunkmap::DEFAULT_CHUNK;

/// What a delta write did: bytes in the stage's data chunks, and bytes of them sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    pub data_bytes: u64,
    pub sent_bytes: u64,
    /// Every chunk of the target was hashed after writing and equals the stage's.
    pub confirmed: bool,
}

/// Makes `target` (the same size as `stage`) read as `stage`, sending only changed chunks.
pub(super) fn write_delta(
    stage: &Arc<dyn BlockDevice>,
    target: &Arc<dyn BlockDevice>,
) -> Result<DeltaStats, CopyError> {
    let size = stage.size();
    let data = data_ranges(&**stage).map_err(CopyError::Read)?;
    let data_chunks = chunk_runs(&data, size);
    let mut stats = DeltaStats {
        data_bytes: data_chunks.iter().map(|r| r.end - r.start).sum(),
        ..DeltaStats::default()
    };
    // Chunks in use are hashed on both sides once: one that reads the same is left alone;
    // the others are zeroed and get the stage's data.
    let changed = changed_in_use(stage, target)?;
    let hashed = changed.is_some();
    let changed = changed.unwrap_or_else(|| std::iter::once(0..size).collect());
    for c in &changed {
        zero(&**target, c.clone()).map_err(CopyError::Write)?;
        copy_ranges(
            &**stage,
            target,
            &within(&data, c),
            &crate::progress::Silent,
        )?;
        stats.sent_bytes += within(&data_chunks, c)
            .iter()
            .map(|r| r.end - r.start)
            .sum::<u64>();
    }
    target.flush().map_err(CopyError::Write)?;
    // The chunks left alone hashed equal before; what was written must now.
    stats.confirmed = hashed && confirm(stage, target, &changed)?;
    Ok(stats)
}

/// Hashes the `written` ranges of `target` and `stage`: true when all are equal, false when
/// the target cannot hash; an error naming the first chunk that differs otherwise.
fn confirm(
    stage: &Arc<dyn BlockDevice>,
    target: &Arc<dyn BlockDevice>,
    written: &[Range<u64>],
) -> Result<bool, CopyError> {
    for r in written {
        let Some(differing) = changed_chunks(stage, target, r.clone())? else {
            return Ok(false);
        };
        if let Some(d) = differing.first() {
            return Err(CopyError::Write(BlockError::Protocol(format!(
                "after writing, the target's bytes at {}..{} still differ from what was sent",
                d.start, d.end
            ))));
        }
    }
    Ok(true)
}

/// The parts of the sorted, disjoint `ranges` inside `window`.
fn within(ranges: &[Range<u64>], window: &Range<u64>) -> Vec<Range<u64>> {
    let first = ranges.partition_point(|r| r.end <= window.start);
    ranges[first..]
        .iter()
        .take_while(|r| r.start < window.end)
        .map(|r| r.start.max(window.start)..r.end.min(window.end))
        .collect()
}

/// The target as the verification reads it: partitions whose chunks were all confirmed equal
/// to their stage by hash are read from the stage (no bytes cross the wire), the rest from the
/// target.
pub(super) struct ConfirmedView {
    target: Arc<dyn BlockDevice>,
    /// Target byte ranges and the stages they equal, sorted.
    stages: Vec<Stage>,
}

/// A confirmed partition: its range on the target and the stage it equals.
type Stage = (Range<u64>, Arc<dyn BlockDevice>);

/// Confirmed stages, collected as partitions are written.
pub(super) type Confirmed = Mutex<Vec<Stage>>;

impl ConfirmedView {
    pub(super) fn new(target: Arc<dyn BlockDevice>, confirmed: Confirmed) -> ConfirmedView {
        let mut stages = confirmed.into_inner().expect("confirmed stages");
        stages.sort_by_key(|(r, _)| r.start);
        ConfirmedView { target, stages }
    }

    /// The stage holding `offset`, with the stage's start on the target.
    fn stage_at(&self, offset: u64) -> Option<&Stage> {
        let i = self.stages.partition_point(|(r, _)| r.end <= offset);
        self.stages.get(i).filter(|(r, _)| r.start <= offset)
    }

    /// How long the next piece of a read at `offset` (at most `len` bytes) is, and the stage
    /// it comes from (with the offset there), or `None` for the target.
    fn piece(&self, offset: u64, len: u64) -> (u64, Option<(u64, &dyn BlockDevice)>) {
        match self.stage_at(offset) {
            Some((r, stage)) => (
                (r.end - offset).min(len),
                Some((offset - r.start, &**stage)),
            ),
            None => {
                let i = self.stages.partition_point(|(r, _)| r.end <= offset);
                let next = self.stages.get(i).map_or(u64::MAX, |(r, _)| r.start);
                ((next - offset).min(len), None)
            }
        }
    }
}

impl BlockDevice for ConfirmedView {
    fn size(&self) -> u64 {
        self.target.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.target.logical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (n, from) = self.piece(at, (buf.len() - done) as u64);
            let part = &mut buf[done..done + n as usize];
            match from {
                Some((inner, stage)) => stage.read_at(part, inner)?,
                None => self.target.read_at(part, at)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Ranges wholly outside confirmed partitions keep the target's pipelined reads.
    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let touches = |r: &Range<u64>| {
            self.stages
                .iter()
                .any(|(s, _)| s.start < r.end && r.start < s.end)
        };
        if !ranges.iter().any(touches) {
            return self.target.read_ranges(ranges, sink);
        }
        for r in ranges {
            let mut at = r.start;
            while at < r.end {
                let n = (r.end - at).min(1 << 20);
                let mut buf = vec![0u8; n as usize];
                self.read_at(&mut buf, at)?;
                sink(at, Bytes::from(buf))?;
                at += n;
            }
        }
        Ok(())
    }
}

/// The chunks holding blocks the stage's filesystem uses whose bytes differ between `stage`
/// and `target`, joined; `None` when the target cannot hash.
fn changed_in_use(
    stage: &Arc<dyn BlockDevice>,
    target: &Arc<dyn BlockDevice>,
) -> Result<Option<Vec<Range<u64>>>, CopyError> {
    let size = stage.size();
    let c = u64::from(CHUNK);
    let mut out = Vec::new();
    for run in diskferry_blockdev::chunk_runs(&in_use(stage), c, size) {
        match changed_chunks(stage, target, run.start * c..(run.end * c).min(size))? {
            Some(changed) => out.extend(changed),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// The byte ranges of the blocks the stage's filesystem uses (of a swap area: its header; the
/// other pages are scratch), or the whole stage when nothing of the kind opens on it.
fn in_use(stage: &Arc<dyn BlockDevice>) -> Vec<Range<u64>> {
    in_use_known(stage).unwrap_or_else(|| std::iter::once(0..stage.size()).collect())
}

/// The byte ranges of the blocks the stage's filesystem (or swap area) uses, when one opens.
pub(crate) fn in_use_known(stage: &Arc<dyn BlockDevice>) -> Option<Vec<Range<u64>>> {
    if diskferry_fs::swap::read_identity(&**stage).is_ok() {
        return Some(std::iter::once(0..diskferry_fs::swap::PAGE).collect());
    }
    let map = diskferry_fs::open(Arc::clone(stage))
        .ok()
        .and_then(|fs| fs.allocation_map().ok())?;
    Some(map.byte_ranges(0, stage.size()))
}

/// The chunks of `run` whose bytes differ between `stage` and `target`, joined; `None` when
/// the target cannot hash.
fn changed_chunks(
    stage: &Arc<dyn BlockDevice>,
    target: &Arc<dyn BlockDevice>,
    run: Range<u64>,
) -> Result<Option<Vec<Range<u64>>>, CopyError> {
    let span = MAX_HASHES as u64 * u64::from(CHUNK);
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut at = run.start;
    while at < run.end {
        let n = (run.end - at).min(span);
        let theirs = match target.chunk_hashes(at, n, CHUNK) {
            Ok(h) => h,
            Err(BlockError::Remote { .. } | BlockError::Unsupported(_)) => {
                tracing::debug!("the target cannot hash chunks");
                return Ok(None);
            }
            Err(e) => return Err(CopyError::Read(e)),
        };
        let ours = stage.chunk_hashes(at, n, CHUNK).map_err(CopyError::Read)?;
        crate::chunkmap::add_differing(&mut out, &ours, &theirs, at..at + n, CHUNK);
        at += n;
    }
    Ok(Some(out))
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

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    const MIB: u64 = CHUNK as u64; // one chunk

    fn device(size: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MemoryDevice::new(size as usize))
    }

    fn bytes(dev: &dyn BlockDevice) -> Vec<u8> {
        let mut b = vec![0u8; dev.size() as usize];
        dev.read_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn runs_and_windows() {
        let runs = chunk_runs(
            &[10..20, MIB + 5..MIB + 6, 5 * MIB..5 * MIB + 1],
            5 * MIB + 100,
        );
        assert_eq!(runs, [0..2 * MIB, 5 * MIB..5 * MIB + 100]);
        assert_eq!(
            within(&runs, &(MIB..5 * MIB + 50)),
            [MIB..2 * MIB, 5 * MIB..5 * MIB + 50]
        );
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
                sent_bytes: MIB,
                confirmed: true,
            }
        );
        assert_eq!(bytes(&*target), bytes(&*stage));
    }
}

#[cfg(test)]
mod confirm_tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    /// A disk that says it wrote but keeps its old bytes (a lying cache, a failing drive).
    struct Forgetful(MemoryDevice);

    impl BlockDevice for Forgetful {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> BlockResult<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_that_did_not_land_are_found_by_the_hashes_afterwards() {
        let stage = crate::pipeline::partition_copy::staging_device(4 << 20).unwrap();
        stage.write_at(&[7u8; 4096], 1 << 20).unwrap();
        let target: Arc<dyn BlockDevice> = Arc::new(Forgetful(MemoryDevice::new(4 << 20)));
        let err = write_delta(&stage, &target).unwrap_err();
        assert!(
            matches!(&err, CopyError::Write(e) if e.to_string().contains("still differ")),
            "{err:?}"
        );
    }
}

#[cfg(test)]
mod view_tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    #[test]
    fn a_confirmed_view_reads_stages_inside_their_ranges_and_the_target_elsewhere() {
        let target: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(100));
        target.write_at(&[1; 100], 0).unwrap();
        let stage: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(30));
        stage.write_at(&[2; 30], 0).unwrap();
        let view = ConfirmedView::new(target, Mutex::new(vec![(40..70, stage)]));
        let mut buf = [0u8; 100];
        view.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..40], &[1; 40]);
        assert_eq!(&buf[40..70], &[2; 30]);
        assert_eq!(&buf[70..], &[1; 30]);
        let mut got = Vec::new();
        view.read_ranges(&[35..45, 90..95], &mut |off, b| {
            got.push((off, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(got[0], (35, [1, 1, 1, 1, 1, 2, 2, 2, 2, 2].to_vec()));
        assert_eq!(got[1], (90, vec![1; 5]));
    }
}
