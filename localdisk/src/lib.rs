//! Positional I/O on one local block device or regular file, shared by the client (which serves
//! disks) and the server (which reads local sources and writes raw images).
//!
//! Everything is positional (`pread`/`pwrite`): there is no shared seek position, so any number
//! of threads may use one [`LocalDisk`]. Regular files also report their holes
//! (SEEK_DATA/SEEK_HOLE) and can have ranges punched out; block devices report "unknown".
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FallocateFlags, SeekFrom};

/// What is known about a run of bytes without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Allocated: must be read.
    Data,
    /// A hole: reads as zeros.
    Zero,
    /// Cannot be told cheaply (block devices).
    Unknown,
}

/// An opened local disk or file.
#[derive(Debug)]
pub struct LocalDisk {
    file: File,
    /// Fixed at open, except through [`LocalDisk::set_len`] on regular files.
    size: AtomicU64,
    writable: bool,
    is_file: bool,
}

impl LocalDisk {
    /// Opens a block device or regular file; its size is fixed at open time.
    pub fn open(path: &Path, writable: bool) -> io::Result<LocalDisk> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        LocalDisk::from_file(file, writable)
    }

    /// Wraps an already open file or block device.
    pub fn from_file(file: File, writable: bool) -> io::Result<LocalDisk> {
        let meta = file.metadata()?;
        let is_file = meta.file_type().is_file();
        let size = if is_file {
            meta.len()
        } else if meta.file_type().is_block_device() {
            rustix::fs::seek(&file, SeekFrom::End(0))?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a block device nor a regular file",
            ));
        };
        Ok(LocalDisk {
            file,
            size: AtomicU64::new(size),
            writable,
            is_file,
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows or shrinks a regular file (new space reads as zeros and takes no disk space).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.is_file {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot change size",
            ));
        }
        self.file.set_len(len)?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// True for regular files (which know their holes), false for block devices.
    pub fn is_regular_file(&self) -> bool {
        self.is_file
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes written data durable (fsync).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Deallocates a range; it then reads as zeros (files) or as the device decides.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?;
        Ok(())
    }

    /// Makes a range read as zeros without sending zeros anywhere: a hole in a file, the
    /// device's zeroing for a block device (the kernel writes zeros itself where the device
    /// cannot); zeros written from here as a last resort.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = if self.is_file {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {
                let zeros = vec![0u8; 1 << 20];
                let mut at = offset;
                let end = offset + len;
                while at < end {
                    let n = (end - at).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The regions of `offset..offset+len` (clipped to the size), merged, at most `max` of
    /// them: they may end before the requested range does.
    pub fn regions(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, Region)>> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        if !self.is_file {
            return Ok(vec![(end - offset, Region::Unknown)]);
        }
        let mut out: Vec<(u64, Region)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max.max(1) {
            let data = self
                .seek(SeekFrom::Data(pos as i64))?
                .unwrap_or(self.size())
                .min(end);
            let (region, next) = if data > pos {
                (Region::Zero, data)
            } else {
                (
                    Region::Data,
                    self.seek(SeekFrom::Hole(pos as i64))?
                        .unwrap_or(self.size())
                        .clamp(pos + 1, end),
                )
            };
            match out.last_mut() {
                Some((n, r)) if *r == region => *n += next - pos,
                _ => out.push((next - pos, region)),
            }
            pos = next;
        }
        Ok(out)
    }

    /// `lseek` for SEEK_DATA/SEEK_HOLE; `None` when no data follows (ENXIO).
    fn seek(&self, whence: SeekFrom) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, whence) {
            Ok(p) => Ok(Some(p)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 4 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], (16 << 20) - 4096).unwrap();
        drop(f);
        let d = LocalDisk::open(&path, false).unwrap();
        let r = d.regions(0, u64::MAX, 100).unwrap();
        assert_eq!(r.iter().map(|x| x.0).sum::<u64>(), 16 << 20);
        assert_eq!(r[0], (4 << 20, Region::Zero));
        assert_eq!(r[1], (1 << 20, Region::Data));
        assert_eq!(r.last().unwrap().1, Region::Data);
        // A window inside the data run.
        assert_eq!(
            d.regions((4 << 20) + 10, 100, 100).unwrap(),
            vec![(100, Region::Data)]
        );
        // The cap on the number of regions is honoured.
        assert_eq!(d.regions(0, u64::MAX, 1).unwrap().len(), 1);
    }

    #[test]
    fn punched_ranges_read_as_zero_and_become_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 8 << 20]).unwrap();
        let d = LocalDisk::open(&path, true).unwrap();
        d.punch_hole(1 << 20, 2 << 20).unwrap();
        let mut buf = vec![1u8; 4096];
        d.read_exact_at(&mut buf, 2 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let r = d.regions(0, u64::MAX, 10).unwrap();
        assert_eq!(
            r,
            vec![
                (1 << 20, Region::Data),
                (2 << 20, Region::Zero),
                (5 << 20, Region::Data)
            ]
        );
    }
}
