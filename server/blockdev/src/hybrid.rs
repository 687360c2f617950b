//! The hybrid volume: a writable [`BlockDevice`] of a fixed size that keeps written clusters in
//! RAM up to a limit and spills further ones to a sparse file — the RAM redo layer of a
//! writable export (`--redo ram:SIZE[:SPILLFILE]`) and, later, deploy staging.
//!
//! The volume is cut into [`CLUSTER`]-byte clusters (the last one may be short). Per cluster
//! it keeps:
//! - the **allocation bitmap**: written (or zeroed) since creation, or not;
//! - the **location bitmap**: for an allocated cluster, in the spill file (set) or in RAM;
//! - the **RAM map** (cluster → page of the RAM pool) and the **file map** (cluster → slot of
//!   the spill file). Pages and slots are taken append-only; freed ones go on a free list and
//!   are reused first.
//!
//! An allocated cluster in neither map is a **zero cluster**: it reads as zeros and holds no
//! storage. `write_zeroes` of a whole cluster, and a write of a whole cluster of zeros, leave
//! it in that state (freeing its page or slot).
//!
//! The RAM pool is an anonymous memory file (`memfd`), page `i` at `i * CLUSTER`, read and
//! written with `pread`/`pwrite`. Freeing a page punches it out of the file, which gives its
//! memory back to the kernel at once, however scattered the trimmed clusters are. Pages kept
//! in heap buffers were not given back: with 256 MiB written and all of it trimmed, RSS stayed
//! at 268 MiB under mimalloc's default settings (the binaries' allocator) and went only to
//! 131 MiB under glibc; trimming every other cluster released nothing under either. The pool's
//! memory is shared memory: the kernel counts it in `Shmem` and the process's cgroup, not in
//! its RSS; [`HybridStats::ram_resident_bytes`] reports it.
//!
//! Trim (`discard`) makes every whole cluster inside the range unallocated, its page or spill
//! slot hole-punched (`fallocate(PUNCH_HOLE)`), so memory and the spill file's allocated
//! blocks shrink. Partial clusters at the edges of a trim are left as they were: the NBD
//! specification leaves trimmed contents unspecified, and `block_status` keeps calling them
//! data.
//!
//! Unallocated clusters read as zeros here; the copy-on-write device ([`crate::CowDevice`])
//! reads them from its base instead, which is why [`HybridVolume::allocated`] tells
//! "unallocated" apart from "allocated zero" while `block_status` calls both `Zero`.
//!
//! Locking: one `RwLock` over the bitmaps and maps. Reads share it; writes, zeroing and trims
//! hold it exclusively, including their page and spill-file writes and hole punches, so a slot
//! freed by a trim can never be reused while a write to it is in flight. The redo never
//! outlives the process (the spill file is removed on drop), so `flush` has nothing to make
//! durable.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use diskferry_localdisk::{LocalDisk, Region};
use rustix::fs::MemfdFlags;

use super::{check_range, is_zero, BlockDevice, BlockError, Extent, Result};

/// Bytes per cluster: the unit of allocation, of RAM pages and of spill slots.
pub const CLUSTER: u64 = 64 << 10;

/// Largest allowed size of one bitmap (2^31 clusters: a 128 TiB volume).
const MAX_BITMAP_BYTES: u64 = 256 << 20;

/// Most runs one `block_status` or `allocated` call returns.
const MAX_RUNS: usize = 4096;

/// What a [`HybridVolume`] may hold where.
#[derive(Debug, Clone, Default)]
pub struct HybridOptions {
    /// Bytes of written clusters kept in RAM (at most `ram_limit / CLUSTER` clusters).
    pub ram_limit: u64,
    /// Where clusters past the RAM limit go: a new file, removed when the volume is dropped.
    pub spill: Option<PathBuf>,
}

