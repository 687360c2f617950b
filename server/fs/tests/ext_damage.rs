//! ext2/3/4 images that are valid but odd, or damaged, made with e2fsprogs and judged by it:
//! two files sharing blocks (rebuilt, each file keeps its bytes: `debugfs cat`), block bitmaps
//! freed by `debugfs freeb` and zeroed (a blocks-mode copy still holds every superblock backup,
//! descriptor, bitmap, inode table and the journal: `e2fsck -fn`, `dumpe2fs`, block
//! comparison), free counters
//! that lie (read anyway, as `debugfs rdump` reads it), and an inline directory continued in
//! its `system.data` attribute (accepted by `e2fsck -fn`, listed as debugfs lists it), and
//! attribute values kept in inodes of their own (`ea_inode`: as `getfattr` gives them).

mod common;

use common::*;
use diskferry_fs::ext4::write::write_ext4;
use diskferry_fs::ext4::Ext4;
use diskferry_fs::Filesystem;
use std::path::Path;
use std::process::Command;

/// `debugfs cat` of `path` in `img`.
fn cat(img: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

#[test]
fn files_sharing_blocks_each_get_their_bytes_in_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), pattern(1, 3 * 4096)).unwrap();
    std::fs::write(src.join("b"), pattern(2, 3 * 4096)).unwrap();
    std::fs::write(src.join("c"), pattern(3, 5000)).unwrap();
    let img = dir.path().join("shared.img");
    mke2fs(&img, 16, &["-t", "ext4", "-b", "4096"], &src);
    // Point b's only extent (its start is word 5 of i_block) at a's blocks.
    let a_start = debugfs(&img, "bmap /a 0", false);
    let a_start: u64 = a_start.lines().find_map(|l| l.trim().parse().ok()).unwrap();
    debugfs(&img, &format!("sif /b block[5] {a_start}"), true);
    let a = cat(&img, "/a");
    assert_eq!(cat(&img, "/b"), a, "debugfs sees b's extent on a's blocks");

    let fs = Ext4::open(device(&img, false)).unwrap();
    let copy = dir.path().join("rebuilt.img");
    blank(&copy, 16 << 20);
    write_ext4(device(&copy, true), &fs, &fs.format_options()).unwrap();
    e2fsck(&copy).unwrap_or_else(|e| panic!("e2fsck -fn of the rebuild:\n{e}"));
    for file in ["/a", "/b", "/c"] {
        assert_eq!(cat(&copy, file), cat(&img, file), "{file} in the rebuild");
    }
}

