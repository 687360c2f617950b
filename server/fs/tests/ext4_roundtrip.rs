//! The ext4 writer and reader against each other, without root or a kernel mount: a tree built
//! in memory is written into a `MemoryDevice`, read back with our reader and compared entry by
//! entry (names, kinds, sizes, modes, owners, times, flags, link counts, hard links, symlink
//! targets, device numbers, extended attributes and POSIX ACLs, contents and holes), including
//! hashed directories of one and two index levels and files whose extents need a tree. The
//! images are also handed to `e2fsck -fn`, so the round trip is judged by an independent tool.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_fs::ext4::write::{write_ext4, Ext4Options, Ext4Report};
use diskferry_fs::ext4::Ext4;
use diskferry_fs::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId,
    Result, Timestamp, VolumeInfo,
};
use rand::{Rng, SeedableRng};

/// Inode flags the writer carries over from a source with Linux inode flags.
const COPIED_FLAGS: u32 = 0x0003_00FB;
/// ext4's hashed-directory inode flag.
const INDEX_FL: u32 = 0x1000;

// ---------------------------------------------------------------------------------------------
// A tree in memory, seen through the `Filesystem` trait.

struct Node {
    meta: Metadata,
    data: Vec<u8>,
    /// The byte ranges holding data; `None` means all of it.
    ranges: Option<Vec<(u64, u64)>>,
    target: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
    entries: Vec<DirEntry>,
}

struct MemTree {
    nodes: Vec<Node>,
}

const ROOT: NodeId = 1;

fn ts(secs: i64, nanos: u32) -> Timestamp {
    Timestamp { secs, nanos }
}

impl MemTree {
    fn new() -> MemTree {
        let mut t = MemTree { nodes: Vec::new() };
        t.add(FileKind::Dir, 0o755);
        t
    }

    fn add(&mut self, kind: FileKind, mode: u32) -> NodeId {
        let node = self.nodes.len() as NodeId + 1;
        // Times that differ per node, with nanoseconds.
        let base = 1_600_000_000 + node as i64 * 1000;
        self.nodes.push(Node {
            meta: Metadata {
                node,
                kind,
                size: 0,
                mode,
                uid: 1000 + node as u32,
                gid: 100,
                links: 1,
                atime: Some(ts(base + 1, 111_111_111)),
                mtime: Some(ts(base + 2, 222_222_222)),
                ctime: Some(ts(base + 3, 333_333_333)),
                crtime: Some(ts(base, 999_999_999)),
                device: None,
                flags: 0,
                allocated: 0,
            },
            data: Vec::new(),
            ranges: None,
            target: Vec::new(),
            xattrs: Vec::new(),
            entries: Vec::new(),
        });
        node
    }

    fn node(&self, n: NodeId) -> Result<&Node> {
        self.nodes
            .get((n as usize).wrapping_sub(1))
            .ok_or_else(|| FsError::NotFound(format!("node {n}")))
    }

    fn node_mut(&mut self, n: NodeId) -> &mut Node {
        &mut self.nodes[n as usize - 1]
    }

    fn link(&mut self, parent: NodeId, name: &[u8], node: NodeId) {
        let kind = self.nodes[node as usize - 1].meta.kind;
        self.node_mut(parent).entries.push(DirEntry {
            name: name.to_vec(),
            node,
            kind,
        });
    }

    fn dir(&mut self, parent: NodeId, name: &str) -> NodeId {
        let n = self.add(FileKind::Dir, 0o755);
        self.link(parent, name.as_bytes(), n);
        n
    }

    fn file(&mut self, parent: NodeId, name: &[u8], data: Vec<u8>) -> NodeId {
        let n = self.add(FileKind::File, 0o644);
        let node = self.node_mut(n);
        node.meta.size = data.len() as u64;
        node.data = data;
        self.link(parent, name, n);
        n
    }

