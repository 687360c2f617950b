//! Creating and writing VHDs. Sizes are rounded up to a geometry that covers them, as qemu-img
//! rounds them, so qemu (which sizes by geometry) and Hyper-V (by the footer) agree. A fixed
//! disk is written in place. A dynamic disk's blocks are appended, each with a sector bitmap of
//! all ones; all-zero writes never allocate, and zeroing a whole block frees it (the BAT entry
//! goes back to unused and its space is punched out); the BAT and the footer at the end reach
//! the file at flush, after the data is synced. The footer copy at the start, written last at
//! creation, is the commit point of a new dynamic disk.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ondisk::{bat, bitmap_len, dynamic, footer, seal, Chs, BLOCK_SIZE, CREATOR_APP, SECTOR};
use super::open::MAX_SIZE;
use super::{Layout, State, Vhd};
use crate::error::{check_parameter, AtPath};
use crate::{Allowed, CreateError, ImageError};
use diskferry_blockdev::{check_range, is_zero, BlockDevice, BlockError, Result};

/// Where our dynamic disks put the dynamic header and the BAT.
const HEADER_OFFSET: u64 = 512;
const BAT_OFFSET: u64 = 1536;

/// The geometry and virtual size of a new image of at least `size` bytes: the first geometry
/// (trying ever more sectors) that covers the size, and exactly its sectors — or, past what a
/// geometry can describe, the largest geometry and the size itself. As qemu-img computes it.
pub fn geometry_for(size: u64) -> std::result::Result<(Chs, u64), CreateError> {
    let sectors = size.div_ceil(SECTOR);
    check_parameter(
        "virtual disk size",
        sectors * SECTOR,
        Allowed::Range {
            min: SECTOR,
            max: MAX_SIZE,
        },
    )?;
    let wanted = sectors.min(Chs::MAX.total_sectors());
    // Each geometry covers all but less than one cylinder (≤ 16 × 255 sectors) of its input.
    let chs = (wanted..wanted + (1 << 16))
        .map(Chs::for_sectors)
        .find(|chs| chs.total_sectors() >= wanted)
        .unwrap_or(Chs::MAX);
    if chs == Chs::MAX {
        Ok((chs, sectors * SECTOR))
    } else {
        Ok((chs, chs.total_sectors() * SECTOR))
    }
}

impl Vhd {
    /// Creates a VHD of at least `size` bytes (see [`geometry_for`]) in the empty `file`:
    /// dynamic (2 MiB blocks) or fixed.
    pub fn create(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
        fixed: bool,
    ) -> std::result::Result<Vhd, ImageError> {
        let (chs, size) = geometry_for(size).at(path)?;
        if file.size() != 0 {
            return Err(CreateError::NotEmpty).at(path);
        }
        let foot = new_footer(chs, size, fixed).at(path)?;
        let (layout, bat, end) = if fixed {
            (Layout::Fixed, Vec::new(), size)
        } else {
            let entries = size.div_ceil(BLOCK_SIZE);
            let layout = Layout::Dynamic {
                block_size: BLOCK_SIZE,
                bitmap_len: bitmap_len(BLOCK_SIZE),
                bat_offset: BAT_OFFSET,
            };
            let first = first_block(BAT_OFFSET + entries * bat::ENTRY_LEN);
            (layout, vec![bat::UNUSED; entries as usize], first)
        };
        let image = Vhd {
            file,
            path: path.to_path_buf(),
            size,
            layout,
            footer: foot,
            state: Mutex::new(State {
                bat,
                dirty: true,
                next_free: end,
            }),
            writable: true,
        };
        image.write_structures().at(path)?;
        Ok(image)
    }

    /// The file's size and fixed structures: the footer at the end, and for a dynamic disk
    /// the dynamic header, the BAT and, once those are synced, the footer copy at 0.
    fn write_structures(&self) -> Result<()> {
        let end = self.lock().next_free;
        self.file.resize(end + footer::LEN as u64)?;
        self.file.write_at(&self.footer, end)?;
        if let Layout::Dynamic {
            block_size,
            bat_offset,
            ..
        } = self.layout
        {
            let entries = self.lock().bat.len();
            self.file
                .write_at(&dynamic_header(entries, block_size), HEADER_OFFSET)?;
            let table = vec![0xff; entries * bat::ENTRY_LEN as usize];
            self.file.write_at(&table, bat_offset)?;
            self.file.flush()?;
            self.file.write_at(&self.footer, 0)?;
        }
        self.lock().dirty = false;
        self.file.flush()
    }