/// Why a hybrid volume could not be made or could not take a write.
#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error(
        "the RAM redo is full ({limit} bytes, {pages} clusters of {CLUSTER} bytes): give a \
         spill file for the clusters past it (--redo ram:SIZE:SPILLFILE) or a larger SIZE"
    )]
    RamFull { limit: u64, pages: u64 },
    #[error(
        "a {size}-byte volume needs {bytes} bytes per cluster bitmap, over the \
         {MAX_BITMAP_BYTES}-byte limit"
    )]
    TooLarge { size: u64, bytes: u64 },
    #[error("the spill file {} already exists: name a new file", path.display())]
    SpillExists { path: PathBuf },
    #[error("cannot create the spill file {}: {source}", path.display())]
    SpillCreate { path: PathBuf, source: io::Error },
    #[error("cannot make the RAM redo's memory file: {source}")]
    RamPool { source: io::Error },
    #[error("the base is {base} bytes but the redo volume is {top} bytes")]
    SizeMismatch { base: u64, top: u64 },
}

impl HybridError {
    /// As a [`BlockError`] of operation `op`; the typed error stays reachable as the source.
    pub fn into_block(self, op: &'static str, offset: Option<u64>) -> BlockError {
        let kind = match &self {
            HybridError::RamFull { .. } => io::ErrorKind::StorageFull,
            HybridError::SpillExists { .. } => io::ErrorKind::AlreadyExists,
            HybridError::SpillCreate { source, .. } | HybridError::RamPool { source } => {
                source.kind()
            }
            HybridError::TooLarge { .. } | HybridError::SizeMismatch { .. } => {
                io::ErrorKind::InvalidInput
            }
        };
        BlockError::Io {
            op,
            offset,
            device: "the RAM redo".into(),
            source: io::Error::new(kind, self),
        }
    }
}

impl From<HybridError> for BlockError {
    fn from(e: HybridError) -> BlockError {
        e.into_block("open", None)
    }
}

/// Where a volume's clusters are, in numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HybridStats {
    pub ram_clusters: u64,
    pub file_clusters: u64,
    pub zero_clusters: u64,
    /// Bytes of RAM pages in use (whole clusters).
    pub ram_bytes: u64,
    /// Bytes the RAM pool's memory file holds (pages of freed slots are given back).
    pub ram_resident_bytes: u64,
    /// Bytes of spill slots in use (whole clusters).
    pub spill_bytes: u64,
    /// Bytes the spill file occupies on disk (`st_blocks`), when there is one.
    pub spill_disk_bytes: Option<u64>,
}

/// Reads the base's bytes at an absolute offset: what a copy-on-write device puts under a
/// cluster it does not hold yet. `None` means zeros.
pub(crate) type Under<'a> = Option<&'a (dyn Fn(&mut [u8], u64) -> Result<()> + Sync)>;

/// A fixed-length set of bits.
#[derive(Debug)]
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64) as usize])
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64, on: bool) {
        let w = &mut self.0[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
    /// The first set bit in `from..limit`, or `limit`.
    fn next_set(&self, from: u64, limit: u64) -> u64 {
        let mut i = from;
        while i < limit {
            let w = self.0[(i / 64) as usize] >> (i % 64);
            if w != 0 {
                return (i + u64::from(w.trailing_zeros())).min(limit);
            }
            i = (i / 64 + 1) * 64;
        }
        limit
    }
    fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The two places a cluster's bytes can be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Ram,
    File,
}

/// Where one cluster's bytes are: a slot (page or spill slot) of a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Unallocated,
    Zero,
    Stored(Tier, u64),
}

/// Cluster-sized slots of one store: taken append-only, freed ones reused first.
#[derive(Debug, Default)]
struct Slots {
    taken: u64,
    free: Vec<u64>,
}

impl Slots {
    fn take(&mut self) -> u64 {
        self.free.pop().unwrap_or_else(|| {
            self.taken += 1;
            self.taken - 1
        })
    }
}

