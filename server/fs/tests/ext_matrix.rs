//! The ext2/3/4 reader and writer against e2fsprogs, over the feature and block-size matrix:
//! for each case `mke2fs -d` makes an image from one source tree (then `e2fsck -fyD` indexes
//! its large directory), and
//! (a) our reader's tree must equal the source tree and `debugfs rdump`'s (names, kinds,
//!     modes — but setuid/setgid, which rdump drops —, sizes, contents, link targets), and its
//!     extended attributes `getfattr`'s;
//! (b) the allocation map must count the blocks `dumpe2fs` counts as used, and the copy
//!     capture would make — a rebuild by our writer, or, where the reader names a rebuild
//!     obstacle, the used blocks — must pass `e2fsck -fn` and `rdump` to the same tree.
//! A line per case is printed, and how many cases pass each check.

mod common;

use common::*;
use diskferry_fs::ext4::write::write_ext4;
use diskferry_fs::ext4::Ext4;
use diskferry_fs::Filesystem;
use std::path::Path;
use std::process::Command;

struct Case {
    name: &'static str,
    /// Image size in KiB.
    kib: u64,
    args: &'static [&'static str],
    /// Whether the writer can recreate it (no rebuild obstacle).
    rebuilds: bool,
    /// debugfs 1.47.0 dumps inline files padded to the 60 bytes of `i_block`.
    inline: bool,
}

const fn case(name: &'static str, mib: u64, args: &'static [&'static str], rebuilds: bool) -> Case {
    Case {
        name,
        kib: mib << 10,
        args,
        rebuilds,
        inline: false,
    }
}

const CASES: &[Case] = &[
    case("ext2", 32, &["-t", "ext2", "-b", "4096"], true),
    case("ext3", 32, &["-t", "ext3", "-b", "4096"], true),
    case("ext3 1k", 32, &["-t", "ext3", "-b", "1024"], true),
    case("ext4", 32, &["-t", "ext4", "-b", "4096"], true),
    case(
        "ext4 ^metadata_csum",
        32,
        &["-t", "ext4", "-b", "4096", "-O", "^metadata_csum"],
        true,
    ),
    case(
        "ext4 ^64bit",
        32,
        &["-t", "ext4", "-b", "4096", "-O", "^64bit"],
        true,
    ),
    case(
        "ext4 ^flex_bg",
        32,
        &["-t", "ext4", "-b", "4096", "-O", "^flex_bg"],
        true,
    ),
    case("ext4 1k", 32, &["-t", "ext4", "-b", "1024"], true),
    case("ext4 2k", 32, &["-t", "ext4", "-b", "2048"], true),
    case("ext4 8k", 32, &["-t", "ext4", "-b", "8192"], false),
    case("ext4 64k", 64, &["-t", "ext4", "-b", "65536"], false),
    case(
        "ext4 128-byte inodes",
        32,
        &["-t", "ext4", "-I", "128"],
        true,
    ),
    case(
        "ext4 inodes per 1 KiB",
        32,
        &["-t", "ext4", "-i", "1024"],
        true,
    ),
    case(
        "ext4 sparse_super2",
        32,
        &["-t", "ext4", "-b", "1024", "-O", "sparse_super2"],
        true,
    ),
    Case {
        inline: true,
        ..case(
            "ext4 inline_data",
            32,
            &["-t", "ext4", "-O", "inline_data"],
            false,
        )
    },
    case(
        "ext4 bigalloc",
        64,
        &["-t", "ext4", "-O", "bigalloc", "-C", "16384"],
        false,
    ),
    case(
        "ext4 bigalloc 1k",
        32,
        &["-t", "ext4", "-b", "1024", "-O", "bigalloc", "-C", "4096"],
        false,
    ),
    case("ext4 16k", 32, &["-t", "ext4", "-b", "16384"], false),
    case(
        "ext4 no journal",
        32,
        &["-t", "ext4", "-b", "4096", "-O", "^has_journal"],
        true,
    ),
    case("ext2 1k", 32, &["-t", "ext2", "-b", "1024"], true),
    Case {
        // mke2fs shrinks its groups to keep a short last one; the writer drops it, so the
        // source's inodes cannot all fit the copy's groups.
        kib: 32 * 1024 + 300,
        ..case(
            "ext4 inodes per 1 KiB, short last group",
            0,
            &["-t", "ext4", "-b", "1024", "-i", "1024"],
            true,
        )
    },
    case(
        "ext4 ea_inode",
        32,
        &["-t", "ext4", "-O", "ea_inode"],
        false,
    ),
    case(
        "ext4 casefold",
        32,
        &["-t", "ext4", "-O", "casefold"],
        false,
    ),
    case(
        "ext4 meta_bg",
        32,
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
        true,
    ),
];

/// Makes the case's image from `src`, checked clean by e2fsck, its large directory indexed.
fn make_image(c: &Case, src: &Path, img: &Path) {
    mke2fs_kib(img, c.kib, c.args, src);
    // -D indexes directories; exit status 1 means "modified", which is what -D is for.
    let out = Command::new("e2fsck")
        .arg("-fyD")
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.code().unwrap_or(8) <= 1, "e2fsck -fyD: {out:?}");
    if let Err(e) = e2fsck(img) {
        panic!(
            "{}: mke2fs made an image e2fsck does not accept:\n{e}",
            c.name
        );
    }
}

