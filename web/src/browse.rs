//! Looking inside captures without extracting them: a capture's partition opened through the
//! image reader and our filesystem readers (kept open in a small cache keyed by the file's
//! identity, so browsing a directory is one request, not one image open), directory listings,
//! and file bytes read in chunks. Everything here is blocking: callers run it in
//! `spawn_blocking`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use diskferry_daemon::catalog::{CaptureRecord, Catalog};
use diskferry_fs::{self as fs, tree, FileKind, Filesystem, FsError, NodeId};
use diskferry_imaging::inspect;
use serde::Serialize;

use crate::error::Failure;
use crate::innerpath::InnerPath;

/// Open filesystems kept at most.
const CACHE_ENTRIES: usize = 16;
/// Entries listed from one directory at most (a hostile image can claim millions).
pub const MAX_LISTING: usize = 200_000;

/// Which partition of which version of a capture.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    id: i64,
    file_size: u64,
    modified: i64,
    partition: u32,
}

/// Open filesystems of captures' partitions.
#[derive(Default)]
pub struct Volumes {
    open: Mutex<Vec<(Key, Arc<dyn Filesystem>)>>,
}

impl Volumes {
    /// The filesystem in partition `number` (from 1, as in the table) of `capture`.
    pub fn open(
        &self,
        catalog: &Catalog,
        capture: &CaptureRecord,
        number: u32,
    ) -> Result<Arc<dyn Filesystem>, Failure> {
        let key = Key {
            id: capture.id,
            file_size: capture.file_size,
            modified: capture.modified,
            partition: number,
        };
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = open.iter().position(|(k, _)| *k == key) {
                // Most recently used last.
                let entry = open.remove(i);
                let fs = Arc::clone(&entry.1);
                open.push(entry);
                return Ok(fs);
            }
        }
        let path = catalog.capture_file(capture);
        // An overlay reads through its backing chain (inside the captures directory only).
        let disk = catalog
            .open_capture(&path)
            .map_err(|e| Failure::internal(format!("cannot open capture {}: {e}", capture.name)))?;
        let (_, volumes) = inspect::volumes(&disk).map_err(|e| {
            Failure::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                format!("capture {}: {e}", capture.name),
            )
        })?;
        // A disk without a table is one volume (number 0 in reports), reachable as 1 too.
        let dev = volumes
            .iter()
            .find(|(p, _)| p.number == number || (p.number == 0 && number == 1))
            .map(|(_, d)| Arc::clone(d))
            .ok_or_else(|| {
                let have: Vec<String> = volumes
                    .iter()
                    .map(|(p, _)| p.number.max(1).to_string())
                    .collect();
                Failure::not_found(format!(
                    "capture {} has no partition {number} (it has: {})",
                    capture.name,
                    have.join(", ")
                ))
            })?;
        let fs: Arc<dyn Filesystem> = Arc::from(fs::open(dev).map_err(|e| {
            Failure::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "partition {number} of {} cannot be browsed: {e}",
                    capture.name
                ),
            )
        })?);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(k, _)| k.id != key.id || *k == key);
        if open.len() >= CACHE_ENTRIES {
            open.remove(0);
        }
        open.push((key, Arc::clone(&fs)));
        Ok(fs)
    }
}

/// Which listing: a capture (as of its size and modification time), partition, path.
#[derive(Clone, PartialEq, Eq)]
pub struct ListingKey {
    pub capture: i64,
    pub file_size: u64,
    pub modified: i64,
    pub partition: String,
    pub path: String,
}

/// Rendered directory listings, most recently used last, at most [`LISTING_CACHE_BYTES`].
#[derive(Default)]
pub struct Listings {
    kept: Mutex<Vec<(ListingKey, bytes::Bytes)>>,
}

/// Bytes of rendered listings kept at most.
pub const LISTING_CACHE_BYTES: usize = 64 << 20;

