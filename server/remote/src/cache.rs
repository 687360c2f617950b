//! The bounded chunk cache with sequential readahead behind [`super::RemoteDisk::read_at`].
//!
//! The disk is cut into fixed chunks. A read waits for the chunks it covers, fetching those
//! not cached; when a read starts where the previous one ended, the next `readahead` chunks are
//! requested too, so a sequential reader finds its data already arriving. Completions arrive on
//! the connection's task and fill slots tagged with a generation, so a completion for a slot
//! invalidated by a write in the meantime is ignored.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;

use super::{expect_data, Completion};
use diskferry_blockdev::CancelFlag;
use diskferry_blockdev::{BlockError, Result};

enum SlotData {
    Loading,
    Ready(Bytes),
    Failed(BlockError),
}

struct Slot {
    generation: u64,
    data: SlotData,
    last_used: u64,
}

struct State {
    slots: HashMap<u64, Slot>,
    tick: u64,
    next_generation: u64,
    /// Where the previous read ended: a read starting here is sequential.
    last_end: u64,
}

/// Fetches `len` bytes at a chunk offset, calling the completion with the reply.
pub type Fetch<'a> = &'a dyn Fn(u64, u32, Completion);

pub struct ChunkCache {
    chunk: u32,
    readahead: usize,
    capacity: usize,
    state: Mutex<State>,
    filled: Condvar,
    /// A read waiting for a chunk gives up with [`BlockError::Cancelled`] once this is raised.
    cancel: Option<CancelFlag>,
}

