//! A capture's chunk map: the hash of each fixed-size chunk of the *source* disk as it was
//! captured (`CAPTURE.chunks`, beside the image), and the image file it describes (length and
//! modification time), so a later incremental capture can ask the agent for today's hashes,
//! copy only the chunks that differ, and refuse a base image that changed since.
//!
//! The map also says how the image holds the source ([`Layout`]): at the source's offsets (a
//! whole-disk capture, which an incremental capture overlays) or recreated file by file (whose
//! incremental capture is a new image that takes unchanged files from it).
//!
//! A whole-disk map hashes every chunk; a partition-by-partition map only the chunks holding
//! blocks its filesystems use (the others are [`NOT_HASHED`] and always count as changed), so
//! free space is never read to hash it.
//!
//! File format (little-endian): magic `DFCHUNK2`, chunk size u32, source size u64, image
//! length u64, image mtime (seconds u64, nanoseconds u32), hash count u64, layout u8 (0 whole
//! disk, 1 partitions), then 32 bytes per hash. Written under a temporary name and renamed.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockError, SliceDevice, NOT_HASHED};
use diskferry_protocol::chunks::ChunkHash;

const MAGIC: &[u8; 8] = b"DFCHUNK2";
const HEADER: usize = 8 + 4 + 8 + 8 + 8 + 4 + 8 + 1;
/// The chunk size new maps use for disks up to 1 TiB: small enough that a file changed here
/// and there marks little around it as changed (a 1 MiB chunk holds dozens of small files),
/// and the qcow2 cluster size, so an overlay copies whole clusters.
pub const DEFAULT_CHUNK: u32 = 64 << 10;
/// Most hashes a new map holds: larger disks get larger chunks.
const TARGET_HASHES: u64 = 1 << 24;

/// The chunk size for a map of a source of `size` bytes: [`DEFAULT_CHUNK`], doubled until
/// the map holds at most 16 Mi hashes (512 MiB of them).
pub fn chunk_for(size: u64) -> u32 {
    let mut chunk = DEFAULT_CHUNK;
    while size.div_ceil(u64::from(chunk)) > TARGET_HASHES && chunk < 1 << 24 {
        chunk *= 2;
    }
    chunk
}

/// Most hashes a map file may hold: bounds what loading allocates.
const MAX_HASHES: u64 = 1 << 26;

#[derive(Debug, thiserror::Error)]
pub enum ChunkMapError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a diskferry chunk map: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("hashing the source: {0}")]
    Hash(#[from] BlockError),
}

/// How an image holds its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Every source byte at its own offset: a whole-disk (sectors) capture, or an overlay on
    /// one. Its incremental capture is a qcow2 overlay of the changed chunks.
    WholeDisk,
    /// Partition by partition, filesystems recreated: its incremental capture is a new image
    /// that takes unchanged files from it.
    Partitions,
}

/// What a map says about a source and the image captured from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMap {
    pub chunk: u32,
    pub source_size: u64,
    /// The image file when the map was written: (length, mtime seconds, mtime nanoseconds).
    pub image_stamp: (u64, u64, u32),
    pub layout: Layout,
    pub hashes: Vec<ChunkHash>,
}

/// Where the map of the image at `image` lives.
pub fn path_for(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".chunks");
    PathBuf::from(name)
}

/// The image file's length and modification time, as a map records them.
pub fn stamp_of(image: &Path) -> Result<(u64, u64, u32), ChunkMapError> {
    let meta = std::fs::metadata(image).map_err(|source| ChunkMapError::Io {
        path: image.to_path_buf(),
        source,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    Ok((meta.len(), mtime.as_secs(), mtime.subsec_nanos()))
}

/// Removes the map beside `image`, if any: before `image` is changed in place, so a crash
/// midway leaves an image later incremental captures refuse (no map) rather than trust.
pub fn remove(image: &Path) -> Result<(), ChunkMapError> {
    let path = path_for(image);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ChunkMapError::Io { path, source: e })
        }
        _ => Ok(()),
    }
}

impl ChunkMap {
    /// Hashes `source` (on the agent, for a remote disk) for the image at `image`: the
    /// chunks [`hashed_ranges`] names for `layout`.
    pub fn of_source(
        source: &Arc<dyn BlockDevice>,
        image: &Path,
        layout: Layout,
    ) -> Result<ChunkMap, ChunkMapError> {
        Ok(ChunkMap {
            chunk: chunk_for(source.size()),
            source_size: source.size(),
            image_stamp: stamp_of(image)?,
            layout,
            hashes: hash_source(source, layout, chunk_for(source.size()))?,
        })
    }

