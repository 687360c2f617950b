//! A local block device or regular file as a [`BlockDevice`].

use std::path::{Path, PathBuf};

use diskferry_localdisk::LocalDisk;

use super::{check_range, BlockDevice, BlockError, Extent, Result};

/// Most extents one `block_status` call returns.
const MAX_EXTENTS: usize = 4096;

/// A local file or block device.
#[derive(Debug)]
pub struct FileDevice {
    disk: LocalDisk,
    path: PathBuf,
}

impl FileDevice {
    pub fn open(path: &Path, writable: bool) -> Result<FileDevice> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path);
        let file = file.map_err(|source| BlockError::Io {
            op: "open",
            offset: None,
            device: path.display().to_string(),
            source,
        })?;
        FileDevice::from_file(file, path, writable)
    }

    /// Wraps a file already open (for example an output being written under a temporary name).
    pub fn from_file(file: std::fs::File, path: &Path, writable: bool) -> Result<FileDevice> {
        let disk = LocalDisk::from_file(file, writable).map_err(|source| BlockError::Io {
            op: "open",
            offset: None,
            device: path.display().to_string(),
            source,
        })?;
        Ok(FileDevice {
            disk,
            path: path.to_path_buf(),
        })
    }

    fn io_err(
        &self,
        op: &'static str,
        offset: Option<u64>,
    ) -> impl FnOnce(std::io::Error) -> BlockError + '_ {
        move |source| BlockError::Io {
            op,
            offset,
            device: self.path.display().to_string(),
            source,
        }
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn is_read_only(&self) -> bool {
        !self.disk.is_writable()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        self.disk
            .read_exact_at(buf, offset)
            .map_err(self.io_err("read", Some(offset)))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.disk.is_writable() {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size(), offset, buf.len() as u64)?;
        self.disk
            .write_all_at(buf, offset)
            .map_err(self.io_err("write", Some(offset)))
    }

    fn flush(&self) -> Result<()> {
        if !self.disk.is_writable() {
            return Ok(());
        }
        self.disk.sync().map_err(self.io_err("flush", None))
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if !self.disk.is_writable() {
            return Err(BlockError::ReadOnly);
        }
        self.disk
            .set_len(new_size)
            .map_err(self.io_err("resize", Some(new_size)))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.disk.is_writable() {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size(), offset, len)?;
        if !self.disk.is_regular_file() {
            return Ok(());
        }
        self.disk
            .punch_hole(offset, len)
            .map_err(self.io_err("discard", Some(offset)))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.disk.is_writable() {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size(), offset, len)?;
        self.disk
            .zero_range(offset, len)
            .map_err(self.io_err("write zeroes", Some(offset)))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let regions = self
            .disk
            .regions(offset, len, MAX_EXTENTS)
            .map_err(self.io_err("seek", Some(offset)))?;
        let mut pos = offset;
        Ok(regions
            .into_iter()
            .map(|(len, region)| {
                let e = Extent {
                    offset: pos,
                    len,
                    region,
                };
                pos += len;
                e
            })
            .collect())
    }
}
