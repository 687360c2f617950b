//! Reconfiguration for other hardware and customization (issue 18), proven by booting. The
//! P2V fixture — a Debian on an AHCI disk whose initramfs holds only the AHCI driver and whose
//! network is pinned to its MAC — is proved first: captured plainly with `diskferry capture`,
//! it boots under QEMU TCG on AHCI to its marker (network up on its MAC; with another MAC no
//! address), and on virtio-blk its initramfs cannot find the root and drops to its shell. Then
//! `diskferry deploy --target-hardware virtio --customize SPEC` writes it twice, each with its
//! own SPEC: both targets pass `e2fsck -fn`, their initramfs lists virtio_blk (`lsinitramfs`),
//! and both boot on virtio with the network up, each with its own host name, machine-id, SSH
//! host keys, user and file; the capture never changes.

use std::path::Path;
use std::time::Duration;

use diskferry_e2e::debian::Marker;
use diskferry_e2e::p2v::{ahci_disk, boot, Controller, Nic, Outcome, P2vDisk, HOSTNAME, ROOT_UUID};
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

/// Boots the capture on `controller` with `nic`; reports how it ended and how long it took.
fn boot_capture(cap: &Path, controller: Controller, nic: Nic, log: &Path) -> Outcome {
    let (outcome, took) = boot(cap, "qcow2", controller, nic, log).outcome(BOOT_LIMIT);
    let (model, mac) = (nic.model, nic.mac);
    let secs = took.as_secs_f64();
    eprintln!("capture on {controller:?} with {model} {mac}: {outcome:?} in {secs:.1} s");
    outcome
}

fn marker_of(outcome: Outcome) -> Marker {
    match outcome {
        Outcome::Marker(marker) => marker,
        other => panic!("expected the marker: {other:?}"),
    }
}

/// The `ip -br addr` entries of the network cards (loopback left out).
fn nic_addresses(marker: &Marker) -> Vec<&str> {
    let addr = marker.one("addr");
    addr.split(';')
        .filter(|l| !l.is_empty() && !l.starts_with("lo "))
        .collect()
}

/// The marker of the machine on its own hardware: its name, root by UUID on the AHCI disk,
/// the AHCI driver loaded, DHCP's address (qemu's user network gives 10.0.2.15) on its NIC.
fn assert_home_marker(marker: &Marker) {
    assert_eq!(marker.one("hostname"), HOSTNAME);
    assert_eq!(marker.one("uuid"), ROOT_UUID);
    assert_eq!(marker.one("root"), "/dev/sda1 ext4", "{:?}", marker.lines);
    let modules: Vec<&str> = marker.one("modules").split(',').collect();
    assert!(modules.contains(&"ahci"), "{modules:?}");
    assert!(!modules.contains(&"virtio_blk"), "{modules:?}");
    let nics = nic_addresses(marker);
    assert!(
        nics.len() == 1 && nics[0].contains(" UP 10.0.2.15/24 "),
        "no DHCP address on the NIC: {nics:?}"
    );
    assert_eq!(marker.all("hostkey").len(), 3, "{:?}", marker.lines);
    assert_eq!(marker.one("machine-id").len(), 32, "{:?}", marker.lines);
}

