//! A reader for FAT12, FAT16 and FAT32 of our own: the BPB, the allocation table (read once,
//! bounded), cluster chains with loop detection, directories with long file names (checked
//! against their short name's checksum), file contents, extents and the allocation map.
//!
//! Why not the `fatfs` crate for reading: version 0.3 hides each file's first cluster (so no
//! extents and no allocation map), needs a writable device, and is not `Sync`. The FAT
//! *writer* is built on `fatfs`.
//!
//! FAT has no inode numbers: a file's [`NodeId`] is the byte offset of its 32-byte directory
//! entry in the volume, and the root directory is node 0. Times are stored in local time
//! without a zone; they are reported as if UTC.

use std::sync::Arc;

use super::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId,
    Result, Timestamp, VolumeInfo,
};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::le::{le16, le32};

const ROOT: NodeId = 0;
/// Most clusters accepted (FAT32 allows 2^28).
const MAX_CLUSTERS: u64 = 1 << 28;
/// Most entries read from one directory (FAT allows 65536).
const MAX_DIR_ENTRIES: usize = 65536;

const ATTR_READ_ONLY: u8 = 0x01;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LFN: u8 = 0x0F;

/// A FAT volume opened for reading.
pub struct Fat {
    dev: Arc<dyn BlockDevice>,
    kind: FsKind,
    bytes_per_sector: u64,
    cluster_size: u64,
    /// Byte offsets of the fixed root directory (FAT12/16) and of cluster 2.
    root_dir: (u64, u64),
    data_start: u64,
    root_cluster: u32,
    /// The allocation table, one entry per cluster (entries 0 and 1 are reserved).
    table: Vec<u32>,
    total_bytes: u64,
    serial: u32,
    label: String,
}

/// A parsed short directory entry and its long name.
struct RawEntry {
    offset: u64,
    name: Vec<u8>,
    attr: u8,
    first_cluster: u32,
    size: u32,
    raw: [u8; 32],
}

impl Fat {
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Fat> {
        let corrupt = |what: String| FsError::Corrupt("FAT boot sector".into(), what);
        let mut b = vec![0u8; 512];
        if dev.size() < 512 {
            return Err(corrupt("the device is too small".into()));
        }
        dev.read_at(&mut b, 0)?;
        let kind = super::detect::classify(&{
            let mut c = vec![0u8; 68 * 1024];
            c[..512].copy_from_slice(&b);
            c
        });
        if !matches!(kind, FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32) {
            return Err(corrupt("no FAT boot sector".into()));
        }
        let bps = u64::from(le16(&b, 11));
        let spc = u64::from(b[13]);
        let reserved = u64::from(le16(&b, 14));
        let fats = u64::from(b[16]);
        let root_entries = u64::from(le16(&b, 17));
        let total = match le16(&b, 19) {
            0 => u64::from(le32(&b, 32)),
            n => u64::from(n),
        };
        let fat_sectors = match le16(&b, 22) {
            0 => u64::from(le32(&b, 36)),
            n => u64::from(n),
        };
        let root_dir_sectors = (root_entries * 32).div_ceil(bps);
        let root_at = (reserved + fats * fat_sectors) * bps;
        let data_start = root_at + root_dir_sectors * bps;
        let cluster_size = bps * spc;
        if total * bps > dev.size() || data_start >= total * bps {
            return Err(corrupt(format!(
                "{total} sectors of {bps} bytes with data from byte {data_start} do not fit the {}-byte device",
                dev.size()
            )));
        }
        let clusters = (total * bps - data_start) / cluster_size;
        if clusters > MAX_CLUSTERS {
            return Err(corrupt(format!(
                "{clusters} clusters is more than FAT allows"
            )));
        }
        let entries = clusters + 2;
        let fat_bytes = match kind {
            FsKind::Fat12 => (entries * 3).div_ceil(2),
            FsKind::Fat16 => entries * 2,
            _ => entries * 4,
        };
        if fat_bytes > fat_sectors * bps {
            return Err(corrupt(format!(
                "the FAT ({} bytes) is too small for {clusters} clusters",
                fat_sectors * bps
            )));
        }
        let mut raw = vec![0u8; fat_bytes as usize];
        dev.read_at(&mut raw, reserved * bps)?;
        let table: Vec<u32> = (0..entries as usize)
            .map(|i| match kind {
                FsKind::Fat12 => {
                    let v = le16(&raw, i * 3 / 2);
                    u32::from(if i % 2 == 0 { v & 0xFFF } else { v >> 4 })
                }
                FsKind::Fat16 => u32::from(le16(&raw, i * 2)),
                _ => le32(&raw, i * 4) & 0x0FFF_FFFF,
            })
            .collect();
        let (serial_at, label_at) = if kind == FsKind::Fat32 {
            (67, 71)
        } else {
            (39, 43)
        };
        let mut fat = Fat {
            dev,
            kind,
            bytes_per_sector: bps,
            cluster_size,
            root_dir: (root_at, root_dir_sectors * bps),
            data_start,
            root_cluster: if kind == FsKind::Fat32 {
                le32(&b, 44)
            } else {
                0
            },
            table,
            total_bytes: total * bps,
            serial: le32(&b, serial_at),
            label: label_text(&b[label_at..label_at + 11]),
        };
        // The volume label entry in the root directory is what tools show; the BPB copy is
        // often stale.
        if let Some(label) = fat
            .raw_entries(ROOT, true)?
            .into_iter()
            .find(|e| e.attr & ATTR_VOLUME_ID != 0 && e.attr != ATTR_LFN)
        {
            fat.label = label_text(&label.raw[..11]);
        }
        Ok(fat)
    }

