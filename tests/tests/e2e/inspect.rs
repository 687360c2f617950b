//! Seeing inside disks: partition tables, ext4/FAT/NTFS readers and `inspect`/`ls`/`cat`/`get`,
//! against fixtures made with Debian tools (the kernel writes the ext4 content; mtools the
//! FAT; ntfs-3g the NTFS) and checked against what was put in and what those tools report.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use diskferry_blockdev::{BlockDevice, FileDevice, SliceDevice};
use diskferry_e2e::fixtures::{mbr_disk, place, SampleDisk};
use diskferry_e2e::trees::assert_fs_matches_host;
use diskferry_e2e::{
    assert_finishes_without_panic, diskferry, flip_bytes, make_key, run_ok, Client,
};
use diskferry_fs::{self as fs, FileKind, Filesystem};

const MIB: u64 = 1 << 20;

/// Fixtures shared by the tests of this file (built once per process).
fn fixtures() -> &'static SampleDisk {
    static F: OnceLock<SampleDisk> = OnceLock::new();
    F.get_or_init(SampleDisk::build)
}

fn open_fs(image: &Path) -> Box<dyn Filesystem> {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(image, false).unwrap());
    fs::open(dev).unwrap()
}

fn inspect_json(source: &str, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["inspect".as_ref(), source.as_ref(), "--json".as_ref()];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    let (ok, out, err) = diskferry(&args);
    assert!(ok, "inspect {source} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// (block count − free blocks) × block size, as dumpe2fs reports them.
fn ext4_used(image: &Path) -> u64 {
    let out = run_ok("dumpe2fs", &["-h", image.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("{name} not in dumpe2fs output"))
    };
    (field("Block count:") - field("Free blocks:")) * field("Block size:")
}

/// Clusters in use × cluster size, from `fsck.fat -n -v`.
fn fat_used(image: &Path) -> u64 {
    let out = std::process::Command::new("fsck.fat")
        .args(["-n", "-v", image.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let cluster: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_suffix(" bytes per cluster"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // "... N files, USED/TOTAL clusters"
    let used: u64 = text
        .lines()
        .find_map(|l| {
            l.split(", ")
                .nth(1)?
                .strip_suffix(" clusters")?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    used * cluster
}

/// Volume size − free space, from ntfscluster.
fn ntfs_used(image: &Path) -> u64 {
    let out = run_ok("ntfscluster", &[image.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_prefix(':'))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("{name} not in ntfscluster output:\n{out}"))
    };
    field("bytes per volume") - field("bytes of free space")
}

#[test]
fn inspect_names_every_partition_of_a_gpt_disk_locally_in_a_vhdx_and_remotely() {
    let f = fixtures();
    let gpt = f.gpt.to_str().unwrap();
    let report = inspect_json(gpt, &[]);
    assert_eq!(report["table"], "gpt");
    assert_eq!(report["disk_guid"], "11111111-2222-3333-4444-555555555555");
    let parts = report["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 4);
    let expect = [
        ("EFI System", "fat32", "ESP", fat_used(&f.fat32)),
        ("Linux filesystem", "ext4", "rootfs", ext4_used(&f.ext4)),
        (
            "Microsoft basic data",
            "ntfs",
            "WINDOWS",
            ntfs_used(&f.ntfs),
        ),
    ];
    for (i, (ty, fs_name, label, used)) in expect.iter().enumerate() {
        let p = &parts[i];
        assert_eq!(p["number"], i + 1);
        assert_eq!(p["start"], f.gpt_offsets[i]);
        assert_eq!(p["type_name"], *ty, "{p}");
        assert_eq!(p["filesystem"], *fs_name, "{p}");
        assert_eq!(p["label"], *label, "{p}");
        assert_eq!(p["used_bytes"], *used, "partition {}: {p}", i + 1);
    }
    assert_eq!(parts[3]["filesystem"], "unknown");
    assert_eq!(parts[3]["name"], "mystery");
    // The UUIDs are the ones the filesystems' own tools print.
    let blkid = |img: &Path| {
        run_ok(
            "blkid",
            &["-s", "UUID", "-o", "value", img.to_str().unwrap()],
        )
    };
    assert_eq!(parts[0]["uuid"], blkid(&f.fat32).trim());
    assert_eq!(parts[1]["uuid"], blkid(&f.ext4).trim());
    assert_eq!(parts[2]["uuid"], blkid(&f.ntfs).trim());
    // The Linux OS on partition 2, the EFI loader on partition 1.
    let os = &parts[1]["os"];
    assert_eq!(os["family"], "linux");
    assert_eq!(os["pretty_name"], "Debian GNU/Linux 12 (bookworm)");
    assert_eq!(os["version"], "12");
    assert_eq!(os["hostname"], "fixture-host");
    assert_eq!(os["kernels"][0], "vmlinuz-6.1.0-21-amd64");
    assert_eq!(os["module_dirs"][0], "6.1.0-21-amd64");
    assert_eq!(os["fstab"][0], "UUID=1234 / ext4 errors=remount-ro 0 1");
    assert_eq!(
        parts[0]["os"]["bootloaders"][0],
        "efi:/EFI/BOOT/BOOTX64.EFI"
    );
    // Windows on partition 3, from its registry hives.
    let win = &parts[2]["os"];
    assert_eq!(win["family"], "windows", "{win}");
    assert_eq!(win["name"], "Windows 10 Pro");
    assert_eq!(win["edition"], "Professional");
    assert_eq!(win["display_version"], "22H2");
    assert_eq!(win["build"], "19045");
    assert_eq!(win["hostname"], "WIN-FIXTURE");

    // The same disk inside a VHDX, and served by a client, reads the same.
    let vhdx = f.dir.join("gpt.vhdx");
    let (ok, _, err) = diskferry(&["convert".as_ref(), f.gpt.as_os_str(), vhdx.as_os_str()]);
    assert!(ok, "{err}");
    let mut from_vhdx = inspect_json(vhdx.to_str().unwrap(), &[]);
    from_vhdx["sector_size"] = report["sector_size"].clone();
    assert_eq!(from_vhdx, report);

    let keydir = tempfile::tempdir().unwrap();
    let key = make_key(keydir.path(), "key");
    let client = Client::start(&key, &["--disk", gpt]).unwrap();
    let remote = inspect_json(
        &client.source(&f.gpt),
        &["--key-file", key.to_str().unwrap()],
    );
    assert_eq!(remote, report);

    // Every file of every filesystem lists the same (long format, recursive) from the raw
    // disk, the VHDX and the client, and a file's bytes arrive the same over the wire.
    let listing = |source: &str, part: &str| {
        let (ok, out, err) = diskferry(&[
            "ls".as_ref(),
            source.as_ref(),
            "-l".as_ref(),
            "-R".as_ref(),
            "-p".as_ref(),
            part.as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
        ]);
        assert!(ok, "ls -p {part} {source}: {err}");
        out
    };
    let remote_source = client.source(&f.gpt);
    for part in ["1", "2", "3"] {
        let local = listing(gpt, part);
        assert!(local.lines().count() >= 4, "{local}");
        assert_eq!(
            listing(vhdx.to_str().unwrap(), part),
            local,
            "partition {part} in the VHDX"
        );
        assert_eq!(
            listing(&remote_source, part),
            local,
            "partition {part} over the wire"
        );
    }
    let out = std::process::Command::new(diskferry_e2e::bin("diskferry"))
        .args([
            "cat",
            &remote_source,
            "/Big File.bin",
            "-p",
            "3",
            "--key-file",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = std::fs::read(f.ntfs.with_extension("src").join("big.bin")).unwrap();
    assert!(
        out.stdout == expected,
        "cat over the wire returned different bytes"
    );
}

#[test]
fn inspect_reads_mbr_disks_with_logical_partitions() {
    let f = fixtures();
    let disk = f.dir.join("mbr.img");
    let offsets = mbr_disk(&disk, 150, [48, 16, 24, 4], ["83", "e", "7", "83"]);
    place(&disk, offsets[0], &f.ext4);
    place(&disk, offsets[1], &f.fat16);
    place(&disk, offsets[2], &f.ntfs);
    let report = inspect_json(disk.to_str().unwrap(), &[]);
    assert_eq!(report["table"], "mbr");
    assert_eq!(report["mbr_signature"], "12345678");
    // sfdisk, the independent reader, agrees on numbers, starts and sizes.
    let dump: serde_json::Value =
        serde_json::from_str(&run_ok("sfdisk", &["-J", disk.to_str().unwrap()])).unwrap();
    let theirs: Vec<(String, u64, u64)> = dump["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "5")
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let number = node.trim_start_matches(disk.to_str().unwrap()).to_string();
            (
                number,
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
            )
        })
        .collect();
    let ours: Vec<(String, u64, u64)> = report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["number"].to_string(),
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ours, theirs);
    let fs_names: Vec<&str> = report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["filesystem"].as_str().unwrap())
        .collect();
    assert_eq!(fs_names, ["ext4", "fat16", "ntfs", "unknown"]);
    assert_eq!(report["partitions"][0]["os"]["hostname"], "fixture-host");
    assert_eq!(report["partitions"][1]["label"], "DATA16");
}

#[test]
fn a_damaged_primary_gpt_falls_back_to_the_backup_and_both_damaged_is_a_clear_error() {
    let f = fixtures();
    let disk = f.dir.join("damaged-gpt.img");
    std::fs::copy(&f.gpt, &disk).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"garbage!", 512 + 24).unwrap();
    let report = inspect_json(disk.to_str().unwrap(), &[]);
    assert_eq!(report["partitions"].as_array().unwrap().len(), 4);
    assert!(
        report["warnings"][0]
            .as_str()
            .unwrap()
            .contains("primary GPT header is unusable"),
        "{report}"
    );
    let last = file.metadata().unwrap().len() - 512;
    std::os::unix::fs::FileExt::write_all_at(&file, b"garbage!", last + 24).unwrap();
    let (ok, _, err) = diskferry(&["inspect".as_ref(), disk.as_os_str()]);
    assert!(!ok);
    assert!(
        err.contains("neither GPT header is valid") || err.contains("primary GPT"),
        "{err}"
    );
}

#[test]
fn ext4_names_modes_owners_times_links_xattrs_acls_and_bytes_read_back_as_put_in() {
    let f = fixtures();
    assert_fs_matches_host(&*open_fs(&f.ext4), &f.tree);
    // The same filesystem inside a partition of a VHDX.
    let vhdx = f.dir.join("ext4-gpt.vhdx");
    let (ok, _, err) = diskferry(&["convert".as_ref(), f.gpt.as_os_str(), vhdx.as_os_str()]);
    assert!(ok || err.contains("exists"), "{err}");
    let (_, disk) = diskferry_vdisk::open_image(&vhdx, false).unwrap();
    let part = SliceDevice::new(disk, f.gpt_offsets[1], 48 * MIB).unwrap();
    assert_fs_matches_host(&*fs::open(Arc::new(part)).unwrap(), &f.tree);
}

#[test]
fn ext4_volume_info_and_allocation_map_match_e2fsprogs() {
    let f = fixtures();
    let fs = open_fs(&f.ext4);
    let info = fs.info();
    assert_eq!(info.label, "rootfs");
    assert_eq!(info.used_bytes, ext4_used(&f.ext4));
    // The allocation map counts what the block bitmaps mark (the free-block ranges dumpe2fs
    // lists per group are the complement).
    let map = fs.allocation_map().unwrap();
    let total = info.total_bytes / u64::from(map.block_size);
    let out = run_ok("dumpe2fs", &[f.ext4.to_str().unwrap()]);
    let free: u64 = out
        .lines()
        .filter_map(|l| l.strip_prefix("  Free blocks: "))
        .flat_map(|ranges| {
            ranges
                .split(", ")
                .filter(|r| !r.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1,
            None => 1,
        })
        .sum();
    assert_eq!(map.used_blocks(), total - free);
}

#[test]
fn fat_names_attributes_times_and_bytes_read_back() {
    let f = fixtures();
    for (image, kind, label) in [(&f.fat32, "fat32", "ESP"), (&f.fat16, "fat16", "DATA16")] {
        let fs = open_fs(image);
        let info = fs.info();
        assert_eq!((info.kind.name(), info.label.as_str()), (kind, label));
        assert_eq!(info.used_bytes, fat_used(image));
        let root: Vec<String> = fs
            .read_dir(fs.root())
            .unwrap()
            .iter()
            .map(|e| e.name_lossy())
            .collect();
        assert_eq!(root, ["EFI", "Empty", "A Long File Name.bin", "SHORT.TXT"]);
        let src = image.with_extension("src");
        let long = fs.lookup("/A Long File Name.bin").unwrap();
        assert_eq!(
            fs.read_all(long, 1 << 20).unwrap(),
            std::fs::read(src.join("data.bin")).unwrap()
        );
        let m = fs.metadata(long).unwrap();
        assert_eq!(m.flags & 0x06, 0x06, "hidden and system");
        let short = fs.metadata(fs.lookup("/SHORT.TXT").unwrap()).unwrap();
        assert_eq!(short.flags & 1, 1, "read-only");
        assert_eq!(short.mode, 0o444);
        // mtools stamps the source file's modification time (2-second resolution).
        let host = std::fs::metadata(src.join("short.txt")).unwrap();
        let mtime = short.mtime.unwrap().secs;
        assert!(
            (mtime - host.mtime()).abs() <= 2,
            "{mtime} vs {}",
            host.mtime()
        );
        let efi = fs.lookup("/EFI/BOOT/BOOTX64.EFI").unwrap();
        assert_eq!(fs.read_all(efi, 100).unwrap(), b"efi binary");
        let zero = fs.metadata(fs.lookup("/Empty/zero.txt").unwrap()).unwrap();
        assert_eq!((zero.kind, zero.size), (FileKind::File, 0));
    }
}

#[test]
fn ntfs_names_streams_security_and_bytes_read_back() {
    let f = fixtures();
    let fs = open_fs(&f.ntfs);
    let info = fs.info();
    assert_eq!(info.label, "WINDOWS");
    assert_eq!(info.used_bytes, ntfs_used(&f.ntfs));
    let mut names: Vec<String> = fs
        .read_dir(fs.root())
        .unwrap()
        .iter()
        .map(|e| e.name_lossy())
        .collect();
    names.sort();
    assert_eq!(names, ["Big File.bin", "Windows", "hello.txt"]);
    // A hard link made through ntfs-3g: one record under two names, link count 2.
    let link = fs.lookup("/Windows/big-link.bin").unwrap();
    assert_eq!(link, fs.lookup("/Big File.bin").unwrap());
    assert_eq!(fs.metadata(link).unwrap().links, 2);
    // A file's own descriptor is the one the ntfs-3g driver gives as system.ntfs_acl.
    let hive = fs.lookup("/Windows/System32/config/SOFTWARE").unwrap();
    let sd = fs.security_descriptor(hive).unwrap().expect("a descriptor");
    let mnt = f.dir.join("ntfs-ro");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok(
        "ntfs-3g",
        &["-o", "ro", f.ntfs.to_str().unwrap(), mnt.to_str().unwrap()],
    );
    let acl = std::process::Command::new("getfattr")
        .args(["-n", "system.ntfs_acl", "-e", "hex", "--absolute-names"])
        .arg(mnt.join("Windows/System32/config/SOFTWARE"))
        .output()
        .unwrap();
    run_ok("umount", &[mnt.to_str().unwrap()]);
    let hex: String = sd.iter().map(|b| format!("{b:02x}")).collect();
    let theirs = String::from_utf8_lossy(&acl.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("system.ntfs_acl=").map(String::from))
        .unwrap_or_default();
    assert_eq!(theirs, format!("0x{hex}"));
    // $MFTMirr (record 1) has no descriptor of its own, only security ID 256 (ntfsinfo says
    // so): it comes from $Secure:$SDS, a self-relative descriptor.
    let info = run_ok("ntfsinfo", &["-v", "-i", "1", f.ntfs.to_str().unwrap()]);
    assert!(
        info.contains("Security ID:\t\t 256") && !info.contains("$SECURITY_DESCRIPTOR (0x50)"),
        "{info}"
    );
    let shared = fs
        .security_descriptor(1)
        .unwrap()
        .expect("the descriptor of ID 256");
    let control = u16::from_le_bytes([shared[2], shared[3]]);
    assert!(shared[0] == 1 && control & 0x8000 != 0, "{shared:?}");
    let src = f.ntfs.with_extension("src");
    let big = fs.lookup("/Big File.bin").unwrap();
    assert_eq!(
        fs.read_all(big, 1 << 22).unwrap(),
        std::fs::read(src.join("big.bin")).unwrap()
    );
    let extents = fs.extents(big).unwrap();
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 2_000_000);
    let hello = fs.lookup("/hello.txt").unwrap();
    assert_eq!(
        fs.xattrs(hello).unwrap(),
        [(
            "ntfs.stream.Zone.Identifier".to_string(),
            b"hidden stream\n".to_vec()
        )]
    );
    let sd = fs
        .security_descriptor(hello)
        .unwrap()
        .expect("ntfscp writes one");
    assert_eq!(sd[0], 1, "security descriptor revision 1");
    let m = fs.metadata(hello).unwrap();
    assert_eq!((m.size, m.links), (11, 1));
}

#[test]
fn ls_cat_and_get_work_on_a_partition_through_the_cli() {
    let f = fixtures();
    let gpt = f.gpt.as_os_str();
    let (ok, out, err) = diskferry(&[
        "ls".as_ref(),
        gpt,
        "-p".as_ref(),
        "2".as_ref(),
        "/home/alice".as_ref(),
        "-l".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("lrwxrwxrwx") && out.contains("fast-link -> hello.txt"),
        "{out}"
    );
    assert!(out.contains("-rwsr-xr-x"), "setuid shown: {out}");
    let (ok, out, _) = diskferry(&[
        "cat".as_ref(),
        gpt,
        "/etc/os-release".as_ref(),
        "-p".as_ref(),
        "2".as_ref(),
    ]);
    assert!(ok && out.contains("VERSION_ID=\"12\""), "{out}");
    // Without -p: the first readable filesystem (the ESP).
    let (ok, out, _) = diskferry(&["ls".as_ref(), gpt, "-R".as_ref()]);
    assert!(ok && out.contains("EFI/BOOT/BOOTX64.EFI"), "{out}");
    let (ok, _, err) = diskferry(&["ls".as_ref(), gpt, "-p".as_ref(), "9".as_ref()]);
    assert!(
        !ok && err.contains("no partition 9") && err.contains("2 (ext4)"),
        "{err}"
    );
    // get: the whole home directory, with modes and nanosecond mtimes.
    let out_dir = f.dir.join("got");
    let (ok, _, err) = diskferry(&[
        "get".as_ref(),
        gpt,
        "-p".as_ref(),
        "2".as_ref(),
        "/home/alice".as_ref(),
        out_dir.as_os_str(),
    ]);
    assert!(ok || err.contains("is not copied out"), "{err}");
    for rel in [
        "hello.txt",
        "docs/report.bin",
        "report-link.bin",
        "sparse.img",
        "empty",
    ] {
        let (a, b) = (f.tree.join("home/alice").join(rel), out_dir.join(rel));
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{rel}"
        );
        let (ma, mb) = (
            std::fs::metadata(&a).unwrap(),
            std::fs::metadata(&b).unwrap(),
        );
        assert_eq!(
            ma.permissions().mode() & 0o7777,
            mb.permissions().mode() & 0o7777,
            "{rel}: mode"
        );
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "{rel}: mtime"
        );
    }
    assert_eq!(
        std::fs::read_link(out_dir.join("fast-link")).unwrap(),
        Path::new("hello.txt")
    );
}

/// Flips random bytes in the first MiB of `image` (where the metadata lives) and walks the
/// result on a thread: it must finish in bounded time and never panic.
fn fuzz_walk(image: &Path, rounds: u64) {
    let original = std::fs::read(image).unwrap();
    for seed in 0..rounds {
        let bytes = flip_bytes(&original, seed, 40, MIB as usize);
        let dev: Arc<dyn BlockDevice> =
            Arc::new(diskferry_blockdev::MemoryDevice::read_only(bytes));
        let what = format!("walking {} with seed {seed}", image.display());
        assert_finishes_without_panic(&what, move || {
            if let Ok(fs) = fs::open(dev) {
                let _ = fs.allocation_map();
                let _ = fs::tree::walk(
                    &*fs,
                    fs.root(),
                    &mut |_, e| {
                        if let Ok(m) = fs.metadata(e.node) {
                            if m.kind == FileKind::File {
                                let _ = fs.read_all(e.node, 16 << 20);
                            }
                        }
                        let _ = fs.xattrs(e.node);
                        let _ = fs.read_link(e.node);
                        Ok(())
                    },
                    &mut |_, _| {},
                );
            }
        });
    }
}

#[test]
fn random_byte_flips_give_errors_never_panics_or_hangs() {
    let f = fixtures();
    for image in [&f.ext4, &f.fat32, &f.fat16, &f.ntfs] {
        fuzz_walk(image, 40);
    }
}

/// `diskferry cat … | head -c 1`: the reader closes the pipe early; the command ends quietly
/// with the shell's closed-pipe status (141), no panic and no error message.
#[test]
fn a_reader_closing_the_pipe_early_ends_the_command_quietly() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    // Far more than a pipe holds, so the writer meets the closed end.
    std::fs::write(tree.join("big"), vec![b'x'; 4 << 20]).unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mk = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&img)
        .status()
        .unwrap();
    assert!(mk.success());
    let mut child = std::process::Command::new(diskferry_e2e::bin("diskferry"))
        .arg("cat")
        .arg(&img)
        .arg("/big")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "stderr: {err}");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);
}
