//! FAT round trips without root: a small tree (long and short names, nested directories,
//! DOS attributes, creation/modification/access times, contents of several sizes) written
//! with `write_fat` into memory and read back with our FAT reader, for FAT12, FAT16 and
//! FAT32; from a Unix-like source (attributes derived from modes); and `fsck.fat -n` on the
//! image written into a temporary file.

use std::collections::BTreeMap;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice, MemoryDevice};
use diskferry_fs::fat::Fat;
use diskferry_fs::fat_write::{write_fat, FatOptions};
use diskferry_fs::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId,
    Result, Timestamp, VolumeInfo,
};

const MIB: u64 = 1 << 20;
const READ_ONLY: u32 = 0x01;
const HIDDEN: u32 = 0x02;
const SYSTEM: u32 = 0x04;
const DIRECTORY: u32 = 0x10;
const ARCHIVE: u32 = 0x20;

/// One file or directory of the in-memory source.
struct Node {
    name: String,
    parent: NodeId,
    kind: FileKind,
    data: Vec<u8>,
    flags: u32,
    mode: u32,
    crtime: Option<Timestamp>,
    mtime: Option<Timestamp>,
    atime: Option<Timestamp>,
}

/// A tree held in memory, posing as a filesystem of `kind` (FAT: its flags are DOS
/// attributes; ext4: modes decide).
struct Tree {
    kind: FsKind,
    nodes: Vec<Node>,
}

fn at(year: i64, month: i64, day: i64, h: i64, m: i64, s: i64, centis: u32) -> Timestamp {
    Timestamp::from_civil(year, month, day, h * 3600 + m * 60 + s, centis * 10_000_000)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 9) as u8)
        .collect()
}

impl Tree {
    fn new(kind: FsKind) -> Tree {
        let root = Node {
            name: String::new(),
            parent: 0,
            kind: FileKind::Dir,
            data: Vec::new(),
            flags: DIRECTORY,
            mode: 0o755,
            crtime: None,
            mtime: None,
            atime: None,
        };
        Tree {
            kind,
            nodes: vec![root],
        }
    }

    fn add(&mut self, parent: NodeId, name: &str, kind: FileKind, data: Vec<u8>) -> NodeId {
        let n = self.nodes.len() as u64;
        let seed = n as u32;
        self.nodes.push(Node {
            name: name.into(),
            parent,
            kind,
            data,
            flags: if kind == FileKind::Dir {
                DIRECTORY
            } else {
                ARCHIVE
            },
            mode: if kind == FileKind::Dir { 0o755 } else { 0o644 },
            crtime: Some(at(2010, 1, 2, 3, 4, 5 + seed as i64, 67)),
            mtime: Some(at(2015, 6, 7, 8, 9, 10 + 2 * seed as i64, 0)),
            atime: Some(at(2020, 2, 3, 0, 0, 0, 0)),
        });
        n
    }

    /// A tree with long names, mixed case, nesting, attributes and contents of many sizes.
    fn sample(kind: FsKind) -> Tree {
        let mut t = Tree::new(kind);
        let readme = t.add(0, "README.TXT", FileKind::File, b"hello\n".to_vec());
        t.nodes[readme as usize].flags = ARCHIVE | READ_ONLY;
        t.nodes[readme as usize].mode = 0o444;
        let long = t.add(
            0,
            "A rather long file name with spaces — and ünïcödé.data",
            FileKind::File,
            pattern(300_000, 7),
        );
        t.nodes[long as usize].flags = HIDDEN | SYSTEM;
        let docs = t.add(0, "docs", FileKind::Dir, Vec::new());
        let deep = t.add(docs, "Deeply Nested Directory", FileKind::Dir, Vec::new());
        t.add(deep, "empty.bin", FileKind::File, Vec::new());
        t.add(deep, "one-cluster.bin", FileKind::File, pattern(4096, 3));
        t.add(docs, "mixed Case.Md", FileKind::File, pattern(513, 5));
        t.add(docs, "lower.txt", FileKind::File, pattern(70_000, 11));
        let link = t.add(0, "a-symlink", FileKind::Symlink, b"README.TXT".to_vec());
        t.nodes[link as usize].flags = 0;
        t
    }

    fn node(&self, n: NodeId) -> Result<&Node> {
        self.nodes
            .get(n as usize)
            .ok_or_else(|| FsError::NotFound(format!("node {n}")))
    }
}

impl Filesystem for Tree {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            kind: self.kind,
            label: String::new(),
            uuid: String::new(),
            block_size: 512,
            total_bytes: 0,
            used_bytes: 0,
        }
    }

    fn root(&self) -> NodeId {
        0
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        let n = self.node(node)?;
        Ok(Metadata {
            node,
            kind: n.kind,
            size: n.data.len() as u64,
            mode: n.mode,
            uid: 0,
            gid: 0,
            links: 1,
            atime: n.atime,
            mtime: n.mtime,
            ctime: None,
            crtime: n.crtime,
            device: None,
            flags: n.flags,
            allocated: 0,
        })
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        Ok(self
            .nodes
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, n)| n.parent == dir)
            .map(|(i, n)| DirEntry {
                name: n.name.clone().into_bytes(),
                node: i as u64,
                kind: n.kind,
            })
            .collect())
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data = &self.node(node)?.data;
        let start = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn read_link(&self, node: NodeId) -> Result<Vec<u8>> {
        Ok(self.node(node)?.data.clone())
    }

    fn xattrs(&self, _node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }

    fn extents(&self, _node: NodeId) -> Result<Vec<FileExtent>> {
        Ok(Vec::new())
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        Ok(AllocationMap {
            block_size: 512,
            runs: Vec::new(),
        })
    }
}