impl Listings {
    pub fn get(&self, key: &ListingKey) -> Option<bytes::Bytes> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let i = kept.iter().position(|(k, _)| k == key)?;
        let entry = kept.remove(i);
        let body = entry.1.clone();
        kept.push(entry);
        Some(body)
    }

    pub fn put(&self, key: ListingKey, body: bytes::Bytes) {
        if body.len() > LISTING_CACHE_BYTES / 4 {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        // Older versions of the same capture are gone for good.
        kept.retain(|(k, _)| {
            k.capture != key.capture || (k.file_size == key.file_size && k.modified == key.modified)
        });
        kept.push((key, body));
        let mut total: usize = kept.iter().map(|(_, b)| b.len()).sum();
        while total > LISTING_CACHE_BYTES {
            let (_, b) = kept.remove(0);
            total -= b.len();
        }
    }
}

/// One entry of a directory listing, as the API and the pages show it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    /// "file", "dir", "symlink", "char-device", "block-device", "fifo" or "socket".
    pub kind: &'static str,
    pub size: u64,
    /// Modification time, seconds since the epoch (UTC).
    pub mtime: Option<i64>,
    /// Permission bits (with setuid/setgid/sticky), e.g. 493 = 0o755.
    pub mode: u32,
    /// `rwxr-xr-x` form of `mode`.
    pub permissions: String,
    pub uid: u32,
    pub gid: u32,
    /// Where a symbolic link points.
    pub target: Option<String>,
}

