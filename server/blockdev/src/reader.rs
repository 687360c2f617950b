//! `Read + Write + Seek` over any [`BlockDevice`], for the synchronous filesystem crates.
//! Each reader has its own position; the device underneath has none.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::BlockDevice;

/// A cursor over a shared block device. Use from blocking threads, never on the async runtime.
pub struct BlockReader {
    dev: Arc<dyn BlockDevice>,
    pos: u64,
}

impl std::fmt::Debug for BlockReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockReader")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl BlockReader {
    pub fn new(dev: Arc<dyn BlockDevice>) -> Self {
        BlockReader { dev, pos: 0 }
    }
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.dev.size().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.dev
            .read_at(&mut buf[..n], self.pos)
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for BlockReader {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (self.dev.size().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the device",
            ));
        }
        self.dev
            .write_at(&buf[..n], self.pos)
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.dev.flush().map_err(io::Error::other)
    }
}

impl Seek for BlockReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.dev.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the device",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryDevice, SliceDevice};

    #[test]
    fn reads_seeks_and_writes_through_a_slice() {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(4096));
        let slice: Arc<dyn BlockDevice> =
            Arc::new(SliceDevice::new(mem.clone(), 1024, 2048).unwrap());
        let mut r = BlockReader::new(slice);
        r.seek(SeekFrom::End(-4)).unwrap();
        r.write_all(b"tail").unwrap();
        assert!(r.write_all(b"x").is_err(), "writing past the end fails");
        r.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 2048);
        assert_eq!(&all[2044..], b"tail");
        let mut raw = [0u8; 4];
        mem.read_at(&mut raw, 1024 + 2044).unwrap();
        assert_eq!(&raw, b"tail");
        assert!(r.seek(SeekFrom::Current(-5000)).is_err());
    }
}
