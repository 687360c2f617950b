//! Committing and rebasing qcow2 chains, checked with qemu-img and qemu-io (nobody here wrote
//! them): chains are built by `qemu-img create -b` and `qemu-io` writes (data, zeroed
//! clusters, pieces of clusters) and by our own writer; before each operation
//! `qemu-img convert` flattens the top image to raw, and afterwards `qemu-img compare` says
//! the result reads identically and `qemu-img check` finds it clean.
//!
//! - **commit** into qcow2 (plain, and itself an overlay) and raw bases: the base alone
//!   compares identical to the flattened overlay; a cluster the overlay zeroed over the
//!   base's data reads as zeros in the base (`qemu-io read -P 0`).
//! - **rebase** C on B on A onto A: `qemu-img info --backing-chain` shows C → A and C compares
//!   identical; onto none: no backing file and identical.
//! - **refusals**: a sibling overlay naming the base (listed; allowed when forced), an overlay
//!   whose new base would be itself, a base vdisk cannot write (VHDX).

use std::path::{Path, PathBuf};
use std::process::Command;

use diskferry_vdisk::chain::{prepare_commit, rebase, ChainError};
use diskferry_vdisk::{create_image, create_overlay, open_image, ImageFormat};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn run(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install qemu-utils)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_img(args: &[&str]) -> String {
    let (code, out) = run("qemu-img", args);
    assert_eq!(code, 0, "qemu-img {args:?} failed: {out}");
    out
}

/// Runs qemu-io commands on an image (checking that each one succeeded).
fn qemu_io(image: &Path, format: &str, commands: &[&str]) {
    let mut args = vec!["-f", format];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(s(image));
    let (code, out) = run("qemu-io", &args);
    assert!(
        code == 0 && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {args:?}: {out}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 overlay made by qemu-img on `base` (named relative to the overlay's directory).
fn qemu_overlay(dir: &Path, name: &str, base: &str, base_format: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base,
        "-F",
        base_format,
        s(&path),
    ]);
    path
}

/// A qcow2 base of 8 MiB made by qemu-img, with data over its first 6 MiB.
fn qemu_base(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&path), "8M"]);
    qemu_io(&path, "qcow2", &["write -P 0x11 0 6M"]);
    path
}

/// What `image` reads as, through its chain, flattened to raw by qemu-img.
fn flatten(image: &Path, out: &Path) {
    qemu_img(&["convert", "-O", "raw", s(image), s(out)]);
}

fn assert_identical(image: &Path, format: &str, flat: &Path) {
    let (code, out) = run(
        "qemu-img",
        &["compare", "-f", format, "-F", "raw", s(image), s(flat)],
    );
    assert_eq!(code, 0, "{image:?} differs from {flat:?}: {out}");
}

fn assert_clean(image: &Path) {
    let (code, out) = run("qemu-img", &["check", s(image)]);
    assert_eq!(code, 0, "qemu-img check {image:?}: {out}");
}

/// Writes of every kind qemu-io makes into an overlay: whole clusters of data, a zeroed range
/// over the base's data, pieces of clusters, data past the base's written part.
const OVERLAY_WRITES: &[&str] = &[
    "write -P 0x55 0 1M",
    "write -z 2M 128k",
    "write -P 0x66 3146240 1000",
    "write -z 4194816 512",
    "write -P 0x77 7M 64k",
];

fn commit(overlay: &Path) -> diskferry_vdisk::chain::CommitStats {
    let mut last = 0;
    let stats = prepare_commit(overlay, false)
        .unwrap()
        .run(&mut |done, total| {
            assert!(done > last && done <= total);
            last = done;
        })
        .unwrap();
    assert_eq!(last, 8 * MIB, "progress reached the end");
    stats
}

