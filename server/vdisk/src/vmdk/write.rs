//! Creating and writing VMDKs, laid out as qemu-img and VMware lay them out: the header, the
//! embedded descriptor at sector 1, then
//!
//! - **monolithicSparse**: the redundant grain directory and its tables, the grain directory
//!   and its tables (all tables preallocated, so the directories never change), grains of
//!   64 KiB appended from a 64 KiB boundary. All-zero writes never allocate; zeroing a whole
//!   grain frees it. Changed grain tables (both copies) reach the file at flush, after the
//!   data is synced; the header, written last at creation, is the commit point.
//! - **streamOptimized**: the header says "directory at the end"; each grain is stored once
//!   it is complete (or at flush), zlib-compressed behind a grain marker, appended in the
//!   order written. A flush writes, after the last grain, a marker and table for each grain
//!   table in use, the grain directory, the footer (the header with the directory's offset)
//!   and the end-of-stream marker; the next grain overwrites them, so the file is a valid
//!   stream after every flush and only then. A grain written again is stored again and the
//!   old copy left unreferenced.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ondisk::{
    descriptor, gte, header, marker, DESCRIPTOR_OFFSET, DESCRIPTOR_SECTORS, GRAIN_SECTORS,
    GTES_PER_GT, SECTOR,
};
use super::open::Params;
use super::{State, Vmdk};
use crate::error::{check_parameter, AtPath};
use crate::{Allowed, CreateError, ImageError};
use diskferry_blockdev::{check_range, is_zero, BlockDevice, BlockError, Result};

/// Sectors of one grain table.
const GT_SECTORS: u64 = GTES_PER_GT * gte::LEN / SECTOR;

/// How an image we create is written.
pub(super) enum Writer {
    /// Where the first grain table of each copy (primary, redundant) lies, in sectors.
    Sparse { tables: [u64; 2] },
    /// The header, which the footer repeats.
    Stream { header: Vec<u8> },
}

impl Vmdk {
    /// Creates a monolithicSparse VMDK of `size` bytes (whole sectors) in the empty `file`.
    pub fn create_sparse(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
    ) -> std::result::Result<Vmdk, ImageError> {
        let p = new_params(&*file, size, false).at(path)?;
        let gd_sectors = (p.gd_entries() * gte::LEN).div_ceil(SECTOR);
        let rgd = DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS;
        let gd = rgd + gd_sectors + p.gd_entries() * GT_SECTORS;
        let overhead = (gd + gd_sectors + p.gd_entries() * GT_SECTORS).next_multiple_of(128);
        let h = new_header(&p, rgd, gd, overhead);
        file.resize(overhead * SECTOR).at(path)?;
        write_descriptor(&*file, path, &p, "monolithicSparse").at(path)?;
        for dir in [rgd, gd] {
            let entries: Vec<u8> = (0..p.gd_entries())
                .flat_map(|i| ((dir + gd_sectors + i * GT_SECTORS) as u32).to_le_bytes())
                .collect();
            file.write_at(&entries, dir * SECTOR).at(path)?;
        }
        file.flush().at(path)?;
        file.write_at(&h, 0).at(path)?;
        file.flush().at(path)?;
        let writer = Writer::Sparse {
            tables: [gd + gd_sectors, rgd + gd_sectors],
        };
        Ok(new_image(file, path, &p, overhead * SECTOR, writer))
    }

    /// Creates a streamOptimized VMDK of `size` bytes (whole sectors) in the empty `file`.
    pub fn create_stream(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
    ) -> std::result::Result<Vmdk, ImageError> {
        let p = new_params(&*file, size, true).at(path)?;
        let overhead = GRAIN_SECTORS;
        let h = new_header(&p, 0, header::GD_AT_END, overhead);
        file.resize(overhead * SECTOR).at(path)?;
        write_descriptor(&*file, path, &p, "streamOptimized").at(path)?;
        file.write_at(&h, 0).at(path)?;
        let writer = Writer::Stream { header: h };
        let image = new_image(file, path, &p, overhead * SECTOR, writer);
        image.flush_metadata().at(path)?;
        Ok(image)
    }

