//! Crash-ordered metadata writes: data → fsync → refcount blocks (new references counted,
//! dropped ones still counted) → fsync → refcount table → fsync → L2 tables → fsync → L1
//! table → fsync → refcount blocks without the dropped references → fsync → clusters nobody
//! references punched out → dirty bit cleared → fsync; the dirty bit is set and synced before
//! the first change after a flush. A crash at any point (with writes between two fsyncs
//! reaching the disk in any order) leaves tables that point only at data already on disk and
//! at clusters the refcounts count: at worst leaked clusters, never a reference without its
//! refcount (`tests/crash.rs` replays every such state through our reader and qemu-img).

use std::collections::HashMap;

use super::header::{Header, INCOMPAT_DIRTY};
use super::ondisk::REFCOUNT_BYTES;
use super::{Meta, Qcow2};
use diskferry_blockdev::{BlockError, Result};

impl Qcow2 {
    /// Sets the dirty bit in the file before the first change after a flush.
    pub(super) fn mark_dirty(&self, meta: &mut Meta) -> Result<()> {
        let ws = self.state(meta)?;
        if !ws.dirty_on_disk {
            let (bits, at) = Header::incompatible_patch(self.header.incompatible | INCOMPAT_DIRTY);
            self.file.write_at(&bits, at)?;
            self.file.flush()?;
            ws.dirty_on_disk = true;
        }
        Ok(())
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
            let (clean, at) =
                Header::incompatible_patch(self.header.incompatible & !INCOMPAT_DIRTY);
            self.file.write_at(&clean, at)?;
            self.file.flush()?;
            ws.dirty_on_disk = false;
        }
        Ok(())
    }

    /// Refcounts before the references they count, references gone before their refcounts
    /// drop: data → fsync → refcount blocks, counting every new reference and still every
    /// dropped one → fsync → refcount table (new blocks) → fsync → L2 tables → fsync → L1
    /// table → fsync → the blocks without the dropped references → fsync → clusters left
    /// unreferenced punched out.
    pub(super) fn write_metadata(&self, meta: &mut Meta) -> Result<()> {
        self.file.flush()?;
        let bits = self.header.cluster_bits;
        let per_block = self.header.cluster_size() / REFCOUNT_BYTES;
        let ws = meta.write.as_mut().ok_or(BlockError::ReadOnly)?;
        let released = std::mem::take(&mut ws.released);
        // Dropped references by refcount block: (slot in the block, how many).
        let mut dropped: HashMap<u64, Vec<(usize, u16)>> = HashMap::new();
        for (&host, &n) in &released {
            let index = host >> bits;
            let slot = (index % per_block) as usize;
            dropped
                .entry(index / per_block)
                .or_default()
                .push((slot, n));
        }
        let encode = |counts: &[u16], extra: &[(usize, u16)]| -> Vec<u8> {
            let mut counts = counts.to_vec();
            for &(slot, n) in extra {
                counts[slot] = counts[slot].saturating_add(n);
            }
            counts.iter().flat_map(|c| c.to_be_bytes()).collect()
        };
        let mut wrote = false;
        for (index, block) in ws.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            let extra = dropped.get(index).map_or(&[][..], |v| &v[..]);
            self.file
                .write_at(&encode(&block.counts, extra), block.host)?;
            block.dirty = false;
            wrote = true;
        }
        if wrote {
            self.file.flush()?;
        }
        if ws.table_dirty {
            let raw: Vec<u8> = ws
                .refcount_table
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.file
                .write_at(&raw, self.header.refcount_table_offset)?;
            self.file.flush()?;
            ws.table_dirty = false;
        }
        for (offset, table) in meta.l2.iter_mut().filter(|(_, t)| t.dirty) {
            let raw: Vec<u8> = table.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_at(&raw, *offset)?;
            table.dirty = false;
        }
        self.file.flush()?;
        if meta.l1_dirty {
            let raw: Vec<u8> = meta.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_at(&raw, self.header.l1_table_offset)?;
            meta.l1_dirty = false;
        }
        self.file.flush()?;
        if dropped.is_empty() {
            return Ok(());
        }
        let ws = meta.write.as_mut().ok_or(BlockError::ReadOnly)?;
        for index in dropped.keys() {
            if let Some(block) = ws.blocks.get(index) {
                self.file
                    .write_at(&encode(&block.counts, &[]), block.host)?;
            }
        }
        self.file.flush()?;
        let cluster = self.header.cluster_size();
        for &host in released.keys() {
            // A host cluster of compressed data may have taken new data since.
            if self.refcount(meta, host)? == 0 {
                self.file.discard(host, cluster)?;
            }
        }
        Ok(())
    }
}
