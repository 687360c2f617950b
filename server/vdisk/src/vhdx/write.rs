//! Writing images we created: payload blocks appended at the end of the file, 1 MiB aligned;
//! all-zero writes never allocate (whole blocks become the ZERO state and their space is
//! punched out); the BAT reaches the file at flush, after the data is synced.

use super::ondisk::bat;
use super::{State, Vhdx};
use diskferry_blockdev::{check_range, is_zero, BlockError, Result};

impl Vhdx {
    /// Writes `data` at `offset`, all within one block.
    fn write_piece(&self, st: &mut State, offset: u64, data: &[u8]) -> Result<()> {
        let block = offset / self.block_size;
        let in_block = offset % self.block_size;
        let index = bat::index(block, self.chunk_ratio) as usize;
        let entry = st.bat[index];
        let zero = is_zero(data);
        let whole = in_block == 0 && data.len() as u64 == self.block_size;
        if bat::state(entry) == bat::FULLY_PRESENT {
            let host = bat::file_offset(entry);
            if zero && whole {
                self.file.discard(host, self.block_size)?;
                st.bat[index] = bat::ZERO;
                st.dirty = true;
                return Ok(());
            }
            return self.file.write_at(data, host + in_block);
        }
        if zero {
            return Ok(()); // not present, zero or unmapped: reads as zeros already
        }
        let host = st.next_free;
        st.next_free += self.block_size;
        self.file.resize(st.next_free)?;
        self.file.write_at(data, host + in_block)?;
        st.bat[index] = bat::entry(bat::FULLY_PRESENT, host);
        st.dirty = true;
        Ok(())
    }

    /// Writes `data` (zeros when `None`) block by block.
    fn write_blocks(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        if !self.writable {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        let mut st = self.lock();
        crate::write_units(offset, len, self.block_size, data, |pos, bytes| {
            self.write_piece(&mut st, pos, bytes)
        })
    }

    pub(super) fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_blocks(offset, buf.len() as u64, Some(buf))
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        self.write_blocks(offset, len, None)
    }

    /// Data → fsync → BAT → fsync.
    pub(super) fn flush_bat(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        self.file.flush()?;
        if st.dirty {
            let raw: Vec<u8> = st.bat.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.file.write_at(&raw, self.bat_offset)?;
            self.file.flush()?;
            st.dirty = false;
        }
        Ok(())
    }
}
