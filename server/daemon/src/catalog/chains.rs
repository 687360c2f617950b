//! Capture chains: which capture another was made incrementally on. An overlay (a qcow2
//! whose backing file is its base) depends on its base for every read; a files-mode
//! incremental capture only took unchanged files from its base while it was written and
//! stands alone afterwards. The catalog learns overlays' bases from their backing file names
//! ([`backing_of`], which follows nothing outside the captures directory) and files-mode
//! bases from the job that wrote them; [`chain_of`] and [`children_of`] read the chains off
//! the records.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_vdisk::{qcow2::Qcow2, Detected};
use serde::Serialize;

use super::CaptureRecord;

/// Backing files followed at most when checking an overlay's chain (qemu's own limit is of
/// this order; a longer chain is refused rather than walked).
const MAX_CHAIN: usize = 16;

/// How a capture uses its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Relation {
    /// A qcow2 overlay whose backing file is the base: it needs the base to be read.
    Overlay,
    /// A new image whose unchanged files were copied from the base: independent of it.
    Files,
}

impl Relation {
    pub fn name(self) -> &'static str {
        match self {
            Relation::Overlay => "overlay",
            Relation::Files => "files",
        }
    }

    pub fn parse(s: &str) -> Option<Relation> {
        match s {
            "overlay" => Some(Relation::Overlay),
            "files" => Some(Relation::Files),
            _ => None,
        }
    }
}

/// An overlay's backing file, as a path relative to the captures directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Backing {
    pub rel: String,
}

/// The backing file named by the qcow2 image at `path`, if it is an overlay: `Err` (the
/// reason) when it or any file further down its chain lies outside `root` or the chain is
/// too long — such an image is listed but never read through. A backing file that vanished
/// is still named (its overlay's analysis then says it cannot be read).
pub(super) fn backing_of(root: &Path, path: &Path) -> Result<Option<Backing>, String> {
    let root = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut first = None;
    let mut at = path.to_path_buf();
    for _ in 0..MAX_CHAIN {
        let Some(name) = backing_name(&at) else {
            return Ok(first);
        };
        let next = resolve(&at, &name)
            .filter(|p| p.starts_with(&root))
            .ok_or_else(|| {
                format!(
                    "{}: backing file {name:?} is outside the captures directory; it is not followed",
                    at.display()
                )
            })?;
        if first.is_none() {
            let rel = next.strip_prefix(&root).unwrap_or(&next);
            first = Some(Backing {
                rel: rel.to_string_lossy().into_owned(),
            });
        }
        if !next.exists() {
            return Ok(first);
        }
        at = next;
    }
    Err(format!(
        "{}: its backing chain is longer than {MAX_CHAIN} files",
        path.display()
    ))
}

impl super::Catalog {
    /// Opens the image of a capture for reading: an overlay through its backing chain, which
    /// must stay inside the captures directory (checked now, not only when catalogued).
    pub fn open_capture(&self, image: &Path) -> Result<Arc<dyn BlockDevice>, super::CatalogError> {
        let follow = backing_of(&self.captures_dir(), image)
            .map_err(super::CatalogError::Invalid)?
            .is_some();
        let (_, dev) =
            diskferry_vdisk::open_image(image, follow).map_err(|e| super::CatalogError::Image {
                path: image.to_path_buf(),
                source: Box::new(e),
            })?;
        Ok(dev)
    }
}

/// The backing file name in the header of a qcow2 image, if the file is one and has one.
fn backing_name(path: &Path) -> Option<String> {
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, false).ok()?);
    if diskferry_vdisk::detect(&*file).ok()? != Detected::Qcow2 {
        return None;
    }
    Qcow2::inspect(file, path)
        .ok()?
        .backing_name()
        .map(str::to_string)
}

/// Where a backing file `name` of the image at `image` is (relative names are relative to
/// the image's directory, as qemu reads them); `None` for a name with `..` in it.
fn resolve(image: &Path, name: &str) -> Option<PathBuf> {
    let name = Path::new(name);
    if name.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    let joined = image.parent()?.join(name);
    // A link could lead anywhere: where it leads is what counts. A missing file is judged by
    // its name.
    Some(std::fs::canonicalize(&joined).unwrap_or(joined))
}

/// The bases of `rec` from its own up to the root of its chain, by name (a base no longer
/// in the catalog ends the list with its path). Bounded by the number of captures, so a
/// cycle in hostile headers cannot loop.
pub fn chain_of(all: &[CaptureRecord], rec: &CaptureRecord) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = rec;
    for _ in 0..all.len() {
        let Some(base) = at.base.as_deref() else {
            break;
        };
        match all.iter().find(|c| c.path == base) {
            Some(b) => {
                names.push(b.name.clone());
                at = b;
            }
            None => {
                names.push(base.to_string());
                break;
            }
        }
    }
    names
}

