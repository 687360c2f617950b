//! VHD images (Microsoft Virtual Hard Disk, the "conectix" footer format) as [`BlockDevice`]s:
//! read and write fixed and dynamic disks. [`ondisk`] holds the footer and dynamic header
//! tables, the checksum and the CHS geometry; `open.rs` reads, `write.rs` creates and writes.
//!
//! A fixed disk is the raw disk followed by a footer. A dynamic disk has a footer copy at 0,
//! the dynamic header at 512, the BAT, then blocks (each a sector bitmap and 2 MiB of data)
//! and the footer at the end. The virtual size is read as qemu reads it: from the geometry,
//! unless the creator application is one that sizes by the footer's current size (Hyper-V and
//! others, [`ondisk::SIZED_BY_FOOTER`]) or the geometry is the maximum. Like qemu, an
//! allocated block is read whole (its sector bitmap is not consulted). Differencing disks are
//! refused by name.
//!
//! Writing (images we create): sizes are rounded up to a geometry that covers them, as
//! qemu-img does, so every reader sees the same size; dynamic blocks are appended, all-zero
//! writes never allocate and zero a whole block by freeing it; the BAT and the footer at the
//! end reach the file at flush, after the data is synced.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

pub mod ondisk;
pub(crate) mod open;
mod write;

pub use write::geometry_for;

use super::{read_stored, status_mapped, FormatError, ImageError, Mapping};
use diskferry_blockdev::{BlockDevice, Extent, Region, Result};
use ondisk::{bat, SECTOR};

pub const MAGIC: &[u8; 8] = ondisk::footer::COOKIE_VALUE;

/// How the disk's data is laid out in the file.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// The disk is the file's first `size` bytes.
    Fixed,
    /// Blocks through a BAT at `bat_offset`.
    Dynamic {
        block_size: u64,
        bitmap_len: u64,
        bat_offset: u64,
    },
}

/// An open VHD image.
pub struct Vhd {
    file: Arc<dyn BlockDevice>,
    path: PathBuf,
    size: u64,
    layout: Layout,
    /// The footer as it is (re)written at the end of a dynamic disk we write.
    footer: Vec<u8>,
    state: Mutex<State>,
    writable: bool,
}

/// The BAT (ahead of the file until a flush when writing) and where the next block goes.
struct State {
    bat: Vec<u32>,
    dirty: bool,
    next_free: u64,
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Vhd {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this is a fixed (rather than dynamic) disk.
    pub fn is_fixed(&self) -> bool {
        matches!(self.layout, Layout::Fixed)
    }

    /// The dynamic disk's block size (`None` for a fixed disk).
    pub fn block_size(&self) -> Option<u64> {
        match self.layout {
            Layout::Fixed => None,
            Layout::Dynamic { block_size, .. } => Some(block_size),
        }
    }

    /// Where `offset..offset+max` (up to the end of its block) lives.
    pub fn map(&self, offset: u64, max: u64) -> std::result::Result<Mapping, ImageError> {
        let max = max.min(self.size.saturating_sub(offset));
        let Layout::Dynamic {
            block_size,
            bitmap_len,
            ..
        } = self.layout
        else {
            return Ok(Mapping::Data {
                host: offset,
                len: max,
            });
        };
        let block = offset / block_size;
        let in_block = offset % block_size;
        let len = (block_size - in_block).min(max);
        let entry = self
            .lock()
            .bat
            .get(block as usize)
            .copied()
            .unwrap_or(bat::UNUSED);
        if entry == bat::UNUSED {
            return Ok(Mapping::Unallocated { len });
        }
        let start = u64::from(entry) * SECTOR;
        if start.saturating_add(bitmap_len + block_size) > self.file.size() {
            return Err(ImageError::Invalid {
                path: self.path.clone(),
                problem: FormatError::Misplaced {
                    structure: "block",
                    index: Some(block),
                    offset: start,
                },
            });
        }
        Ok(Mapping::Data {
            host: start + bitmap_len + in_block,
            len,
        })
    }
}

impl Drop for Vhd {
    /// Best effort: call [`BlockDevice::flush`] to see errors.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl BlockDevice for Vhd {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(buf, offset)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_range(offset, len)
    }

    /// Data → fsync → BAT and footer → fsync.
    fn flush(&self) -> Result<()> {
        self.flush_metadata()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_stored(
            &self.path,
            &*self.file,
            self.size,
            buf,
            offset,
            |pos, max| self.map(pos, max),
        )
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        if self.is_fixed() {
            return self.file.block_status(offset, end.saturating_sub(offset));
        }
        status_mapped(&self.path, offset, end, Region::Zero, |pos, max| {
            self.map(pos, max)
        })
    }
}