    /// Writes the map beside `image` (temporary name, fsync, rename).
    pub fn save(&self, image: &Path) -> Result<(), ChunkMapError> {
        let path = path_for(image);
        let tmp = PathBuf::from(format!("{}.partial", path.display()));
        let io = |source| ChunkMapError::Io {
            path: tmp.clone(),
            source,
        };
        let mut out = Vec::with_capacity(HEADER + self.hashes.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&self.source_size.to_le_bytes());
        out.extend_from_slice(&self.image_stamp.0.to_le_bytes());
        out.extend_from_slice(&self.image_stamp.1.to_le_bytes());
        out.extend_from_slice(&self.image_stamp.2.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        out.push(match self.layout {
            Layout::WholeDisk => 0,
            Layout::Partitions => 1,
        });
        self.hashes.iter().for_each(|h| out.extend_from_slice(h));
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&out).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|source| ChunkMapError::Io { path, source })
    }

    /// Reads the map beside `image`, checking its size against what its header says.
    pub fn load(image: &Path) -> Result<ChunkMap, ChunkMapError> {
        let path = path_for(image);
        let raw = std::fs::read(&path).map_err(|source| ChunkMapError::Io {
            path: path.clone(),
            source,
        })?;
        let invalid = |why: String| ChunkMapError::Invalid {
            path: path.clone(),
            why,
        };
        if raw.len() < HEADER || &raw[..8] != MAGIC {
            return Err(invalid(
                "no DFCHUNK2 header (a map of an older diskferry: capture again with --chunk-map)"
                    .into(),
            ));
        }
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let (chunk, source_size) = (u32_at(8), u64_at(12));
        let image_stamp = (u64_at(20), u64_at(28), u32_at(36));
        let count = u64_at(40);
        let layout = match raw[48] {
            0 => Layout::WholeDisk,
            1 => Layout::Partitions,
            n => return Err(invalid(format!("unknown layout {n}"))),
        };
        if !chunk.is_power_of_two() || chunk < 4096 || count > MAX_HASHES {
            return Err(invalid(format!(
                "chunk size {chunk} or count {count} out of bounds"
            )));
        }
        if count != source_size.div_ceil(u64::from(chunk)) {
            return Err(invalid(format!(
                "{count} hashes do not cover a source of {source_size} bytes"
            )));
        }
        if raw.len() as u64 != HEADER as u64 + count * 32 {
            return Err(invalid(format!(
                "{} bytes long for {count} hashes",
                raw.len()
            )));
        }
        let hashes = raw[HEADER..]
            .chunks_exact(32)
            .map(|h| h.try_into().expect("32 bytes"))
            .collect();
        Ok(ChunkMap {
            chunk,
            source_size,
            image_stamp,
            layout,
            hashes,
        })
    }

    /// The map beside `image` if there is one and it still describes `image` (its stamp
    /// matches the file): what a map can be carried over from. A missing or stale map is
    /// `None`; a damaged one an error.
    pub fn load_current(image: &Path) -> Result<Option<ChunkMap>, ChunkMapError> {
        if !path_for(image).exists() {
            return Ok(None);
        }
        let map = ChunkMap::load(image)?;
        Ok((map.image_stamp == stamp_of(image)?).then_some(map))
    }

    /// Saves this map beside `image`, stamped for it as it is now: for an image that now reads
    /// as the one the map was made for (a base a capture was committed into, an overlay
    /// rebased without changing what it reads).
    pub fn save_restamped(mut self, image: &Path) -> Result<(), ChunkMapError> {
        self.image_stamp = stamp_of(image)?;
        self.save(image)
    }

    /// The byte ranges of the source whose chunks differ between `self` and `now` (same chunk
    /// size and source size), joined where they touch.
    pub fn changed(&self, now: &[ChunkHash]) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        add_differing(&mut out, &self.hashes, now, 0..self.source_size, self.chunk);
        out
    }
}

/// The chunk hashes of `source` a map of `layout` holds, in `chunk`-byte chunks: every chunk
/// for a whole-disk capture (its incremental capture copies any chunk that changed); for a
/// partition-by-partition one only the chunks holding blocks its filesystems use, others
/// [`NOT_HASHED`]. Only file data can be taken from a previous files-mode capture, and only
/// when its chunks are unchanged; free space never needs reading. A partition whose filesystem
/// does not open is not hashed (it is copied whole either way).
pub fn hash_source(
    source: &Arc<dyn BlockDevice>,
    layout: Layout,
    chunk: u32,
) -> Result<Vec<ChunkHash>, BlockError> {
    let ranges = match layout {
        Layout::WholeDisk => std::iter::once(0..source.size()).collect(),
        Layout::Partitions => filesystem_blocks(source),
    };
    diskferry_blockdev::hash_ranges(&**source, chunk, &ranges)
}

