//! Comparing a filesystem read through our `Filesystem` trait with the host tree it was
//! made from: names, kinds, modes, owners, link counts, nanosecond times, symlink targets,
//! bytes, extended attributes (as getfattr sees them), hard links and holes.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use diskferry_fs::{self as fs, FileKind, Filesystem};

/// Host files below `root` (relative path → metadata), symlinks not followed.
/// Keys are the relative paths with non-UTF-8 bytes replaced (as our reader's lossy names
/// are); values keep the real path.
pub fn host_tree(root: &Path) -> HashMap<String, (std::path::PathBuf, std::fs::Metadata)> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.insert(rel, (e.path(), meta));
        }
    }
    out
}

/// Every xattr of a host file, as getfattr reports them (name → value).
pub fn host_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let out = std::process::Command::new("getfattr")
        .args(["-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
        .arg(path)
        .output()
        .expect("getfattr (install attr)");
    assert!(out.status.success(), "getfattr {}", path.display());
    let out = String::from_utf8_lossy(&out.stdout);
    let mut attrs: Vec<(String, Vec<u8>)> = out
        .lines()
        .filter_map(|l| l.split_once("=0x"))
        .map(|(name, hex)| {
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            (name.to_string(), bytes)
        })
        .collect();
    attrs.sort();
    attrs
}

pub fn assert_fs_matches_host(fs: &dyn Filesystem, tree: &Path) {
    let host = host_tree(tree);
    let mut seen = HashMap::new();
    let mut nodes: HashMap<u64, Vec<String>> = HashMap::new();
    fs::tree::walk(
        fs,
        fs.root(),
        &mut |path, e| {
            seen.insert(path.to_string(), e.node);
            nodes.entry(e.node).or_default().push(path.to_string());
            Ok(())
        },
        &mut |p, e| panic!("{p}: {e}"),
    )
    .unwrap();
    seen.remove("lost+found");
    let mut ours: Vec<&String> = seen.keys().collect();
    let mut theirs: Vec<&String> = host.keys().collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "the same names");
    for (path, (full, h)) in &host {
        let node = seen[path];
        let m = fs.metadata(node).unwrap();
        assert_eq!(m.mode, h.mode() & 0o7777, "{path}: mode");
        assert_eq!((m.uid, m.gid), (h.uid(), h.gid()), "{path}: owner");
        assert_eq!(m.links as u64, h.nlink(), "{path}: links");
        let mtime = m.mtime.unwrap();
        assert_eq!(
            (mtime.secs, mtime.nanos as i64),
            (h.mtime(), h.mtime_nsec()),
            "{path}: mtime"
        );
        // Access times move on the host as the test reads the tree; the one set is known.
        if path == "home/alice/hello.txt" {
            let atime = m.atime.unwrap();
            // 2002-03-04 05:06:07.987654321 UTC
            assert_eq!(
                (atime.secs, atime.nanos),
                (1_015_218_367, 987_654_321),
                "{path}: atime"
            );
        }
        let ft = h.file_type();
        if ft.is_symlink() {
            assert_eq!(m.kind, FileKind::Symlink);
            let target = std::fs::read_link(full).unwrap();
            assert_eq!(
                fs.read_link(node).unwrap(),
                std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()),
                "{path}"
            );
        } else if ft.is_file() {
            assert_eq!(m.kind, FileKind::File);
            assert_eq!(m.size, h.len(), "{path}: size");
            assert_same_data(fs, node, full, h, path);
            assert_eq!(
                fs.xattrs(node).unwrap().len(),
                host_xattrs(full).len(),
                "{path}: xattr count"
            );
            let mut x = fs.xattrs(node).unwrap();
            x.sort();
            assert_eq!(x, host_xattrs(full), "{path}: xattrs");
        } else if ft.is_dir() {
            assert_eq!(m.kind, FileKind::Dir);
            let mut x = fs.xattrs(node).unwrap();
            x.sort();
            assert_eq!(x, host_xattrs(full), "{path}: xattrs");
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                assert_eq!(m.kind, FileKind::Fifo);
            } else if ft.is_char_device() {
                assert_eq!(m.kind, FileKind::CharDevice);
                assert_eq!(m.device, Some((1, 3)), "{path}");
            }
        }
    }
    // Hard links: one inode under two names.
    let report = seen["home/alice/docs/report.bin"];
    assert_eq!(seen["home/alice/report-link.bin"], report);
    assert_eq!(nodes[&report].len(), 2);
    // Holes stay holes: the sparse file's extents cover far less than its size.
    let sparse = seen["home/alice/sparse.img"];
    let mapped: u64 = fs.extents(sparse).unwrap().iter().map(|e| e.len).sum();
    assert!(mapped <= 8192, "sparse file maps {mapped} bytes");
    // Extents point at the file's bytes on the device.
    let ext = fs.extents(report).unwrap();
    assert!(!ext.is_empty());
}

/// The bytes in the ranges our reader says hold data equal the host file's, and the host file
/// has no more data than that (its allocated blocks fit those ranges): holes are compared
/// without reading gigabytes of zeros.
fn assert_same_data(
    fs: &dyn Filesystem,
    node: u64,
    full: &Path,
    host: &std::fs::Metadata,
    path: &str,
) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(full).unwrap();
    let ranges = fs.data_ranges(node).unwrap();
    let all = ranges.clone();
    let mut covered = 0u64;
    let (mut ours, mut theirs) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for (start, len) in ranges {
        let end = (start + len).min(host.len());
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(ours.len());
            let got = fs.read_at(node, pos, &mut ours[..n]).unwrap();
            assert_eq!(got, n, "{path}: short read at {pos}");
            file.read_exact_at(&mut theirs[..n], pos).unwrap();
            assert!(
                ours[..n] == theirs[..n],
                "{path}: bytes differ near offset {pos}"
            );
            pos += n as u64;
        }
        covered += end.saturating_sub(start);
    }
    let host_data = host.blocks() * 512;
    assert!(
        host_data <= covered.next_multiple_of(4096) + 4096 * 4,
        "{path}: the host file holds {host_data} bytes of data, we found {covered}"
    );
    if covered < host.len() {
        // Outside the ranges we read zeros: spot-check the first hole byte on both sides.
        let mut one = [1u8; 1];
        let hole = (0..host.len())
            .step_by(4096)
            .find(|&o| all.iter().all(|&(s, l)| o < s || o >= s + l));
        if let Some(o) = hole {
            fs.read_at(node, o, &mut one).unwrap();
            assert_eq!(one[0], 0, "{path}: a hole reads as zero");
        }
    }
}
