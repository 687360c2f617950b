//! VHDX images as [`BlockDevice`]s: read dynamic and fixed ones, create and write dynamic
//! ones. [`ondisk`] holds the on-disk tables; `open.rs` reads, `create.rs` lays out a new image,
//! `write.rs` writes blocks and the BAT, [`log`] replays a log in memory.
//!
//! Opening checks the file identifier, picks the current header (valid CRC32C, highest
//! sequence number), checks a region table (CRC32C), reads the metadata items it needs and the
//! BAT. Payload BAT entries are interleaved with sector-bitmap entries: after every
//! `chunk_ratio` payload entries comes one bitmap entry, so block `b` is entry
//! `b + b / chunk_ratio`. Everything read from the file is bounded and checked before use.
//! A log still to replay is replayed in memory (see [`log`]); differencing images are refused
//! with the reason.
//!
//! Writing (images we create): payload blocks are appended at the end of the file, 1 MiB
//! aligned; all-zero writes never allocate (whole blocks become the ZERO state and their space
//! is punched out); the BAT reaches the file at flush, after the data is synced. Our images
//! always have an empty log.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

mod create;
pub(crate) mod log;
pub mod ondisk;
mod open;
mod write;

use super::{read_stored, status_mapped, FormatError, ImageError, Mapping};
use crate::Allowed;
use diskferry_blockdev::{BlockDevice, Extent, Region, Result};
use ondisk::{bat, MIB};

pub const MAGIC: &[u8; 8] = ondisk::ident::SIGNATURE_VALUE;

/// Block size, logical sector size and virtual size: what the metadata region says about the
/// disk, and what follows from it for the BAT.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    size: u64,
    block_size: u64,
    logical_sector: u32,
}

impl Geometry {
    /// The field and value that break the specification's rules, if one does.
    fn check(&self) -> std::result::Result<(), (&'static str, u64, Allowed)> {
        let sector = u64::from(self.logical_sector);
        let rules = [
            (
                "block size",
                self.block_size,
                Allowed::PowerOfTwo {
                    min: MIB,
                    max: 256 * MIB,
                },
            ),
            ("logical sector size", sector, Allowed::OneOf(&[512, 4096])),
            (
                "virtual disk size",
                self.size,
                Allowed::Range {
                    min: 1,
                    max: 64 << 40,
                },
            ),
            ("virtual disk size", self.size, Allowed::MultipleOf(sector)),
        ];
        match rules
            .into_iter()
            .find(|(_, value, rule)| !rule.admits(*value))
        {
            Some(broken) => Err(broken),
            None => Ok(()),
        }
    }

    fn chunk_ratio(&self) -> u64 {
        bat::chunk_ratio(self.logical_sector, self.block_size)
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    fn bat_entries(&self) -> u64 {
        bat::entries(self.blocks(), self.chunk_ratio())
    }
}

/// An open VHDX image.
pub struct Vhdx {
    file: Arc<dyn BlockDevice>,
    path: PathBuf,
    size: u64,
    block_size: u64,
    logical_sector: u32,
    chunk_ratio: u64,
    bat_offset: u64,
    state: Mutex<State>,
    writable: bool,
}

/// The BAT (ahead of the file until a flush when writing) and where the next block goes.
struct State {
    bat: Vec<u64>,
    dirty: bool,
    next_free: u64,
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Vhdx {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Where `offset..offset+max` (up to the end of its block) lives.
    pub fn map(&self, offset: u64, max: u64) -> std::result::Result<Mapping, ImageError> {
        let block = offset / self.block_size;
        let in_block = offset % self.block_size;
        let len = (self.block_size - in_block)
            .min(max)
            .min(self.size.saturating_sub(offset));
        let entry = self
            .lock()
            .bat
            .get(bat::index(block, self.chunk_ratio) as usize)
            .copied()
            .unwrap_or(0);
        let invalid = |problem| ImageError::Invalid {
            path: self.path.clone(),
            problem,
        };
        match bat::state(entry) {
            bat::FULLY_PRESENT => {
                let host = bat::file_offset(entry);
                if host < MIB || host.saturating_add(self.block_size) > self.file.size() {
                    return Err(invalid(FormatError::Misplaced {
                        structure: "block",
                        index: Some(block),
                        offset: host,
                    }));
                }
                Ok(Mapping::Data {
                    host: host + in_block,
                    len,
                })
            }
            bat::ZERO | bat::UNMAPPED => Ok(Mapping::Zero { len }),
            bat::NOT_PRESENT | bat::UNDEFINED => Ok(Mapping::Unallocated { len }),
            bat::PARTIALLY_PRESENT => Err(ImageError::Unsupported {
                path: self.path.clone(),
                feature: "partially present blocks (differencing images)".into(),
            }),
            state => Err(invalid(FormatError::UnknownBlockState { block, state })),
        }
    }
}

impl Drop for Vhdx {
    /// Best effort: call [`BlockDevice::flush`] to see errors.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl BlockDevice for Vhdx {
    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical_sector
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

    /// Data → fsync → BAT → fsync.
    fn flush(&self) -> Result<()> {
        self.flush_bat()
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
        status_mapped(&self.path, offset, end, Region::Zero, |pos, max| {
            self.map(pos, max)
        })
    }
}
