//! qcow2 images (versions 2 and 3) as [`BlockDevice`]s: read any, create and write version 3.
//!
//! Opening validates the header and the L1 table against the file; every L2 table and every
//! entry is validated when first used, so a hostile image yields a clear error naming the
//! file and the problem — never a panic, never an allocation beyond one cluster or the L1
//! table's bounded size. Data clusters, explicit zero clusters, unallocated clusters and
//! zlib- and zstd-compressed clusters are read. `ondisk.rs` holds the layout, `header.rs`
//! parses and encodes the header, `backing.rs` reads and rewrites the backing file name;
//! writing lives in `create.rs` (new images, overlays, opening
//! for writing), `write.rs` (copy-on-write, compression, discards), `refcount.rs` (append-only
//! allocation and refcounts) and `flush.rs` (crash-ordered metadata writes).
//!
//! The L1 table and the L2 tables in use live in [`Meta`] under one lock, shared by reads and
//! writes: a write's table updates are visible to reads at once and reach the file at flush.

mod backing;
mod create;
mod flush;
mod header;
pub mod ondisk;
mod refcount;
#[cfg(test)]
mod tests;
mod write;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use backing::{backing_name_of, check_backing_file, set_backing_file};
pub use header::{Compression, Header, MAGIC, MAX_BACKING_NAME};

use super::{read_mapped, status_mapped, FormatError, ImageError, Mapping};
use crate::error::AtPath;
use diskferry_blockdev::{check_range, BlockDevice, Extent, Region, Result};
use ondisk::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
/// L2 tables kept in memory.
const L2_CACHE_TABLES: usize = 64;

/// An open qcow2 image.
pub struct Qcow2 {
    file: Arc<dyn BlockDevice>,
    path: PathBuf,
    header: Header,
    /// The backing file named in the header (an overlay), as written there.
    backing_name: Option<String>,
    /// The image an overlay reads its unallocated clusters from, when the caller gave it.
    backing: Option<Arc<dyn BlockDevice>>,
    meta: Mutex<Meta>,
    /// The last decompressed cluster: sequential reads of a compressed image hit it.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

/// The mutable metadata: tables as the image should be, ahead of the file until a flush.
struct Meta {
    l1: Vec<u64>,
    l1_dirty: bool,
    /// L2 tables by their offset in the file.
    l2: HashMap<u64, L2Table>,
    tick: u64,
    /// Present when the image is open for writing.
    write: Option<refcount::WriteState>,
}

struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.path)
            .field("size", &self.header.size)
            .finish_non_exhaustive()
    }
}