    /// Sets grain `index`'s entry, marking its table for the next flush.
    fn set_entry(&self, st: &mut State, index: u64, value: u32) {
        let t = (index / self.gtes_per_gt) as usize;
        let per_table = self.gtes_per_gt as usize;
        let table = st.tables[t].get_or_insert_with(|| vec![0; per_table].into());
        table[(index % self.gtes_per_gt) as usize] = value;
        if !st.dirty.contains(&t) {
            st.dirty.push(t);
        }
    }

    /// Writes `data` at `offset`, all within one grain.
    fn write_piece(&self, st: &mut State, offset: u64, data: &[u8]) -> Result<()> {
        match &self.writer {
            Some(Writer::Sparse { .. }) => self.write_sparse(st, offset, data),
            Some(Writer::Stream { .. }) => self.write_stream(st, offset, data),
            None => Err(BlockError::ReadOnly),
        }
    }

    fn write_sparse(&self, st: &mut State, offset: u64, data: &[u8]) -> Result<()> {
        let index = offset / self.grain;
        let in_grain = offset % self.grain;
        let entry = st.entry(index, self.gtes_per_gt);
        let zero = is_zero(data);
        if entry != gte::UNALLOCATED {
            let host = u64::from(entry) * SECTOR;
            if zero && in_grain == 0 && data.len() as u64 == self.grain_len(index) {
                self.file.discard(host, self.grain)?;
                self.set_entry(st, index, gte::UNALLOCATED);
                return Ok(());
            }
            return self.file.write_at(data, host + in_grain);
        }
        if zero {
            return Ok(()); // unallocated grains read as zeros already
        }
        let host = st.next_free;
        let sector = sector_of(host)?;
        st.next_free += self.grain;
        self.file.resize(st.next_free)?;
        self.file.write_at(data, host + in_grain)?;
        self.set_entry(st, index, sector);
        Ok(())
    }

    fn write_stream(&self, st: &mut State, offset: u64, data: &[u8]) -> Result<()> {
        let index = offset / self.grain;
        let in_grain = (offset % self.grain) as usize;
        if st.pending.as_ref().is_some_and(|(p, _)| *p != index) {
            self.seal_pending(st)?;
        }
        if let Some((_, buf)) = st.pending.as_mut() {
            buf[in_grain..in_grain + data.len()].copy_from_slice(data);
            return Ok(());
        }
        if in_grain == 0 && data.len() as u64 == self.grain_len(index) {
            return self.store_grain(st, index, data);
        }
        let mut buf = match st.entry(index, self.gtes_per_gt) {
            gte::UNALLOCATED => vec![0; self.grain_len(index) as usize],
            entry => {
                let mut g = super::open::inflate_grain(self, index, u64::from(entry) * SECTOR)?;
                g.truncate(self.grain_len(index) as usize);
                g
            }
        };
        buf[in_grain..in_grain + data.len()].copy_from_slice(data);
        st.pending = Some((index, buf));
        Ok(())
    }

    fn seal_pending(&self, st: &mut State) -> Result<()> {
        match st.pending.take() {
            Some((index, buf)) => self.store_grain(st, index, &buf),
            None => Ok(()),
        }
    }