/// Block ranges `dumpe2fs` lists for each group's superblock (backup), descriptors, reserved
/// descriptors, bitmaps and inode table, and where the backup superblocks are.
fn metadata_ranges(img: &Path) -> (Vec<(u64, u64)>, Vec<u64>) {
    let text = run(Command::new("dumpe2fs").arg(img));
    let (mut ranges, mut backups) = (Vec::new(), Vec::new());
    let number = |s: &str| -> u64 {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    for line in text.lines() {
        for part in line.split(',') {
            let part = part.trim();
            for key in [
                "superblock at ",
                "Group descriptors at ",
                "Group descriptor at ",
                "Reserved GDT blocks at ",
                "Block bitmap at ",
                "Inode bitmap at ",
                "Inode table at ",
            ] {
                let Some(at) = part.find(key).map(|i| &part[i + key.len()..]) else {
                    continue;
                };
                let first = number(at);
                let last = at.split_once('-').map_or(first, |(_, b)| number(b));
                ranges.push((first, last));
                if part.starts_with("Backup superblock") {
                    backups.push(first);
                }
            }
        }
    }
    (ranges, backups)
}

/// The blocks `debugfs blocks` lists for an inode.
fn inode_blocks(img: &Path, inode: &str) -> Vec<u64> {
    debugfs(img, &format!("blocks {inode}"), false)
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// `e2fsck -fn` of `name` in `dir`: what it prints (run from `dir`, so that two images of the
/// same name print the same) and its status.
fn e2fsck_report(dir: &Path, name: &str) -> (String, Option<i32>) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(name)
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (text, out.status.code())
}

/// The block bitmaps `dumpe2fs` lists, group by group.
fn block_bitmaps(img: &Path) -> Vec<u64> {
    let text = run(Command::new("dumpe2fs").arg(img));
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Block bitmap at "))
        .map(|s| {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        })
        .collect()
}

/// Makes a volume with `args` (1 KiB blocks), then lies about its metadata: `debugfs freeb`
/// frees every superblock, descriptor, reserved descriptor, bitmap and inode table block and
/// the journal's span in the bitmaps, and the block bitmaps of the groups past the first are
/// zeroed outright. A blocks-mode copy must still hold all of them: e2fsck finds the same in
/// the copy as in the source (the bitmaps), every backup superblock opens, and the blocks
/// are the source's.
fn damaged_bitmaps_lose_nothing(args: &[&str]) {
    let bs = 1024u64;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    populate(&src);
    let (orig, copied) = (dir.path().join("orig"), dir.path().join("copied"));
    std::fs::create_dir(&orig).unwrap();
    std::fs::create_dir(&copied).unwrap();
    let img = orig.join("fs.img");
    mke2fs(&img, 32, args, &src);
    let (meta, backups) = metadata_ranges(&img);
    let journal = inode_blocks(&img, "<8>");
    let (jfirst, jlast) = (journal.iter().min().unwrap(), journal.iter().max().unwrap());
    assert!(backups.len() >= 2, "{backups:?}");
    let mut frees: Vec<String> = meta
        .iter()
        .map(|(a, b)| format!("freeb {a} {}", b - a + 1))
        .collect();
    frees.push(format!("freeb {jfirst} {}", jlast - jfirst + 1));
    let requests = dir.path().join("requests");
    std::fs::write(&requests, frees.join("\n")).unwrap();
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&requests)
        .arg(&img));
    let dev = device(&img, true);
    for b in &block_bitmaps(&img)[1..] {
        dev.write_at(&vec![0u8; bs as usize], b * bs).unwrap();
    }
    dev.flush().unwrap();
    drop(dev);

    let fs = Ext4::open(device(&img, false)).unwrap();
    let copy = copied.join("fs.img");
    copy_used_blocks(&fs, &img, &copy);
    let (before, after) = (
        e2fsck_report(&orig, "fs.img"),
        e2fsck_report(&copied, "fs.img"),
    );
    assert_eq!(after, before, "e2fsck -fn of the copy and of the source");
    assert!(
        before.0.contains("Block bitmap differences"),
        "{}",
        before.0
    );
    for b in backups {
        let superblock = format!("superblock={b}");
        run(Command::new("dumpe2fs")
            .args(["-h", "-o", &superblock, "-o", "blocksize=1024"])
            .arg(&copy));
    }
    let (from, to) = (device(&img, false), device(&copy, false));
    let blocks = meta
        .iter()
        .flat_map(|&(a, b)| a..=b)
        .chain(*jfirst..=*jlast)
        .chain(inode_blocks(&img, "<7>"));
    for block in blocks {
        let (mut x, mut y) = (vec![0u8; bs as usize], vec![0u8; bs as usize]);
        from.read_at(&mut x, block * bs).unwrap();
        to.read_at(&mut y, block * bs).unwrap();
        assert!(x == y, "block {block} differs in the copy");
    }
}

#[test]
fn damaged_ext4_bitmaps_lose_no_metadata_in_a_blocks_copy() {
    damaged_bitmaps_lose_nothing(&["-t", "ext4", "-b", "1024"]);
}

#[test]
fn damaged_ext3_bitmaps_lose_no_metadata_in_a_blocks_copy() {
    // ext3: no flex_bg, a journal mapped by indirect blocks.
    damaged_bitmaps_lose_nothing(&["-t", "ext3", "-b", "1024"]);
}

#[test]
fn wrong_free_counts_are_read_past() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    populate(&src);
    let img = dir.path().join("fs.img");
    mke2fs(&img, 32, &["-t", "ext4", "-b", "4096"], &src);
    debugfs(&img, "ssv free_blocks_count 4000000000", true);
    debugfs(&img, "ssv free_inodes_count 4000000000", true);
    // e2fsck recomputes the counts and does not mind: they are hints.
    assert_eq!(dumpe2fs_field(&img, "Free blocks"), 4_000_000_000);
    e2fsck(&img).unwrap();
    let fs = Ext4::open(device(&img, false)).unwrap();
    let dumped = rdump(&img, &dir.path().join("dump"));
    let got = reader_snapshot(&fs).unwrap();
    assert_eq!(difference(&dumped, &without_setid(&got)), None);
    assert!(fs.info().used_bytes <= fs.info().total_bytes);
}