    /// A file of `size` bytes holding `pieces` (offset, bytes) and holes elsewhere.
    fn sparse(&mut self, parent: NodeId, name: &str, size: u64, pieces: &[(u64, &[u8])]) {
        let mut data = vec![0u8; size as usize];
        for (at, bytes) in pieces {
            data[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        let n = self.file(parent, name.as_bytes(), data);
        self.node_mut(n).ranges = Some(
            pieces
                .iter()
                .map(|(at, bytes)| (*at, bytes.len() as u64))
                .collect(),
        );
    }

    fn symlink(&mut self, parent: NodeId, name: &str, target: &[u8]) -> NodeId {
        let n = self.add(FileKind::Symlink, 0o777);
        let node = self.node_mut(n);
        node.meta.size = target.len() as u64;
        node.target = target.to_vec();
        self.link(parent, name.as_bytes(), n);
        n
    }

    fn special(&mut self, parent: NodeId, name: &str, kind: FileKind, dev: Option<(u32, u32)>) {
        let n = self.add(kind, 0o640);
        self.node_mut(n).meta.device = dev;
        self.link(parent, name.as_bytes(), n);
    }
}

impl Filesystem for MemTree {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            kind: FsKind::Ext4,
            label: String::new(),
            uuid: String::new(),
            block_size: 4096,
            total_bytes: 0,
            used_bytes: 0,
        }
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        Ok(self.node(node)?.meta.clone())
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        Ok(self.node(dir)?.entries.clone())
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = &self.node(node)?.data;
        if offset >= data.len() as u64 {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - offset as usize);
        buf[..n].copy_from_slice(&data[offset as usize..offset as usize + n]);
        Ok(n)
    }

    fn read_link(&self, node: NodeId) -> Result<Vec<u8>> {
        Ok(self.node(node)?.target.clone())
    }