/// The bitmaps and maps, behind the volume's lock.
#[derive(Debug)]
struct State {
    allocated: Bitmap,
    in_file: Bitmap,
    /// Cluster → RAM page and cluster → spill slot.
    maps: [HashMap<u64, u64>; 2],
    slots: [Slots; 2],
}

impl State {
    fn place(&self, c: u64) -> Place {
        if !self.allocated.get(c) {
            return Place::Unallocated;
        }
        let tier = if self.in_file.get(c) {
            Tier::File
        } else {
            Tier::Ram
        };
        self.maps[tier as usize]
            .get(&c)
            .map_or(Place::Zero, |&s| Place::Stored(tier, s))
    }

    fn held(&self, tier: Tier) -> u64 {
        self.maps[tier as usize].len() as u64
    }

    /// Records cluster `c` as stored in `slot` of `tier`.
    fn stored(&mut self, c: u64, tier: Tier, slot: u64) {
        self.maps[tier as usize].insert(c, slot);
        self.allocated.set(c, true);
        self.in_file.set(c, tier == Tier::File);
    }

    /// Frees cluster `c`'s slot, leaving it a zero cluster (`allocated`) or unallocated.
    /// Returns the slot, for its store to punch.
    fn release(&mut self, c: u64, allocated: bool) -> Option<(Tier, u64)> {
        let freed = match self.place(c) {
            Place::Stored(tier, slot) => {
                self.maps[tier as usize].remove(&c);
                self.slots[tier as usize].free.push(slot);
                Some((tier, slot))
            }
            Place::Zero | Place::Unallocated => None,
        };
        self.in_file.set(c, false);
        self.allocated.set(c, allocated);
        freed
    }
}

/// One tier's storage: the RAM pool (an anonymous memory file) or the spill file (created new,
/// removed on drop). Slot `i` is bytes `i * CLUSTER..` of it.
#[derive(Debug)]
struct Store {
    disk: LocalDisk,
    /// The same file, for its allocated size.
    file: File,
    name: String,
    /// The spill file's path, removed on drop.
    path: Option<PathBuf>,
}

impl Store {
    /// The RAM pool: a memory file, whose punched pages go back to the kernel at once.
    fn memory() -> Result<Store, HybridError> {
        let pool = |source| HybridError::RamPool { source };
        let fd = rustix::fs::memfd_create("diskferry-redo", MemfdFlags::CLOEXEC)
            .map_err(|e| pool(e.into()))?;
        Store::wrap(File::from(fd), "the RAM redo".into(), None).map_err(pool)
    }

    /// The spill file at `path`, which must not exist yet.
    fn spill(path: &Path) -> Result<Store, HybridError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path);
        let err = |source: io::Error| match source.kind() {
            io::ErrorKind::AlreadyExists => HybridError::SpillExists { path: path.into() },
            _ => HybridError::SpillCreate {
                path: path.into(),
                source,
            },
        };
        let name = format!("the spill file {}", path.display());
        Store::wrap(file.map_err(err)?, name, Some(path.into())).map_err(err)
    }

    fn wrap(file: File, name: String, path: Option<PathBuf>) -> io::Result<Store> {
        Ok(Store {
            disk: LocalDisk::from_file(file.try_clone()?, true)?,
            file,
            name,
            path,
        })
    }

    fn io_err(&self, op: &'static str, slot: u64) -> impl FnOnce(io::Error) -> BlockError + '_ {
        move |source| BlockError::Io {
            op,
            offset: Some(slot * CLUSTER),
            device: self.name.clone(),
            source,
        }
    }

    fn read(&self, buf: &mut [u8], slot: u64, within: u64) -> Result<()> {
        let r = self.disk.read_exact_at(buf, slot * CLUSTER + within);
        r.map_err(self.io_err("read", slot))
    }

    fn write(&self, buf: &[u8], slot: u64, within: u64) -> Result<()> {
        let r = self.disk.write_all_at(buf, slot * CLUSTER + within);
        r.map_err(self.io_err("write", slot))
    }

    fn punch(&self, slot: u64) -> Result<()> {
        let r = self.disk.punch_hole(slot * CLUSTER, CLUSTER);
        r.map_err(self.io_err("punch a hole", slot))
    }

    /// Bytes the file occupies (`st_blocks`).
    fn allocated_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("could not remove the spill file {}: {e}", path.display());
            }
        }
    }
}

