//! Writing a FAT12/16/32 filesystem from any [`Filesystem`] (a captured one, or a host
//! directory): `format` formats the volume — a rebuild keeps its source's boot-sector
//! fields ([`BootFields`]: layout, geometry, OEM name, media byte) and gets the partition's
//! start as its hidden sectors — `fatfs` lays out directories, names (long names with
//! generated short aliases) and file data, and `format::finish_fsinfo` sets the FAT32
//! FSInfo hints from the result; then each file's directory entry is finished by
//! hand — attributes (hidden, system, read-only, archive) and creation, modification and
//! access times — because `fatfs` 0.3 cannot set them — and each directory's `.` and `..`
//! are put back in the first two slots (`fatfs` 0.3 precedes them with long-name entries,
//! which fsck.fat rejects). Our FAT reader finds the entries (a FAT node is the byte offset of
//! its entry), so the patching touches nothing else.
//!
//! FAT keeps no owners, modes, links or extended attributes; symbolic links, devices, FIFOs
//! and sockets cannot be stored and are reported as skipped. Times are written as UTC.

use std::io::Write;
use std::sync::Arc;

mod format;
pub use format::BootFields;

use super::fat::ondisk::dirent;
use super::fat::ondisk::lfn::is_long_name;
use super::{DirEntry, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId, Result, Timestamp};
use diskferry_blockdev::{BlockDevice, BlockReader};
use diskferry_layout::field::Records;

/// How to format.
#[derive(Debug, Clone, Default)]
pub struct FatOptions {
    /// FAT12, FAT16 or FAT32; chosen from the size when absent.
    pub kind: Option<FsKind>,
    /// Up to 11 characters.
    pub label: Option<String>,
    /// The volume serial number.
    pub serial: Option<u32>,
    /// Bytes per cluster (a power of two from 512 to 32 KiB).
    pub cluster_size: Option<u32>,
    /// Kept up to date with entries found and written, when given.
    pub counters: Option<Arc<super::WriteCounters>>,
    /// A rebuild's source boot-sector fields to keep (layout, geometry, OEM name, media).
    pub boot: Option<BootFields>,
    /// The partition's first 512-byte sector on its disk, for the boot sector's hidden
    /// sectors (else the source's, else 0).
    pub hidden_sectors: Option<u32>,
    /// Copy no file data: allocate each file's clusters, write zeros there (which a sparse
    /// target stores as nothing) and record where its data goes (`FatReport::data_map`) —
    /// the metadata of a skeleton disk.
    pub map_file_data: bool,
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FatReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Entries FAT cannot hold (symlinks, devices, ...) and entries that failed, with why.
    pub skipped: Vec<(String, String)>,
    /// With `map_file_data`: where each file's data goes, sorted by volume offset.
    pub data_map: Vec<super::MappedData>,
}

fn fat_err(what: &str, e: impl std::fmt::Display) -> FsError {
    FsError::Corrupt(format!("writing FAT: {what}"), e.to_string())
}

/// A timestamp as DOS date and time (2-second resolution) and the creation time's extra
/// hundredths; `None` outside 1980..=2107.
fn dos_time(t: Timestamp) -> Option<(u16, u16, u8)> {
    let (year, month, day, secs) = t.to_civil();
    if !(1980..=2107).contains(&year) {
        return None;
    }
    let date = (((year - 1980) << 9) | (month << 5) | day) as u16;
    let time = (((secs / 3600) << 11) | ((secs % 3600 / 60) << 5) | (secs % 60 / 2)) as u16;
    let centis = ((secs % 2) * 100 + i64::from(t.nanos / 10_000_000)) as u8;
    Some((date, time, centis))
}

