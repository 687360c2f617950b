//! The one bounded walk over a [`Filesystem`] that every tree walk uses (capture, verify,
//! `ls -R`, `get`, the web's compare and tar downloads): every entry below a start, depth
//! first, parents before children, with a guard against directories that contain themselves
//! or an ancestor (a hostile image), and limits on depth, entries and bytes that end the walk
//! with a typed [`WalkError`].
//!
//! Directories are recognised by their node id, remembered for the whole walk: ext4 inode
//! numbers and NTFS record numbers name a directory itself; FAT's node ids are the offsets of
//! directory entries, which lie inside the parent's clusters, so a FAT directory that points
//! back at an ancestor yields the same ids again one level down and is caught there.

use std::collections::HashSet;

use super::{DirEntry, FileKind, Filesystem, FsError, NodeId, Result};

/// Deepest directory nesting followed.
pub const MAX_DEPTH: usize = 256;
/// Most entries one walk yields.
pub const MAX_ENTRIES: u64 = 10_000_000;

/// How far a walk may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting below the start: a directory deeper than this is not entered.
    pub depth: usize,
    /// Most entries yielded; one more ends the walk with [`WalkError::TooManyEntries`].
    pub entries: u64,
    /// Most bytes the caller may charge with [`Walk::charge_bytes`] (file contents it reads).
    pub bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            depth: MAX_DEPTH,
            entries: MAX_ENTRIES,
            bytes: u64::MAX,
        }
    }
}

impl Limits {
    /// The defaults, with a byte budget for reading a volume's files out: four times its size
    /// (sparse files may read larger than the volume holds), at least 1 GiB.
    pub fn for_volume(total_bytes: u64) -> Limits {
        Limits {
            bytes: total_bytes.saturating_mul(4).max(1 << 30),
            ..Limits::default()
        }
    }
}

/// A name from a filesystem that must not become a path component elsewhere (a file written
/// out, a tar entry): empty, `.` or `..`, or holding `/` or NUL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused the name {shown:?}: {why}")]
pub struct UnsafeName {
    pub shown: String,
    pub why: &'static str,
}

/// `name` as one path component, or why it cannot be one. Names from an image are data.
pub fn check_name(name: &[u8]) -> std::result::Result<&std::ffi::OsStr, UnsafeName> {
    use std::os::unix::ffi::OsStrExt;
    let refuse = |why| UnsafeName {
        shown: String::from_utf8_lossy(name).into_owned(),
        why,
    };
    if name.is_empty() || name == b"." || name == b".." {
        return Err(refuse("it would not name a new entry"));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(refuse(
            "it holds '/' or NUL, which would leave its directory",
        ));
    }
    Ok(std::ffi::OsStr::from_bytes(name))
}

/// Why a walk skipped a directory or stopped.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    /// A directory's entries could not be read (the walk goes on without them).
    #[error("{path}: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: Box<FsError>,
    },
    /// A directory already walked turned up again: it contains itself or an ancestor, or is
    /// linked twice (the walk goes on without it).
    #[error("{path}: corrupt filesystem: directory loop (this directory was already walked)")]
    Loop { path: String },
    /// A directory nested deeper than the limit (the walk goes on without it).
    #[error("{path}: directories nested deeper than {limit}")]
    TooDeep { path: String, limit: usize },
    /// The walk stopped: more entries than the limit.
    #[error("more than {limit} entries: walk stopped")]
    TooManyEntries { limit: u64 },
    /// The walk stopped: more bytes than the limit.
    #[error("more than {limit} bytes of files: walk stopped")]
    TooManyBytes { limit: u64 },
}

impl WalkError {
    /// Whether the walk ended (a limit) rather than skipping one directory.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            WalkError::TooManyEntries { .. } | WalkError::TooManyBytes { .. }
        )
    }

    /// The path the error is about (empty for the whole walk).
    pub fn path(&self) -> &str {
        match self {
            WalkError::Unreadable { path, .. }
            | WalkError::Loop { path }
            | WalkError::TooDeep { path, .. } => path,
            WalkError::TooManyEntries { .. } | WalkError::TooManyBytes { .. } => "",
        }
    }
}

/// A directory still to be read: its path, node and depth.
type PendingDir = (String, NodeId, usize);

