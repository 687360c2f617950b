//! Incremental captures (issue 16, sector level): a whole-disk capture with its chunk map,
//! then after changing three chunks of the source (new bytes, a chunk zeroed, data where there
//! was a hole) an incremental capture copies only those three into a qcow2 overlay on the
//! base; a second increment makes a chain of three. `qemu-img compare` finds each chain equal
//! to the source, `qemu-img check` clean, `qemu-img info --backing-chain` shows the chain; a
//! base without a map, a base changed since, and a source of another size are refused.
//!
//! Files mode: a GPT disk with an ext4 made by `mke2fs -d` is captured file by file with its
//! chunk map; after `debugfs` rewrites every tenth file, the incremental capture reads only
//! the changed files and the metadata from the source and takes the rest from the base; the
//! result passes our verify against the source, `e2fsck -fn` and `debugfs rdump` + `diff -r`
//! against the tree as it is now. Deploying that increment onto a disk holding the base's
//! deploy sends a tenth of what the first deploy sent (files keep their places), and the
//! target passes `e2fsck -fn` and `diff -r` against the tree.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::NOT_HASHED;
use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_imaging::chunkmap::{ChunkMap, Layout};
use diskferry_imaging::pipeline::{DeployHow, IncrementalError, Mode, OutputOptions};
use diskferry_imaging::progress::Silent;
use diskferry_imaging::{capture, CaptureJobError, CaptureOptions, CaptureOutcome, CaptureSummary};
use diskferry_vdisk::ImageFormat;

mod common;
use common::run;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = diskferry_imaging::chunkmap::DEFAULT_CHUNK as u64;

fn source(path: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(FileDevice::open(path, false).unwrap())
}

/// A 64 MiB raw disk with data in its first 32 MiB and a hole after.
fn make_source(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("source.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 * MIB).unwrap();
    let data: Vec<u8> = (0..32 * MIB).map(|i| (i * 31 % 253) as u8 + 1).collect();
    file.write_all_at(&data, 0).unwrap();
    path
}

fn options(mode: Mode, base: Option<&Path>) -> CaptureOptions {
    CaptureOptions {
        output: OutputOptions {
            format: ImageFormat::Qcow2,
            compress: false,
            overwrite: false,
        },
        mode,
        size: None,
        verify: true,
        chunk_map: true,
        base: base.map(Path::to_path_buf),
        transform: None,
    }
}

fn full_capture(src: &Path, out: &Path) {
    let done = capture(source(src), out, &options(Mode::Sectors, None), &Silent).unwrap();
    assert_eq!(
        done.chunk_map,
        Some(diskferry_imaging::chunkmap::path_for(out))
    );
    assert_eq!(ChunkMap::load(out).unwrap().layout, Layout::WholeDisk);
}

/// An incremental capture of `src` on `base` into `out` (mode auto), verified.
fn incremental(src: &Path, out: &Path, base: &Path) -> Result<CaptureOutcome, CaptureJobError> {
    capture(source(src), out, &options(Mode::Auto, Some(base)), &Silent)
}

/// (chunks, changed chunks, changed bytes) of an incremental capture.
fn changed(done: &CaptureOutcome) -> (usize, usize, u64) {
    let (_, s) = done.incremental.as_ref().expect("incremental");
    (s.chunks, s.changed_chunks, s.changed_bytes)
}

fn assert_same(src: &Path, image: &Path) {
    run(Command::new("qemu-img").arg("check").arg(image));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(src)
        .arg(image));
}

#[test]
fn only_changed_chunks_are_copied_and_the_chain_reads_as_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let base = dir.path().join("base.qcow2");
    full_capture(&src, &base);

    let file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    file.write_all_at(&[0xee; 100], 5 * MIB + 7).unwrap();
    file.write_all_at(&vec![0u8; MIB as usize], 10 * MIB)
        .unwrap();
    file.write_all_at(&[0x42; 4096], 40 * MIB + 4096).unwrap();
    let inc1 = dir.path().join("inc1.qcow2");
    let done = incremental(&src, &inc1, &base).unwrap();
    assert!(matches!(done.summary, CaptureSummary::Overlay));
    // 100 bytes, a zeroed MiB, a 4 KiB write: 1 + 16 + 1 chunks of 64 KiB.
    assert_eq!(changed(&done), (1024, 18, 18 * CHUNK));
    assert_same(&src, &inc1);
    let chain = run(Command::new("qemu-img")
        .args(["info", "--backing-chain"])
        .arg(&inc1));
    assert!(chain.contains("base.qcow2"), "{chain}");

    file.write_all_at(&[0x99; 10], 63 * MIB).unwrap();
    let inc2 = dir.path().join("inc2.qcow2");
    let done = incremental(&src, &inc2, &inc1).unwrap();
    assert_eq!(changed(&done).1, 1);
    assert_same(&src, &inc2);
    // Nothing changed: nothing copied, still equal.
    let inc3 = dir.path().join("inc3.qcow2");
    let done = incremental(&src, &inc3, &inc2).unwrap();
    assert_eq!(changed(&done).1, 0);
    assert_same(&src, &inc3);
}

