//! What the tests against real e2fsprogs share: running the tools (mke2fs, debugfs, e2fsck),
//! a source tree to populate images from, and snapshots of a tree — as `debugfs rdump` writes it
//! out, and as our reader sees it — to compare.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_fs::{read_full, tree, FileKind, Filesystem};

/// Runs a tool; its output, or a panic naming the command and what it printed.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is e2fsprogs installed?)"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Runs `cmd ARGS`, which must succeed; its output (stdout and stderr).
pub fn run_tool(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run_status(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?}:\n{text}");
    text
}

/// Runs `cmd ARGS`: its exit code and output (stdout and stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (install e2fsprogs): {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `e2fsck -fn`: `Ok` when it finds nothing to fix, else what it printed.
pub fn e2fsck(img: &Path) -> Result<(), String> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .expect("running e2fsck");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }
}

/// Runs one debugfs request (`-w` to write) on `img`; debugfs reports errors in its output,
/// not its status, so the output is returned for the caller to judge.
pub fn debugfs(img: &Path, request: &str, write: bool) -> String {
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    run(cmd.arg("-R").arg(request).arg(img))
}

/// `mke2fs -q -F` of an image of `mib` MiB, with `args`, populated from `src`.
pub fn mke2fs(img: &Path, mib: u64, args: &[&str], src: &Path) {
    mke2fs_kib(img, mib << 10, args, src);
}

/// `mke2fs -q -F` of an image of `kib` KiB, with `args`, populated from `src`.
pub fn mke2fs_kib(img: &Path, kib: u64, args: &[&str], src: &Path) {
    let file = std::fs::File::create(img).unwrap();
    file.set_len(kib << 10).unwrap();
    run(Command::new("mke2fs")
        .args(["-q", "-F"])
        .args(args)
        .arg("-d")
        .arg(src)
        .arg(img));
}

/// The image as a block device.
pub fn device(img: &Path, writable: bool) -> Arc<dyn BlockDevice> {
    Arc::new(FileDevice::open(img, writable).unwrap())
}

