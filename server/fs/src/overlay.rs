//! A filesystem seen with edits on top: [`TreeOverlay`] presents a base [`Filesystem`]'s tree
//! with files written, replaced, renamed or removed and directories and symbolic links added,
//! all held in memory — the base is never written. Writers recreate a filesystem from the
//! overlay as from any source, which is how a capture is reconfigured or customized while it
//! is deployed, exported or copied: the edits land in the new filesystem only.
//!
//! Paths are `/`-separated from the root and never follow symbolic links: an edit whose
//! parent path crosses a link, leaves the tree (`..`) or names something that is not a
//! directory is refused, so nothing an image holds can steer an edit elsewhere. Nodes the
//! overlay adds have ids with the top bit set; base ids never have it (it is checked). An
//! overlay on an overlay (transforms applied in turn: [`Chain`]) marks its nodes with the next
//! bit down, so both overlays' nodes stay apart.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use diskferry_blockdev::BlockDevice;

use super::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, Metadata, NodeId, Result,
    Timestamp, VolumeInfo,
};

/// Set in the ids of nodes an overlay on a filesystem that is no overlay adds; one nested
/// `n` deep uses the bit `n` places lower.
const OVERLAY_BIT: NodeId = 1 << 63;
/// Overlays nested deeper than this share a bit with the one below, which the base-id checks
/// then refuse rather than mix up.
const MAX_NESTING: u32 = 15;
/// Longest name one directory entry may have (ext4's and most filesystems' limit).
const MAX_NAME: usize = 255;

/// Owner and permissions of something an edit creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    /// Permission bits, without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Attrs {
    /// root:root with `mode`.
    pub fn root(mode: u32) -> Attrs {
        Attrs {
            mode,
            uid: 0,
            gid: 0,
        }
    }
}

/// What an added node holds.
#[derive(Debug, Clone)]
enum Content {
    File(Arc<[u8]>),
    Link(Vec<u8>),
    Dir,
}

/// A changed directory entry: `None` removes the name, `Some` puts that node under it.
type Change = Option<(NodeId, FileKind)>;

#[derive(Debug, Clone)]
struct Added {
    meta: Metadata,
    content: Content,
}

/// A base filesystem with edits on top.
pub struct TreeOverlay {
    base: Arc<dyn Filesystem>,
    added: Vec<Added>,
    /// Per directory (a base one or an added one), its changed entries.
    changes: HashMap<NodeId, BTreeMap<Vec<u8>, Change>>,
    now: Timestamp,
    /// The bit marking the nodes this overlay adds.
    bit: NodeId,
}

impl std::fmt::Debug for TreeOverlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeOverlay")
            .field("added", &self.added.len())
            .finish_non_exhaustive()
    }
}

/// A path split into its parent's components and its last name, checked.
fn split(path: &str) -> Result<(Vec<&str>, &str)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let bad = |why: &str| FsError::Unsupported(format!("{path:?}: {why}"));
    let Some((last, parents)) = parts.split_last() else {
        return Err(bad("names the root"));
    };
    for p in &parts {
        if *p == "." || *p == ".." {
            return Err(FsError::Escapes(path.to_string()));
        }
        if p.len() > MAX_NAME || p.contains('\0') {
            return Err(bad("a name is too long or holds NUL"));
        }
    }
    Ok((parents.to_vec(), last))
}

/// Edits made to a tree while a filesystem is recreated from it (customization,
/// reconfiguration). Deterministic: applied twice to the same base it makes the same edits
/// with the same times, because a deploy's verification applies it again to know what the
/// target must hold.
pub trait TreeTransform: Send + Sync {
    /// The tree to write for partition `partition` whose filesystem is `base` — `base` with
    /// the edits on top, and a line per change for people — or `None` to write `base` as it
    /// is.
    fn apply(
        &self,
        partition: u32,
        base: Arc<dyn Filesystem>,
    ) -> Result<Option<(TreeOverlay, Vec<String>)>>;

    /// What the transform does, in a few words (for logs).
    fn describe(&self) -> String;
}