#[test]
fn bases_that_cannot_carry_an_overlay_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let base = dir.path().join("base.qcow2");
    full_capture(&src, &base);
    let out = dir.path().join("inc.qcow2");

    // Another source size.
    let bigger = dir.path().join("bigger.raw");
    std::fs::File::create(&bigger)
        .unwrap()
        .set_len(65 * MIB)
        .unwrap();
    let err = incremental(&bigger, &out, &base).unwrap_err();
    assert!(
        matches!(
            err,
            CaptureJobError::Incremental(IncrementalError::SizeDiffers { .. })
        ),
        "{err}"
    );

    // A whole-disk base takes only a qcow2 overlay.
    let raw = dir.path().join("inc.raw");
    let mut opts = options(Mode::Auto, Some(&base));
    opts.output.format = ImageFormat::Raw;
    let err = capture(source(&src), &raw, &opts, &Silent).unwrap_err();
    assert!(matches!(err, CaptureJobError::OverlayOnly { .. }), "{err}");

    // The base changed after its map was written.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&base)
        .unwrap();
    f.write_all_at(&[0], std::fs::metadata(&base).unwrap().len())
        .unwrap();
    let err = incremental(&src, &out, &base).unwrap_err();
    assert!(
        matches!(
            err,
            CaptureJobError::Incremental(IncrementalError::BaseChanged { .. })
        ),
        "{err}"
    );

    // No map at all.
    std::fs::remove_file(diskferry_imaging::chunkmap::path_for(&base)).unwrap();
    let err = incremental(&src, &out, &base).unwrap_err();
    assert!(err.to_string().contains("no chunk map"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_disk_without_a_table_deploys_whole_and_then_as_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let base = dir.path().join("base.qcow2");
    full_capture(&src, &base);
    let target = dir.path().join("target.raw");
    std::fs::write(&target, vec![0xa5u8; 64 * MIB as usize]).unwrap();
    let first = deploy_onto(&base, &target);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&target));
    let file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    file.write_all_at(&[0x77; 5000], 20 * MIB + 3).unwrap();
    let inc = dir.path().join("inc.qcow2");
    incremental(&src, &inc, &base).unwrap();
    let second = deploy_onto(&inc, &target);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&target));
    let sent = |r: &diskferry_imaging::pipeline::DeployReport| r.disk.partitions[0].sent.unwrap();
    assert_eq!(sent(&first), 32 * MIB, "every data chunk, the first time");
    assert_eq!(sent(&second), CHUNK, "one chunk changed");
}