impl Qcow2 {
    /// Opens the image held by `file` (whose name `path` is used in errors). Overlays are
    /// refused: their backing file is never opened implicitly (see [`Qcow2::open_with_backing`]).
    pub fn open(file: Arc<dyn BlockDevice>, path: &Path) -> std::result::Result<Qcow2, ImageError> {
        let image = Qcow2::inspect(file, path)?;
        if let Some(name) = &image.backing_name {
            return Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                feature: format!("reading an overlay without its backing file {name:?} (allow following it, e.g. --follow-backing)"),
            });
        }
        Ok(image)
    }

    /// Opens an overlay, reading its unallocated clusters from `backing` (which the caller
    /// found and opened from [`Qcow2::backing_name`]).
    pub fn open_with_backing(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        backing: Arc<dyn BlockDevice>,
    ) -> std::result::Result<Qcow2, ImageError> {
        let mut image = Qcow2::inspect(file, path)?;
        if image.backing_name.is_none() {
            return Err(FormatError::NotAnOverlay).at(path);
        }
        image.backing = Some(backing);
        Ok(image)
    }

    /// Opens an image to look at it, following nothing: an overlay opened this way fails to
    /// read its unallocated clusters rather than invent zeros.
    pub fn inspect(
        file: Arc<dyn BlockDevice>,
        path: &Path,
    ) -> std::result::Result<Qcow2, ImageError> {
        let file_len = file.size();
        let mut raw = vec![0u8; file_len.min(512) as usize];
        file.read_at(&mut raw, 0).at(path)?;
        let header = Header::parse(&raw, file_len, path)?;
        let backing_name = backing::read_backing_name(&*file, &header, path)?;
        let l1 = read_l1(&*file, &header).at(path)?;
        check_l1(&l1, header.cluster_size(), file_len).at(path)?;
        Ok(Qcow2 {
            file,
            path: path.to_path_buf(),
            header,
            backing_name,
            backing: None,
            meta: Mutex::new(Meta {
                l1,
                l1_dirty: false,
                l2: HashMap::new(),
                tick: 0,
                write: None,
            }),
            last_compressed: Mutex::new(None),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing file named in the header, if this image is an overlay.
    pub fn backing_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// Fills `buf` with what an unallocated range reads: the backing image's bytes (zeros past
    /// its end), or zeros for an image without one.
    fn read_unallocated(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match (&self.backing, &self.backing_name) {
            (Some(backing), _) => {
                let available =
                    backing.size().saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[available..].fill(0);
                if available == 0 {
                    return Ok(()); // wholly past a smaller backing image's end
                }
                backing.read_at(&mut buf[..available], offset)
            }
            (None, Some(name)) => Err(self
                .invalid(FormatError::NoBacking {
                    name: name.clone(),
                    offset,
                })
                .into()),
            (None, None) => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Where the virtual bytes `offset..offset+max` (up to the end of their cluster) live.
    pub fn map(&self, offset: u64, max: u64) -> std::result::Result<Mapping, ImageError> {
        let h = &self.header;
        let cluster = h.cluster_size();
        let in_cluster = offset % cluster;
        let len = (cluster - in_cluster)
            .min(max)
            .min(h.size.saturating_sub(offset));
        let e = self.l2_entry(&mut self.lock(), offset)?.unwrap_or(0);
        self.decode_entry(e, offset, len)
    }

    /// What an L2 entry means for `len` bytes at virtual `offset` (within one cluster).
    fn decode_entry(
        &self,
        e: u64,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Mapping, ImageError> {
        let h = &self.header;
        let cluster = h.cluster_size();
        let in_cluster = offset % cluster;
        if e & COMPRESSED != 0 {
            let (host, sectors) = ondisk::compressed::decode(e, h.cluster_bits);
            let stored = (sectors * 512 - (host & 511)).min(self.file.size().saturating_sub(host));
            return Ok(Mapping::Compressed {
                host,
                stored,
                in_cluster,
                len,
            });
        }
        if e & !(OFFSET_MASK | COPIED | ZERO) != 0 {
            return Err(self.invalid(FormatError::ReservedBits {
                table: "L2",
                index: offset >> h.cluster_bits,
                value: e,
            }));
        }
        if h.version >= 3 && e & ZERO != 0 {
            return Ok(Mapping::Zero { len });
        }
        let host = e & OFFSET_MASK;
        if host == 0 {
            return Ok(Mapping::Unallocated { len });
        }
        if !host.is_multiple_of(cluster) || host.saturating_add(cluster) > self.file.size() {
            return Err(self.invalid(FormatError::Misplaced {
                structure: "data cluster of virtual cluster",
                index: Some(offset >> h.cluster_bits),
                offset: host,
            }));
        }
        Ok(Mapping::Data {
            host: host + in_cluster,
            len,
        })
    }

    fn invalid(&self, problem: FormatError) -> ImageError {
        ImageError::Invalid {
            path: self.path.clone(),
            problem,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The L2 entry for virtual `offset`, or `None` when its L2 table is unallocated.
    fn l2_entry(
        &self,
        meta: &mut Meta,
        offset: u64,
    ) -> std::result::Result<Option<u64>, ImageError> {
        let (l1_index, l2_index) = self.indexes(offset);
        let table = meta.l1.get(l1_index).map_or(0, |e| e & OFFSET_MASK);
        if table == 0 {
            return Ok(None);
        }
        Ok(Some(self.l2(meta, table)?.entries[l2_index]))
    }

    /// L1 and L2 indexes of a virtual offset.
    fn indexes(&self, offset: u64) -> (usize, usize) {
        let cluster_index = offset >> self.header.cluster_bits;
        let per_table = self.header.l2_entries();
        (
            (cluster_index / per_table) as usize,
            (cluster_index % per_table) as usize,
        )
    }

    /// The L2 table at `offset` in the file, loaded on first use. Clean tables beyond the
    /// cache size are dropped; dirty ones stay until a flush writes them.
    fn l2<'m>(
        &self,
        meta: &'m mut Meta,
        offset: u64,
    ) -> std::result::Result<&'m mut L2Table, ImageError> {
        meta.tick += 1;
        let tick = meta.tick;
        if !meta.l2.contains_key(&offset) && meta.l2.len() >= L2_CACHE_TABLES {
            let victim = meta
                .l2
                .iter()
                .filter(|(_, t)| !t.dirty)
                .min_by_key(|(_, t)| t.used)
                .map(|(k, _)| *k);
            if let Some(victim) = victim {
                meta.l2.remove(&victim);
            }
        }
        let table = match meta.l2.entry(offset) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let mut raw = vec![0u8; self.header.cluster_size() as usize];
                self.file.read_at(&mut raw, offset).at(&self.path)?;
                let entries = be64_entries(&raw);
                v.insert(L2Table {
                    entries,
                    dirty: false,
                    used: tick,
                })
            }
        };
        table.used = tick;
        Ok(table)
    }

    /// The whole cluster that decompresses from `stored` bytes at `host`.
    fn decompressed(
        &self,
        host: u64,
        stored: u64,
    ) -> std::result::Result<Arc<Vec<u8>>, ImageError> {
        if let Some((at, data)) = &*self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            if *at == host {
                return Ok(Arc::clone(data));
            }
        }
        let cluster = self.header.cluster_size() as usize;
        // `stored` is bounded by the entry's sector count (at most about one cluster).
        let mut input = vec![0u8; stored as usize];
        self.file.read_at(&mut input, host).at(&self.path)?;
        // The output is exactly one cluster: nothing decompresses beyond it.
        let mut out = vec![0u8; cluster];
        let whole = match self.header.compression {
            Compression::Zlib => {
                let mut inflater = flate2::Decompress::new(false);
                let status = inflater.decompress(&input, &mut out, flate2::FlushDecompress::Finish);
                status.is_ok() && inflater.total_out() == cluster as u64
            }
            Compression::Zstd => {
                use std::io::Read;
                // One frame; the sector-rounded input may carry bytes after it.
                ruzstd::decoding::StreamingDecoder::new(&input[..])
                    .is_ok_and(|mut d| d.read_exact(&mut out).is_ok())
            }
        };
        if !whole {
            return Err(self.invalid(FormatError::Compressed { offset: host }));
        }
        let out = Arc::new(out);
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((host, Arc::clone(&out)));
        Ok(out)
    }
}

/// The L1 table (bounded by `MAX_L1_ENTRIES` in `Header::parse`, and inside the file).
fn read_l1(file: &dyn BlockDevice, header: &Header) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; header.l1_size as usize * 8];
    file.read_at(&mut raw, header.l1_table_offset)?;
    Ok(be64_entries(&raw))
}

