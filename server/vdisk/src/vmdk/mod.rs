//! VMDK images as [`BlockDevice`]s: read and write the two one-file forms of a hosted sparse
//! extent — monolithicSparse (grains of 64 KiB through a grain directory and grain tables,
//! with a redundant copy of both) and streamOptimized (zlib-compressed grains behind markers,
//! the grain tables and directory after them, then a footer and an end-of-stream marker: the
//! form ESXi and OVA imports take). [`ondisk`] holds the header and markers; `open.rs` reads
//! the header (or a stream's footer) and the tables; `write.rs` creates and writes both forms.
//!
//! Descriptor-only VMDKs (split or flat extents in other files), split extents, VMDK 3 and
//! seSparse files are named by [`crate::detect`] and refused. Everything read from the file
//! is bounded and checked before use: table sizes, table and grain offsets, and a compressed
//! grain's length and what it inflates to.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

pub mod ondisk;
mod open;
mod write;

use super::{read_mapped, status_mapped, FormatError, ImageError, Mapping};
use diskferry_blockdev::{check_range, BlockDevice, Extent, Region, Result};
use ondisk::{gte, marker, SECTOR};

pub(crate) use open::is_whole_disk;

pub const MAGIC: &[u8; 4] = ondisk::header::MAGIC_VALUE;

/// An open VMDK image.
pub struct Vmdk {
    file: Arc<dyn BlockDevice>,
    path: PathBuf,
    size: u64,
    /// Bytes per grain.
    grain: u64,
    gtes_per_gt: u64,
    /// Grain table entries of 1 read as zeros.
    zero_grain: bool,
    compressed: bool,
    state: Mutex<State>,
    /// How an image we create is written; `None` when opened for reading.
    writer: Option<write::Writer>,
}

/// The grain tables (ahead of the file until a flush when writing), the last grain inflated,
/// and what a writer needs.
struct State {
    /// By grain directory index; `None` is a table of unallocated entries.
    tables: Vec<Option<Box<[u32]>>>,
    /// Tables changed since the last flush.
    dirty: Vec<usize>,
    /// Where the next grain goes.
    next_free: u64,
    /// The last compressed grain read: its file offset and contents.
    inflated: Option<(u64, Arc<[u8]>)>,
    /// A stream's grain being filled by partial writes: its index and contents.
    pending: Option<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for Vmdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmdk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("compressed", &self.compressed)
            .finish_non_exhaustive()
    }
}

impl State {
    fn entry(&self, grain: u64, per_table: u64) -> u32 {
        self.tables
            .get((grain / per_table) as usize)
            .and_then(Option::as_ref)
            .and_then(|t| t.get((grain % per_table) as usize).copied())
            .unwrap_or(gte::UNALLOCATED)
    }
}

impl Vmdk {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether grains are stored compressed (a stream-optimized image).
    pub fn is_stream_optimized(&self) -> bool {
        self.compressed
    }

    pub fn grain_size(&self) -> u64 {
        self.grain
    }

    fn invalid(&self, problem: FormatError) -> ImageError {
        ImageError::Invalid {
            path: self.path.clone(),
            problem,
        }
    }

    /// Bytes of grain `index` inside the disk (the last grain may be cut short).
    fn grain_len(&self, index: u64) -> u64 {
        self.grain.min(self.size - index * self.grain)
    }

    /// Where `offset..offset+max` (up to the end of its grain) lives.
    pub fn map(&self, offset: u64, max: u64) -> std::result::Result<Mapping, ImageError> {
        let index = offset / self.grain;
        let in_grain = offset % self.grain;
        let len = (self.grain - in_grain)
            .min(max)
            .min(self.size.saturating_sub(offset));
        let entry = self.lock().entry(index, self.gtes_per_gt);
        match entry {
            gte::UNALLOCATED => return Ok(Mapping::Unallocated { len }),
            gte::ZERO if self.zero_grain => return Ok(Mapping::Zero { len }),
            _ => {}
        }
        let host = u64::from(entry) * SECTOR;
        let stored = if self.compressed {
            marker::GRAIN_DATA as u64
        } else {
            self.grain_len(index)
        };
        if host.saturating_add(stored) > self.file.size() {
            return Err(self.invalid(FormatError::Misplaced {
                structure: "grain",
                index: Some(index),
                offset: host,
            }));
        }
        if self.compressed {
            Ok(Mapping::Compressed {
                host,
                stored: 0,
                in_cluster: in_grain,
                len,
            })
        } else {
            Ok(Mapping::Data {
                host: host + in_grain,
                len,
            })
        }
    }

    /// The contents of the compressed grain `index` stored at `host`, from the one-grain cache
    /// when it was the last one read.
    fn inflated(&self, index: u64, host: u64) -> Result<Arc<[u8]>> {
        if let Some((at, data)) = &self.lock().inflated {
            if *at == host {
                return Ok(Arc::clone(data));
            }
        }
        let data: Arc<[u8]> = open::inflate_grain(self, index, host)?.into();
        self.lock().inflated = Some((host, Arc::clone(&data)));
        Ok(data)
    }

    /// Fills `dst` from virtual `pos` of mapping `m`, a stream's pending grain first.
    fn fill(&self, m: Mapping, pos: u64, dst: &mut [u8]) -> Result<()> {
        let index = pos / self.grain;
        if let Some((pending, data)) = &self.lock().pending {
            if *pending == index {
                let at = (pos % self.grain) as usize;
                dst.copy_from_slice(&data[at..at + dst.len()]);
                return Ok(());
            }
        }
        match m {
            Mapping::Data { host, .. } => self.file.read_at(dst, host),
            Mapping::Compressed {
                host, in_cluster, ..
            } => {
                let data = self.inflated(index, host)?;
                let at = in_cluster as usize;
                dst.copy_from_slice(&data[at..at + dst.len()]);
                Ok(())
            }
            Mapping::Zero { .. } | Mapping::Unallocated { .. } => {
                dst.fill(0);
                Ok(())
            }
        }
    }
}

impl Drop for Vmdk {
    /// Best effort: call [`BlockDevice::flush`] to see errors.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl BlockDevice for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.writer.is_none()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(buf, offset)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_range(offset, len)
    }

    /// Sparse: data → fsync → grain tables → fsync. Stream: the pending grain, then the grain
    /// tables, directory, footer and end-of-stream marker after the last grain → fsync.
    fn flush(&self) -> Result<()> {
        self.flush_metadata()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        read_mapped(
            &self.path,
            buf,
            offset,
            |pos, max| self.map(pos, max),
            |m, pos, dst| self.fill(m, pos, dst),
        )
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let pending = self.lock().pending.as_ref().map(|(index, _)| *index);
        status_mapped(
            &self.path,
            offset,
            end,
            Region::Zero,
            |pos, max| match self.map(pos, max)? {
                Mapping::Unallocated { len } if pending == Some(pos / self.grain) => {
                    Ok(Mapping::Data { host: 0, len })
                }
                m => Ok(m),
            },
        )
    }
}