#[test]
fn a_chain_whose_base_vanished_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let base = dir.path().join("base.qcow2");
    full_capture(&src, &base);
    let inc = dir.path().join("inc.qcow2");
    incremental(&src, &inc, &base).unwrap();
    std::fs::remove_file(&base).unwrap();
    let out = dir.path().join("next.qcow2");
    let err = incremental(&src, &out, &inc).unwrap_err();
    assert!(
        matches!(
            &err,
            CaptureJobError::Incremental(IncrementalError::Base { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("inc.qcow2"), "{err}");
    assert!(!out.exists());
}

/// A tree of 60 files: text, binary of a few sizes, one with a long run of zeros.
fn make_tree(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    for i in 0..60u32 {
        let len = 16384 * (1 + (i as usize * 7) % 40) + i as usize;
        let mut data: Vec<u8> = (0..len).map(|j| (j as u32 * 13 + i) as u8).collect();
        if i == 7 {
            data.splice(4096..4096, std::iter::repeat_n(0u8, 256 * 1024));
        }
        let at = match i % 3 {
            0 => tree.join(format!("f{i}")),
            1 => tree.join(format!("sub/f{i}")),
            _ => tree.join(format!("sub/deeper/f{i}")),
        };
        std::fs::write(at, data).unwrap();
    }
    tree
}

/// A 64 MiB GPT disk whose partition 1 (1 MiB – 63 MiB) is an ext4 of `tree`.
fn make_ext4_disk(dir: &Path, tree: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:129023"])
        .arg(&disk));
    let fs = dir.join("fs.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(tree)
        .arg(&fs)
        .arg("62M"));
    common::place(&disk, &fs, MIB);
    (disk, fs)
}

/// Every tenth file gets new content (a new inode, as an editor's save makes).
fn change_tenth_files(dir: &Path, disk: &Path, fs: &Path, tree: &Path) {
    let mut script = String::new();
    for i in (0..60u32).step_by(10) {
        let path = match i % 3 {
            0 => format!("f{i}"),
            1 => format!("sub/f{i}"),
            _ => format!("sub/deeper/f{i}"),
        };
        let local = tree.join(&path);
        let mut data = std::fs::read(&local).unwrap();
        data.extend_from_slice(b"appended\n");
        std::fs::write(&local, &data).unwrap();
        script += &format!("rm /{path}\nwrite {} /{path}\n", local.display());
    }
    let cmds = dir.join("change.debugfs");
    std::fs::write(&cmds, script).unwrap();
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(fs));
    common::place(disk, fs, MIB);
}

#[test]
fn a_files_mode_increment_reads_changed_files_only_and_takes_the_rest_from_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let tree = make_tree(dir.path());
    let (disk, fs) = make_ext4_disk(dir.path(), &tree);
    let base = dir.path().join("base.qcow2");
    let full = capture(source(&disk), &base, &options(Mode::Files, None), &Silent).unwrap();
    assert_eq!(ChunkMap::load(&base).unwrap().layout, Layout::Partitions);
    let CaptureSummary::Partitions(full) = full.summary else {
        panic!("partition by partition")
    };

    change_tenth_files(dir.path(), &disk, &fs, &tree);
    let out = dir.path().join("inc.qcow2");
    let done = incremental(&disk, &out, &base).expect("incremental, verified against the source");
    let (hashed, changed_chunks, _) = changed(&done);
    assert!(
        changed_chunks > 0 && changed_chunks < 10,
        "{changed_chunks} chunks changed"
    );
    // Only the blocks the filesystem uses are hashed, in the base's map and now: free space
    // (most of this disk) is never read.
    let total = (64 * MIB / CHUNK) as usize;
    let in_base = ChunkMap::load(&base).unwrap().hashes;
    let base_hashed = in_base.iter().filter(|h| **h != NOT_HASHED).count();
    assert!(
        hashed < total / 2 && base_hashed < total / 2 && base_hashed > 0,
        "{hashed} and {base_hashed} of {total} chunks hashed"
    );
    let CaptureSummary::Partitions(report) = &done.summary else {
        panic!("partition by partition")
    };
    let (p, before) = (&report.partitions[0], &full.partitions[0]);
    eprintln!("full: {before}\nincrement: {p}");
    assert!(p.reused > 1 << 20, "{p}");
    assert!(
        p.read * 2 < before.read,
        "the increment read {} of the source, the full capture {}",
        p.read,
        before.read
    );

    let raw = common::as_raw(&out);
    // Files stay where the base put them: the two images differ in few chunks.
    let before = common::as_raw(&base);
    let differing = differing_mib(&before, &raw);
    assert!(
        differing <= 16,
        "the images differ in {differing} of 64 MiB (the files moved)"
    );
    let part = common::extract(&raw, 1);
    assert_ext4_holds(&part, &tree, dir.path());
    // The increment is a base in its turn.
    let again = dir.path().join("inc2.qcow2");
    let done = incremental(&disk, &again, &out).unwrap();
    assert_eq!(changed(&done).1, 0);
}

/// How many 1 MiB chunks differ between two raw files of one size.
fn differing_mib(a: &Path, b: &Path) -> usize {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    a.chunks(MIB as usize)
        .zip(b.chunks(MIB as usize))
        .filter(|(x, y)| x != y)
        .count()
}

