//! NTFS read through the `ntfs` crate: directories from the `$I30` indexes (DOS-only names
//! skipped, metafiles hidden), metadata from `$STANDARD_INFORMATION` (100 ns times, file
//! attributes), hard links counted from `$FILE_NAME` attributes, contents and physical extents
//! from the unnamed `$DATA` attribute, alternate data streams from the named ones, security
//! descriptors (the file's own or the shared one in `$Secure:$SDS`), the volume label, serial
//! number, and the cluster bitmap (`$Bitmap`) plus the backup boot sector as the allocation
//! map.
//!
//! File data is read here from the value's data runs, not through the crate: `layout`
//! gathers the runs, also from the extension records of an attribute list; `runs` reads
//! them, and maps the compression units of compressed values, which `lznt1` expands (the
//! crate returns them still compressed); compressed files offer no extents, since their
//! on-disk bytes are not the file's. File records split across two `$MFT` runs are joined by
//! the reader the crate reads through (`reader`).
//!
//! A node is an MFT record number. Every call into the crate runs under `catch_unwind`: a
//! panic on hostile structures becomes an error for that call.

mod layout;
mod lznt1;
mod reader;
mod runs;

use std::io::Read;
use std::sync::Arc;

use layout::Layout;
use ntfs::attribute_value::NtfsAttributeValue;
use ntfs::structured_values::{NtfsFileName, NtfsFileNamespace, NtfsStandardInformation};
use ntfs::{NtfsAttributeType, NtfsFile};
use reader::{MftRuns, Padded};

use super::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId,
    Result, Timestamp, VolumeInfo,
};
use diskferry_blockdev::BlockDevice;

const ROOT: NodeId = 5;
const BITMAP: NodeId = 6;
const SECURE: NodeId = 9;
/// Largest `$Secure:$SDS` stream read (a busy server's is a few MiB).
const MAX_SDS: u64 = 256 << 20;
/// Records below this are NTFS metafiles ($MFT, $Bitmap, $Extend, ...), hidden from listings.
const FIRST_USER_RECORD: u64 = 16;
/// Largest cluster bitmap read (covers 8 TiB at 4 KiB clusters).
const MAX_BITMAP: u64 = 256 << 20;
/// Most entries read from one directory index.
const MAX_DIR_ENTRIES: usize = 1 << 22;

/// An NTFS volume opened for reading.
pub struct NtfsFs {
    dev: Arc<dyn BlockDevice>,
    ntfs: ntfs::Ntfs,
    label: String,
    /// `$Secure:$SDS` by security ID, read on first use.
    descriptors: std::sync::OnceLock<std::collections::HashMap<u32, Vec<u8>>>,
    /// The `$MFT`'s runs, for reading records split across two of them.
    mft: Arc<MftRuns>,
}

pub(crate) fn err(context: &str, e: impl std::fmt::Display) -> FsError {
    FsError::Corrupt(format!("NTFS {context}"), e.to_string())
}

/// Runs `f`, turning a panic inside the `ntfs` crate into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(err(what, "the ntfs reader failed on malformed structures")))
}

/// The `$MFT`'s real runs (record 0's unnamed `$DATA`), for joining records split across
/// them; none when its data is spread over an attribute list, which the crate cannot follow.
fn mft_runs(ntfs: &ntfs::Ntfs, r: &mut Padded) -> Result<MftRuns> {
    let mft = ntfs.file(r, 0).map_err(|e| err("$MFT", e))?;
    let Some(item) = mft.data(r, "") else {
        return Err(err("$MFT", "no $DATA attribute"));
    };
    let item = item.map_err(|e| err("$MFT", e))?;
    let attr = item.to_attribute().map_err(|e| err("$MFT", e))?;
    let NtfsAttributeValue::NonResident(value) = attr.value(r).map_err(|e| err("$MFT", e))? else {
        return Ok(MftRuns::default());
    };
    let mut runs = Vec::new();
    for run in value.data_runs() {
        let run = run.map_err(|e| err("$MFT data runs", e))?;
        if let Some(pos) = run.data_position().value() {
            runs.push((pos.get(), run.allocated_size()));
        }
    }
    Ok(MftRuns::new(&runs))
}