#[test]
fn commit_of_a_qemu_made_overlay_makes_the_qcow2_base_read_as_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(dir.path(), "a.qcow2");
    let top = qemu_overlay(dir.path(), "b.qcow2", "a.qcow2", "qcow2");
    qemu_io(&top, "qcow2", OVERLAY_WRITES);
    let flat = dir.path().join("flat.raw");
    flatten(&top, &flat);
    let stats = commit(&top);
    assert!(
        stats.data >= MIB + 64 * KIB && stats.zeros >= 128 * KIB,
        "{stats:?}"
    );
    assert_identical(&base, "qcow2", &flat);
    assert_clean(&base);
    // The cluster zeroed over the base's data reads as zeros in the base alone.
    qemu_io(
        &base,
        "qcow2",
        &["read -P 0 2M 128k", "read -P 0x11 6225920 64k"],
    );
    let (_, ours) = open_image(&base, false).unwrap();
    let mut buf = vec![1u8; 128 * KIB as usize];
    ours.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn commit_into_a_raw_base_and_into_a_base_that_is_an_overlay_itself() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "8M"]);
    qemu_io(&raw, "raw", &["write -P 0x22 1M 5M"]);
    let top = qemu_overlay(dir.path(), "top.qcow2", "disk.raw", "raw");
    qemu_io(&top, "qcow2", OVERLAY_WRITES);
    let flat = dir.path().join("flat.raw");
    flatten(&top, &flat);
    commit(&top);
    assert_identical(&raw, "raw", &flat);

    // C on B on A: commit C into B; B (through A) reads as C did, A is untouched.
    let a = qemu_base(dir.path(), "a.qcow2");
    let b = qemu_overlay(dir.path(), "b.qcow2", "a.qcow2", "qcow2");
    qemu_io(&b, "qcow2", &["write -P 0x33 1M 2M"]);
    let c = qemu_overlay(dir.path(), "c.qcow2", "b.qcow2", "qcow2");
    qemu_io(&c, "qcow2", OVERLAY_WRITES);
    let (flat_a, flat_c) = (dir.path().join("a.raw"), dir.path().join("c.raw"));
    flatten(&a, &flat_a);
    flatten(&c, &flat_c);
    commit(&c);
    assert_identical(&b, "qcow2", &flat_c);
    assert_identical(&a, "qcow2", &flat_a);
    assert_clean(&b);
}

#[test]
fn commit_of_a_chain_our_writer_made() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("ours.qcow2");
    let image = create_image(
        ImageFormat::Qcow2,
        std::fs::File::create_new(&base).unwrap(),
        &base,
        8 * MIB,
        false,
        512,
    )
    .unwrap();
    image.write_at(&vec![0x44; 5 * MIB as usize], MIB).unwrap();
    image.flush().unwrap();
    drop(image);
    let top = dir.path().join("ours-top.qcow2");
    let overlay = create_overlay(std::fs::File::create_new(&top).unwrap(), &top, &base).unwrap();
    overlay.write_at(&vec![0x99; 300_000], 1_000_000).unwrap();
    overlay.write_zeroes(4 * MIB, 2 * MIB).unwrap();
    overlay.flush().unwrap();
    drop(overlay);
    let flat = dir.path().join("flat.raw");
    flatten(&top, &flat);
    commit(&top);
    assert_identical(&base, "qcow2", &flat);
    assert_clean(&base);
    qemu_io(&base, "qcow2", &["read -P 0 4M 2M"]);
}

/// C on B on A, made by qemu-img, with C zeroing some of B's data and B some of A's.
fn three_deep(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let a = qemu_base(dir, "a.qcow2");
    let b = qemu_overlay(dir, "b.qcow2", "a.qcow2", "qcow2");
    qemu_io(
        &b,
        "qcow2",
        &[
            "write -P 0x33 1M 2M",
            "write -z 5M 256k",
            "write -P 0x34 7M 100k",
        ],
    );
    let c = qemu_overlay(dir, "c.qcow2", "b.qcow2", "qcow2");
    qemu_io(&c, "qcow2", &["write -P 0x55 0 512k", "write -z 2M 64k"]);
    (a, b, c)
}

fn backing_chain(image: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&["info", "--backing-chain", "--output=json", s(image)]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn rebase_onto_the_base_of_the_base_keeps_what_the_overlay_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = three_deep(dir.path());
    let flat = dir.path().join("c.raw");
    flatten(&c, &flat);
    let stats = rebase(&c, Some(&a), &mut |_, _| {}).unwrap();
    assert!(
        stats.copied >= 2 * MIB,
        "B's changes copied into C: {stats:?}"
    );
    let chain = backing_chain(&c);
    assert_eq!(chain.len(), 2, "{chain:?}");
    let named = chain[0]["full-backing-filename"].as_str().unwrap();
    assert_eq!(Path::new(named), std::fs::canonicalize(&a).unwrap());
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    assert_identical(&c, "qcow2", &flat);
    assert_clean(&c);
    // B is no longer needed.
    std::fs::remove_file(&b).unwrap();
    assert_identical(&c, "qcow2", &flat);
}

