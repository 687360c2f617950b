//! Captures in the catalog: every qcow2, VHDX or raw (`.img`/`.raw`) image under
//! `DATA_DIR/captures`, with its analysis (the `inspect` report: partitions, filesystems, labels,
//! used bytes, OS) cached and recomputed when the file's size or modification time changes.
//! A refresh also learns each capture's place in a chain from the files themselves (a qcow2
//! overlay's backing file, the chunk map beside it; [`super::chains`]); what only the capture
//! job knows (the source disk, a files-mode base, the statistics) it records afterwards
//! ([`Catalog::record_capture`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use super::chains::{self, Backing, Relation};
use super::{unix_now, Catalog, CatalogError};
use diskferry_imaging::chunkmap::{self, ChunkMap, Layout};
use diskferry_imaging::inspect::{self, DiskReport};
use diskferry_vdisk::{self as vdisk, Detected};

/// Directories below `captures` deeper than this are not searched.
const MAX_DEPTH: usize = 4;

/// One capture as the catalog knows it.
#[derive(Debug, Clone, Default, Serialize)]
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
    /// The disk of that machine, when a capture job made it.
    pub source_disk: Option<String>,
    /// The capture this one was made incrementally on (path relative to the captures
    /// directory), and how it uses it.
    pub base: Option<String>,
    pub relation: Option<Relation>,
    /// A chunk map that matches the image lies beside it: a later capture can be incremental
    /// on this one.
    pub chunk_map: bool,
    /// How the image holds its source, as its chunk map says: "whole-disk" or "partitions".
    pub layout: Option<String>,
    /// An incremental capture's statistics (chunks, changed_chunks, changed_bytes,
    /// reused_bytes), as its job recorded them.
    pub incremental: Option<serde_json::Value>,
}

/// What a capture job knows about the capture it wrote.
#[derive(Debug, Clone, Default)]
pub struct CaptureRecording {
    pub machine: String,
    pub disk: String,
    /// The base (path relative to the captures directory) and how the capture uses it.
    pub base: Option<(String, Relation)>,
    pub incremental: Option<serde_json::Value>,
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
                       analysis, analysis_error, source_machine, added_at, source_disk, \
                       base_path, base_relation, chunk_map, layout, incremental";

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
        source_disk: row.get(11)?,
        base: row.get(12)?,
        relation: row
            .get::<_, Option<String>>(13)?
            .and_then(|r| Relation::parse(&r)),
        chunk_map: row.get(14)?,
        layout: row.get(15)?,
        incremental: row
            .get::<_, Option<String>>(16)?
            .and_then(|i| serde_json::from_str(&i).ok()),
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

    /// Records what the job that wrote a capture knows: its source machine and disk, its
    /// base and its statistics. An overlay's base, found from its backing file, is kept; a
    /// files base is the job's word alone (none for a full capture).
    pub fn record_capture(&self, rel_path: &str, r: &CaptureRecording) -> Result<(), CatalogError> {
        let (base, relation) = match &r.base {
            Some((b, rel)) => (Some(b.as_str()), Some(rel.name())),
            None => (None, None),
        };
        let incremental = r.incremental.as_ref().map(|i| i.to_string());
        self.db()
            .execute(
                "UPDATE captures SET source_machine = ?1, source_disk = ?2,
                    base_path = CASE WHEN ?3 IS NOT NULL THEN ?3
                        WHEN base_relation = 'overlay' THEN base_path END,
                    base_relation = CASE WHEN ?4 IS NOT NULL THEN ?4
                        WHEN base_relation = 'overlay' THEN base_relation END,
                    incremental = ?5
                 WHERE path = ?6",
                params![r.machine, r.disk, base, relation, incremental, rel_path],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Deletes a capture's image and chunk map and forgets it; refused while overlays use it
    /// as their backing file (they would no longer open).
    pub fn delete_capture(&self, id: i64) -> Result<Option<CaptureRecord>, CatalogError> {
        let all = self.captures()?;
        let Some(rec) = all.iter().find(|c| c.id == id).cloned() else {
            return Ok(None);
        };
        let dependents: Vec<String> = chains::children_of(&all, &rec)
            .into_iter()
            .filter(|c| c.relation == Some(Relation::Overlay))
            .map(|c| c.name.clone())
            .collect();
        if !dependents.is_empty() {
            return Err(CatalogError::HasDependents {
                capture: rec.name,
                dependents,
            });
        }
        let image = self.capture_file(&rec);
        for path in [chunkmap::path_for(&image), image] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(CatalogError::Io { path, source: e })
                }
                _ => {}
            }
        }
        self.db()
            .execute("DELETE FROM captures WHERE id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        Ok(Some(rec))
    }

