//! The writer against an in-memory reference: random writes, zeros and discards, reopened
//! from the bytes written; overlays, compression, zeros that never allocate.

use std::path::Path;
use std::sync::Arc;

use super::Qcow2;
use diskferry_blockdev::{BlockDevice, MemoryDevice};
use rand::{Rng, SeedableRng};

fn check_equal(image: &Qcow2, reference: &[u8]) {
    let mut got = vec![0u8; reference.len()];
    image.read_at(&mut got, 0).unwrap();
    if got != reference {
        let i = got.iter().zip(reference).position(|(a, b)| a != b).unwrap();
        panic!("image differs from the reference at byte {i}");
    }
}

/// Random writes (data and zeros) and discards against an in-memory reference; flushed,
/// reopened and written again. With `overlay`, the image is an overlay on a random base.
fn model(cluster_bits: u32, size: usize, ops: usize, seed: u64, overlay: bool) {
    let mut file = Arc::new(MemoryDevice::new(0));
    let path = Path::new("model.qcow2");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base: Option<Arc<dyn BlockDevice>> = overlay.then(|| {
        Arc::new(MemoryDevice::read_only(
            (0..size).map(|_| rng.gen()).collect(),
        )) as _
    });
    let mut reference = vec![0u8; size];
    let mut image = match &base {
        Some(b) => {
            b.read_at(&mut reference, 0).unwrap();
            Qcow2::create_overlay(
                file.clone(),
                path,
                b.clone(),
                "base.raw",
                "raw",
                cluster_bits,
            )
            .unwrap()
        }
        None => Qcow2::create(file.clone(), path, size as u64, cluster_bits).unwrap(),
    };
    for round in 0..2 {
        for i in 0..ops {
            let len = match rng.gen_range(0..10) {
                0 => rng.gen_range(1..(3 << cluster_bits)),
                1..=3 => 1 << cluster_bits,
                _ => rng.gen_range(1..4096),
            };
            let offset = rng.gen_range(0..size - len);
            match rng.gen_range(0..10) {
                0..=5 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    image.write_at(&data, offset as u64).unwrap();
                    reference[offset..offset + len].copy_from_slice(&data);
                }
                6 | 7 => {
                    image.write_at(&vec![0u8; len], offset as u64).unwrap();
                    reference[offset..offset + len].fill(0);
                }
                _ => {
                    image.discard(offset as u64, len as u64).unwrap();
                    reference[offset..offset + len].fill(0);
                }
            }
            if i % 500 == 0 {
                check_equal(&image, &reference);
            }
        }
        check_equal(&image, &reference);
        image.flush().unwrap();
        drop(image);
        // Reopen from a copy of the bytes written: everything must have reached the file.
        let copy = Arc::new(MemoryDevice::new(0));
        copy.resize(file.size()).unwrap();
        copy.write_at(&file.contents(), 0).unwrap();
        file = copy;
        image = Qcow2::open_writable(file.clone(), path, base.clone())
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        check_equal(&image, &reference);
    }
}

#[test]
fn random_writes_zeros_and_discards_match_a_reference_4k_clusters() {
    model(12, 24 << 20, 3000, 1, false);
}

#[test]
fn an_overlay_reads_through_to_its_base_and_copies_on_write() {
    model(12, 8 << 20, 3000, 3, true);
    model(16, 16 << 20, 1500, 4, true);
}

#[test]
fn an_overlay_needs_its_base_to_be_read() {
    let base: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(vec![7u8; 1 << 20]));
    let file = Arc::new(MemoryDevice::new(0));
    let overlay = Qcow2::create_overlay(
        file.clone(),
        Path::new("o.qcow2"),
        base,
        "base.raw",
        "raw",
        16,
    )
    .unwrap();
    let mut buf = [0u8; 16];
    overlay.read_at(&mut buf, 100).unwrap();
    assert_eq!(buf, [7u8; 16]);
    drop(overlay);
    let err = Qcow2::open(file.clone(), Path::new("o.qcow2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("base.raw"), "{err}");
    let inspected = Qcow2::inspect(file, Path::new("o.qcow2")).unwrap();
    assert_eq!(inspected.backing_name(), Some("base.raw"));
    assert!(
        inspected.read_at(&mut buf, 0).is_err(),
        "no invented zeros without the base"
    );
}

#[test]
fn random_writes_zeros_and_discards_match_a_reference_64k_clusters() {
    model(16, 64 << 20, 2000, 2, false);
}

#[test]
fn compressed_clusters_read_back_survive_overwrites_and_save_space() {
    let file = Arc::new(MemoryDevice::new(0));
    let path = Path::new("c.qcow2");
    let size = 16usize << 20;
    let image = Qcow2::create(file.clone(), path, size as u64, 16).unwrap();
    image.set_compress(true).unwrap();
    let text: Vec<u8> = b"sixteen bytes ok"
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect();
    let mut reference = text.clone();
    image.write_at(&text, 0).unwrap();
    image.flush().unwrap();
    assert!(
        file.size() < 2 << 20,
        "16 MiB of text compresses: the file holds {} bytes",
        file.size()
    );
    // Incompressible clusters are stored plainly; partial overwrites rewrite clusters.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let noise: Vec<u8> = (0..(1 << 20)).map(|_| rng.gen()).collect();
    image.write_at(&noise, 5 << 20).unwrap();
    reference[5 << 20..6 << 20].copy_from_slice(&noise);
    for _ in 0..200 {
        let len = rng.gen_range(1..100_000);
        let offset = rng.gen_range(0..size - len);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        image.write_at(&data, offset as u64).unwrap();
        reference[offset..offset + len].copy_from_slice(&data);
    }
    check_equal(&image, &reference);
    image.flush().unwrap();
    drop(image);
    let reopened = Qcow2::open(file.clone(), path).unwrap();
    check_equal(&reopened, &reference);
}

#[test]
fn zero_writes_never_allocate() {
    let file = Arc::new(MemoryDevice::new(0));
    let image = Qcow2::create(file.clone(), Path::new("z.qcow2"), 64 << 20, 16).unwrap();
    let before = file.size();
    image.write_at(&vec![0u8; 8 << 20], 1 << 20).unwrap();
    image.discard(0, 64 << 20).unwrap();
    image.flush().unwrap();
    assert_eq!(file.size(), before, "no cluster was allocated for zeros");
}
