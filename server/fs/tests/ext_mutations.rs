//! Hostile input: images made by mke2fs with the layouts the reader learnt last (meta_bg,
//! bigalloc, inline data, 64 KiB blocks, sparse_super2), with a few random bytes changed, must
//! never panic the reader — opening, walking, reading every file and link, listing attributes
//! and building the allocation map end in a value or an error. Seeds are fixed, so a failure
//! names a mutation that can be replayed.

mod common;

use common::*;
use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_fs::ext4::Ext4;
use diskferry_fs::{tree, FileKind, Filesystem};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Mutated copies tried per image.
const ROUNDS: u64 = 300;

/// Everything a capture would do with the volume, errors ignored; whether it opened.
fn exercise(dev: Arc<dyn BlockDevice>) -> bool {
    let Ok(fs) = Ext4::open(dev) else {
        return false;
    };
    let _ = fs.allocation_map();
    let _ = fs.rebuild_obstacle();
    let limits = tree::Limits {
        entries: 10_000,
        ..tree::Limits::default()
    };
    let mut buf = vec![0u8; 1 << 16];
    for (_, entry) in tree::Walk::new(&fs, fs.root(), limits).flatten() {
        let _ = fs.xattrs(entry.node);
        let _ = fs.data_ranges(entry.node);
        match fs.metadata(entry.node).map(|m| m.kind) {
            Ok(FileKind::File) => {
                let _ = fs.read_at(entry.node, 0, &mut buf);
            }
            Ok(FileKind::Symlink) => {
                let _ = fs.read_link(entry.node);
            }
            _ => {}
        }
    }
    true
}

/// The 1 KiB chunks of `image` that are not all zeros: where mutations land.
fn nonzero_chunks(image: &[u8]) -> Vec<usize> {
    image
        .chunks(1024)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i * 1024)
        .collect()
}

#[test]
fn mutated_images_never_panic_the_reader() {
    let top = tempfile::tempdir().unwrap();
    let src = top.path().join("src");
    populate(&src);
    let layouts: [(&str, &[&str]); 5] = [
        (
            "meta_bg",
            &[
                "-t",
                "ext4",
                "-b",
                "1024",
                "-g",
                "1024",
                "-O",
                "meta_bg,^resize_inode",
            ],
        ),
        (
            "bigalloc",
            &["-t", "ext4", "-b", "1024", "-O", "bigalloc", "-C", "4096"],
        ),
        ("inline_data", &["-t", "ext4", "-O", "inline_data"]),
        ("64k", &["-t", "ext4", "-b", "65536", "-N", "1024"]),
        (
            "sparse_super2 ext3",
            &["-t", "ext3", "-b", "1024", "-O", "sparse_super2"],
        ),
    ];
    let (mut panics, mut opened) = (Vec::new(), Vec::new());
    for (name, args) in layouts {
        let img = top.path().join("fs.img");
        mke2fs(&img, 16, args, &src);
        let clean = std::fs::read(&img).unwrap();
        let targets = nonzero_chunks(&clean);
        let mut opens = 0;
        for seed in 0..ROUNDS {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut image = clean.clone();
            for _ in 0..rng.gen_range(1..=8) {
                // A third into the superblock and what follows it, the rest anywhere in use.
                let at = if rng.gen_range(0..3) == 0 {
                    1024 + rng.gen_range(0..4096)
                } else {
                    targets[rng.gen_range(0..targets.len())] + rng.gen_range(0..1024)
                };
                image[at] = rng.gen();
            }
            let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(image));
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(dev))) {
                Ok(true) => opens += 1,
                Ok(false) => {}
                Err(_) => panics.push(format!("{name}, seed {seed}")),
            }
        }
        opened.push((name, opens));
    }
    println!("mutated images that still opened (of {ROUNDS}): {opened:?}");
    assert!(panics.is_empty(), "the reader panicked on: {panics:?}");
    // Many mutations leave the volume open: the walk, not just the open, was exercised.
    assert!(opened.iter().all(|(_, n)| *n > ROUNDS / 4), "{opened:?}");
}
