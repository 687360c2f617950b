//! A [`BlockDevice`] that records every change made through it, for crash tests.
//!
//! [`RecordingDevice`] owns: the wrapped device (every call goes through to it), a copy of that
//! device's contents taken when the recorder was made (the *initial state*), and the ordered
//! log of the mutating operations that succeeded since — writes with their bytes, resizes,
//! discards, zeroings, and flushes as boundary markers ([`Op`]). It owns nothing about what
//! the bytes mean.
//!
//! A crash is simulated by replaying a prefix of the log onto the initial state
//! ([`RecordingDevice::replay`], or [`RecordingDevice::replay_onto`] to advance a device of
//! the caller's step by step): "the machine stopped after the first N operations reached the
//! disk, in order". Flushes are where a writer promises durability, so
//! [`RecordingDevice::flush_boundaries`] lists the prefixes that end with one. Each logged
//! operation is replayed whole: torn writes and writes reordered between two flushes are not
//! modelled. A replayed discard does whatever the replay target's `discard` does
//! ([`MemoryDevice`] zero-fills, a file punches a hole).
//!
//! The initial state is held in memory: this is for test-sized devices.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BlockDevice, Extent, MemoryDevice, Result};

/// One mutating operation, as the wrapped device received it (and completed it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `write_at(data, offset)`.
    Write { offset: u64, data: Vec<u8> },
    /// `flush()`: everything before it was promised durable.
    Flush,
    /// `resize(new_size)`.
    Resize(u64),
    /// `discard(offset, len)`.
    Discard { offset: u64, len: u64 },
    /// `write_zeroes(offset, len)`.
    WriteZeroes { offset: u64, len: u64 },
}

impl Op {
    /// Applies this operation to `target` (a flush is a marker and does nothing).
    pub fn apply(&self, target: &dyn BlockDevice) -> Result<()> {
        match self {
            Op::Write { offset, data } => target.write_at(data, *offset),
            Op::Flush => Ok(()),
            Op::Resize(size) => target.resize(*size),
            Op::Discard { offset, len } => target.discard(*offset, *len),
            Op::WriteZeroes { offset, len } => target.write_zeroes(*offset, *len),
        }
    }

    /// The byte range this operation changes, if it changes bytes in place.
    pub fn range(&self) -> Option<Range<u64>> {
        match self {
            Op::Write { offset, data } => Some(*offset..*offset + data.len() as u64),
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                Some(*offset..*offset + *len)
            }
            Op::Flush | Op::Resize(_) => None,
        }
    }
}

/// Wraps a device and logs every successful mutating call in order (see the module docs).
pub struct RecordingDevice {
    inner: Arc<dyn BlockDevice>,
    initial: Vec<u8>,
    log: Mutex<Vec<Op>>,
}

