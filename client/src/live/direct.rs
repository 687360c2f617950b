//! Direct I/O to a live disk: writes bypass the page cache (`O_DIRECT`), so gigabytes of a new
//! system neither crowd out the running system's memory nor sit dirty in it, and each write
//! is on the device when it is answered. Direct I/O wants whole sectors from memory aligned
//! to them; each write is copied once into such a buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Buffer alignment: a page, which satisfies every device's DMA alignment.
const ALIGN: usize = 4096;

/// A disk opened for direct writes.
#[derive(Debug)]
pub struct DirectWriter {
    file: File,
    /// The disk's logical sector size: writes start and end on it.
    sector: u64,
}

impl DirectWriter {
    pub fn open(path: &Path, sector: u32) -> io::Result<DirectWriter> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)?;
        Ok(DirectWriter {
            file,
            sector: u64::from(sector.max(512)),
        })
    }

    /// Writes `data` at `offset`, both whole sectors.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if !offset.is_multiple_of(self.sector) || !(data.len() as u64).is_multiple_of(self.sector) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "live writes must be whole {}-byte sectors ({} bytes at {offset})",
                    self.sector,
                    data.len()
                ),
            ));
        }
        let mut buf = vec![0u8; data.len() + ALIGN];
        let start = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
        let aligned = &mut buf[start..start + data.len()];
        aligned.copy_from_slice(data);
        self.file.write_all_at(aligned, offset)
    }

    /// The disk's logical sector size.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Waits until the device has everything written (its cache flushed).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}