/// The entries of the directory at `path`, sorted: directories first, then by name.
pub fn list(fs: &dyn Filesystem, path: &InnerPath) -> Result<Vec<Entry>, Failure> {
    let dir = fs.resolve_within(&path.as_string())?;
    let meta = fs.metadata(dir)?;
    if meta.kind != FileKind::Dir {
        return Err(Failure::bad_request(format!(
            "{} is a {}, not a directory",
            path.as_string(),
            meta.kind.name()
        )));
    }
    let entries = fs.read_dir(dir)?;
    if entries.len() > MAX_LISTING {
        return Err(Failure::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{} holds {} entries, more than the {MAX_LISTING} a listing shows",
                path.as_string(),
                entries.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        // One unreadable entry is shown as such, not a failed listing.
        let m = fs.metadata(e.node).ok();
        let target = (e.kind == FileKind::Symlink)
            .then(|| fs.read_link(e.node).ok())
            .flatten()
            .map(|t| String::from_utf8_lossy(&t).into_owned());
        out.push(Entry {
            name: e.name_lossy(),
            kind: e.kind.name(),
            size: m.as_ref().map_or(0, |m| m.size),
            mtime: m.as_ref().and_then(|m| m.mtime).map(|t| t.secs),
            mode: m.as_ref().map_or(0, |m| m.mode),
            permissions: fs::mode_string(m.as_ref().map_or(0, |m| m.mode)),
            uid: m.as_ref().map_or(0, |m| m.uid),
            gid: m.as_ref().map_or(0, |m| m.gid),
            target,
        });
    }
    out.sort_by(|a, b| {
        (a.kind != "dir")
            .cmp(&(b.kind != "dir"))
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(out)
}

/// The regular file at `path` (links followed inside the partition): its node and size.
pub fn file(fs: &dyn Filesystem, path: &InnerPath) -> Result<(NodeId, u64), Failure> {
    let node = fs.resolve_within(&path.as_string())?;
    let meta = fs.metadata(node)?;
    if meta.kind != FileKind::File {
        return Err(Failure::bad_request(format!(
            "{} is a {}, not a file",
            path.as_string(),
            meta.kind.name()
        )));
    }
    Ok((node, meta.size))
}

/// Reads up to `buf.len()` bytes at `offset` (see [`fs::read_full`]).
pub fn read_full(
    fs: &dyn Filesystem,
    node: NodeId,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize, Failure> {
    Ok(fs::read_full(fs, node, offset, buf)?)
}

/// Whether bytes look like text to show inline (UTF-8 without NULs).
pub fn looks_like_text(bytes: &[u8]) -> bool {
    !bytes.contains(&0)
        && match std::str::from_utf8(bytes) {
            Ok(_) => true,
            // A multi-byte character cut at the end of a sample is still text.
            Err(e) => e.error_len().is_none() && bytes.len() - e.valid_up_to() < 4,
        }
}

/// Files changed between two directory trees, for comparing captures.
#[derive(Debug, Default, Serialize)]
pub struct Comparison {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// True when the walk stopped at the entry limit.
    pub truncated: bool,
}

/// Walks both filesystems from the root and reports paths present only in `b` (added), only
/// in `a` (removed), and in both with a different kind, size, mode, modification time or link
/// target (changed). At most `limit` entries are walked on each side.
pub fn compare(
    a: &dyn Filesystem,
    b: &dyn Filesystem,
    limit: usize,
) -> Result<Comparison, Failure> {
    let left = summary(a, limit)?;
    let right = summary(b, limit)?;
    let mut out = Comparison {
        truncated: left.1 || right.1,
        ..Comparison::default()
    };
    for (path, l) in &left.0 {
        match right.0.get(path) {
            None => out.removed.push(path.clone()),
            Some(r) if r != l => out.changed.push(path.clone()),
            Some(_) => {}
        }
    }
    for path in right.0.keys() {
        if !left.0.contains_key(path) {
            out.added.push(path.clone());
        }
    }
    out.added.sort();
    out.removed.sort();
    out.changed.sort();
    Ok(out)
}

type Summary = (&'static str, u64, u32, Option<(i64, u32)>, Option<Vec<u8>>);

/// Path → what `compare` looks at; and whether the limit cut the walk short. A directory
/// loop or an unreadable directory fails the comparison.
fn summary(fs: &dyn Filesystem, limit: usize) -> Result<(HashMap<String, Summary>, bool), Failure> {
    let mut out = HashMap::new();
    let limits = tree::Limits {
        entries: limit as u64,
        ..tree::Limits::default()
    };
    for item in tree::Walk::new(fs, fs.root(), limits) {
        let (path, e) = match item {
            Ok(found) => found,
            Err(tree::WalkError::TooManyEntries { .. }) => return Ok((out, true)),
            Err(e) => return Err(FsError::from(e).into()),
        };
        let m = fs.metadata(e.node)?;
        let target = (m.kind == FileKind::Symlink)
            .then(|| fs.read_link(e.node).ok())
            .flatten();
        let size = if m.kind == FileKind::Dir { 0 } else { m.size };
        let mtime = m.mtime.map(|t| (t.secs, t.nanos));
        out.insert(
            format!("/{path}"),
            (m.kind.name(), size, m.mode, mtime, target),
        );
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(capture: i64, modified: i64, path: &str) -> ListingKey {
        ListingKey {
            capture,
            file_size: 1,
            modified,
            partition: "1".into(),
            path: path.into(),
        }
    }

    #[test]
    fn listings_are_kept_per_capture_version_and_bounded() {
        let l = Listings::default();
        l.put(key(1, 10, "/a"), bytes::Bytes::from_static(b"old"));
        assert_eq!(l.get(&key(1, 10, "/a")).unwrap(), "old");
        // The capture changed: its old listings go.
        l.put(key(1, 11, "/b"), bytes::Bytes::from_static(b"new"));
        assert!(l.get(&key(1, 10, "/a")).is_none());
        assert!(
            l.get(&key(1, 11, "/a")).is_none(),
            "a different version is a miss"
        );
        // Bounded in bytes: the least recently used go first.
        let big = bytes::Bytes::from(vec![0u8; LISTING_CACHE_BYTES / 5]);
        for i in 0..6 {
            l.put(key(2, 0, &format!("/{i}")), big.clone());
        }
        assert!(l.get(&key(2, 0, "/0")).is_none());
        assert!(l.get(&key(2, 0, "/5")).is_some());
    }
}
