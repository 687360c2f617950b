//! qcow2 images written by qemu-img and qemu-io read back byte-identical with our reader;
//! damaged images give clear errors. qemu-img is the independent writer here.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{map_device, BlockDevice, FileDevice, Region};
use diskferry_e2e::{damaged_copy, make_disk, qemu_img_convert, run_ok};
use diskferry_vdisk::qcow2::Qcow2;
use diskferry_vdisk::ImageError;

const MIB: u64 = 1 << 20;

fn open(path: &Path) -> Result<Qcow2, ImageError> {
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, false).unwrap());
    Qcow2::open(file, path)
}

/// A 48 MiB raw disk: data at odd places, holes elsewhere, a compressible region.
fn raw_source(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("source.raw");
    make_disk(
        &raw,
        48 * MIB,
        &[
            (0, 3 * MIB + 512),
            (10 * MIB + 4096, 5 * MIB),
            (47 * MIB, MIB),
        ],
    )
    .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let text: Vec<u8> = b"diskferry compresses this line well. "
        .iter()
        .copied()
        .cycle()
        .take(2 * MIB as usize)
        .collect();
    f.write_all_at(&text, 30 * MIB).unwrap();
    raw
}

fn assert_reads_like(image: &Path, raw: &Path) {
    let q = open(image).unwrap_or_else(|e| panic!("{e}"));
    let want = std::fs::read(raw).unwrap();
    assert_eq!(q.size(), want.len() as u64);
    // Odd-sized reads that straddle cluster boundaries.
    let mut got = vec![0u8; want.len()];
    let mut pos = 0usize;
    let mut step = 100_003usize;
    while pos < got.len() {
        let n = step.min(got.len() - pos);
        q.read_at(&mut got[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = step * 7 % 900_001 + 4096;
    }
    assert!(
        got == want,
        "{} reads differently from {}",
        image.display(),
        raw.display()
    );
    // What block status calls zero really is zero.
    for e in map_device(&q).unwrap() {
        if e.region == Region::Zero {
            assert!(
                want[e.offset as usize..e.end() as usize]
                    .iter()
                    .all(|&b| b == 0),
                "{e:?} is not zero"
            );
        }
    }
}

#[test]
fn images_written_by_qemu_img_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path());
    let r = raw.to_str().unwrap();
    let variants: [(&str, &[&str]); 5] = [
        ("default.qcow2", &[]),
        ("small-clusters.qcow2", &["-o", "cluster_size=4096"]),
        ("v2.qcow2", &["-o", "compat=0.10"]),
        ("compressed.qcow2", &["-c"]),
        ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"]),
    ];
    for (name, opts) in variants {
        let out = dir.path().join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[r, out.to_str().unwrap()]);
        run_ok("qemu-img", &args);
        assert_reads_like(&out, &raw);
        if name == "compressed.qcow2" || name == "zstd.qcow2" {
            let m = open(&out).unwrap().map(30 * MIB, 4096).unwrap();
            assert!(
                matches!(m, diskferry_vdisk::Mapping::Compressed { .. }),
                "the text region is compressed: {m:?}"
            );
        }
    }
}

#[test]
fn zero_clusters_and_rewrites_from_qemu_io_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path());
    let q = dir.path().join("edited.qcow2");
    qemu_img_convert(&raw, &q, "qcow2", &[]);
    // Explicit zero clusters over data, and a partial overwrite, applied to both.
    let qs = q.to_str().unwrap();
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -P 0x5a 11M 70000",
            qs,
        ],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.write_all_at(&vec![0u8; MIB as usize], MIB).unwrap();
    f.write_all_at(&vec![0x5au8; 70000], 11 * MIB).unwrap();
    assert_reads_like(&q, &raw);
    let zero = open(&q).unwrap().map(MIB, MIB).unwrap();
    assert!(
        matches!(zero, diskferry_vdisk::Mapping::Zero { .. }),
        "write -z makes a zero cluster: {zero:?}"
    );
}

fn expect_error(path: &Path, needle: &str) {
    match open(path) {
        Ok(q) => {
            // Damage inside tables shows when they are used.
            let mut buf = vec![0u8; q.size().min(64 * MIB) as usize];
            let err = q
                .read_at(&mut buf, 0)
                .expect_err("a damaged image must not read cleanly");
            let text = err.to_string();
            assert!(
                text.contains(needle),
                "{}: error {text:?} should mention {needle:?}",
                path.display()
            );
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains(needle),
                "error {text:?} should mention {needle:?}"
            );
            assert!(
                text.contains(path.to_str().unwrap()),
                "error {text:?} should name the file"
            );
        }
    }
}

#[test]
fn damaged_images_give_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path());
    let good = dir.path().join("good.qcow2");
    qemu_img_convert(&raw, &good, "qcow2", &[]);
    let bytes = std::fs::read(&good).unwrap();
    let damaged =
        |name: &str, edit: &dyn Fn(&mut Vec<u8>)| damaged_copy(dir.path(), name, &bytes, edit);
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());

    expect_error(&damaged("magic", &|b| b[0] = b'X'), "not a qcow2 image");
    expect_error(
        &damaged("truncated-header", &|b| b.truncate(50)),
        "not a qcow2 image",
    );
    expect_error(
        &damaged("cluster-bits", &|b| {
            b[20..24].copy_from_slice(&40u32.to_be_bytes())
        }),
        "cluster bits",
    );
    expect_error(
        &damaged("huge", &|b| {
            b[24..32].copy_from_slice(&u64::MAX.to_be_bytes())
        }),
        "absurd",
    );
    expect_error(
        &damaged("l1-size", &|b| {
            b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())
        }),
        "L1 table",
    );
    expect_error(
        &damaged("l1-beyond", &|b| {
            b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }),
        "L1 table",
    );
    expect_error(
        &damaged("version", &|b| b[4..8].copy_from_slice(&9u32.to_be_bytes())),
        "version 9",
    );
    expect_error(
        &damaged("encrypted", &|b| {
            b[32..36].copy_from_slice(&1u32.to_be_bytes())
        }),
        "encrypted",
    );
    expect_error(
        &damaged("unknown-feature", &|b| {
            b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }),
        "feature",
    );
    let l1 = be64(&bytes, 40) as usize;
    expect_error(
        &damaged("l1-entry", &|b| {
            b[l1..l1 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | 999 << 16).to_be_bytes())
        }),
        "L1 entry 0",
    );
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    expect_error(
        &damaged("l2-entry", &|b| {
            b[l2..l2 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | 1 << 50).to_be_bytes())
        }),
        "outside the file",
    );
    expect_error(
        &damaged("cut-data", &|b| b.truncate(b.len() - 3 * MIB as usize)),
        "outside the file",
    );
}

#[test]
fn an_overlay_is_refused_without_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", base.to_str().unwrap(), "16M"],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    let err = open(&top).unwrap_err().to_string();
    assert!(
        err.contains("backing file") && err.contains("base.qcow2"),
        "{err}"
    );
}
