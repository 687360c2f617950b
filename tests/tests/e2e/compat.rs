//! The compatibility check of `diskferry deploy IMAGE DISK@HOST:PORT`, against agents that
//! report a machine through a fake sysfs (`DISKFERRY_SYSFS`, see `diskferry_e2e::sysfs`):
//! - a BIOS-only capture (sfdisk MBR with syslinux's boot code) onto an agent reporting UEFI
//!   is refused before anything is written — the target's SHA-256 is unchanged — and
//!   `--force` writes it (the boot code lands on the target, `sfdisk --verify` is clean);
//! - a capture of the Debian system whose initramfs was stripped of virtio_blk with Debian's
//!   own tools, onto an agent whose disk controller is virtio (1af4:1001), is refused naming
//!   the controller and the missing module, and deploys with `--target-hardware virtio`,
//!   after which lsinitramfs finds virtio_blk in the deployed initramfs.

use std::path::Path;

use diskferry_e2e::debian::{
    initramfs_listing, installer_disk, strip_virtio_disk_drivers, DISK_MIB, ROOT_MIB,
    ROOT_START_MIB,
};
use diskferry_e2e::fixtures::{ext4_image, extract, linux_tree, place};
use diskferry_e2e::sysfs::{FakeMachine, E1000, VIRTIO_BLK};
use diskferry_e2e::{diskferry, make_key, run_ok, sh, Client};

const MIB: u64 = 1 << 20;
const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn sha(path: &Path) -> String {
    run_ok("sha256sum", &[p(path)])
}

