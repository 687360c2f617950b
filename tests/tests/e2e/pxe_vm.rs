//! PXE end to end in QEMU under TCG (no KVM here): the boot environment built by
//! `deploy/build-bootenv.sh`, served by `diskferry serve` over HTTP to the VMs' iPXE ROMs
//! (user networking, `bootfile=http://10.0.2.2:PORT/boot.ipxe`).
//!
//! VM A boots from the network (`/boot.ipxe` chains to `/boot.ipxe?mac=…`, which hands it the
//! server's public key and an enrollment token), dials back, registers with its MAC and is
//! approved through the API; its two virtio disks —
//! a GPT with FAT32 and ext4, and an MBR disk booted by extlinux — are captured to VHDX and
//! verified. VM B (another MAC, a smaller blank first disk) boots the same way; both captures
//! are deployed onto its disks and read back; then B boots from its own second disk (extlinux,
//! the kernel, the initramfs) and the marker on its kernel command line shows on the serial
//! console. Times are printed for the report.

use std::time::{Duration, Instant};

use diskferry_e2e::fixtures::{
    ext4_image, extract, fat_image, gpt_disk, gpt_partition_range, linux_tree, place,
};
use diskferry_e2e::http::Server;
use diskferry_e2e::pxe::{bootable_disk, bootenv, server_for_vms, Vm, MARKER};
use diskferry_e2e::{diskferry, run_ok, wait_for};

const MIB: u64 = 1 << 20;

fn machine_online(s: &Server, mac: &str) -> bool {
    s.get("/api/machines")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["online"] == true && m["macs"].as_array().unwrap().iter().any(|x| x == mac))
}

/// Approves a machine that booted for the first time (new machines wait for an administrator).
fn approve(s: &Server, mac: &str) {
    let r = s.api("POST", &format!("/api/machines/{mac}/approve"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["approved"], true);
}

/// Runs a job to its end; returns the job record and how long it took.
fn job(s: &Server, body: serde_json::Value) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    let j = s.run_job(&body);
    assert_eq!(j["state"], "succeeded", "{j}");
    (j, start.elapsed())
}