/// A walk in progress, as an iterator of `(path relative to the start, entry)`, paths joined
/// with `/`, each directory's entries in name order and before its subdirectories' entries.
/// A skipped directory is an `Err` and the walk goes on; a limit is an `Err` that ends it.
pub struct Walk<'a> {
    fs: &'a dyn Filesystem,
    limits: Limits,
    seen: HashSet<NodeId>,
    /// Directories to read, the next on top.
    stack: Vec<PendingDir>,
    /// Subdirectories of the directory being listed, in name order.
    subdirs: Vec<PendingDir>,
    /// The directory being listed: its path, depth and node.
    dir: (String, usize, NodeId),
    entries: std::vec::IntoIter<DirEntry>,
    /// An error about the entry just yielded, reported next.
    deferred: Option<WalkError>,
    yielded: u64,
    charged: u64,
    done: bool,
}

impl<'a> Walk<'a> {
    pub fn new(fs: &'a dyn Filesystem, start: NodeId, limits: Limits) -> Walk<'a> {
        Walk {
            fs,
            limits,
            seen: HashSet::from([start]),
            stack: vec![(String::new(), start, 0)],
            subdirs: Vec::new(),
            dir: (String::new(), 0, start),
            entries: Vec::new().into_iter(),
            deferred: None,
            yielded: 0,
            charged: 0,
            done: false,
        }
    }

    /// The directory holding the entry yielded last.
    pub fn parent(&self) -> NodeId {
        self.dir.2
    }

    /// Counts `n` more bytes against the byte limit; past it the walk ends.
    pub fn charge_bytes(&mut self, n: u64) -> Result<(), WalkError> {
        self.charged = self.charged.saturating_add(n);
        if self.charged > self.limits.bytes {
            self.done = true;
            return Err(WalkError::TooManyBytes {
                limit: self.limits.bytes,
            });
        }
        Ok(())
    }

    /// Reads the next directory; `None` when there is none left.
    fn open_next_dir(&mut self) -> Option<Result<(), WalkError>> {
        self.stack.extend(self.subdirs.drain(..).rev());
        let (path, node, depth) = self.stack.pop()?;
        Some(match self.fs.read_dir(node) {
            Ok(mut entries) => {
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                self.entries = entries.into_iter();
                self.dir = (path, depth, node);
                Ok(())
            }
            Err(source) => Err(WalkError::Unreadable {
                path,
                source: Box::new(source),
            }),
        })
    }

    /// Counts an entry, and queues a directory to be read unless it loops or is too deep.
    fn take(&mut self, entry: DirEntry) -> Result<(String, DirEntry), WalkError> {
        self.yielded += 1;
        if self.yielded > self.limits.entries {
            self.done = true;
            return Err(WalkError::TooManyEntries {
                limit: self.limits.entries,
            });
        }
        let (dir, depth) = (&self.dir.0, self.dir.1 + 1);
        let path = if dir.is_empty() {
            entry.name_lossy()
        } else {
            format!("{dir}/{}", entry.name_lossy())
        };
        if entry.kind == FileKind::Dir {
            if depth >= self.limits.depth {
                self.deferred = Some(WalkError::TooDeep {
                    path: path.clone(),
                    limit: self.limits.depth,
                });
            } else if !self.seen.insert(entry.node) {
                self.deferred = Some(WalkError::Loop { path: path.clone() });
            } else {
                self.subdirs.push((path.clone(), entry.node, depth));
            }
        }
        Ok((path, entry))
    }
}

impl Iterator for Walk<'_> {
    type Item = Result<(String, DirEntry), WalkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.deferred.take() {
            return Some(Err(e));
        }
        while !self.done {
            if let Some(entry) = self.entries.next() {
                return Some(self.take(entry));
            }
            if let Err(e) = self.open_next_dir()? {
                return Some(Err(e));
            }
        }
        None
    }
}

/// Calls `visit(path, entry)` for every entry below `start` (see [`Walk`]), with the default
/// limits. A directory that cannot be walked goes to `on_error` and the walk goes on; an
/// error from `visit` or a limit ends it.
pub fn walk(
    fs: &dyn Filesystem,
    start: NodeId,
    visit: &mut dyn FnMut(&str, &DirEntry) -> Result<()>,
    on_error: &mut dyn FnMut(&str, FsError),
) -> Result<()> {
    for item in Walk::new(fs, start, Limits::default()) {
        match item {
            Ok((path, entry)) => visit(&path, &entry)?,
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                let path = e.path().to_string();
                on_error(&path, e.into());
            }
        }
    }
    Ok(())
}

