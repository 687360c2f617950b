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

mod dir;
pub mod ondisk;

use super::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId,
    Result, VolumeInfo,
};
use dir::{label_text, LongName, RawEntry};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::le::{le16, le32};
use ondisk::dirent::{ATTR_DIRECTORY, ATTR_LONG_NAME, ATTR_READ_ONLY, ATTR_VOLUME_ID};
use ondisk::lfn::is_long_name;
use ondisk::{bpb, dirent, fat16, fat32};

const ROOT: NodeId = 0;
/// Most clusters accepted (FAT32 allows 2^28).
const MAX_CLUSTERS: u64 = 1 << 28;
/// Most entries read from one directory (FAT allows 65536).
const MAX_DIR_ENTRIES: usize = 65536;

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
    /// The boot-sector fields a rebuild keeps (512-byte sectors only).
    boot: Option<super::fat_write::BootFields>,
}

/// Where things are in a volume, from its BPB; all in bytes.
struct Geometry {
    bytes_per_sector: u64,
    cluster_size: u64,
    /// The first FAT, and its size.
    fat_at: u64,
    fat_len: u64,
    /// The fixed root directory (FAT12/16).
    root_at: u64,
    root_len: u64,
    /// Cluster 2.
    data_start: u64,
    total: u64,
    clusters: u64,
}

impl Geometry {
    /// The BPB of boot sector `b`, checked against a device of `dev_size` bytes.
    fn parse(b: &[u8], dev_size: u64) -> std::result::Result<Geometry, String> {
        let bps = u64::from(bpb::BYTES_PER_SECTOR.get(b));
        let reserved = u64::from(bpb::RESERVED_SECTORS.get(b));
        let fats = u64::from(bpb::NUM_FATS.get(b));
        let total = match bpb::TOTAL_SECTORS_16.get(b) {
            0 => u64::from(bpb::TOTAL_SECTORS_32.get(b)),
            n => u64::from(n),
        };
        let fat_sectors = match bpb::FAT_SIZE_16.get(b) {
            0 => u64::from(fat32::FAT_SIZE_32.get(b)),
            n => u64::from(n),
        };
        let root_len =
            (u64::from(bpb::ROOT_ENTRIES.get(b)) * dirent::LEN as u64).div_ceil(bps) * bps;
        let root_at = (reserved + fats * fat_sectors) * bps;
        let data_start = root_at + root_len;
        let cluster_size = bps * u64::from(bpb::SECTORS_PER_CLUSTER.get(b));
        if total * bps > dev_size || data_start >= total * bps {
            return Err(format!(
                "{total} sectors of {bps} bytes with data from byte {data_start} do not fit the {dev_size}-byte device"
            ));
        }
        let clusters = (total * bps - data_start) / cluster_size;
        if clusters > MAX_CLUSTERS {
            return Err(format!("{clusters} clusters is more than FAT allows"));
        }
        Ok(Geometry {
            bytes_per_sector: bps,
            cluster_size,
            fat_at: reserved * bps,
            fat_len: fat_sectors * bps,
            root_at,
            root_len,
            data_start,
            total: total * bps,
            clusters,
        })
    }
}

/// The allocation table of a `kind` volume: one entry per cluster, entries 0 and 1 reserved.
fn read_table(dev: &dyn BlockDevice, kind: FsKind, g: &Geometry) -> Result<Vec<u32>> {
    let entries = g.clusters + 2;
    let fat_bytes = match kind {
        FsKind::Fat12 => (entries * 3).div_ceil(2),
        FsKind::Fat16 => entries * 2,
        _ => entries * 4,
    };
    if fat_bytes > g.fat_len {
        return Err(FsError::Corrupt(
            "FAT boot sector".into(),
            format!(
                "the FAT ({} bytes) is too small for {} clusters",
                g.fat_len, g.clusters
            ),
        ));
    }
    let mut raw = vec![0u8; fat_bytes as usize];
    dev.read_at(&mut raw, g.fat_at)?;
    Ok((0..entries as usize)
        .map(|i| match kind {
            FsKind::Fat12 => {
                let v = le16(&raw, i * 3 / 2);
                u32::from(if i % 2 == 0 { v & 0xFFF } else { v >> 4 })
            }
            FsKind::Fat16 => u32::from(le16(&raw, i * 2)),
            _ => le32(&raw, i * 4) & 0x0FFF_FFFF,
        })
        .collect())
}

