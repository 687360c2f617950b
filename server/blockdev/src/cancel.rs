//! Stopping a job from outside: a [`CancellableDevice`] reads through to its inner device until
//! its [`CancelFlag`] is raised, then every read fails with [`BlockError::Cancelled`] — so any
//! pipeline reading it stops at its next read and cleans up as on any read error (its output
//! stays `OUT.partial` and is removed).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::{BlockDevice, BlockError, Extent, Result};
use diskferry_protocol::chunks::ChunkHash;

/// Raised once to cancel; shared between the job and whoever may cancel it.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(BlockError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A read-only view of `inner` that fails once its flag is raised.
pub struct CancellableDevice {
    inner: Arc<dyn BlockDevice>,
    flag: CancelFlag,
}

impl CancellableDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, flag: CancelFlag) -> CancellableDevice {
        CancellableDevice { inner, flag }
    }
}

impl BlockDevice for CancellableDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.flag.check()?;
        self.inner.read_at(buf, offset)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.flag.check()?;
        self.inner.block_status(offset, len)
    }

    fn chunk_hashes(&self, offset: u64, len: u64, chunk: u32) -> Result<Vec<ChunkHash>> {
        self.flag.check()?;
        self.inner.chunk_hashes(offset, len, chunk)
    }

    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> Result<()>,
    ) -> Result<()> {
        self.flag.check()?;
        self.inner.read_ranges(ranges, &mut |at, piece| {
            self.flag.check()?;
            sink(at, piece)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryDevice;

    #[test]
    fn reads_until_cancelled() {
        let flag = CancelFlag::default();
        let dev = CancellableDevice::new(Arc::new(MemoryDevice::new(16 << 20)), flag.clone());
        let mut buf = [0u8; 512];
        dev.read_at(&mut buf, 0).unwrap();
        let mut pieces = 0;
        let err = dev
            .read_ranges(&[0..(8 << 20), (8 << 20)..(16 << 20)], &mut |_, _| {
                pieces += 1;
                flag.cancel();
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, BlockError::Cancelled));
        assert_eq!(pieces, 1);
        assert!(matches!(
            dev.read_at(&mut buf, 0),
            Err(BlockError::Cancelled)
        ));
    }
}
