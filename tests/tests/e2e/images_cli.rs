//! `diskferry create`, `info` and `convert` on real files, checked with qemu-img.

use std::ffi::OsStr;
use std::path::Path;

use diskferry_e2e::{allocated, assert_same_bytes, diskferry, make_disk, qemu_img_convert, run_ok};

const MIB: u64 = 1 << 20;

fn df(args: &[&OsStr]) -> (String, String) {
    let (ok, out, err) = diskferry(args);
    assert!(ok, "diskferry {args:?} failed: {err}");
    (out, err)
}

fn p(path: &Path) -> &OsStr {
    path.as_os_str()
}

#[test]
fn create_info_and_convert_round_trip_through_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.qcow2");
    df(&[
        "create".as_ref(),
        p(&empty),
        "--size".as_ref(),
        "20G".as_ref(),
    ]);
    assert!(run_ok("qemu-img", &["check", empty.to_str().unwrap()]).contains("No errors"));
    let (json, _) = df(&["info".as_ref(), "--json".as_ref(), p(&empty)]);
    assert!(
        json.contains("\"format\":\"qcow2\"") && json.contains("\"virtual_size\":21474836480"),
        "{json}"
    );
    assert!(
        allocated(&empty) < MIB,
        "an empty 20 GiB image takes almost no space"
    );

    // A raw disk with data and holes → qcow2 → raw again.
    let raw = dir.path().join("disk.raw");
    make_disk(
        &raw,
        256 * MIB,
        &[
            (0, 4 * MIB),
            (100 * MIB + 512, 33 * MIB),
            (256 * MIB - 4096, 4096),
        ],
    )
    .unwrap();
    let q = dir.path().join("disk.qcow2");
    let (_, err) = df(&["convert".as_ref(), p(&raw), p(&q)]);
    assert!(
        err.contains("(raw) into") && err.contains("(qcow2)"),
        "{err}"
    );
    assert!(run_ok("qemu-img", &["check", q.to_str().unwrap()]).contains("No errors"));
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    let back = dir.path().join("back.img");
    df(&["convert".as_ref(), p(&q), p(&back)]);
    assert_same_bytes(&raw, &back);
    assert!(allocated(&back) <= 40 * MIB, "the raw output stays sparse");
}

#[test]
fn convert_reads_qemu_img_compressed_images() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let text: Vec<u8> = b"a line of text that compresses. "
        .iter()
        .copied()
        .cycle()
        .take(32 << 20)
        .collect();
    std::fs::write(&raw, &text).unwrap();
    let c = dir.path().join("c.qcow2");
    qemu_img_convert(&raw, &c, "qcow2", &["-c"]);
    let out = dir.path().join("out.qcow2");
    df(&["convert".as_ref(), p(&c), p(&out)]);
    assert!(run_ok("qemu-img", &["check", out.to_str().unwrap()]).contains("No errors"));
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = diskferry(&[
        "create".as_ref(),
        p(&dir.path().join("x.qcow2")),
        "--size".as_ref(),
        "lots".as_ref(),
    ]);
    assert!(!ok && err.contains("not a size"), "{err}");
    let fake = dir.path().join("fake.qcow2");
    std::fs::write(&fake, b"QFI\xfb\0\0\0\x03 and then nonsense").unwrap();
    let (ok, _, err) = diskferry(&["info".as_ref(), p(&fake)]);
    assert!(
        !ok && err.contains("fake.qcow2"),
        "the error names the file: {err}"
    );
    let (ok, _, err) = diskferry(&["convert".as_ref(), p(&fake), p(&dir.path().join("o.raw"))]);
    assert!(!ok && err.contains("fake.qcow2"), "{err}");
    assert!(
        !dir.path().join("o.raw").exists(),
        "no output for a bad input"
    );
}

#[test]
fn convert_compress_writes_compressed_clusters_qemu_img_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    make_disk(&raw, 64 * MIB, &[(40 * MIB, 4 * MIB)]).unwrap(); // incompressible part
    let text: Vec<u8> = b"text compresses well, noise does not. "
        .iter()
        .copied()
        .cycle()
        .take(30 << 20)
        .collect();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&raw).unwrap(),
        &text,
        0,
    )
    .unwrap();
    let small = dir.path().join("small.qcow2");
    df(&[
        "convert".as_ref(),
        p(&raw),
        p(&small),
        "--compress".as_ref(),
    ]);
    let check = run_ok("qemu-img", &["check", small.to_str().unwrap()]);
    assert!(
        check.contains("No errors") && check.contains("compressed clusters"),
        "{check}"
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            small.to_str().unwrap(),
        ],
    );
    let size = std::fs::metadata(&small).unwrap().len();
    assert!(
        size < 6 * MIB,
        "30 MiB of text + 4 MiB of noise compress to {size} bytes"
    );

    let (ok, _, err) = diskferry(&[
        "convert".as_ref(),
        p(&raw),
        p(&dir.path().join("x.raw")),
        "--compress".as_ref(),
    ]);
    assert!(!ok && err.contains("cannot be compressed"), "{err}");
    assert!(
        !dir.path().join("x.raw.partial").exists(),
        "a refused option leaves nothing behind"
    );
}

/// A raw source whose size is not whole sectors: qcow2 and VHDX outputs are rounded up to the
/// sector as qemu-img rounds them, qemu-img reads every byte back, and verify compares them.
#[test]
fn a_source_of_odd_size_is_rounded_up_to_whole_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd.raw");
    let bytes: Vec<u8> = (0..1_000_100u32).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&src, &bytes).unwrap();
    for fmt in ["qcow2", "vhdx"] {
        let out = dir.path().join(format!("odd.{fmt}"));
        let (ok, out_text, err) = diskferry(&[
            "capture".as_ref(),
            p(&src),
            p(&out),
            "--mode".as_ref(),
            "sectors".as_ref(),
            "--verify".as_ref(),
        ]);
        assert!(ok, "{fmt}: {err}");
        let said = format!("{out_text}{err}");
        assert!(
            said.contains("976.7 KiB compared"),
            "{fmt}: verify compared the bytes: {said}"
        );
        let info = run_ok(
            "qemu-img",
            &["info", "--output=json", out.to_str().unwrap()],
        );
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], 1_000_448, "{fmt}: {info}");
        run_ok("qemu-img", &["check", out.to_str().unwrap()]);
        let back = dir.path().join(format!("back-{fmt}.raw"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                out.to_str().unwrap(),
                back.to_str().unwrap(),
            ],
        );
        let read = std::fs::read(&back).unwrap();
        assert_eq!(&read[..bytes.len()], &bytes[..], "{fmt}: every byte");
        assert!(
            read[bytes.len()..].iter().all(|&b| b == 0),
            "{fmt}: the tail is zeros"
        );
    }
}