/// Formats `dev` as FAT and copies every file and directory of `source` into it.
pub fn write_fat(
    dev: Arc<dyn BlockDevice>,
    source: &dyn Filesystem,
    opts: &FatOptions,
) -> Result<FatReport> {
    let sectors = u32::try_from(dev.size() / 512)
        .map_err(|_| FsError::Unsupported("FAT volumes end at 2 TiB".into()))?;
    let layout = format::Layout::plan(sectors, opts)?;
    format::format(&*dev, &layout, opts)?;
    let (mut report, written) = populate(&dev, source, opts)?;
    let entries = finish_entries(&dev, source, &written)?;
    format::finish_fsinfo(&dev, &layout)?;
    dev.flush()?;
    if opts.map_file_data {
        report.data_map = data_map(&dev, &written, &entries)?;
    }
    Ok(report)
}

/// Where each written file's data lies in the new volume (`entries`: its path's node there).
fn data_map(
    dev: &Arc<dyn BlockDevice>,
    written: &[(String, NodeId)],
    entries: &std::collections::HashMap<String, NodeId>,
) -> Result<Vec<super::MappedData>> {
    let ours = super::fat::Fat::open(Arc::clone(dev))?;
    let mut map = Vec::new();
    for (path, node) in written {
        let Some(&entry) = entries.get(path) else {
            continue;
        };
        if ours.metadata(entry)?.kind != FileKind::File {
            continue;
        }
        map.extend(ours.extents(entry)?.into_iter().map(|x| super::MappedData {
            fs_offset: x.disk_offset,
            len: x.len,
            node: *node,
            file_offset: x.file_offset,
        }));
    }
    map.sort_by_key(|m| m.fs_offset);
    Ok(map)
}

/// Copies the tree of `source` into the freshly formatted volume through `fatfs`; returns the
/// report and (path in the new volume, source node) of everything written.
fn populate(
    dev: &Arc<dyn BlockDevice>,
    source: &dyn Filesystem,
    opts: &FatOptions,
) -> Result<(FatReport, Vec<(String, NodeId)>)> {
    let mut report = FatReport::default();
    let mut written: Vec<(String, NodeId)> = Vec::new();
    let mut walk_errors = Vec::new();
    // fatfs is third-party code fed names and sizes from a possibly damaged source: a panic
    // in it becomes an error here.
    let populated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        let fs = fatfs::FileSystem::new(
            BlockReader::new(Arc::clone(dev)),
            fatfs::FsOptions::new().update_accessed_date(false),
        )
        .map_err(|e| fat_err("mount", e))?;
        let mut buf = vec![0u8; 1 << 20];
        super::tree::walk(
            source,
            source.root(),
            &mut |path, e| {
                if let Some(c) = &opts.counters {
                    c.plan(1);
                    c.wrote(1);
                }
                let copy = Copy {
                    source,
                    buf: &mut buf,
                    zeros: opts.map_file_data,
                };
                match copy_entry(&fs.root_dir(), copy, path, e, &mut report)? {
                    Ok(()) => written.push((path.to_string(), e.node)),
                    Err(why) => report.skipped.push((path.to_string(), why)),
                }
                Ok(())
            },
            &mut |path, err| walk_errors.push((path.to_string(), err.to_string())),
        )?;
        fs.unmount().map_err(|e| fat_err("unmount", e))?;
        Ok(())
    }));
    match populated {
        Ok(r) => r?,
        Err(_) => return Err(fat_err("populate", "fatfs panicked on this input")),
    }
    report.skipped.extend(walk_errors);
    Ok((report, written))
}

type FatDir<'a> = fatfs::Dir<'a, BlockReader>;

/// Where file bytes come from: the source, or zeros of the same length (`map_file_data`).
struct Copy<'a> {
    source: &'a dyn Filesystem,
    buf: &'a mut [u8],
    zeros: bool,
}

impl Copy<'_> {
    /// Up to a buffer of the file's bytes at `at` (of `size`); 0 at its end.
    fn next(&mut self, node: NodeId, at: u64, size: u64) -> Result<usize> {
        if self.zeros {
            let n = (size - at).min(self.buf.len() as u64) as usize;
            self.buf[..n].fill(0);
            return Ok(n);
        }
        self.source.read_at(node, at, self.buf)
    }
}