fn nt_time(t: ntfs::NtfsTime) -> Timestamp {
    // 100 ns intervals since 1601-01-01.
    const UNIX_FROM_1601: i64 = 11_644_473_600;
    let ticks = t.nt_timestamp();
    Timestamp {
        secs: (ticks / 10_000_000) as i64 - UNIX_FROM_1601,
        nanos: (ticks % 10_000_000) as u32 * 100,
    }
}

impl NtfsFs {
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<NtfsFs> {
        guarded("boot sector", || {
            let mut r = Padded::new(Arc::clone(&dev), Arc::default());
            let mut ntfs = ntfs::Ntfs::new(&mut r).map_err(|e| err("boot sector", e))?;
            let mft = Arc::new(mft_runs(&ntfs, &mut r)?);
            let mut r = Padded::new(Arc::clone(&dev), Arc::clone(&mft));
            ntfs.read_upcase_table(&mut r)
                .map_err(|e| err("$UpCase", e))?;
            let label = match ntfs.volume_name(&mut r) {
                Some(Ok(name)) => name.name().to_string_lossy(),
                Some(Err(e)) => return Err(err("$Volume", e)),
                None => String::new(),
            };
            Ok(NtfsFs {
                dev,
                ntfs,
                label,
                descriptors: std::sync::OnceLock::new(),
                mft,
            })
        })
    }

    fn reader(&self) -> Padded {
        Padded::new(Arc::clone(&self.dev), Arc::clone(&self.mft))
    }

    /// How the unnamed (or named) `$DATA` stream of `file` is stored; `None` without one.
    fn layout(
        &self,
        r: &mut Padded,
        file: &NtfsFile<'_>,
        stream: &str,
        node: NodeId,
    ) -> Result<Option<Layout>> {
        layout::of(&self.ntfs, r, file, stream, node)
    }

