//! Creating and writing qcow2 version 3 images.
//!
//! - **Allocation is append-only**: new clusters (data, L2 tables, refcount blocks) go at the
//!   end of the file; freed clusters get refcount 0 and are punched out of the file, never
//!   reused, so a crash can never leave two owners for one cluster.
//! - **Zeros never allocate**: all-zero writes and discards of whole clusters become the zero
//!   flag (freeing any cluster they had); into unallocated space they are no-ops.
//! - **Ordering**: data is written in place or into fresh clusters at once; tables and
//!   refcounts change in memory and reach the file at [`Qcow2::flush`]: data → fsync → L2
//!   tables and refcount blocks → fsync → L1 and refcount tables → fsync → clear the dirty bit
//!   → fsync. The dirty bit is set (and synced) before the first change after a flush, so an
//!   image cut off mid-way is known to need `qemu-img check -r`.
//!
//! Refcounts are 16-bit (refcount order 4, qemu's default); writing other widths, internal
//! snapshots and dirty images is refused with a clear message.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::header::{Header, INCOMPAT_DIRTY, MAX_VIRTUAL_SIZE};
use super::{Meta, Qcow2, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::{ImageError, Mapping};
use diskferry_blockdev::is_zero;
use diskferry_blockdev::{BlockDevice, BlockError, Result};

/// Dirty L2 tables held before a write flushes metadata on its own (bounds memory).
const MAX_DIRTY_L2: usize = 1024;
/// Largest refcount table read from an existing image.
const MAX_REFCOUNT_TABLE: u64 = 256 << 20;

/// What only a writable image needs.
pub(super) struct WriteState {
    refcount_table: Vec<u64>,
    table_dirty: bool,
    /// Refcount blocks in use, by their index in the refcount table.
    blocks: HashMap<u64, RefBlock>,
    /// Where the next cluster is allocated.
    next_free: u64,
    /// Whether the file's header has the dirty bit set.
    dirty_on_disk: bool,
    /// One cluster of zeros, for discards.
    zeros: Arc<Vec<u8>>,
    /// Store whole new data clusters deflate-compressed when that saves space.
    compress: bool,
    /// Where the next compressed cluster goes: a byte offset inside a host cluster that holds
    /// compressed data, or `None` before the first.
    compressed_cursor: Option<u64>,
}

struct RefBlock {
    host: u64,
    counts: Vec<u16>,
    dirty: bool,
}

fn invalid(path: &Path, problem: String) -> ImageError {
    ImageError::Invalid {
        path: path.to_path_buf(),
        problem,
    }
}

impl Qcow2 {
    /// Creates a new image of `size` virtual bytes in the empty writable `file`.
    pub fn create(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
        cluster_bits: u32,
    ) -> std::result::Result<Qcow2, ImageError> {
        Qcow2::create_inner(file, path, size, cluster_bits, None)
    }

    /// Creates an overlay on `base`: every cluster reads from `base` until written. The header
    /// names the base `base_name` (resolved by readers relative to the overlay's directory)
    /// with format `base_format` (`qcow2` or `raw`).
    pub fn create_overlay(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        base: Arc<dyn BlockDevice>,
        base_name: &str,
        base_format: &str,
        cluster_bits: u32,
    ) -> std::result::Result<Qcow2, ImageError> {
        if base_name.is_empty() || base_name.len() > 1023 {
            return Err(invalid(
                path,
                "the backing file name must be 1 to 1023 bytes".into(),
            ));
        }
        let size = base.size();
        Qcow2::create_inner(
            file,
            path,
            size,
            cluster_bits,
            Some((base_name, base_format, base)),
        )
    }

    fn create_inner(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
        cluster_bits: u32,
        backing: Option<(&str, &str, Arc<dyn BlockDevice>)>,
    ) -> std::result::Result<Qcow2, ImageError> {
        let io = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(
                path,
                format!("cluster size 2^{cluster_bits} is outside 512 B..2 MiB"),
            ));
        }
        if size > MAX_VIRTUAL_SIZE {
            return Err(invalid(path, format!("virtual size {size} is too large")));
        }
        if file.size() != 0 {
            return Err(invalid(
                path,
                "the file to create the image in is not empty".into(),
            ));
        }
        let cluster = 1u64 << cluster_bits;
        let l1_entries = size.div_ceil(cluster * (cluster / 8)).max(1);
        let l1_clusters = (l1_entries * 8).div_ceil(cluster);
        // Room for the data twice over (discards are never reused) plus all metadata.
        let per_block = cluster / 2;
        let budget = 2 * (size.div_ceil(cluster) + l1_entries + l1_clusters) + 64;
        let table_clusters = (budget.div_ceil(per_block) + 2)
            .saturating_mul(8)
            .div_ceil(cluster);
        let header = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            l1_size: l1_entries as u32,
            l1_table_offset: (1 + table_clusters) * cluster,
            refcount_table_offset: cluster,
            refcount_table_clusters: table_clusters as u32,
            nb_snapshots: 0,
            incompatible: INCOMPAT_DIRTY,
            refcount_order: 4,
            header_length: 112,
            compression: super::Compression::Zlib,
        };
        let first_free = header.l1_table_offset + l1_clusters * cluster;
        file.resize(first_free).map_err(io)?;
        let encoded = header.encode(backing.as_ref().map(|(name, format, _)| (*name, *format)));
        if encoded.len() as u64 > cluster {
            return Err(invalid(
                path,
                "the header with its backing file name does not fit one cluster".into(),
            ));
        }
        file.write_at(&encoded, 0).map_err(io)?;
        file.flush().map_err(io)?;
        let (backing_name, backing) = match backing {
            Some((name, _, base)) => (Some(name.to_string()), Some(base)),
            None => (None, None),
        };
        let image = Qcow2 {
            file,
            path: path.to_path_buf(),
            backing_name,
            backing,
            meta: Mutex::new(Meta {
                l1: vec![0; l1_entries as usize],
                l1_dirty: true,
                l2: HashMap::new(),
                tick: 0,
                write: Some(WriteState {
                    refcount_table: vec![0; (table_clusters * cluster / 8) as usize],
                    table_dirty: true,
                    blocks: HashMap::new(),
                    next_free: first_free,
                    dirty_on_disk: true,
                    zeros: Arc::new(vec![0; cluster as usize]),
                    compress: false,
                    compressed_cursor: None,
                }),
            }),
            header,
            last_compressed: Mutex::new(None),
        };
        {
            let mut meta = image.lock();
            for host in (0..first_free).step_by(cluster as usize) {
                image
                    .set_refcount(&mut meta, host, 1)
                    .map_err(|e| image.block_to_image(e))?;
            }
        }
        image.flush().map_err(|e| image.block_to_image(e))?;
        Ok(image)
    }

    /// Opens an existing image for reading and writing; an overlay needs its `backing`.
    pub fn open_writable(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        backing: Option<Arc<dyn BlockDevice>>,
    ) -> std::result::Result<Qcow2, ImageError> {
        let image = match backing {
            Some(b) => Qcow2::open_with_backing(file, path, b)?,
            None => Qcow2::open(file, path)?,
        };
        let h = &image.header;
        let refuse = |why: &str| {
            Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                feature: why.into(),
            })
        };
        if h.version != 3 {
            return refuse("writing qcow2 version 2 images (convert them to version 3)");
        }
        if h.refcount_order != 4 {
            return refuse("writing images with refcounts other than 16 bits");
        }
        if h.nb_snapshots != 0 {
            return refuse("writing images with internal snapshots");
        }
        if h.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(invalid(
                path,
                "the image was not closed cleanly; run `qemu-img check -r all` first".into(),
            ));
        }
        let cluster = h.cluster_size();
        let table_len = u64::from(h.refcount_table_clusters) * cluster;
        let file_len = image.file.size();
        if h.refcount_table_offset % cluster != 0
            || table_len > MAX_REFCOUNT_TABLE
            || h.refcount_table_offset.saturating_add(table_len) > file_len
        {
            return Err(invalid(
                path,
                "the refcount table is misaligned, too large or beyond the file".into(),
            ));
        }
        let mut raw = vec![0u8; table_len as usize];
        image
            .file
            .read_at(&mut raw, h.refcount_table_offset)
            .map_err(|source| ImageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        for (i, e) in table.iter().enumerate() {
            if *e % cluster != 0 || e.saturating_add(cluster) > file_len {
                return Err(invalid(
                    path,
                    format!("refcount table entry {i} ({e}) is misaligned or beyond the file"),
                ));
            }
        }
        image.lock().write = Some(WriteState {
            refcount_table: table,
            table_dirty: false,
            blocks: HashMap::new(),
            next_free: file_len.div_ceil(cluster) * cluster,
            dirty_on_disk: false,
            zeros: Arc::new(vec![0; cluster as usize]),
            compress: false,
            compressed_cursor: None,
        });
        Ok(image)
    }

    fn block_to_image(&self, source: BlockError) -> ImageError {
        ImageError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn format_err(&self, problem: String) -> BlockError {
        BlockError::Format(format!("{}: {problem}", self.path.display()))
    }

    fn state<'m>(&self, meta: &'m mut Meta) -> Result<&'m mut WriteState> {
        meta.write.as_mut().ok_or(BlockError::ReadOnly)
    }

    /// Sets the dirty bit in the file before the first change after a flush.
    fn mark_dirty(&self, meta: &mut Meta) -> Result<()> {
        let ws = self.state(meta)?;
        if !ws.dirty_on_disk {
            let bits = self.header.incompatible | INCOMPAT_DIRTY;
            self.file
                .write_at(&bits.to_be_bytes(), Header::INCOMPATIBLE_OFFSET)?;
            self.file.flush()?;
            ws.dirty_on_disk = true;
        }
        Ok(())
    }

    /// A fresh cluster at the end of the file, with refcount 1.
    fn allocate(&self, meta: &mut Meta) -> Result<u64> {
        let host = self.take_cluster(meta)?;
        self.set_refcount(meta, host, 1)?;
        Ok(host)
    }

    /// Reserves the next cluster of the file (its refcount is the caller's business).
    fn take_cluster(&self, meta: &mut Meta) -> Result<u64> {
        let cluster = self.header.cluster_size();
        let ws = self.state(meta)?;
        let host = ws.next_free;
        ws.next_free += cluster;
        if self.file.size() < ws.next_free {
            self.file.resize(ws.next_free)?;
        }
        Ok(host)
    }

    fn set_refcount(&self, meta: &mut Meta, host: u64, value: u16) -> Result<()> {
        let cluster_index = host >> self.header.cluster_bits;
        let per_block = self.header.cluster_size() / 2;
        let block = self.refcount_block(meta, cluster_index / per_block)?;
        block.counts[(cluster_index % per_block) as usize] = value;
        block.dirty = true;
        Ok(())
    }

    fn refcount(&self, meta: &mut Meta, host: u64) -> Result<u16> {
        let cluster_index = host >> self.header.cluster_bits;
        let per_block = self.header.cluster_size() / 2;
        Ok(self.refcount_block(meta, cluster_index / per_block)?.counts
            [(cluster_index % per_block) as usize])
    }

    /// The refcount block with this index, loaded, or allocated (covering itself) if absent.
    fn refcount_block<'m>(&self, meta: &'m mut Meta, index: u64) -> Result<&'m mut RefBlock> {
        let cluster = self.header.cluster_size();
        let per_block = cluster / 2;
        let ws = self.state(meta)?;
        let Some(&entry) = ws.refcount_table.get(index as usize) else {
            return Err(self.format_err(
                "the image outgrew its refcount table; convert it to a new image".into(),
            ));
        };
        if !ws.blocks.contains_key(&index) {
            if entry == 0 {
                let host = self.take_cluster(meta)?;
                let ws = self.state(meta)?;
                ws.refcount_table[index as usize] = host;
                ws.table_dirty = true;
                ws.blocks.insert(
                    index,
                    RefBlock {
                        host,
                        counts: vec![0; per_block as usize],
                        dirty: true,
                    },
                );
                // The new block's own refcount lives in this block or the next one.
                self.set_refcount(meta, host, 1)?;
            } else {
                let mut raw = vec![0u8; cluster as usize];
                self.file.read_at(&mut raw, entry)?;
                let counts = raw
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                self.state(meta)?.blocks.insert(
                    index,
                    RefBlock {
                        host: entry,
                        counts,
                        dirty: false,
                    },
                );
            }
        }
        self.state(meta)?
            .blocks
            .get_mut(&index)
            .ok_or_else(|| self.format_err(format!("refcount block {index} vanished")))
    }

    /// Drops one reference to the cluster at `host`; a cluster nobody references is punched
    /// out of the file.
    fn release(&self, meta: &mut Meta, host: u64) -> Result<()> {
        let count = self.refcount(meta, host)?;
        if count == 0 {
            return Err(self.format_err(format!(
                "cluster at {host} is referenced but has refcount 0"
            )));
        }
        self.set_refcount(meta, host, count - 1)?;
        if count == 1 {
            self.file.discard(host, self.header.cluster_size())?;
        }
        Ok(())
    }

    /// Releases whatever cluster(s) an L2 entry holds.
    fn release_entry(&self, meta: &mut Meta, entry: u64, offset: u64) -> Result<()> {
        match self.decode_entry(entry, offset, 1)? {
            Mapping::Data { host, .. } => {
                let cluster = self.header.cluster_size();
                self.release(meta, host / cluster * cluster)
            }
            Mapping::Compressed { host, stored, .. } => {
                let cluster = self.header.cluster_size();
                let mut c = host / cluster * cluster;
                while c < host + stored.max(1) {
                    self.release(meta, c)?;
                    c += cluster;
                }
                Ok(())
            }
            Mapping::Zero { .. } | Mapping::Unallocated { .. } => Ok(()),
        }
    }

    /// Writes `data` at virtual `offset`, all within one cluster.
    fn write_piece(&self, meta: &mut Meta, offset: u64, data: &[u8]) -> Result<()> {
        let cluster = self.header.cluster_size();
        let in_cluster = offset % cluster;
        let whole = in_cluster == 0 && data.len() as u64 == cluster;
        let zero = is_zero(data);
        // In an overlay, unallocated means "the base's bytes", not zeros.
        let unallocated_is_zero = self.backing_name.is_none();
        let (l1_index, l2_index) = self.indexes(offset);
        let mut table = meta.l1[l1_index] & OFFSET_MASK;
        if table == 0 {
            if zero && unallocated_is_zero {
                return Ok(()); // unallocated space already reads as zeros
            }
            table = self.allocate(meta)?;
            meta.l1[l1_index] = table | OFLAG_COPIED;
            meta.l1_dirty = true;
            let entries = vec![0; self.header.l2_entries() as usize];
            meta.tick += 1;
            let used = meta.tick;
            meta.l2.insert(
                table,
                super::L2Table {
                    entries,
                    dirty: true,
                    used,
                },
            );
        }
        let entry = self.l2(meta, table).map_err(BlockError::from)?.entries[l2_index];
        let current = self.decode_entry(entry, offset, data.len() as u64)?;
        let in_place = matches!(current, Mapping::Data { .. }) && entry & OFLAG_COPIED != 0;
        let new_entry = match current {
            Mapping::Zero { .. } if zero => return Ok(()),
            Mapping::Unallocated { .. } if zero && unallocated_is_zero => return Ok(()),
            Mapping::Data { host, .. } if in_place && !(zero && whole) => {
                self.file.write_at(data, host)?;
                return Ok(());
            }
            _ if zero && whole => {
                self.release_entry(meta, entry, offset)?;
                OFLAG_ZERO
            }
            Mapping::Zero { .. } | Mapping::Unallocated { .. }
                if whole && self.state(meta)?.compress =>
            {
                match self.append_compressed(meta, data)? {
                    Some(compressed) => compressed,
                    None => self.write_fresh(meta, data)?,
                }
            }
            _ => {
                let host = self.allocate(meta)?;
                let fresh_reads_right = whole
                    || matches!(current, Mapping::Zero { .. })
                    || (matches!(current, Mapping::Unallocated { .. }) && unallocated_is_zero);
                if fresh_reads_right {
                    // Fresh space reads as zeros: only the new bytes need writing.
                    self.file.write_at(data, host + in_cluster)?;
                } else {
                    // Shared, compressed or the base's: copy the old contents, then apply the write.
                    let start = offset - in_cluster;
                    let mut full = vec![0u8; cluster.min(self.header.size - start) as usize];
                    self.read_cluster(meta, start, &mut full)?;
                    full[in_cluster as usize..in_cluster as usize + data.len()]
                        .copy_from_slice(data);
                    self.file.write_at(&full, host)?;
                }
                self.release_entry(meta, entry, offset)?;
                host | OFLAG_COPIED
            }
        };
        let table = self.l2(meta, table).map_err(BlockError::from)?;
        table.entries[l2_index] = new_entry;
        table.dirty = true;
        Ok(())
    }

    /// Writes one whole cluster of data into a fresh cluster; returns its L2 entry.
    fn write_fresh(&self, meta: &mut Meta, data: &[u8]) -> Result<u64> {
        let host = self.allocate(meta)?;
        self.file.write_at(data, host)?;
        Ok(host | OFLAG_COPIED)
    }

    /// Stores one whole cluster deflate-compressed, packed after the previous compressed
    /// cluster (never across a host cluster boundary); returns its L2 entry, or `None` when
    /// compression would not save at least one sector.
    fn append_compressed(&self, meta: &mut Meta, data: &[u8]) -> Result<Option<u64>> {
        let cluster = self.header.cluster_size();
        let mut out = vec![0u8; cluster as usize - 512];
        let mut deflater = flate2::Compress::new(flate2::Compression::default(), false);
        match deflater.compress(data, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => {}
            _ => return Ok(None), // did not fit: not worth it
        }
        let len = deflater.total_out();
        let start = match self.state(meta)?.compressed_cursor {
            Some(c) if c % cluster + len <= cluster => c,
            _ => self.take_cluster(meta)?,
        };
        self.file.write_at(&out[..len as usize], start)?;
        let host_cluster = start / cluster * cluster;
        let count = self.refcount(meta, host_cluster)?;
        self.set_refcount(meta, host_cluster, count + 1)?;
        self.state(meta)?.compressed_cursor = Some(start + len);
        // The entry counts 512-byte sectors from the one holding `start`, minus one.
        let sectors = ((start % 512) + len).div_ceil(512);
        let shift = 62 - (self.header.cluster_bits - 8);
        Ok(Some(OFLAG_COMPRESSED | ((sectors - 1) << shift) | start))
    }

    /// From now on, store whole new data clusters compressed when that saves space (for
    /// archives; compressed clusters are rewritten uncompressed when partly overwritten).
    pub fn set_compress(&self, on: bool) -> Result<()> {
        if on && self.header.compression != super::Compression::Zlib {
            return Err(self
                .format_err("compressed writes into a zstd-typed image are not supported".into()));
        }
        self.state(&mut self.lock())?.compress = on;
        Ok(())
    }

    /// The current contents of the cluster starting at virtual `start`.
    fn read_cluster(&self, meta: &mut Meta, start: u64, buf: &mut [u8]) -> Result<()> {
        let entry = self.l2_entry(meta, start)?.unwrap_or(0);
        match self.decode_entry(entry, start, buf.len() as u64)? {
            Mapping::Data { host, .. } => self.file.read_at(buf, host),
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Unallocated { .. } => self.read_unallocated(buf, start),
            Mapping::Compressed { host, stored, .. } => {
                let data = self.decompressed(host, stored)?;
                buf.copy_from_slice(&data[..buf.len()]);
                Ok(())
            }
        }
    }

    /// Applies `op` to each cluster-sized piece of `offset..offset+len`, holding the metadata
    /// lock, after setting the dirty bit.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut op: impl FnMut(&mut Meta, u64, u64, usize) -> Result<()>,
    ) -> Result<()> {
        diskferry_blockdev::check_range(self.header.size, offset, len)?;
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        let cluster = self.header.cluster_size();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let n = (cluster - pos % cluster).min(len - done);
            op(&mut meta, pos, n, done as usize)?;
            done += n;
        }
        let dirty_tables = meta.l2.values().filter(|t| t.dirty).count();
        if dirty_tables > MAX_DIRTY_L2 {
            self.write_metadata(&mut meta)?;
        }
        Ok(())
    }

    pub(super) fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.for_each_piece(offset, buf.len() as u64, |meta, pos, n, at| {
            self.write_piece(meta, pos, &buf[at..at + n as usize])
        })
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = self.state(&mut self.lock())?.zeros.clone();
        self.for_each_piece(offset, len, |meta, pos, n, _| {
            self.write_piece(meta, pos, &zeros[..n as usize])
        })
    }

    /// Writes every changed table, in crash-safe order, then clears the dirty bit.
    pub(super) fn flush_all(&self) -> Result<()> {
        let mut meta = self.lock();
        if meta.write.is_none() {
            return Ok(());
        }
        self.write_metadata(&mut meta)?;
        let ws = self.state(&mut meta)?;
        if ws.dirty_on_disk {
            let clean = self.header.incompatible & !INCOMPAT_DIRTY;
            self.file
                .write_at(&clean.to_be_bytes(), Header::INCOMPATIBLE_OFFSET)?;
            self.file.flush()?;
            ws.dirty_on_disk = false;
        }
        Ok(())
    }

    /// Data → fsync → L2 tables and refcount blocks → fsync → L1 and refcount tables → fsync.
    fn write_metadata(&self, meta: &mut Meta) -> Result<()> {
        self.file.flush()?;
        for (offset, table) in meta.l2.iter_mut().filter(|(_, t)| t.dirty) {
            let raw: Vec<u8> = table.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_at(&raw, *offset)?;
            table.dirty = false;
        }
        let ws = meta.write.as_mut().ok_or(BlockError::ReadOnly)?;
        for block in ws.blocks.values_mut().filter(|b| b.dirty) {
            let raw: Vec<u8> = block.counts.iter().flat_map(|c| c.to_be_bytes()).collect();
            self.file.write_at(&raw, block.host)?;
            block.dirty = false;
        }
        self.file.flush()?;
        if meta.l1_dirty {
            let raw: Vec<u8> = meta.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_at(&raw, self.header.l1_table_offset)?;
            meta.l1_dirty = false;
        }
        let ws = meta.write.as_mut().ok_or(BlockError::ReadOnly)?;
        if ws.table_dirty {
            let raw: Vec<u8> = ws
                .refcount_table
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.file
                .write_at(&raw, self.header.refcount_table_offset)?;
            ws.table_dirty = false;
        }
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;
    use rand::{Rng, SeedableRng};

    fn check_equal(image: &Qcow2, reference: &[u8]) {
        let mut got = vec![0u8; reference.len()];
        image.read_at(&mut got, 0).unwrap();
        if got != reference {
            let i = got.iter().zip(reference).position(|(a, b)| a != b).unwrap();
            panic!("image differs from the reference at byte {i}");
        }
    }

    /// Random writes (data and zeros) and discards against an in-memory reference; flushed,
    /// reopened and written again. With `overlay`, the image is an overlay on a random base.
    fn model(cluster_bits: u32, size: usize, ops: usize, seed: u64, overlay: bool) {
        let mut file = Arc::new(MemoryDevice::new(0));
        let path = Path::new("model.qcow2");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let base: Option<Arc<dyn BlockDevice>> = overlay.then(|| {
            Arc::new(MemoryDevice::read_only(
                (0..size).map(|_| rng.gen()).collect(),
            )) as _
        });
        let mut reference = vec![0u8; size];
        let mut image = match &base {
            Some(b) => {
                b.read_at(&mut reference, 0).unwrap();
                Qcow2::create_overlay(
                    file.clone(),
                    path,
                    b.clone(),
                    "base.raw",
                    "raw",
                    cluster_bits,
                )
                .unwrap()
            }
            None => Qcow2::create(file.clone(), path, size as u64, cluster_bits).unwrap(),
        };
        for round in 0..2 {
            for i in 0..ops {
                let len = match rng.gen_range(0..10) {
                    0 => rng.gen_range(1..(3 << cluster_bits)),
                    1..=3 => 1 << cluster_bits,
                    _ => rng.gen_range(1..4096),
                };
                let offset = rng.gen_range(0..size - len);
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                        image.write_at(&data, offset as u64).unwrap();
                        reference[offset..offset + len].copy_from_slice(&data);
                    }
                    6 | 7 => {
                        image.write_at(&vec![0u8; len], offset as u64).unwrap();
                        reference[offset..offset + len].fill(0);
                    }
                    _ => {
                        image.discard(offset as u64, len as u64).unwrap();
                        reference[offset..offset + len].fill(0);
                    }
                }
                if i % 500 == 0 {
                    check_equal(&image, &reference);
                }
            }
            check_equal(&image, &reference);
            image.flush().unwrap();
            drop(image);
            // Reopen from a copy of the bytes written: everything must have reached the file.
            let copy = Arc::new(MemoryDevice::new(0));
            copy.resize(file.size()).unwrap();
            copy.write_at(&file.contents(), 0).unwrap();
            file = copy;
            image = Qcow2::open_writable(file.clone(), path, base.clone())
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            check_equal(&image, &reference);
        }
    }

    #[test]
    fn random_writes_zeros_and_discards_match_a_reference_4k_clusters() {
        model(12, 24 << 20, 3000, 1, false);
    }

    #[test]
    fn an_overlay_reads_through_to_its_base_and_copies_on_write() {
        model(12, 8 << 20, 3000, 3, true);
        model(16, 16 << 20, 1500, 4, true);
    }

    #[test]
    fn an_overlay_needs_its_base_to_be_read() {
        let base: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(vec![7u8; 1 << 20]));
        let file = Arc::new(MemoryDevice::new(0));
        let overlay = Qcow2::create_overlay(
            file.clone(),
            Path::new("o.qcow2"),
            base,
            "base.raw",
            "raw",
            16,
        )
        .unwrap();
        let mut buf = [0u8; 16];
        overlay.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [7u8; 16]);
        drop(overlay);
        let err = Qcow2::open(file.clone(), Path::new("o.qcow2"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("base.raw"), "{err}");
        let inspected = Qcow2::inspect(file, Path::new("o.qcow2")).unwrap();
        assert_eq!(inspected.backing_name(), Some("base.raw"));
        assert!(
            inspected.read_at(&mut buf, 0).is_err(),
            "no invented zeros without the base"
        );
    }

    #[test]
    fn random_writes_zeros_and_discards_match_a_reference_64k_clusters() {
        model(16, 64 << 20, 2000, 2, false);
    }

    #[test]
    fn compressed_clusters_read_back_survive_overwrites_and_save_space() {
        let file = Arc::new(MemoryDevice::new(0));
        let path = Path::new("c.qcow2");
        let size = 16usize << 20;
        let image = Qcow2::create(file.clone(), path, size as u64, 16).unwrap();
        image.set_compress(true).unwrap();
        let text: Vec<u8> = b"sixteen bytes ok"
            .iter()
            .copied()
            .cycle()
            .take(size)
            .collect();
        let mut reference = text.clone();
        image.write_at(&text, 0).unwrap();
        image.flush().unwrap();
        assert!(
            file.size() < 2 << 20,
            "16 MiB of text compresses: the file holds {} bytes",
            file.size()
        );
        // Incompressible clusters are stored plainly; partial overwrites rewrite clusters.
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let noise: Vec<u8> = (0..(1 << 20)).map(|_| rng.gen()).collect();
        image.write_at(&noise, 5 << 20).unwrap();
        reference[5 << 20..6 << 20].copy_from_slice(&noise);
        for _ in 0..200 {
            let len = rng.gen_range(1..100_000);
            let offset = rng.gen_range(0..size - len);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            image.write_at(&data, offset as u64).unwrap();
            reference[offset..offset + len].copy_from_slice(&data);
        }
        check_equal(&image, &reference);
        image.flush().unwrap();
        drop(image);
        let reopened = Qcow2::open(file.clone(), path).unwrap();
        check_equal(&reopened, &reference);
    }

    #[test]
    fn zero_writes_never_allocate() {
        let file = Arc::new(MemoryDevice::new(0));
        let image = Qcow2::create(file.clone(), Path::new("z.qcow2"), 64 << 20, 16).unwrap();
        let before = file.size();
        image.write_at(&vec![0u8; 8 << 20], 1 << 20).unwrap();
        image.discard(0, 64 << 20).unwrap();
        image.flush().unwrap();
        assert_eq!(file.size(), before, "no cluster was allocated for zeros");
    }
}
