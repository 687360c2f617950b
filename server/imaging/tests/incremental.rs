//! Incremental captures (issue 16, sector level): a whole-disk capture with its chunk map,
//! then after changing three chunks of the source (new bytes, a chunk zeroed, data where there
//! was a hole) an incremental capture copies only those three into a qcow2 overlay on the
//! base; a second increment makes a chain of three. `qemu-img compare` finds each chain equal
//! to the source, `qemu-img check` clean, `qemu-img info --backing-chain` shows the chain; a
//! base without a map, a base changed since, and a source of another size are refused.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_imaging::chunkmap::ChunkMap;
use diskferry_imaging::pipeline::{capture_incremental, IncrementalError, Mode, OutputOptions};
use diskferry_imaging::progress::Silent;
use diskferry_imaging::{capture, CaptureOptions};
use diskferry_vdisk::ImageFormat;

mod common;
use common::run;

const MIB: u64 = 1 << 20;

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

fn full_capture(src: &Path, out: &Path) {
    let options = CaptureOptions {
        output: OutputOptions {
            format: ImageFormat::Qcow2,
            compress: false,
            overwrite: false,
        },
        mode: Mode::Sectors,
        size: None,
        verify: true,
    };
    capture(source(src), out, &options, &Silent).unwrap();
    ChunkMap::of_source(&*source(src), out)
        .unwrap()
        .save(out)
        .unwrap();
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
    let stats = capture_incremental(&source(&src), &inc1, &base, false, &Silent).unwrap();
    assert_eq!((stats.chunks, stats.changed_chunks), (64, 3), "{stats:?}");
    assert_eq!(stats.changed_bytes, 3 * MIB);
    assert_same(&src, &inc1);
    let chain = run(Command::new("qemu-img")
        .args(["info", "--backing-chain"])
        .arg(&inc1));
    assert!(chain.contains("base.qcow2"), "{chain}");

    file.write_all_at(&[0x99; 10], 63 * MIB).unwrap();
    let inc2 = dir.path().join("inc2.qcow2");
    let stats = capture_incremental(&source(&src), &inc2, &inc1, false, &Silent).unwrap();
    assert_eq!(stats.changed_chunks, 1);
    assert_same(&src, &inc2);
    // Nothing changed: nothing copied, still equal.
    let inc3 = dir.path().join("inc3.qcow2");
    let stats = capture_incremental(&source(&src), &inc3, &inc2, false, &Silent).unwrap();
    assert_eq!(stats.changed_chunks, 0);
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
    let err = capture_incremental(&source(&bigger), &out, &base, false, &Silent).unwrap_err();
    assert!(matches!(err, IncrementalError::SizeDiffers { .. }), "{err}");

    // The base changed after its map was written.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&base)
        .unwrap();
    f.write_all_at(&[0], std::fs::metadata(&base).unwrap().len())
        .unwrap();
    let err = capture_incremental(&source(&src), &out, &base, false, &Silent).unwrap_err();
    assert!(matches!(err, IncrementalError::BaseChanged { .. }), "{err}");

    // No map at all.
    std::fs::remove_file(diskferry_imaging::chunkmap::path_for(&base)).unwrap();
    let err = capture_incremental(&source(&src), &out, &base, false, &Silent).unwrap_err();
    assert!(err.to_string().contains("no chunk map"), "{err}");
    assert!(!out.exists());
}