    fn file<'n>(&'n self, r: &mut Padded, node: NodeId) -> Result<NtfsFile<'n>> {
        self.ntfs
            .file(r, node)
            .map_err(|e| err(&format!("file record {node}"), e))
    }

    /// The names (namespace other than DOS) in a file's `$FILE_NAME` attributes.
    fn link_count(&self, r: &mut Padded, file: &NtfsFile<'_>) -> Result<u32> {
        let mut count = 0;
        let mut attrs = file.attributes();
        while let Some(item) = attrs.next(r) {
            let item = item.map_err(|e| err("attributes", e))?;
            let attr = item.to_attribute().map_err(|e| err("attributes", e))?;
            if attr.ty().ok() != Some(NtfsAttributeType::FileName) {
                continue;
            }
            let name = attr
                .structured_value::<_, NtfsFileName>(r)
                .map_err(|e| err("$FILE_NAME", e))?;
            if name.namespace() != NtfsFileNamespace::Dos {
                count += 1;
            }
        }
        Ok(count.max(1))
    }

    /// Reads a `$DATA` stream of `node` at `offset`.
    fn read_stream(
        &self,
        node: NodeId,
        stream: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        guarded("read", || {
            let mut r = self.reader();
            let file = self.file(&mut r, node)?;
            match self.layout(&mut r, &file, stream, node)? {
                None => Err(FsError::NotFound(format!(
                    "stream {stream:?} of record {node}"
                ))),
                Some(Layout::Resident(bytes)) => {
                    let from = offset.min(bytes.len() as u64) as usize;
                    let n = buf.len().min(bytes.len() - from);
                    buf[..n].copy_from_slice(&bytes[from..from + n]);
                    Ok(n)
                }
                Some(Layout::Plain { len, runs }) => runs.read_plain(&*self.dev, len, offset, buf),
                Some(Layout::Compressed(c)) => c.read_at(&*self.dev, offset, buf),
            }
        })
    }

    /// Every descriptor in `$Secure:$SDS` by security ID, read once. The stream is a series of
    /// 256 KiB blocks, each mirrored by the next; an entry is a 20-byte header (hash, ID,
    /// offset, length) and the descriptor, 16-byte aligned, never crossing a block.
    fn shared_descriptors(&self) -> Result<&std::collections::HashMap<u32, Vec<u8>>> {
        if let Some(map) = self.descriptors.get() {
            return Ok(map);
        }
        const BLOCK: u64 = 256 << 10;
        let mut map = std::collections::HashMap::new();
        let mut r = self.reader();
        let secure = self.file(&mut r, SECURE)?;
        let len = self
            .layout(&mut r, &secure, "$SDS", SECURE)?
            .map_or(0, |l| l.len());
        if len > MAX_SDS {
            return Err(err("$Secure:$SDS", format!("{len} bytes")));
        }
        let mut sds = vec![0u8; len as usize];
        let mut done = 0;
        while done < sds.len() {
            let n = self.read_stream(SECURE, "$SDS", done as u64, &mut sds[done..])?;
            if n == 0 {
                break;
            }
            done += n;
        }
        sds.truncate(done);
        let le32 =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut at = 0u64;
        while at + 20 <= sds.len() as u64 {
            // Odd blocks mirror the even ones before them.
            if (at / BLOCK) % 2 == 1 {
                at = (at / BLOCK + 1) * BLOCK;
                continue;
            }
            let e = &sds[at as usize..];
            let (id, entry_len) = (le32(e, 4), u64::from(le32(e, 16)));
            let block_end = (at / BLOCK + 1) * BLOCK;
            if entry_len < 20 || at + entry_len > block_end.min(sds.len() as u64) {
                at = block_end;
                continue;
            }
            map.entry(id)
                .or_insert_with(|| e[20..entry_len as usize].to_vec());
            at += entry_len.next_multiple_of(16);
        }
        Ok(self.descriptors.get_or_init(|| map))
    }

    /// The runs of clusters `$Bitmap` marks in use: (first cluster, count), sorted.
    fn bitmap_runs(&self) -> Result<Vec<(u64, u64)>> {
        let cluster = u64::from(self.ntfs.cluster_size());
        let clusters = self.ntfs.size() / cluster;
        let bytes = clusters.div_ceil(8);
        if bytes > MAX_BITMAP {
            return Err(err("$Bitmap", format!("{bytes} bytes is too large")));
        }
        let mut bitmap = vec![0u8; bytes as usize];
        let mut done = 0;
        while done < bitmap.len() {
            let n = self.read_stream(BITMAP, "", done as u64, &mut bitmap[done..])?;
            if n == 0 {
                return Err(err("$Bitmap", "shorter than the volume needs"));
            }
            done += n;
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in 0..clusters {
            if bitmap[(c / 8) as usize] & (1 << (c % 8)) == 0 {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == c => r.1 += 1,
                _ => runs.push((c, 1)),
            }
        }
        Ok(runs)
    }

    /// Names and sizes of a file's alternate data streams.
    pub fn streams(&self, node: NodeId) -> Result<Vec<(String, u64)>> {
        guarded("streams", || {
            let mut r = self.reader();
            let file = self.file(&mut r, node)?;
            let mut out = Vec::new();
            for name in layout::stream_names(&mut r, &file, node)? {
                let len = self
                    .layout(&mut r, &file, &name, node)?
                    .map_or(0, |l| l.len());
                out.push((name, len));
            }
            Ok(out)
        })
    }
}