/// The disk byte ranges of the blocks each partition's filesystem uses (metadata included).
fn filesystem_blocks(source: &Arc<dyn BlockDevice>) -> Vec<Range<u64>> {
    let Ok(table) = diskferry_partition::read_table(&**source) else {
        return std::iter::once(0..source.size()).collect();
    };
    let mut out = Vec::new();
    for part in &table.partitions {
        let Ok(slice) = SliceDevice::new(Arc::clone(source), part.start, part.size) else {
            continue;
        };
        let Some(map) = diskferry_fs::open(Arc::new(slice))
            .ok()
            .and_then(|fs| fs.allocation_map().ok())
        else {
            continue;
        };
        out.extend(map.byte_ranges(part.start, part.size));
    }
    out
}

/// Adds to `out` the byte ranges of `span` (hashed in `chunk`-byte chunks from its start) whose
/// hashes differ between `a` and `b`, joined with each other and with `out`'s last range. A
/// chunk either side did not hash ([`NOT_HASHED`]) counts as differing.
pub fn add_differing(
    out: &mut Vec<Range<u64>>,
    a: &[ChunkHash],
    b: &[ChunkHash],
    span: Range<u64>,
    chunk: u32,
) {
    let chunk = u64::from(chunk);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x == y && *x != NOT_HASHED {
            continue;
        }
        let start = span.start + i as u64 * chunk;
        let end = (start + chunk).min(span.end);
        match out.last_mut() {
            Some(r) if r.end == start => r.end = end,
            _ => out.push(start..end),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_round_trips_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("a.qcow2");
        std::fs::write(&image, b"image").unwrap();
        let map = ChunkMap {
            chunk: 1 << 20,
            source_size: (3 << 20) + 5,
            image_stamp: stamp_of(&image).unwrap(),
            layout: Layout::Partitions,
            hashes: vec![[1; 32], [2; 32], [3; 32], [4; 32]],
        };
        map.save(&image).unwrap();
        assert_eq!(ChunkMap::load(&image).unwrap(), map);
        let path = path_for(&image);
        let mut raw = std::fs::read(&path).unwrap();
        raw.truncate(raw.len() - 1);
        std::fs::write(&path, &raw).unwrap();
        assert!(matches!(
            ChunkMap::load(&image),
            Err(ChunkMapError::Invalid { .. })
        ));
        raw[40] = 9; // the count no longer covers the source
        std::fs::write(&path, &raw).unwrap();
        assert!(matches!(
            ChunkMap::load(&image),
            Err(ChunkMapError::Invalid { .. })
        ));
    }

    #[test]
    fn larger_disks_get_larger_chunks() {
        assert_eq!(chunk_for(3 << 30), 64 << 10);
        assert_eq!(chunk_for(1 << 40), 64 << 10);
        assert_eq!(chunk_for((1 << 40) + 1), 128 << 10);
        assert!((64u64 << 40).div_ceil(u64::from(chunk_for(64 << 40))) <= TARGET_HASHES);
    }

    #[test]
    fn a_map_is_current_until_its_image_changes_and_carries_over_restamped() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
        std::fs::write(&a, b"image").unwrap();
        std::fs::write(&b, b"other image").unwrap();
        assert_eq!(ChunkMap::load_current(&a).unwrap(), None);
        let map = ChunkMap {
            chunk: 4096,
            source_size: 4096,
            image_stamp: stamp_of(&a).unwrap(),
            layout: Layout::WholeDisk,
            hashes: vec![[7; 32]],
        };
        map.save(&a).unwrap();
        assert_eq!(ChunkMap::load_current(&a).unwrap(), Some(map.clone()));
        map.clone().save_restamped(&b).unwrap();
        let carried = ChunkMap::load_current(&b).unwrap().unwrap();
        assert_eq!(
            (carried.hashes, carried.image_stamp),
            (map.hashes, stamp_of(&b).unwrap())
        );
        std::fs::write(&a, b"changed image").unwrap();
        assert_eq!(ChunkMap::load_current(&a).unwrap(), None);
        remove(&a).unwrap();
        assert!(!path_for(&a).exists());
        remove(&a).unwrap();
    }

    #[test]
    fn changed_chunks_become_joined_ranges() {
        let map = ChunkMap {
            chunk: 4096,
            source_size: 4 * 4096 + 100,
            image_stamp: (0, 0, 0),
            layout: Layout::WholeDisk,
            hashes: vec![[0; 32]; 5],
        };
        let mut now = vec![[0; 32]; 5];
        now[1] = [1; 32];
        now[2] = [1; 32];
        now[4] = [1; 32];
        assert_eq!(
            map.changed(&now),
            [4096..3 * 4096, 4 * 4096..4 * 4096 + 100]
        );
    }
}
