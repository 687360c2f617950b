//! qcow2 overlays: ours pass qemu-img check and compare through their base; qemu-img's read
//! correctly through ours; backing files are followed only when asked, with a depth cap.

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_e2e::{
    assert_qcow2_clean_and_equal, assert_same_bytes, diskferry, make_disk, qemu_img_convert, run_ok,
};
use diskferry_vdisk::open_image;
use diskferry_vdisk::qcow2::Qcow2;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

#[test]
fn our_overlay_keeps_the_base_and_passes_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    make_disk(&raw, 64 * MIB, &[(0, 10 * MIB), (30 * MIB, 20 * MIB)]).unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img_convert(&raw, &base, "qcow2", &[]);
    let base_before = std::fs::read(&base).unwrap();

    let top = dir.path().join("top.qcow2");
    let (ok, _, err) = diskferry(&["overlay".as_ref(), base.as_os_str(), top.as_os_str()]);
    assert!(ok, "{err}");
    let info = run_ok("qemu-img", &["info", top.to_str().unwrap()]);
    assert!(
        info.contains("backing file") && info.contains("base.qcow2"),
        "{info}"
    );
    assert!(run_ok("qemu-img", &["check", top.to_str().unwrap()]).contains("No errors"));

    // Write into the overlay through the library, mirroring into a reference copy of the base.
    let reference_path = dir.path().join("reference.raw");
    std::fs::copy(&raw, &reference_path).unwrap();
    let reference = std::fs::OpenOptions::new()
        .write(true)
        .open(&reference_path)
        .unwrap();
    let (_, base_dev) = open_image(&base, false).unwrap();
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&top, true).unwrap());
    let image = Qcow2::open_writable(file, &top, Some(base_dev)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..300 {
        let len = rng.gen_range(1..200_000u64);
        let offset = rng.gen_range(0..64 * MIB - len);
        let data: Vec<u8> = if rng.gen_bool(0.25) {
            vec![0; len as usize]
        } else {
            (0..len).map(|_| rng.gen()).collect()
        };
        image.write_at(&data, offset).unwrap();
        reference.write_all_at(&data, offset).unwrap();
    }
    image.flush().unwrap();
    drop(image);
    assert_qcow2_clean_and_equal(&top, &reference_path);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base is never written"
    );
}

#[test]
fn qemu_overlays_read_through_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    make_disk(&raw, 32 * MIB, &[(0, 32 * MIB)]).unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img_convert(&raw, &base, "qcow2", &[]);
    let top = dir.path().join("top.qcow2");
    // A relative backing name: resolved from the overlay's directory.
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 1M 100k",
            "-c",
            "write -z 8M 2M",
            top.to_str().unwrap(),
        ],
    );

    let expected = dir.path().join("expected.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            top.to_str().unwrap(),
            expected.to_str().unwrap(),
        ],
    );
    let out = dir.path().join("out.raw");
    let args: [&OsStr; 3] = ["convert".as_ref(), top.as_os_str(), out.as_os_str()];
    let (ok, _, err) = diskferry(&args);
    assert!(
        !ok && err.contains("--follow-backing") && err.contains("base.qcow2"),
        "refused by default: {err}"
    );
    let (ok, _, err) = diskferry(&[args[0], args[1], args[2], "--follow-backing".as_ref()]);
    assert!(ok, "{err}");
    assert_same_bytes(&expected, &out);
}

#[test]
fn a_backing_loop_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", a.to_str().unwrap(), "8M"],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            b.to_str().unwrap(),
        ],
    );
    // Point a at b: a loop qemu-img itself would refuse to create.
    run_ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
        ],
    );
    let err = open_image(&b, true)
        .err()
        .expect("a loop must not open")
        .to_string();
    assert!(err.contains("longer than 16"), "{err}");
}