    /// Brings the catalog in line with the captures directory: new images are analysed and
    /// added, changed ones re-analysed, vanished ones removed; an overlay's base is its
    /// backing file, and each capture's chunk map is checked again when it or the image
    /// changed. Analysis runs without holding the database.
    pub fn refresh_captures(&self) -> Result<RefreshReport, CatalogError> {
        let root = self.captures_dir();
        let mut found = Vec::new();
        scan(&root, &root, 0, &mut found)?;
        let known: Vec<Known> = self.rows(
            &self.db(),
            "SELECT path, file_size, mtime_ns, analysis IS NOT NULL OR analysis_error IS NOT NULL,
                map_mtime_ns FROM captures",
            [],
            |r| {
                Ok(Known {
                    path: r.get(0)?,
                    size: r.get(1)?,
                    mtime_ns: r.get(2)?,
                    analysed: r.get(3)?,
                    map_mtime_ns: r.get(4)?,
                })
            },
        )?;
        let mut report = RefreshReport::default();
        for k in &known {
            if !found.iter().any(|f| f.rel == k.path) {
                self.db()
                    .execute("DELETE FROM captures WHERE path = ?1", [&k.path])
                    .map_err(|e| self.sql(e))?;
                report.removed += 1;
            }
        }
        for f in &found {
            let previous = known.iter().find(|k| k.path == f.rel);
            let unchanged = previous
                .is_some_and(|k| k.size == f.size as i64 && k.mtime_ns == f.mtime_ns && k.analysed);
            if !unchanged {
                if !self.store_analysis(&root, f)? {
                    continue; // not an image after all
                }
                if previous.is_some() {
                    report.updated += 1;
                } else {
                    report.added += 1;
                }
            }
            let map_mtime = map_mtime_ns(&f.path);
            if !unchanged || previous.and_then(|k| k.map_mtime_ns) != map_mtime {
                self.store_map(f, map_mtime)?;
            }
        }
        Ok(report)
    }

