//! The replayed view of a volume: a read-only [`BlockDevice`] that answers reads of the blocks
//! a journal replay would have written with their journaled contents, and every other read
//! from the volume underneath, which is never written.
//!
//! Replayed blocks are not copied into memory: each is remembered as the journal block that
//! holds it (the source does not change under us), so the overlay costs a few bytes per
//! replayed block. Only blocks the replay itself rewrites (the superblock without
//! `needs_recovery`, the emptied journal superblock) are kept whole.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use diskferry_blockdev::{BlockDevice, Extent, Region, Result};

use super::super::ondisk::journal_sb;

/// Where a replayed block's contents come from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// A journal block at this byte offset of the volume; `escaped` restores the journal
    /// magic its first four bytes held.
    Log { offset: u64, escaped: bool },
    /// Contents the replay computed.
    Whole(Arc<[u8]>),
}

/// A volume seen after an in-memory journal replay.
pub struct ReplayedDevice {
    inner: Arc<dyn BlockDevice>,
    block_size: u64,
    blocks: BTreeMap<u64, Source>,
}

impl ReplayedDevice {
    pub(super) fn new(
        inner: Arc<dyn BlockDevice>,
        block_size: u64,
        blocks: BTreeMap<u64, Source>,
    ) -> Self {
        ReplayedDevice {
            inner,
            block_size,
            blocks,
        }
    }

    /// The replayed contents of `block`, if the replay wrote it.
    fn replayed(&self, block: u64) -> Result<Option<Vec<u8>>> {
        let Some(source) = self.blocks.get(&block) else {
            return Ok(None);
        };
        Ok(Some(match source {
            Source::Whole(data) => data.to_vec(),
            Source::Log { offset, escaped } => {
                let mut data = vec![0u8; self.block_size as usize];
                self.inner.read_at(&mut data, *offset)?;
                if *escaped {
                    journal_sb::MAGIC.set(&mut data, journal_sb::MAGIC_VALUE);
                }
                data
            }
        }))
    }

    /// Replaces in `buf`, which holds the volume's bytes from `offset`, every replayed block
    /// it overlaps.
    fn patch(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let bs = self.block_size;
        for (&block, _) in self.blocks.range(offset / bs..end.div_ceil(bs)) {
            let Some(data) = self.replayed(block)? else {
                continue;
            };
            let (from, to) = ((block * bs).max(offset), ((block + 1) * bs).min(end));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - block * bs) as usize..(to - block * bs) as usize]);
        }
        Ok(())
    }

    /// Whether any replayed block lies in `range` (bytes).
    fn touches(&self, range: Range<u64>) -> bool {
        let bs = self.block_size;
        self.blocks
            .range(range.start / bs..range.end.div_ceil(bs))
            .next()
            .is_some()
    }
}

impl BlockDevice for ReplayedDevice {
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
        self.inner.read_at(buf, offset)?;
        self.patch(buf, offset)
    }

    /// A hole underneath a replayed block holds data now: such extents become unknown.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut extents = self.inner.block_status(offset, len)?;
        for e in &mut extents {
            if e.region == Region::Zero && self.touches(e.offset..e.end()) {
                e.region = Region::Unknown;
            }
        }
        Ok(extents)
    }

    /// The volume's own (possibly pipelined) range reads, each piece patched on its way.
    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> Result<()>,
    ) -> Result<()> {
        self.inner.read_ranges(ranges, &mut |pos, piece| {
            if !self.touches(pos..pos + piece.len() as u64) {
                return sink(pos, piece);
            }
            let mut data = piece.to_vec();
            self.patch(&mut data, pos)?;
            sink(pos, Bytes::from(data))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;

    #[test]
    fn reads_see_replayed_blocks_and_the_volume_elsewhere() {
        let bs = 1024u64;
        let mut vol = vec![1u8; 8 * bs as usize];
        // Block 6 is a journal block holding an escaped block: zeros where the magic was.
        vol[6 * 1024..7 * 1024].fill(7);
        vol[6 * 1024..6 * 1024 + 4].fill(0);
        let inner: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(vol));
        let mut blocks = BTreeMap::new();
        blocks.insert(
            2,
            Source::Log {
                offset: 6 * bs,
                escaped: true,
            },
        );
        blocks.insert(3, Source::Whole(vec![9u8; bs as usize].into()));
        let dev = ReplayedDevice::new(inner, bs, blocks);
        let mut buf = vec![0u8; 3 * bs as usize];
        dev.read_at(&mut buf, bs + 512).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 1));
        assert_eq!(buf[512..516], journal_sb::MAGIC_VALUE.to_be_bytes());
        assert!(buf[516..1536].iter().all(|&b| b == 7));
        assert!(buf[1536..2560].iter().all(|&b| b == 9));
        assert!(buf[2560..].iter().all(|&b| b == 1));
        let mut pieces = Vec::new();
        let whole = [0..8 * bs, 8 * bs..8 * bs];
        dev.read_ranges(&whole, &mut |pos, piece| {
            pieces.push((pos, piece));
            Ok(())
        })
        .unwrap();
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.1.to_vec()).collect();
        let mut direct = vec![0u8; 8 * bs as usize];
        dev.read_at(&mut direct, 0).unwrap();
        assert_eq!(joined, direct);
        assert!(dev.write_at(&[0], 0).is_err());
    }
}