/// A sparse file of `bytes` bytes.
pub fn blank(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

/// Bytes that differ from file to file and from block to block.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Populates `dir` with what the images must hold: files of several sizes (one of them
/// sparse, some small enough to be inline), short and long symlinks, hard links, extended
/// attributes in the inode and in a block, a POSIX ACL, an owner other than root, unusual
/// modes, a deep directory and a directory of 400 entries (hashed once `e2fsck -D` indexes
/// it).
pub fn populate(dir: &Path) {
    let file = |rel: &str, data: &[u8], mode: u32| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    for (i, size) in [
        0usize, 1, 40, 59, 60, 61, 100, 1023, 4096, 5000, 70_000, 600_000,
    ]
    .into_iter()
    .enumerate()
    {
        file(&format!("sizes/f{size}"), &pattern(i as u64, size), 0o644);
    }
    file("modes/setuid", b"#!/bin/sh\n", 0o4755);
    file("modes/private", b"secret", 0o600);
    let sparse = dir.join("sparse");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(3 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    // Data at the start, in the middle and at the end (mke2fs 1.47.0 with inline_data cuts a
    // file ending in a hole short).
    f.write_all_at(&pattern(77, 5000), 0).unwrap();
    f.write_all_at(&pattern(78, 3000), 1 << 20).unwrap();
    f.write_all_at(&pattern(79, 3000), (3 << 20) - 3000)
        .unwrap();
    std::os::unix::fs::symlink("sizes/f100", dir.join("short-link")).unwrap();
    // 100 bytes: past `i_block`, inline in the inode with inline_data.
    std::os::unix::fs::symlink("m".repeat(100), dir.join("mid-link")).unwrap();
    let long = format!("{}/target", "long-directory-name".repeat(10));
    std::os::unix::fs::symlink(long, dir.join("long-link")).unwrap();
    std::fs::hard_link(dir.join("sizes/f5000"), dir.join("hardlink")).unwrap();
    let deep: PathBuf = (0..24).map(|i| format!("d{i}")).collect();
    file(&deep.join("bottom").to_string_lossy(), b"deep", 0o640);
    // Entries just past what `i_block` holds: an inline directory continued in the inode.
    for i in 0..4 {
        file(&format!("few/file-{i:05}"), b"x", 0o644);
    }
    for i in 0..400 {
        file(&format!("many/entry-with-a-longer-name-{i:04}"), b"", 0o644);
    }
    let owned = dir.join("owned");
    file("owned", b"not root's", 0o664);
    std::os::unix::fs::chown(&owned, Some(1234), Some(5678)).unwrap();
    let attrs = dir.join("sizes/f40");
    run(Command::new("setfattr")
        .args(["-n", "user.small", "-v", "hello"])
        .arg(&attrs));
    let big = format!("0x{}", "ab".repeat(700));
    run(Command::new("setfattr")
        .args(["-n", "user.big", "-v", &big])
        .arg(&attrs));
    run(Command::new("setfacl")
        .args(["-m", "u:1234:rw"])
        .arg(dir.join("sizes/f100")));
}

/// What one entry of a tree looks like, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: FileKind,
    /// Permission bits, without the file type.
    pub mode: u32,
    pub size: u64,
    /// Contents of files, targets of symlinks.
    pub data: Vec<u8>,
}

pub type Snapshot = BTreeMap<String, Entry>;

/// A host directory's tree (as `debugfs rdump` wrote it out), without `lost+found`.
pub fn host_snapshot(root: &Path) -> Snapshot {
    let mut out = Snapshot::new();
    host_walk(root, "", &mut out);
    out.remove("lost+found");
    out
}

fn host_walk(dir: &Path, prefix: &str, out: &mut Snapshot) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = format!("{prefix}{}", e.file_name().to_string_lossy());
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        let ft = meta.file_type();
        let (kind, data) = if ft.is_dir() {
            host_walk(&e.path(), &format!("{path}/"), out);
            (FileKind::Dir, Vec::new())
        } else if ft.is_symlink() {
            let t = std::fs::read_link(e.path()).unwrap();
            (FileKind::Symlink, t.into_os_string().into_encoded_bytes())
        } else {
            (FileKind::File, std::fs::read(e.path()).unwrap())
        };
        let size = if kind == FileKind::Dir {
            0
        } else {
            data.len() as u64
        };
        let mode = meta.mode() & 0o7777;
        out.insert(
            path,
            Entry {
                kind,
                mode,
                size,
                data,
            },
        );
    }
}

/// The tree as our reader sees it, without `lost+found`; the first error found, if any.
pub fn reader_snapshot(fs: &dyn Filesystem) -> Result<Snapshot, String> {
    let mut out = Snapshot::new();
    for item in tree::Walk::new(fs, fs.root(), tree::Limits::default()) {
        let (path, entry) = item.map_err(|e| e.to_string())?;
        let meta = fs
            .metadata(entry.node)
            .map_err(|e| format!("{path}: {e}"))?;
        let data = match meta.kind {
            FileKind::File => {
                let mut buf = vec![0u8; meta.size as usize];
                let n =
                    read_full(fs, entry.node, 0, &mut buf).map_err(|e| format!("{path}: {e}"))?;
                buf.truncate(n);
                buf
            }
            FileKind::Symlink => fs
                .read_link(entry.node)
                .map_err(|e| format!("{path}: {e}"))?,
            _ => Vec::new(),
        };
        let size = if meta.kind == FileKind::Dir {
            0
        } else {
            meta.size
        };
        let mode = if meta.kind == FileKind::Symlink {
            0o777
        } else {
            meta.mode
        };
        out.insert(
            path,
            Entry {
                kind: meta.kind,
                mode,
                size,
                data,
            },
        );
    }
    out.retain(|p, _| p != "lost+found" && !p.starts_with("lost+found/"));
    Ok(out)
}

/// The snapshot without setuid and setgid bits, which `debugfs rdump` does not restore (its
/// chown after chmod clears them).
pub fn without_setid(s: &Snapshot) -> Snapshot {
    let mut s = s.clone();
    s.values_mut().for_each(|e| e.mode &= !0o6000);
    s
}

