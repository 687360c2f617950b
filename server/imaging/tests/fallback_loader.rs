//! Deploys and the EFI fallback loader, without root or a network: a GPT disk in memory with
//! an EFI system partition holding only `\EFI\debian\grubx64.efi` (FAT, made by our writer)
//! and an ext4 root. A deploy adds `\EFI\BOOT\BOOTX64.EFI` and verifies against it; turned
//! off, or when the ESP is copied by blocks (asked for, or because its boot sector holds a
//! boot loader), the ESP stays as it was, with a note, and the deploy still succeeds and
//! verifies; a customization chained before it edits the root in the same deploy.

use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, MemoryDevice, SliceDevice};
use diskferry_fs::fat::Fat;
use diskferry_fs::overlay::{Attrs, TreeOverlay, TreeTransform};
use diskferry_fs::{Filesystem, Timestamp};
use diskferry_imaging::deploy;
use diskferry_imaging::pipeline::{DeployError, DeployHow, DeployReport, Mode};
use diskferry_imaging::progress::Silent;

mod common;

const MIB: u64 = 1 << 20;
const GRUB: &[u8] = b"MZ grub core image";

/// A 64 MiB GPT disk: a 16 MiB ESP with `\EFI\debian\grubx64.efi`, an ext4 root after it;
/// with `boot_code`, the ESP's boot sector holds a GRUB signature.
fn esp_disk(dir: &Path, boot_code: bool) -> Arc<dyn BlockDevice> {
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("EFI/debian")).unwrap();
    std::fs::write(esp.join("EFI/debian/grubx64.efi"), GRUB).unwrap();
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=debian\n").unwrap();
    let disk = common::gpt_fat_ext4(&esp, &root);
    if boot_code {
        disk.write_at(b"GRUB", MIB + 0x100).unwrap();
    }
    disk
}

fn run(image: &Arc<dyn BlockDevice>, how: &DeployHow) -> Result<(DeployReport, Fat), DeployError> {
    let target: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new((64 * MIB) as usize));
    let report = deploy(
        Arc::clone(image),
        Arc::clone(&target),
        "memory",
        how,
        &Silent,
    )?;
    let esp: Arc<dyn BlockDevice> = Arc::new(SliceDevice::new(target, MIB, 16 * MIB).unwrap());
    Ok((report, Fat::open(esp).unwrap()))
}

fn fallback(esp: &Fat) -> Option<Vec<u8>> {
    let node = esp.lookup("/EFI/BOOT/BOOTX64.EFI").ok()?;
    Some(esp.read_all(node, 1 << 20).unwrap())
}

fn notes(r: &DeployReport) -> String {
    r.disk.notes.join("\n")
}

#[test]
fn a_deploy_adds_the_fallback_loader_and_verifies_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = esp_disk(dir.path(), false);
    let (report, esp) = run(&image, &DeployHow::default()).unwrap();
    assert_eq!(fallback(&esp).as_deref(), Some(GRUB));
    assert_eq!(report.verify.differences, 0);
    assert_eq!(
        report.disk.partitions[0].changes,
        [r"added \EFI\BOOT\BOOTX64.EFI (copy of \EFI\debian\grubx64.efi)"]
    );
    assert!(report.disk.partitions[1].changes.is_empty());
    assert!(report.disk.partitions[0]
        .to_string()
        .contains("1 change(s) to its files"));
    // The original is where it was.
    let orig = esp.lookup("/EFI/debian/grubx64.efi").unwrap();
    assert_eq!(esp.read_all(orig, 1 << 20).unwrap(), GRUB);
}

#[test]
fn turned_off_the_esp_stays_as_captured() {
    let dir = tempfile::tempdir().unwrap();
    let image = esp_disk(dir.path(), false);
    let how = DeployHow {
        fallback_loader: false,
        ..DeployHow::default()
    };
    let (report, esp) = run(&image, &how).unwrap();
    assert_eq!(fallback(&esp), None);
    assert!(esp.lookup("/EFI/BOOT").is_err());
    assert!(report.disk.partitions[0].changes.is_empty());
    assert!(report.disk.notes.is_empty(), "{}", notes(&report));
}

#[test]
fn an_esp_copied_by_blocks_gets_a_note_and_the_deploy_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    // Asked for: blocks.
    let image = esp_disk(dir.path(), false);
    let (report, esp) = run(&image, &DeployHow::mode(Mode::Blocks)).unwrap();
    assert_eq!(fallback(&esp), None);
    assert_eq!(report.verify.differences, 0);
    assert!(
        notes(&report).contains(r"partition 1: the EFI system partition is copied by blocks: no fallback loader (\EFI\BOOT\BOOTX64.EFI) added"),
        "{}",
        notes(&report)
    );
    let (report, _) = run(&image, &DeployHow::mode(Mode::Sectors)).unwrap();
    assert!(
        notes(&report).contains("copied by sectors"),
        "{}",
        notes(&report)
    );
    // Auto chose blocks (a boot loader in the boot sector): verification expects no edits
    // there either.
    let dir = tempfile::tempdir().unwrap();
    let image = esp_disk(dir.path(), true);
    let (report, esp) = run(&image, &DeployHow::default()).unwrap();
    assert_eq!(report.disk.partitions[0].mode, Mode::Blocks);
    assert_eq!(fallback(&esp), None);
    assert_eq!(report.verify.differences, 0);
    assert!(
        notes(&report).contains("copied by blocks"),
        "{}",
        notes(&report)
    );
}

/// Writes `/etc/customized` into Linux roots (partition 2 here), as a customization would.
struct Customizes;

impl TreeTransform for Customizes {
    fn apply(
        &self,
        _partition: u32,
        base: Arc<dyn Filesystem>,
    ) -> diskferry_fs::Result<Option<(TreeOverlay, Vec<String>)>> {
        if !diskferry_fs::is_linux_root(&*base) {
            return Ok(None);
        }
        let mut o = TreeOverlay::new(
            base,
            Timestamp {
                secs: 1_700_000_000,
                nanos: 0,
            },
        );
        o.write_file("/etc/customized", b"yes\n".to_vec(), Attrs::root(0o644))?;
        Ok(Some((o, vec!["wrote /etc/customized".into()])))
    }

    fn describe(&self) -> String {
        "customizes".into()
    }
}

#[test]
fn a_customized_deploy_gets_the_fallback_too_and_blocks_still_refuse_customizing() {
    let dir = tempfile::tempdir().unwrap();
    let image = esp_disk(dir.path(), false);
    let how = DeployHow {
        transform: Some(Arc::new(Customizes)),
        ..DeployHow::default()
    };
    let (report, esp) = run(&image, &how).unwrap();
    assert_eq!(fallback(&esp).as_deref(), Some(GRUB));
    assert_eq!(report.verify.differences, 0);
    assert_eq!(report.disk.partitions[1].changes, ["wrote /etc/customized"]);
    assert_eq!(report.disk.partitions[0].changes.len(), 1);
    let blocks = DeployHow {
        mode: Mode::Blocks,
        ..how
    };
    let err = run(&image, &blocks).map(|_| ()).unwrap_err();
    assert!(matches!(err, DeployError::CannotCustomize(_)), "{err}");
}