#[test]
fn rebase_onto_none_makes_a_standalone_image() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, c) = three_deep(dir.path());
    let flat = dir.path().join("c.raw");
    flatten(&c, &flat);
    rebase(&c, None, &mut |_, _| {}).unwrap();
    let chain = backing_chain(&c);
    assert_eq!(chain.len(), 1, "{chain:?}");
    assert!(chain[0].get("backing-filename").is_none(), "{chain:?}");
    assert_identical(&c, "qcow2", &flat);
    assert_clean(&c);
    // Our reader opens it without following anything.
    open_image(&c, false).unwrap();
}

#[test]
fn rebase_onto_a_smaller_raw_base_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _, c) = three_deep(dir.path());
    // Smaller than the overlay: past its end it reads as zeros.
    let raw = dir.path().join("other.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "5M"]);
    qemu_io(&raw, "raw", &["write -P 0x11 0 3M"]);
    let flat = dir.path().join("c.raw");
    flatten(&c, &flat);
    rebase(&c, Some(&raw), &mut |_, _| {}).unwrap();
    assert_eq!(backing_chain(&c)[0]["backing-filename-format"], "raw");
    assert_identical(&c, "qcow2", &flat);
    rebase(&c, Some(&a), &mut |_, _| {}).unwrap();
    assert_eq!(backing_chain(&c)[0]["backing-filename-format"], "qcow2");
    assert_identical(&c, "qcow2", &flat);
    assert_clean(&c);
}

#[test]
fn refusals_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_base(dir.path(), "a.qcow2");
    let top = qemu_overlay(dir.path(), "b.qcow2", "a.qcow2", "qcow2");
    let sibling = qemu_overlay(dir.path(), "d.qcow2", s(&base), "qcow2");
    qemu_io(&top, "qcow2", &["write -P 0x55 0 1M"]);
    match prepare_commit(&top, false) {
        Err(ChainError::Dependents { dependents, .. }) => assert_eq!(dependents, [sibling]),
        other => panic!("committing over a sibling's base: {:?}", other.err()),
    }
    let forced = prepare_commit(&top, true).unwrap();
    assert_eq!(forced.dependents().len(), 1);
    drop(forced);
    // Nothing was written by the refusals.
    qemu_io(&base, "qcow2", &["read -P 0x11 0 1M"]);

    let err = rebase(&top, Some(&top), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ChainError::Loop { .. }), "{err}");
    // A new base built on the overlay would make a loop too.
    let above = qemu_overlay(dir.path(), "e.qcow2", "b.qcow2", "qcow2");
    let err = rebase(&top, Some(&above), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ChainError::Loop { .. }), "{err}");
    let err = rebase(&base, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ChainError::NotAnOverlay { .. }), "{err}");

    // An overlay larger than its base: a commit does not grow the base.
    let big = dir.path().join("big.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&big),
        "16M",
    ]);
    let err = prepare_commit(&big, true).err().unwrap();
    assert!(matches!(err, ChainError::OverlayLarger { .. }), "{err}");

    let vhdx = dir.path().join("v.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&vhdx), "8M"]);
    let on_vhdx = qemu_overlay(dir.path(), "on-vhdx.qcow2", "v.vhdx", "vhdx");
    let err = prepare_commit(&on_vhdx, false).err().unwrap();
    assert!(matches!(err, ChainError::BaseNotWritable { .. }), "{err}");
}

/// Overlays with 512-byte clusters (a header cluster with little room) commit into a base of
/// 64 KiB clusters (pieces of base clusters), and rebase with the new name placed in what room
/// there is.
#[test]
fn small_cluster_overlays_commit_and_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let a = qemu_base(dir.path(), "a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
    ]);
    qemu_io(&b, "qcow2", OVERLAY_WRITES);
    let c = dir.path().join("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        s(&c),
    ]);
    qemu_io(&c, "qcow2", &["write -P 0x88 1536 2048", "write -z 1M 4k"]);
    let flat = dir.path().join("c.raw");
    flatten(&c, &flat);
    // A name of 900 bytes does not fit a 512-byte header cluster: refused before any copy.
    let far = deep_copy(dir.path(), &a, 900);
    let before = std::fs::read(&c).unwrap();
    let err = rebase(&c, Some(&far), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("no free room"), "{err}");
    assert_eq!(std::fs::read(&c).unwrap(), before, "nothing written");
    rebase(&c, Some(&a), &mut |_, _| {}).unwrap();
    assert_identical(&c, "qcow2", &flat);
    assert_clean(&c);
    let flat_b = dir.path().join("b.raw");
    flatten(&b, &flat_b);
    // C is built on A now: committing B into A is refused while C sits beside A.
    assert!(matches!(
        prepare_commit(&b, false),
        Err(ChainError::Dependents { .. })
    ));
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::rename(&c, elsewhere.join("c.qcow2")).unwrap();
    commit(&b);
    assert_identical(&a, "qcow2", &flat_b);
    assert_clean(&a);
}