impl Fat {
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Fat> {
        let corrupt = |what: String| FsError::Corrupt("FAT boot sector".into(), what);
        let mut b = vec![0u8; bpb::LEN];
        if dev.size() < bpb::LEN as u64 {
            return Err(corrupt("the device is too small".into()));
        }
        dev.read_at(&mut b, 0)?;
        let kind = super::detect::classify(&{
            let mut c = vec![0u8; 68 * 1024];
            c[..bpb::LEN].copy_from_slice(&b);
            c
        });
        if !matches!(kind, FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32) {
            return Err(corrupt("no FAT boot sector".into()));
        }
        let g = Geometry::parse(&b, dev.size()).map_err(corrupt)?;
        let table = read_table(&*dev, kind, &g)?;
        let (serial, label, root_cluster) = if kind == FsKind::Fat32 {
            (
                fat32::VOLUME_ID.get(&b),
                fat32::VOLUME_LABEL.get(&b),
                fat32::ROOT_CLUSTER.get(&b),
            )
        } else {
            (fat16::VOLUME_ID.get(&b), fat16::VOLUME_LABEL.get(&b), 0)
        };
        let boot = super::fat_write::BootFields::from_boot_sector(&b, kind, dev.size());
        let mut fat = Fat {
            dev,
            kind,
            bytes_per_sector: g.bytes_per_sector,
            cluster_size: g.cluster_size,
            root_dir: (g.root_at, g.root_len),
            data_start: g.data_start,
            root_cluster,
            table,
            total_bytes: g.total,
            serial,
            label: label_text(&label),
            boot,
        };
        // The volume label entry in the root directory is what tools show; the BPB copy is
        // often stale.
        if let Some(label) = fat
            .raw_entries(ROOT, true)?
            .into_iter()
            .find(|e| e.attr & ATTR_VOLUME_ID != 0 && e.attr != ATTR_LONG_NAME)
        {
            fat.label = label_text(&dirent::NAME.get(&label.raw));
        }
        Ok(fat)
    }

    /// Options that make the FAT writer produce a volume with this one's type, label,
    /// serial number, cluster size and boot-sector fields (layout, geometry, OEM name, media
    /// byte, hidden sectors).
    pub fn format_options(&self) -> super::fat_write::FatOptions {
        super::fat_write::FatOptions {
            kind: Some(self.kind),
            label: Some(self.label.clone()).filter(|l| !l.is_empty()),
            serial: Some(self.serial),
            cluster_size: Some(self.cluster_size as u32),
            counters: None,
            boot: self.boot.clone(),
            hidden_sectors: None,
            map_file_data: false,
        }
    }

    /// Free clusters, and the highest cluster in use (`None` when none is).
    pub fn cluster_usage(&self) -> (u32, Option<u32>) {
        let clusters = self.table.iter().enumerate().skip(2);
        let free = clusters.clone().filter(|(_, &v)| v == 0).count() as u32;
        let last = clusters.rev().find(|(_, &v)| v != 0).map(|(i, _)| i as u32);
        (free, last)
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
            if !e.is_dir() {
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
        let len = dirent::LEN as u64;
        if !offset.is_multiple_of(len)
            || offset < self.root_dir.0
            || offset + len > self.total_bytes
        {
            return Err(self.corrupt(format!("no directory entry can be at byte {offset}")));
        }
        let mut raw = [0u8; dirent::LEN];
        self.dev.read_at(&mut raw, offset)?;
        Ok(RawEntry::new(offset, raw, None, self.kind == FsKind::Fat32))
    }

    /// The entries of a directory (with `include_volume`, the volume label entry too).
    fn raw_entries(&self, dir: NodeId, include_volume: bool) -> Result<Vec<RawEntry>> {
        let mut out = Vec::new();
        let mut long = LongName::default();
        let mut seen = 0usize;
        'ranges: for (start, len) in self.dir_ranges(dir)? {
            let mut buf = vec![0u8; len as usize];
            self.dev.read_at(&mut buf, start)?;
            for (i, e) in buf.chunks_exact(dirent::LEN).enumerate() {
                seen += 1;
                if seen > MAX_DIR_ENTRIES {
                    return Err(self.corrupt("a directory has more entries than FAT allows"));
                }
                match dirent::FIRST_BYTE.get(e) {
                    dirent::END => break 'ranges,
                    dirent::DELETED => {
                        long.clear();
                        continue;
                    }
                    _ if is_long_name(e) => {
                        long.push(e);
                        continue;
                    }
                    _ => {}
                }
                let mut raw = [0u8; dirent::LEN];
                raw.copy_from_slice(e);
                let name = long.take_for(&raw);
                let offset = start + (i * dirent::LEN) as u64;
                let entry = RawEntry::new(offset, raw, name, self.kind == FsKind::Fat32);
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
        let is_dir = e.is_dir();
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
        let (crtime, mtime, atime) = e.times();
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
            atime,
            mtime,
            ctime: None,
            crtime,
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
        let Some(entry) = entry.filter(|e| !e.is_dir()) else {
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
