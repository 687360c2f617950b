//! FAT written through `fatfs` plus our entry finishing: fsck.fat -n finds nothing to fix,
//! mtools lists the names, sizes, attributes and times we put in and copies out the same
//! bytes; a FAT fixture copied through the writer keeps names, attributes and times.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_e2e::fixtures::fat_image;
use diskferry_e2e::{assert_finishes_without_panic, diskferry, flip_bytes, run_ok, sh};
use diskferry_fs::fat_write::write_fat;
use diskferry_fs::{self as fs, FileKind, FsKind};

fn mtools(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fsck_clean(image: &Path) {
    let out = Command::new("fsck.fat")
        .args(["-n", image.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fsck.fat -n found problems:\n{text}");
    assert_eq!(
        text.lines().count(),
        2,
        "fsck.fat -n said more than its summary:\n{text}"
    );
}

#[test]
fn mkfs_fat_from_a_directory_passes_fsck_and_mtools_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    sh(&format!(
        r#"
        s={s}
        mkdir -p "$s/EFI/BOOT" "$s/Documents/Deep/Deeper/Deepest" "$s/Empty dir"
        printf 'bootloader' > "$s/EFI/BOOT/BOOTX64.EFI"
        head -c 1234567 /dev/urandom > "$s/Documents/Quarterly Report 2024.pdf"
        printf 'x' > "$s/Documents/Deep/Deeper/Deepest/leaf.txt"
        printf 'ünïcödé' > "$s/Documents/Résumé – final.txt"
        : > "$s/empty.txt"
        printf 'ro' > "$s/readonly.txt"; chmod 444 "$s/readonly.txt"
        touch -m -d '2015-06-07 08:09:10' "$s/Documents/Quarterly Report 2024.pdf"
        ln -s EFI "$s/a-symlink"
        "#,
        s = src.display()
    ));
    let img = dir.path().join("esp.img");
    let (ok, _, err) = diskferry(&[
        "mkfs".as_ref(),
        "fat".as_ref(),
        img.as_os_str(),
        "--from".as_ref(),
        src.as_os_str(),
        "--label".as_ref(),
        "ESP".as_ref(),
        "--uuid".as_ref(),
        "CAFE-F00D".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("skipped a-symlink: FAT cannot hold a symlink"),
        "{err}"
    );
    fsck_clean(&img);
    let i = img.to_str().unwrap();
    let info = mtools(&["minfo", "-i", i, "::"]);
    assert!(
        info.contains("serial number: CAFEF00D") && info.contains("disk label=\"ESP"),
        "{info}"
    );
    let listing = mtools(&["mdir", "-i", i, "-/", "-a", "::"]);
    for name in [
        "BOOTX64.EFI",
        "Quarterly Report 2024.pdf",
        "Résumé – final.txt",
        "leaf.txt",
        "empty.txt",
        "Empty dir",
    ] {
        assert!(listing.contains(name), "{name} missing from:\n{listing}");
    }
    assert!(
        listing.contains("2015-06-07   8:09"),
        "mtime kept:\n{listing}"
    );
    for rel in [
        "Documents/Quarterly Report 2024.pdf",
        "Documents/Résumé – final.txt",
        "EFI/BOOT/BOOTX64.EFI",
        "Documents/Deep/Deeper/Deepest/leaf.txt",
    ] {
        let out = dir.path().join("copied");
        let _ = std::fs::remove_file(&out);
        mtools(&[
            "mcopy",
            "-i",
            i,
            &format!("::/{rel}"),
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(src.join(rel)).unwrap(),
            "{rel}"
        );
    }
    let attrs = mtools(&["mattrib", "-i", i, "::/readonly.txt"]);
    assert!(
        attrs.trim_start().starts_with('A') && attrs.contains("R"),
        "{attrs}"
    );
    // Our reader agrees.
    let fs = fs::open(Arc::new(FileDevice::open(&img, false).unwrap())).unwrap();
    assert_eq!(fs.info().label, "ESP");
    assert_eq!(fs.info().uuid, "CAFE-F00D");
}

#[test]
fn a_fat_volume_copied_through_the_writer_keeps_names_attributes_and_times() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("orig.fat");
    fat_image(&original, 16, 16, "DATA16");
    let source = fs::open(Arc::new(FileDevice::open(&original, false).unwrap())).unwrap();
    let copy = dir.path().join("copy.fat");
    std::fs::File::create(&copy)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&copy, true).unwrap());
    let opts =
        match diskferry_fs::fat::Fat::open(Arc::new(FileDevice::open(&original, false).unwrap())) {
            Ok(fat) => fat.format_options(),
            Err(e) => panic!("{e}"),
        };
    assert_eq!(opts.kind, Some(FsKind::Fat16));
    let report = write_fat(Arc::clone(&dev), &*source, &opts).unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    drop(dev);
    fsck_clean(&copy);
    let copied = fs::open(Arc::new(FileDevice::open(&copy, false).unwrap())).unwrap();
    assert_eq!(copied.info().label, "DATA16");
    assert_eq!(copied.info().uuid, source.info().uuid);
    let mut count = 0;
    fs::tree::walk(
        &*source,
        source.root(),
        &mut |path, e| {
            let a = source.metadata(e.node)?;
            let b = copied.metadata(copied.lookup(path)?)?;
            assert_eq!(a.kind, b.kind, "{path}");
            assert_eq!(a.flags & 0x37, b.flags & 0x37, "{path}: attributes");
            assert_eq!(a.mtime, b.mtime, "{path}: mtime");
            assert_eq!(a.crtime, b.crtime, "{path}: creation time");
            assert_eq!(a.atime, b.atime, "{path}: access date");
            if a.kind == FileKind::File {
                assert_eq!(
                    source.read_all(e.node, 1 << 24)?,
                    copied.read_all(copied.lookup(path)?, 1 << 24)?,
                    "{path}"
                );
            }
            count += 1;
            Ok(())
        },
        &mut |p, e| panic!("{p}: {e}"),
    )
    .unwrap();
    assert_eq!(
        count, 9,
        "every entry of the fixture, /EFI/BOOT/fonts/README.TXT included"
    );
    run_ok("fsck.fat", &["-n", copy.to_str().unwrap()]);
}

#[test]
fn a_source_larger_than_size_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("big"), vec![1u8; 3 << 20]).unwrap();
    let img = dir.path().join("small.img");
    let (ok, _, err) = diskferry(&[
        "mkfs".as_ref(),
        "fat".as_ref(),
        img.as_os_str(),
        "--from".as_ref(),
        src.as_os_str(),
        "--size".as_ref(),
        "2M".as_ref(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("--size is 2.0 MiB: nothing was written"),
        "{err}"
    );
    assert!(!img.exists() && !dir.path().join("small.img.partial").exists());
}

/// A damaged FAT source copied through the writer: errors, never a panic or a hang.
#[test]
fn damaged_fat_sources_give_errors_never_panics_when_copied() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("orig.fat");
    fat_image(&original, 16, 16, "DATA16");
    let bytes = std::fs::read(&original).unwrap();
    for seed in 0..40u64 {
        let damaged = flip_bytes(&bytes, seed, 30, 256 << 10);
        assert_finishes_without_panic(&format!("copying damaged FAT, seed {seed}"), move || {
            let src: Arc<dyn BlockDevice> =
                Arc::new(diskferry_blockdev::MemoryDevice::read_only(damaged));
            if let Ok(source) = diskferry_fs::fat::Fat::open(src) {
                let dst: Arc<dyn BlockDevice> =
                    Arc::new(diskferry_blockdev::MemoryDevice::new(16 << 20));
                let _ = write_fat(
                    dst,
                    &source,
                    &diskferry_fs::fat_write::FatOptions::default(),
                );
            }
        });
    }
}
