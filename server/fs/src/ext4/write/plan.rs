//! Planning the tree to write: every directory and file of the source gets an inode number
//! (root 2, `lost+found` 11, the rest from 12 in walk order; hard links share one), with its
//! metadata, link target and extended attributes, and directory link counts.

use std::collections::HashMap;

use super::super::super::{FileKind, Filesystem, NodeId, Result};
use super::xattr::{self, Attr};
use super::{own_metadata, Ext4Report, Item, Plan, FIRST_INO, LOST_FOUND_INO, ROOT_INO};

pub(super) fn plan(
    source: &dyn Filesystem,
    report: &mut Ext4Report,
    from_ext4: bool,
) -> Result<Plan> {
    let root_meta = source.metadata(source.root())?;
    let mut items: HashMap<u32, Item> = HashMap::new();
    let mut root = Item::new(source.root(), root_meta, ROOT_INO);
    root.attrs = attrs_of(source, source.root(), "/", report);
    items.insert(ROOT_INO, root);
    let mut dirs: HashMap<String, u32> = HashMap::from([(String::new(), ROOT_INO)]);
    let mut seen: HashMap<NodeId, u32> = HashMap::new();
    let mut next_ino = FIRST_INO + 1;
    let mut walk_errors = Vec::new();
    super::super::super::tree::walk(
        source,
        source.root(),
        &mut |path, e| {
            let parent_path = path.rsplit_once('/').map_or("", |(p, _)| p);
            let Some(&parent) = dirs.get(parent_path) else {
                return Ok(()); // its directory was skipped
            };
            if e.name.len() > 255 {
                report
                    .skipped
                    .push((path.into(), "name longer than 255 bytes".into()));
                return Ok(());
            }
            if e.kind != FileKind::Dir {
                if let Some(&ino) = seen.get(&e.node) {
                    if let Some(item) = items.get_mut(&ino) {
                        item.links += 1;
                    }
                    if let Some(p) = items.get_mut(&parent) {
                        p.entries.push((e.name.clone(), ino, e.kind));
                    }
                    return Ok(());
                }
            }
            let meta = match source.metadata(e.node) {
                Ok(m) => m,
                Err(err) => {
                    report.skipped.push((path.into(), err.to_string()));
                    return Ok(());
                }
            };
            let ino = if e.kind == FileKind::Dir && parent == ROOT_INO && e.name == b"lost+found" {
                LOST_FOUND_INO
            } else {
                next_ino += 1;
                next_ino - 1
            };
            let mut item = Item::new(e.node, meta, parent);
            item.kind = e.kind;
            if !from_ext4 {
                item.meta.flags = 0;
            }
            match e.kind {
                FileKind::Symlink => match source.read_link(e.node) {
                    Ok(t) if !t.is_empty() && t.len() < 4096 => item.target = t,
                    Ok(t) => {
                        report
                            .skipped
                            .push((path.into(), format!("symlink target of {} bytes", t.len())));
                        return Ok(());
                    }
                    Err(err) => {
                        report.skipped.push((path.into(), err.to_string()));
                        return Ok(());
                    }
                },
                FileKind::Dir => {
                    dirs.insert(path.to_string(), ino);
                }
                _ => {
                    seen.insert(e.node, ino);
                }
            }
            item.attrs = attrs_of(source, e.node, path, report);
            items.insert(ino, item);
            if let Some(p) = items.get_mut(&parent) {
                p.entries.push((e.name.clone(), ino, e.kind));
            }
            Ok(())
        },
        &mut |path, err| walk_errors.push((path.to_string(), err.to_string())),
    )?;
    report.skipped.extend(walk_errors);
    if let std::collections::hash_map::Entry::Vacant(slot) = items.entry(LOST_FOUND_INO) {
        let meta = own_metadata(FileKind::Dir, 0o700, 0, 2);
        slot.insert(Item::new(0, meta, ROOT_INO));
        if let Some(root) = items.get_mut(&ROOT_INO) {
            root.entries
                .push((b"lost+found".to_vec(), LOST_FOUND_INO, FileKind::Dir));
        }
    }
    // Directory link counts: itself, its parent's entry, and each subdirectory's "..".
    let subdirs: Vec<(u32, u32)> = items
        .iter()
        .filter(|(_, i)| i.kind == FileKind::Dir)
        .map(|(&ino, i)| {
            let n = i.entries.iter().filter(|e| e.2 == FileKind::Dir).count() as u32;
            (ino, n)
        })
        .collect();
    for (ino, n) in subdirs {
        if let Some(i) = items.get_mut(&ino) {
            let links = 2 + n;
            i.links = if links >= 65000 { 1 } else { links };
        }
    }
    Ok(Plan { items, next_ino })
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
                    report.skipped.push((path.to_string(), why));
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