    /// Options that make the FAT writer produce a volume with this one's type, label,
    /// serial number and cluster size.
    pub fn format_options(&self) -> super::fat_write::FatOptions {
        super::fat_write::FatOptions {
            kind: Some(self.kind),
            label: Some(self.label.clone()).filter(|l| !l.is_empty()),
            serial: Some(self.serial),
            cluster_size: Some(self.cluster_size as u32),
            counters: None,
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> FsError {
        FsError::Corrupt(format!("{} volume", self.kind.name()), what.into())
    }

    fn end_of_chain(&self, v: u32) -> bool {
        match self.kind {
            FsKind::Fat12 => v >= 0xFF8,
            FsKind::Fat16 => v >= 0xFFF8,
            _ => v >= 0x0FFF_FFF8,
        }
    }

    /// The clusters of the chain from `first`, as runs of (first cluster, count).
    fn chain(&self, first: u32) -> Result<Vec<(u32, u32)>> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut cluster = first;
        let mut steps = 0usize;
        while !self.end_of_chain(cluster) {
            if cluster < 2 || cluster as usize >= self.table.len() {
                return Err(
                    self.corrupt(format!("a cluster chain reaches invalid cluster {cluster}"))
                );
            }
            steps += 1;
            if steps > self.table.len() {
                return Err(self.corrupt(format!("the cluster chain from {first} loops")));
            }
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == cluster => r.1 += 1,
                _ => runs.push((cluster, 1)),
            }
            cluster = self.table[cluster as usize];
        }
        Ok(runs)
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_start + u64::from(cluster - 2) * self.cluster_size
    }

