//! Our ext4 writer, judged by e2fsprogs and the kernel: `e2fsck -fn` finds nothing, the
//! kernel mounts the image and rsync (-aHAXc: content, modes, owners, ACLs, xattrs, hard links,
//! devices) finds no difference from the source tree; nanosecond times, holes and our own
//! reader agree too. A filesystem copied from an ext4 source keeps its inode flags.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_e2e::fixtures::{ext4_image, linux_tree};
use diskferry_e2e::trees::assert_fs_matches_host;
use diskferry_e2e::{assert_finishes_without_panic, diskferry, flip_bytes, run_ok, sh};
use diskferry_fs as fs;
use diskferry_fs::ext4::write::write_ext4;

const GIB: u64 = 1 << 30;

/// e2fsck -fn must find nothing: exit 0 and only its pass headers and summary.
fn e2fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn", image.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let noise: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("Pass ") && !l.starts_with("e2fsck ") && !l.contains(" files ("))
        .collect();
    assert!(
        out.status.success() && noise.is_empty(),
        "e2fsck -fn:\n{text}"
    );
}

/// Every time of every entry below `root`: (atime, mtime, ctime) in nanoseconds.
fn times(root: &Path) -> HashMap<PathBuf, (i128, i128, i128)> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                (
                    ns(m.atime(), m.atime_nsec()),
                    ns(m.mtime(), m.mtime_nsec()),
                    ns(m.ctime(), m.ctime_nsec()),
                ),
            );
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// A mount of `image` (read-only) for the duration of a closure.
fn with_mount(image: &Path, f: impl FnOnce(&Path)) {
    let mnt = image.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok(
        "mount",
        &[
            "-o",
            "loop,ro",
            image.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ],
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mnt)));
    run_ok("umount", &[mnt.to_str().unwrap()]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn mkfs_ext4_from_a_tree_passes_e2fsck_and_the_kernel_sees_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    let tree = linux_tree(dir.path());
    // More of what users have: a 5 GiB sparse file, deep paths, unicode names, a name that is
    // not UTF-8, a large directory.
    sh(&format!(
        r#"
        t={t}
        truncate -s 5G $t/var/disk.img
        printf 'tail' | dd of=$t/var/disk.img bs=1 seek=5000000000 conv=notrunc status=none
        mkdir -p $t/deep/$(seq -s / 1 60)
        echo bottom > $t/deep/$(seq -s / 1 60)/file
        mkdir -p "$t/srv/Ünïcödé ✓ 日本語"
        echo hi > "$t/srv/Ünïcödé ✓ 日本語/ファイル.txt"
        mkdir $t/srv/many
        for i in $(seq 1 3000); do : > $t/srv/many/entry-with-a-longer-name-$i; done
        chattr +A $t/etc/fstab
        "#,
        t = tree.display()
    ));
    std::fs::write(
        tree.join(std::ffi::OsStr::from_bytes(b"srv/bad\xffname\n")),
        b"odd",
    )
    .unwrap();
    // Reading a directory for the first time moves its access time (relatime); read them all
    // once so the snapshot below is what the writer will see.
    times(&tree);
    let before = times(&tree);
    let img = dir.path().join("out.ext4");
    let (ok, _, err) = diskferry(&[
        "mkfs".as_ref(),
        "ext4".as_ref(),
        img.as_os_str(),
        "--from".as_ref(),
        tree.as_os_str(),
        "--label".as_ref(),
        "rootfs".as_ref(),
        "--uuid".as_ref(),
        "0a1b2c3d-4e5f-4061-8273-94a5b6c7d8e9".as_ref(),
    ]);
    assert!(ok, "{err}");
    e2fsck_clean(&img);
    let header = run_ok("dumpe2fs", &["-h", img.to_str().unwrap()]);
    assert!(
        header.contains("0a1b2c3d-4e5f-4061-8273-94a5b6c7d8e9"),
        "{header}"
    );
    assert!(
        header.contains("Filesystem volume name:   rootfs"),
        "{header}"
    );
    for feature in [
        "has_journal",
        "ext_attr",
        "dir_index",
        "filetype",
        "extent",
        "64bit",
        "flex_bg",
        "sparse_super",
        "large_file",
        "huge_file",
        "dir_nlink",
        "extra_isize",
        "metadata_csum",
    ] {
        assert!(header.contains(feature), "{feature} missing:\n{header}");
    }
    // Sparse: the image holds about the data, not the 5 GiB file's apparent size.
    let on_disk = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(on_disk < 64 << 20, "{on_disk} bytes on disk");

    with_mount(&img, |mnt| {
        let out = Command::new("rsync")
            .args(["-n", "-aHAXc", "--itemize-changes", "--delete"])
            .arg(format!("{}/", tree.display()))
            .arg(format!("{}/", mnt.display()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let diffs: Vec<&str> = text.lines().filter(|l| !l.contains("lost+found")).collect();
        assert!(
            out.status.success() && diffs.is_empty(),
            "rsync found differences:\n{text}"
        );
        let after = times(mnt);
        for (path, (a, m, c)) in &before {
            let (a2, m2, c2) = after[path];
            assert_eq!(m, &m2, "{}: mtime", path.display());
            assert_eq!(a, &a2, "{}: atime", path.display());
            assert_eq!(c, &c2, "{}: ctime", path.display());
        }
        let flags = run_ok("lsattr", &[mnt.join("etc/fstab").to_str().unwrap()]);
        assert!(flags.starts_with("-------A"), "noatime flag kept: {flags}");
        let sparse = std::fs::metadata(mnt.join("var/disk.img")).unwrap();
        assert_eq!(sparse.len(), 5 * GIB);
        assert!(sparse.blocks() * 512 <= 8192, "the hole stays a hole");
    });
    // Our reader agrees with the tree.
    let fs = fs::open(Arc::new(FileDevice::open(&img, false).unwrap())).unwrap();
    assert_fs_matches_host(&*fs, &tree);
}

/// dumpe2fs's view of the parameters a copy must keep.
fn identity(image: &Path) -> Vec<String> {
    let header = run_ok("dumpe2fs", &["-h", image.to_str().unwrap()]);
    header
        .lines()
        .filter(|l| {
            [
                "Filesystem UUID:",
                "Filesystem volume name:",
                "Directory Hash Seed:",
                "Block size:",
                "Inode size:",
                "Total journal size:",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(String::from)
        .collect()
}

#[test]
fn an_ext4_copied_through_the_writer_keeps_identity_and_inode_flags_at_any_size_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let tree = linux_tree(dir.path());
    let original = dir.path().join("orig.ext4");
    ext4_image(&tree, &original, 64, "orig");
    // An immutable file and an append-only one, set through the kernel.
    let mnt = dir.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "mount -o loop {img} {m}; chattr +i {m}/etc/hostname; chattr +a {m}/etc/fstab; umount {m}",
        img = original.display(),
        m = mnt.display()
    ));
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&original, false).unwrap());
    let source = diskferry_fs::ext4::Ext4::open(dev).unwrap();
    let want = identity(&original);
    assert_eq!(want.len(), 6, "{want:?}");
    // Smaller, equal and larger than the source: capacity matching.
    for mib in [24u64, 64, 200] {
        let copy = dir.path().join(format!("copy-{mib}.ext4"));
        std::fs::File::create(&copy)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&copy, true).unwrap());
        let mut opts = source.format_options();
        opts.min_inodes = opts.min_inodes.min((mib << 20) / 16384);
        let report = write_ext4(Arc::clone(&dev), &source, &opts).unwrap();
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        drop(dev);
        e2fsck_clean(&copy);
        assert_eq!(identity(&copy), want, "{mib} MiB copy");
        let stat = run_ok(
            "debugfs",
            &["-R", "stat /etc/hostname", copy.to_str().unwrap()],
        );
        assert!(
            stat.contains("Flags: 0x80010"),
            "immutable + extents:\n{stat}"
        );
        let stat = run_ok(
            "debugfs",
            &["-R", "stat /etc/fstab", copy.to_str().unwrap()],
        );
        assert!(
            stat.contains("Flags: 0x80020"),
            "append-only + extents:\n{stat}"
        );
        let copied = fs::open(Arc::new(FileDevice::open(&copy, false).unwrap())).unwrap();
        assert_fs_matches_host(&*copied, &tree);
    }
}

