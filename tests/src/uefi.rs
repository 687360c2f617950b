//! A Debian machine that boots through UEFI, for the fallback-loader scenario: the cached
//! debootstrap root on a GPT disk with an EFI system partition (FAT32 made by `mkfs.fat`,
//! filled with mtools: the kernel here has no vfat) and an ext4 root. GRUB is installed the
//! way Debian's `grub-install --target=x86_64-efi` does without `--removable` and without
//! shim: its core image, made by `grub-mkimage` with the early configuration grub-install
//! embeds (find the root by UUID, `prefix=($root)/boot/grub`), as `\EFI\debian\grubx64.efi`
//! and nothing else on the ESP — no `\EFI\BOOT` — and GRUB's modules in the root's
//! `/boot/grub/x86_64-efi`. Firmware needs a boot entry in its variables to start it. Also
//! the QEMU (TCG) boot of such a disk under OVMF with blank variables.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::debian::{
    extract_tarball, grub_modules, install_marker, make_ext4, marker_unit, place_data,
    root_tarball, write_grub_cfg, Boot,
};
use crate::{run_ok, wait_for};

const MIB: u64 = 1 << 20;
/// The disk and its partitions, in MiB: the ESP from 1 MiB, the root after it.
pub const DISK_MIB: u64 = 1536;
pub const ESP_MIB: u64 = 100;
pub const ROOT_MIB: u64 = 1400;
pub const ESP_OFFSET: u64 = MIB;
pub const ROOT_OFFSET: u64 = (1 + ESP_MIB) * MIB;
pub const ROOT_UUID: &str = "5eed0f15-0000-4000-8000-0000000ef100";
/// The ESP's volume serial (mkfs.fat -i).
const ESP_SERIAL: &str = "5EED0E51";
/// GRUB's platform directory (Debian package grub-efi-amd64-bin).
pub(crate) const GRUB_EFI: &str = "/usr/lib/grub/x86_64-efi";
/// The firmware's code and its blank variable store (Debian package ovmf).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The marker: how the system was booted and what it runs on.
const MARKER_SCRIPT: &str = r#"#!/bin/sh
echo "DISKFERRY-MARKER firmware=$([ -d /sys/firmware/efi ] && echo uefi || echo bios)"
echo "DISKFERRY-MARKER root=$(findmnt -n -o SOURCE,FSTYPE / | tr -s ' ')"
echo "DISKFERRY-MARKER cmdline=$(cat /proc/cmdline)"
echo "DISKFERRY-MARKER-END"
"#;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The UEFI Debian disk and what went into it.
#[derive(Debug)]
pub struct UefiDisk {
    /// The raw GPT disk image.
    pub disk: PathBuf,
    /// The GRUB core image installed as `\EFI\debian\grubx64.efi`.
    pub grub: PathBuf,
    /// Whether the debootstrap cache had to be built for this run.
    pub built_cache: bool,
}

/// Builds the disk in `work`.
pub fn uefi_disk(work: &Path) -> UefiDisk {
    let (tarball, built_cache) = root_tarball();
    let tree = work.join("tree");
    extract_tarball(&tarball, &tree);
    std::fs::write(
        tree.join("etc/fstab"),
        format!("UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"),
    )
    .unwrap();
    std::fs::write(tree.join("etc/hostname"), "debian-uefi\n").unwrap();
    install_marker(&tree, MARKER_SCRIPT, &marker_unit("local-fs.target", ""));
    write_grub_cfg(&tree, ROOT_UUID);
    // grub-install copies the platform's modules next to grub.cfg.
    grub_modules(&tree, GRUB_EFI, "x86_64-efi");
    let root_fs = work.join("root.ext4");
    make_ext4(&tree, ROOT_UUID, "debian-root", ROOT_MIB, &root_fs);
    std::fs::remove_dir_all(&tree).unwrap();
    let grub = grub_core(work, ROOT_UUID);
    let esp = work.join("esp.fat");
    make_esp(&esp, &grub, ESP_MIB, "::/EFI/debian/grubx64.efi");
    let disk = work.join("disk.img");
    let offsets = crate::fixtures::gpt_disk(
        &disk,
        DISK_MIB,
        &[
            (ESP_MIB, "ef00", "EFI system partition"),
            (ROOT_MIB, "8300", "debian-root"),
        ],
    );
    assert_eq!(offsets, [ESP_OFFSET, ROOT_OFFSET]);
    place_data(&disk, ESP_OFFSET, &esp);
    place_data(&disk, ROOT_OFFSET, &root_fs);
    std::fs::remove_file(&root_fs).unwrap();
    std::fs::remove_file(&esp).unwrap();
    UefiDisk {
        disk,
        grub,
        built_cache,
    }
}