    /// Appends grain `index` compressed behind its marker (an all-zero grain is left
    /// unallocated instead).
    fn store_grain(&self, st: &mut State, index: u64, data: &[u8]) -> Result<()> {
        if is_zero(data) {
            if st.entry(index, self.gtes_per_gt) != gte::UNALLOCATED {
                self.set_entry(st, index, gte::UNALLOCATED);
            }
            return Ok(());
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        let compressed = z
            .write_all(data)
            .and_then(|()| z.finish())
            .map_err(|source| BlockError::Io {
                op: "compress a grain",
                offset: Some(index * self.grain),
                device: self.path.display().to_string(),
                source,
            })?;
        let mut out = vec![0u8; marker::GRAIN_DATA];
        marker::VALUE.set(&mut out, index * self.grain / SECTOR);
        marker::SIZE.set(&mut out, compressed.len() as u32);
        out.extend_from_slice(&compressed);
        out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
        let host = st.next_free;
        let sector = sector_of(host)?;
        let end = host + out.len() as u64;
        if end > self.file.size() {
            self.file.resize(end)?;
        }
        self.file.write_at(&out, host)?;
        st.next_free += out.len() as u64;
        self.set_entry(st, index, sector);
        Ok(())
    }

    /// Writes `data` (zeros when `None`) grain by grain.
    fn write_grains(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        if self.writer.is_none() {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        let mut st = self.lock();
        crate::write_units(offset, len, self.grain, data, |pos, bytes| {
            self.write_piece(&mut st, pos, bytes)
        })
    }

    pub(super) fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_grains(offset, buf.len() as u64, Some(buf))
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        self.write_grains(offset, len, None)
    }

    /// Sparse: data → fsync → changed grain tables (both copies) → fsync. Stream: the pending
    /// grain, then the metadata after the last grain → fsync.
    pub(super) fn flush_metadata(&self) -> Result<()> {
        let mut st = self.lock();
        match &self.writer {
            None => Ok(()),
            Some(Writer::Sparse { tables }) => self.flush_sparse(&mut st, *tables),
            Some(Writer::Stream { header }) => {
                self.seal_pending(&mut st)?;
                let tail = stream_tail(&st, header, st.next_free);
                sector_of(st.next_free + tail.len() as u64)?;
                self.file.resize(st.next_free + tail.len() as u64)?;
                self.file.write_at(&tail, st.next_free)?;
                st.dirty.clear();
                self.file.flush()
            }
        }
    }

    fn flush_sparse(&self, st: &mut State, tables: [u64; 2]) -> Result<()> {
        self.file.flush()?;
        if st.dirty.is_empty() {
            return Ok(());
        }
        for &t in &st.dirty {
            let Some(table) = &st.tables[t] else { continue };
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
            for first in tables {
                self.file
                    .write_at(&raw, (first + t as u64 * GT_SECTORS) * SECTOR)?;
            }
        }
        self.file.flush()?;
        st.dirty.clear();
        Ok(())
    }
}

/// The sector of `host` as a grain table entry holds it.
fn sector_of(host: u64) -> Result<u32> {
    u32::try_from(host / SECTOR)
        .map_err(|_| BlockError::Unsupported("grow a VMDK extent past 2 TiB of file"))
}

/// Checked parameters of a new image of `size` bytes in the empty `file`.
fn new_params(
    file: &dyn BlockDevice,
    size: u64,
    compressed: bool,
) -> std::result::Result<Params, CreateError> {
    let capacity = size.div_ceil(SECTOR);
    check_parameter(
        "virtual disk size",
        capacity * SECTOR,
        Allowed::Range {
            min: SECTOR,
            max: (1 << 32) * SECTOR,
        },
    )?;
    if file.size() != 0 {
        return Err(CreateError::NotEmpty);
    }
    Ok(Params {
        capacity,
        grain_sectors: GRAIN_SECTORS,
        gtes_per_gt: GTES_PER_GT,
        gd_offset: 0,
        compressed,
        zero_grain: false,
    })
}

fn new_image(file: Arc<dyn BlockDevice>, path: &Path, p: &Params, end: u64, w: Writer) -> Vmdk {
    Vmdk {
        file,
        path: path.to_path_buf(),
        size: p.capacity * SECTOR,
        grain: p.grain_sectors * SECTOR,
        gtes_per_gt: p.gtes_per_gt,
        zero_grain: false,
        compressed: p.compressed,
        state: Mutex::new(State {
            tables: vec![None; p.gd_entries() as usize],
            dirty: Vec::new(),
            next_free: end,
            inflated: None,
            pending: None,
        }),
        writer: Some(w),
    }
}

/// A header for `p` with the redundant and primary grain directories at `rgd` and `gd` and
/// grains from sector `overhead`.
fn new_header(p: &Params, rgd: u64, gd: u64, overhead: u64) -> Vec<u8> {
    let mut h = vec![0u8; header::LEN];
    let (version, flags) = if p.compressed {
        let f = header::FLAG_COMPRESSED | header::FLAG_MARKERS;
        (3, header::FLAG_NEWLINE_CHECK | f)
    } else {
        (1, header::FLAG_NEWLINE_CHECK | header::FLAG_REDUNDANT_GT)
    };
    header::MAGIC.set(&mut h, header::MAGIC_VALUE);
    header::VERSION.set(&mut h, version);
    header::FLAGS.set(&mut h, flags);
    header::CAPACITY.set(&mut h, p.capacity);
    header::GRAIN_SIZE.set(&mut h, p.grain_sectors);
    header::DESCRIPTOR_OFFSET.set(&mut h, DESCRIPTOR_OFFSET);
    header::DESCRIPTOR_SIZE.set(&mut h, DESCRIPTOR_SECTORS);
    header::GTES_PER_GT.set(&mut h, p.gtes_per_gt as u32);
    header::RGD_OFFSET.set(&mut h, rgd);
    header::GD_OFFSET.set(&mut h, gd);
    header::OVERHEAD.set(&mut h, overhead);
    header::NEWLINE_CHECK.set(&mut h, header::NEWLINE_CHECK_VALUE);
    let algorithm = if p.compressed {
        header::COMPRESS_DEFLATE
    } else {
        0
    };
    header::COMPRESS_ALGORITHM.set(&mut h, algorithm);
    h
}

/// The embedded descriptor, naming the image by its final file name (without the `.partial`
/// it is written under; quotes and control characters replaced).
fn write_descriptor(
    file: &dyn BlockDevice,
    path: &Path,
    p: &Params,
    create_type: &str,
) -> std::result::Result<(), BlockError> {
    let mut cid = [0u8; 4];
    getrandom::fill(&mut cid).map_err(|e| BlockError::Io {
        op: "generate a content id",
        offset: None,
        device: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = name
        .strip_suffix(".partial")
        .unwrap_or(&name)
        .chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect();
    let text = descriptor(u32::from_le_bytes(cid), create_type, p.capacity, &name);
    let mut raw = text.into_bytes();
    raw.truncate((DESCRIPTOR_SECTORS * SECTOR) as usize);
    file.write_at(&raw, DESCRIPTOR_OFFSET * SECTOR)
}

/// A metadata marker of `kind` for `sectors` sectors.
fn metadata_marker(sectors: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; marker::LEN];
    marker::VALUE.set(&mut m, sectors);
    marker::TYPE.set(&mut m, kind);
    m
}

/// What follows a stream's last grain (which ends at `at`): each grain table in use behind its
/// marker, the grain directory behind its marker, the footer behind its marker, and the
/// end-of-stream marker.
fn stream_tail(st: &State, header_copy: &[u8], at: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut directory = Vec::with_capacity(st.tables.len() * 4);
    for table in &st.tables {
        let used = table.as_ref().filter(|t| t.iter().any(|&e| e != 0));
        let Some(t) = used else {
            directory.extend_from_slice(&0u32.to_le_bytes());
            continue;
        };
        out.extend(metadata_marker(GT_SECTORS, marker::GRAIN_TABLE));
        let sector = (at + out.len() as u64) / SECTOR;
        directory.extend_from_slice(&(sector as u32).to_le_bytes());
        out.extend(t.iter().flat_map(|e| e.to_le_bytes()));
        out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
    }
    let gd_sectors = (directory.len() as u64).div_ceil(SECTOR);
    out.extend(metadata_marker(gd_sectors, marker::GRAIN_DIRECTORY));
    let gd_sector = (at + out.len() as u64) / SECTOR;
    directory.resize((gd_sectors * SECTOR) as usize, 0);
    out.extend(directory);
    out.extend(metadata_marker(1, marker::FOOTER));
    let mut footer = header_copy.to_vec();
    header::GD_OFFSET.set(&mut footer, gd_sector);
    out.extend(footer);
    out.extend(vec![0u8; marker::LEN]);
    out
}