#[test]
fn a_tree_too_big_for_size_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("big"), vec![7u8; 20 << 20]).unwrap();
    let img = dir.path().join("small.ext4");
    let (ok, _, err) = diskferry(&[
        "mkfs".as_ref(),
        "ext4".as_ref(),
        img.as_os_str(),
        "--from".as_ref(),
        src.as_os_str(),
        "--size".as_ref(),
        "16M".as_ref(),
    ]);
    assert!(!ok);
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!img.exists() && !dir.path().join("small.ext4.partial").exists());
}

#[test]
fn a_hundred_thousand_files_and_a_twenty_thousand_entry_directory_get_hash_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    sh(&format!(
        r#"
        t={t}
        mkdir -p $t/big
        cd $t/big && seq 1 20000 | sed 's/^/entry-/' | xargs touch
        for d in $(seq 1 80); do mkdir $t/d$d; (cd $t/d$d && seq 1 1000 | xargs touch); done
        "#,
        t = tree.display()
    ));
    let img = dir.path().join("many.ext4");
    let (ok, _, err) = diskferry(&[
        "mkfs".as_ref(),
        "ext4".as_ref(),
        img.as_os_str(),
        "--from".as_ref(),
        tree.as_os_str(),
    ]);
    assert!(ok, "{err}");
    e2fsck_clean(&img);
    let htree = run_ok("debugfs", &["-R", "htree /big", img.to_str().unwrap()]);
    assert!(htree.contains("Hash Version: 1"), "{htree}");
    with_mount(&img, |mnt| {
        assert_eq!(std::fs::read_dir(mnt.join("big")).unwrap().count(), 20000);
        // Lookups go through the index.
        assert!(mnt.join("big/entry-12345").exists());
        assert!(!mnt.join("big/entry-20001").exists());
        let total: usize = (1..=80)
            .map(|d| {
                std::fs::read_dir(mnt.join(format!("d{d}")))
                    .unwrap()
                    .count()
            })
            .sum();
        assert_eq!(total, 80_000);
    });
    let fs = fs::open(Arc::new(FileDevice::open(&img, false).unwrap())).unwrap();
    let big = fs.lookup("/big").unwrap();
    assert_eq!(fs.read_dir(big).unwrap().len(), 20000);
}