fn capture(disk: &Path, out: &Path) {
    let (ok, _, err) = diskferry(&[
        "capture".as_ref(),
        disk.as_os_str(),
        out.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
}

/// `diskferry deploy IMAGE TARGET@CLIENT --key-file KEY [extra]`: (success, stderr).
fn deploy(
    image: &Path,
    client: &Client,
    target: &Path,
    key: &Path,
    extra: &[&str],
) -> (bool, String) {
    let source = client.source(target);
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "deploy".as_ref(),
        image.as_os_str(),
        source.as_ref(),
        "--key-file".as_ref(),
        key.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let (ok, _, err) = diskferry(&args);
    (ok, err)
}

/// A target file of `mib` MiB full of random bytes, so any write shows in its hash.
fn random_target(path: &Path, mib: u64) {
    sh(&format!("head -c {} /dev/urandom > {}", mib * MIB, p(path)));
}

/// A BIOS-only capture: an MBR disk with syslinux's boot code and one ext4 partition.
fn bios_only_capture(d: &Path) -> std::path::PathBuf {
    let tree = linux_tree(d);
    let root = d.join("root.ext4");
    ext4_image(&tree, &root, 48, "root");
    let src = d.join("bios.img");
    sh(&format!(
        "truncate -s 64M {src}\necho 'label: dos\n1MiB,,83,*' | sfdisk -q {src}\n\
         dd if={SYSLINUX_MBR} of={src} bs=440 count=1 conv=notrunc status=none",
        src = p(&src)
    ));
    place(&src, MIB, &root);
    let image = d.join("bios.qcow2");
    capture(&src, &image);
    image
}

#[test]
fn a_bios_only_image_is_refused_for_a_uefi_machine_before_any_write_and_forced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = bios_only_capture(d);
    let (ok, out, err) = diskferry(&["inspect".as_ref(), image.as_os_str()]);
    assert!(
        ok && out.contains("boots with:     BIOS only"),
        "{out}{err}"
    );

    let key = make_key(d, "key");
    let target = d.join("target.img");
    random_target(&target, 64);
    let before = sha(&target);
    let uefi = FakeMachine {
        uefi: true,
        secure_boot: Some(false),
        pci: vec![VIRTIO_BLK, E1000],
    };
    let client = Client::start_as(&key, &["--allow-write", "--disk", p(&target)], &uefi).unwrap();

    let (ok, err) = deploy(&image, &client, &target, &key, &[]);
    assert!(
        !ok,
        "a BIOS-only image was deployed onto a UEFI machine: {err}"
    );
    assert!(
        err.contains("nothing was written")
            && err.contains("boots with BIOS only")
            && err.contains("starts with UEFI")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(sha(&target), before, "the target's bytes are unchanged");

    let (ok, err) = deploy(&image, &client, &target, &key, &["--force"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("warning (--force): the image boots with BIOS only"),
        "{err}"
    );
    assert_ne!(sha(&target), before);
    let code = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        bytes[..440].to_vec()
    };
    let mbr = d.join("target-mbr.bin");
    sh(&format!(
        "dd if={} of={} bs=440 count=1 status=none",
        p(&target),
        p(&mbr)
    ));
    assert_eq!(
        code(&mbr),
        code(Path::new(SYSLINUX_MBR)),
        "syslinux's boot code deployed"
    );
    run_ok("sfdisk", &["--verify", p(&target)]);
}

#[test]
fn a_capture_without_virtio_blk_is_refused_for_a_virtio_machine_unless_reconfigured() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let w = dir.path();
    let disk = installer_disk(w).disk;
    strip_virtio_disk_drivers(&disk, w);
    let image = w.join("sata.qcow2");
    capture(&disk, &image);
    std::fs::remove_file(&disk).unwrap();
    let (ok, out, err) = diskferry(&["inspect".as_ref(), image.as_os_str()]);
    assert!(
        ok && out.contains("boots with:     BIOS only"),
        "{out}{err}"
    );

    let key = make_key(w, "key");
    let target = w.join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(DISK_MIB * MIB)
        .unwrap();
    sh(&format!(
        "head -c {} /dev/urandom | dd of={} conv=notrunc status=none",
        4 * MIB,
        p(&target)
    ));
    let before = sha(&target);
    let bios_virtio = FakeMachine {
        uefi: false,
        secure_boot: None,
        pci: vec![VIRTIO_BLK, E1000],
    };
    let client =
        Client::start_as(&key, &["--allow-write", "--disk", p(&target)], &bios_virtio).unwrap();

    let (ok, err) = deploy(&image, &client, &target, &key, &[]);
    assert!(!ok, "deployed without a virtio disk driver: {err}");
    assert!(
        err.contains("the storage controller 1af4:1001 at 0000:00:04.0, driven by virtio-pci now")
            && err.contains("needs virtio_blk")
            && err.contains("deploy with --target-hardware virtio"),
        "{err}"
    );
    assert!(!err.contains("BIOS only"), "the firmware fits: {err}");
    assert_eq!(sha(&target), before, "the target's bytes are unchanged");

    let (ok, err) = deploy(
        &image,
        &client,
        &target,
        &key,
        &["--target-hardware", "virtio"],
    );
    assert!(ok, "{err}");
    assert!(!err.contains("refused"), "{err}");
    let root = extract(
        &target,
        ROOT_START_MIB * MIB,
        ROOT_MIB * MIB,
        &w.join("deployed-root.ext4"),
    );
    run_ok("e2fsck", &["-fn", p(&root)]);
    let listed = initramfs_listing(&root, w);
    assert!(
        listed.contains("kernel/drivers/block/virtio_blk.ko"),
        "{listed}"
    );
}

#[test]
fn a_deploy_job_checks_the_machine_its_agent_announced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    std::fs::create_dir_all(data.join("captures")).unwrap();
    let image = bios_only_capture(d);
    std::fs::copy(&image, data.join("captures/bios.qcow2")).unwrap();
    let s = diskferry_e2e::http::Server::start(&data).unwrap();

    // A dial-back agent whose sysfs says: UEFI, a virtio disk, one NIC.
    let sysfs = d.join("sysfs");
    FakeMachine {
        uefi: true,
        secure_boot: Some(false),
        pci: vec![VIRTIO_BLK, E1000],
    }
    .write(&sysfs)
    .unwrap();
    let mac = "52:54:00:c0:4a:01";
    std::fs::create_dir_all(sysfs.join("class/net/eth0")).unwrap();
    std::fs::write(sysfs.join("class/net/eth0/address"), format!("{mac}\n")).unwrap();
    let target = d.join("target.img");
    random_target(&target, 64);
    let before = sha(&target);
    let mut agent = std::process::Command::new(diskferry_e2e::bin("diskferry-client"))
        .env("DISKFERRY_SYSFS", &sysfs)
        .args(["--connect", &s.agent_addr, "--allow-write", "--server-key"])
        .arg(diskferry_e2e::public_key(&data.join("server.key")))
        .args(["--disk", p(&target)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let online = || {
        s.get(&format!("/api/machines/{mac}"))
            .json()
            .get("online")
            .is_some_and(|o| o == true)
    };
    assert!(diskferry_e2e::wait_for(
        std::time::Duration::from_secs(20),
        online
    ));
    let r = s.api("POST", &format!("/api/machines/{mac}/approve"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.get(&format!("/api/machines/{mac}")).json()["identity"]["firmware"],
        "uefi"
    );

    let job = |force: bool| {
        s.run_job(&serde_json::json!({
            "kind": "deploy", "image": "bios.qcow2", "target": mac, "force": force,
        }))
    };
    let j = job(false);
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap();
    assert!(
        error.contains("does not fit the machine (nothing was written")
            && error.contains("boots with BIOS only")
            && error.contains("starts with UEFI"),
        "{error}"
    );
    assert_eq!(sha(&target), before, "the target's bytes are unchanged");
    assert_ne!(
        s.get(&format!("/api/machines/{mac}")).json()["state"],
        "failed",
        "a deploy refused before writing does not fail the machine"
    );

    let j = job(true);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(
        j["log"]
            .as_str()
            .unwrap()
            .contains("compatibility (forced)"),
        "{j}"
    );
    assert_ne!(sha(&target), before);
    let _ = agent.kill();
    let _ = agent.wait();
}