    /// The byte ranges holding directory `dir`'s entries.
    fn dir_ranges(&self, dir: NodeId) -> Result<Vec<(u64, u64)>> {
        let first = if dir == ROOT {
            if self.kind != FsKind::Fat32 {
                return Ok(vec![self.root_dir]);
            }
            self.root_cluster
        } else {
            let e = self.entry_at(dir)?;
            if e.attr & ATTR_DIRECTORY == 0 {
                return Err(FsError::NotADirectory(format!("FAT entry at {dir}")));
            }
            e.first_cluster
        };
        if first == 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .chain(first)?
            .into_iter()
            .map(|(c, n)| (self.cluster_offset(c), u64::from(n) * self.cluster_size))
            .collect())
    }

    /// The short entry stored at byte `offset`.
    fn entry_at(&self, offset: NodeId) -> Result<RawEntry> {
        if !offset.is_multiple_of(32) || offset < self.root_dir.0 || offset + 32 > self.total_bytes
        {
            return Err(self.corrupt(format!("no directory entry can be at byte {offset}")));
        }
        let mut raw = [0u8; 32];
        self.dev.read_at(&mut raw, offset)?;
        Ok(self.short_entry(offset, raw, None))
    }

    fn short_entry(&self, offset: u64, raw: [u8; 32], long: Option<Vec<u8>>) -> RawEntry {
        let hi = if self.kind == FsKind::Fat32 {
            u32::from(le16(&raw, 20)) << 16
        } else {
            0
        };
        RawEntry {
            offset,
            name: long.unwrap_or_else(|| short_name(&raw)),
            attr: raw[11],
            first_cluster: hi | u32::from(le16(&raw, 26)),
            size: le32(&raw, 28),
            raw,
        }
    }

    /// The entries of a directory (with `include_volume`, the volume label entry too).
    fn raw_entries(&self, dir: NodeId, include_volume: bool) -> Result<Vec<RawEntry>> {
        let mut out = Vec::new();
        let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
        let mut lfn_sum = 0u8;
        let mut seen = 0usize;
        'ranges: for (start, len) in self.dir_ranges(dir)? {
            let mut buf = vec![0u8; len as usize];
            self.dev.read_at(&mut buf, start)?;
            for (i, e) in buf.chunks_exact(32).enumerate() {
                seen += 1;
                if seen > MAX_DIR_ENTRIES {
                    return Err(self.corrupt("a directory has more entries than FAT allows"));
                }
                match e[0] {
                    0 => break 'ranges,
                    0xE5 => {
                        lfn.clear();
                        continue;
                    }
                    _ => {}
                }
                if e[11] & 0x3F == ATTR_LFN {
                    let mut part = [0u16; 13];
                    for (k, at) in (1..11)
                        .step_by(2)
                        .chain((14..26).step_by(2))
                        .chain((28..32).step_by(2))
                        .enumerate()
                    {
                        part[k] = le16(e, at);
                    }
                    if e[0] & 0x40 != 0 {
                        lfn.clear();
                        lfn_sum = e[13];
                    }
                    lfn.push((e[0] & 0x1F, part));
                    continue;
                }
                let mut raw = [0u8; 32];
                raw.copy_from_slice(e);
                let long = (!lfn.is_empty() && lfn_sum == checksum(&raw[..11])).then(|| {
                    lfn.sort_by_key(|(order, _)| *order);
                    let units: Vec<u16> = lfn
                        .iter()
                        .flat_map(|(_, p)| p.iter().copied())
                        .take_while(|&u| u != 0 && u != 0xFFFF)
                        .collect();
                    String::from_utf16_lossy(&units).into_bytes()
                });
                lfn.clear();
                let entry = self.short_entry(start + i as u64 * 32, raw, long);
                let dot = entry.name == b"." || entry.name == b"..";
                let volume = entry.attr & ATTR_VOLUME_ID != 0;
                if dot || (volume && !include_volume) {
                    continue;
                }
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Where an entry's bytes are: its cluster chain, cut at its size (files).
    fn extents_of(&self, e: &RawEntry) -> Result<Vec<FileExtent>> {
        if e.first_cluster == 0 {
            return Ok(Vec::new());
        }
        let is_dir = e.attr & ATTR_DIRECTORY != 0;
        let mut left = if is_dir { u64::MAX } else { u64::from(e.size) };
        let mut out = Vec::new();
        let mut file_offset = 0;
        for (c, n) in self.chain(e.first_cluster)? {
            if left == 0 {
                break;
            }
            let len = (u64::from(n) * self.cluster_size).min(left);
            out.push(FileExtent {
                file_offset,
                disk_offset: self.cluster_offset(c),
                len,
                unwritten: false,
            });
            file_offset += len;
            left -= len;
        }
        Ok(out)
    }

    fn kind_of(attr: u8) -> FileKind {
        if attr & ATTR_DIRECTORY != 0 {
            FileKind::Dir
        } else {
            FileKind::File
        }
    }
}

/// The 8.3 name as DOS shows it, lowercased where the NT case flags say so.
fn short_name(raw: &[u8; 32]) -> Vec<u8> {
    let mut base: Vec<u8> = raw[..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xE5;
    }
    let trim = |v: &mut Vec<u8>| {
        while v.last() == Some(&b' ') {
            v.pop();
        }
    };
    trim(&mut base);
    let mut ext = raw[8..11].to_vec();
    trim(&mut ext);
    if raw[12] & 0x08 != 0 {
        base.make_ascii_lowercase();
    }
    if raw[12] & 0x10 != 0 {
        ext.make_ascii_lowercase();
    }
    if !ext.is_empty() {
        base.push(b'.');
        base.extend_from_slice(&ext);
    }
    base
}

fn checksum(name: &[u8]) -> u8 {
    name.iter().fold(0u8, |sum, &c| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(c)
    })
}

fn label_text(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b).trim_end().to_string();
    if text == "NO NAME" {
        String::new()
    } else {
        text
    }
}

/// A DOS date and time (2-second resolution, plus `centis` hundredths) as a timestamp.
fn dos_time(date: u16, time: u16, centis: u8) -> Option<Timestamp> {
    if date == 0 {
        return None;
    }
    let (year, month, day) = (
        1980 + i64::from(date >> 9),
        i64::from((date >> 5) & 0xF),
        i64::from(date & 0x1F),
    );
    if !(1..=12).contains(&month) || day == 0 {
        return None;
    }
    let secs = i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3F) * 60
        + i64::from(time & 0x1F) * 2
        + i64::from(centis / 100);
    Some(Timestamp::from_civil(
        year,
        month,
        day,
        secs,
        u32::from(centis % 100) * 10_000_000,
    ))
}