impl std::fmt::Debug for RecordingDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingDevice")
            .field("initial_len", &self.initial.len())
            .field("ops", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl RecordingDevice {
    /// Starts recording changes to `inner`, whose current contents become the initial state.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Result<RecordingDevice> {
        let len = usize::try_from(inner.size())
            .map_err(|_| super::BlockError::Unsupported("hold that much in memory"))?;
        let mut initial = vec![0u8; len];
        inner.read_at(&mut initial, 0)?;
        Ok(RecordingDevice {
            inner,
            initial,
            log: Mutex::new(Vec::new()),
        })
    }

    /// Recording changes to a fresh empty [`MemoryDevice`] (how images are created).
    pub fn empty() -> RecordingDevice {
        RecordingDevice {
            inner: Arc::new(MemoryDevice::new(0)),
            initial: Vec::new(),
            log: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Op>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The contents the device had when recording started.
    pub fn initial(&self) -> &[u8] {
        &self.initial
    }

    /// How many operations were recorded so far (the largest meaningful cut).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A copy of the log.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().clone()
    }

    /// A copy of one operation.
    pub fn op(&self, index: usize) -> Option<Op> {
        self.lock().get(index).cloned()
    }

    /// Every cut `n` (a prefix length) whose last operation is a flush, ascending.
    pub fn flush_boundaries(&self) -> Vec<usize> {
        self.lock()
            .iter()
            .enumerate()
            .filter(|(_, op)| **op == Op::Flush)
            .map(|(i, _)| i + 1)
            .collect()
    }

    /// The initial state with the first `upto` operations applied, as a new device.
    pub fn replay(&self, upto: usize) -> Result<MemoryDevice> {
        let dev = MemoryDevice::new(self.initial.len());
        dev.write_at(&self.initial, 0)?;
        self.replay_onto(&dev, 0..upto)?;
        Ok(dev)
    }

    /// Applies operations `ops` (indexes into the log, clipped to it) to `target`, which the
    /// caller keeps in the state the first of them found: the initial state for `0..n`, or
    /// the result of an earlier call ending where this one starts.
    pub fn replay_onto(&self, target: &dyn BlockDevice, ops: Range<usize>) -> Result<()> {
        let log = self.lock();
        let end = ops.end.min(log.len());
        for op in &log[ops.start.min(end)..end] {
            op.apply(target)?;
        }
        Ok(())
    }

    /// Runs `f` on the inner device and logs `op` if it succeeds, in one critical section so
    /// the log's order is the order the inner device saw.
    fn record(&self, op: impl FnOnce() -> Op, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut log = self.lock();
        f()?;
        log.push(op());
        Ok(())
    }
}

impl BlockDevice for RecordingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.record(
            || Op::Write {
                offset,
                data: buf.to_vec(),
            },
            || self.inner.write_at(buf, offset),
        )
    }

    fn flush(&self) -> Result<()> {
        self.record(|| Op::Flush, || self.inner.flush())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.record(|| Op::Resize(new_size), || self.inner.resize(new_size))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.record(
            || Op::Discard { offset, len },
            || self.inner.discard(offset, len),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.record(
            || Op::WriteZeroes { offset, len },
            || self.inner.write_zeroes(offset, len),
        )
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
}

/// The seed crash tests use when `DISKFERRY_CRASH_SEED` does not say otherwise, so CI runs
/// are repeatable.
pub const DEFAULT_CRASH_SEED: u64 = 0x0d15_cfe2_2024;

/// The crash tests' seed: `DISKFERRY_CRASH_SEED=N` picks one, `=random` a fresh one (tests
/// print it on failure), anything else or nothing [`DEFAULT_CRASH_SEED`].
pub fn crash_seed() -> u64 {
    match std::env::var("DISKFERRY_CRASH_SEED")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("random") => {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::time::SystemTime::now())
        }
        Some(s) => s.parse().unwrap_or(DEFAULT_CRASH_SEED),
        None => DEFAULT_CRASH_SEED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn contents(dev: &dyn BlockDevice) -> Vec<u8> {
        let mut buf = vec![0u8; dev.size() as usize];
        dev.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn every_prefix_replays_to_the_state_the_device_had_then() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let start: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
        let inner = Arc::new(MemoryDevice::new(start.len()));
        inner.write_at(&start, 0).unwrap();
        let rec = RecordingDevice::new(inner.clone()).unwrap();
        assert_eq!(rec.initial(), &start[..]);
        // The state after each operation, observed on the inner device as it happens.
        let mut states = vec![contents(&*inner)];
        for i in 0..300 {
            let size = rec.size();
            match rng.gen_range(0..10) {
                0 => rec.flush().unwrap(),
                1 => rec.resize(rng.gen_range(1024..12_000)).unwrap(),
                2 => {
                    let offset = rng.gen_range(0..size);
                    rec.discard(offset, rng.gen_range(0..=size - offset))
                        .unwrap();
                }
                3 => {
                    let offset = rng.gen_range(0..size);
                    rec.write_zeroes(offset, rng.gen_range(0..=size - offset))
                        .unwrap();
                }
                _ => {
                    let offset = rng.gen_range(0..size);
                    let len = rng.gen_range(0..=(size - offset).min(3000)) as usize;
                    let data: Vec<u8> = (0..len).map(|_| rng.gen::<u8>() | 1).collect();
                    rec.write_at(&data, offset).unwrap();
                }
            }
            assert_eq!(rec.len(), i + 1);
            states.push(contents(&*inner));
        }
        for (n, state) in states.iter().enumerate() {
            assert!(contents(&rec.replay(n).unwrap()) == *state, "prefix {n}");
        }
        // Advancing one device in steps gives the same states as replaying from scratch.
        let stepped = MemoryDevice::new(start.len());
        stepped.write_at(&start, 0).unwrap();
        let mut at = 0;
        for n in [0, 1, 17, 18, 150, 299, 300, 1000] {
            rec.replay_onto(&stepped, at..n).unwrap();
            at = n.min(rec.len());
            assert!(contents(&stepped) == states[at], "stepped to {n}");
        }
    }

    #[test]
    fn logs_operations_in_order_with_flushes_as_boundaries() {
        let rec = RecordingDevice::empty();
        rec.resize(1024).unwrap();
        rec.write_at(b"abc", 10).unwrap();
        rec.flush().unwrap();
        rec.discard(0, 512).unwrap();
        rec.write_zeroes(512, 16).unwrap();
        rec.flush().unwrap();
        rec.flush().unwrap();
        assert_eq!(
            rec.ops(),
            vec![
                Op::Resize(1024),
                Op::Write {
                    offset: 10,
                    data: b"abc".to_vec()
                },
                Op::Flush,
                Op::Discard {
                    offset: 0,
                    len: 512
                },
                Op::WriteZeroes {
                    offset: 512,
                    len: 16
                },
                Op::Flush,
                Op::Flush,
            ]
        );
        assert_eq!(rec.flush_boundaries(), vec![3, 6, 7]);
        assert_eq!(rec.op(1).and_then(|o| o.range()), Some(10..13));
        let mut buf = [0u8; 3];
        rec.replay(2).unwrap().read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"abc");
        rec.replay(4).unwrap().read_at(&mut buf, 10).unwrap();
        assert_eq!(buf, [0; 3], "the discard zero-fills a memory replay");
        assert_eq!(rec.replay(0).unwrap().size(), 0);
    }

    #[test]
    fn failed_operations_are_not_recorded() {
        let rec = RecordingDevice::new(Arc::new(MemoryDevice::new(100))).unwrap();
        assert!(rec.write_at(&[1; 10], 95).is_err());
        assert!(rec.discard(90, 20).is_err());
        let ro = RecordingDevice::new(Arc::new(MemoryDevice::read_only(vec![5; 64]))).unwrap();
        assert!(ro.write_at(&[1], 0).is_err());
        assert!(ro.resize(10).is_err());
        assert!(rec.is_empty() && ro.is_empty());
        assert_eq!(ro.replay(0).unwrap().contents(), vec![5; 64]);
    }
}
