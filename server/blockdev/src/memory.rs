//! An in-memory [`BlockDevice`], for tests and small scratch disks.

use std::sync::RwLock;

use super::{check_range, BlockDevice, BlockError, Result};

/// A fixed-size disk held in memory.
#[derive(Debug)]
pub struct MemoryDevice {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemoryDevice {
    /// A zero-filled writable device of `size` bytes.
    pub fn new(size: usize) -> Self {
        MemoryDevice {
            data: RwLock::new(vec![0; size]),
            read_only: false,
        }
    }

    /// A read-only device holding `data`.
    pub fn read_only(data: Vec<u8>) -> Self {
        MemoryDevice {
            data: RwLock::new(data),
            read_only: true,
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let new_size = usize::try_from(new_size)
            .map_err(|_| BlockError::Unsupported("hold that much in memory"))?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(new_size, 0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, len)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}
