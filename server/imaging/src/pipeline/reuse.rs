//! Files-mode incremental capture: a source filesystem whose unchanged files are read from the
//! previous capture instead of the source.
//!
//! A files-mode capture lays its filesystems out anew, so the previous image does not hold
//! the source's bytes at the source's offsets and cannot be a backing file. It still holds
//! every file's data. [`ReusingFs`] wraps the source filesystem for the rebuild; the tree walk
//! (`read_dir`) pairs each source node with the previous capture's node of the same name in
//! the paired directory, and a file is *taken from the previous capture* when
//! - its kind, size, modification, change and creation times are those of its pair (a file
//!   renamed over another, rewritten, or truncated and refilled gets a new change time; FAT
//!   keeps none and compares creation times, which a rename moves with the entry), and
//! - none of its data extents on the source touches a chunk whose hash changed since the
//!   previous capture (so the source blocks still hold what they held then).
//!
//! Such a file's source extents are then *translated*: [`ReusingDevice`] serves reads of those
//! source ranges from the pair's extents in the previous image (or as zeros where the previous
//! capture left a hole: the rebuild writes all-zero blocks as holes), and everything else —
//! metadata, changed files — from the source. The rebuild itself is unchanged: it reads
//! through the wrapper as it reads through any source: the ext4 writer through the device
//! (pipelined, disk-ordered), the FAT writer through `read_at`, which reads a taken file
//! from its pair.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use diskferry_blockdev::{BlockDevice, Extent, Result as BlockResult, SliceDevice};
use diskferry_fs::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsKind, Metadata, NodeId, Result,
    VolumeInfo,
};
use diskferry_partition::{Partition, PartitionTable};

/// The previous capture of a source, opened for a files-mode incremental capture: its image
/// (backing chain followed), its partition table, and the source ranges whose chunks changed
/// since it was captured.
pub struct Previous {
    image: Arc<dyn BlockDevice>,
    table: PartitionTable,
    changed: Vec<Range<u64>>,
}

/// The previous capture's side of one partition.
pub(super) struct PreviousPartition {
    fs: Box<dyn Filesystem>,
    device: Arc<dyn BlockDevice>,
    /// Changed source ranges, relative to the partition.
    changed: Vec<Range<u64>>,
}

impl Previous {
    /// `image` is the previous capture; `changed` the whole-disk source ranges that changed.
    pub fn new(
        image: Arc<dyn BlockDevice>,
        changed: Vec<Range<u64>>,
    ) -> std::result::Result<Previous, diskferry_partition::PartitionError> {
        let table = diskferry_partition::read_table(&*image)?;
        Ok(Previous {
            image,
            table,
            changed,
        })
    }

    /// The previous capture's partition of the same number as the source's `part`, when it
    /// holds a filesystem of the same family as `kind`; `None` otherwise (the partition is
    /// then read whole from the source).
    pub(super) fn partition(&self, part: &Partition, kind: FsKind) -> Option<PreviousPartition> {
        let theirs = self
            .table
            .partitions
            .iter()
            .find(|p| p.number == part.number)?;
        let device: Arc<dyn BlockDevice> =
            Arc::new(SliceDevice::new(Arc::clone(&self.image), theirs.start, theirs.size).ok()?);
        let fs = diskferry_fs::open(Arc::clone(&device)).ok()?;
        if !same_family(fs.info().kind, kind) {
            return None;
        }
        let end = part.start + part.size;
        let changed = self
            .changed
            .iter()
            .filter(|r| r.start < end && r.end > part.start)
            .map(|r| r.start.max(part.start) - part.start..r.end.min(end) - part.start)
            .collect();
        Some(PreviousPartition {
            fs,
            device,
            changed,
        })
    }
}

/// Where a piece of a source read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Source,
    /// The previous capture's partition, at this offset.
    Previous(u64),
    /// Zeros (the previous capture holds a hole there).
    Zeros,
}

/// A source range and where it is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    src: Range<u64>,
    from: From,
}

/// Source ranges known to read as ranges of the previous capture: start → (end, where).
#[derive(Debug, Default)]
struct Translations(BTreeMap<u64, (u64, From)>);

