//! The image side of the deploy compatibility check, on disks made by real tools: sfdisk and
//! sgdisk tables, syslinux's MBR boot code, ESPs made by mkfs.fat and filled with mtools,
//! a Linux root made by mke2fs -d whose initramfs is a gzip'd newc archive made by cpio.
//! `inspect` reports which firmware each boots with; `check_deploy` refuses a BIOS-only
//! image for a UEFI machine and a virtio disk the initramfs has no driver for, unless
//! `--target-hardware virtio` adds it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_customize::compat::{FirmwareReport, MachineFacts, PciDevice};
use diskferry_customize::TargetHardware;
use diskferry_imaging::compat::{check_deploy, image_facts};
use diskferry_imaging::inspect::inspect;

mod common;
use common::{place, run};

const MIB: u64 = 1 << 20;
const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";

fn sh(script: &str) {
    run(Command::new("sh")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-ec", script]));
}

fn open(disk: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(FileDevice::open(disk, false).unwrap())
}

fn firmware(disk: &Path) -> FirmwareReport {
    inspect(&open(disk)).unwrap().firmware
}

/// syslinux's MBR boot code into the first 440 bytes of `disk`.
fn mbr_code(disk: &Path) {
    run(Command::new("dd")
        .arg(format!("if={SYSLINUX_MBR}"))
        .arg(format!("of={}", disk.display()))
        .args(["bs=440", "count=1", "conv=notrunc", "status=none"]));
}

/// A FAT16 ESP of 32 MiB at 1 MiB of `disk`, holding `loaders` (paths under ::/EFI).
fn esp(disk: &Path, loaders: &[&str]) {
    let d = disk.display();
    sh(&format!(
        "mkfs.fat -F 16 --offset 2048 -n ESP {d} 32768 >/dev/null\nmmd -i {d}@@1M ::/EFI"
    ));
    let dir = tempfile::tempdir().unwrap();
    let pe = dir.path().join("loader.efi");
    std::fs::write(&pe, b"MZ not really a PE, the name is what counts").unwrap();
    for l in loaders {
        let parent = l.rsplit_once('/').unwrap().0;
        sh(&format!(
            "mmd -i {d}@@1M ::/EFI/{parent} 2>/dev/null || true\nmcopy -i {d}@@1M {} ::/EFI/{l}",
            pe.display()
        ));
    }
}

fn blank(dir: &Path, name: &str) -> PathBuf {
    let disk = dir.join(name);
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    disk
}

#[test]
fn firmware_types_are_read_from_tables_boot_code_and_esps() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();

    // BIOS only: an sfdisk MBR with syslinux's boot code, one bootable Linux partition.
    let bios = blank(w, "bios.img");
    run(Command::new("sfdisk")
        .arg(&bios)
        .stdin(std::fs::File::open(write(w, "bios.sfdisk", "label: dos\n,,83,*\n")).unwrap()));
    mbr_code(&bios);
    let f = firmware(&bios);
    assert!(f.bios && !f.uefi, "{f:?}");
    assert_eq!(f.summary(), "BIOS only");

    // The same table without boot code: nothing to boot.
    let none = blank(w, "none.img");
    run(Command::new("sfdisk")
        .arg(&none)
        .stdin(std::fs::File::open(w.join("bios.sfdisk")).unwrap()));
    let f = firmware(&none);
    assert!(!f.bios && !f.uefi, "{f:?}");

    // UEFI only: sgdisk GPT (protective MBR without code), an ESP with GRUB's loader.
    let uefi = blank(w, "uefi.img");
    run(Command::new("sgdisk")
        .args(["-n1:2048:+32M", "-t1:EF00", "-n2:0:0", "-t2:8300"])
        .arg(&uefi));
    esp(&uefi, &["debian/grubx64.efi", "BOOT/BOOTX64.EFI"]);
    let f = firmware(&uefi);
    assert!(!f.bios && f.uefi && !f.shim, "{f:?}");
    assert!(
        f.evidence
            .iter()
            .any(|e| e.contains("/EFI/debian/grubx64.efi")),
        "{f:?}"
    );
    run(Command::new("sgdisk").arg("-v").arg(&uefi));

    // An ESP without a loader boots nothing.
    let empty = blank(w, "empty-esp.img");
    run(Command::new("sgdisk")
        .args(["-n1:2048:+32M", "-t1:EF00"])
        .arg(&empty));
    esp(&empty, &[]);
    let f = firmware(&empty);
    assert!(
        !f.uefi && f.evidence.iter().any(|e| e.contains("holds no loader")),
        "{f:?}"
    );

    // Hybrid: BIOS boot partition, ESP with shim, boot code in the protective MBR.
    let hybrid = blank(w, "hybrid.img");
    run(Command::new("sgdisk")
        .args([
            "-n1:2048:+32M",
            "-t1:EF00",
            "-n2:0:+1M",
            "-t2:EF02",
            "-n3:0:0",
            "-t3:8300",
        ])
        .arg(&hybrid));
    esp(&hybrid, &["debian/shimx64.efi", "debian/grubx64.efi"]);
    mbr_code(&hybrid);
    let f = firmware(&hybrid);
    assert!(f.bios && f.uefi && f.shim, "{f:?}");
    assert!(
        f.evidence.iter().any(|e| e == "BIOS boot partition 2"),
        "{f:?}"
    );
    run(Command::new("sgdisk").arg("-v").arg(&hybrid));

    // An MBR disk whose ESP is type 0xEF: UEFI.
    let mbr_esp = blank(w, "mbr-esp.img");
    run(Command::new("sfdisk").arg(&mbr_esp).stdin(
        std::fs::File::open(write(w, "esp.sfdisk", "label: dos\n1MiB,32MiB,ef\n")).unwrap(),
    ));
    esp(&mbr_esp, &["BOOT/BOOTX64.EFI"]);
    assert!(firmware(&mbr_esp).uefi);

    // A table-less FAT made by mkfs.fat: its boot sector says it is not bootable.
    let floppy = w.join("floppy.img");
    sh(&format!("mkfs.fat -C {} 8192 >/dev/null", floppy.display()));
    let f = firmware(&floppy);
    assert!(!f.bios, "{f:?}");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const KERNEL: &str = "6.1.0-18-amd64";

/// A Debian-like root: an initramfs (gzip'd newc made by cpio) holding `in_initramfs`
/// modules, the kernel's module indexes, made into ext4 by mke2fs -d.
fn linux_root(w: &Path, in_initramfs: &[&str]) -> PathBuf {
    let root = w.join("root");
    let m = root.join(format!("usr/lib/modules/{KERNEL}"));
    std::fs::create_dir_all(&m).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        "ID=debian\nNAME=\"Debian GNU/Linux\"\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    std::fs::write(root.join(format!("boot/vmlinuz-{KERNEL}")), "kernel").unwrap();
    std::fs::write(
        m.join("modules.dep"),
        "kernel/drivers/virtio/virtio_pci.ko:\nkernel/drivers/block/virtio_blk.ko:\n\
         kernel/drivers/scsi/virtio_scsi.ko:\nkernel/drivers/net/virtio_net.ko:\n\
         kernel/drivers/ata/ahci.ko: kernel/drivers/ata/libahci.ko\nkernel/drivers/ata/libahci.ko:\n",
    )
    .unwrap();
    std::fs::write(
        m.join("modules.alias"),
        "alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\nalias virtio:d00000002v* virtio_blk\n\
         alias virtio:d00000008v* virtio_scsi\nalias virtio:d00000001v* virtio_net\n\
         alias pci:v*d*sv*sd*bc01sc06i01* ahci\n",
    )
    .unwrap();
    std::fs::write(
        m.join("modules.builtin"),
        "kernel/drivers/scsi/sd_mod.ko\nkernel/drivers/ata/libata.ko\n",
    )
    .unwrap();
    let ramfs = w.join("ramfs");
    for module in in_initramfs {
        let p = ramfs.join(format!("usr/lib/modules/{KERNEL}/{module}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "module").unwrap();
    }
    std::fs::create_dir_all(&ramfs).unwrap();
    sh(&format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -c > {}/boot/initrd.img-{KERNEL}",
        ramfs.display(),
        root.display()
    ));
    let fs = w.join("root.ext4");
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&fs)
        .arg("24M"));
    fs
}

