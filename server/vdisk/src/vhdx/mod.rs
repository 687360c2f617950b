//! VHDX images (dynamic and fixed), read-only, as [`BlockDevice`]s.
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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

mod log;

use super::{read_mapped, status_mapped, ImageError, Mapping};
use diskferry_blockdev::{check_range, BlockDevice, BlockError, Extent, Region, Result};
use diskferry_layout::le::{le16, le32, le64};

pub const MAGIC: &[u8; 8] = b"vhdxfile";
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_LEN: usize = 64 * KIB as usize;
/// Largest metadata region and BAT accepted (a BAT of 256 MiB maps petabytes).
const MAX_METADATA: u64 = MIB;
const MAX_BAT: u64 = 256 * MIB;
/// Where our images put the log (always empty), the metadata region and the BAT.
const LOG_OFFSET: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const BAT_OFFSET: u64 = 3 * MIB;
const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const VIRTUAL_DISK_ID: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);

// GUIDs as stored on disk (first three fields little-endian).
const BAT_REGION: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_REGION: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);

const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// BAT payload block states.
const BLOCK_NOT_PRESENT: u64 = 0;
const BLOCK_UNDEFINED: u64 = 1;
const BLOCK_ZERO: u64 = 2;
const BLOCK_UNMAPPED: u64 = 3;
const BLOCK_FULLY_PRESENT: u64 = 6;
const BLOCK_PARTIALLY_PRESENT: u64 = 7;

