//! Deploying an image onto a plain listening client's disk over loopback: onto a smaller blank
//! disk (the last partition shrinks), checked by sgdisk -v, e2fsck -fn, fsck.fat -n and the
//! kernel's loop mount against the original tree; a disk too small is refused before anything
//! is written, with the numbers; a client without --allow-write is refused.

use std::path::Path;

use diskferry_e2e::fixtures::{esp_root_disk, extract, gpt_partition_range, linux_tree};
use diskferry_e2e::{diskferry, make_key, run_ok, sh, Client};

const MIB: u64 = 1 << 20;

fn sha(path: &Path) -> String {
    run_ok("sha256sum", &[path.to_str().unwrap()])
}

#[test]
fn an_image_deploys_onto_a_smaller_disk_of_a_listening_client_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Source: GPT, a FAT32 ESP and an ext4 root (last, so it can shrink), captured to VHDX.
    let tree = linux_tree(d);
    let src = d.join("src.img");
    let (ext4, offsets) = esp_root_disk(&src, &tree, 140);
    let image = d.join("golden.vhdx");
    let (ok, _, err) = diskferry(&["capture".as_ref(), src.as_os_str(), image.as_os_str()]);
    assert!(ok, "{err}");

    // Target: a blank 100 MiB disk, served writable.
    let key = make_key(d, "key");
    let target = d.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(100 * MIB)
        .unwrap();
    let client =
        Client::start(&key, &["--allow-write", "--disk", target.to_str().unwrap()]).unwrap();
    let (ok, _, err) = diskferry(&[
        "deploy".as_ref(),
        image.as_os_str(),
        client.source(&target).as_ref(),
        "--key-file".as_ref(),
        key.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("no differences"), "{err}");

    // Independent checks of what landed on the target.
    let v = run_ok("sgdisk", &["-v", target.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
    let (o1, l1) = gpt_partition_range(&target, 1);
    let (o2, l2) = gpt_partition_range(&target, 2);
    assert_eq!(o1, offsets[0], "partitions keep their places");
    assert!(
        o2 + l2 <= 100 * MIB && l2 < 96 * MIB,
        "the root shrank to fit"
    );
    let esp = extract(&target, o1, l1, &d.join("t-esp"));
    run_ok("fsck.fat", &["-n", esp.to_str().unwrap()]);
    let root = extract(&target, o2, l2, &d.join("t-root"));
    run_ok("e2fsck", &["-fn", root.to_str().unwrap()]);
    let uuid = |p: &Path| run_ok("blkid", &["-s", "UUID", "-o", "value", p.to_str().unwrap()]);
    assert_eq!(uuid(&root), uuid(&ext4), "same filesystem identity");
    let mnt = d.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -o loop,ro {r} {m}; trap 'umount {m}' EXIT; \
         out=$(rsync -n -aHAXc --delete --exclude=/lost+found --out-format='%n' {t}/ {m}/); \
         [ -z \"$out\" ] || {{ echo \"differs: $out\" >&2; exit 1; }}",
        r = root.display(),
        m = mnt.display(),
        t = tree.display()
    ));
    let (ok, _, err) = diskferry(&["verify".as_ref(), image.as_os_str(), target.as_os_str()]);
    assert!(ok, "{err}");

    // Too small: refused with the numbers, nothing written.
    let tiny = d.join("tiny.img");
    std::fs::File::create(&tiny)
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    let before = sha(&tiny);
    let tiny_client =
        Client::start(&key, &["--allow-write", "--disk", tiny.to_str().unwrap()]).unwrap();
    let (ok, _, err) = diskferry(&[
        "deploy".as_ref(),
        image.as_os_str(),
        tiny_client.source(&tiny).as_ref(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ]);
    assert!(
        !ok && err.contains("too small") && err.contains("partition 2"),
        "{err}"
    );
    assert_eq!(sha(&tiny), before, "nothing was written");

    // A client that does not allow writes.
    let ro = d.join("ro.img");
    std::fs::File::create(&ro)
        .unwrap()
        .set_len(100 * MIB)
        .unwrap();
    let ro_client = Client::start(&key, &["--disk", ro.to_str().unwrap()]).unwrap();
    let (ok, _, err) = diskferry(&[
        "deploy".as_ref(),
        image.as_os_str(),
        ro_client.source(&ro).as_ref(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ]);
    assert!(!ok && err.contains("--allow-write"), "{err}");
}
