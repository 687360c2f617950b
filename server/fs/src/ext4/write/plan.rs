//! Planning the tree to write: every directory and file of the source gets an inode number
//! (root 2, `lost+found` 11, the rest from 12 in walk order; hard links share one), with its
//! metadata, link target and extended attributes, and directory link counts.

use std::collections::HashMap;

use super::super::super::{DirEntry, FileKind, Filesystem, NodeId, Result};
use super::super::ondisk::dirent;
use super::xattr::{self, Attr};
use super::{own_metadata, Ext4Report, Item, Plan, FIRST_INO, LOST_FOUND_INO, ROOT_INO};

pub(super) fn plan(
    source: &dyn Filesystem,
    report: &mut Ext4Report,
    from_ext4: bool,
) -> Result<Plan> {
    let root_meta = source.metadata(source.root())?;
    let mut root = Item::new(source.root(), root_meta, ROOT_INO);
    root.attrs = attrs_of(source, source.root(), "/", report);
    let mut p = Planner {
        source,
        from_ext4,
        report,
        items: HashMap::from([(ROOT_INO, root)]),
        dirs: HashMap::from([(String::new(), ROOT_INO)]),
        seen: HashMap::new(),
        next_ino: FIRST_INO + 1,
    };
    let mut walk_errors = Vec::new();
    super::super::super::tree::walk(
        source,
        source.root(),
        &mut |path, e| {
            p.visit(path, e);
            Ok(())
        },
        &mut |path, err| walk_errors.push((path.to_string(), err.to_string())),
    )?;
    p.report.skipped.extend(walk_errors);
    p.add_lost_found();
    p.count_directory_links();
    Ok(Plan {
        items: p.items,
        next_ino: p.next_ino,
    })
}

/// The walk's state.
struct Planner<'a> {
    source: &'a dyn Filesystem,
    /// Whether the source's inode flags are Linux ones (kept) or something else (dropped).
    from_ext4: bool,
    report: &'a mut Ext4Report,
    items: HashMap<u32, Item>,
    /// Directory inodes by path.
    dirs: HashMap<String, u32>,
    /// Inodes of non-directories by source node, for hard links.
    seen: HashMap<NodeId, u32>,
    next_ino: u32,
}

impl Planner<'_> {
    fn skip(&mut self, path: &str, why: String) {
        self.report.skipped.push((path.into(), why));
    }

    fn add_entry(&mut self, parent: u32, name: &[u8], ino: u32, kind: FileKind) {
        if let Some(p) = self.items.get_mut(&parent) {
            p.entries.push((name.to_vec(), ino, kind));
        }
    }

    /// Plans one entry of the walk (its directory was planned before it, or skipped).
    fn visit(&mut self, path: &str, e: &DirEntry) {
        let parent_path = path.rsplit_once('/').map_or("", |(p, _)| p);
        let Some(&parent) = self.dirs.get(parent_path) else {
            return; // its directory was skipped
        };
        if e.name.len() > dirent::MAX_NAME_LEN {
            return self.skip(path, "name longer than 255 bytes".into());
        }
        if e.kind != FileKind::Dir {
            if let Some(&ino) = self.seen.get(&e.node) {
                // Another name of a file already planned.
                if let Some(item) = self.items.get_mut(&ino) {
                    item.links += 1;
                }
                return self.add_entry(parent, &e.name, ino, e.kind);
            }
        }
        let meta = match self.source.metadata(e.node) {
            Ok(m) => m,
            Err(err) => return self.skip(path, err.to_string()),
        };
        let ino = self.number(parent, e);
        let mut item = Item::new(e.node, meta, parent);
        item.kind = e.kind;
        if !self.from_ext4 {
            item.meta.flags = 0;
        }
        match e.kind {
            FileKind::Symlink => match self.target(path, e.node) {
                Some(t) => item.target = t,
                None => return,
            },
            FileKind::Dir => {
                self.dirs.insert(path.to_string(), ino);
            }
            _ => {
                self.seen.insert(e.node, ino);
            }
        }
        item.attrs = attrs_of(self.source, e.node, path, self.report);
        self.items.insert(ino, item);
        self.add_entry(parent, &e.name, ino, e.kind);
    }

    /// The inode number for a new entry: 11 for the root's `lost+found`, else the next one.
    fn number(&mut self, parent: u32, e: &DirEntry) -> u32 {
        if e.kind == FileKind::Dir && parent == ROOT_INO && e.name == b"lost+found" {
            LOST_FOUND_INO
        } else {
            self.next_ino += 1;
            self.next_ino - 1
        }
    }

    /// A symlink's target, or `None` (reported) when it cannot be read or is empty or too
    /// long.
    fn target(&mut self, path: &str, node: NodeId) -> Option<Vec<u8>> {
        match self.source.read_link(node) {
            Ok(t) if !t.is_empty() && t.len() < 4096 => Some(t),
            Ok(t) => {
                self.skip(path, format!("symlink target of {} bytes", t.len()));
                None
            }
            Err(err) => {
                self.skip(path, err.to_string());
                None
            }
        }
    }

    /// An empty `lost+found` of our own when the source has none.
    fn add_lost_found(&mut self) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.items.entry(LOST_FOUND_INO) {
            let meta = own_metadata(FileKind::Dir, 0o700, 0, 2);
            slot.insert(Item::new(0, meta, ROOT_INO));
            self.add_entry(ROOT_INO, b"lost+found", LOST_FOUND_INO, FileKind::Dir);
        }
    }

    /// Directory link counts: itself, its parent's entry, and each subdirectory's "..".
    fn count_directory_links(&mut self) {
        for item in self.items.values_mut() {
            if item.kind == FileKind::Dir {
                let subdirs = item.entries.iter().filter(|e| e.2 == FileKind::Dir).count() as u32;
                let links = 2 + subdirs;
                item.links = if links >= 65000 { 1 } else { links };
            }
        }
    }
}

fn attrs_of(
    source: &dyn Filesystem,
    node: NodeId,
    path: &str,
    report: &mut Ext4Report,
) -> Vec<Attr> {
    match source.xattrs(node) {
        Ok(list) => list
            .iter()
            .filter_map(|(name, value)| match xattr::split(name, value) {
                Ok(a) => Some(a),
                Err(why) => {
                    report.skipped.push((path.to_string(), why.to_string()));
                    None
                }
            })
            .collect(),
        Err(e) => {
            report
                .skipped
                .push((path.to_string(), format!("extended attributes: {e}")));
            Vec::new()
        }
    }
}