/// One cluster's part of a request: cluster `c`, bytes `within` of it, at `buf_at` in the
/// caller's buffer.
#[derive(Debug, Clone)]
struct Piece {
    c: u64,
    within: Range<usize>,
    buf_at: usize,
}

impl Piece {
    fn len(&self) -> usize {
        self.within.len()
    }
}

/// A RAM + sparse-file volume; see the module documentation.
#[derive(Debug)]
pub struct HybridVolume {
    size: u64,
    max_pages: u64,
    ram_limit: u64,
    state: RwLock<State>,
    ram: Store,
    spill: Option<Store>,
}

impl HybridVolume {
    /// An empty (all unallocated) volume of `size` bytes. Creates the spill file, refusing an
    /// existing one; refuses sizes whose bitmaps would pass 256 MiB each.
    pub fn new(size: u64, options: HybridOptions) -> Result<HybridVolume, HybridError> {
        let clusters = size.div_ceil(CLUSTER);
        let bytes = clusters.div_ceil(8);
        if bytes > MAX_BITMAP_BYTES || usize::try_from(bytes).is_err() {
            return Err(HybridError::TooLarge { size, bytes });
        }
        let spill = options.spill.as_deref().map(Store::spill).transpose()?;
        let max_pages = (options.ram_limit / CLUSTER).min(clusters);
        Ok(HybridVolume {
            size,
            max_pages,
            ram_limit: options.ram_limit,
            state: RwLock::new(State {
                allocated: Bitmap::new(clusters),
                in_file: Bitmap::new(clusters),
                maps: Default::default(),
                slots: Default::default(),
            }),
            ram: Store::memory()?,
            spill,
        })
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of cluster `c` (the last one may be short).
    fn cluster_len(&self, c: u64) -> usize {
        (self.size - c * CLUSTER).min(CLUSTER) as usize
    }

    /// Splits `offset..offset+len` (already checked) into per-cluster pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
        let end = offset + len;
        let first = offset / CLUSTER;
        let last = if len == 0 {
            first
        } else {
            end.div_ceil(CLUSTER)
        };
        (first..last).map(move |c| {
            let start = (c * CLUSTER).max(offset);
            let stop = ((c + 1) * CLUSTER).min(end);
            Piece {
                c,
                within: (start - c * CLUSTER) as usize..(stop - c * CLUSTER) as usize,
                buf_at: (start - offset) as usize,
            }
        })
    }

    /// Whether piece `p` covers its whole cluster.
    fn is_whole(&self, p: &Piece) -> bool {
        p.within.start == 0 && p.len() == self.cluster_len(p.c)
    }

    /// The clusters' places and counts.
    pub fn stats(&self) -> HybridStats {
        let st = self.read_state();
        let ram_clusters = st.held(Tier::Ram);
        let file_clusters = st.held(Tier::File);
        HybridStats {
            ram_clusters,
            file_clusters,
            zero_clusters: st.allocated.count() - ram_clusters - file_clusters,
            ram_bytes: ram_clusters * CLUSTER,
            ram_resident_bytes: self.ram.allocated_bytes(),
            spill_bytes: file_clusters * CLUSTER,
            spill_disk_bytes: self.spill.as_ref().map(Store::allocated_bytes),
        }
    }

