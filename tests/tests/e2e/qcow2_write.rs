//! Images our qcow2 writer produces pass `qemu-img check` (no errors, no leaks) and
//! `qemu-img compare` equal to a reference raw file — the independent checker is qemu-img.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_e2e::{assert_qcow2_clean_and_equal, qemu_img_convert};
use diskferry_vdisk::qcow2::Qcow2;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn device(path: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(FileDevice::open(path, true).unwrap())
}

/// Random data writes, zero writes and discards, mirrored into a raw reference file.
fn scribble(image: &Qcow2, reference: &std::fs::File, size: u64, ops: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..ops {
        let len = if rng.gen_bool(0.3) {
            rng.gen_range(1..=4) * 65536
        } else {
            rng.gen_range(1..300_000)
        };
        let offset = rng.gen_range(0..size - len);
        match rng.gen_range(0..10) {
            0..=6 => {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                image.write_at(&data, offset).unwrap();
                reference.write_all_at(&data, offset).unwrap();
            }
            7 => {
                image.write_at(&vec![0u8; len as usize], offset).unwrap();
                reference
                    .write_all_at(&vec![0u8; len as usize], offset)
                    .unwrap();
            }
            _ => {
                image.discard(offset, len).unwrap();
                reference
                    .write_all_at(&vec![0u8; len as usize], offset)
                    .unwrap();
            }
        }
    }
}

#[test]
fn our_images_pass_qemu_img_check_and_compare_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let size = 96 * MIB;
    let img = dir.path().join("ours.qcow2");
    let raw = dir.path().join("reference.raw");
    std::fs::File::create(&img).unwrap();
    let reference = std::fs::File::create(&raw).unwrap();
    reference.set_len(size).unwrap();

    let image = Qcow2::create(device(&img), &img, size, 16).unwrap();
    scribble(&image, &reference, size, 400, 1);
    // Unflushed changes: the header says so.
    let header = std::fs::read(&img).unwrap();
    assert_eq!(
        header[79] & 1,
        1,
        "the dirty bit is set while changes are not flushed"
    );
    image.flush().unwrap();
    assert_eq!(
        std::fs::read(&img).unwrap()[79] & 1,
        0,
        "a flush leaves the image clean"
    );
    drop(image);
    assert_qcow2_clean_and_equal(&img, &raw);

    let image = Qcow2::open_writable(device(&img), &img, None).unwrap();
    scribble(&image, &reference, size, 400, 2);
    image.flush().unwrap();
    drop(image);
    assert_qcow2_clean_and_equal(&img, &raw);
}

#[test]
fn small_clusters_span_many_tables_and_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * MIB;
    let img = dir.path().join("small.qcow2");
    let raw = dir.path().join("reference.raw");
    std::fs::File::create(&img).unwrap();
    let reference = std::fs::File::create(&raw).unwrap();
    reference.set_len(size).unwrap();
    let image = Qcow2::create(device(&img), &img, size, 12).unwrap();
    scribble(&image, &reference, size, 600, 3);
    image.flush().unwrap();
    drop(image);
    assert_qcow2_clean_and_equal(&img, &raw);
}

/// qemu-img turns `raw` into a qcow2 (with `extra` options); we write into it while mirroring
/// the writes into `raw`; qemu-img must find the result clean and equal to `raw`.
fn rewrite_their_image(dir: &Path, raw: &Path, size: u64, extra: &[&str], ops: usize, seed: u64) {
    let img = dir.join("theirs.qcow2");
    qemu_img_convert(raw, &img, "qcow2", extra);
    let reference = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
    let image = Qcow2::open_writable(device(&img), &img, None).unwrap();
    scribble(&image, &reference, size, ops, seed);
    image.flush().unwrap();
    drop(image);
    assert_qcow2_clean_and_equal(&img, raw);
}

#[test]
fn we_write_into_images_qemu_img_made() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("reference.raw");
    diskferry_e2e::make_disk(&raw, 64 * MIB, &[(0, 5 * MIB), (20 * MIB, 7 * MIB + 4096)]).unwrap();
    rewrite_their_image(dir.path(), &raw, 64 * MIB, &[], 300, 4);
}

#[test]
fn compressed_images_are_rewritten_cluster_by_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("reference.raw");
    let text: Vec<u8> = b"compressible line of text. "
        .iter()
        .copied()
        .cycle()
        .take(16 << 20)
        .collect();
    std::fs::write(&raw, &text).unwrap();
    rewrite_their_image(dir.path(), &raw, 16 * MIB, &["-c"], 200, 5);
}
