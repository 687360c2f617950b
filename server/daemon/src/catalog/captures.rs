//! Captures in the catalog: every qcow2, VHDX or raw (`.img`/`.raw`) image under
//! `DATA_DIR/captures`, with its analysis (the `inspect` report: partitions, filesystems, labels,
//! used bytes, OS) cached and recomputed when the file's size or modification time changes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use super::{unix_now, Catalog, CatalogError};
use diskferry_imaging::inspect::{self, DiskReport};
use diskferry_vdisk::{self as vdisk, Detected};

/// Directories below `captures` deeper than this are not searched.
const MAX_DEPTH: usize = 4;

/// One capture as the catalog knows it.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureRecord {
    pub id: i64,
    /// Path relative to the captures directory.
    pub path: String,
    /// The file name.
    pub name: String,
    /// "qcow2", "vhdx", "vhd", "vmdk" or "raw".
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the file occupies on the server's disk.
    pub allocated_size: u64,
    pub file_size: u64,
    /// Modification time, seconds since the epoch.
    pub modified: i64,
    pub analysis: Option<DiskReport>,
    /// Why the analysis failed, when it did.
    pub analysis_error: Option<String>,
    /// The machine it was captured from, when a capture job made it.
    pub source_machine: Option<String>,
    pub added_at: i64,
}

/// What a refresh changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefreshReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

/// A file found under the captures directory.
struct Found {
    rel: String,
    path: PathBuf,
    size: u64,
    allocated: u64,
    mtime_ns: i64,
}

const COLUMNS: &str = "id, path, format, virtual_size, allocated_size, file_size, mtime_ns, \
                       analysis, analysis_error, source_machine, added_at";

fn from_row(row: &Row<'_>) -> rusqlite::Result<CaptureRecord> {
    let path: String = row.get(1)?;
    let analysis: Option<String> = row.get(7)?;
    let mtime_ns: i64 = row.get(6)?;
    Ok(CaptureRecord {
        id: row.get(0)?,
        name: path.rsplit('/').next().unwrap_or(&path).to_string(),
        path,
        format: row.get(2)?,
        virtual_size: row.get::<_, i64>(3)? as u64,
        allocated_size: row.get::<_, i64>(4)? as u64,
        file_size: row.get::<_, i64>(5)? as u64,
        modified: mtime_ns.div_euclid(1_000_000_000),
        // A cached analysis this version cannot read is recomputed on the next refresh.
        analysis: analysis.and_then(|a| serde_json::from_str(&a).ok()),
        analysis_error: row.get(8)?,
        source_machine: row.get(9)?,
        added_at: row.get(10)?,
    })
}

impl Catalog {
    /// All captures, newest first.
    pub fn captures(&self) -> Result<Vec<CaptureRecord>, CatalogError> {
        self.rows(
            &self.db(),
            &format!("SELECT {COLUMNS} FROM captures ORDER BY mtime_ns DESC, id DESC"),
            [],
            from_row,
        )
    }