    /// The runs of `offset..offset+len` (clipped to the size) that are allocated (written or
    /// zeroed, `true`) or not, at most 4096 of them: ask again from where they end.
    pub fn allocated(&self, offset: u64, len: u64) -> Vec<(Range<u64>, bool)> {
        self.runs(offset, len, |st, c| st.allocated.get(c))
    }

    /// Consecutive runs of clusters with equal `class` (the same for every unallocated
    /// cluster), clipped to the request.
    fn runs<T: PartialEq + Copy>(
        &self,
        offset: u64,
        len: u64,
        class: impl Fn(&State, u64) -> T,
    ) -> Vec<(Range<u64>, T)> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Vec::new();
        }
        let st = self.read_state();
        let mut out: Vec<(Range<u64>, T)> = Vec::new();
        let (mut c, last) = (offset / CLUSTER, end.div_ceil(CLUSTER));
        while c < last {
            let t = class(&st, c);
            // Unallocated clusters all look alike: skip to the next allocated one.
            let next = if st.allocated.get(c) {
                c + 1
            } else {
                st.allocated.next_set(c, last)
            };
            let r = (c * CLUSTER).max(offset)..(next * CLUSTER).min(end);
            c = next;
            let full = out.len() == MAX_RUNS;
            match out.last_mut() {
                Some((last, lt)) if *lt == t => last.end = r.end,
                _ if full => break,
                _ => out.push((r, t)),
            }
        }
        out
    }

    /// Reads `buf` at `offset`; bytes of unallocated clusters come from `under` (zeros when
    /// `None`), read after the lock is dropped, one call per run.
    pub(crate) fn read_with(&self, buf: &mut [u8], offset: u64, under: Under) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut holes: Vec<Range<usize>> = Vec::new();
        {
            let st = self.read_state();
            for p in self.pieces(offset, buf.len() as u64) {
                let out = &mut buf[p.buf_at..p.buf_at + p.len()];
                match st.place(p.c) {
                    Place::Stored(tier, slot) => {
                        self.store(tier)?.read(out, slot, p.within.start as u64)?;
                    }
                    Place::Zero => out.fill(0),
                    Place::Unallocated => {
                        out.fill(0);
                        join(&mut holes, p.buf_at..p.buf_at + p.len());
                    }
                }
            }
        }
        if let Some(under) = under {
            for h in holes {
                under(&mut buf[h.clone()], offset + h.start as u64)?;
            }
        }
        Ok(())
    }

    fn store(&self, tier: Tier) -> Result<&Store> {
        match tier {
            Tier::Ram => Ok(&self.ram),
            Tier::File => self.spill.as_ref().ok_or(BlockError::Protocol(
                "a cluster is marked as spilled but the volume has no spill file".into(),
            )),
        }
    }

    /// Writes `buf` at `offset`. A partial write to an unallocated cluster first takes the
    /// rest of the cluster from `under` (zeros when `None`), read before the lock is taken.
    pub(crate) fn write_with(&self, buf: &[u8], offset: u64, under: Under) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let pieces: Vec<Piece> = self.pieces(offset, buf.len() as u64).collect();
        let mut below = self.read_below(&pieces, under)?;
        let mut st = self.write_state();
        self.check_room(&st, &pieces, buf)
            .map_err(|e| e.into_block("write", Some(offset)))?;
        for p in &pieces {
            let data = &buf[p.buf_at..p.buf_at + p.len()];
            let initial = below.iter().position(|(c, _)| *c == p.c);
            let initial = initial.map(|i| below.swap_remove(i).1);
            self.put(&mut st, p, data, initial, under)?;
        }
        Ok(())
    }

    /// The `under` contents of the partial edge pieces whose clusters are unallocated now.
    fn read_below(&self, pieces: &[Piece], under: Under) -> Result<Vec<(u64, Vec<u8>)>> {
        let Some(under) = under else {
            return Ok(Vec::new());
        };
        let edges: Vec<u64> = {
            let st = self.read_state();
            let mut edges: Vec<&Piece> = pieces.iter().take(1).collect();
            edges.extend(pieces.iter().skip(1).last());
            edges
                .into_iter()
                .filter(|p| !self.is_whole(p) && st.place(p.c) == Place::Unallocated)
                .map(|p| p.c)
                .collect()
        };
        edges
            .into_iter()
            .map(|c| Ok((c, self.below(c, Some(under))?)))
            .collect()
    }

    /// Refuses a write up front (nothing changed) when it needs more new clusters than RAM
    /// has room for and there is no spill file.
    fn check_room(&self, st: &State, pieces: &[Piece], buf: &[u8]) -> Result<(), HybridError> {
        if self.spill.is_some() {
            return Ok(());
        }
        let needed = pieces
            .iter()
            .filter(|p| matches!(st.place(p.c), Place::Zero | Place::Unallocated))
            .filter(|p| !(self.is_whole(p) && is_zero(&buf[p.buf_at..p.buf_at + p.len()])))
            .count() as u64;
        if st.held(Tier::Ram) + needed > self.max_pages {
            return Err(self.ram_full());
        }
        Ok(())
    }

    fn ram_full(&self) -> HybridError {
        HybridError::RamFull {
            limit: self.ram_limit,
            pages: self.max_pages,
        }
    }

    /// Writes one piece under the lock. `initial` is the cluster's `under` contents when they
    /// were read beforehand; an unallocated partial cluster without them (trimmed since) is
    /// read from `under` here.
    fn put(
        &self,
        st: &mut State,
        p: &Piece,
        data: &[u8],
        initial: Option<Vec<u8>>,
        under: Under,
    ) -> Result<()> {
        let place = st.place(p.c);
        if self.is_whole(p) && is_zero(data) {
            return self.release(st, p.c, true);
        }
        match place {
            Place::Stored(tier, slot) => {
                self.store(tier)?.write(data, slot, p.within.start as u64)?;
            }
            Place::Zero | Place::Unallocated => {
                let content = if self.is_whole(p) {
                    data.to_vec()
                } else {
                    let mut v = match (place, initial) {
                        (Place::Unallocated, Some(v)) => v,
                        (Place::Unallocated, None) => self.below(p.c, under)?,
                        _ => vec![0u8; self.cluster_len(p.c)],
                    };
                    v[p.within.clone()].copy_from_slice(data);
                    v
                };
                let at = Some(p.c * CLUSTER + p.within.start as u64);
                self.store_new(st, p.c, content)
                    .map_err(|e| e.into_block("write", at))?;
            }
        }
        Ok(())
    }

    /// Cluster `c`'s contents in `under` (zeros when `None`).
    fn below(&self, c: u64, under: Under) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.cluster_len(c)];
        if let Some(under) = under {
            under(&mut v, c * CLUSTER)?;
        }
        Ok(v)
    }

    /// Frees cluster `c`'s storage (punching its spill slot), leaving it a zero cluster
    /// (`zero`) or unallocated.
    fn release(&self, st: &mut State, c: u64, zero: bool) -> Result<()> {
        match st.release(c, zero) {
            Some((tier, slot)) => self.store(tier)?.punch(slot),
            None => Ok(()),
        }
    }

    /// Gives cluster `c` (holding no storage) the whole-cluster `content`: nothing when it is
    /// all zeros, a RAM page while there is room, else a spill slot.
    fn store_new(&self, st: &mut State, c: u64, content: Vec<u8>) -> Result<(), StoreError> {
        if is_zero(&content) {
            st.release(c, true);
            return Ok(());
        }
        let tier = if st.held(Tier::Ram) < self.max_pages {
            Tier::Ram
        } else if self.spill.is_some() {
            Tier::File
        } else {
            return Err(StoreError::Full(self.ram_full()));
        };
        if tier == Tier::File && st.slots[tier as usize].taken == 0 {
            tracing::info!(
                "the RAM redo is full ({} clusters): further clusters go to the spill file",
                self.max_pages
            );
        }
        let slot = st.slots[tier as usize].take();
        if let Err(e) = self.store(tier).and_then(|s| s.write(&content, slot, 0)) {
            st.slots[tier as usize].free.push(slot);
            return Err(StoreError::Io(e));
        }
        st.stored(c, tier, slot);
        Ok(())
    }

    /// Frees the storage of every whole cluster in `offset..offset+len`, leaving them zero
    /// clusters (`zero`) or unallocated; returns the partial pieces at the edges.
    fn release_range(&self, offset: u64, len: u64, zero: bool) -> Result<Vec<Piece>> {
        check_range(self.size, offset, len)?;
        let mut partial = Vec::new();
        let mut st = self.write_state();
        for p in self.pieces(offset, len) {
            if !self.is_whole(&p) {
                partial.push(p);
            } else {
                self.release(&mut st, p.c, zero)?;
            }
        }
        Ok(partial)
    }

    /// Zeroes `offset..offset+len`: whole clusters become zero clusters, partial ones are
    /// written with zeros (over `under` contents if unallocated).
    pub(crate) fn zero_with(&self, offset: u64, len: u64, under: Under) -> Result<()> {
        let partial = self.release_range(offset, len, true)?;
        let zeros = vec![0u8; CLUSTER as usize];
        for p in partial {
            let at = p.c * CLUSTER + p.within.start as u64;
            self.write_with(&zeros[..p.len()], at, under)?;
        }
        Ok(())
    }
}