/// GRUB's core image as grub-install makes it for x86_64-efi when `/boot/grub` is on
/// another filesystem than the ESP: an embedded configuration that finds the root by UUID
/// and sets the prefix there, and the modules to read it (the rest load from the prefix).
pub(crate) fn grub_core(work: &Path, root_uuid: &str) -> PathBuf {
    let load_cfg = work.join("load.cfg");
    std::fs::write(
        &load_cfg,
        format!("search.fs_uuid {root_uuid} root\nset prefix=($root)'/boot/grub'\n"),
    )
    .unwrap();
    let core = work.join("grubx64.efi");
    run_ok(
        "grub-mkimage",
        &[
            "-O",
            "x86_64-efi",
            "-d",
            GRUB_EFI,
            "-c",
            p(&load_cfg),
            "-p",
            "",
            "-o",
            p(&core),
            "part_gpt",
            "ext2",
            "search_fs_uuid",
        ],
    );
    core
}

/// An ESP of `mib` MiB: FAT32 holding `grub` at `at` (`::/EFI/debian/grubx64.efi` as
/// grub-install leaves it, or the removable-media path) and nothing else.
pub(crate) fn make_esp(esp: &Path, grub: &Path, mib: u64, at: &str) {
    std::fs::File::create(esp)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    run_ok(
        "mkfs.fat",
        &["-F", "32", "-n", "ESP", "-i", ESP_SERIAL, p(esp)],
    );
    let dir = &at[..at.rfind('/').unwrap()];
    run_ok("mmd", &["-i", p(esp), "::/EFI", dir]);
    run_ok("mcopy", &["-i", p(esp), p(grub), at]);
}

/// A TCG boot of `disk` (raw, writes to a snapshot) under OVMF with a fresh copy of the blank
/// variable store (in `work`), its console logged to `log`.
pub fn boot_uefi(disk: &Path, work: &Path, log: &Path) -> Boot {
    let vars = work.join(format!(
        "{}.vars.fd",
        log.file_name().unwrap().to_string_lossy()
    ));
    std::fs::copy(OVMF_VARS, &vars).expect("OVMF's blank variables (Debian package ovmf)");
    boot_uefi_with_vars(disk, &vars, log)
}

/// A TCG boot of `disk` (raw, writes to a snapshot) under OVMF with the variable store
/// `vars` (kept: what the firmware and the system write to it stays), without a network.
pub fn boot_uefi_with_vars(disk: &Path, vars: &Path, log: &Path) -> Boot {
    let code = format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}");
    let vars = format!("if=pflash,format=raw,file={}", p(vars));
    let drive = format!("file={},format=raw,if=virtio,snapshot=on", p(disk));
    Boot::spawn(
        &[
            "-drive", &code, "-drive", &vars, "-nic", "none", "-drive", &drive,
        ],
        log,
    )
}

/// Waits up to `limit` for the firmware to give up on `boot`'s disk: its UEFI shell prompt,
/// or the boot manager saying there is nothing to boot. Returns the console and the time
/// taken; panics if the machine reached its marker instead, or if neither came.
pub fn expect_no_loader(boot: Boot, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let gave_up = |c: &str| c.contains("Shell>") || c.contains("No bootable");
    let came = wait_for(limit, || gave_up(&boot.console()));
    let console = boot.console();
    assert!(
        !console.contains("DISKFERRY-MARKER"),
        "the disk booted without a fallback loader:\n{console}"
    );
    assert!(
        came,
        "the firmware neither dropped to its shell nor said there is nothing to boot within {limit:?}:\n{console}"
    );
    (console, started.elapsed())
}
