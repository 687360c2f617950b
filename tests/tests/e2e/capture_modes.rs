//! Capturing a partitioned disk served by the real client, in every mode, into VHDX and qcow2:
//! qemu-img check finds nothing; the partitions taken out of the output pass e2fsck -fn and
//! fsck.fat -n, ntfs-3g's tools read the NTFS with identical content, the unknown partition and
//! the bytes after the GPT are identical, sgdisk -v is happy with the table, `--verify` finds no
//! difference, and files/blocks outputs hold little more than the used bytes.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use diskferry_e2e::fixtures::{extract, mbr_disk, place, sgdisk_last_sector, SampleDisk};
use diskferry_e2e::{diskferry, make_key, qemu_img_to_raw, run_ok, Client};

const MIB: u64 = 1 << 20;

fn read(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn every_mode_into_vhdx_and_qcow2_over_the_wire_passes_the_filesystem_checkers() {
    let disk = SampleDisk::build();
    let key = make_key(&disk.dir, "key");
    let client = Client::start(&key, &["--disk", disk.gpt.to_str().unwrap()]).unwrap();
    let source = client.source(&disk.gpt);
    let size = std::fs::metadata(&disk.gpt).unwrap().len();
    let o = &disk.gpt_offsets;
    let parts = [
        (o[0], 40 * MIB),
        (o[1], 48 * MIB),
        (o[2], 24 * MIB),
        (o[3], 4 * MIB),
    ];
    let used: u64 = {
        let (ok, out, err) =
            diskferry(&["inspect".as_ref(), disk.gpt.as_os_str(), "--json".as_ref()]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["used_bytes"].as_u64())
            .sum()
    };
    for mode in ["auto", "files", "blocks", "sectors"] {
        for format in ["vhdx", "qcow2"] {
            let out = disk.dir.join(format!("{mode}.{format}"));
            let (ok, _, err) = diskferry(&[
                "capture".as_ref(),
                source.as_ref(),
                out.as_os_str(),
                "--mode".as_ref(),
                mode.as_ref(),
                "--verify".as_ref(),
                "--key-file".as_ref(),
                key.as_os_str(),
            ]);
            assert!(ok, "{mode} → {format}: {err}");
            assert!(err.contains("verify: no differences"), "{err}");
            let check = run_ok("qemu-img", &["check", "-f", format, out.to_str().unwrap()]);
            assert!(check.contains("No errors were found"), "{check}");
            if mode == "files" || mode == "blocks" {
                // The NTFS (blocks) and the noise partition are copied whole-ish; the rest
                // holds only what is used. Formats keep some overhead (VHDX: BAT and metadata).
                let on_disk = std::fs::metadata(&out).unwrap().blocks() * 512;
                let bound = used * 105 / 100 + 2 * MIB + 8 * MIB;
                assert!(
                    on_disk <= bound,
                    "{mode} {format}: {on_disk} bytes on disk for {used} used"
                );
            }
            let raw = disk.dir.join(format!("{mode}-{format}.raw"));
            qemu_img_to_raw(&out, &raw);
            assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
            let verify = run_ok("sgdisk", &["-v", raw.to_str().unwrap()]);
            assert!(verify.contains("No problems found"), "{verify}");
            let tmp = disk.dir.join("part");
            let fat = extract(&raw, parts[0].0, parts[0].1, &tmp.with_extension("fat"));
            run_ok("fsck.fat", &["-n", fat.to_str().unwrap()]);
            let ext = extract(&raw, parts[1].0, parts[1].1, &tmp.with_extension("ext4"));
            run_ok("e2fsck", &["-fn", ext.to_str().unwrap()]);
            let ntfs = extract(&raw, parts[2].0, parts[2].1, &tmp.with_extension("ntfs"));
            let listing = |img: &Path| run_ok("ntfsls", &["-R", "-l", img.to_str().unwrap()]);
            assert_eq!(
                listing(&ntfs),
                listing(&disk.ntfs),
                "{mode} {format}: NTFS listing"
            );
            let cat = |img: &Path| {
                run_ok(
                    "ntfscat",
                    &[img.to_str().unwrap(), "Windows/System32/config/SOFTWARE"],
                )
            };
            assert_eq!(cat(&ntfs), cat(&disk.ntfs));
            assert!(
                read(&raw, parts[3].0, MIB) == read(&disk.gpt, parts[3].0, MIB),
                "unknown partition"
            );
            assert!(
                read(&raw, 64 << 10, 64 << 10) == read(&disk.gpt, 64 << 10, 64 << 10),
                "gap bytes"
            );
            assert!(read(&raw, 0, 440) == read(&disk.gpt, 0, 440), "boot code");
            std::fs::remove_file(&raw).unwrap();
        }
    }
}

#[test]
fn an_mbr_disk_captures_and_shrinks_in_files_mode() {
    let disk = SampleDisk::build();
    let mbr = disk.dir.join("mbr.img");
    let offsets = mbr_disk(&mbr, 400, [48, 16, 24, 4], ["83", "e", "7", "83"]);
    place(&mbr, offsets[0], &disk.ext4);
    place(&mbr, offsets[1], &disk.fat16);
    place(&mbr, offsets[2], &disk.ntfs);
    // Grow the last partition's space: it is an ext4 that files mode can recreate at any size.
    let last = disk.dir.join("last.ext4");
    diskferry_e2e::fixtures::ext4_image(&disk.tree, &last, 4, "last");
    place(&mbr, offsets[3], &last);
    let out = disk.dir.join("mbr-small.qcow2");
    let (ok, _, err) = diskferry(&[
        "capture".as_ref(),
        mbr.as_os_str(),
        out.as_os_str(),
        "--mode".as_ref(),
        "files".as_ref(),
        "--size".as_ref(),
        "200M".as_ref(),
        "--verify".as_ref(),
        "--progress".as_ref(),
        "json".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("verify: no differences"), "{err}");
    // --progress json: one object per line, per partition, with files counted in files mode.
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(events.iter().any(|e| e["phase"] == "part 1"), "{err}");
    assert!(
        events
            .iter()
            .all(|e| e["overall_total"].as_u64().is_none_or(|t| t > 0)),
        "{err}"
    );
    assert!(
        events.iter().any(|e| e["overall_done"].as_u64().is_some()),
        "{err}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["phase"] == "part 1" && e["files_done"].as_u64().unwrap_or(0) > 10),
        "{err}"
    );
    let raw = disk.dir.join("mbr-small.raw");
    qemu_img_to_raw(&out, &raw);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 200 * MIB);
    let dump = run_ok("sfdisk", &["-d", raw.to_str().unwrap()]);
    assert!(dump.contains("label-id: 0x12345678"), "{dump}");
    let e = extract(&raw, offsets[0], 48 * MIB, &disk.dir.join("p1.ext4"));
    run_ok("e2fsck", &["-fn", e.to_str().unwrap()]);
    let f = extract(&raw, offsets[1], 16 * MIB, &disk.dir.join("p2.fat"));
    run_ok("fsck.fat", &["-n", f.to_str().unwrap()]);
}

/// The client is killed in the middle of a capture and started again on the same port: the
/// capture reconnects, resumes, completes, and verifies.
#[test]
fn a_capture_survives_the_client_being_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    // 1.5 GiB of data so the capture is still running when the client goes.
    diskferry_e2e::make_disk(&disk, 2 << 30, &[(0, 1536 * MIB)]).unwrap();
    let key = make_key(dir.path(), "key");
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let addr = client.addr.clone();
    let source = client.source(&disk);
    let out = dir.path().join("out.qcow2");
    let capture = std::process::Command::new(diskferry_e2e::bin("diskferry"))
        .args([
            "capture",
            &source,
            out.to_str().unwrap(),
            "--mode",
            "sectors",
            "--verify",
        ])
        .arg("--key-file")
        .arg(&key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    drop(client.stop());
    std::thread::sleep(std::time::Duration::from_millis(700));
    let _again = Client::start_at(&addr, &key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let result = capture.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{err}");
    assert!(
        err.contains("reconnecting") && err.contains("reconnected"),
        "{err}"
    );
    assert!(err.contains("verify: no differences"), "{err}");
}

/// The output's filesystem fills up: a clear error that says so, and only `OUT.partial` left.
#[test]
fn a_full_output_disk_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    run_ok(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=8M",
            "tmpfs",
            small.to_str().unwrap(),
        ],
    );
    let disk = dir.path().join("disk.img");
    diskferry_e2e::make_disk(&disk, 64 * MIB, &[(0, 32 * MIB)]).unwrap();
    let out = small.join("out.qcow2");
    let (ok, _, err) = diskferry(&["capture".as_ref(), disk.as_os_str(), out.as_os_str()]);
    let leftovers: Vec<String> = std::fs::read_dir(&small)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    run_ok("umount", &[small.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("No space left on device")
            && err.contains("the disk holding the output is full"),
        "{err}"
    );
    assert_eq!(leftovers, ["out.qcow2.partial"]);
}

/// An 8 GiB disk with 1 GiB used, captured in files mode into a 2 GiB disk: the ext4 is
/// recreated smaller, passes e2fsck, and verifies file by file.
#[test]
fn an_8_gib_disk_with_1_gib_used_shrinks_into_2_gib() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..8 {
        diskferry_e2e::make_disk(
            &tree.join(format!("big{i}.bin")),
            128 * MIB,
            &[(0, 128 * MIB)],
        )
        .unwrap();
    }
    std::fs::write(tree.join("small.txt"), b"small\n").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    run_ok(
        "sgdisk",
        &["-n1:2048:0", "-t1:8300", disk.to_str().unwrap()],
    );
    let part_size = (8 << 30) - 2 * MIB - 17 * 1024;
    run_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "offset=1048576",
            "-d",
            tree.to_str().unwrap(),
            disk.to_str().unwrap(),
            &format!("{}k", part_size / 1024),
        ],
    );
    let out = dir.path().join("small.qcow2");
    let (ok, _, err) = diskferry(&[
        "capture".as_ref(),
        disk.as_os_str(),
        out.as_os_str(),
        "--mode".as_ref(),
        "files".as_ref(),
        "--size".as_ref(),
        "2G".as_ref(),
        "--verify".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("verify: no differences"), "{err}");
    let check = run_ok("qemu-img", &["check", "-f", "qcow2", out.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    let raw = dir.path().join("small.raw");
    qemu_img_to_raw(&out, &raw);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 2 << 30);
    let verify = run_ok("sgdisk", &["-v", raw.to_str().unwrap()]);
    assert!(verify.contains("No problems found"), "{verify}");
    let last = sgdisk_last_sector(&raw, 1);
    let len = (last + 1 - 2048) * 512;
    let part = extract(&raw, MIB, len, &dir.path().join("p1.ext4"));
    std::fs::remove_file(&raw).unwrap();
    run_ok("e2fsck", &["-fn", part.to_str().unwrap()]);
}
