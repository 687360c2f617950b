//! A file-by-file rebuild keeps what identifies an ext4 volume: volumes made by `mke2fs` and
//! filled by `debugfs -w` (a hashed directory of non-ASCII names included) are rebuilt by our
//! writer from `Ext4::format_options`, and `dumpe2fs -h` of source and copy must agree on the
//! features, inode count, reserved GDT blocks, last mount point, hash flags, journal features,
//! UUID, label, hash seed and sizes; `e2fsck -fn` must pass the copy (it checks the resize
//! inode and every htree's hash order), and `resize2fs` must grow a copy of it that `e2fsck
//! -fn` still passes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{run_status, run_tool as run};
use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_fs::ext4::write::{write_ext4, Ext4Options};
use diskferry_fs::ext4::Ext4;
use diskferry_fs::Filesystem;

/// The `dumpe2fs -h` fields a rebuild keeps.
const KEPT: [&str; 13] = [
    "Filesystem features",
    "Filesystem flags",
    "Inode count",
    "Reserved GDT blocks",
    "Last mounted on",
    "Journal features",
    "Filesystem UUID",
    "Filesystem volume name",
    "Directory Hash Seed",
    "Block size",
    "Block count",
    "Inode size",
    "Total journal blocks",
];

/// `dumpe2fs -h`, field by field.
fn header(img: &Path) -> BTreeMap<String, String> {
    run("dumpe2fs", &["-h", img.to_str().unwrap()])
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A source volume: `mke2fs` with `args`, a few files, a hashed directory of names past
/// ASCII, a last mount point, and whatever `extra` debugfs commands say.
fn source(dir: &Path, args: &[&str], mib: u64, extra: &str) -> PathBuf {
    let img = dir.join("source.img");
    let size = format!("{mib}M");
    let mut all = vec!["-q", "-F", "-L", "kept"];
    all.extend_from_slice(args);
    all.extend([img.to_str().unwrap(), size.as_str()]);
    run("mke2fs", &all);
    let data = dir.join("data");
    std::fs::write(&data, b"contents\n").unwrap();
    let mut script = format!("{extra}\nssv last_mounted /srv/data\nmkdir big\n");
    for i in 0..300 {
        script += &format!("write {} big/caf\u{e9}-\u{fc}ber-{i:03}\n", data.display());
    }
    let file = dir.join("script");
    std::fs::write(&file, script).unwrap();
    run(
        "debugfs",
        &["-w", "-f", file.to_str().unwrap(), img.to_str().unwrap()],
    );
    let (code, text) = run_status("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert_eq!(code, 0, "the source itself:\n{text}");
    img
}

/// Our writer's rebuild of `src` on a device of `bytes`, with `tweak` applied to the options
/// the source gives.
fn rebuild(src: &Path, bytes: usize, tweak: impl Fn(&mut Ext4Options)) -> PathBuf {
    let dev = Arc::new(MemoryDevice::read_only(std::fs::read(src).unwrap()));
    let fs = Ext4::open(dev as Arc<dyn BlockDevice>).unwrap();
    let mut opts = fs.format_options();
    tweak(&mut opts);
    let out = Arc::new(MemoryDevice::new(bytes));
    let report = write_ext4(Arc::clone(&out) as Arc<dyn BlockDevice>, &fs, &opts).unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let img = src.with_file_name("rebuilt.img");
    std::fs::write(&img, out.contents()).unwrap();
    let copy = Ext4::open(out as Arc<dyn BlockDevice>).unwrap();
    let names = |f: &dyn Filesystem| {
        let big = f.lookup("big").unwrap();
        let mut v: Vec<Vec<u8>> = f
            .read_dir(big)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&copy), names(&fs), "the same hashed directory");
    img
}

fn e2fsck_clean(img: &Path) -> Result<(), String> {
    match run_status("e2fsck", &["-fn", img.to_str().unwrap()]) {
        (0, _) => Ok(()),
        (code, text) => Err(format!("e2fsck -fn exited with {code}:\n{text}")),
    }
}

/// Source and rebuild agree on every kept field; the rebuild is clean and grows fourfold.
/// Returns the reserved GDT blocks left after growing.
fn assert_kept(src: &Path, rebuilt: &Path) -> u64 {
    let (a, b) = (header(src), header(rebuilt));
    for field in KEPT {
        assert_eq!(a.get(field), b.get(field), "{field}");
    }
    e2fsck_clean(rebuilt).unwrap();
    let grown = rebuilt.with_file_name("grown.img");
    std::fs::copy(rebuilt, &grown).unwrap();
    let size = std::fs::metadata(&grown).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&grown)
        .unwrap()
        .set_len(size * 4)
        .unwrap();
    run("resize2fs", &[grown.to_str().unwrap()]);
    e2fsck_clean(&grown).unwrap();
    let blocks: u64 = header(&grown)["Block count"].parse().unwrap();
    let bs: u64 = header(&grown)["Block size"].parse().unwrap();
    assert_eq!(blocks * bs, size * 4, "grown to the whole file");
    header(&grown)["Reserved GDT blocks"].parse().unwrap()
}

