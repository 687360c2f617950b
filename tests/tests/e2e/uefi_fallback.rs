//! UEFI-safe deploys (the fallback loader): a Debian whose GRUB was installed for UEFI without
//! `--removable` — `\EFI\debian\grubx64.efi` only, no `\EFI\BOOT` — boots under OVMF only
//! through a boot entry in the firmware's variables. With blank variables the original disk
//! does not boot (the firmware ends in its shell); captured to qcow2 and deployed onto a raw
//! disk, it does: the deploy added `\EFI\BOOT\BOOTX64.EFI`, a copy of the distribution's own
//! loader. Judged by fsck.fat -n, mtools (mdir, mcopy + cmp), sgdisk -v, e2fsck -fn, and the
//! boot itself under OVMF (TCG) to the marker its systemd unit prints. `--no-fallback-loader`
//! leaves the ESP as captured.

use std::path::Path;
use std::time::{Duration, Instant};

use diskferry_e2e::fixtures::extract;
use diskferry_e2e::uefi::{
    boot_uefi, expect_no_loader, uefi_disk, DISK_MIB, ESP_MIB, ESP_OFFSET, ROOT_MIB, ROOT_OFFSET,
    ROOT_UUID,
};
use diskferry_e2e::{diskferry, run_ok};

const MIB: u64 = 1 << 20;
/// OVMF under TCG reaches its shell in well under a minute when nothing boots.
const NO_BOOT_LIMIT: Duration = Duration::from_secs(150);
/// A TCG boot to the marker takes a minute or two alone; CI runs other tests beside it.
const BOOT_LIMIT: Duration = Duration::from_secs(600);

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `diskferry deploy IMAGE TARGET` onto a new raw file of the source's size, with `extra`
/// options; returns the deploy's log (stderr).
fn deploy(image: &Path, target: &Path, extra: &[&str]) -> String {
    std::fs::File::create(target)
        .unwrap()
        .set_len(DISK_MIB * MIB)
        .unwrap();
    let mut args = vec![
        "deploy".as_ref(),
        image.as_os_str(),
        target.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let (ok, _, err) = diskferry(&args);
    assert!(ok, "deploy {extra:?}: {err}");
    err
}

/// The names `mdir` lists in `dir` of the FAT image `esp`, upper-cased.
fn listing(esp: &Path, dir: &str) -> String {
    run_ok("mdir", &["-i", p(esp), "-b", dir]).to_uppercase()
}

#[test]
fn a_deployed_debian_boots_with_blank_uefi_variables() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let started = Instant::now();
    let fixture = uefi_disk(d);
    eprintln!(
        "fixture built in {:.1?} (debootstrap cache {})",
        started.elapsed(),
        if fixture.built_cache {
            "built"
        } else {
            "reused"
        }
    );
    let esp = extract(
        &fixture.disk,
        ESP_OFFSET,
        ESP_MIB * MIB,
        &d.join("esp.orig"),
    );
    run_ok("fsck.fat", &["-n", p(&esp)]);
    assert!(
        !listing(&esp, "::/EFI").contains("/BOOT"),
        "{}",
        listing(&esp, "::/EFI")
    );

    // The original: with blank variables the firmware finds no loader.
    let (console, took) = expect_no_loader(
        boot_uefi(&fixture.disk, d, &d.join("original.log")),
        NO_BOOT_LIMIT,
    );
    eprintln!(
        "original disk, blank variables: no boot, firmware gave up after {took:.1?} ({} bytes of console)",
        console.len()
    );

    let image = d.join("capture.qcow2");
    let t = Instant::now();
    let (ok, _, err) = diskferry(&[
        "capture".as_ref(),
        fixture.disk.as_os_str(),
        image.as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
    eprintln!("captured in {:.1?}", t.elapsed());
    let target = d.join("target.raw");
    let t = Instant::now();
    let log = deploy(&image, &target, &[]);
    eprintln!("deployed in {:.1?}", t.elapsed());
    assert!(
        log.contains(r"changed: added \EFI\BOOT\BOOTX64.EFI (copy of \EFI\debian\grubx64.efi)"),
        "{log}"
    );

    // The deployed disk, judged by tools nobody here wrote.
    run_ok("sgdisk", &["-v", p(&target)]);
    let esp = extract(&target, ESP_OFFSET, ESP_MIB * MIB, &d.join("esp.deployed"));
    run_ok("fsck.fat", &["-n", p(&esp)]);
    let boot_dir = listing(&esp, "::/EFI/BOOT");
    assert!(boot_dir.contains("BOOTX64.EFI"), "{boot_dir}");
    let (fallback, vendor) = (d.join("BOOTX64.EFI"), d.join("grubx64.efi"));
    run_ok(
        "mcopy",
        &["-n", "-i", p(&esp), "::/EFI/BOOT/BOOTX64.EFI", p(&fallback)],
    );
    run_ok(
        "mcopy",
        &["-n", "-i", p(&esp), "::/EFI/debian/grubx64.efi", p(&vendor)],
    );
    run_ok("cmp", &[p(&fallback), p(&vendor)]);
    run_ok("cmp", &[p(&fallback), p(&fixture.grub)]);
    let root = extract(
        &target,
        ROOT_OFFSET,
        ROOT_MIB * MIB,
        &d.join("root.deployed"),
    );
    run_ok("e2fsck", &["-fn", p(&root)]);
    std::fs::remove_file(&root).unwrap();

    // With blank variables the deployed disk boots, through UEFI, to its root.
    let (marker, took) = boot_uefi(&target, d, &d.join("deployed.log")).finish(BOOT_LIMIT);
    eprintln!("deployed disk, blank variables: booted to the marker in {took:.1?}");
    assert_eq!(marker.one("firmware"), "uefi");
    assert!(marker
        .one("cmdline")
        .contains(&format!("root=UUID={ROOT_UUID}")));
    assert!(marker.one("root").ends_with(" ext4"), "{marker:?}");

    // Opting out leaves the ESP as captured.
    let kept = d.join("kept.raw");
    let log = deploy(&image, &kept, &["--no-fallback-loader"]);
    assert!(!log.contains("BOOTX64"), "{log}");
    let esp = extract(&kept, ESP_OFFSET, ESP_MIB * MIB, &d.join("esp.kept"));
    run_ok("fsck.fat", &["-n", p(&esp)]);
    assert!(!listing(&esp, "::/EFI").contains("/BOOT"));
    eprintln!("whole scenario: {:.1?}", started.elapsed());
}