impl Filesystem for NtfsFs {
    fn info(&self) -> VolumeInfo {
        // What `$Bitmap` says is in use, as ntfs-3g's tools count it.
        let used = self
            .bitmap_runs()
            .map(|runs| runs.iter().map(|r| r.1).sum::<u64>())
            .unwrap_or(0)
            * u64::from(self.ntfs.cluster_size());
        VolumeInfo {
            kind: FsKind::Ntfs,
            label: self.label.clone(),
            uuid: format!("{:016X}", self.ntfs.serial_number()),
            block_size: self.ntfs.cluster_size(),
            total_bytes: self.ntfs.size(),
            used_bytes: used,
        }
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        guarded("metadata", || {
            let mut r = self.reader();
            let file = self.file(&mut r, node)?;
            let info: NtfsStandardInformation =
                file.info().map_err(|e| err("$STANDARD_INFORMATION", e))?;
            let kind = if file.is_directory() {
                FileKind::Dir
            } else {
                FileKind::File
            };
            let (size, allocated) = if kind == FileKind::Dir {
                (0, 0)
            } else {
                self.layout(&mut r, &file, "", node)?
                    .map_or((0, 0), |l| (l.len(), l.allocated()))
            };
            let attributes = info.file_attributes().bits();
            let base = if kind == FileKind::Dir { 0o755 } else { 0o644 };
            Ok(Metadata {
                node,
                kind,
                size,
                mode: if attributes & 1 != 0 {
                    base & !0o222
                } else {
                    base
                },
                uid: 0,
                gid: 0,
                links: self.link_count(&mut r, &file)?,
                atime: Some(nt_time(info.access_time())),
                mtime: Some(nt_time(info.modification_time())),
                ctime: Some(nt_time(info.mft_record_modification_time())),
                crtime: Some(nt_time(info.creation_time())),
                device: None,
                flags: attributes,
                allocated,
            })
        })
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        guarded("directory", || {
            let mut r = self.reader();
            let file = self.file(&mut r, dir)?;
            if !file.is_directory() {
                return Err(FsError::NotADirectory(format!("NTFS file record {dir}")));
            }
            let index = file
                .directory_index(&mut r)
                .map_err(|e| err("directory index", e))?;
            let mut entries = index.entries();
            let mut out = Vec::new();
            while let Some(entry) = entries.next(&mut r) {
                let entry = entry.map_err(|e| err("directory index", e))?;
                let Some(key) = entry.key() else { continue };
                let key = key.map_err(|e| err("directory index", e))?;
                let record = entry.file_reference().file_record_number();
                if key.namespace() == NtfsFileNamespace::Dos || record < FIRST_USER_RECORD {
                    continue;
                }
                if out.len() >= MAX_DIR_ENTRIES {
                    return Err(err("directory index", "too many entries"));
                }
                out.push(DirEntry {
                    name: key.name().to_string_lossy().into_bytes(),
                    node: record,
                    kind: if key.is_directory() {
                        FileKind::Dir
                    } else {
                        FileKind::File
                    },
                });
            }
            Ok(out)
        })
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_stream(node, "", offset, buf)
    }

    fn read_link(&self, _node: NodeId) -> Result<Vec<u8>> {
        Err(FsError::Unsupported(
            "NTFS reparse points (symbolic links, junctions) are not read yet".into(),
        ))
    }

    /// Alternate data streams, as `ntfs.stream.NAME` (values up to 1 MiB).
    fn xattrs(&self, node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for (name, len) in self.streams(node)? {
            if len > 1 << 20 {
                return Err(FsError::Unsupported(format!(
                    "alternate data stream {name} of record {node} is {len} bytes"
                )));
            }
            let mut value = vec![0u8; len as usize];
            let n = self.read_stream(node, &name, 0, &mut value)?;
            value.truncate(n);
            out.push((format!("ntfs.stream.{name}"), value));
        }
        Ok(out)
    }

