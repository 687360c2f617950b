//! Writing a FAT12/16/32 filesystem from any [`Filesystem`] (a captured one, or a host
//! directory): `fatfs` formats the volume and lays out directories, names (long names with
//! generated short aliases) and file data; then each file's directory entry is finished by
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

use super::{FileKind, Filesystem, FsError, FsKind, NodeId, Result, Timestamp};
use diskferry_blockdev::{BlockDevice, BlockReader};

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
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FatReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Entries FAT cannot hold (symlinks, devices, ...) and entries that failed, with why.
    pub skipped: Vec<(String, String)>,
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
    let sectors = dev.size() / 512;
    let total = u32::try_from(sectors)
        .map_err(|_| FsError::Unsupported("FAT volumes end at 2 TiB".into()))?;
    let mut format = fatfs::FormatVolumeOptions::new().total_sectors(total);
    if let Some(label) = &opts.label {
        if label.len() > 11 || !label.is_ascii() {
            return Err(FsError::Unsupported(format!(
                "FAT label {label:?} must be at most 11 ASCII characters"
            )));
        }
        let mut l = [b' '; 11];
        l[..label.len()].copy_from_slice(label.to_ascii_uppercase().as_bytes());
        format = format.volume_label(l);
    }
    if let Some(serial) = opts.serial {
        format = format.volume_id(serial);
    }
    if let Some(c) = opts.cluster_size {
        if !c.is_power_of_two() || !(512..=32768).contains(&c) {
            return Err(FsError::Unsupported(format!(
                "cluster size {c} is not a power of two from 512 to 32768"
            )));
        }
        format = format.bytes_per_cluster(c);
    }
    if let Some(kind) = opts.kind {
        format = format.fat_type(match kind {
            FsKind::Fat12 => fatfs::FatType::Fat12,
            FsKind::Fat16 => fatfs::FatType::Fat16,
            FsKind::Fat32 => fatfs::FatType::Fat32,
            other => {
                return Err(FsError::Unsupported(format!(
                    "{} is not a FAT type",
                    other.name()
                )))
            }
        });
    }
    let guarded = |what: &str, f: &mut dyn FnMut() -> std::io::Result<()>| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err(std::io::Error::other("fatfs panicked")))
            .map_err(|e| fat_err(what, e))
    };
    guarded("format", &mut || {
        fatfs::format_volume(BlockReader::new(Arc::clone(&dev)), format.clone())
    })?;

    let mut report = FatReport::default();
    // (path in the new volume, source node) of everything written, for the patching pass.
    let mut written: Vec<(String, NodeId)> = Vec::new();
    let mut walk_errors = Vec::new();
    // fatfs is third-party code fed names and sizes from a possibly damaged source: a panic
    // in it becomes an error here.
    let populated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        let fs = fatfs::FileSystem::new(
            BlockReader::new(Arc::clone(&dev)),
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
                let fail = |report: &mut FatReport, why: String| {
                    report.skipped.push((path.to_string(), why));
                };
                if std::str::from_utf8(&e.name).is_err() {
                    fail(&mut report, "the name is not valid UTF-8".into());
                    return Ok(());
                }
                let root = fs.root_dir();
                match e.kind {
                    FileKind::Dir => match root.create_dir(path) {
                        Ok(_) => {
                            report.dirs += 1;
                            written.push((path.to_string(), e.node));
                        }
                        Err(err) => fail(&mut report, err.to_string()),
                    },
                    FileKind::File => {
                        let meta = source.metadata(e.node)?;
                        let mut file = match root.create_file(path) {
                            Ok(f) => f,
                            Err(err) => {
                                fail(&mut report, err.to_string());
                                return Ok(());
                            }
                        };
                        let mut at = 0u64;
                        while at < meta.size {
                            let n = source.read_at(e.node, at, &mut buf)?;
                            if n == 0 {
                                break;
                            }
                            file.write_all(&buf[..n])
                                .map_err(|err| fat_err(path, err))?;
                            at += n as u64;
                        }
                        file.flush().map_err(|err| fat_err(path, err))?;
                        report.files += 1;
                        report.bytes += at;
                        written.push((path.to_string(), e.node));
                    }
                    other => fail(&mut report, format!("FAT cannot hold a {}", other.name())),
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

    // Finish each entry: attributes and times. Our reader finds every entry in one walk.
    let ours = super::fat::Fat::open(Arc::clone(&dev))?;
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
        let meta = source.metadata(node)?;
        let entry = *entries
            .get(&path)
            .ok_or_else(|| FsError::NotFound(format!("{path} in the new volume")))?;
        let mut raw = [0u8; 32];
        dev.read_at(&mut raw, entry)?;
        let dir_bit = raw[11] & 0x10;
        let source_attrs = if attributes_are_dos {
            (meta.flags & 0x27) as u8
        } else if meta.kind == FileKind::File {
            // From a Unix tree: archive set (a new file), read-only when no one may write.
            0x20 | u8::from(meta.mode & 0o222 == 0)
        } else {
            0
        };
        raw[11] = dir_bit | source_attrs;
        if let Some((date, time, centis)) = meta.crtime.or(meta.mtime).and_then(dos_time) {
            raw[13] = centis;
            raw[14..16].copy_from_slice(&time.to_le_bytes());
            raw[16..18].copy_from_slice(&date.to_le_bytes());
        }
        if let Some((date, _, _)) = meta.atime.and_then(dos_time) {
            raw[18..20].copy_from_slice(&date.to_le_bytes());
        }
        if let Some((date, time, _)) = meta.mtime.and_then(dos_time) {
            raw[22..24].copy_from_slice(&time.to_le_bytes());
            raw[24..26].copy_from_slice(&date.to_le_bytes());
        }
        dev.write_at(&raw, entry)?;
        if meta.kind == FileKind::Dir {
            fix_dot_entries(&*dev, &ours, entry, &raw, !path.contains('/'))?;
        }
    }
    dev.flush()?;
    Ok(report)
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
    dir_entry: &[u8; 32],
    parent_is_root: bool,
) -> Result<()> {
    let Some(first) = ours.extents(entry)?.first().copied() else {
        return Ok(());
    };
    let mut slots = [0u8; 128];
    dev.read_at(&mut slots, first.disk_offset)?;
    let is_lfn = |i: usize| slots[32 * i + 11] & 0x3F == 0x0F;
    let name = |i: usize| &slots[32 * i..32 * i + 11];
    if !(is_lfn(0) && name(1) == b".          " && is_lfn(2) && name(3) == b"..         ") {
        return Ok(());
    }
    let (mut dot, mut dotdot) = ([0u8; 32], [0u8; 32]);
    dot.copy_from_slice(&slots[32..64]);
    dotdot.copy_from_slice(&slots[96..128]);
    for e in [&mut dot, &mut dotdot] {
        e[13..20].copy_from_slice(&dir_entry[13..20]);
        e[22..26].copy_from_slice(&dir_entry[22..26]);
    }
    if parent_is_root {
        // `..` of a top-level directory names cluster 0, even on FAT32 whose root has a
        // cluster of its own (fatfs 0.3 writes the root's cluster).
        dotdot[20..22].fill(0);
        dotdot[26..28].fill(0);
    }
    let mut fixed = [0u8; 128];
    fixed[..32].copy_from_slice(&dot);
    fixed[32..64].copy_from_slice(&dotdot);
    fixed[64] = 0xE5;
    fixed[96] = 0xE5;
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