fn virtio_disk() -> PciDevice {
    PciDevice {
        slot: "0000:00:04.0".into(),
        class: "0x010000".into(),
        vendor: "0x1af4".into(),
        device: "0x1001".into(),
        subsystem_vendor: "0x1af4".into(),
        subsystem_device: "0x0002".into(),
        driver: Some("virtio-pci".into()),
        modalias: Some("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00".into()),
    }
}

#[test]
fn a_bios_image_without_virtio_drivers_is_refused_for_a_uefi_virtio_machine() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let root = linux_root(
        w,
        &[
            "kernel/drivers/ata/ahci.ko",
            "kernel/drivers/ata/libahci.ko",
            "kernel/drivers/virtio/virtio_pci.ko",
        ],
    );
    let disk = blank(w, "linux.img");
    run(Command::new("sfdisk")
        .arg(&disk)
        .stdin(std::fs::File::open(write(w, "l.sfdisk", "label: dos\n1MiB,,83,*\n")).unwrap()));
    mbr_code(&disk);
    place(&disk, &root, MIB);
    let image = open(&disk);

    let facts = image_facts(&image).unwrap();
    assert_eq!(facts.linux.len(), 1);
    let k = &facts.linux[0].kernels[0];
    assert!(k.error.is_none(), "{:?}", k.error);
    assert!(k.in_initramfs.contains("ahci") && !k.in_initramfs.contains("virtio_blk"));
    assert!(k.builtin.contains("sd_mod") && k.modules.contains("virtio_blk"));

    let uefi_virtio = MachineFacts {
        firmware: Some("uefi".into()),
        secure_boot: Some(false),
        pci: vec![virtio_disk()],
        ..MachineFacts::default()
    };
    let refused = |hw| -> Vec<String> {
        check_deploy(&image, &uefi_virtio, hw)
            .into_iter()
            .filter(|f| f.refuses())
            .map(|f| f.reason)
            .collect()
    };
    let r = refused(None);
    assert_eq!(r.len(), 2, "{r:#?}");
    assert!(r[0].contains("BIOS only"), "{r:#?}");
    assert!(
        r[1].contains("needs virtio_blk") && r[1].contains("--target-hardware virtio"),
        "{r:#?}"
    );
    let r = refused(Some(TargetHardware::Virtio));
    assert_eq!(r.len(), 1, "only the firmware is left: {r:#?}");

    // inspect reports the same facts.
    let report = inspect(&image).unwrap();
    let sys = report.partitions[0]
        .os
        .as_ref()
        .unwrap()
        .system
        .as_ref()
        .unwrap();
    let ramfs = &sys.initramfs[0];
    assert!(
        ramfs.storage_drivers.contains(&"ahci".to_string()),
        "{ramfs:?}"
    );
    assert_eq!(ramfs.builtin_storage, ["libata", "sd_mod"]);
    assert_eq!(ramfs.network_modules, ["virtio_net"]);
}
