//! A window of another [`BlockDevice`] (a partition, say), itself a block device.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::{check_range, BlockDevice, Extent, Result};
use diskferry_protocol::chunks::ChunkHash;

/// Bytes `start..start+len` of an inner device, addressed from 0.
pub struct SliceDevice {
    inner: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
}

impl std::fmt::Debug for SliceDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SliceDevice")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl SliceDevice {
    /// Fails when the window does not lie inside the inner device.
    pub fn new(inner: Arc<dyn BlockDevice>, start: u64, len: u64) -> Result<SliceDevice> {
        check_range(inner.size(), start, len)?;
        Ok(SliceDevice { inner, start, len })
    }
}

impl BlockDevice for SliceDevice {
    fn size(&self) -> u64 {
        self.len
    }

    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.inner.read_at(buf, self.start + offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.inner.write_at(buf, self.start + offset)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.len, offset, len)?;
        self.inner.discard(self.start + offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.len, offset, len)?;
        self.inner.write_zeroes(self.start + offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.len.saturating_sub(offset));
        let extents = self.inner.block_status(self.start + offset, len)?;
        Ok(extents
            .into_iter()
            .filter_map(|e| {
                let start = e.offset.max(self.start + offset);
                let end = e.end().min(self.start + offset + len);
                (start < end).then(|| Extent {
                    offset: start - self.start,
                    len: end - start,
                    region: e.region,
                })
            })
            .collect())
    }

    fn chunk_hashes(&self, offset: u64, len: u64, chunk: u32) -> Result<Vec<ChunkHash>> {
        check_range(self.len, offset, len)?;
        self.inner.chunk_hashes(self.start + offset, len, chunk)
    }

    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> Result<()>,
    ) -> Result<()> {
        for r in ranges {
            check_range(self.len, r.start, r.end.saturating_sub(r.start))?;
        }
        let shifted: Vec<Range<u64>> = ranges
            .iter()
            .map(|r| r.start + self.start..r.end + self.start)
            .collect();
        self.inner
            .read_ranges(&shifted, &mut |off, data| sink(off - self.start, data))
    }
}