    /// Analyses a found file and stores what it is; false when it is not an image.
    fn store_analysis(&self, root: &Path, f: &Found) -> Result<bool, CatalogError> {
        let Some(analysed) = analyse(root, &f.path) else {
            return Ok(false);
        };
        let (analysis, error) = match &analysed.report {
            Ok(r) => (serde_json::to_string(r).ok(), None),
            Err(e) => (None, Some(e.clone())),
        };
        // An overlay's base is its backing file; a file that is no overlay (any more) keeps
        // only a base its job recorded (files taken from it).
        let base = analysed.backing.map(|b| b.rel);
        self.db()
            .execute(
                "INSERT INTO captures (path, format, virtual_size, allocated_size, file_size,
                    mtime_ns, analysis, analysis_error, added_at, base_path, base_relation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,
                    CASE WHEN ?10 IS NULL THEN NULL ELSE 'overlay' END)
                 ON CONFLICT(path) DO UPDATE SET format = ?2, virtual_size = ?3,
                    allocated_size = ?4, file_size = ?5, mtime_ns = ?6, analysis = ?7,
                    analysis_error = ?8,
                    base_path = CASE WHEN ?10 IS NOT NULL THEN ?10
                        WHEN base_relation = 'overlay' THEN NULL ELSE base_path END,
                    base_relation = CASE WHEN ?10 IS NOT NULL THEN 'overlay'
                        WHEN base_relation = 'overlay' THEN NULL ELSE base_relation END",
                params![
                    f.rel,
                    analysed.format,
                    analysed.virtual_size as i64,
                    f.allocated as i64,
                    f.size as i64,
                    f.mtime_ns,
                    analysis,
                    error,
                    unix_now(),
                    base,
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(true)
    }

    /// Records whether a chunk map that matches the image lies beside it, and its layout.
    fn store_map(&self, f: &Found, map_mtime: Option<i64>) -> Result<(), CatalogError> {
        let layout = map_mtime.and_then(|_| usable_map_layout(&f.path));
        let layout = layout.map(|l| match l {
            Layout::WholeDisk => "whole-disk",
            Layout::Partitions => "partitions",
        });
        self.db()
            .execute(
                "UPDATE captures SET chunk_map = ?1, layout = ?2, map_mtime_ns = ?3
                 WHERE path = ?4",
                params![layout.is_some(), layout, map_mtime, f.rel],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }
}

/// What the catalog held for a file at the start of a refresh.
struct Known {
    path: String,
    size: i64,
    mtime_ns: i64,
    analysed: bool,
    map_mtime_ns: Option<i64>,
}

/// The modification time of the chunk map beside `image`, if there is one.
fn map_mtime_ns(image: &Path) -> Option<i64> {
    let meta = std::fs::metadata(chunkmap::path_for(image)).ok()?;
    Some(meta.mtime() * 1_000_000_000 + meta.mtime_nsec())
}

/// The layout the chunk map beside `image` records, when it loads and still describes the
/// image as it is (a base an incremental capture would accept).
fn usable_map_layout(image: &Path) -> Option<Layout> {
    let map = ChunkMap::load(image)
        .inspect_err(|e| tracing::warn!("{e}"))
        .ok()?;
    let stamp = chunkmap::stamp_of(image).ok()?;
    (stamp == map.image_stamp).then_some(map.layout)
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
    /// An overlay's backing file, inside the captures directory.
    backing: Option<Backing>,
}

/// Opens an image (an overlay through its backing chain, when that stays inside the
/// captures directory under `root`) and inspects it; `None` when the file is not an image
/// (raw images need an `.img` or `.raw` name, so that stray files are not taken for disks).
fn analyse(root: &Path, path: &Path) -> Option<Analysed> {
    let raw_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("img") || e.eq_ignore_ascii_case("raw"));
    let backing = chains::backing_of(root, path);
    let (follow, backing) = match backing {
        Ok(b) => (b.is_some(), b),
        Err(why) => return Some(broken(path, raw_name, why)),
    };
    match vdisk::open_image(path, follow) {
        Ok((kind, dev)) => {
            let format = match kind {
                Detected::Raw if !raw_name => return None,
                kind => kind.name(),
            };
            Some(Analysed {
                format,
                virtual_size: dev.size(),
                report: inspect::inspect(&dev).map_err(|e| e.to_string()),
                backing,
            })
        }
        Err(e) => Some(Analysed {
            backing,
            ..broken(path, raw_name, e.to_string())
        }),
    }
    .filter(|a| a.format != "none")
}

/// A file that claims to be an image but cannot be read is listed, with the reason (`none`
/// as its format when it is no image at all).
fn broken(path: &Path, raw_name: bool, why: String) -> Analysed {
    let detected = diskferry_blockdev::FileDevice::open(path, false)
        .ok()
        .and_then(|dev| vdisk::detect(&dev).ok());
    let format = match detected {
        Some(Detected::Raw) | None if raw_name => "raw",
        Some(Detected::Raw) | None => "none",
        Some(kind) => kind.name(),
    };
    Analysed {
        format,
        virtual_size: 0,
        report: Err(why),
        backing: None,
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