/// The captures made incrementally on `rec`.
pub fn children_of<'a>(all: &'a [CaptureRecord], rec: &CaptureRecord) -> Vec<&'a CaptureRecord> {
    all.iter()
        .filter(|c| c.base.as_deref() == Some(rec.path.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{CaptureRecording, Catalog, CatalogError};
    use diskferry_blockdev::MemoryDevice;
    use diskferry_imaging::chunkmap::{ChunkMap, Layout};
    use std::process::Command;

    fn qemu_img(args: &[&str], dir: &Path) {
        let out = Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("qemu-img is installed");
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    }

    /// base.qcow2 ← child.qcow2 ← grand.qcow2, made by qemu-img with relative names.
    fn chain_dir() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let caps = c.captures_dir();
        qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], &caps);
        for (child, base) in [
            ("child.qcow2", "base.qcow2"),
            ("grand.qcow2", "child.qcow2"),
        ] {
            qemu_img(
                &[
                    "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", child,
                ],
                &caps,
            );
        }
        (dir, c)
    }

    fn by_name<'a>(all: &'a [CaptureRecord], name: &str) -> &'a CaptureRecord {
        all.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn overlays_chains_come_from_their_backing_files() {
        let (_dir, c) = chain_dir();
        c.refresh_captures().unwrap();
        let all = c.captures().unwrap();
        let (base, child, grand) = (
            by_name(&all, "base.qcow2"),
            by_name(&all, "child.qcow2"),
            by_name(&all, "grand.qcow2"),
        );
        assert_eq!(child.base.as_deref(), Some("base.qcow2"));
        assert_eq!(child.relation, Some(Relation::Overlay));
        assert_eq!(grand.base.as_deref(), Some("child.qcow2"));
        assert_eq!(base.base, None);
        // Read through its chain: the overlay is analysed, not refused.
        assert_eq!(grand.virtual_size, 4 << 20, "{:?}", grand.analysis_error);
        assert!(grand.analysis_error.is_none(), "{:?}", grand.analysis_error);
        assert_eq!(chain_of(&all, grand), ["child.qcow2", "base.qcow2"]);
        assert!(chain_of(&all, base).is_empty());
        let kids: Vec<&str> = children_of(&all, base)
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(kids, ["child.qcow2"]);
    }

    #[test]
    fn a_backing_file_outside_the_captures_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("data")).unwrap();
        qemu_img(
            &["create", "-q", "-f", "qcow2", "outside.qcow2", "1M"],
            dir.path(),
        );
        let outside = dir.path().join("outside.qcow2");
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                outside.to_str().unwrap(),
                "-F",
                "qcow2",
                "sneaky.qcow2",
            ],
            &c.captures_dir(),
        );
        c.refresh_captures().unwrap();
        let all = c.captures().unwrap();
        let sneaky = by_name(&all, "sneaky.qcow2");
        assert_eq!(sneaky.base, None);
        let why = sneaky.analysis_error.as_deref().unwrap_or("");
        assert!(why.contains("outside the captures directory"), "{why}");
    }

    #[test]
    fn a_base_with_overlays_is_not_deleted_but_a_files_base_is() {
        let (_dir, c) = chain_dir();
        c.refresh_captures().unwrap();
        let all = c.captures().unwrap();
        let base = by_name(&all, "base.qcow2").id;
        match c.delete_capture(base) {
            Err(CatalogError::HasDependents { dependents, .. }) => {
                assert_eq!(dependents, ["child.qcow2"])
            }
            other => panic!("deleting a backing file was not refused: {other:?}"),
        }
        assert!(c.captures_dir().join("base.qcow2").exists());
        // Deleted from the top of the chain down, each goes.
        for name in ["grand.qcow2", "child.qcow2"] {
            let id = by_name(&all, name).id;
            assert!(c.delete_capture(id).unwrap().is_some());
            assert!(!c.captures_dir().join(name).exists());
        }
        // A files-mode capture took files from the base once: it does not hold it.
        qemu_img(
            &["create", "-q", "-f", "qcow2", "files.qcow2", "4M"],
            &c.captures_dir(),
        );
        c.refresh_captures().unwrap();
        let rec = CaptureRecording {
            machine: "m".into(),
            disk: "sda".into(),
            base: Some(("base.qcow2".into(), Relation::Files)),
            incremental: None,
        };
        c.record_capture("files.qcow2", &rec).unwrap();
        let all = c.captures().unwrap();
        assert_eq!(children_of(&all, by_name(&all, "base.qcow2")).len(), 1);
        c.delete_capture(base).unwrap().unwrap();
        c.refresh_captures().unwrap();
        let all = c.captures().unwrap();
        // Its record still names the base it came from, now gone from the catalog.
        assert_eq!(chain_of(&all, by_name(&all, "files.qcow2")), ["base.qcow2"]);
    }

    #[test]
    fn a_chunk_map_counts_while_it_matches_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let image = c.captures_dir().join("disk.img");
        std::fs::write(&image, vec![7u8; 3 << 20]).unwrap();
        c.refresh_captures().unwrap();
        assert!(!c.captures().unwrap()[0].chunk_map);
        let source: std::sync::Arc<dyn diskferry_blockdev::BlockDevice> =
            std::sync::Arc::new(MemoryDevice::read_only(vec![7u8; 3 << 20]));
        ChunkMap::of_source(&source, &image, Layout::WholeDisk)
            .unwrap()
            .save(&image)
            .unwrap();
        c.refresh_captures().unwrap();
        let rec = c.captures().unwrap().remove(0);
        assert!(rec.chunk_map);
        assert_eq!(rec.layout.as_deref(), Some("whole-disk"));
        // The image changed after its map: no longer a base.
        std::fs::write(&image, vec![8u8; 4 << 20]).unwrap();
        c.refresh_captures().unwrap();
        assert!(!c.captures().unwrap()[0].chunk_map);
    }
}