impl ChunkCache {
    pub fn new(
        chunk: u32,
        readahead: usize,
        capacity: usize,
        cancel: Option<CancelFlag>,
    ) -> Arc<Self> {
        Arc::new(ChunkCache {
            chunk,
            readahead,
            capacity,
            cancel,
            state: Mutex::new(State {
                slots: HashMap::new(),
                tick: 0,
                next_generation: 0,
                last_end: u64::MAX,
            }),
            filled: Condvar::new(),
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        u64::from(self.chunk) * self.capacity as u64
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fills `buf` from `offset` (already range-checked against `size`).
    pub fn read(
        self: &Arc<Self>,
        buf: &mut [u8],
        offset: u64,
        size: u64,
        fetch: Fetch<'_>,
    ) -> Result<()> {
        let chunk = u64::from(self.chunk);
        let first = offset / chunk;
        let last = (offset + buf.len() as u64 - 1) / chunk;
        let last_chunk = (size - 1) / chunk;
        let wanted_end = {
            let mut st = self.lock();
            let sequential = offset == st.last_end;
            st.last_end = offset + buf.len() as u64;
            if sequential {
                (last + self.readahead as u64).min(last_chunk)
            } else {
                last
            }
        };
        self.start_missing(first..=wanted_end, first..=wanted_end, size, fetch);

        for idx in first..=last {
            let chunk_start = idx * chunk;
            let from = offset.max(chunk_start);
            let to = (offset + buf.len() as u64).min(chunk_start + chunk);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let mut st = self.lock();
            loop {
                st.tick += 1;
                let tick = st.tick;
                match st
                    .slots
                    .get_mut(&idx)
                    .map(|s| (&mut s.data, &mut s.last_used))
                {
                    Some((SlotData::Ready(data), used)) => {
                        *used = tick;
                        let at = (from - chunk_start) as usize;
                        dst.copy_from_slice(&data[at..at + dst.len()]);
                        break;
                    }
                    Some((SlotData::Loading, _)) => {
                        if self.cancel.as_ref().is_some_and(CancelFlag::is_cancelled) {
                            return Err(BlockError::Cancelled);
                        }
                        st = self
                            .filled
                            .wait_timeout(st, crate::connection::CANCEL_POLL)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    Some((SlotData::Failed(_), _)) => {
                        // Report the failure once; the slot goes so a later read retries.
                        if let Some(Slot {
                            data: SlotData::Failed(e),
                            ..
                        }) = st.slots.remove(&idx)
                        {
                            return Err(e);
                        }
                    }
                    None => {
                        // Invalidated or evicted while we waited: fetch it again.
                        drop(st);
                        self.start_missing(idx..=idx, first..=wanted_end, size, fetch);
                        st = self.lock();
                    }
                }
            }
        }
        Ok(())
    }

    /// Requests the chunks of `range` that are neither cached nor loading. Slots in `pinned`
    /// are never evicted to make room.
    fn start_missing(
        self: &Arc<Self>,
        range: std::ops::RangeInclusive<u64>,
        pinned: std::ops::RangeInclusive<u64>,
        size: u64,
        fetch: Fetch<'_>,
    ) {
        let chunk = u64::from(self.chunk);
        let mut to_fetch = Vec::new();
        {
            let mut st = self.lock();
            for idx in range {
                if st.slots.contains_key(&idx) {
                    continue;
                }
                if st.slots.len() >= self.capacity {
                    evict_one(&mut st, &pinned);
                }
                let generation = st.next_generation;
                st.next_generation += 1;
                let tick = st.tick;
                st.slots.insert(
                    idx,
                    Slot {
                        generation,
                        data: SlotData::Loading,
                        last_used: tick,
                    },
                );
                to_fetch.push((idx, generation));
            }
        }
        // Outside the lock: a dead connection completes synchronously.
        for (idx, generation) in to_fetch {
            let off = idx * chunk;
            let len = (size - off).min(chunk) as u32;
            let cache = Arc::clone(self);
            fetch(
                off,
                len,
                Box::new(move |reply| {
                    cache.complete(idx, generation, expect_data(reply, off, len as usize))
                }),
            );
        }
    }

    fn complete(&self, idx: u64, generation: u64, result: Result<Bytes>) {
        let mut st = self.lock();
        if let Some(slot) = st.slots.get_mut(&idx) {
            if slot.generation == generation {
                slot.data = match result {
                    Ok(b) => SlotData::Ready(b),
                    Err(e) => SlotData::Failed(e),
                };
            }
        }
        drop(st);
        self.filled.notify_all();
    }

    /// Forgets every chunk overlapping `offset..offset+len` (after a write or discard).
    pub fn invalidate(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let chunk = u64::from(self.chunk);
        let (first, last) = (offset / chunk, (offset + len - 1) / chunk);
        let mut st = self.lock();
        st.slots.retain(|idx, _| *idx < first || *idx > last);
        st.last_end = u64::MAX;
    }
}

/// Drops the least recently used finished chunk outside `pinned`. When every slot is loading
/// or pinned the cache grows past its capacity until completions arrive.
fn evict_one(st: &mut State, pinned: &std::ops::RangeInclusive<u64>) {
    let victim = st
        .slots
        .iter()
        .filter(|(idx, s)| !pinned.contains(idx) && !matches!(s.data, SlotData::Loading))
        .min_by_key(|(_, s)| s.last_used)
        .map(|(idx, _)| *idx);
    if let Some(idx) = victim {
        st.slots.remove(&idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_protocol::Reply;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const CHUNK: u32 = 4096;

    /// A disk of `size` bytes whose byte at offset `o` is `o % 251`, served by a fetch that
    /// completes at once; counts fetches and can fail the next one.
    struct Fake {
        fetches: AtomicUsize,
        fail_next: std::sync::atomic::AtomicBool,
    }

    impl Fake {
        fn fetch(&self, off: u64, len: u32, done: Completion) {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return done(Err(BlockError::Disconnected("test".into())));
            }
            let data: Vec<u8> = (off..off + u64::from(len))
                .map(|o| (o % 251) as u8)
                .collect();
            done(Ok(Reply::Data(data.into())));
        }
    }

    fn expected(off: u64, len: usize) -> Vec<u8> {
        (off..off + len as u64).map(|o| (o % 251) as u8).collect()
    }

    #[test]
    fn sequential_reads_fetch_ahead_and_stay_bounded() {
        let size = 64 * u64::from(CHUNK);
        let cache = ChunkCache::new(CHUNK, 4, 8, None);
        let fake = Fake {
            fetches: AtomicUsize::new(0),
            fail_next: false.into(),
        };
        let fetch = |o, l, d| fake.fetch(o, l, d);
        let mut buf = vec![0u8; 1000];
        let mut off = 0;
        // First read: one chunk. Second read continues it: readahead of 4 chunks starts.
        cache.read(&mut buf, off, size, &fetch).unwrap();
        assert_eq!(buf, expected(off, 1000));
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
        off += 1000;
        cache.read(&mut buf, off, size, &fetch).unwrap();
        assert_eq!(
            fake.fetches.load(Ordering::SeqCst),
            5,
            "the next 4 chunks were requested ahead"
        );
        // Reading on through the disk: every chunk fetched once, never more than capacity held.
        while off + 1000 <= size {
            cache.read(&mut buf, off, size, &fetch).unwrap();
            assert_eq!(buf, expected(off, 1000));
            assert!(
                cache.lock().slots.len() <= 8 + 1,
                "cache grew to {}",
                cache.lock().slots.len()
            );
            off += 1000;
        }
        assert_eq!(
            fake.fetches.load(Ordering::SeqCst),
            64,
            "each chunk fetched exactly once"
        );
    }

    #[test]
    fn a_failed_fetch_is_reported_once_then_retried() {
        let size = 16 * u64::from(CHUNK);
        let cache = ChunkCache::new(CHUNK, 2, 8, None);
        let fake = Fake {
            fetches: AtomicUsize::new(0),
            fail_next: true.into(),
        };
        let fetch = |o, l, d| fake.fetch(o, l, d);
        let mut buf = vec![0u8; 100];
        assert!(matches!(
            cache.read(&mut buf, 5000, size, &fetch),
            Err(BlockError::Disconnected(_))
        ));
        cache.read(&mut buf, 5000, size, &fetch).unwrap();
        assert_eq!(buf, expected(5000, 100));
    }

    #[test]
    fn invalidation_forgets_overlapping_chunks() {
        let size = 16 * u64::from(CHUNK);
        let cache = ChunkCache::new(CHUNK, 0, 8, None);
        let fake = Fake {
            fetches: AtomicUsize::new(0),
            fail_next: false.into(),
        };
        let fetch = |o, l, d| fake.fetch(o, l, d);
        let mut buf = vec![0u8; 10];
        cache.read(&mut buf, 0, size, &fetch).unwrap();
        cache.read(&mut buf, 0, size, &fetch).unwrap();
        assert_eq!(
            fake.fetches.load(Ordering::SeqCst),
            1,
            "a cached chunk is not fetched again"
        );
        cache.invalidate(4000, 200); // touches chunks 0 and 1
        cache.read(&mut buf, 0, size, &fetch).unwrap();
        assert_eq!(fake.fetches.load(Ordering::SeqCst), 2);
    }
}
