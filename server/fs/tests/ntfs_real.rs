//! Our NTFS reader on volumes made by the ntfs-3g tools, checked against those tools:
//! compressed files (written through an `ntfs-3g` FUSE mount into a directory with the
//! compressed attribute, on volumes of 512-, 2048- and 4096-byte clusters) read as `ntfscat`
//! reads them; a volume with 512-byte clusters whose
//! `$MFT` grew into fragments, with a file record split across two of them, lists as
//! `ntfsls -R` lists it; a sparse file whose 600 runs spill from the base record into an
//! extension record (an attribute list) reads whole, with its extents and its alternate data
//! streams; and a copy of only the allocation map's blocks passes `ntfsfix -n`
//! (the backup boot sector included) and still lists and reads the same.
//!
//! Needs root, /dev/fuse and ntfs-3g (mkntfs, ntfs-3g, ntfscat, ntfsls, ntfsinfo, ntfsfix).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice, MemoryDevice};
use diskferry_fs::ntfs::NtfsFs;
use diskferry_fs::{FileKind, Filesystem, FsError};

/// FILE_ATTRIBUTE_COMPRESSED.
const COMPRESSED: u32 = 0x800;

fn sh(script: &str) {
    let out = Command::new("bash")
        .args(["-eu", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\nfailed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tool(cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// An `ntfs-3g` mount of an image, unmounted when dropped (also when a test fails).
struct Mount(PathBuf);

impl Mount {
    fn new(image: &Path, dir: &Path, options: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        tool("ntfs-3g", &["-o", options, &p(image), &p(dir)]);
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn open(image: &Path) -> NtfsFs {
    NtfsFs::open(Arc::new(FileDevice::open(image, false).unwrap())).unwrap()
}

/// Every path (from the root, `/`-separated) our walk finds.
fn our_listing(fs: &dyn Filesystem) -> Vec<String> {
    let mut out = Vec::new();
    diskferry_fs::tree::walk(
        fs,
        fs.root(),
        &mut |path, _| {
            out.push(format!("/{}", path.trim_start_matches('/')));
            Ok(())
        },
        &mut |path, e| panic!("{path}: {e}"),
    )
    .unwrap();
    out.sort();
    out
}

/// Every path `ntfsls -R` lists.
fn ntfsls_listing(image: &Path) -> Vec<String> {
    let text = String::from_utf8(tool("ntfsls", &["-R", &p(image)])).unwrap();
    let mut out = Vec::new();
    let mut dir = String::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(heading) = line.strip_suffix(':').filter(|h| h.starts_with('/')) {
            dir = heading.trim_end_matches('/').to_string();
        } else if line != "." && line != ".." {
            out.push(format!("{dir}/{line}"));
        }
    }
    out.sort();
    out
}

/// Compares our bytes of every regular file with `ntfscat`'s; returns how many files.
fn same_bytes_as_ntfscat(fs: &NtfsFs, image: &Path, paths: &[String]) -> usize {
    let mut files = 0;
    for path in paths {
        let node = fs.lookup(path).unwrap();
        if fs.metadata(node).unwrap().kind != FileKind::File {
            continue;
        }
        let ours = fs.read_all(node, 64 << 20).unwrap();
        let theirs = tool("ntfscat", &[&p(image), path]);
        assert!(ours == theirs, "{path}: our bytes differ from ntfscat's");
        files += 1;
    }
    files
}

/// A volume with `cluster`-byte clusters and a compressed directory `/z` of files written
/// through ntfs-3g: small (resident), exactly one unit of 4 KiB clusters, just under two,
/// incompressible, mixed, with a hole inside, and one in a subdirectory.
fn compressed_volume(dir: &Path, cluster: u64) -> PathBuf {
    let image = dir.join(format!("c{cluster}.img"));
    sh(&format!(
        "truncate -s 64M {img} && mkntfs -q -F -Q -c {cluster} {img} 2>/dev/null",
        img = p(&image)
    ));
    let mnt = Mount::new(&image, &dir.join(format!("mnt{cluster}")), "compression");
    sh(&format!(
        r#"
        mkdir {z}
        setfattr -n system.ntfs_attrib_be -v 0x00000800 {z}
        cd {z}
        printf 'small and resident' > small.txt
        yes 'one compression unit' | head -c 65536 > unit.bin
        yes 'just under two units' | head -c 131071 > under.bin
        head -c 300000 /dev/urandom > random.bin
        {{ head -c 100000 /dev/urandom; yes mixed | head -c 500000;
           head -c 70000 /dev/urandom; seq 1 100000; }} > mixed.bin
        yes 'before the hole' | head -c 90000 > holes.bin
        yes 'after the hole' | head -c 70000 | dd of=holes.bin bs=4096 seek=300 conv=notrunc status=none
        truncate -s 2000000 holes.bin
        mkdir sub && seq 1 200000 > sub/numbers.txt
        "#,
        z = p(&mnt.0.join("z"))
    ));
    image
}

/// Checks the compressed volume of `cluster`-byte clusters; returns the files compared.
fn check_compressed(image: &Path, cluster: u64) -> usize {
    let fs = open(image);
    let listing = our_listing(&fs);
    assert_eq!(listing, ntfsls_listing(image));
    let compressible = [
        "unit.bin",
        "under.bin",
        "mixed.bin",
        "holes.bin",
        "sub/numbers.txt",
    ];
    for name in compressible.iter().chain(&["random.bin"]) {
        let node = fs.lookup(&format!("/z/{name}")).unwrap();
        let meta = fs.metadata(node).unwrap();
        assert_ne!(meta.flags & COMPRESSED, 0, "{name} is not compressed");
        assert!(
            matches!(fs.extents(node), Err(FsError::Unsupported(_))),
            "{name}: a compressed file's clusters are offered as its bytes"
        );
        if compressible.contains(name) {
            assert!(meta.allocated < meta.size * 3 / 4, "{name}: {meta:?}");
        }
    }
    // Data at bytes 0..90000 and 1228800..1298800; the units between hold none.
    let unit = 16 * cluster;
    let units = |from: u64, to: u64| {
        let start = from / unit * unit;
        (start, to.div_ceil(unit) * unit - start)
    };
    let holes = fs.lookup("/z/holes.bin").unwrap();
    let ranges = fs.data_ranges(holes).unwrap();
    assert_eq!(
        ranges,
        [units(0, 90000), units(1_228_800, 1_298_800)],
        "{cluster}-byte clusters"
    );
    if cluster == 512 {
        // Its compression units' runs overflow the record into an extension record.
        let info = tool("ntfsinfo", &["-F", "/z/mixed.bin", &p(image)]);
        assert!(String::from_utf8_lossy(&info).contains("$ATTRIBUTE_LIST"));
    }
    same_bytes_as_ntfscat(&fs, image, &listing)
}

#[test]
fn compressed_files_read_as_ntfscat_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512, 2048, 4096] {
        let image = compressed_volume(dir.path(), cluster);
        assert_eq!(
            check_compressed(&image, cluster),
            7,
            "{cluster}-byte clusters"
        );
    }
}

/// The `$MFT`'s runs as `ntfsinfo` prints them: (VCN, length) in clusters.
fn mft_runs(image: &Path) -> Vec<(u64, u64)> {
    let text = String::from_utf8(tool("ntfsinfo", &["-v", "-i", "0", &p(image)])).unwrap();
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    text.lines()
        .skip_while(|l| !l.contains("Runlist:"))
        .skip(1)
        .map_while(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [vcn, _lcn, len] => Some((hex(vcn)?, hex(len)?)),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn file_records_split_across_mft_runs_are_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.img");
    // 512-byte clusters and 1024-byte records: the $MFT's first run ends at an odd cluster
    // where mkntfs put something else, and grows on elsewhere as files are created.
    sh(&format!(
        "truncate -s 6M {img} && mkntfs -q -F -Q -c 512 {img} 2>/dev/null",
        img = p(&image)
    ));
    {
        let mnt = Mount::new(&image, &dir.path().join("mnt"), "rw");
        sh(&format!(
            "mkdir {f} && cd {f} && for i in $(seq 0 1199); do echo file $i > e$i; done",
            f = p(&mnt.0.join("f"))
        ));
    }
    // A record whose two clusters lie in two runs, in use by one of our files.
    let runs = mft_runs(&image);
    let split = runs
        .iter()
        .map(|&(vcn, len)| vcn + len)
        .find(|end| end % 2 == 1 && runs.iter().any(|r| r.0 == *end))
        .map(|end| end / 2)
        .unwrap_or_else(|| panic!("no record is split: $MFT runs {runs:?}"));
    let info =
        String::from_utf8(tool("ntfsinfo", &["-i", &split.to_string(), &p(&image)])).unwrap();
    let name = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Filename:"))
        .map(|n| n.trim().trim_matches('\'').to_string())
        .unwrap_or_else(|| panic!("record {split} has no name: {info}"));
    let fs = open(&image);
    let listing = our_listing(&fs);
    assert_eq!(listing, ntfsls_listing(&image));
    let node = fs.lookup(&format!("/f/{name}")).unwrap();
    assert_eq!(node, split);
    let content = fs.read_all(node, 100).unwrap();
    assert_eq!(content, format!("file {}\n", &name[1..]).into_bytes());
    assert_eq!(same_bytes_as_ntfscat(&fs, &image, &listing), 1200);
}

#[test]
fn a_copy_of_the_allocated_blocks_passes_ntfsfix() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("v.img");
    sh(&format!(
        "truncate -s 48M {img} && mkntfs -q -F -Q -L Blocks {img} 2>/dev/null",
        img = p(&image)
    ));
    {
        let mnt = Mount::new(&image, &dir.path().join("mnt"), "compression");
        sh(&format!(
            r#"
            cd {m}
            head -c 3000000 /dev/urandom > random.bin
            mkdir -p 'Program Files/app' packed
            seq 1 50000 > 'Program Files/app/numbers.txt'
            setfattr -n system.ntfs_attrib_be -v 0x00000800 packed
            yes compressible | head -c 400000 > packed/text.txt
            printf tiny > tiny.txt
            "#,
            m = p(&mnt.0)
        ));
    }
    let fs = open(&image);
    let map = fs.allocation_map().unwrap();
    let bs = u64::from(map.block_size);
    // Used bytes are what $Bitmap marks, as ntfscluster counts them; the map adds the
    // cluster of the backup boot sector.
    let stats = String::from_utf8(tool("ntfscluster", &[&p(&image)])).unwrap();
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_prefix(':'))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    let used = field("bytes per volume") - field("bytes of free space");
    assert_eq!(fs.info().used_bytes, used);
    assert_eq!(map.used_blocks() * bs, used + bs);
    let size = std::fs::metadata(&image).unwrap().len();
    let source = std::fs::read(&image).unwrap();
    let copy = MemoryDevice::new(size as usize);
    for &(first, count) in &map.runs {
        let start = first * bs;
        let end = ((first + count) * bs).min(size);
        copy.write_at(&source[start as usize..end as usize], start)
            .unwrap();
    }
    let copied = dir.path().join("copy.img");
    let mut bytes = vec![0u8; size as usize];
    copy.read_at(&mut bytes, 0).unwrap();
    std::fs::write(&copied, bytes).unwrap();
    let out = Command::new("ntfsfix")
        .args(["-n", &p(&copied)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("alternate boot sector... OK"),
        "ntfsfix -n on the block copy: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = ntfsls_listing(&copied);
    assert_eq!(listing, ntfsls_listing(&image));
    let copy_fs = open(&copied);
    assert_eq!(our_listing(&copy_fs), listing);
    assert_eq!(same_bytes_as_ntfscat(&copy_fs, &copied, &listing), 4);
    assert_eq!(same_bytes_as_ntfscat(&fs, &image, &listing), 4);
}

#[test]
fn values_spread_over_an_attribute_list_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("l.img");
    sh(&format!(
        "truncate -s 32M {img} && mkntfs -q -F -Q -c 512 {img} 2>/dev/null",
        img = p(&image)
    ));
    {
        // 300 clusters of data 16 clusters apart: 600 runs, too many for one record, so the
        // $DATA attribute starts in the base record and goes on in an extension record.
        let mnt = Mount::new(&image, &dir.path().join("mnt"), "rw");
        sh(&format!(
            r#"
            cd {m}
            for i in $(seq 0 299); do
                head -c 512 /dev/urandom | dd of=holey.bin bs=512 seek=$((i * 16)) conv=notrunc status=none
            done
            "#,
            m = p(&mnt.0)
        ));
    }
    // Two alternate data streams, written by ntfscp after the main stream.
    sh(&format!(
        r#"
        cd {d}
        printf '[ZoneTransfer]\r\nZoneId=3\r\n' > zone.txt
        seq 1 20000 > big-stream.txt
        ntfscp -q -N Zone.Identifier {img} zone.txt holey.bin
        ntfscp -q -N big {img} big-stream.txt holey.bin
        "#,
        d = p(dir.path()),
        img = p(&image)
    ));
    let info = String::from_utf8(tool("ntfsinfo", &["-F", "/holey.bin", &p(&image)])).unwrap();
    let data_records: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("Dumping attribute $DATA"))
        .collect();
    assert!(
        info.contains("$ATTRIBUTE_LIST") && data_records.len() >= 2,
        "{info}"
    );
    let fs = open(&image);
    let node = fs.lookup("/holey.bin").unwrap();
    let size = 299 * 16 * 512 + 512;
    assert_eq!(fs.metadata(node).unwrap().size, size);
    let extents = fs.extents(node).unwrap();
    assert_eq!(extents.len(), 300);
    assert!(extents
        .iter()
        .enumerate()
        .all(|(i, e)| e.file_offset == i as u64 * 16 * 512 && e.len == 512));
    let listing = our_listing(&fs);
    assert_eq!(listing, ntfsls_listing(&image));
    assert_eq!(same_bytes_as_ntfscat(&fs, &image, &listing), 1);
    let mut streams = fs.streams(node).unwrap();
    streams.sort();
    let big = std::fs::read(dir.path().join("big-stream.txt")).unwrap();
    assert_eq!(
        streams,
        [
            ("Zone.Identifier".to_string(), 26),
            ("big".to_string(), big.len() as u64)
        ]
    );
    let xattrs = fs.xattrs(node).unwrap();
    for (name, _) in &streams {
        let theirs = tool("ntfscat", &["-q", "-n", name, &p(&image), "/holey.bin"]);
        let ours = xattrs
            .iter()
            .find(|(n, _)| *n == format!("ntfs.stream.{name}"))
            .map(|(_, v)| v);
        assert!(ours == Some(&theirs), "stream {name}");
    }
}