    fn xattrs(&self, node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self.node(node)?.xattrs.clone())
    }

    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        Ok(self
            .data_ranges(node)?
            .into_iter()
            .map(|(off, len)| FileExtent {
                file_offset: off,
                disk_offset: off,
                len,
                unwritten: false,
            })
            .collect())
    }

    fn data_ranges(&self, node: NodeId) -> Result<Vec<(u64, u64)>> {
        let n = self.node(node)?;
        Ok(match &n.ranges {
            Some(r) => r.clone(),
            None if n.data.is_empty() => Vec::new(),
            None => vec![(0, n.data.len() as u64)],
        })
    }

    fn flags_are_linux_inode_flags(&self) -> bool {
        true
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        Ok(AllocationMap {
            block_size: 4096,
            runs: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Building, writing, reading back, comparing.

/// A POSIX ACL in the VFS form tools see: (tag, perm, id) entries, `u32::MAX` for no id.
fn vfs_acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// A tree with one of everything the writer handles.
fn assorted_tree() -> MemTree {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut random = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.gen()).collect() };
    let mut t = MemTree::new();
    let docs = t.dir(ROOT, "docs");
    let deep = t.dir(docs, "deep");
    let deeper = t.dir(deep, "deeper");
    t.file(ROOT, b"empty", Vec::new());
    t.file(ROOT, b"one", b"x".to_vec());
    for size in [4095usize, 4096, 4097, 100_000, 1 << 20] {
        t.file(docs, format!("random-{size}").as_bytes(), random(size));
    }
    t.file(deeper, b"name with spaces and \xff\xfe bytes", random(10));
    t.file(deeper, &[b'n'; 255], random(300));
    // A file with holes, and one with so many pieces its extents need a tree block.
    t.sparse(
        ROOT,
        "sparse",
        10 << 20,
        &[
            (0, b"head"),
            (5 << 20, b"middle"),
            ((10 << 20) - 4, b"tail"),
        ],
    );
    let pieces: Vec<(u64, Vec<u8>)> = (0..12u64)
        .map(|i| (i * 3 * 4096 + 17, format!("piece {i}").into_bytes()))
        .collect();
    let pieces: Vec<(u64, &[u8])> = pieces.iter().map(|(a, b)| (*a, b.as_slice())).collect();
    t.sparse(ROOT, "fragmented", 40 * 4096, &pieces);
    // Hard links: one file under three names in two directories.
    let shared = t.file(ROOT, b"shared", b"shared content".to_vec());
    t.link(docs, b"shared-again", shared);
    t.link(deeper, b"shared-third", shared);
    // Symlinks: fast (in the inode) and slow (in a block).
    t.symlink(ROOT, "fast-link", b"docs/deep");
    t.symlink(docs, "slow-link", "long/".repeat(40).as_bytes());
    t.symlink(docs, "link-59", &[b'a'; 59]);
    t.symlink(docs, "link-60", &[b'b'; 60]);
    // Special files, with old and new device number encodings.
    t.special(ROOT, "null", FileKind::CharDevice, Some((1, 3)));
    t.special(ROOT, "big-dev", FileKind::BlockDevice, Some((259, 70_000)));
    t.special(ROOT, "fifo", FileKind::Fifo, None);
    t.special(ROOT, "socket", FileKind::Socket, None);
    // Modes, owners, flags and times at the edges.
    let odd = t.file(docs, b"odd", b"odd".to_vec());
    {
        let m = &mut t.node_mut(odd).meta;
        m.mode = 0o6755;
        m.uid = 70_000;
        m.gid = 80_000;
        m.flags = 0x10 | 0x40 | 0x80; // immutable, nodump, noatime
        m.atime = Some(ts(-1_000_000_000, 5)); // 1938
        m.mtime = Some(ts(3_000_000_000, 999_999_999)); // 2065
        m.ctime = Some(ts(0, 0));
        m.crtime = Some(ts(5_000_000_000, 1)); // 2128
    }
    t.node_mut(deep).meta.mode = 0o1777;
    // Extended attributes: in the inode, in a block, and POSIX ACLs.
    let xa = t.file(docs, b"attrs", b"with attributes".to_vec());
    t.node_mut(xa).xattrs = vec![
        ("user.small".into(), b"value".to_vec()),
        ("user.empty".into(), Vec::new()),
        ("trusted.t".into(), b"trusted value".to_vec()),
        (
            "security.selinux".into(),
            b"system_u:object_r:etc_t:s0\0".to_vec(),
        ),
        (
            "system.posix_acl_access".into(),
            vfs_acl(&[
                (1, 6, u32::MAX),
                (2, 4, 1000),
                (4, 4, u32::MAX),
                (8, 5, 2000),
                (0x10, 4, u32::MAX),
                (0x20, 0, u32::MAX),
            ]),
        ),
    ];
    let big = t.file(docs, b"big-attrs", b"attributes in a block".to_vec());
    t.node_mut(big).xattrs = vec![
        ("user.big".into(), vec![b'v'; 1500]),
        ("user.other".into(), b"x".to_vec()),
    ];
    t.node_mut(deep).xattrs = vec![(
        "system.posix_acl_default".into(),
        vfs_acl(&[(1, 7, u32::MAX), (4, 5, u32::MAX), (0x20, 5, u32::MAX)]),
    )];
    t
}

/// A tree whose directory `big` has `n` entries with names of `name_len` bytes.
fn big_dir_tree(n: usize, name_len: usize) -> MemTree {
    let mut t = MemTree::new();
    let big = t.dir(ROOT, "big");
    let shared = t.file(ROOT, b"target", b"t".to_vec());
    for i in 0..n {
        let mut name = format!("entry-{i:06}-").into_bytes();
        name.resize(name_len, b'a' + (i % 26) as u8);
        if i % 3 == 0 {
            t.link(big, &name, shared);
        } else if i % 3 == 1 {
            t.file(big, &name, Vec::new());
        } else {
            t.dir(big, std::str::from_utf8(&name).unwrap());
        }
    }
    t
}

/// Writes `tree` as ext4 into a device of `size` bytes; returns the device and the report.
fn write(tree: &MemTree, size: usize, opts: &Ext4Options) -> (Arc<MemoryDevice>, Ext4Report) {
    let dev = Arc::new(MemoryDevice::new(size));
    let report = write_ext4(Arc::clone(&dev) as Arc<dyn BlockDevice>, tree, opts).unwrap();
    (dev, report)
}

fn open(dev: &Arc<MemoryDevice>) -> Ext4 {
    Ext4::open(Arc::clone(dev) as Arc<dyn BlockDevice>).unwrap()
}

/// Every entry below the root by path: (entry, metadata).
fn entries(fs: &dyn Filesystem) -> BTreeMap<String, (DirEntry, Metadata)> {
    let mut out = BTreeMap::new();
    diskferry_fs::tree::walk(
        fs,
        fs.root(),
        &mut |path, e| {
            out.insert(path.to_string(), (e.clone(), fs.metadata(e.node)?));
            Ok(())
        },
        &mut |path, e| panic!("{path}: {e}"),
    )
    .unwrap();
    out
}

fn sorted(mut v: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    v.sort();
    v
}

/// Compares what our reader sees in `copy` with the source tree, entry by entry.
fn assert_same_tree(src: &MemTree, copy: &Ext4) {
    let want = entries(src);
    let got = entries(copy);
    let mut names: Vec<&String> = got.keys().filter(|p| *p != "lost+found").collect();
    names.sort();
    assert_eq!(names, want.keys().collect::<Vec<_>>(), "the same paths");
    // Names per source node, for link counts and hard links.
    let mut names_of: HashMap<NodeId, Vec<&str>> = HashMap::new();
    for (path, (e, _)) in &want {
        names_of.entry(e.node).or_default().push(path);
    }
    for (path, (se, sm)) in &want {
        let (ge, gm) = &got[path];
        assert_eq!(ge.kind, se.kind, "{path}: kind");
        assert_eq!(gm.kind, sm.kind, "{path}: kind in the inode");
        assert_eq!(gm.mode, sm.mode, "{path}: mode");
        assert_eq!((gm.uid, gm.gid), (sm.uid, sm.gid), "{path}: owner");
        assert_eq!(gm.atime, sm.atime, "{path}: atime");
        assert_eq!(gm.mtime, sm.mtime, "{path}: mtime");
        assert_eq!(gm.ctime, sm.ctime, "{path}: ctime");
        assert_eq!(gm.crtime, sm.crtime, "{path}: crtime");
        assert_eq!(
            gm.flags & COPIED_FLAGS,
            sm.flags & COPIED_FLAGS,
            "{path}: flags"
        );
        assert_eq!(
            sorted(copy.xattrs(ge.node).unwrap()),
            sorted(src.xattrs(se.node).unwrap()),
            "{path}: extended attributes"
        );
        // Every name of one source node is one inode in the copy.
        for other in &names_of[&se.node] {
            assert_eq!(got[*other].0.node, ge.node, "{path} and {other}: one inode");
        }
        match se.kind {
            FileKind::Dir => {
                let subdirs = src
                    .read_dir(se.node)
                    .unwrap()
                    .iter()
                    .filter(|e| e.kind == FileKind::Dir)
                    .count() as u32;
                assert_eq!(gm.links, 2 + subdirs, "{path}: directory links");
            }
            FileKind::File => {
                assert_eq!(gm.size, sm.size, "{path}: size");
                assert_eq!(gm.links as usize, names_of[&se.node].len(), "{path}: links");
                assert_eq!(
                    copy.read_all(ge.node, 1 << 30).unwrap(),
                    src.read_all(se.node, 1 << 30).unwrap(),
                    "{path}: contents"
                );
                // Holes stay holes: the copy allocates only the blocks with data.
                let data_blocks: u64 = src
                    .data_ranges(se.node)
                    .unwrap()
                    .iter()
                    .map(|(off, len)| (off + len).div_ceil(4096) - off / 4096)
                    .sum();
                assert_eq!(
                    copy.extents(ge.node)
                        .unwrap()
                        .iter()
                        .map(|e| e.len.div_ceil(4096))
                        .sum::<u64>(),
                    data_blocks,
                    "{path}: blocks with data"
                );
            }
            FileKind::Symlink => {
                assert_eq!(gm.size, sm.size, "{path}: size");
                assert_eq!(
                    copy.read_link(ge.node).unwrap(),
                    src.read_link(se.node).unwrap(),
                    "{path}: target"
                );
            }
            FileKind::CharDevice | FileKind::BlockDevice => {
                assert_eq!(gm.device, sm.device, "{path}: device numbers")
            }
            FileKind::Fifo | FileKind::Socket => {}
        }
    }
    let lf = &got["lost+found"].1;
    assert_eq!((lf.kind, lf.mode, lf.links), (FileKind::Dir, 0o700, 2));
}

/// `e2fsck -fn` on the device's image finds nothing. Skipped (with a note) only where
/// e2fsprogs is not installed.
fn assert_e2fsck_clean(dev: &MemoryDevice) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image.ext4");
    std::fs::write(&img, dev.contents()).unwrap();
    let Some(out) = run_e2fsck(&img) else {
        eprintln!("e2fsck is not installed: the independent check is skipped");
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let unexpected: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("Pass ") && !l.starts_with("e2fsck ") && !l.contains(" files ("))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        out.status.success() && unexpected.is_empty(),
        "e2fsck -fn:\n{text}"
    );
}