#[test]
fn a_signed_hash_csum_v3_volume_keeps_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "-t",
        "ext4",
        "-b",
        "4096",
        "-N",
        "3000",
        "-J",
        "size=4",
        "-O",
        "metadata_csum,64bit",
    ];
    // `jo -c` / `jc` leaves the journal with 64-bit and csum v3 features, as a kernel mount
    // does.
    let src = source(dir.path(), &args, 64, "jo -c\njc");
    let h = header(&src);
    assert!(
        h["Filesystem flags"].contains("signed_directory_hash"),
        "{h:?}"
    );
    assert!(
        h["Journal features"].contains("journal_checksum_v3"),
        "{h:?}"
    );
    assert_ne!(h["Reserved GDT blocks"], "0");
    let rebuilt = rebuild(&src, 64 << 20, |_| {});
    assert_kept(&src, &rebuilt);
    // The check can fail: hashed the other way, e2fsck finds the index out of order.
    let wrong = rebuild(&src, 64 << 20, |o| o.signed_hash = false);
    let mut raw = std::fs::read(&wrong).unwrap();
    // Flag the copy signed again, as the source was, without touching its hashes.
    let flags = 1024 + 0x160;
    raw[flags] = 1;
    let at = 1024..2048;
    // The superblock checksum: the kernel's crc32c (seed ~0, no final inversion).
    let c = !crc32c::crc32c(&raw[at.start..at.end - 4]);
    raw[at.end - 4..at.end].copy_from_slice(&c.to_le_bytes());
    std::fs::write(&wrong, raw).unwrap();
    let complaint = e2fsck_clean(&wrong).expect_err("unsigned hashes under a signed flag pass");
    assert!(complaint.contains("HTREE"), "{complaint}");
    assert!(!complaint.contains("uperblock"), "{complaint}");
}

#[test]
fn an_unsigned_hash_volume_on_1k_blocks_keeps_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["-t", "ext4", "-b", "1024", "-O", "metadata_csum,64bit"];
    let src = source(dir.path(), &args, 48, "ssv flags 2");
    assert!(header(&src)["Filesystem flags"].contains("unsigned_directory_hash"));
    let rebuilt = rebuild(&src, 48 << 20, |_| {});
    // 1 KiB blocks hold 16 descriptors: 192 MiB needs a second descriptor block, which
    // resize2fs takes from the reserved ones.
    let reserved: u64 = header(&rebuilt)["Reserved GDT blocks"].parse().unwrap();
    assert_eq!(assert_kept(&src, &rebuilt), reserved - 1);
}

#[test]
fn a_smaller_destination_gets_fewer_inodes_in_the_same_proportion() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["-t", "ext4", "-b", "4096", "-N", "20000", "-J", "size=4"];
    let src = source(dir.path(), &args, 64, "");
    let rebuilt = rebuild(&src, 24 << 20, |_| {});
    let (a, b) = (header(&src), header(&rebuilt));
    let (was, now): (u64, u64) = (
        a["Inode count"].parse().unwrap(),
        b["Inode count"].parse().unwrap(),
    );
    assert!(
        now < was && now >= was * 24 / 64,
        "{was} inodes became {now}"
    );
    e2fsck_clean(&rebuilt).unwrap();
    // A larger one keeps them all.
    let larger = rebuild(&src, 96 << 20, |_| {});
    let kept: u64 = header(&larger)["Inode count"].parse().unwrap();
    assert!(kept >= was, "{was} inodes became {kept}");
    e2fsck_clean(&larger).unwrap();
}
