//! Append-only allocation and 16-bit refcounts. New clusters (data, L2 tables, refcount
//! blocks) go at the end of the file; freed clusters get refcount 0 and are punched out of the
//! file, never reused, so a crash can never leave two owners for one cluster. Refcount blocks
//! and the refcount table change in memory and reach the file at flush (`flush.rs`); dropped
//! references are remembered until then, because the file must keep counting a cluster (and
//! keep its bytes) as long as a table on disk may still point at it.

use std::collections::HashMap;

use super::ondisk::REFCOUNT_BYTES;
use super::{Meta, Qcow2};
use crate::{FormatError, ImageError, Mapping};
use diskferry_blockdev::{BlockError, Result};

/// What only a writable image needs.
pub(super) struct WriteState {
    pub(super) refcount_table: Vec<u64>,
    pub(super) table_dirty: bool,
    /// Refcount blocks in use, by their index in the refcount table.
    pub(super) blocks: HashMap<u64, RefBlock>,
    /// Where the next cluster is allocated.
    pub(super) next_free: u64,
    /// Whether the file's header has the dirty bit set.
    pub(super) dirty_on_disk: bool,
    /// Store whole new data clusters deflate-compressed when that saves space.
    pub(super) compress: bool,
    /// Where the next compressed cluster goes: a byte offset inside a host cluster that holds
    /// compressed data, or `None` before the first.
    pub(super) compressed_cursor: Option<u64>,
    /// References dropped since metadata last reached the file, by host cluster.
    pub(super) released: HashMap<u64, u16>,
}

/// A refcount block as the image should be (ahead of the file until a flush).
pub(super) struct RefBlock {
    pub(super) host: u64,
    pub(super) counts: Vec<u16>,
    pub(super) dirty: bool,
}

impl WriteState {
    /// The state of a new image (its refcount table still to be written, its header not yet
    /// written and clean when it is): `refcount_table` as it stands, the next cluster
    /// allocated at `next_free`.
    pub(super) fn new(refcount_table: Vec<u64>, next_free: u64) -> WriteState {
        WriteState {
            refcount_table,
            table_dirty: true,
            blocks: HashMap::new(),
            next_free,
            dirty_on_disk: false,
            compress: false,
            compressed_cursor: None,
            released: HashMap::new(),
        }
    }
}

impl Qcow2 {
    pub(super) fn state<'m>(&self, meta: &'m mut Meta) -> Result<&'m mut WriteState> {
        meta.write.as_mut().ok_or(BlockError::ReadOnly)
    }

    /// `problem` with this image's name, as a block error.
    pub(super) fn corrupt(&self, problem: FormatError) -> BlockError {
        BlockError::from(ImageError::Invalid {
            path: self.path.clone(),
            problem,
        })
    }

    /// A fresh cluster at the end of the file, with refcount 1.
    pub(super) fn allocate(&self, meta: &mut Meta) -> Result<u64> {
        let host = self.take_cluster(meta)?;
        self.set_refcount(meta, host, 1)?;
        Ok(host)
    }

    /// Reserves the next cluster of the file (its refcount is the caller's business).
    pub(super) fn take_cluster(&self, meta: &mut Meta) -> Result<u64> {
        let cluster = self.header.cluster_size();
        let ws = self.state(meta)?;
        let host = ws.next_free;
        ws.next_free += cluster;
        if self.file.size() < ws.next_free {
            self.file.resize(ws.next_free)?;
        }
        Ok(host)
    }

    pub(super) fn set_refcount(&self, meta: &mut Meta, host: u64, value: u16) -> Result<()> {
        let cluster_index = host >> self.header.cluster_bits;
        let per_block = self.header.cluster_size() / REFCOUNT_BYTES;
        let block = self.refcount_block(meta, cluster_index / per_block)?;
        block.counts[(cluster_index % per_block) as usize] = value;
        block.dirty = true;
        Ok(())
    }

    pub(super) fn refcount(&self, meta: &mut Meta, host: u64) -> Result<u16> {
        let cluster_index = host >> self.header.cluster_bits;
        let per_block = self.header.cluster_size() / REFCOUNT_BYTES;
        Ok(self.refcount_block(meta, cluster_index / per_block)?.counts
            [(cluster_index % per_block) as usize])
    }

    /// The refcount block with this index, loaded, or allocated (covering itself) if absent.
    pub(super) fn refcount_block<'m>(
        &self,
        meta: &'m mut Meta,
        index: u64,
    ) -> Result<&'m mut RefBlock> {
        let cluster = self.header.cluster_size();
        let per_block = cluster / REFCOUNT_BYTES;
        let ws = self.state(meta)?;
        let Some(&entry) = ws.refcount_table.get(index as usize) else {
            return Err(self.corrupt(FormatError::RefcountTableFull));
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
                    .chunks_exact(REFCOUNT_BYTES as usize)
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
        Ok(self
            .state(meta)?
            .blocks
            .get_mut(&index)
            .expect("loaded or allocated above; blocks are never dropped"))
    }

    /// Drops one reference to the cluster at `host`; a cluster nobody references is punched
    /// out of the file at the next metadata write.
    pub(super) fn release(&self, meta: &mut Meta, host: u64) -> Result<()> {
        let count = self.refcount(meta, host)?;
        if count == 0 {
            return Err(self.corrupt(FormatError::RefcountZero { offset: host }));
        }
        self.set_refcount(meta, host, count - 1)?;
        // The file keeps counting it, and a cluster nobody references keeps its bytes, until
        // the tables without the reference are durable (`write_metadata`).
        *self.state(meta)?.released.entry(host).or_default() += 1;
        Ok(())
    }

    /// Releases whatever cluster(s) an L2 entry holds.
    pub(super) fn release_entry(&self, meta: &mut Meta, entry: u64, offset: u64) -> Result<()> {
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
}