impl Translations {
    /// Records `src` → `from` unless part of it is already recorded (two files sharing source
    /// blocks: either translation reads the same bytes).
    fn add(&mut self, src: Range<u64>, from: From) {
        let overlaps = self
            .0
            .range(..src.end)
            .next_back()
            .is_some_and(|(_, (end, _))| *end > src.start);
        if !overlaps && !src.is_empty() {
            self.0.insert(src.start, (src.end, from));
        }
    }

    /// `range` cut into pieces: translated ones and the gaps between them (from the source).
    fn split(&self, range: Range<u64>) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = range.start;
        let first = self
            .0
            .range(..=range.start)
            .next_back()
            .map_or(range.start, |(s, _)| *s);
        for (&start, &(end, from)) in self.0.range(first..range.end) {
            if end <= at {
                continue;
            }
            if start > at {
                out.push(Piece {
                    src: at..start,
                    from: From::Source,
                });
                at = start;
            }
            let stop = end.min(range.end);
            let from = match from {
                From::Previous(p) => From::Previous(p + (at - start)),
                other => other,
            };
            out.push(Piece {
                src: at..stop,
                from,
            });
            at = stop;
        }
        if at < range.end {
            out.push(Piece {
                src: at..range.end,
                from: From::Source,
            });
        }
        out
    }
}

/// The source partition's device, with translated ranges read from the previous capture.
pub(super) struct ReusingDevice {
    source: Arc<dyn BlockDevice>,
    previous: Arc<dyn BlockDevice>,
    map: Mutex<Translations>,
    /// Bytes served from the previous capture (or as its holes) instead of the source.
    reused: AtomicU64,
}

impl ReusingDevice {
    fn pieces(&self, range: Range<u64>) -> Vec<Piece> {
        self.map.lock().expect("translations").split(range)
    }

    /// Reads a translated piece, in parts of at most 1 MiB, handing each to `sink`.
    fn deliver(
        &self,
        piece: &Piece,
        sink: &mut dyn FnMut(u64, Bytes) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let mut at = piece.src.start;
        while at < piece.src.end {
            let n = (piece.src.end - at).min(1 << 20);
            let mut buf = vec![0u8; n as usize];
            self.read_piece(piece, at, &mut buf)?;
            sink(at, Bytes::from(buf))?;
            at += n;
        }
        Ok(())
    }

