//! Whole-sector writes for a live window. A live agent writes with direct I/O, which takes
//! whole sectors only, while the ext4 writer ends a file's data where the file ends. The
//! window is zeroed before anything is written, and the bytes after a file's end up to its
//! block's end belong to no one else, so a write ending inside a sector is completed with the
//! zeros the disk already holds there. A write starting inside a sector (the writer makes
//! none) reads that sector first.

use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, Extent, Result};

/// `inner`, every write widened to whole sectors.
pub struct SectorWrites {
    inner: Arc<dyn BlockDevice>,
    sector: u64,
}

impl SectorWrites {
    pub fn new(inner: Arc<dyn BlockDevice>) -> SectorWrites {
        let sector = u64::from(inner.logical_sector_size().max(512));
        SectorWrites { inner, sector }
    }
}

impl BlockDevice for SectorWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        diskferry_blockdev::check_range(self.size(), offset, buf.len() as u64)?;
        let s = self.sector;
        let start = offset / s * s;
        let end = (offset + buf.len() as u64)
            .next_multiple_of(s)
            .min(self.size());
        if start == offset && end == offset + buf.len() as u64 {
            return self.inner.write_at(buf, offset);
        }
        let mut whole = vec![0u8; (end - start) as usize];
        if start != offset {
            self.inner.read_at(&mut whole[..s as usize], start)?;
        }
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.inner.write_at(&whole, start)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    #[test]
    fn a_short_tail_is_completed_with_zeros_and_a_short_head_keeps_the_sector() {
        let mem = Arc::new(MemoryDevice::new(8192));
        mem.write_at(&[7u8; 512], 1024).unwrap();
        let dev = SectorWrites::new(Arc::clone(&mem) as Arc<dyn BlockDevice>);
        dev.write_at(b"thirteen byte", 0).unwrap();
        dev.write_at(b"xy", 1030).unwrap();
        let mut b = vec![0u8; 1536];
        mem.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..13], b"thirteen byte");
        assert!(b[13..1024].iter().all(|&x| x == 0));
        assert_eq!(&b[1024..1030], &[7; 6]);
        assert_eq!(&b[1030..1032], b"xy");
        assert!(b[1032..1536].iter().all(|&x| x == 7));
    }
}