#[test]
fn a_sata_debian_boots_on_virtio_once_deployed_reconfigured_and_customized() {
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
    let (home, other) = (disk.mac, VM_MAC);

    let e1000 = |mac| Nic {
        model: "e1000",
        mac,
    };
    let marker = marker_of(boot_capture(
        &cap,
        Controller::Ahci,
        e1000(home),
        &w.join("ahci.log"),
    ));
    assert_home_marker(&marker);
    // Its network configuration is pinned: a card with another MAC gets no address.
    let log = w.join("ahci-other-mac.log");
    let marker = marker_of(boot_capture(&cap, Controller::Ahci, e1000(other), &log));
    let nics = nic_addresses(&marker);
    assert!(nics.len() == 1 && !nics[0].contains("10.0.2."), "{nics:?}");

    let vm = Nic {
        model: "virtio-net-pci",
        mac: other,
    };
    match boot_capture(&cap, Controller::Virtio, vm, &w.join("virtio.log")) {
        Outcome::InitramfsShell(alert) => assert!(alert.contains(disk.root_uuid), "{alert}"),
        marker => panic!("booted on virtio: {marker:?}"),
    }
    let original = marker;
    let before = std::fs::read(&cap).unwrap();

    // Deployed to two VMs with --target-hardware virtio and each its own SPEC: both boot on
    // virtio with their network up, each with its own name, machine-id, host keys, user, file.
    let mut seen = Vec::new();
    for name in ["web-a", "web-b"] {
        let target = w.join(format!("{name}.raw"));
        deploy_reconfigured(&cap, &target, name, w);
        let log = w.join(format!("{name}.log"));
        let (outcome, took) =
            boot(&target, "raw", Controller::Virtio, vm, &log).outcome(BOOT_LIMIT);
        eprintln!("{name} (deployed with --target-hardware virtio) on virtio: {took:.1?}");
        let m = marker_of(outcome);
        assert_eq!(m.one("hostname"), name);
        assert_eq!(m.one("root"), "/dev/vda1 ext4", "{:?}", m.lines);
        assert!(m.one("modules").split(',').any(|x| x == "virtio_blk"));
        let nics = nic_addresses(&m);
        assert!(
            nics.len() == 1 && nics[0].contains(" UP 10.0.2.15/24 "),
            "{nics:?}"
        );
        assert!(
            m.one("users").split(',').any(|u| u == "alice"),
            "{:?}",
            m.lines
        );
        assert_eq!(m.one("file"), format!("made for {name}"));
        let keys: Vec<String> = m.all("hostkey").iter().map(|k| k.to_string()).collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        seen.push((m.one("machine-id").to_string(), keys));
    }
    let home_keys: Vec<String> = original
        .all("hostkey")
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_ne!(seen[0].0, seen[1].0, "each machine its own machine-id");
    assert_ne!(seen[0].1, seen[1].1, "each machine its own host keys");
    assert!(seen
        .iter()
        .all(|(_, k)| k.iter().all(|key| !home_keys.contains(key))));
    assert_eq!(
        std::fs::read(&cap).unwrap(),
        before,
        "the capture never changes"
    );
}

/// `diskferry deploy CAP TARGET --target-hardware virtio --customize SPEC` onto a fresh
/// target file, then `e2fsck -fn` and `lsinitramfs` on what it wrote.
fn deploy_reconfigured(cap: &Path, target: &Path, name: &str, w: &Path) {
    let spec = w.join(format!("{name}.toml"));
    std::fs::write(
        &spec,
        r#"hostname = "{name}"
machine_id = "new"
ssh_host_keys = "regenerate"
[[users]]
name = "alice"
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"]
[[files]]
path = "/etc/diskferry-fixture-file"
content = "made for {name}"
"#,
    )
    .unwrap();
    std::fs::File::create(target)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let (ok, _, err) = diskferry(&[
        "deploy".as_ref(),
        cap.as_os_str(),
        target.as_os_str(),
        "--target-hardware".as_ref(),
        "virtio".as_ref(),
        "--customize".as_ref(),
        spec.as_os_str(),
        "--machine-name".as_ref(),
        name.as_ref(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    let added = err.lines().find(|l| l.contains("changed: initramfs"));
    assert!(
        ok && added.is_some_and(|l| l.contains(" virtio_blk,")),
        "{err}"
    );
    let root = diskferry_e2e::fixtures::extract(
        target,
        1 << 20,
        root_size(target),
        &w.join(format!("{name}.ext4")),
    );
    let fsck = run_ok("e2fsck", &["-fn", p(&root)]);
    assert!(
        !fsck.contains("UNEXPECTED") && !fsck.contains("Fix?"),
        "{fsck}"
    );
    let listed = diskferry_e2e::debian::initramfs_listing(&root, w);
    assert!(
        listed.contains("kernel/drivers/block/virtio_blk.ko"),
        "{listed}"
    );
}

/// The size of the first partition of the MBR disk at `disk`, from sfdisk.
fn root_size(disk: &Path) -> u64 {
    let json = run_ok("sfdisk", &["--json", p(disk)]);
    let v: serde_json::Value = serde_json::from_str(&json[json.find('{').unwrap()..]).unwrap();
    v["partitiontable"]["partitions"][0]["size"]
        .as_u64()
        .unwrap()
        * 512
}
