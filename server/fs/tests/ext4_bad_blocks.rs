//! The ext4 writer around bad blocks (what a live deploy's range holds of the running
//! system's other files): the blocks are never written, they are listed in the bad-block
//! inode as `mke2fs -l` lists them, the metadata goes around them, and e2fsprogs finds the
//! result clean with the same tree as the source.

mod common;

use common::*;
use diskferry_fs::ext4::write::{write_ext4, Ext4Options};
use diskferry_fs::ext4::Ext4;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BS: u64 = 4096;
const SENTINEL: u8 = 0xB5;

/// Fills every bad block of `img` with the sentinel.
fn mark(img: &Path, bad: &[(u64, u64)]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    for &(b, n) in bad {
        f.write_all_at(&vec![SENTINEL; (n * BS) as usize], b * BS)
            .unwrap();
    }
}

/// The bad blocks that no longer hold the sentinel.
fn written(img: &Path, bad: &[(u64, u64)]) -> Vec<u64> {
    let f = std::fs::File::open(img).unwrap();
    let mut block = vec![0u8; BS as usize];
    bad.iter()
        .flat_map(|&(b, n)| b..b + n)
        .filter(|&b| {
            f.read_exact_at(&mut block, b * BS).unwrap();
            block.iter().any(|&x| x != SENTINEL)
        })
        .collect()
}

#[test]
fn bad_blocks_are_never_written_listed_in_inode_1_and_e2fsck_finds_the_copy_clean() {
    let top = tempfile::tempdir().unwrap();
    let src = top.path().join("src");
    populate(&src);
    let img = top.path().join("source.img");
    mke2fs(&img, 64, &["-t", "ext4", "-b", "4096"], &src);
    let dumped = rdump(&img, &top.path().join("dump"));
    let fs = Ext4::open(device(&img, false)).unwrap();

    // Where the flex group's bitmaps and inode tables would go, group 1's superblock backup,
    // scattered single blocks, and a run long enough for a double-indirect list.
    let bad = [
        (5, 3),
        (40, 1),
        (300, 20),
        (9000, 1),
        (32768, 2),
        (33000, 1500),
        (50_000, 7),
        (65_535, 1),
    ];
    let copy = top.path().join("copy.img");
    blank(&copy, 300 << 20);
    mark(&copy, &bad);
    let opts = Ext4Options {
        bad_blocks: bad.to_vec(),
        reserved_gdt_blocks: 64,
        ..fs.format_options()
    };
    write_ext4(device(&copy, true), &fs, &opts).unwrap();

    assert_eq!(
        written(&copy, &bad),
        Vec::<u64>::new(),
        "bad blocks were written"
    );
    let checked = run_status("e2fsck", &["-fn", copy.to_str().unwrap()]);
    assert_eq!(checked.0, 0, "e2fsck -fn:\n{}", checked.1);
    // e2fsprogs reads the same list back from inode 1.
    let listed = debugfs(&copy, "stat <1>", false);
    let total: u64 = bad.iter().map(|r| r.1).sum();
    // The bad blocks, plus a single-indirect block, a double-indirect one and the one
    // single-indirect block under it.
    assert!(
        listed.contains(&format!("TOTAL: {}", total + 3)),
        "{listed}"
    );
    assert!(listed.contains("(0-2):5-7"), "{listed}");
    let again = rdump(&copy, &top.path().join("copy-dump"));
    assert_eq!(difference(&dumped, &again), None);
}

#[test]
fn a_bad_superblock_or_descriptor_table_is_refused() {
    let top = tempfile::tempdir().unwrap();
    let src = top.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let img = top.path().join("source.img");
    mke2fs(&img, 16, &["-t", "ext4", "-b", "4096"], &src);
    let fs = Ext4::open(device(&img, false)).unwrap();
    let copy = top.path().join("copy.img");
    blank(&copy, 32 << 20);
    let opts = Ext4Options {
        bad_blocks: vec![(1, 1)],
        ..fs.format_options()
    };
    let e = write_ext4(device(&copy, true), &fs, &opts).unwrap_err();
    assert!(e.to_string().contains("cannot be bad"), "{e}");
}
