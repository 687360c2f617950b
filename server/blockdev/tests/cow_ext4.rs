//! A copy-on-write device over a real ext4 image: the changes `debugfs` made to a copy,
//! replayed through the device as scattered unaligned writes, give an image `e2fsck` passes
//! and `debugfs` reads the new file from, while the base file never changes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{
    BlockDevice, CowDevice, FileDevice, HybridOptions, HybridVolume, CLUSTER,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Runs a tool, failing the test when it fails; returns its output.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd} {args:?}:\n{text}");
    text
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The byte ranges where `a` and `b` differ, in 4 KiB blocks, cut at random unaligned points
/// into pieces of at most a few clusters, in random order.
fn changes(a: &[u8], b: &[u8], rng: &mut StdRng) -> Vec<std::ops::Range<usize>> {
    let mut pieces = Vec::new();
    for (i, (x, y)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
        if x != y {
            pieces.push(i * 4096..i * 4096 + x.len());
        }
    }
    let mut cut = Vec::new();
    for r in pieces {
        let mut at = r.start;
        while at < r.end {
            let n = rng.gen_range(1..=(r.end - at).min(3 * CLUSTER as usize));
            cut.push(at..at + n);
            at += n;
        }
    }
    cut.shuffle(rng);
    cut
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0; dev.size() as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn debugfs_changes_replayed_through_copy_on_write_give_an_image_e2fsck_passes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let changed = dir.path().join("changed.img");
    run(
        "mke2fs",
        &["-q", "-F", "-t", "ext4", path_str(&base), "24M"],
    );
    std::fs::copy(&base, &changed).unwrap();
    let payload: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let src = dir.path().join("payload");
    std::fs::write(&src, &payload).unwrap();
    let script = format!("mkdir d\nwrite {} d/new\n", path_str(&src));
    std::fs::write(dir.path().join("script"), script).unwrap();
    let script = dir.path().join("script");
    run(
        "debugfs",
        &["-w", "-f", path_str(&script), path_str(&changed)],
    );

    let base_bytes = std::fs::read(&base).unwrap();
    let want = std::fs::read(&changed).unwrap();
    let base_dev = Arc::new(FileDevice::open(&base, false).unwrap());
    let top = HybridOptions {
        ram_limit: 8 * CLUSTER,
        spill: Some(dir.path().join("spill")),
    };
    let top = Arc::new(HybridVolume::new(base_dev.size(), top).unwrap());
    let cow = CowDevice::new(base_dev, top.clone()).unwrap();
    let writes = changes(&base_bytes, &want, &mut StdRng::seed_from_u64(5));
    for r in &writes {
        cow.write_at(&want[r.clone()], r.start as u64).unwrap();
    }
    eprintln!("{} writes replayed; redo {:?}", writes.len(), top.stats());
    let out = dir.path().join("out.img");
    std::fs::write(&out, read_all(&cow)).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the replayed image equals debugfs's"
    );
    run("e2fsck", &["-fn", path_str(&out)]);
    let got = dir.path().join("got");
    let dump = format!("dump d/new {}", path_str(&got));
    run("debugfs", &["-R", &dump, path_str(&out)]);
    assert!(std::fs::read(&got).unwrap() == payload);
    assert!(top.stats().file_clusters > 0, "the redo spilled");

    cow.discard(0, cow.size()).unwrap();
    std::fs::write(&out, read_all(&cow)).unwrap();
    run("e2fsck", &["-fn", path_str(&out)]);
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base never changes"
    );
    assert!(
        std::fs::read(&out).unwrap() == base_bytes,
        "trimmed clusters read the base"
    );
}