/// CRC32C of `data` with the 4-byte checksum field at `at` taken as zero.
fn checksum(data: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&data[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &data[at + 4..])
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
    /// Opens an image read-only. A log left by a writer that stopped before applying it is
    /// replayed in memory (the file is not changed).
    pub fn open(file: Arc<dyn BlockDevice>, path: &Path) -> std::result::Result<Vhdx, ImageError> {
        let bad = |problem: String| ImageError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        let io = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        let read_from = |file: &dyn BlockDevice,
                         len: usize,
                         at: u64|
         -> std::result::Result<Vec<u8>, ImageError> {
            if at.saturating_add(len as u64) > file.size() {
                return Err(bad(format!(
                    "structure at {at} ({len} bytes) is beyond the end of the file"
                )));
            }
            let mut buf = vec![0u8; len];
            file.read_at(&mut buf, at).map_err(io)?;
            Ok(buf)
        };
        if read_from(&*file, 8, 0)?.as_slice() != MAGIC {
            return Err(bad("not a VHDX image (no vhdxfile identifier)".into()));
        }
        // The current header: a valid checksum and the highest sequence number.
        let mut current: Option<Vec<u8>> = None;
        for at in HEADER_OFFSETS {
            let h = read_from(&*file, 4096, at)?;
            if &h[..4] != b"head" || le32(&h, 4) != checksum(&h, 4) {
                continue;
            }
            if current.as_ref().is_none_or(|c| le64(&h, 8) > le64(c, 8)) {
                current = Some(h);
            }
        }
        let header = current
            .ok_or_else(|| bad("neither header is valid (bad signature or checksum)".into()))?;
        let file = if header[48..64].iter().any(|&b| b != 0) {
            let (log_len, log_at) = (u64::from(le32(&header, 68)), le64(&header, 72));
            if log_len == 0 || log_len % MIB != 0 || log_at % MIB != 0 || log_len > log::MAX_LOG {
                return Err(bad(format!(
                    "the log ({log_len} bytes at {log_at}) is misplaced or absurdly large"
                )));
            }
            let log = read_from(&*file, log_len as usize, log_at)?;
            match log::replay(&log, &header[48..64]).map_err(bad)? {
                Some(replay) if replay.flushed_file_offset > file.size() => {
                    return Err(bad(format!(
                        "the file ends at {} but its log says {} bytes were flushed (truncated?)",
                        file.size(),
                        replay.flushed_file_offset
                    )));
                }
                Some(replay) => Arc::new(log::Replayed::new(file, replay)),
                // A log GUID with no valid entries: nothing was logged that needs replaying.
                None => file,
            }
        } else {
            file
        };
        let read = |len: usize, at: u64| read_from(&*file, len, at);
        let regions = REGION_TABLE_OFFSETS
            .iter()
            .map(|&at| read(REGION_TABLE_LEN, at))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .find(|t| &t[..4] == b"regi" && le32(t, 4) == checksum(t, 4))
            .ok_or_else(|| {
                bad("neither region table is valid (bad signature or checksum)".into())
            })?;
        let count = le32(&regions, 8) as usize;
        if count > (REGION_TABLE_LEN - 16) / 32 {
            return Err(bad(format!("region table claims {count} entries")));
        }
        let (mut bat_region, mut meta_region) = (None, None);
        for i in 0..count {
            let e = &regions[16 + i * 32..16 + (i + 1) * 32];
            let (offset, len, required) =
                (le64(e, 16), u64::from(le32(e, 24)), le32(e, 28) & 1 != 0);
            if offset % MIB != 0 || len % MIB != 0 || offset.saturating_add(len) > file.size() {
                return Err(bad(format!(
                    "region {i} at {offset} (+{len}) is misaligned or beyond the file"
                )));
            }
            match &e[..16] {
                g if g == BAT_REGION => bat_region = Some((offset, len)),
                g if g == METADATA_REGION => meta_region = Some((offset, len)),
                _ if required => return Err(bad(format!("unknown required region {i}"))),
                _ => {}
            }
        }
        let (meta_at, meta_len) = meta_region.ok_or_else(|| bad("no metadata region".into()))?;
        let (bat_at, bat_len) = bat_region.ok_or_else(|| bad("no BAT region".into()))?;
        if meta_len > MAX_METADATA || bat_len > MAX_BAT {
            return Err(bad("metadata region or BAT is absurdly large".into()));
        }
        let meta = read(meta_len as usize, meta_at)?;
        if &meta[..8] != b"metadata" {
            return Err(bad("metadata region has no metadata signature".into()));
        }
        let entries = le16(&meta, 10) as usize;
        if entries > 2047 || 32 + entries * 32 > meta.len() {
            return Err(bad(format!("metadata table claims {entries} entries")));
        }
        let item = |id: &[u8; 16], len: usize| -> std::result::Result<&[u8], ImageError> {
            for i in 0..entries {
                let e = &meta[32 + i * 32..64 + i * 32];
                if &e[..16] == id {
                    let (off, l) = (le32(e, 16) as usize, le32(e, 20) as usize);
                    if l < len || off.saturating_add(len) > meta.len() {
                        return Err(bad(format!("metadata item {i} is out of range")));
                    }
                    return Ok(&meta[off..off + len]);
                }
            }
            Err(bad("a required metadata item is missing".into()))
        };
        let params = item(&FILE_PARAMETERS, 8)?;
        let block_size = u64::from(le32(params, 0));
        if le32(params, 4) & 2 != 0 {
            return Err(ImageError::Unsupported {
                path: path.to_path_buf(),
                feature: "differencing VHDX (has a parent)".into(),
            });
        }
        let size = le64(item(&VIRTUAL_DISK_SIZE, 8)?, 0);
        let logical_sector = le32(item(&LOGICAL_SECTOR_SIZE, 4)?, 0);
        if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(bad(format!(
                "block size {block_size} is not a power of two in 1..=256 MiB"
            )));
        }
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(bad(format!(
                "logical sector size {logical_sector} is neither 512 nor 4096"
            )));
        }
        if size == 0 || size > 64 << 40 || !size.is_multiple_of(u64::from(logical_sector)) {
            return Err(bad(format!("virtual size {size} is out of range")));
        }
        let chunk_ratio = ((1u64 << 23) * u64::from(logical_sector)) / block_size;
        let blocks = size.div_ceil(block_size);
        // Block b is entry b + b / chunk_ratio, so the last block needs this many entries.
        let needed = blocks + (blocks - 1) / chunk_ratio;
        if needed * 8 > bat_len {
            return Err(bad(format!(
                "BAT of {bat_len} bytes cannot map {blocks} blocks"
            )));
        }
        let raw = read((needed * 8) as usize, bat_at)?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let next_free = file.size().div_ceil(MIB) * MIB;
        Ok(Vhdx {
            file,
            path: path.to_path_buf(),
            size,
            block_size,
            logical_sector,
            chunk_ratio,
            bat_offset: bat_at,
            state: Mutex::new(State {
                bat,
                dirty: false,
                next_free,
            }),
            writable: false,
        })
    }

    /// Creates a dynamic VHDX of `size` bytes with `block_size` blocks (a power of two,
    /// 1..=256 MiB) and 512- or 4096-byte logical sectors, in the empty `file`.
    pub fn create(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
        block_size: u64,
        logical_sector: u32,
    ) -> std::result::Result<Vhdx, ImageError> {
        let bad = |problem: String| ImageError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        let io = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(bad(format!(
                "block size {block_size} is not a power of two in 1..=256 MiB"
            )));
        }
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(bad(format!(
                "logical sector size {logical_sector} is neither 512 nor 4096"
            )));
        }
        if size == 0 || size > 64 << 40 || !size.is_multiple_of(u64::from(logical_sector)) {
            return Err(bad(format!(
                "virtual size {size} must be a non-zero multiple of the {logical_sector}-byte sector up to 64 TiB"
            )));
        }
        if file.size() != 0 {
            return Err(bad("the file to create the image in is not empty".into()));
        }
        let chunk_ratio = ((1u64 << 23) * u64::from(logical_sector)) / block_size;
        let blocks = size.div_ceil(block_size);
        let entries = blocks + (blocks - 1) / chunk_ratio;
        let bat_len = (entries * 8).div_ceil(MIB) * MIB;
        let first_block = BAT_OFFSET + bat_len;
        file.resize(first_block).map_err(io)?;

        let mut ident = vec![0u8; 64 * KIB as usize];
        ident[..8].copy_from_slice(MAGIC);
        for (i, unit) in "diskferry".encode_utf16().enumerate() {
            ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
        file.write_at(&ident, 0).map_err(io)?;

        let mut random = [0u8; 48];
        getrandom::fill(&mut random).map_err(|e| bad(format!("no random source: {e}")))?;
        for (i, at) in HEADER_OFFSETS.iter().enumerate() {
            let mut h = vec![0u8; 4096];
            h[..4].copy_from_slice(b"head");
            h[8..16].copy_from_slice(&(i as u64).to_le_bytes()); // sequence number
            h[16..48].copy_from_slice(&random[..32]); // file and data write GUIDs; the log GUID stays zero
            h[66..68].copy_from_slice(&1u16.to_le_bytes()); // version
            h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes()); // log length
            h[72..80].copy_from_slice(&LOG_OFFSET.to_le_bytes());
            let crc = checksum(&h, 4);
            h[4..8].copy_from_slice(&crc.to_le_bytes());
            file.write_at(&h, *at).map_err(io)?;
        }

        let mut regions = vec![0u8; REGION_TABLE_LEN];
        regions[..4].copy_from_slice(b"regi");
        regions[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (id, offset, len)) in [
            (BAT_REGION, BAT_OFFSET, bat_len),
            (METADATA_REGION, METADATA_OFFSET, MIB),
        ]
        .iter()
        .enumerate()
        {
            let e = &mut regions[16 + i * 32..48 + i * 32];
            e[..16].copy_from_slice(id);
            e[16..24].copy_from_slice(&offset.to_le_bytes());
            e[24..28].copy_from_slice(&(*len as u32).to_le_bytes());
            e[28..32].copy_from_slice(&1u32.to_le_bytes()); // required
        }
        let crc = checksum(&regions, 4);
        regions[4..8].copy_from_slice(&crc.to_le_bytes());
        for at in REGION_TABLE_OFFSETS {
            file.write_at(&regions, at).map_err(io)?;
        }

        // Metadata: a table of five items, their values from 64 KiB into the region.
        let mut meta = vec![0u8; 64 * KIB as usize + 4096];
        meta[..8].copy_from_slice(b"metadata");
        let mut params = [0u8; 8];
        params[..4].copy_from_slice(&(block_size as u32).to_le_bytes());
        let items: [([u8; 16], Vec<u8>, u32); 5] = [
            (FILE_PARAMETERS, params.to_vec(), 4),
            (VIRTUAL_DISK_SIZE, size.to_le_bytes().to_vec(), 6),
            (VIRTUAL_DISK_ID, random[32..48].to_vec(), 6),
            (
                LOGICAL_SECTOR_SIZE,
                logical_sector.to_le_bytes().to_vec(),
                6,
            ),
            (PHYSICAL_SECTOR_SIZE, 4096u32.to_le_bytes().to_vec(), 6),
        ];
        meta[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut value_at = 64 * KIB as usize;
        for (i, (id, value, flags)) in items.iter().enumerate() {
            let e = &mut meta[32 + i * 32..64 + i * 32];
            e[..16].copy_from_slice(id);
            e[16..20].copy_from_slice(&(value_at as u32).to_le_bytes());
            e[20..24].copy_from_slice(&(value.len() as u32).to_le_bytes());
            e[24..28].copy_from_slice(&flags.to_le_bytes()); // bit 1: virtual disk, bit 2: required
            meta[value_at..value_at + value.len()].copy_from_slice(value);
            value_at += value.len().next_multiple_of(8);
        }
        file.write_at(&meta, METADATA_OFFSET).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Vhdx {
            file,
            path: path.to_path_buf(),
            size,
            block_size,
            logical_sector,
            chunk_ratio,
            bat_offset: BAT_OFFSET,
            state: Mutex::new(State {
                bat: vec![0; entries as usize],
                dirty: true,
                next_free: first_block,
            }),
            writable: true,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `offset`, all within one block.
    fn write_piece(&self, st: &mut State, offset: u64, data: &[u8]) -> Result<()> {
        let block = offset / self.block_size;
        let in_block = offset % self.block_size;
        let index = (block + block / self.chunk_ratio) as usize;
        let entry = st.bat[index];
        let zero = diskferry_blockdev::is_zero(data);
        let whole = in_block == 0 && data.len() as u64 == self.block_size;
        if entry & 7 == BLOCK_FULLY_PRESENT {
            let host = (entry >> 20) * MIB;
            if zero && whole {
                self.file.discard(host, self.block_size)?;
                st.bat[index] = BLOCK_ZERO;
                st.dirty = true;
                return Ok(());
            }
            return self.file.write_at(data, host + in_block);
        }
        if zero {
            return Ok(()); // not present, zero or unmapped: reads as zeros already
        }
        let host = st.next_free;
        st.next_free += self.block_size;
        self.file.resize(st.next_free)?;
        self.file.write_at(data, host + in_block)?;
        st.bat[index] = BLOCK_FULLY_PRESENT | ((host / MIB) << 20);
        st.dirty = true;
        Ok(())
    }

    /// Applies `op` to each block-sized piece of `offset..offset+len`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut op: impl FnMut(&mut State, u64, u64, usize) -> Result<()>,
    ) -> Result<()> {
        if !self.writable {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        let mut st = self.lock();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let n = (self.block_size - pos % self.block_size).min(len - done);
            op(&mut st, pos, n, done as usize)?;
            done += n;
        }
        Ok(())
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
            .get((block + block / self.chunk_ratio) as usize)
            .copied()
            .unwrap_or(0);
        match entry & 7 {
            BLOCK_FULLY_PRESENT => {
                let host = (entry >> 20) * MIB;
                if host < MIB || host.saturating_add(self.block_size) > self.file.size() {
                    return Err(ImageError::Invalid {
                        path: self.path.clone(),
                        problem: format!("block {block} at {host} is outside the file"),
                    });
                }
                Ok(Mapping::Data {
                    host: host + in_block,
                    len,
                })
            }
            BLOCK_ZERO | BLOCK_UNMAPPED => Ok(Mapping::Zero { len }),
            BLOCK_NOT_PRESENT | BLOCK_UNDEFINED => Ok(Mapping::Unallocated { len }),
            BLOCK_PARTIALLY_PRESENT => Err(ImageError::Unsupported {
                path: self.path.clone(),
                feature: "partially present blocks (differencing images)".into(),
            }),
            state => Err(ImageError::Invalid {
                path: self.path.clone(),
                problem: format!("block {block} has unknown state {state}"),
            }),
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
        self.for_each_piece(offset, buf.len() as u64, |st, pos, n, at| {
            self.write_piece(st, pos, &buf[at..at + n as usize])
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; self.block_size.min(len) as usize];
        self.for_each_piece(offset, len, |st, pos, n, _| {
            self.write_piece(st, pos, &zeros[..n as usize])
        })
    }

    /// Data → fsync → BAT → fsync.
    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        self.file.flush()?;
        if st.dirty {
            let raw: Vec<u8> = st.bat.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.file.write_at(&raw, self.bat_offset)?;
            self.file.flush()?;
            st.dirty = false;
        }
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        read_mapped(
            &self.path,
            buf,
            offset,
            |pos, max| self.map(pos, max),
            |m, _, dst| match m {
                Mapping::Data { host, .. } => self.file.read_at(dst, host),
                _ => {
                    dst.fill(0);
                    Ok(())
                }
            },
        )
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        status_mapped(&self.path, offset, end, Region::Zero, |pos, max| {
            self.map(pos, max)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;
    use rand::{Rng, SeedableRng};

    #[test]
    fn random_writes_zeros_and_discards_match_a_reference_and_reopen() {
        let size = 40usize << 20;
        let file = Arc::new(MemoryDevice::new(0));
        let path = Path::new("m.vhdx");
        let image = Vhdx::create(file.clone(), path, size as u64, MIB, 4096).unwrap();
        let mut reference = vec![0u8; size];
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for _ in 0..2000 {
            let len = if rng.gen_bool(0.2) {
                MIB as usize
            } else {
                rng.gen_range(1..300_000)
            };
            let offset = if len == MIB as usize {
                rng.gen_range(0..40) * MIB as usize
            } else {
                rng.gen_range(0..size - len)
            };
            let len = len.min(size - offset);
            match rng.gen_range(0..10) {
                0..=6 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    image.write_at(&data, offset as u64).unwrap();
                    reference[offset..offset + len].copy_from_slice(&data);
                }
                7 => {
                    image.write_at(&vec![0; len], offset as u64).unwrap();
                    reference[offset..offset + len].fill(0);
                }
                _ => {
                    image.discard(offset as u64, len as u64).unwrap();
                    reference[offset..offset + len].fill(0);
                }
            }
        }
        let mut got = vec![0u8; size];
        image.read_at(&mut got, 0).unwrap();
        assert!(got == reference, "in-memory view differs");
        image.flush().unwrap();
        drop(image);
        let reopened = Vhdx::open(file, path).unwrap();
        reopened.read_at(&mut got, 0).unwrap();
        assert!(got == reference, "reopened image differs");
    }
}