/// Why a new cluster could not be stored.
#[derive(Debug)]
enum StoreError {
    Full(HybridError),
    Io(BlockError),
}

impl StoreError {
    fn into_block(self, op: &'static str, offset: Option<u64>) -> BlockError {
        match self {
            StoreError::Full(e) => e.into_block(op, offset),
            StoreError::Io(e) => e,
        }
    }
}

/// Appends `r` to `runs`, joining it to the last run when they touch.
fn join(runs: &mut Vec<Range<usize>>, r: Range<usize>) {
    match runs.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => runs.push(r),
    }
}

impl BlockDevice for HybridVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_with(buf, offset, None)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, None)
    }

    /// Whole clusters become unallocated (storage released); partial edges are left.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.release_range(offset, len, false).map(drop)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_with(offset, len, None)
    }

    /// `Data` for clusters holding storage, `Zero` for zero and unallocated ones.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let runs = self.runs(offset, len, |st, c| match st.place(c) {
            Place::Stored(..) => Region::Data,
            Place::Zero | Place::Unallocated => Region::Zero,
        });
        Ok(runs
            .into_iter()
            .map(|(r, region)| Extent {
                offset: r.start,
                len: r.end - r.start,
                region,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster trimmed between a write's look at it and its lock is read from `under` under
    /// the lock, so the bytes around the write still come from the base.
    #[test]
    fn a_partial_write_without_the_base_read_beforehand_reads_it_under_the_lock() {
        let options = HybridOptions {
            ram_limit: 2 * CLUSTER,
            spill: None,
        };
        let vol = HybridVolume::new(2 * CLUSTER, options).unwrap();
        let base = |buf: &mut [u8], at: u64| {
            buf.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (at as usize + i) as u8 | 1);
            Ok(())
        };
        let piece = vol.pieces(CLUSTER + 10, 5).next().unwrap();
        let mut st = vol.write_state();
        vol.put(&mut st, &piece, &[0; 5], None, Some(&base))
            .unwrap();
        drop(st);
        let mut got = vec![0; CLUSTER as usize];
        vol.read_at(&mut got, CLUSTER).unwrap();
        let mut want = vec![0; CLUSTER as usize];
        base(&mut want, CLUSTER).unwrap();
        want[10..15].fill(0);
        assert!(got == want);
    }
}
