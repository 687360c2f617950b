//! UEFI boot entries registered by a deploy: a machine under OVMF (TCG) boots the diskferry
//! environment from the network, and a deploy job writes the UEFI Debian (GRUB installed
//! without `--removable`: `\EFI\debian\grubx64.efi` only) onto its disk *without* the fallback
//! loader. Its agent (`--allow-firmware` in the environment) registers the boot entry through
//! efivarfs, which the firmware keeps in its variable store. The judge is the firmware: the
//! same disk with blank variables stops in the UEFI shell; with the machine's own variables —
//! the store the network boot wrote into — it boots the deployed Debian to its marker.

use std::time::{Duration, Instant};

use diskferry_e2e::http::Server;
use diskferry_e2e::pxe::{bootenv, server_for_vms, Vm};
use diskferry_e2e::uefi::{
    boot_uefi, boot_uefi_with_vars, expect_no_loader, uefi_disk, DISK_MIB, OVMF_CODE, OVMF_VARS,
};
use diskferry_e2e::{diskferry, wait_for};

const MIB: u64 = 1 << 20;
const MAC: &str = "52:54:00:e7:1b:01";

fn online(s: &Server) -> bool {
    s.get("/api/machines")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["online"] == true && m["macs"].as_array().unwrap().iter().any(|x| x == MAC))
}

#[test]
fn a_deploy_registers_a_boot_entry_the_firmware_then_boots() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let fixture = uefi_disk(w);
    let image = w.join("debian-uefi.qcow2");
    let (ok, _, err) = diskferry(&[
        "capture".as_ref(),
        fixture.disk.as_os_str(),
        image.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
    std::fs::remove_file(&fixture.disk).unwrap();

    let boot = bootenv();
    let data = w.join("data");
    std::fs::create_dir_all(data.join("boot")).unwrap();
    std::fs::create_dir_all(data.join("captures")).unwrap();
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::copy(boot.join(f), data.join("boot").join(f)).unwrap();
    }
    std::fs::copy(&image, data.join("captures/debian-uefi.qcow2")).unwrap();
    let (s, http) = server_for_vms(&data);

    // The machine: OVMF with its own variable store, a blank disk, booted from the network.
    let disk = w.join("machine.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_MIB * MIB)
        .unwrap();
    let vars = w.join("machine.vars.fd");
    std::fs::copy(OVMF_VARS, &vars).unwrap();
    let mut args = vec![
        "-drive".to_string(),
        format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", vars.display()),
    ];
    args.extend(Vm::network_args(&http, MAC, &[&disk]));
    let started = Instant::now();
    let mut vm = Vm::start(&w.join("machine.log"), &args);
    assert!(
        wait_for(Duration::from_secs(420), || online(&s)),
        "the UEFI machine never registered: {}",
        vm.console()
    );
    eprintln!("UEFI network boot to registered: {:.1?}", started.elapsed());
    let r = s.api("POST", &format!("/api/machines/{MAC}/approve"), b"");
    assert_eq!(r.status, 200, "{}", r.text());

    let t = Instant::now();
    let j = s.run_job(&serde_json::json!({
        "kind": "deploy", "image": "debian-uefi.qcow2", "target": MAC,
        "fallback_loader": false,
    }));
    assert_eq!(j["state"], "succeeded", "{j:#}");
    let log = j["log"].as_str().unwrap();
    eprintln!("deployed in {:.1?}", t.elapsed());
    assert!(!log.contains("BOOTX64"), "no fallback loader: {log}");
    assert!(
        log.contains(
            r#""debian" starts \EFI\debian\grubx64.efi (partition 1), first in the boot order"#
        ),
        "{log}"
    );
    // Power off (the variables are in the store already: the firmware wrote them at once).
    let r = s.api(
        "POST",
        &format!("/api/machines/{MAC}/power"),
        br#"{"action": "poweroff"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(vm.wait_exit(Duration::from_secs(120)), "{}", vm.console());

    // The firmware decides. Blank variables: nothing boots this disk.
    let (_, took) = expect_no_loader(
        boot_uefi(&disk, w, &w.join("blank.log")),
        Duration::from_secs(150),
    );
    eprintln!("blank variables: no loader, as expected ({took:.1?})");
    // The machine's own variables: the registered entry boots the deployed Debian.
    let (marker, took) =
        boot_uefi_with_vars(&disk, &vars, &w.join("entry.log")).finish(Duration::from_secs(600));
    eprintln!("with the registered entry: booted to the marker in {took:.1?}");
    assert_eq!(marker.one("firmware"), "uefi");
}
