//! Reconfiguration for other hardware (issue 18): the P2V fixture — a Debian on an AHCI disk
//! whose initramfs holds only the AHCI driver and whose network is pinned to its MAC — is
//! proved first: captured plainly with `diskferry capture`, it boots under QEMU TCG on AHCI to
//! its marker (network up on its MAC, ahci loaded), and on virtio-blk its initramfs cannot find
//! the root and drops to its shell.

use std::path::Path;
use std::time::Duration;

use diskferry_e2e::debian::Marker;
use diskferry_e2e::p2v::{ahci_disk, boot, Controller, Nic, Outcome, P2vDisk, HOSTNAME};
use diskferry_e2e::{diskferry, run_ok};

/// A TCG boot takes a minute or two alone; CI runs other tests beside it.
const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// The MAC of the virtual machine the capture moves to: not the one its network is pinned to.
const VM_MAC: &str = "52:54:00:d1:5c:02";

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A plain capture into qcow2 by the real CLI, checked by qemu-img.
fn capture(disk: &P2vDisk, out: &Path) {
    let (ok, stdout, stderr) = diskferry(&[
        "capture".as_ref(),
        disk.disk.as_os_str(),
        out.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "capture failed:\n{stdout}{stderr}");
    let check = run_ok("qemu-img", &["check", "-f", "qcow2", p(out)]);
    assert!(check.contains("No errors were found"), "{check}");
}

/// The marker of the machine on its own hardware: its name, root by UUID on the AHCI disk,
/// the AHCI driver loaded, DHCP's address (qemu's user network gives 10.0.2.15) on its NIC.
fn assert_home_marker(marker: &Marker) {
    assert_eq!(marker.one("hostname"), HOSTNAME);
    assert_eq!(marker.one("uuid"), diskferry_e2e::p2v::ROOT_UUID);
    assert_eq!(marker.one("root"), "/dev/sda1 ext4", "{:?}", marker.lines);
    let modules: Vec<&str> = marker.one("modules").split(',').collect();
    assert!(modules.contains(&"ahci"), "{modules:?}");
    assert!(!modules.contains(&"virtio_blk"), "{modules:?}");
    let addr = marker.one("addr");
    let nic = addr
        .split(';')
        .find(|l| !l.starts_with("lo ") && l.contains(" 10.0.2.15/24"));
    assert!(nic.is_some(), "no DHCP address on the NIC: {addr}");
    assert_eq!(marker.all("hostkey").len(), 3, "{:?}", marker.lines);
    assert_eq!(marker.one("machine-id").len(), 32, "{:?}", marker.lines);
}

#[test]
fn the_p2v_fixture_boots_on_ahci_and_drops_to_the_initramfs_shell_on_virtio() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let disk = ahci_disk(w);
    eprintln!(
        "fixture: kernel {}, cache built: {}, initramfs modules: {}",
        disk.kernel_version,
        disk.built_cache,
        disk.initramfs_modules.join(",")
    );
    let cap = w.join("cap.qcow2");
    capture(&disk, &cap);

    let home = Nic {
        model: "e1000",
        mac: disk.mac,
    };
    let ahci = boot(&cap, "qcow2", Controller::Ahci, home, &w.join("ahci.log"));
    let (outcome, took) = ahci.outcome(BOOT_LIMIT);
    eprintln!(
        "capture on AHCI: {outcome:?} in {:.1} s",
        took.as_secs_f64()
    );
    let Outcome::Marker(marker) = outcome else {
        panic!("on AHCI: {outcome:?}")
    };
    assert_home_marker(&marker);

    let vm = Nic {
        model: "virtio-net-pci",
        mac: VM_MAC,
    };
    let virtio = boot(&cap, "qcow2", Controller::Virtio, vm, &w.join("virtio.log"));
    let (outcome, took) = virtio.outcome(BOOT_LIMIT);
    eprintln!(
        "capture on virtio: {outcome:?} in {:.1} s",
        took.as_secs_f64()
    );
    let Outcome::InitramfsShell(alert) = outcome else {
        panic!("on virtio: {outcome:?}")
    };
    assert!(alert.contains(disk.root_uuid), "{alert}");
}