fn run_e2fsck(img: &Path) -> Option<std::process::Output> {
    for exe in ["e2fsck", "/sbin/e2fsck", "/usr/sbin/e2fsck"] {
        match Command::new(exe).arg("-fn").arg(img).output() {
            Ok(out) => return Some(out),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("running e2fsck: {e}"),
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------

#[test]
fn an_assorted_tree_reads_back_as_written() {
    let tree = assorted_tree();
    let (dev, report) = write(&tree, 64 << 20, &Ext4Options::default());
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(
        (report.dirs, report.symlinks, report.special),
        (4, 4, 4),
        "{report:?}"
    );
    let fs = open(&dev);
    assert_same_tree(&tree, &fs);
    assert_e2fsck_clean(&dev);
}

#[test]
fn identity_and_geometry_survive_and_the_copy_opens_with_the_same_options() {
    let tree = assorted_tree();
    let opts = Ext4Options {
        label: Some("roundtrip".into()),
        uuid: Some(*b"0123456789abcdef"),
        hash_seed: Some(*b"fedcba9876543210"),
        journal_blocks: Some(2048),
        min_inodes: 5000,
        ..Ext4Options::default()
    };
    let (dev, _) = write(&tree, 96 << 20, &opts);
    let fs = open(&dev);
    let info = fs.info();
    assert_eq!(info.label, "roundtrip");
    assert_eq!(info.uuid, "30313233-3435-3637-3839-616263646566");
    assert_eq!(info.kind, FsKind::Ext4);
    assert_eq!(info.block_size, 4096);
    assert_eq!(info.total_bytes, 96 << 20);
    let again = fs.format_options();
    assert_eq!(again.uuid, opts.uuid);
    assert_eq!(again.hash_seed, opts.hash_seed);
    assert_eq!(again.label, opts.label);
    assert_eq!(again.journal_blocks, Some(2048));
    assert!(again.inodes >= Some(5000));
    // The allocation map holds at least the journal and every file's blocks.
    let used = fs.allocation_map().unwrap().used_blocks();
    assert!(used > 2048 + (1 << 20) / 4096, "{used} blocks used");
    assert!(info.used_bytes >= used * 4096 - 4096 * 64, "{info:?}");
    // Copying the copy through the writer with its own options gives the same tree.
    let (dev2, _) = write_copy(&fs, 96 << 20, &again);
    let fs2 = open(&dev2);
    assert_eq!(fs2.info().uuid, info.uuid);
    assert_same_tree(&tree, &fs2);
    assert_e2fsck_clean(&dev2);
}

fn write_copy(src: &Ext4, size: usize, opts: &Ext4Options) -> (Arc<MemoryDevice>, Ext4Report) {
    let dev = Arc::new(MemoryDevice::new(size));
    let report = write_ext4(Arc::clone(&dev) as Arc<dyn BlockDevice>, src, opts).unwrap();
    (dev, report)
}

#[test]
fn a_large_directory_gets_a_hash_index_the_reader_and_e2fsck_accept() {
    let tree = big_dir_tree(2000, 40);
    let (dev, report) = write(&tree, 64 << 20, &Ext4Options::default());
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let fs = open(&dev);
    let big = fs.lookup("big").unwrap();
    let meta = fs.metadata(big).unwrap();
    assert_ne!(meta.flags & INDEX_FL, 0, "the directory is indexed");
    assert!(meta.size > 4096 * 10);
    assert_same_tree(&tree, &fs);
    assert_e2fsck_clean(&dev);
}

#[test]
fn a_directory_beyond_one_index_level_gets_two_on_1k_blocks() {
    // 1 KiB blocks: a root index holds 123 leaves; 3000 entries of 60 bytes need ~220.
    let tree = big_dir_tree(3000, 60);
    let opts = Ext4Options {
        block_size: 1024,
        ..Ext4Options::default()
    };
    let (dev, report) = write(&tree, 32 << 20, &opts);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let fs = open(&dev);
    assert_eq!(fs.info().block_size, 1024);
    let big = fs.lookup("big").unwrap();
    assert_ne!(fs.metadata(big).unwrap().flags & INDEX_FL, 0);
    assert_eq!(fs.read_dir(big).unwrap().len(), 3000);
    assert_same_tree(&tree, &fs);
    assert_e2fsck_clean(&dev);
}

#[test]
fn an_empty_tree_without_a_journal_is_still_a_filesystem() {
    let tree = MemTree::new();
    let opts = Ext4Options {
        journal_blocks: Some(0),
        ..Ext4Options::default()
    };
    let (dev, report) = write(&tree, 8 << 20, &opts);
    let root_only = Ext4Report {
        dirs: 1,
        ..Ext4Report::default()
    };
    assert_eq!(report, root_only);
    let fs = open(&dev);
    assert_eq!(fs.format_options().journal_blocks, Some(0));
    assert_eq!(fs.read_dir(fs.root()).unwrap().len(), 1, "only lost+found");
    assert_same_tree(&tree, &fs);
    assert_e2fsck_clean(&dev);
}

#[test]
fn attributes_ext4_cannot_hold_are_reported_not_written() {
    let mut tree = MemTree::new();
    let f = tree.file(ROOT, b"f", b"data".to_vec());
    tree.node_mut(f).xattrs = vec![
        ("user.kept".into(), b"yes".to_vec()),
        ("ntfs.stream".into(), b"no".to_vec()),
        ("system.posix_acl_access".into(), b"not an acl".to_vec()),
        ("user.huge".into(), vec![0u8; 8000]),
    ];
    let (dev, report) = write(&tree, 16 << 20, &Ext4Options::default());
    let skipped: Vec<&str> = report.skipped.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped[0].contains("no namespace"), "{skipped:?}");
    assert!(skipped[1].contains("POSIX ACL"), "{skipped:?}");
    assert!(skipped[2].contains("larger than one block"), "{skipped:?}");
    let fs = open(&dev);
    let node = fs.lookup("f").unwrap();
    // Attributes that do not fit a block are all dropped, the rest of the file is kept.
    assert_eq!(fs.xattrs(node).unwrap(), Vec::new());
    assert_eq!(fs.read_all(node, 100).unwrap(), b"data");
    assert_e2fsck_clean(&dev);
}

#[test]
fn a_damaged_inode_is_an_error_naming_it() {
    let tree = assorted_tree();
    let (dev, _) = write(&tree, 64 << 20, &Ext4Options::default());
    let fs = open(&dev);
    let node = fs.lookup("docs/random-4096").unwrap();
    // Break the extent tree magic in the inode's i_block (inode + 0x28).
    let (table, inode_size) = {
        // Group 0's inode table, from the group descriptor at block 1.
        let mut gd = [0u8; 64];
        dev.read_at(&mut gd, 4096).unwrap();
        (
            u64::from(u32::from_le_bytes(gd[8..12].try_into().unwrap())),
            256u64,
        )
    };
    let at = table * 4096 + (node - 1) * inode_size + 0x28;
    dev.write_at(&[0, 0], at).unwrap();
    let fs2 = open(&dev);
    let err = fs2.read_all(node, 1 << 20).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("inode {node}")), "{text}");
    assert!(text.contains("no magic"), "{text}");
    drop(fs);
}