    /// Fills `buf` with the bytes at source offset `at`, inside `piece`: from the source, or
    /// (counted as reused) from the previous capture or as its hole's zeros.
    fn read_piece(&self, piece: &Piece, at: u64, buf: &mut [u8]) -> BlockResult<()> {
        if piece.from != From::Source {
            self.reused.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        match piece.from {
            From::Source => self.source.read_at(buf, at),
            From::Previous(p) => self.previous.read_at(buf, p + (at - piece.src.start)),
            From::Zeros => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

impl BlockDevice for ReusingDevice {
    fn size(&self) -> u64 {
        self.source.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.source.logical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        for piece in self.pieces(offset..offset + buf.len() as u64) {
            let part =
                &mut buf[(piece.src.start - offset) as usize..(piece.src.end - offset) as usize];
            self.read_piece(&piece, piece.src.start, part)?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.source.block_status(offset, len)
    }

    fn chunk_hashes(&self, offset: u64, len: u64, chunk: u32) -> BlockResult<Vec<[u8; 32]>> {
        self.source.chunk_hashes(offset, len, chunk)
    }

    /// The source's pieces go to the source in one pipelined request; translated pieces are
    /// read locally and handed over in their place, so `sink` sees every range in order.
    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let pieces: Vec<Piece> = ranges.iter().flat_map(|r| self.pieces(r.clone())).collect();
        let remote: Vec<Range<u64>> = pieces
            .iter()
            .filter(|p| p.from == From::Source)
            .map(|p| p.src.clone())
            .collect();
        let mut next = 0;
        self.source.read_ranges(&remote, &mut |off, data| {
            while let Some(p) = pieces.get(next).filter(|p| p.from != From::Source) {
                self.deliver(p, sink)?;
                next += 1;
            }
            let end = off + data.len() as u64;
            sink(off, data)?;
            if pieces.get(next).is_some_and(|p| end >= p.src.end) {
                next += 1;
            }
            Ok(())
        })?;
        for p in &pieces[next.min(pieces.len())..] {
            if p.from != From::Source {
                self.deliver(p, sink)?;
            }
        }
        Ok(())
    }
}

/// The source filesystem of one partition, its unchanged files read from the previous capture.
pub(super) struct ReusingFs {
    source: Box<dyn Filesystem>,
    previous: Box<dyn Filesystem>,
    /// Source byte ranges (of this partition) whose chunks changed, sorted.
    changed: Vec<Range<u64>>,
    /// Source node → the previous capture's node of the same path.
    pairs: Mutex<HashMap<NodeId, NodeId>>,
    /// Metadata of the source's files as the tree walk read it, so deciding reads it once.
    metas: Mutex<HashMap<NodeId, Metadata>>,
    /// Decided files: whether each is taken from the previous capture.
    decided: Mutex<HashMap<NodeId, bool>>,
    device: Option<Arc<ReusingDevice>>,
    previous_device: Arc<dyn BlockDevice>,
    files_reused: AtomicU64,
    /// Bytes read through `read_at` from the previous capture (writers without a device path).
    read_from_previous: AtomicU64,
}

impl ReusingFs {
    /// Wraps `source` with the previous capture's side of the same partition.
    pub(super) fn new(source: Box<dyn Filesystem>, previous: PreviousPartition) -> ReusingFs {
        let PreviousPartition {
            fs: previous,
            device: previous_device,
            mut changed,
        } = previous;
        changed.sort_by_key(|r| r.start);
        let device = source.device().map(|dev| {
            Arc::new(ReusingDevice {
                source: dev,
                previous: Arc::clone(&previous_device),
                map: Mutex::default(),
                reused: AtomicU64::new(0),
            })
        });
        let pairs = HashMap::from([(source.root(), previous.root())]);
        ReusingFs {
            source,
            previous,
            changed,
            pairs: Mutex::new(pairs),
            metas: Mutex::default(),
            decided: Mutex::default(),
            device,
            previous_device,
            files_reused: AtomicU64::new(0),
            read_from_previous: AtomicU64::new(0),
        }
    }

    /// Files taken from the previous capture, and the bytes read there instead of the source.
    pub(super) fn reused(&self) -> (u64, u64) {
        let bytes = self
            .device
            .as_ref()
            .map_or(0, |d| d.reused.load(Ordering::Relaxed))
            + self.read_from_previous.load(Ordering::Relaxed);
        (self.files_reused.load(Ordering::Relaxed), bytes)
    }

    fn pair_of(&self, node: NodeId) -> Option<NodeId> {
        self.pairs.lock().expect("pairs").get(&node).copied()
    }

    /// Whether `node`'s data is taken from the previous capture (decided once; a file taken
    /// has its extents' translations recorded in the device).
    /// `known` are its source extents when the caller already has them.
    fn reuses(&self, node: NodeId, known: Option<&[FileExtent]>) -> bool {
        if let Some(&d) = self.decided.lock().expect("decided").get(&node) {
            return d;
        }
        let translations = self
            .pair_of(node)
            .and_then(|p| self.translations(node, p, known));
        let reused = translations.is_some();
        if let (Some(t), Some(dev)) = (translations, &self.device) {
            let mut map = dev.map.lock().expect("translations");
            t.into_iter().for_each(|p| map.add(p.src, p.from));
        }
        if reused {
            self.files_reused.fetch_add(1, Ordering::Relaxed);
        }
        self.decided.lock().expect("decided").insert(node, reused);
        reused
    }

    /// The translated pieces of `node`'s data when it can be taken from `pair`.
    fn translations(
        &self,
        node: NodeId,
        pair: NodeId,
        known: Option<&[FileExtent]>,
    ) -> Option<Vec<Piece>> {
        let known_meta = self.metas.lock().expect("metas").remove(&node);
        let now = match known_meta {
            Some(m) => m,
            None => self.source.metadata(node).ok()?,
        };
        let then = self.previous.metadata(pair).ok()?;
        if !same_file(&now, &then) {
            return None;
        }
        let written = |e: &FileExtent| !e.unwritten;
        let ours: Vec<FileExtent> = match known {
            Some(e) => e.to_vec(),
            None => self.source.extents(node).ok()?,
        };
        let ours: Vec<FileExtent> = ours.into_iter().filter(written).collect();
        if ours.iter().any(|e| self.touches_change(e)) {
            return None;
        }
        let theirs: Vec<FileExtent> = self.previous.extents(pair).ok()?;
        let theirs: Vec<FileExtent> = theirs.into_iter().filter(written).collect();
        let mut pieces = Vec::new();
        for e in &ours {
            pieces.extend(translate(e, &theirs, self.previous_device.size())?);
        }
        Some(pieces)
    }

    fn touches_change(&self, e: &FileExtent) -> bool {
        let end = e.disk_offset + e.len;
        let i = self.changed.partition_point(|r| r.end <= e.disk_offset);
        self.changed.get(i).is_some_and(|r| r.start < end)
    }
}

/// Whether two filesystem kinds are of one family (ext2/3/4, or FAT12/16/32): only then are
/// their files paired.
fn same_family(a: FsKind, b: FsKind) -> bool {
    use FsKind::*;
    let fat = |k| matches!(k, Fat12 | Fat16 | Fat32);
    let ext = |k| matches!(k, Ext2 | Ext3 | Ext4);
    (fat(a) && fat(b)) || (ext(a) && ext(b))
}

/// Whether two files' metadata says they hold the same data: kind, size and modification
/// time, and a change time (ext4: set by every rename, rewrite and truncate) or, where the
/// filesystem keeps none (FAT), a creation time (moved with the entry by a rename), present
/// and equal.
fn same_file(now: &Metadata, then: &Metadata) -> bool {
    let identity = match (now.ctime, then.ctime) {
        (Some(a), Some(b)) => a == b && now.crtime.is_none_or(|c| then.crtime == Some(c)),
        (None, None) => now.crtime.is_some() && now.crtime == then.crtime,
        _ => false,
    };
    now.kind == FileKind::File
        && then.kind == FileKind::File
        && now.size == then.size
        && now.mtime == then.mtime
        && identity
}

/// The source extent `e` cut along the previous capture's extents `theirs` (same file
/// offsets): each piece from the previous device, or zeros where the previous file has a
/// hole. `None` when a previous extent lies outside its device.
fn translate(e: &FileExtent, theirs: &[FileExtent], limit: u64) -> Option<Vec<Piece>> {
    let mut out = Vec::new();
    let mut off = e.file_offset;
    let end = e.file_offset + e.len;
    while off < end {
        let src = e.disk_offset + (off - e.file_offset);
        let covering = theirs
            .iter()
            .find(|t| off >= t.file_offset && off < t.file_offset + t.len);
        let (stop, from) = match covering {
            Some(t) => {
                let stop = end.min(t.file_offset + t.len);
                let at = t.disk_offset + (off - t.file_offset);
                if at.checked_add(stop - off)? > limit {
                    return None;
                }
                (stop, From::Previous(at))
            }
            None => {
                let next = theirs
                    .iter()
                    .map(|t| t.file_offset)
                    .filter(|&s| s > off)
                    .min()
                    .unwrap_or(end);
                (end.min(next), From::Zeros)
            }
        };
        out.push(Piece {
            src: src..src + (stop - off),
            from,
        });
        off = stop;
    }
    Some(out)
}

impl Filesystem for ReusingFs {
    fn info(&self) -> VolumeInfo {
        self.source.info()
    }
    fn root(&self) -> NodeId {
        self.source.root()
    }
    /// The source's; a paired file's is kept until its data is decided on.
    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        let meta = self.source.metadata(node)?;
        let undecided = !self.decided.lock().expect("decided").contains_key(&node);
        if meta.kind == FileKind::File && undecided && self.pair_of(node).is_some() {
            self.metas.lock().expect("metas").insert(node, meta.clone());
        }
        Ok(meta)
    }

    /// The source's entries; pairs each with the previous capture's entry of the same name.
    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let entries = self.source.read_dir(dir)?;
        let theirs = self
            .pair_of(dir)
            .and_then(|p| self.previous.read_dir(p).ok())
            .unwrap_or_default();
        let by_name: HashMap<&[u8], NodeId> =
            theirs.iter().map(|e| (e.name.as_slice(), e.node)).collect();
        let mut pairs = self.pairs.lock().expect("pairs");
        for e in &entries {
            if let Some(&p) = by_name.get(e.name.as_slice()) {
                pairs.entry(e.node).or_insert(p);
            }
        }
        Ok(entries)
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        match self.pair_of(node) {
            Some(pair) if self.reuses(node, None) => {
                let n = self.previous.read_at(pair, offset, buf)?;
                self.read_from_previous
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            _ => self.source.read_at(node, offset, buf),
        }
    }
    fn read_link(&self, node: NodeId) -> Result<Vec<u8>> {
        self.source.read_link(node)
    }
    fn xattrs(&self, node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        self.source.xattrs(node)
    }
    fn security_descriptor(&self, node: NodeId) -> Result<Option<Vec<u8>>> {
        self.source.security_descriptor(node)
    }

    /// The source's extents; deciding here whether the file is taken from the previous
    /// capture records its translations before the rebuild reads the data.
    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        let extents = self.source.extents(node)?;
        self.reuses(node, Some(&extents));
        Ok(extents)
    }
    fn flags_are_linux_inode_flags(&self) -> bool {
        self.source.flags_are_linux_inode_flags()
    }
    fn data_ranges(&self, node: NodeId) -> Result<Vec<(u64, u64)>> {
        self.source.data_ranges(node)
    }
    fn allocation_map(&self) -> Result<AllocationMap> {
        self.source.allocation_map()
    }
    fn rebuild_obstacle(&self) -> Option<String> {
        self.source.rebuild_obstacle()
    }
    fn view_notes(&self) -> Vec<String> {
        self.source.view_notes()
    }
    fn device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.device
            .as_ref()
            .map(|d| Arc::clone(d) as Arc<dyn BlockDevice>)
    }

    /// A paired file goes where the previous capture put it (changed or not: a file that
    /// grew keeps its first blocks there), so successive captures share their layout.
    fn placement_hint(&self, node: NodeId) -> Option<Vec<FileExtent>> {
        let pair = self.pair_of(node)?;
        self.previous.extents(pair).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_a_range_along_translations() {
        let mut t = Translations::default();
        t.add(100..200, From::Previous(1000));
        t.add(300..400, From::Zeros);
        t.add(150..250, From::Previous(5)); // overlaps: ignored
        let got = t.split(50..350);
        assert_eq!(
            got,
            vec![
                Piece {
                    src: 50..100,
                    from: From::Source
                },
                Piece {
                    src: 100..200,
                    from: From::Previous(1000)
                },
                Piece {
                    src: 200..300,
                    from: From::Source
                },
                Piece {
                    src: 300..350,
                    from: From::Zeros
                },
            ]
        );
        assert_eq!(
            t.split(150..160),
            vec![Piece {
                src: 150..160,
                from: From::Previous(1050)
            }]
        );
    }

    #[test]
    fn translate_follows_the_previous_extents_and_their_holes() {
        let e = FileExtent {
            file_offset: 0,
            disk_offset: 10_000,
            len: 300,
            unwritten: false,
        };
        let theirs = [
            FileExtent {
                file_offset: 0,
                disk_offset: 500,
                len: 100,
                unwritten: false,
            },
            FileExtent {
                file_offset: 200,
                disk_offset: 900,
                len: 100,
                unwritten: false,
            },
        ];
        let got = translate(&e, &theirs, 4096).expect("inside");
        assert_eq!(
            got,
            vec![
                Piece {
                    src: 10_000..10_100,
                    from: From::Previous(500)
                },
                Piece {
                    src: 10_100..10_200,
                    from: From::Zeros
                },
                Piece {
                    src: 10_200..10_300,
                    from: From::Previous(900)
                },
            ]
        );
        assert!(
            translate(&e, &theirs, 950).is_none(),
            "outside the previous device"
        );
    }
}