/// What a tree needs of a new filesystem: bytes of file data (allocated blocks, 4 KiB-rounded:
/// sparse files need only what they hold) and entries. The first entry that cannot be read
/// is an error, with its path.
pub fn space_needed(fs: &dyn Filesystem) -> std::result::Result<(u64, u64), String> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut first_error = None;
    walk(
        fs,
        fs.root(),
        &mut |_, e| {
            entries += 1;
            if e.kind == crate::FileKind::File {
                let m = fs.metadata(e.node)?;
                bytes += m.size.min(m.allocated).next_multiple_of(4096);
            }
            Ok(())
        },
        &mut |p, e| {
            first_error.get_or_insert_with(|| format!("{p}: {e}"));
        },
    )
    .map_err(|e| e.to_string())?;
    match first_error {
        Some(e) => Err(e),
        None => Ok((bytes, entries)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileExtent, Metadata, VolumeInfo};

    /// A filesystem of directories given as (node, [(name, child node)]); every node is a
    /// directory.
    struct Dirs(Vec<(NodeId, Vec<(&'static str, NodeId)>)>);

    impl Filesystem for Dirs {
        fn info(&self) -> VolumeInfo {
            unimplemented!()
        }
        fn root(&self) -> NodeId {
            self.0[0].0
        }
        fn metadata(&self, _: NodeId) -> Result<Metadata> {
            unimplemented!()
        }
        fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
            let (_, entries) = self.0.iter().find(|(n, _)| *n == dir).unwrap();
            Ok(entries
                .iter()
                .map(|(name, node)| DirEntry {
                    name: name.as_bytes().to_vec(),
                    node: *node,
                    kind: FileKind::Dir,
                })
                .collect())
        }
        fn read_at(&self, _: NodeId, _: u64, _: &mut [u8]) -> Result<usize> {
            unimplemented!()
        }
        fn read_link(&self, _: NodeId) -> Result<Vec<u8>> {
            unimplemented!()
        }
        fn xattrs(&self, _: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
            unimplemented!()
        }
        fn extents(&self, _: NodeId) -> Result<Vec<FileExtent>> {
            unimplemented!()
        }
        fn allocation_map(&self) -> Result<crate::AllocationMap> {
            unimplemented!()
        }
    }

    fn run(fs: &Dirs, limits: Limits) -> (Vec<String>, Vec<String>) {
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for item in Walk::new(fs, fs.root(), limits) {
            match item {
                Ok((p, _)) => ok.push(p),
                Err(e) => bad.push(e.to_string()),
            }
        }
        (ok, bad)
    }

    #[test]
    fn a_directory_containing_its_parent_is_walked_once() {
        // 2 = root, 10 = /a, which holds a link back to itself and one to the root.
        let fs = Dirs(vec![
            (2, vec![("a", 10)]),
            (10, vec![("self", 10), ("up", 2)]),
        ]);
        let (ok, bad) = run(&fs, Limits::default());
        assert_eq!(ok, ["a", "a/self", "a/up"]);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad.iter().all(|e| e.contains("directory loop")), "{bad:?}");
    }

    #[test]
    fn limits_end_or_cut_the_walk() {
        // A chain 2 → 3 → 4 → ... → 20.
        let fs = Dirs(
            (2..=20)
                .map(|n| (n, if n < 20 { vec![("d", n + 1)] } else { vec![] }))
                .collect(),
        );
        let depth = Limits {
            depth: 5,
            ..Limits::default()
        };
        let (ok, bad) = run(&fs, depth);
        assert_eq!(ok.len(), 5);
        assert_eq!(bad, ["d/d/d/d/d: directories nested deeper than 5"]);
        let entries = Limits {
            entries: 3,
            ..Limits::default()
        };
        let (ok, bad) = run(&fs, entries);
        assert_eq!(ok.len(), 3);
        assert_eq!(bad, ["more than 3 entries: walk stopped"]);
        let mut w = Walk::new(
            &fs,
            2,
            Limits {
                bytes: 10,
                ..Limits::default()
            },
        );
        assert!(w.charge_bytes(10).is_ok());
        assert!(matches!(
            w.charge_bytes(1),
            Err(WalkError::TooManyBytes { limit: 10 })
        ));
        assert!(w.next().is_none(), "the byte limit ends the walk");
    }
}