/// Every L1 entry: no reserved bits, and an L2 table inside the file, cluster aligned.
fn check_l1(l1: &[u64], cluster: u64, file_len: u64) -> std::result::Result<(), FormatError> {
    for (i, e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if e & !(OFFSET_MASK | COPIED) != 0 {
            return Err(FormatError::ReservedBits {
                table: "L1",
                index: i as u64,
                value: *e,
            });
        }
        if l2 != 0 && (!l2.is_multiple_of(cluster) || l2.saturating_add(cluster) > file_len) {
            return Err(FormatError::Misplaced {
                structure: "L2 table of L1 entry",
                index: Some(i as u64),
                offset: l2,
            });
        }
    }
    Ok(())
}

/// A table of big-endian 64-bit entries (L1, L2, refcount table).
fn be64_entries(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

impl Drop for Qcow2 {
    /// Best effort: call [`BlockDevice::flush`] to see errors.
    fn drop(&mut self) {
        let _ = self.flush_all();
    }
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn is_read_only(&self) -> bool {
        self.lock().write.is_none()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(buf, offset)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_range(offset, len)
    }

    /// Writes all changed metadata in crash-safe order and marks the image clean.
    fn flush(&self) -> Result<()> {
        self.flush_all()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.header.size, offset, buf.len() as u64)?;
        read_mapped(
            &self.path,
            buf,
            offset,
            |pos, max| self.map(pos, max),
            |m, pos, dst| match m {
                Mapping::Data { host, .. } => self.file.read_at(dst, host),
                Mapping::Zero { .. } => {
                    dst.fill(0);
                    Ok(())
                }
                Mapping::Unallocated { .. } => self.read_unallocated(dst, pos),
                Mapping::Compressed {
                    host,
                    stored,
                    in_cluster,
                    ..
                } => {
                    let cluster = self.decompressed(host, stored)?;
                    dst.copy_from_slice(
                        &cluster[in_cluster as usize..in_cluster as usize + dst.len()],
                    );
                    Ok(())
                }
            },
        )
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.header.size);
        // An overlay's unallocated clusters hold the backing image's data.
        let unallocated = if self.backing_name.is_some() {
            Region::Data
        } else {
            Region::Zero
        };
        status_mapped(&self.path, offset, end, unallocated, |pos, max| {
            self.map(pos, max)
        })
    }
}
