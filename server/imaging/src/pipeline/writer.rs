//! Writing captured data into an output device from a few threads at once.
//!
//! The reading side hands over owned buffers in disk order; worker threads drop the all-zero
//! blocks (the output stays sparse) and write the rest with positional writes, in any order.
//! Reading never waits for a write directly, and the queue between them is bounded, so memory
//! stays bounded. Outputs that accept parallel writes (image formats with their own locking,
//! block devices) can use several workers; buffered writes to one file serialise on the
//! inode lock, so captures to files use one (measured: two gained nothing on tmpfs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;

use diskferry_blockdev::nonzero_runs;
use diskferry_blockdev::{BlockDevice, BlockError};

/// Buffers waiting for a writer, at most.
const QUEUE_DEPTH: usize = 8;

/// What the writers did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes handed over.
    pub submitted: u64,
    /// Bytes actually written (the rest were all-zero blocks).
    pub written: u64,
}

struct Shared {
    written: AtomicU64,
    /// The first write error; later writes are skipped once it is set.
    failed: Mutex<Option<BlockError>>,
}

/// A pool of threads writing non-zero blocks to one output device.
pub struct SparseWriter {
    tx: Option<SyncSender<(u64, Bytes)>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    submitted: u64,
}

impl std::fmt::Debug for SparseWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseWriter")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl SparseWriter {
    /// Starts `threads` writers (at least one) on `out`.
    pub fn new(out: Arc<dyn BlockDevice>, threads: usize) -> SparseWriter {
        let (tx, rx) = sync_channel::<(u64, Bytes)>(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            failed: Mutex::new(None),
        });
        let workers = (0..threads.max(1))
            .map(|_| {
                let (rx, out, shared) = (Arc::clone(&rx), Arc::clone(&out), Arc::clone(&shared));
                std::thread::spawn(move || work(&rx, out.as_ref(), &shared))
            })
            .collect();
        SparseWriter {
            tx: Some(tx),
            workers,
            shared,
            submitted: 0,
        }
    }

    /// Queues `data` for writing at `offset`; blocks while the queue is full. Fails with the
    /// first write error once one has happened.
    pub fn submit(&mut self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        if let Some(e) = self.take_error() {
            return Err(e);
        }
        self.submitted += data.len() as u64;
        let sent = self.tx.as_ref().map(|tx| tx.send((offset, data)));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(self
                .take_error()
                .unwrap_or_else(|| BlockError::Protocol("output writers stopped".into()))),
        }
    }

    /// Waits for every queued write; returns the first error if any happened.
    pub fn finish(mut self) -> Result<WriteStats, BlockError> {
        self.tx = None;
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                return Err(BlockError::Protocol(
                    "an output writer thread panicked".into(),
                ));
            }
        }
        if let Some(e) = self.take_error() {
            return Err(e);
        }
        Ok(WriteStats {
            submitted: self.submitted,
            written: self.shared.written.load(Ordering::Relaxed),
        })
    }

    fn take_error(&self) -> Option<BlockError> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

fn work(rx: &Mutex<Receiver<(u64, Bytes)>>, out: &dyn BlockDevice, shared: &Shared) {
    loop {
        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((offset, data)) = next else { return };
        if shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            continue; // drain without writing
        }
        for run in nonzero_runs(&data) {
            if let Err(e) = out.write_at(&data[run.clone()], offset + run.start as u64) {
                shared
                    .failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
                break;
            }
            shared
                .written
                .fetch_add(run.len() as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for SparseWriter {
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    #[test]
    fn writes_everything_but_zero_blocks_from_several_threads() {
        let out = Arc::new(MemoryDevice::new(64 << 20));
        let mut w = SparseWriter::new(out.clone(), 3);
        let mut expect = vec![0u8; 64 << 20];
        for i in 0..64u64 {
            let mut chunk = vec![0u8; 1 << 20];
            if i % 3 != 0 {
                chunk[(i as usize * 4096) % (1 << 20)] = i as u8 + 1;
                chunk[1000] = 7;
            }
            expect[(i as usize) << 20..][..1 << 20].copy_from_slice(&chunk);
            w.submit(i << 20, Bytes::from(chunk)).unwrap();
        }
        let stats = w.finish().unwrap();
        assert_eq!(stats.submitted, 64 << 20);
        assert!(
            stats.written <= 42 * 2 * 4096,
            "only non-zero blocks are written: {stats:?}"
        );
        assert!(out.contents() == expect);
    }

    #[test]
    fn the_first_write_error_is_reported() {
        let out = Arc::new(MemoryDevice::read_only(vec![0u8; 1 << 20]));
        let mut w = SparseWriter::new(out, 2);
        let _ = w.submit(0, Bytes::from(vec![1u8; 4096]));
        let err = loop {
            match w.submit(0, Bytes::from(vec![1u8; 4096])) {
                Err(e) => break e,
                Ok(()) => std::thread::yield_now(),
            }
        };
        assert!(matches!(err, BlockError::ReadOnly), "{err}");
    }
}