/// Creates `e` (at `path`) in the new volume: `Ok(Err(why))` when it is skipped (a name or a
/// kind FAT cannot hold, or `fatfs` refusing it), `Err` when the source fails.
fn copy_entry(
    root: &FatDir<'_>,
    mut copy: Copy<'_>,
    path: &str,
    e: &DirEntry,
    report: &mut FatReport,
) -> Result<std::result::Result<(), String>> {
    if std::str::from_utf8(&e.name).is_err() {
        return Ok(Err("the name is not valid UTF-8".into()));
    }
    match e.kind {
        FileKind::Dir => match root.create_dir(path) {
            Ok(_) => {
                report.dirs += 1;
                Ok(Ok(()))
            }
            Err(err) => Ok(Err(err.to_string())),
        },
        FileKind::File => {
            let meta = copy.source.metadata(e.node)?;
            let mut file = match root.create_file(path) {
                Ok(f) => f,
                Err(err) => return Ok(Err(err.to_string())),
            };
            let mut at = 0u64;
            while at < meta.size {
                let n = copy.next(e.node, at, meta.size)?;
                if n == 0 {
                    break;
                }
                file.write_all(&copy.buf[..n])
                    .map_err(|err| fat_err(path, err))?;
                at += n as u64;
            }
            file.flush().map_err(|err| fat_err(path, err))?;
            report.files += 1;
            report.bytes += at;
            Ok(Ok(()))
        }
        other => Ok(Err(format!("FAT cannot hold a {}", other.name()))),
    }
}

/// Finishes each entry written: attributes and times, and a directory's `.` and `..`. Our
/// reader finds every entry in one walk; returns them (path → node in the new volume).
fn finish_entries(
    dev: &Arc<dyn BlockDevice>,
    source: &dyn Filesystem,
    written: &[(String, NodeId)],
) -> Result<std::collections::HashMap<String, NodeId>> {
    let ours = super::fat::Fat::open(Arc::clone(dev))?;
    let mut entries = std::collections::HashMap::new();
    super::tree::walk(
        &ours,
        super::Filesystem::root(&ours),
        &mut |path, e| {
            entries.insert(path.to_string(), e.node);
            Ok(())
        },
        &mut |_, _| {},
    )?;
    let attributes_are_dos = matches!(
        source.info().kind,
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 | FsKind::Ntfs
    );
    for (path, node) in written {
        let meta = source.metadata(*node)?;
        let entry = *entries
            .get(path)
            .ok_or_else(|| FsError::NotFound(format!("{path} in the new volume")))?;
        let mut raw = [0u8; dirent::LEN];
        dev.read_at(&mut raw, entry)?;
        patch_entry(&mut raw, &meta, attributes_are_dos);
        dev.write_at(&raw, entry)?;
        if meta.kind == FileKind::Dir {
            fix_dot_entries(&**dev, &ours, entry, &raw, !path.contains('/'))?;
        }
    }
    Ok(entries)
}

/// Gives the short entry `raw` the attributes and times of `meta`: DOS attributes as they are
/// from FAT and NTFS sources; from a Unix tree, archive on files and read-only when no one
/// may write.
fn patch_entry(raw: &mut [u8; dirent::LEN], meta: &Metadata, attributes_are_dos: bool) {
    let dir_bit = dirent::ATTR.get(raw) & dirent::ATTR_DIRECTORY;
    let source_attrs = if attributes_are_dos {
        (meta.flags & u32::from(dirent::ATTR_FILE_BITS)) as u8
    } else if meta.kind == FileKind::File {
        let nobody_writes = meta.mode & 0o222 == 0;
        dirent::ATTR_ARCHIVE
            | if nobody_writes {
                dirent::ATTR_READ_ONLY
            } else {
                0
            }
    } else {
        0
    };
    dirent::ATTR.set(raw, dir_bit | source_attrs);
    if let Some((date, time, centis)) = meta.crtime.or(meta.mtime).and_then(dos_time) {
        dirent::CREATION_CENTIS.set(raw, centis);
        dirent::CREATION_TIME.set(raw, time);
        dirent::CREATION_DATE.set(raw, date);
    }
    if let Some((date, _, _)) = meta.atime.and_then(dos_time) {
        dirent::ACCESS_DATE.set(raw, date);
    }
    if let Some((date, time, _)) = meta.mtime.and_then(dos_time) {
        dirent::WRITE_TIME.set(raw, time);
        dirent::WRITE_DATE.set(raw, date);
    }
}

