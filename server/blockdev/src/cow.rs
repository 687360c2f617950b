//! The copy-on-write device: a read-only base (a capture) under a [`HybridVolume`] that takes
//! every write — what `export --writable --redo` serves, so a VM can boot from and write to a
//! capture that never changes.
//!
//! The top's allocation bitmap decides: clusters the top holds (written or zeroed) are read
//! from it, the rest from the base, a read split cluster by cluster and joined into runs. A
//! partial write into a cluster the top does not hold first copies that cluster from the base,
//! so the bytes around the write keep the base's contents. `write_zeroes` makes whole clusters
//! zero clusters of the top and writes zeros (with the same copy) into partial ones. `discard`
//! drops the top's whole clusters, which then read from the base again (the NBD specification
//! leaves trimmed contents unspecified); its partial edges are left as they were. The base is
//! never written.

use std::sync::Arc;

use super::{BlockDevice, Extent, HybridError, HybridVolume, Result};

/// A base device with a [`HybridVolume`] redo on top; see the module documentation.
pub struct CowDevice {
    base: Arc<dyn BlockDevice>,
    top: Arc<HybridVolume>,
}

impl std::fmt::Debug for CowDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowDevice")
            .field("size", &self.base.size())
            .field("top", &self.top)
            .finish_non_exhaustive()
    }
}

impl CowDevice {
    /// Refuses a top whose size differs from the base's.
    pub fn new(base: Arc<dyn BlockDevice>, top: Arc<HybridVolume>) -> Result<Self, HybridError> {
        if base.size() != top.size() {
            return Err(HybridError::SizeMismatch {
                base: base.size(),
                top: top.size(),
            });
        }
        Ok(CowDevice { base, top })
    }

    /// The redo layer.
    pub fn top(&self) -> &Arc<HybridVolume> {
        &self.top
    }

    fn read_base(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.base.read_at(buf, offset)
    }

    /// The extents of `offset..end` from `dev`, stopping early when `dev` does; false then.
    fn status_of(
        dev: &dyn BlockDevice,
        offset: u64,
        end: u64,
        out: &mut Vec<Extent>,
    ) -> Result<bool> {
        let extents = dev.block_status(offset, end - offset)?;
        let reached = extents.last().map_or(offset, Extent::end);
        out.extend(extents);
        Ok(reached >= end)
    }
}

impl BlockDevice for CowDevice {
    fn size(&self) -> u64 {
        self.top.size()
    }

    fn logical_sector_size(&self) -> u32 {
        self.base.logical_sector_size()
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.top
            .read_with(buf, offset, Some(&|b, at| self.read_base(b, at)))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.top
            .write_with(buf, offset, Some(&|b, at| self.read_base(b, at)))
    }

    fn flush(&self) -> Result<()> {
        self.top.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.top.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.top
            .zero_with(offset, len, Some(&|b, at| self.read_base(b, at)))
    }

    /// The top's status where it holds clusters, the base's elsewhere.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        for (run, held) in self.top.allocated(offset, len) {
            let dev: &dyn BlockDevice = if held { &*self.top } else { &*self.base };
            if !Self::status_of(dev, run.start, run.end, &mut out)? {
                break;
            }
        }
        Ok(out)
    }
}