/// Deploys `image` (follows its backing file) onto the raw file `target`.
fn deploy_onto(image: &Path, target: &Path) -> diskferry_imaging::pipeline::DeployReport {
    let (_, image) = diskferry_vdisk::open_image(image, true).unwrap();
    let target: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(target, true).unwrap());
    diskferry_imaging::deploy(
        image,
        target,
        "target",
        &DeployHow::mode(Mode::Auto),
        &Silent,
    )
    .unwrap()
}

#[test]
fn deploying_the_next_capture_over_the_last_one_sends_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let tree = make_tree(dir.path());
    let (disk, fs) = make_ext4_disk(dir.path(), &tree);
    let base = dir.path().join("base.qcow2");
    capture(source(&disk), &base, &options(Mode::Files, None), &Silent).unwrap();
    change_tenth_files(dir.path(), &disk, &fs, &tree);
    let next = dir.path().join("next.qcow2");
    incremental(&disk, &next, &base).unwrap();

    let target = dir.path().join("target.raw");
    std::fs::write(&target, vec![0xa5u8; 64 * MIB as usize]).unwrap();
    let first = deploy_onto(&base, &target);
    let second = deploy_onto(&next, &target);
    let (a, b) = (&first.disk.partitions[0], &second.disk.partitions[0]);
    let (sent_first, sent_second) = (a.sent.unwrap(), b.sent.unwrap());
    // Measured: 20.6 MB then 0.9 MB; 4.2 MB when the deploy lays files out afresh.
    assert!(
        sent_second * 10 < sent_first,
        "the first deploy sent {sent_first} bytes, the second {sent_second}"
    );
    // The target is what the next capture holds (checked by the deploy's verify too).
    let part = common::extract(&target, 1);
    assert_ext4_holds(&part, &tree, dir.path());
}

/// A 64 MiB GPT disk whose partition 1 is a FAT32 holding 30 files of 200 KiB made by mcopy.
fn make_fat_disk(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let fs = dir.join("fat.img");
    run(Command::new("mkfs.fat")
        .args(["-F", "32", "-C", "-n", "INCR"])
        .arg(&fs)
        .arg("63488"));
    for i in 0..30u32 {
        let local = dir.join(format!("F{i}.BIN"));
        let data: Vec<u8> = (0..200 * 1024u32).map(|j| (j * 7 + i) as u8).collect();
        std::fs::write(&local, data).unwrap();
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&fs)
            .arg(&local)
            .arg("::"));
    }
    let disk = dir.join("fatdisk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:129023", "-t", "1:0700"])
        .arg(&disk));
    common::place(&disk, &fs, MIB);
    (disk, fs)
}

#[test]
fn a_fat_increment_takes_unchanged_files_from_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, fs) = make_fat_disk(dir.path());
    let base = dir.path().join("base.qcow2");
    capture(source(&disk), &base, &options(Mode::Files, None), &Silent).unwrap();
    // mcopy replaces one file.
    let new = dir.path().join("F3.BIN");
    std::fs::write(&new, vec![0x5a; 300 * 1024]).unwrap();
    run(Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(&fs)
        .arg(&new)
        .arg("::"));
    common::place(&disk, &fs, MIB);

    let out = dir.path().join("inc.qcow2");
    let done = incremental(&disk, &out, &base).expect("incremental, verified against the source");
    let CaptureSummary::Partitions(report) = &done.summary else {
        panic!("partition by partition")
    };
    let p = &report.partitions[0];
    assert!(p.reused >= 25 * 200 * 1024, "{p}");
    let raw = common::as_raw(&out);
    let part = common::extract(&raw, 1);
    run(Command::new("fsck.fat").arg("-n").arg(&part));
    let f3 = run(Command::new("mtype").arg("-i").arg(&part).arg("::F3.BIN"));
    assert_eq!(f3.len(), 300 * 1024);
    let f7 = std::process::Command::new("mtype")
        .arg("-i")
        .arg(&part)
        .arg("::F7.BIN")
        .output()
        .unwrap()
        .stdout;
    assert_eq!(f7, std::fs::read(dir.path().join("F7.BIN")).unwrap());
}

/// The ext4 in `part` passes `e2fsck -fn` and holds `tree` (`debugfs rdump`, `diff -r`).
fn assert_ext4_holds(part: &Path, tree: &Path, dir: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(part));
    let dump = dir.join("dump");
    std::fs::create_dir(&dump).unwrap();
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dump.display()))
        .arg(part));
    run(Command::new("diff")
        .args(["-r", "--exclude=lost+found"])
        .arg(tree)
        .arg(&dump));
}