impl std::fmt::Debug for dyn TreeTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Two transforms applied in turn: the second to the tree the first made (a deploy's
/// customization, then its fallback boot loader). The changes are the first's lines, then
/// the second's; deterministic when both are.
pub struct Chain {
    first: Arc<dyn TreeTransform>,
    second: Arc<dyn TreeTransform>,
}

impl Chain {
    /// `first`, then `second`; either may be absent.
    pub fn of(
        first: Option<Arc<dyn TreeTransform>>,
        second: Option<Arc<dyn TreeTransform>>,
    ) -> Option<Arc<dyn TreeTransform>> {
        match (first, second) {
            (Some(first), Some(second)) => Some(Arc::new(Chain { first, second })),
            (one, None) | (None, one) => one,
        }
    }
}

impl TreeTransform for Chain {
    fn apply(
        &self,
        partition: u32,
        base: Arc<dyn Filesystem>,
    ) -> Result<Option<(TreeOverlay, Vec<String>)>> {
        let Some((first, mut changes)) = self.first.apply(partition, Arc::clone(&base))? else {
            return self.second.apply(partition, base);
        };
        let first = Arc::new(first);
        match self
            .second
            .apply(partition, Arc::clone(&first) as Arc<dyn Filesystem>)?
        {
            Some((second, more)) => {
                changes.extend(more);
                Ok(Some((second, changes)))
            }
            // The first's overlay back, or (when the second kept a hold on it) a view of it
            // with nothing more edited.
            None => Ok(Some((
                Arc::try_unwrap(first)
                    .unwrap_or_else(|held| TreeOverlay::new(held, Timestamp { secs: 0, nanos: 0 })),
                changes,
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("{}, then {}", self.first.describe(), self.second.describe())
    }
}

/// Now, as edits date what they add.
pub fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Timestamp { secs, nanos: 0 }
}

impl TreeOverlay {
    /// `base` with no edits yet; what the edits add is dated `time`.
    pub fn new(base: Arc<dyn Filesystem>, time: Timestamp) -> TreeOverlay {
        let bit = OVERLAY_BIT >> base.overlay_depth().min(MAX_NESTING);
        TreeOverlay {
            base,
            added: Vec::new(),
            changes: HashMap::new(),
            now: time,
            bit,
        }
    }

    fn ours(&self, node: NodeId) -> bool {
        node & self.bit != 0
    }

    /// The filesystem under the edits.
    pub fn base(&self) -> &Arc<dyn Filesystem> {
        &self.base
    }

    fn added(&self, node: NodeId) -> Result<&Added> {
        usize::try_from(node & !self.bit)
            .ok()
            .and_then(|i| self.added.get(i))
            .ok_or_else(|| FsError::NotFound(format!("overlay node {node:#x}")))
    }

    fn base_id(&self, node: NodeId) -> Result<NodeId> {
        if self.ours(node) {
            return Err(FsError::Unsupported(format!(
                "node id {node:#x} of the base collides with the overlay's"
            )));
        }
        Ok(node)
    }

    /// The entry `name` of directory `dir` in the overlaid view.
    fn entry(&self, dir: NodeId, name: &[u8]) -> Result<Option<(NodeId, FileKind)>> {
        if let Some(change) = self.changes.get(&dir).and_then(|c| c.get(name)) {
            return Ok(*change);
        }
        if self.ours(dir) {
            return Ok(None);
        }
        match self
            .base
            .read_dir(dir)?
            .into_iter()
            .find(|e| e.name == name)
        {
            Some(e) => Ok(Some((self.base_id(e.node)?, e.kind))),
            None => Ok(None),
        }
    }

    /// The directory `parents` names, without following links.
    fn dir(&self, parents: &[&str], path: &str) -> Result<NodeId> {
        let mut node = self.root();
        for p in parents {
            node = match self.entry(node, p.as_bytes())? {
                Some((n, FileKind::Dir)) => n,
                Some((_, FileKind::Symlink)) => {
                    return Err(FsError::Unsupported(format!(
                        "{path:?}: {p} is a symbolic link in the image, which edits never follow"
                    )))
                }
                Some(_) => return Err(FsError::NotADirectory(path.to_string())),
                None => return Err(FsError::NotFound(path.to_string())),
            };
        }
        Ok(node)
    }

    fn add(&mut self, kind: FileKind, size: u64, attrs: Attrs, content: Content) -> NodeId {
        let node = self.bit | self.added.len() as NodeId;
        self.added.push(Added {
            meta: Metadata {
                node,
                kind,
                size,
                mode: attrs.mode & 0o7777,
                uid: attrs.uid,
                gid: attrs.gid,
                links: 1,
                atime: Some(self.now),
                mtime: Some(self.now),
                ctime: Some(self.now),
                crtime: Some(self.now),
                device: None,
                flags: 0,
                allocated: size,
            },
            content,
        });
        node
    }

    fn put(&mut self, path: &str, node: Option<(NodeId, FileKind)>) -> Result<()> {
        let (parents, name) = split(path)?;
        let dir = self.dir(&parents, path)?;
        self.changes
            .entry(dir)
            .or_default()
            .insert(name.as_bytes().to_vec(), node);
        Ok(())
    }

    /// What is at `path` now (links not followed), if anything.
    pub fn stat(&self, path: &str) -> Result<Option<(NodeId, FileKind)>> {
        let (parents, name) = split(path)?;
        match self.dir(&parents, path) {
            Ok(dir) => self.entry(dir, name.as_bytes()),
            Err(FsError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bytes of the regular file at `path` (at most `limit`), if there is one.
    pub fn read_file(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        match self.stat(path)? {
            Some((node, FileKind::File)) => Ok(Some(self.read_all(node, limit)?)),
            _ => Ok(None),
        }
    }

    /// Writes a regular file at `path` (its parent must exist), replacing whatever was there.
    pub fn write_file(&mut self, path: &str, bytes: Vec<u8>, attrs: Attrs) -> Result<()> {
        let size = bytes.len() as u64;
        let node = self.add(FileKind::File, size, attrs, Content::File(bytes.into()));
        self.put(path, Some((node, FileKind::File)))
    }

    /// Copies the regular file `from` (a node of this view) to `path` (its parent must
    /// exist), replacing whatever was there, as `cp -p` would: the copy has the original's
    /// mode, owner, attributes and times. A file over `limit` bytes is refused.
    pub fn copy_file(&mut self, from: NodeId, path: &str, limit: u64) -> Result<()> {
        let meta = self.metadata(from)?;
        if meta.kind != FileKind::File {
            return Err(FsError::Unsupported(format!(
                "copying to {path:?}: the original is a {}, not a regular file",
                meta.kind.name()
            )));
        }
        let bytes = self.read_all(from, limit)?;
        let node = self.bit | self.added.len() as NodeId;
        let size = bytes.len() as u64;
        self.added.push(Added {
            meta: Metadata {
                node,
                size,
                links: 1,
                allocated: size,
                ..meta
            },
            content: Content::File(bytes.into()),
        });
        self.put(path, Some((node, FileKind::File)))
    }

    /// Replaces the regular file at `path` with `bytes`, keeping its owner and mode; the
    /// original stays beside it as `path` + `keep_suffix` (unless one is there already).
    pub fn replace_file(&mut self, path: &str, bytes: Vec<u8>, keep_suffix: &str) -> Result<()> {
        let Some((old, FileKind::File)) = self.stat(path)? else {
            return Err(FsError::NotFound(format!("{path} (a regular file)")));
        };
        let m = self.metadata(old)?;
        let kept = format!("{path}{keep_suffix}");
        if self.stat(&kept)?.is_none() {
            self.put(&kept, Some((old, FileKind::File)))?;
        }
        let attrs = Attrs {
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
        };
        self.write_file(path, bytes, attrs)
    }

    /// A symbolic link at `path` to `target`, replacing whatever was there.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let t = target.as_bytes().to_vec();
        let node = self.add(
            FileKind::Symlink,
            t.len() as u64,
            Attrs::root(0o777),
            Content::Link(t),
        );
        self.put(path, Some((node, FileKind::Symlink)))
    }

    /// Creates the directories of `path` that are missing (each with `attrs`).
    pub fn create_dirs(&mut self, path: &str, attrs: Attrs) -> Result<()> {
        let (parents, last) = split(path)?;
        let mut done = String::new();
        for p in parents.iter().chain(std::iter::once(&last)) {
            done.push('/');
            done.push_str(p);
            match self.stat(&done)? {
                Some((_, FileKind::Dir)) => {}
                Some(_) => return Err(FsError::NotADirectory(done)),
                None => {
                    let node = self.add(FileKind::Dir, 0, attrs, Content::Dir);
                    self.put(&done, Some((node, FileKind::Dir)))?;
                }
            }
        }
        Ok(())
    }

    /// Removes the name `path` (a directory with everything under it).
    pub fn remove(&mut self, path: &str) -> Result<()> {
        self.put(path, None)
    }

    /// Moves what is at `from` to `to`, replacing what `to` held.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<()> {
        let Some(node) = self.stat(from)? else {
            return Err(FsError::NotFound(from.to_string()));
        };
        self.put(to, Some(node))?;
        self.put(from, None)
    }
}

impl Filesystem for TreeOverlay {
    fn info(&self) -> VolumeInfo {
        self.base.info()
    }

    fn root(&self) -> NodeId {
        self.base.root()
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        if self.ours(node) {
            return Ok(self.added(node)?.meta.clone());
        }
        self.base.metadata(node)
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let changes = self.changes.get(&dir);
        let mut out: Vec<DirEntry> = if self.ours(dir) {
            Vec::new()
        } else {
            let mut base = self.base.read_dir(dir)?;
            for e in &base {
                self.base_id(e.node)?;
            }
            base.retain(|e| !changes.is_some_and(|c| c.contains_key(&e.name)));
            base
        };
        for (name, change) in changes.into_iter().flatten() {
            if let Some((node, kind)) = change {
                out.push(DirEntry {
                    name: name.clone(),
                    node: *node,
                    kind: *kind,
                });
            }
        }
        Ok(out)
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if !self.ours(node) {
            return self.base.read_at(node, offset, buf);
        }
        let Content::File(bytes) = &self.added(node)?.content else {
            return Err(FsError::Unsupported(format!(
                "overlay node {node:#x} is not a regular file"
            )));
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn read_link(&self, node: NodeId) -> Result<Vec<u8>> {
        if !self.ours(node) {
            return self.base.read_link(node);
        }
        match &self.added(node)?.content {
            Content::Link(t) => Ok(t.clone()),
            _ => Err(FsError::NotFound(format!("link target of {node:#x}"))),
        }
    }

    fn xattrs(&self, node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        if self.ours(node) {
            return Ok(Vec::new());
        }
        self.base.xattrs(node)
    }

    fn security_descriptor(&self, node: NodeId) -> Result<Option<Vec<u8>>> {
        if self.ours(node) {
            return Ok(None);
        }
        self.base.security_descriptor(node)
    }

    /// Added files have no place on any disk: writers read them through `read_at`.
    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        if self.ours(node) {
            return Ok(Vec::new());
        }
        self.base.extents(node)
    }

    fn flags_are_linux_inode_flags(&self) -> bool {
        self.base.flags_are_linux_inode_flags()
    }

    fn data_ranges(&self, node: NodeId) -> Result<Vec<(u64, u64)>> {
        if !self.ours(node) {
            return self.base.data_ranges(node);
        }
        let size = self.added(node)?.meta.size;
        Ok(if size == 0 {
            Vec::new()
        } else {
            vec![(0, size)]
        })
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        self.base.allocation_map()
    }

    fn rebuild_obstacle(&self) -> Option<String> {
        self.base.rebuild_obstacle()
    }

    fn view_notes(&self) -> Vec<String> {
        self.base.view_notes()
    }

    fn device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.base.device()
    }

    fn overlay_depth(&self) -> u32 {
        self.base.overlay_depth() + 1
    }

    fn placement_hint(&self, node: NodeId) -> Option<Vec<FileExtent>> {
        if self.ours(node) {
            return None;
        }
        self.base.placement_hint(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostFs;

    /// A host tree: /etc/hostname, /etc/ssh/key, /link -> /tmp, /data/a.
    fn base() -> (tempfile::TempDir, Arc<dyn Filesystem>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("etc/hostname"), "old\n").unwrap();
        std::fs::write(root.join("etc/ssh/key"), "secret").unwrap();
        std::fs::write(root.join("data/a"), "a").unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("link")).unwrap();
        let fs = HostFs::open(root).unwrap();
        (dir, Arc::new(fs))
    }

    fn names(o: &TreeOverlay, path: &str) -> Vec<String> {
        let node = o.lookup(path).unwrap();
        let mut n: Vec<String> = o
            .read_dir(node)
            .unwrap()
            .iter()
            .map(|e| e.name_lossy())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_replaced_file_reads_anew_and_its_original_is_kept_beside_it() {
        let (dir, fs) = base();
        let mut o = TreeOverlay::new(fs, now());
        o.replace_file("/etc/hostname", b"new\n".to_vec(), ".diskferry-orig")
            .unwrap();
        assert_eq!(
            o.read_file("/etc/hostname", 100).unwrap().unwrap(),
            b"new\n"
        );
        assert_eq!(
            o.read_file("/etc/hostname.diskferry-orig", 100)
                .unwrap()
                .unwrap(),
            b"old\n"
        );
        assert_eq!(
            names(&o, "/etc"),
            ["hostname", "hostname.diskferry-orig", "ssh"]
        );
        let m = o.metadata(o.lookup("/etc/hostname").unwrap()).unwrap();
        assert_eq!((m.kind, m.size), (FileKind::File, 4));
        assert_eq!(
            o.data_ranges(o.lookup("/etc/hostname").unwrap()).unwrap(),
            [(0, 4)]
        );
        // The base is never written.
        assert_eq!(
            std::fs::read(dir.path().join("etc/hostname")).unwrap(),
            b"old\n"
        );
    }

    #[test]
    fn edits_add_remove_and_rename_entries() {
        let (_dir, fs) = base();
        let mut o = TreeOverlay::new(fs, now());
        o.remove("/etc/ssh/key").unwrap();
        o.create_dirs(
            "/etc/systemd/system/multi-user.target.wants",
            Attrs::root(0o755),
        )
        .unwrap();
        o.write_file(
            "/etc/systemd/system/x.service",
            b"[Unit]\n".to_vec(),
            Attrs::root(0o644),
        )
        .unwrap();
        o.symlink(
            "/etc/systemd/system/multi-user.target.wants/x.service",
            "/etc/systemd/system/x.service",
        )
        .unwrap();
        o.rename("/data/a", "/data/b").unwrap();
        assert!(names(&o, "/etc/ssh").is_empty());
        assert_eq!(names(&o, "/data"), ["b"]);
        assert_eq!(names(&o, "/etc"), ["hostname", "ssh", "systemd"]);
        let link = o
            .lookup("/etc/systemd/system/multi-user.target.wants/x.service")
            .unwrap();
        assert_eq!(o.read_link(link).unwrap(), b"/etc/systemd/system/x.service");
        assert_eq!(o.read_file("/data/b", 10).unwrap().unwrap(), b"a");
        assert!(o.stat("/etc/ssh/key").unwrap().is_none());
    }

    #[test]
    fn edits_never_follow_links_or_leave_the_tree() {
        let (_dir, fs) = base();
        let mut o = TreeOverlay::new(fs, now());
        let err = o
            .write_file("/link/planted", b"x".to_vec(), Attrs::root(0o644))
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(matches!(
            o.write_file("/etc/../x", Vec::new(), Attrs::root(0o644)),
            Err(FsError::Escapes(_))
        ));
        assert!(o.write_file("/", Vec::new(), Attrs::root(0o644)).is_err());
        assert!(matches!(
            o.write_file("/etc/hostname/x", Vec::new(), Attrs::root(0o644)),
            Err(FsError::NotADirectory(_))
        ));
        assert!(o
            .write_file(
                &format!("/{}", "n".repeat(256)),
                Vec::new(),
                Attrs::root(0o644)
            )
            .is_err());
        // Replacing the link itself is fine: it is not followed.
        o.write_file("/link", b"now a file".to_vec(), Attrs::root(0o600))
            .unwrap();
        assert_eq!(o.read_file("/link", 100).unwrap().unwrap(), b"now a file");
    }

    /// Writes `/etc/<name>` and, when the tree has it, copies `/etc/<copies>` beside it.
    struct Adds {
        name: &'static str,
        copies: Option<&'static str>,
    }

    impl TreeTransform for Adds {
        fn apply(
            &self,
            _partition: u32,
            base: Arc<dyn Filesystem>,
        ) -> Result<Option<(TreeOverlay, Vec<String>)>> {
            let mut o = TreeOverlay::new(base, Timestamp { secs: 7, nanos: 0 });
            o.write_file(
                &format!("/etc/{}", self.name),
                self.name.as_bytes().to_vec(),
                Attrs::root(0o600),
            )?;
            let mut changes = vec![format!("wrote {}", self.name)];
            if let Some(c) = self.copies {
                if let Some((node, FileKind::File)) = o.stat(&format!("/etc/{c}"))? {
                    o.copy_file(node, &format!("/etc/{c}.copy"), 100)?;
                    changes.push(format!("copied {c}"));
                }
            }
            Ok(Some((o, changes)))
        }

        fn describe(&self) -> String {
            format!("adds {}", self.name)
        }
    }

    #[test]
    fn a_chain_applies_the_second_transform_to_the_first_ones_tree() {
        let (_dir, fs) = base();
        let first: Arc<dyn TreeTransform> = Arc::new(Adds {
            name: "one",
            copies: None,
        });
        let second: Arc<dyn TreeTransform> = Arc::new(Adds {
            name: "two",
            copies: Some("one"),
        });
        assert!(Chain::of(None, None).is_none());
        let only = Chain::of(None, Some(Arc::clone(&second))).unwrap();
        assert_eq!(only.describe(), "adds two");
        let chain = Chain::of(Some(first), Some(second)).unwrap();
        assert_eq!(chain.describe(), "adds one, then adds two");
        let (o, changes) = chain.apply(1, fs).unwrap().unwrap();
        assert_eq!(changes, ["wrote one", "wrote two", "copied one"]);
        assert_eq!(o.overlay_depth(), 2);
        assert_eq!(
            names(&o, "/etc"),
            ["hostname", "one", "one.copy", "ssh", "two"]
        );
        assert_eq!(o.read_file("/etc/one.copy", 10).unwrap().unwrap(), b"one");
        // The two overlays' nodes stay apart, through a writer too.
        let dev: Arc<dyn BlockDevice> = Arc::new(diskferry_blockdev::MemoryDevice::new(16 << 20));
        crate::ext4::write::write_ext4(Arc::clone(&dev), &o, &Default::default()).unwrap();
        let ext = crate::ext4::Ext4::open(dev).unwrap();
        let read = |p: &str| ext.read_all(ext.lookup(p).unwrap(), 1 << 20).unwrap();
        assert_eq!(read("/etc/one"), b"one");
        assert_eq!(read("/etc/two"), b"two");
        assert_eq!(read("/etc/one.copy"), b"one");
        assert_eq!(read("/etc/hostname"), b"old\n");
    }

    #[test]
    fn a_copy_keeps_the_originals_metadata_and_is_bounded() {
        let (_dir, fs) = base();
        let mut o = TreeOverlay::new(Arc::clone(&fs), now());
        let node = o.lookup("/etc/hostname").unwrap();
        o.copy_file(node, "/data/hostname", 100).unwrap();
        let (a, b) = (
            fs.metadata(node).unwrap(),
            o.metadata(o.lookup("/data/hostname").unwrap()).unwrap(),
        );
        assert_eq!(
            (a.mode, a.uid, a.mtime, a.size),
            (b.mode, b.uid, b.mtime, b.size)
        );
        assert!(o.copy_file(node, "/data/small", 3).is_err());
        assert!(o
            .copy_file(o.lookup("/etc").unwrap(), "/data/dir", 100)
            .is_err());
        assert!(o.stat("/data/small").unwrap().is_none());
    }

    #[test]
    fn an_ext4_written_from_an_overlay_holds_the_edits() {
        let (_dir, fs) = base();
        let mut o = TreeOverlay::new(fs, now());
        o.replace_file("/etc/hostname", b"web-07\n".to_vec(), ".diskferry-orig")
            .unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        o.write_file("/data/big", big.clone(), Attrs::root(0o600))
            .unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(diskferry_blockdev::MemoryDevice::new(16 << 20));
        crate::ext4::write::write_ext4(Arc::clone(&dev), &o, &Default::default()).unwrap();
        let ext = crate::ext4::Ext4::open(dev).unwrap();
        let read = |p: &str| ext.read_all(ext.lookup(p).unwrap(), 1 << 20).unwrap();
        assert_eq!(read("/etc/hostname"), b"web-07\n");
        assert_eq!(read("/etc/hostname.diskferry-orig"), b"old\n");
        assert_eq!(read("/data/big"), big);
        assert_eq!(
            ext.metadata(ext.lookup("/data/big").unwrap()).unwrap().mode,
            0o600
        );
    }
}