/// Every path of `fs` with its metadata and contents.
fn listing(fs: &dyn Filesystem) -> BTreeMap<String, (Metadata, Vec<u8>)> {
    let mut out = BTreeMap::new();
    diskferry_fs::tree::walk(
        fs,
        fs.root(),
        &mut |path, e| {
            let meta = fs.metadata(e.node)?;
            let mut data = vec![0u8; meta.size as usize];
            if meta.kind == FileKind::File {
                let n = fs.read_at(e.node, 0, &mut data)?;
                assert_eq!(n, data.len(), "{path}: short read");
            }
            out.insert(path.to_string(), (meta, data));
            Ok(())
        },
        &mut |path, err| panic!("{path}: {err}"),
    )
    .unwrap();
    out
}

/// A time as FAT keeps it: to 2 seconds, or to the day for access times.
fn fat_time(t: Option<Timestamp>, resolution: i64) -> Option<i64> {
    t.map(|t| t.secs - t.secs.rem_euclid(resolution))
}

/// The source's paths (what FAT can hold) against the volume's: names, kinds, sizes,
/// contents, attributes and times.
fn compare(source: &Tree, fat: &Fat, dos_attributes: bool) {
    let want = listing(source);
    let got = listing(fat);
    let expected: Vec<&String> = want
        .iter()
        .filter(|(_, (m, _))| matches!(m.kind, FileKind::File | FileKind::Dir))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), expected, "paths");
    for (path, (meta, data)) in &got {
        let (src, src_data) = &want[path];
        assert_eq!(meta.kind, src.kind, "{path}: kind");
        assert_eq!(data, src_data, "{path}: contents");
        let attrs = if dos_attributes {
            src.flags & (READ_ONLY | HIDDEN | SYSTEM | ARCHIVE)
        } else if src.kind == FileKind::File {
            ARCHIVE | if src.mode & 0o222 == 0 { READ_ONLY } else { 0 }
        } else {
            0
        };
        let dir = if src.kind == FileKind::Dir {
            DIRECTORY
        } else {
            0
        };
        assert_eq!(meta.flags, attrs | dir, "{path}: attributes");
        assert_eq!(
            meta.mode & 0o222 == 0,
            attrs & READ_ONLY != 0,
            "{path}: mode"
        );
        assert_eq!(
            fat_time(meta.mtime, 2),
            fat_time(src.mtime, 2),
            "{path}: mtime"
        );
        assert_eq!(meta.crtime, src.crtime, "{path}: creation time (10 ms)");
        assert_eq!(
            fat_time(meta.atime, 86_400),
            fat_time(src.atime, 86_400),
            "{path}: access date"
        );
    }
}

fn write_and_read(source: &Tree, size: u64, opts: &FatOptions) -> (Arc<MemoryDevice>, Fat) {
    let dev = Arc::new(MemoryDevice::new(size as usize));
    let report = write_fat(dev.clone(), source, opts).unwrap();
    assert_eq!(
        report.skipped.len(),
        1,
        "only the symlink: {:?}",
        report.skipped
    );
    assert!(
        report.skipped[0].1.contains("symlink"),
        "{:?}",
        report.skipped
    );
    let fat = Fat::open(dev.clone()).unwrap();
    (dev, fat)
}

#[test]
fn fat12_16_32_round_trip_names_attributes_times_and_contents() {
    let source = Tree::sample(FsKind::Fat32);
    for (kind, size, cluster) in [
        (FsKind::Fat12, 4 * MIB, None),
        (FsKind::Fat16, 32 * MIB, None),
        (FsKind::Fat32, 48 * MIB, Some(512)),
    ] {
        let opts = FatOptions {
            kind: Some(kind),
            label: Some("Round Trip".into()),
            serial: Some(0xCAFE_F00D),
            cluster_size: cluster,
            ..FatOptions::default()
        };
        let (_, fat) = write_and_read(&source, size, &opts);
        let info = fat.info();
        assert_eq!(info.kind, kind);
        assert_eq!(
            (info.label.as_str(), info.uuid.as_str()),
            ("ROUND TRIP", "CAFE-F00D")
        );
        compare(&source, &fat, true);
        // The writer's options read back from the volume.
        let again = fat.format_options();
        assert_eq!((again.kind, again.serial), (Some(kind), Some(0xCAFE_F00D)));
    }
}

#[test]
fn a_unix_source_gets_archive_and_read_only_from_its_modes() {
    let source = Tree::sample(FsKind::Ext4);
    let opts = FatOptions {
        kind: Some(FsKind::Fat16),
        ..FatOptions::default()
    };
    let (_, fat) = write_and_read(&source, 16 * MIB, &opts);
    compare(&source, &fat, false);
}

#[test]
fn fsck_fat_accepts_what_we_write() {
    let source = Tree::sample(FsKind::Fat32);
    let dir = tempfile::tempdir().unwrap();
    for (kind, size) in [(FsKind::Fat16, 16 * MIB), (FsKind::Fat32, 40 * MIB)] {
        let path = dir.path().join(format!("{}.img", kind.name()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::from_file(file, &path, true).unwrap());
        let opts = FatOptions {
            kind: Some(kind),
            cluster_size: Some(512),
            ..FatOptions::default()
        };
        write_fat(dev.clone(), &source, &opts).unwrap();
        drop(dev);
        let out = std::process::Command::new("fsck.fat")
            .arg("-n")
            .arg(&path)
            .output()
            .expect("fsck.fat (dosfstools) runs");
        assert!(
            out.status.success(),
            "fsck.fat -n {}: {}{}",
            kind.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let fat = Fat::open(Arc::new(FileDevice::open(&path, false).unwrap())).unwrap();
        compare(&source, &fat, true);
    }
}