#[test]
fn an_inline_directory_continued_in_its_attribute_lists_every_entry() {
    // mke2fs makes inline directories that fit `i_block`; the kernel continues larger ones in
    // the `system.data` attribute. Continue one with debugfs: an entry "b2" for /b there.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("x")).unwrap();
    std::fs::write(src.join("x/a"), b"a\n").unwrap();
    std::fs::write(src.join("b"), b"b\n").unwrap();
    let img = dir.path().join("fs.img");
    mke2fs(&img, 16, &["-t", "ext4", "-O", "inline_data"], &src);
    let stat = debugfs(&img, "stat /b", false);
    let b: u32 = stat
        .split_whitespace()
        .skip_while(|w| *w != "Inode:")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut entry = b.to_le_bytes().to_vec();
    entry.extend_from_slice(&12u16.to_le_bytes());
    entry.extend_from_slice(&[2, 1]);
    entry.extend_from_slice(b"b2\0\0");
    let entry_file = dir.path().join("entry");
    std::fs::write(&entry_file, &entry).unwrap();
    let set = format!("ea_set -f {} /x system.data", entry_file.display());
    debugfs(&img, &set, true);
    debugfs(&img, "sif /x size 72", true);
    debugfs(&img, "sif /b links_count 2", true);
    e2fsck(&img).unwrap_or_else(|e| panic!("e2fsck -fn of the continued directory:\n{e}"));

    let fs = Ext4::open(device(&img, false)).unwrap();
    let x = fs.lookup("/x").unwrap();
    let mut names: Vec<String> = fs
        .read_dir(x)
        .unwrap()
        .iter()
        .map(|e| e.name_lossy())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b2"]);
    assert!(
        fs.xattrs(x).unwrap().is_empty(),
        "system.data is data, not an attribute"
    );
    let mut dumped = rdump(&img, &dir.path().join("dump"));
    let got = reader_snapshot(&fs).unwrap();
    unpad_inline(&mut dumped, &got);
    assert_eq!(difference(&dumped, &got), None);
}

#[test]
fn attribute_values_in_inodes_of_their_own_are_read() {
    // With ea_inode and 1 KiB blocks, mke2fs keeps a 2000-byte value in an inode of its own.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let file = src.join("f");
    std::fs::write(&file, b"data").unwrap();
    let large = format!("0x{}", "cd".repeat(2000));
    run(Command::new("setfattr")
        .args(["-n", "user.large", "-v", &large])
        .arg(&file));
    run(Command::new("setfattr")
        .args(["-n", "user.small", "-v", "s"])
        .arg(&file));
    let img = dir.path().join("fs.img");
    mke2fs(
        &img,
        16,
        &["-t", "ext4", "-b", "1024", "-O", "ea_inode"],
        &src,
    );
    // mke2fs 1.47.0 leaves the owner's block count without the value's blocks: e2fsck -fy
    // corrects it (status 1: corrected), then the image is clean.
    let fixed = Command::new("e2fsck")
        .arg("-fy")
        .arg(&img)
        .output()
        .unwrap();
    assert!(fixed.status.code().is_some_and(|c| c <= 1), "{fixed:?}");
    e2fsck(&img).unwrap();
    let fs = Ext4::open(device(&img, false)).unwrap();
    assert_eq!(reader_xattrs(&fs).unwrap(), host_xattrs(&src));
    assert!(fs.rebuild_obstacle().unwrap().contains("ea_inode"));
    // The value's inode must say it holds one: without its flag the value is refused.
    let holder = (12..=20)
        .find(|n| {
            let stat = debugfs(&img, &format!("stat <{n}>"), false);
            let flags = stat
                .split("Flags: 0x")
                .nth(1)
                .map(|f| f.split_whitespace().next());
            let flags = flags
                .flatten()
                .and_then(|f| u32::from_str_radix(f, 16).ok());
            flags.is_some_and(|f| f & 0x20_0000 != 0)
        })
        .expect("an inode holding the value");
    let f = fs.lookup("/f").unwrap();
    drop(fs);
    debugfs(&img, &format!("sif <{holder}> flags 0x80000"), true);
    let fs = Ext4::open(device(&img, false)).unwrap();
    let err = fs.xattrs(f).unwrap_err().to_string();
    assert!(
        err.contains(&format!("inode {holder} does not hold")),
        "{err}"
    );
}