    /// Writes `data` at `offset`, all within one block of a dynamic disk.
    fn write_piece(&self, st: &mut State, offset: u64, data: &[u8]) -> Result<()> {
        let Layout::Dynamic {
            block_size,
            bitmap_len,
            ..
        } = self.layout
        else {
            return self.write_fixed(data, offset);
        };
        let block = (offset / block_size) as usize;
        let in_block = offset % block_size;
        let zero = is_zero(data);
        let whole = in_block == 0 && data.len() as u64 == block_size;
        let entry = st.bat[block];
        if entry != bat::UNUSED {
            let start = u64::from(entry) * SECTOR;
            if zero && whole {
                self.file.discard(start, bitmap_len + block_size)?;
                st.bat[block] = bat::UNUSED;
                st.dirty = true;
                return Ok(());
            }
            return self.file.write_at(data, start + bitmap_len + in_block);
        }
        if zero {
            return Ok(()); // unused blocks read as zeros already
        }
        let start = st.next_free;
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != bat::UNUSED)
            .ok_or(BlockError::Unsupported("grow a VHD past 2 TiB of file"))?;
        st.next_free += bitmap_len + block_size;
        self.file.resize(st.next_free + footer::LEN as u64)?;
        self.file
            .write_at(&vec![0xff; bitmap_len as usize], start)?;
        self.file.write_at(data, start + bitmap_len + in_block)?;
        st.bat[block] = sector;
        st.dirty = true;
        Ok(())
    }

    fn write_fixed(&self, data: &[u8], offset: u64) -> Result<()> {
        if is_zero(data) {
            self.file.write_zeroes(offset, data.len() as u64)
        } else {
            self.file.write_at(data, offset)
        }
    }

    /// Writes `data` (zeros when `None`) block by block (in one piece for a fixed VHD).
    fn write_blocks(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        if !self.writable {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        let unit = self.block_size().unwrap_or(len.max(1));
        let mut st = self.lock();
        crate::write_units(offset, len, unit, data, |pos, bytes| {
            self.write_piece(&mut st, pos, bytes)
        })
    }

    pub(super) fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_blocks(offset, buf.len() as u64, Some(buf))
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.is_fixed() {
            check_range(self.size, offset, len)?;
            return self.file.write_zeroes(offset, len);
        }
        self.write_blocks(offset, len, None)
    }

    /// Data → fsync → BAT and the footer at the end → fsync.
    pub(super) fn flush_metadata(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        self.file.flush()?;
        if let (true, Layout::Dynamic { bat_offset, .. }) = (st.dirty, self.layout) {
            let raw: Vec<u8> = st.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_at(&raw, bat_offset)?;
            self.file.write_at(&self.footer, st.next_free)?;
            self.file.flush()?;
            st.dirty = false;
        }
        Ok(())
    }
}

/// Where the first block's bitmap goes after a BAT ending at `bat_end`: so that block data
/// starts 4 KiB aligned.
fn first_block(bat_end: u64) -> u64 {
    (bat_end + SECTOR).next_multiple_of(4096) - SECTOR
}

/// A new footer for a disk of `size` bytes with geometry `chs`.
fn new_footer(chs: Chs, size: u64, fixed: bool) -> std::result::Result<Vec<u8>, CreateError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(CreateError::Random)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut f = vec![0u8; footer::LEN];
    footer::COOKIE.set(&mut f, footer::COOKIE_VALUE);
    footer::FEATURES.set(&mut f, footer::FEATURES_RESERVED);
    footer::VERSION.set(&mut f, footer::VERSION_1_0);
    footer::DATA_OFFSET.set(&mut f, if fixed { u64::MAX } else { HEADER_OFFSET });
    footer::TIMESTAMP.set(&mut f, now.saturating_sub(footer::EPOCH) as u32);
    footer::CREATOR_APP.set(&mut f, CREATOR_APP);
    footer::CREATOR_VERSION.set(&mut f, 0x0001_0000);
    footer::CREATOR_OS.set(&mut f, b"Lnux");
    footer::ORIGINAL_SIZE.set(&mut f, size);
    footer::CURRENT_SIZE.set(&mut f, size);
    footer::CYLINDERS.set(&mut f, chs.cylinders);
    footer::HEADS.set(&mut f, chs.heads);
    footer::SECTORS_PER_TRACK.set(&mut f, chs.sectors);
    let kind = if fixed {
        footer::TYPE_FIXED
    } else {
        footer::TYPE_DYNAMIC
    };
    footer::DISK_TYPE.set(&mut f, kind);
    footer::UNIQUE_ID.set(&mut f, &id);
    seal(&mut f, footer::CHECKSUM);
    Ok(f)
}

/// The dynamic disk header of a disk with `entries` BAT entries of `block_size` blocks.
fn dynamic_header(entries: usize, block_size: u64) -> Vec<u8> {
    let mut h = vec![0u8; dynamic::LEN];
    dynamic::COOKIE.set(&mut h, dynamic::COOKIE_VALUE);
    dynamic::DATA_OFFSET.set(&mut h, u64::MAX);
    dynamic::TABLE_OFFSET.set(&mut h, BAT_OFFSET);
    dynamic::VERSION.set(&mut h, 0x0001_0000);
    dynamic::MAX_TABLE_ENTRIES.set(&mut h, entries as u32);
    dynamic::BLOCK_SIZE.set(&mut h, block_size as u32);
    seal(&mut h, dynamic::CHECKSUM);
    h
}
