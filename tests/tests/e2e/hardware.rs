//! Reconfiguration for other hardware (`--target-hardware`), proven by booting: the e2e
//! Debian's initramfs is stripped of its virtio disk drivers with the Debian tools themselves
//! (unmkinitramfs, depmod, cpio), so its capture drops to the initramfs shell on virtio under
//! qemu; `diskferry customize --target-hardware virtio` puts the drivers back from the
//! system's own modules and the same capture boots to its marker. lsinitramfs and debugfs
//! judge the new initramfs and the recorded module list; the capture never changes.

use std::path::Path;
use std::time::Duration;

use diskferry_e2e::debian::{
    debugfs, initramfs_listing, installer_disk, strip_virtio_disk_drivers, Boot, ROOT_MIB,
    ROOT_START_MIB,
};
use diskferry_e2e::p2v::Outcome;
use diskferry_e2e::{diskferry, fixtures, run_ok};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The root filesystem of a qcow2 capture, as a file for debugfs.
fn root_of(image: &Path, work: &Path) -> std::path::PathBuf {
    let raw = work.join("fixed.raw");
    run_ok("qemu-img", &["convert", "-O", "raw", p(image), p(&raw)]);
    fixtures::extract(
        &raw,
        ROOT_START_MIB << 20,
        ROOT_MIB << 20,
        &work.join("fixed-root.ext4"),
    )
}

#[test]
fn a_capture_lacking_virtio_drivers_boots_on_virtio_once_reconfigured() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let w = dir.path();
    let disk = installer_disk(w).disk;
    strip_virtio_disk_drivers(&disk, w);
    let capture = w.join("sata.qcow2");
    let (ok, _, err) = diskferry(&[
        "capture".as_ref(),
        disk.as_os_str(),
        capture.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = diskferry(&["inspect".as_ref(), capture.as_os_str()]);
    assert!(
        ok && out.contains("initramfs /boot/initrd.img-") && !out.contains(" virtio_blk "),
        "{out}{err}"
    );
    let before = std::fs::read(&capture).unwrap();

    let plain = Boot::start(&capture, "qcow2", &w.join("plain.log"));
    let (outcome, to_shell) = plain.outcome(Duration::from_secs(300));
    assert!(matches!(outcome, Outcome::InitramfsShell(_)), "{outcome:?}");
    eprintln!("the plain capture on virtio: initramfs shell after {to_shell:.1?}");

    let fixed = w.join("virtio.qcow2");
    let (ok, _, err) = diskferry(&[
        "customize".as_ref(),
        capture.as_os_str(),
        fixed.as_os_str(),
        "--target-hardware".as_ref(),
        "virtio".as_ref(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok && err.contains("added virtio_blk, virtio_scsi"), "{err}");
    let root = root_of(&fixed, w);
    let modules = debugfs(&root, "cat /etc/initramfs-tools/modules");
    assert!(modules.lines().any(|l| l == "virtio_blk"), "{modules}");
    let listed = initramfs_listing(&root, w);
    assert!(
        listed.contains("kernel/drivers/block/virtio_blk.ko"),
        "{listed}"
    );

    let (marker, booted) =
        Boot::start(&fixed, "qcow2", &w.join("fixed.log")).finish(Duration::from_secs(400));
    eprintln!("the reconfigured capture on virtio: marker after {booted:.1?}");
    assert!(
        marker.one("root").starts_with("/dev/vda1 ext4"),
        "{:?}",
        marker.one("root")
    );
    assert_eq!(
        std::fs::read(&capture).unwrap(),
        before,
        "the capture is only read"
    );
}