/// Random trees — names with unusual bytes, empty/small/large/sparse files, hard links,
/// symlinks, nested directories, xattrs — written with our writer: e2fsck finds nothing and
/// our reader reads back what the tree holds.
#[test]
fn random_trees_pass_e2fsck_and_read_back() {
    use rand::{Rng, SeedableRng};
    use std::os::unix::ffi::OsStringExt;
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let mut dirs = vec![tree.clone()];
        let mut files: Vec<PathBuf> = Vec::new();
        for i in 0..300 {
            let parent = dirs[rng.gen_range(0..dirs.len())].clone();
            let len = rng.gen_range(1..40);
            let mut name: Vec<u8> = (0..len)
                .map(|_| match rng.gen_range(0..10) {
                    0 => rng.gen_range(0x80..=0xff),
                    1 => b' ',
                    _ => rng.gen_range(b'a'..=b'z'),
                })
                .collect();
            name.extend_from_slice(format!("-{i}").as_bytes());
            let path = parent.join(std::ffi::OsString::from_vec(name));
            match rng.gen_range(0..10) {
                0..=1 => {
                    std::fs::create_dir(&path).unwrap();
                    dirs.push(path);
                }
                2 if !files.is_empty() => {
                    std::fs::hard_link(&files[rng.gen_range(0..files.len())], &path).unwrap();
                }
                3 => {
                    let target = "t/".repeat(rng.gen_range(1..60));
                    std::os::unix::fs::symlink(target, &path).unwrap();
                }
                4 => {
                    let f = std::fs::File::create(&path).unwrap();
                    f.set_len(rng.gen_range(1..64) << 20).unwrap();
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(b"island", rng.gen_range(0..1 << 20))
                        .unwrap();
                    files.push(path);
                }
                _ => {
                    let size = [0, 1, 4095, 4096, 4097, 100_000][rng.gen_range(0..6)];
                    let data: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
                    std::fs::write(&path, data).unwrap();
                    if rng.gen_bool(0.3) {
                        let value = "v".repeat(rng.gen_range(1..2000));
                        let st = Command::new("setfattr")
                            .args(["-n", "user.k", "-v", &value])
                            .arg(&path)
                            .status()
                            .unwrap();
                        assert!(st.success());
                    }
                    files.push(path);
                }
            }
        }
        let img = dir.path().join("random.ext4");
        let (ok, _, err) = diskferry(&[
            "mkfs".as_ref(),
            "ext4".as_ref(),
            img.as_os_str(),
            "--from".as_ref(),
            tree.as_os_str(),
        ]);
        assert!(ok, "seed {seed}: {err}");
        e2fsck_clean(&img);
        let fs = fs::open(Arc::new(FileDevice::open(&img, false).unwrap())).unwrap();
        let mut count = 0;
        fs::tree::walk(
            &*fs,
            fs.root(),
            &mut |path, e| {
                count += 1;
                let m = fs.metadata(e.node)?;
                if m.kind == fs::FileKind::File && m.size <= 100_000 {
                    let host =
                        std::fs::read(tree.join(std::ffi::OsStr::from_bytes(path.as_bytes())))
                            .unwrap_or_default();
                    if !path.contains('\u{fffd}') {
                        assert_eq!(fs.read_all(e.node, 1 << 20)?, host, "seed {seed}: {path}");
                    }
                }
                Ok(())
            },
            &mut |p, e| panic!("seed {seed}: {p}: {e}"),
        )
        .unwrap();
        assert_eq!(count, 301, "seed {seed}: every entry plus lost+found");
    }
}

/// A damaged source filesystem (random byte flips in its metadata) copied through the writer:
/// errors for what cannot be read, never a panic or a hang.
#[test]
fn damaged_sources_give_errors_never_panics_when_copied() {
    let dir = tempfile::tempdir().unwrap();
    let tree = linux_tree(dir.path());
    let original = dir.path().join("orig.ext4");
    ext4_image(&tree, &original, 32, "orig");
    let bytes = std::fs::read(&original).unwrap();
    for seed in 0..25u64 {
        let damaged = flip_bytes(&bytes, seed, 30, 1 << 20);
        assert_finishes_without_panic(&format!("copying damaged ext4, seed {seed}"), move || {
            let src: Arc<dyn BlockDevice> =
                Arc::new(diskferry_blockdev::MemoryDevice::read_only(damaged));
            if let Ok(source) = diskferry_fs::ext4::Ext4::open(src) {
                let dst: Arc<dyn BlockDevice> =
                    Arc::new(diskferry_blockdev::MemoryDevice::new(64 << 20));
                let mut opts = source.format_options();
                opts.min_inodes = opts.min_inodes.min(4096);
                let _ = write_ext4(dst, &source, &opts);
            }
        });
    }
}
