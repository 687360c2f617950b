//! Bounded walks over a [`Filesystem`]: every directory below a start, depth first, with a
//! cap on depth and a guard against directories that contain themselves (corrupt images).

use std::collections::HashSet;

use super::{DirEntry, FileKind, Filesystem, NodeId, Result};

/// Deepest directory nesting followed.
pub const MAX_DEPTH: usize = 256;

/// Calls `visit(path, entry)` for every entry below `start` (paths relative to it, joined with
/// `/`), parents before children. Errors reading a directory go to `on_error` and the walk
/// goes on.
pub fn walk(
    fs: &dyn Filesystem,
    start: NodeId,
    visit: &mut dyn FnMut(&str, &DirEntry) -> Result<()>,
    on_error: &mut dyn FnMut(&str, super::FsError),
) -> Result<()> {
    let mut seen = HashSet::new();
    seen.insert(start);
    let mut stack: Vec<(String, NodeId, usize)> = vec![(String::new(), start, 0)];
    while let Some((path, dir, depth)) = stack.pop() {
        let mut entries = match fs.read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                on_error(&path, e);
                continue;
            }
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let mut subdirs = Vec::new();
        for e in &entries {
            let child = if path.is_empty() {
                e.name_lossy()
            } else {
                format!("{path}/{}", e.name_lossy())
            };
            visit(&child, e)?;
            if e.kind == FileKind::Dir {
                if depth + 1 >= MAX_DEPTH || !seen.insert(e.node) {
                    on_error(
                        &child,
                        super::FsError::Corrupt(
                            child.clone(),
                            "directory loop or nesting too deep".into(),
                        ),
                    );
                    continue;
                }
                subdirs.push((child, e.node, depth + 1));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}
