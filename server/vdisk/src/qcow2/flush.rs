//! Crash-ordered metadata writes: data → fsync → L2 tables and refcount blocks → fsync → L1
//! and refcount tables → fsync → dirty bit cleared → fsync; the dirty bit is set and synced
//! before the first change after a flush. A crash at any point leaves tables that point only
//! at data already on disk, and a dirty bit that says `qemu-img check -r` is due.

use super::header::{Header, INCOMPAT_DIRTY};
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

    /// Data → fsync → L2 tables and refcount blocks → fsync → L1 and refcount tables → fsync.
    pub(super) fn write_metadata(&self, meta: &mut Meta) -> Result<()> {
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