/// (a): the reader against the source tree, `rdump` and `getfattr`.
fn check_reader(
    c: &Case,
    fs: &Ext4,
    source: &Snapshot,
    attrs: &Xattrs,
    dumped: &Snapshot,
) -> Result<(), String> {
    let got = reader_snapshot(fs)?;
    if let Some(d) = difference(source, &got) {
        return Err(format!("against the source tree: {d}"));
    }
    let mut dumped = dumped.clone();
    if c.inline {
        unpad_inline(&mut dumped, &got);
    }
    if let Some(d) = difference(&dumped, &without_setid(&got)) {
        return Err(format!("against debugfs rdump: {d}"));
    }
    let got_attrs = reader_xattrs(fs)?;
    if &got_attrs != attrs {
        return Err(format!(
            "extended attributes: getfattr {attrs:?}, reader {got_attrs:?}"
        ));
    }
    Ok(())
}

/// (b): the copy — rebuilt by the writer, or the used blocks — checked by e2fsck and rdump.
fn check_copy(
    c: &Case,
    fs: &Ext4,
    img: &Path,
    work: &Path,
    dumped: &Snapshot,
) -> Result<&'static str, String> {
    let copy = work.join("copy.img");
    let obstacle = fs.rebuild_obstacle();
    if obstacle.is_none() != c.rebuilds {
        return Err(format!("unexpected rebuild obstacle: {obstacle:?}"));
    }
    // The allocation map holds exactly the blocks e2fsck counts as used, no more.
    let used = fs
        .allocation_map()
        .map_err(|e| e.to_string())?
        .used_blocks();
    let (blocks, free) = (
        dumpe2fs_field(img, "Block count"),
        dumpe2fs_field(img, "Free blocks"),
    );
    if used != blocks - free {
        return Err(format!(
            "{used} blocks mapped, dumpe2fs says {}",
            blocks - free
        ));
    }
    let how = if obstacle.is_none() {
        blank(&copy, c.kib << 10);
        write_ext4(device(&copy, true), fs, &fs.format_options())
            .map_err(|e| format!("the writer: {e}"))?;
        "rebuilt"
    } else {
        copy_used_blocks(fs, img, &copy);
        "blocks"
    };
    e2fsck(&copy).map_err(|e| format!("e2fsck -fn of the {how} copy:\n{e}"))?;
    let again = rdump(&copy, &work.join("copy-dump"));
    match difference(dumped, &again) {
        Some(d) => Err(format!("rdump of the {how} copy: {d}")),
        None => Ok(how),
    }
}

#[test]
fn mke2fs_images_read_and_copy_as_e2fsprogs_sees_them() {
    let top = tempfile::tempdir().unwrap();
    let src = top.path().join("src");
    populate(&src);
    let source = host_snapshot(&src);
    let attrs = host_xattrs(&src);
    let (mut reader_ok, mut copy_ok, mut failures) = (0, 0, Vec::new());
    for c in CASES {
        let work = tempfile::tempdir_in(top.path()).unwrap();
        let img = work.path().join("source.img");
        make_image(c, &src, &img);
        let dumped = rdump(&img, &work.path().join("dump"));
        let fs = match Ext4::open(device(&img, false)) {
            Ok(fs) => fs,
            Err(e) => {
                println!("{:<40} reader: FAIL (open: {e})", c.name);
                failures.push(format!("{}: open: {e}", c.name));
                continue;
            }
        };
        let reader = check_reader(c, &fs, &source, &attrs, &dumped);
        let copy = check_copy(c, &fs, &img, work.path(), &dumped);
        println!(
            "{:<40} reader: {:<4} copy: {}",
            c.name,
            if reader.is_ok() { "ok" } else { "FAIL" },
            match &copy {
                Ok(how) => format!("ok ({how})"),
                Err(_) => "FAIL".into(),
            }
        );
        match reader {
            Ok(()) => reader_ok += 1,
            Err(e) => failures.push(format!("{}: reader: {e}", c.name)),
        }
        match copy {
            Ok(_) => copy_ok += 1,
            Err(e) => failures.push(format!("{}: copy: {e}", c.name)),
        }
    }
    println!(
        "ext matrix: reader {reader_ok}/{n}, copy {copy_ok}/{n}",
        n = CASES.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