/// `fatfs` 0.3 writes a long-name entry before `.` and before `..`, which fsck.fat rejects
/// (the dot entries must be the first two slots), and on FAT32 points a top-level
/// directory's `..` at the root's cluster instead of 0. Moves the dot entries into slots 0 and
/// 1, marks the two slots after them deleted, fixes `..`, and gives them the directory's own
/// times.
fn fix_dot_entries(
    dev: &dyn BlockDevice,
    ours: &super::fat::Fat,
    entry: NodeId,
    dir_entry: &[u8; dirent::LEN],
    parent_is_root: bool,
) -> Result<()> {
    let Some(first) = ours.extents(entry)?.first().copied() else {
        return Ok(());
    };
    let slots = Records::new(0, dirent::LEN);
    let mut four = [0u8; 4 * dirent::LEN];
    dev.read_at(&mut four, first.disk_offset)?;
    let is_lfn = |i: usize| is_long_name(slots.get(&four, i));
    let name = |i: usize| dirent::NAME.get(slots.get(&four, i));
    if !(is_lfn(0) && name(1) == *dirent::DOT_NAME && is_lfn(2) && name(3) == *dirent::DOTDOT_NAME)
    {
        return Ok(());
    }
    let mut fixed = [0u8; 4 * dirent::LEN];
    for (to, from) in [(0, 1), (1, 3)] {
        let e = slots.get_mut(&mut fixed, to);
        e.copy_from_slice(slots.get(&four, from));
        // The directory's own times.
        dirent::CREATION_CENTIS.set(e, dirent::CREATION_CENTIS.get(dir_entry));
        dirent::CREATION_TIME.set(e, dirent::CREATION_TIME.get(dir_entry));
        dirent::CREATION_DATE.set(e, dirent::CREATION_DATE.get(dir_entry));
        dirent::ACCESS_DATE.set(e, dirent::ACCESS_DATE.get(dir_entry));
        dirent::WRITE_TIME.set(e, dirent::WRITE_TIME.get(dir_entry));
        dirent::WRITE_DATE.set(e, dirent::WRITE_DATE.get(dir_entry));
    }
    if parent_is_root {
        // `..` of a top-level directory names cluster 0, even on FAT32 whose root has a
        // cluster of its own (fatfs 0.3 writes the root's cluster).
        let dotdot = slots.get_mut(&mut fixed, 1);
        dirent::FIRST_CLUSTER_HI.set(dotdot, 0);
        dirent::FIRST_CLUSTER_LO.set(dotdot, 0);
    }
    dirent::FIRST_BYTE.set(slots.get_mut(&mut fixed, 2), dirent::DELETED);
    dirent::FIRST_BYTE.set(slots.get_mut(&mut fixed, 3), dirent::DELETED);
    dev.write_at(&fixed, first.disk_offset)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_times_round_trip_through_the_reader() {
        // 2001-02-03 04:05:07.25 → 04:05:06 plus 125 hundredths for the creation time.
        let t = Timestamp {
            secs: 981_173_107,
            nanos: 250_000_000,
        };
        let (date, time, centis) = dos_time(t).unwrap();
        assert_eq!(date, ((2001 - 1980) << 9) | (2 << 5) | 3);
        assert_eq!(time, (4 << 11) | (5 << 5) | 3);
        assert_eq!(centis, 125);
        assert!(
            dos_time(Timestamp { secs: 0, nanos: 0 }).is_none(),
            "1970 predates FAT"
        );
    }
}
