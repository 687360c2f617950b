//! The volume as `Read + Seek` for the `ntfs` crate ([`Padded`]): zeros past its end, and
//! the `$MFT`'s data runs joined so that a file record split across two runs reads whole.
//!
//! Zeros past the end: the crate panics (an "unreachable" binrw error) when a structure it
//! reads is cut short, while zeros just fail its signature checks.
//!
//! Joined runs: the crate finds a file record by mapping its first byte through the `$MFT`'s
//! runs and then reads the record's bytes contiguously from there. With clusters smaller
//! than a record (512-byte clusters, 1024-byte records) a record can start at the end of one
//! run and go on at the start of the next; such a read, crossing the end of an `$MFT` run,
//! goes on at the next run's start. Nothing else the crate reads crosses those ends: the
//! `$MFT` runs hold only file records, and non-resident values are read run by run.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockReader};

/// The `$MFT`'s runs on disk, sorted by where they start: (first byte, end, where the next
/// run in VCN order starts).
#[derive(Debug, Clone, Default)]
pub struct MftRuns(Vec<(u64, u64, Option<u64>)>);

impl MftRuns {
    /// From the `$MFT`'s real runs in VCN order, as (first byte, bytes).
    pub fn new(runs: &[(u64, u64)]) -> MftRuns {
        let mut v: Vec<(u64, u64, Option<u64>)> = runs
            .iter()
            .enumerate()
            .map(|(i, &(start, len))| {
                (
                    start,
                    start.saturating_add(len),
                    runs.get(i + 1).map(|r| r.0),
                )
            })
            .collect();
        v.sort_unstable_by_key(|r| r.0);
        MftRuns(v)
    }

    /// Whether a read of `len` bytes at `pos` crosses the end of an `$MFT` run that has a
    /// successor: (that end, where the successor starts).
    fn crossing(&self, pos: u64, len: u64) -> Option<(u64, u64)> {
        let i = self.0.partition_point(|r| r.0 <= pos).checked_sub(1)?;
        let (_, end, next) = self.0[i];
        (pos < end && pos.saturating_add(len) > end).then_some((end, next?))
    }
}

/// A reader over the volume for the `ntfs` crate.
pub struct Padded {
    inner: BlockReader,
    size: u64,
    pos: u64,
    mft: Arc<MftRuns>,
}

impl Padded {
    pub fn new(dev: Arc<dyn BlockDevice>, mft: Arc<MftRuns>) -> Padded {
        Padded {
            size: dev.size(),
            inner: BlockReader::new(dev),
            pos: 0,
            mft,
        }
    }
}

impl Read for Padded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let jump = self.mft.crossing(self.pos, buf.len() as u64);
        let buf = match jump {
            Some((end, _)) => &mut buf[..(end - self.pos) as usize],
            None => buf,
        };
        let n = if self.pos >= self.size {
            buf.fill(0);
            buf.len()
        } else {
            self.inner.read(buf)?
        };
        self.pos += n as u64;
        if let Some((end, next)) = jump {
            if self.pos == end {
                self.seek(SeekFrom::Start(next))?;
            }
        }
        Ok(n)
    }
}

impl Seek for Padded {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.size.saturating_add_signed(d),
            SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
        };
        self.pos = target;
        self.inner.seek(SeekFrom::Start(target.min(self.size)))?;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    #[test]
    fn reads_crossing_an_mft_run_end_go_on_at_the_next_run() {
        let dev = Arc::new(MemoryDevice::new(8192));
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i / 512) as u8).collect();
        dev.write_at(&bytes, 0).unwrap();
        // Runs in VCN order: sectors 4..6, then sector 1, then sectors 9..10.
        let mft = MftRuns::new(&[(2048, 1024), (512, 512), (4608, 1024)]);
        let mut r = Padded::new(dev, Arc::new(mft));
        let mut rec = [0u8; 1024];
        r.seek(SeekFrom::Start(2560)).unwrap();
        r.read_exact(&mut rec).unwrap();
        assert!(rec[..512].iter().all(|&b| b == 5) && rec[512..].iter().all(|&b| b == 1));
        r.seek(SeekFrom::Start(768)).unwrap();
        r.read_exact(&mut rec).unwrap();
        assert!(rec[..256].iter().all(|&b| b == 1) && rec[256..768].iter().all(|&b| b == 9));
        assert!(rec[768..].iter().all(|&b| b == 10));
        // Reads inside a run, and the last run's end, are left alone.
        r.seek(SeekFrom::Start(5120)).unwrap();
        r.read_exact(&mut rec).unwrap();
        assert!(rec[..512].iter().all(|&b| b == 10) && rec[512..].iter().all(|&b| b == 11));
    }
}