/// A rewrite of the backing name cut off after any of its writes leaves an image that names
/// either the old backing file or the new one (qemu-img info), and checks clean.
#[test]
fn a_backing_rewrite_cut_off_anywhere_names_the_old_or_the_new_base() {
    use diskferry_blockdev::{BlockDevice, FileDevice, RecordingDevice};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (a, _, c) = three_deep(dir.path());
    let raw = dir.path().join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "8M"]);
    let a_name = std::fs::canonicalize(&a).unwrap();
    let raw_name = std::fs::canonicalize(&raw).unwrap();
    for (name, format) in [(s(&a_name), "qcow2"), (s(&raw_name), "raw")] {
        let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&c, false).unwrap());
        let copy = diskferry_blockdev::MemoryDevice::new(file.size() as usize);
        let mut buf = vec![0u8; file.size() as usize];
        file.read_at(&mut buf, 0).unwrap();
        copy.write_at(&buf, 0).unwrap();
        let rec = RecordingDevice::new(Arc::new(copy)).unwrap();
        diskferry_vdisk::qcow2::set_backing_file(&rec, &c, Some((name, format))).unwrap();
        assert!(rec.len() >= 3, "name, sync, header: {:?}", rec.len());
        let mut switched = false;
        for upto in 0..=rec.len() {
            let state = rec.replay(upto).unwrap();
            let cut = dir.path().join("cut.qcow2");
            let mut bytes = vec![0u8; state.size() as usize];
            state.read_at(&mut bytes, 0).unwrap();
            std::fs::write(&cut, &bytes).unwrap();
            let info = &backing_chain(&cut)[0];
            let named = info["backing-filename"].as_str().unwrap();
            if named == name {
                switched = true;
            } else {
                assert!(
                    !switched && named == "b.qcow2",
                    "after {upto} of {}: {named}",
                    rec.len()
                );
            }
            assert_clean(&cut);
        }
        assert!(switched, "the rewrite took effect");
    }
}

/// Hostile header extensions (a length past the cluster, no end marker) are refused before
/// anything is written.
#[test]
fn a_hostile_extension_list_is_refused_without_writing() {
    use diskferry_blockdev::FileDevice;
    let dir = tempfile::tempdir().unwrap();
    let (a, _, c) = three_deep(dir.path());
    let mut image = std::fs::read(&c).unwrap();
    let header_length = u32::from_be_bytes(image[100..104].try_into().unwrap()) as usize;
    let a_name = std::fs::canonicalize(&a).unwrap();
    let mut bad_length = image.clone();
    bad_length[header_length + 4..header_length + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    // Extensions of type 1 and length 0 fill the cluster: no end marker.
    for at in (header_length..65536).step_by(8) {
        image[at..at + 8].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    }
    for (what, bytes) in [("length", bad_length), ("no end", image)] {
        let path = dir.path().join("hostile.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        let file = FileDevice::open(&path, true).unwrap();
        let err =
            diskferry_vdisk::qcow2::set_backing_file(&file, &path, Some((s(&a_name), "qcow2")))
                .unwrap_err();
        assert!(
            matches!(err, diskferry_vdisk::ImageError::Invalid { .. }),
            "{what}: {err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{what}: nothing written"
        );
    }
    // A new base whose absolute name exceeds qcow2's 1023 bytes is refused.
    let far = deep_copy(dir.path(), &a, 1100);
    let err = rebase(&c, Some(&far), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("1023"), "{err}");
}

/// A copy of `image` under `dir` whose absolute path is at least `len` bytes long.
fn deep_copy(dir: &Path, image: &Path, len: usize) -> PathBuf {
    let mut deep = std::fs::canonicalize(dir).unwrap();
    while deep.as_os_str().len() + 12 < len {
        deep.push("a-rather-long-directory-name-for-the-test");
    }
    std::fs::create_dir_all(&deep).unwrap();
    let copy = deep.join("base.qcow2");
    std::fs::copy(image, &copy).unwrap();
    copy
}