    /// One capture by id.
    pub fn capture(&self, id: i64) -> Result<Option<CaptureRecord>, CatalogError> {
        self.db()
            .query_row(
                &format!("SELECT {COLUMNS} FROM captures WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// The image file of a capture.
    pub fn capture_file(&self, record: &CaptureRecord) -> PathBuf {
        self.captures_dir().join(&record.path)
    }

    /// Records which machine a capture came from (the capture job knows).
    pub fn set_source_machine(&self, rel_path: &str, machine: &str) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE captures SET source_machine = ?1 WHERE path = ?2",
                params![machine, rel_path],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Brings the catalog in line with the captures directory: new images are analysed and
    /// added, changed ones re-analysed, vanished ones removed. Analysis runs without holding
    /// the database.
    pub fn refresh_captures(&self) -> Result<RefreshReport, CatalogError> {
        let root = self.captures_dir();
        let mut found = Vec::new();
        scan(&root, &root, 0, &mut found)?;
        let known: Vec<(String, i64, i64, bool)> = self.rows(
            &self.db(),
            "SELECT path, file_size, mtime_ns, analysis IS NOT NULL OR analysis_error IS NOT NULL FROM captures",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let mut report = RefreshReport::default();
        for (path, ..) in &known {
            if !found.iter().any(|f| &f.rel == path) {
                self.db()
                    .execute("DELETE FROM captures WHERE path = ?1", [path])
                    .map_err(|e| self.sql(e))?;
                report.removed += 1;
            }
        }
        for f in &found {
            let previous = known.iter().find(|k| k.0 == f.rel);
            if let Some((_, size, mtime, analysed)) = previous {
                if *size == f.size as i64 && *mtime == f.mtime_ns && *analysed {
                    continue;
                }
            }
            let Some(analysed) = analyse(&f.path) else {
                continue; // not an image after all
            };
            let (analysis, error) = match &analysed.report {
                Ok(r) => (serde_json::to_string(r).ok(), None),
                Err(e) => (None, Some(e.clone())),
            };
            self.db()
                .execute(
                    "INSERT INTO captures (path, format, virtual_size, allocated_size, file_size,
                        mtime_ns, analysis, analysis_error, added_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT(path) DO UPDATE SET format = ?2, virtual_size = ?3,
                        allocated_size = ?4, file_size = ?5, mtime_ns = ?6, analysis = ?7,
                        analysis_error = ?8",
                    params![
                        f.rel,
                        analysed.format,
                        analysed.virtual_size as i64,
                        f.allocated as i64,
                        f.size as i64,
                        f.mtime_ns,
                        analysis,
                        error,
                        unix_now()
                    ],
                )
                .map_err(|e| self.sql(e))?;
            if previous.is_some() {
                report.updated += 1;
            } else {
                report.added += 1;
            }
        }
        Ok(report)
    }
}

/// Collects the candidate image files under `dir`.
fn scan(root: &Path, dir: &Path, depth: usize, out: &mut Vec<Found>) -> Result<(), CatalogError> {
    let io = |source| CatalogError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // Hidden files and unfinished outputs (`OUT.partial`) are not captures.
        if name.starts_with('.') || name.ends_with(".partial") {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() && depth < MAX_DEPTH {
            scan(root, &path, depth + 1, out)?;
        } else if meta.is_file() {
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let Some(rel) = rel.to_str() else { continue };
            out.push(Found {
                rel: rel.to_string(),
                path: path.clone(),
                size: meta.len(),
                allocated: meta.blocks() * 512,
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            });
        }
    }
    Ok(())
}

struct Analysed {
    format: &'static str,
    virtual_size: u64,
    report: Result<DiskReport, String>,
}

/// Opens an image and inspects it; `None` when the file is not an image (raw images need an
/// `.img` or `.raw` name, so that stray files are not taken for disks).
fn analyse(path: &Path) -> Option<Analysed> {
    let raw_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("img") || e.eq_ignore_ascii_case("raw"));
    match vdisk::open_image(path, false) {
        Ok((kind, dev)) => {
            let format = match kind {
                Detected::Raw if !raw_name => return None,
                kind => kind.name(),
            };
            Some(Analysed {
                format,
                virtual_size: dev.size(),
                report: inspect::inspect(&dev).map_err(|e| e.to_string()),
            })
        }
        // A file that claims to be an image but is broken is listed, with the reason.
        Err(e) => {
            let detected = diskferry_blockdev::FileDevice::open(path, false)
                .ok()
                .and_then(|dev| vdisk::detect(&dev).ok());
            let format = match detected {
                Some(Detected::Raw) | None if raw_name => "raw",
                Some(Detected::Raw) | None => return None,
                Some(kind) => kind.name(),
            };
            Some(Analysed {
                format,
                virtual_size: 0,
                report: Err(e.to_string()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_adds_updates_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let caps = c.captures_dir();
        std::fs::write(caps.join("notes.txt"), b"not a disk").unwrap();
        std::fs::write(caps.join("run.qcow2.partial"), b"QFI\xfbunfinished").unwrap();
        std::fs::create_dir(caps.join("lab")).unwrap();
        let img = caps.join("lab/blank.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        std::fs::write(caps.join("broken.qcow2"), b"QFI\xfb\0\0\0\x03garbage").unwrap();

        let r = c.refresh_captures().unwrap();
        assert_eq!(
            r,
            RefreshReport {
                added: 2,
                updated: 0,
                removed: 0
            }
        );
        let all = c.captures().unwrap();
        let blank = all.iter().find(|r| r.path == "lab/blank.img").unwrap();
        assert_eq!(
            (blank.format.as_str(), blank.virtual_size),
            ("raw", 1 << 20)
        );
        assert_eq!(blank.name, "blank.img");
        assert_eq!(blank.analysis.as_ref().unwrap().table, "none");
        let broken = all.iter().find(|r| r.path == "broken.qcow2").unwrap();
        assert_eq!(broken.format, "qcow2");
        assert!(broken.analysis.is_none() && broken.analysis_error.is_some());

        // Unchanged files are not analysed again; a changed one is, under the same id.
        assert_eq!(c.refresh_captures().unwrap(), RefreshReport::default());
        std::fs::File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        assert_eq!(c.refresh_captures().unwrap().updated, 1);
        let again = c.capture(blank.id).unwrap().unwrap();
        assert_eq!(again.virtual_size, 2 << 20);

        std::fs::remove_file(&img).unwrap();
        assert_eq!(c.refresh_captures().unwrap().removed, 1);
        assert!(c.capture(blank.id).unwrap().is_none());
    }
}