#[test]
fn machines_boot_from_the_network_are_captured_deployed_and_boot_their_copy() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let boot = bootenv();
    let data = w.join("data");
    std::fs::create_dir_all(data.join("boot")).unwrap();
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::copy(boot.join(f), data.join("boot").join(f)).unwrap();
    }
    eprintln!(
        "initramfs: {} bytes",
        std::fs::metadata(boot.join("initramfs.img")).unwrap().len()
    );

    // A's first disk: GPT, FAT32 ESP and ext4 root; its second: the extlinux disk.
    let tree = linux_tree(w);
    let ext4 = w.join("root.ext4");
    ext4_image(&tree, &ext4, 96, "rootfs");
    let fat = w.join("esp.fat");
    fat_image(&fat, 32, 40, "ESP");
    let disk_a = w.join("a.img");
    let offsets = gpt_disk(
        &disk_a,
        160,
        &[(40, "ef00", "EFI system"), (96, "8300", "root")],
    );
    place(&disk_a, offsets[0], &fat);
    place(&disk_a, offsets[1], &ext4);
    let boot_a = w.join("a-boot.img");
    bootable_disk(&boot_a, &boot, w);

    let (s, http) = server_for_vms(&data);

    // VM A: network boot, registration.
    let mac_a = "52:54:00:d1:5c:0a";
    let started = Instant::now();
    let vm_a = Vm::pxe(&w.join("a.log"), &http, mac_a, &[&disk_a, &boot_a]);
    assert!(
        wait_for(Duration::from_secs(240), || machine_online(&s, mac_a)),
        "A never registered: {}",
        vm_a.console()
    );
    eprintln!(
        "VM A: boot to registered {:.1} s (TCG)",
        started.elapsed().as_secs_f64()
    );
    assert!(vm_a.console().contains("diskferry: network up"));
    approve(&s, mac_a);

    // Capture both of A's disks by its MAC.
    let (j, t) = job(
        &s,
        serde_json::json!({"kind": "capture", "source": format!("/dev/vda@{mac_a}"), "output": "a.vhdx", "verify": true}),
    );
    assert!(j["log"].as_str().unwrap().contains("no differences"), "{j}");
    eprintln!("capture of A's vda: {:.1} s", t.as_secs_f64());
    let (j, _) = job(
        &s,
        serde_json::json!({"kind": "capture", "source": format!("/dev/vdb@{mac_a}"), "output": "a-boot.vhdx", "verify": true}),
    );
    assert!(
        j["log"]
            .as_str()
            .unwrap()
            .contains("boot loader in its first sectors"),
        "the extlinux volume is copied by blocks: {j}"
    );
    for f in ["a.vhdx", "a-boot.vhdx"] {
        run_ok(
            "qemu-img",
            &["check", data.join("captures").join(f).to_str().unwrap()],
        );
    }
    drop(vm_a);

    // VM B: a smaller blank first disk, a blank second one.
    let disk_b = w.join("b.img");
    std::fs::File::create(&disk_b)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    let boot_b = w.join("b-boot.img");
    std::fs::File::create(&boot_b)
        .unwrap()
        .set_len(80 * MIB)
        .unwrap();
    let mac_b = "52:54:00:d1:5c:0b";
    let mut vm_b = Vm::pxe(&w.join("b.log"), &http, mac_b, &[&disk_b, &boot_b]);
    assert!(
        wait_for(Duration::from_secs(240), || machine_online(&s, mac_b)),
        "B never registered: {}",
        vm_b.console()
    );
    approve(&s, mac_b);
    // A's first disk boots with UEFI only (an ESP with \EFI\BOOT\BOOTX64.EFI, no MBR code):
    // B's agent, reading the VM's own sysfs, says SeaBIOS started it, so the deploy is
    // refused before it writes; forced, it goes ahead.
    let deploy_a = serde_json::json!({"kind": "deploy", "image": "a.vhdx", "target": format!("/dev/vda@{mac_b}")});
    let refused = s.run_job(&deploy_a);
    assert_eq!(refused["state"], "failed", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("this machine starts with BIOS"),
        "{refused}"
    );
    assert!(
        std::fs::read(&disk_b).unwrap().iter().all(|b| *b == 0),
        "nothing was written"
    );
    let mut forced = deploy_a.clone();
    forced["force"] = true.into();
    let (j, t) = job(&s, forced);
    assert!(
        j["log"]
            .as_str()
            .unwrap()
            .contains("compatibility (forced)"),
        "{j}"
    );
    assert!(j["log"].as_str().unwrap().contains("no differences"), "{j}");
    let written: u64 = j["log"]
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split(" (")
                .nth(1)?
                .split(" bytes")
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    eprintln!(
        "deploy onto B's vda: {:.1} s, {:.1} MB/s over user networking under TCG",
        t.as_secs_f64(),
        written as f64 / t.as_secs_f64() / 1e6
    );
    job(
        &s,
        serde_json::json!({"kind": "deploy", "image": "a-boot.vhdx", "target": format!("/dev/vdb@{mac_b}")}),
    );
    let machines = s.get("/api/machines").json();
    let b = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["macs"][0] == mac_b)
        .unwrap();
    assert_eq!(b["state"], "deployed");
    // Power off through the agent: QEMU exits.
    let r = s.api(
        "POST",
        &format!("/api/machines/{mac_b}/power"),
        br#"{"action":"poweroff"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(vm_b.wait_exit(Duration::from_secs(60)), "B powered off");

    // What landed on B's first disk, judged by tools nobody here wrote.
    let v = run_ok("sgdisk", &["-v", disk_b.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
    let (o1, l1) = gpt_partition_range(&disk_b, 1);
    let (o2, l2) = gpt_partition_range(&disk_b, 2);
    run_ok(
        "fsck.fat",
        &[
            "-n",
            extract(&disk_b, o1, l1, &w.join("b-esp")).to_str().unwrap(),
        ],
    );
    run_ok(
        "e2fsck",
        &[
            "-fn",
            extract(&disk_b, o2, l2, &w.join("b-root"))
                .to_str()
                .unwrap(),
        ],
    );
    let (ok, _, err) = diskferry(&[
        "verify".as_ref(),
        data.join("captures/a.vhdx").as_os_str(),
        disk_b.as_os_str(),
    ]);
    assert!(ok, "{err}");

    // B boots from its own copy of the extlinux disk.
    let b_boot = Vm::start(
        &w.join("b-boot.log"),
        &[
            "-boot".into(),
            "c".into(),
            "-drive".into(),
            format!("file={},format=raw,if=virtio", boot_b.display()),
            "-nic".into(),
            "none".into(),
        ],
    );
    assert!(
        wait_for(Duration::from_secs(180), || {
            let c = b_boot.console();
            c.contains(MARKER) && c.contains("diskferry: boot environment starting")
        }),
        "B did not boot its deployed disk: {}",
        b_boot.console()
    );
}