impl Filesystem for Fat {
    fn info(&self) -> VolumeInfo {
        let free = self.table[2..].iter().filter(|&&v| v == 0).count() as u64;
        let clusters = self.table.len() as u64 - 2;
        VolumeInfo {
            kind: self.kind,
            label: self.label.clone(),
            uuid: format!("{:04X}-{:04X}", self.serial >> 16, self.serial & 0xFFFF),
            block_size: self.cluster_size as u32,
            total_bytes: self.total_bytes,
            used_bytes: (clusters - free) * self.cluster_size,
        }
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        if node == ROOT {
            return Ok(Metadata {
                node,
                kind: FileKind::Dir,
                size: 0,
                mode: 0o755,
                uid: 0,
                gid: 0,
                links: 1,
                atime: None,
                mtime: None,
                ctime: None,
                crtime: None,
                device: None,
                flags: u32::from(ATTR_DIRECTORY),
                allocated: 0,
            });
        }
        let e = self.entry_at(node)?;
        let kind = Fat::kind_of(e.attr);
        let r = &e.raw;
        let clusters: u64 = if e.first_cluster == 0 {
            0
        } else {
            self.chain(e.first_cluster)?
                .iter()
                .map(|r| u64::from(r.1))
                .sum()
        };
        let base = if kind == FileKind::Dir { 0o755 } else { 0o644 };
        Ok(Metadata {
            node,
            kind,
            size: if kind == FileKind::Dir {
                0
            } else {
                u64::from(e.size)
            },
            mode: if e.attr & ATTR_READ_ONLY != 0 {
                base & !0o222
            } else {
                base
            },
            uid: 0,
            gid: 0,
            links: 1,
            atime: dos_time(le16(r, 18), 0, 0),
            mtime: dos_time(le16(r, 24), le16(r, 22), 0),
            ctime: None,
            crtime: dos_time(le16(r, 16), le16(r, 14), r[13]),
            device: None,
            flags: u32::from(e.attr),
            allocated: clusters * self.cluster_size,
        })
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        Ok(self
            .raw_entries(dir, false)?
            .into_iter()
            .map(|e| DirEntry {
                kind: Fat::kind_of(e.attr),
                node: e.offset,
                name: e.name,
            })
            .collect())
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let entry = if node == ROOT {
            None
        } else {
            Some(self.entry_at(node)?)
        };
        let Some(entry) = entry.filter(|e| e.attr & ATTR_DIRECTORY == 0) else {
            return Err(FsError::Unsupported(format!(
                "FAT entry at {node} is a directory"
            )));
        };
        let size = u64::from(entry.size);
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - offset) as usize;
        let mut done = 0usize;
        for e in self.extents_of(&entry)? {
            let pos = offset + done as u64;
            if done == want {
                break;
            }
            if e.file_offset + e.len <= pos {
                continue;
            }
            let n = (e.file_offset + e.len - pos).min((want - done) as u64) as usize;
            self.dev.read_at(
                &mut buf[done..done + n],
                e.disk_offset + (pos - e.file_offset),
            )?;
            done += n;
        }
        if done < want {
            return Err(self.corrupt(format!(
                "the file at entry {node} is shorter on disk than its size says"
            )));
        }
        Ok(want)
    }

    fn read_link(&self, _node: NodeId) -> Result<Vec<u8>> {
        Err(FsError::Unsupported("FAT has no symbolic links".into()))
    }

    fn xattrs(&self, _node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }

    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        if node == ROOT {
            return Ok(Vec::new());
        }
        self.extents_of(&self.entry_at(node)?)
    }

    fn device(&self) -> Option<Arc<dyn BlockDevice>> {
        Some(Arc::clone(&self.dev))
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        let spc = self.cluster_size / self.bytes_per_sector;
        let mut runs: Vec<(u64, u64)> = vec![(0, self.data_start / self.bytes_per_sector)];
        for (c, &v) in self.table.iter().enumerate().skip(2) {
            if v == 0 {
                continue;
            }
            let first = self.cluster_offset(c as u32) / self.bytes_per_sector;
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == first => r.1 += spc,
                _ => runs.push((first, spc)),
            }
        }
        Ok(AllocationMap {
            block_size: self.bytes_per_sector as u32,
            runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_times_convert_to_unix_seconds() {
        // 2001-02-03 04:05:06 = 981173106.
        let date = ((2001 - 1980) << 9) | (2 << 5) | 3;
        let time = (4 << 11) | (5 << 5) | 3;
        let t = dos_time(date, time, 0).unwrap();
        assert_eq!(t.secs, 981_173_106);
        let t = dos_time(date, time, 150).unwrap();
        assert_eq!((t.secs, t.nanos), (981_173_107, 500_000_000));
        assert!(dos_time(0, 0, 0).is_none());
    }

    #[test]
    fn short_names_follow_the_case_flags() {
        let mut raw = [b' '; 32];
        raw[..8].copy_from_slice(b"README  ");
        raw[8..11].copy_from_slice(b"TXT");
        raw[12] = 0x18;
        assert_eq!(short_name(&raw), b"readme.txt");
        raw[12] = 0;
        raw[8..11].copy_from_slice(b"   ");
        assert_eq!(short_name(&raw), b"README");
    }
}