    /// The record's own `$SECURITY_DESCRIPTOR` attribute when it has one (NTFS 1.x style, and
    /// what ntfscp writes), otherwise the descriptor its security ID names in `$Secure:$SDS`
    /// (how Windows and the ntfs-3g driver store them).
    fn security_descriptor(&self, node: NodeId) -> Result<Option<Vec<u8>>> {
        guarded("security descriptor", || {
            let mut r = self.reader();
            let file = self.file(&mut r, node)?;
            let shared_id = file.info().ok().and_then(|i| i.security_id());
            let mut attrs = file.attributes();
            while let Some(item) = attrs.next(&mut r) {
                let item = item.map_err(|e| err("attributes", e))?;
                let attr = item.to_attribute().map_err(|e| err("attributes", e))?;
                if attr.ty().ok() != Some(NtfsAttributeType::SecurityDescriptor) {
                    continue;
                }
                let len = attr.value_length();
                if len > 1 << 16 {
                    return Err(err("$SECURITY_DESCRIPTOR", format!("{len} bytes")));
                }
                let value = attr
                    .value(&mut r)
                    .map_err(|e| err("$SECURITY_DESCRIPTOR", e))?;
                let mut bytes = Vec::with_capacity(len as usize);
                value
                    .attach(&mut r)
                    .take(len)
                    .read_to_end(&mut bytes)
                    .map_err(|e| err("$SECURITY_DESCRIPTOR", e))?;
                return Ok(Some(bytes));
            }
            match shared_id {
                Some(id) if id != 0 => Ok(self.shared_descriptors()?.get(&id).cloned()),
                _ => Ok(None),
            }
        })
    }

    /// Resident data (small files kept inside the MFT record) has no extents but is all data;
    /// a compressed file holds data in every compression unit with a real cluster.
    fn data_ranges(&self, node: NodeId) -> Result<Vec<(u64, u64)>> {
        guarded("data ranges", || {
            let mut r = self.reader();
            let file = self.file(&mut r, node)?;
            Ok(match self.layout(&mut r, &file, "", node)? {
                Some(Layout::Resident(bytes)) if !bytes.is_empty() => vec![(0, bytes.len() as u64)],
                Some(Layout::Plain { len, runs }) => runs
                    .extents(len)
                    .iter()
                    .map(|e| (e.file_offset, e.len))
                    .collect(),
                Some(Layout::Compressed(c)) => c.data_ranges(),
                _ => Vec::new(),
            })
        })
    }

    /// A compressed file's clusters hold LZNT1 data, not its bytes: an error, so that bulk
    /// readers fall back to `read_at`.
    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        guarded("extents", || {
            let mut r = self.reader();
            let file = self.file(&mut r, node)?;
            match self.layout(&mut r, &file, "", node)? {
                Some(Layout::Plain { len, runs }) => Ok(runs.extents(len)),
                Some(Layout::Compressed(_)) => Err(FsError::Unsupported(format!(
                    "NTFS file record {node} is compressed: its clusters are not its bytes"
                ))),
                Some(Layout::Resident(_)) | None => Ok(Vec::new()),
            }
        })
    }

    /// The clusters `$Bitmap` marks, and the cluster holding the backup boot sector: the
    /// sector just past the volume's last (the partition's last sector, outside `$Bitmap`),
    /// when the device has it.
    fn allocation_map(&self) -> Result<AllocationMap> {
        let cluster = u64::from(self.ntfs.cluster_size());
        let clusters = self.ntfs.size() / cluster;
        let mut runs = self.bitmap_runs()?;
        let sector = u64::from(self.ntfs.sector_size());
        if self.dev.size() >= self.ntfs.size().saturating_add(sector) {
            // Byte `size()` lies in cluster `clusters`, the first the bitmap does not cover.
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == clusters => r.1 += 1,
                _ => runs.push((clusters, 1)),
            }
        }
        Ok(AllocationMap {
            block_size: cluster as u32,
            runs,
        })
    }
}
