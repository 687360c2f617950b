//! Writing qcow2 version 3 images: data in place when its cluster is ours alone, otherwise
//! copy-on-write into a fresh cluster; whole clusters optionally compressed.
//!
//! - **Zeros never allocate**: all-zero writes and discards of whole clusters become the zero
//!   flag (freeing any cluster they had); into unallocated space they are no-ops.
//! - **Ordering**: data is written in place or into fresh clusters at once; tables and
//!   refcounts change in memory and reach the file at flush (`flush.rs`: data → fsync → L2
//!   tables and refcount blocks → fsync → L1 and refcount tables → fsync → clear the dirty bit
//!   → fsync). The dirty bit is set (and synced) before the first change after a flush, so an
//!   image cut off mid-way is known to need `qemu-img check -r`.

use super::ondisk::compressed;
use super::ondisk::entry::{COPIED, OFFSET_MASK, ZERO};
use super::{Meta, Qcow2};
use crate::error::AtPath;
use crate::{ImageError, Mapping};
use diskferry_blockdev::{is_zero, BlockError, Result};

/// Dirty L2 tables held before a write flushes metadata on its own (bounds memory).
const MAX_DIRTY_L2: usize = 1024;

impl Qcow2 {
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
            meta.l1[l1_index] = table | COPIED;
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
        let in_place = matches!(current, Mapping::Data { .. }) && entry & COPIED != 0;
        let new_entry = match current {
            Mapping::Zero { .. } if zero => return Ok(()),
            Mapping::Unallocated { .. } if zero && unallocated_is_zero => return Ok(()),
            Mapping::Data { host, .. } if in_place && !(zero && whole) => {
                self.file.write_at(data, host)?;
                return Ok(());
            }
            _ if zero && whole => {
                self.release_entry(meta, entry, offset)?;
                ZERO
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
                host | COPIED
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
        Ok(host | COPIED)
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
        Ok(Some(compressed::encode(
            start,
            len,
            self.header.cluster_bits,
        )))
    }

    /// From now on, store whole new data clusters compressed when that saves space (for
    /// archives; compressed clusters are rewritten uncompressed when partly overwritten).
    pub fn set_compress(&self, on: bool) -> std::result::Result<(), ImageError> {
        if on && self.header.compression != super::Compression::Zlib {
            return Err(ImageError::Unsupported {
                path: self.path.clone(),
                feature: "compressed writes into a zstd-typed image".into(),
            });
        }
        self.state(&mut self.lock()).at(&self.path)?.compress = on;
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

    /// Writes `data` (zeros when `None`) cluster by cluster, holding the metadata lock, after
    /// setting the dirty bit.
    fn write_clusters(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        diskferry_blockdev::check_range(self.header.size, offset, len)?;
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        let cluster = self.header.cluster_size();
        crate::write_units(offset, len, cluster, data, |pos, bytes| {
            self.write_piece(&mut meta, pos, bytes)
        })?;
        let dirty_tables = meta.l2.values().filter(|t| t.dirty).count();
        if dirty_tables > MAX_DIRTY_L2 {
            self.write_metadata(&mut meta)?;
        }
        Ok(())
    }

    pub(super) fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_clusters(offset, buf.len() as u64, Some(buf))
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        self.write_clusters(offset, len, None)
    }
}