/// Drops the zero padding debugfs adds to inline files shorter than `i_block`, where our
/// reader (and the source) say the file is shorter.
pub fn unpad_inline(dumped: &mut Snapshot, reference: &Snapshot) {
    for (path, e) in dumped.iter_mut() {
        if let Some(r) = reference.get(path) {
            let padded = e.kind == FileKind::File && e.size == 60 && r.size < 60;
            if padded && e.data[r.size as usize..].iter().all(|&b| b == 0) {
                e.data.truncate(r.size as usize);
                e.size = r.size;
            }
        }
    }
}

/// The first difference between two snapshots, if any.
pub fn difference(want: &Snapshot, got: &Snapshot) -> Option<String> {
    for (path, w) in want {
        match got.get(path) {
            None => return Some(format!("{path}: missing")),
            Some(g) if g != w => {
                return Some(format!(
                    "{path}: {:?} mode {:o} size {} vs {:?} mode {:o} size {}{}",
                    w.kind,
                    w.mode,
                    w.size,
                    g.kind,
                    g.mode,
                    g.size,
                    if w.data != g.data {
                        ", contents differ"
                    } else {
                        ""
                    }
                ))
            }
            _ => {}
        }
    }
    got.keys()
        .find(|p| !want.contains_key(*p))
        .map(|p| format!("{p}: not in the source"))
}

/// `debugfs rdump` of the whole image into `out` (created), as a snapshot.
pub fn rdump(img: &Path, out: &Path) -> Snapshot {
    std::fs::create_dir_all(out).unwrap();
    debugfs(img, &format!("rdump / {}", out.display()), false);
    host_snapshot(out)
}

/// Copies the blocks `fs.allocation_map()` lists into a new image `out` of the same size, as
/// a blocks-mode capture does.
pub fn copy_used_blocks(fs: &dyn Filesystem, src: &Path, out: &Path) {
    let map = fs.allocation_map().unwrap();
    let size = std::fs::metadata(src).unwrap().len();
    blank(out, size);
    let (from, to) = (device(src, false), device(out, true));
    let bs = u64::from(map.block_size);
    for (first, count) in map.runs {
        let mut buf = vec![0u8; (count * bs) as usize];
        from.read_at(&mut buf, first * bs).unwrap();
        to.write_at(&buf, first * bs).unwrap();
    }
    to.flush().unwrap();
}

/// Extended attributes by path (paths without any left out), names sorted.
pub type Xattrs = BTreeMap<String, Vec<(String, Vec<u8>)>>;

/// The extended attributes of the tree under `root`, as `getfattr` lists them.
pub fn host_xattrs(root: &Path) -> Xattrs {
    let text = run(Command::new("getfattr")
        .args(["-R", "-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
        .arg(root));
    let prefix = format!("{}/", root.display());
    let mut out = Xattrs::new();
    let mut path = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("# file: ") {
            path = p.strip_prefix(&prefix).map(str::to_string);
        } else if let (Some(p), Some((name, value))) = (&path, line.split_once("=0x")) {
            let bytes = (0..value.len() / 2)
                .map(|i| u8::from_str_radix(&value[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            out.entry(p.clone())
                .or_default()
                .push((name.to_string(), bytes));
        }
    }
    out.values_mut().for_each(|v| v.sort());
    out
}

/// The extended attributes our reader gives for every entry of `fs`.
pub fn reader_xattrs(fs: &dyn Filesystem) -> Result<Xattrs, String> {
    let mut out = Xattrs::new();
    for item in tree::Walk::new(fs, fs.root(), tree::Limits::default()) {
        let (path, entry) = item.map_err(|e| e.to_string())?;
        let mut attrs = fs.xattrs(entry.node).map_err(|e| format!("{path}: {e}"))?;
        if !attrs.is_empty() {
            attrs.sort();
            out.insert(path, attrs);
        }
    }
    Ok(out)
}

/// A number `dumpe2fs -h` prints after `field:` (e.g. "Block count").
pub fn dumpe2fs_field(img: &Path, field: &str) -> u64 {
    let text = run(Command::new("dumpe2fs").arg("-h").arg(img));
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("dumpe2fs -h prints no {field:?}:\n{text}"));
    line.trim().parse().unwrap()
}
