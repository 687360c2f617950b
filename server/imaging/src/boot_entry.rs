//! The UEFI boot entry of a deployed disk: an `EFI_LOAD_OPTION` naming the loader on its EFI
//! system partition (the vendor's shim, else its GRUB, as `grub-install` registers it), which
//! a machine's agent writes through efivarfs when it may (`--allow-firmware`). With it, the
//! firmware starts the deployed system even where `\EFI\BOOT\BOOTX64.EFI` is not used.
//!
//! The load option: attributes `LOAD_OPTION_ACTIVE`, the description in UTF-16, and the device
//! path `HD(partition, GPT, unique GUID, start, size)/File(loader)/End` — the short form
//! firmware expands against its disks, as efibootmgr writes it. GPT disks only.

use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, SliceDevice};
use diskferry_partition::{is_efi_system, Partition, Scheme};
use diskferry_protocol::{Reply, Request};
use diskferry_remote::Connection;

/// `LOAD_OPTION_ACTIVE`.
const ACTIVE: u32 = 1;

/// A boot entry for a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    /// The `EFI_LOAD_OPTION` bytes.
    pub load_option: Vec<u8>,
    /// The loader it starts (`\EFI\debian\shimx64.efi`).
    pub loader: String,
    /// The EFI system partition's number.
    pub partition: u32,
    /// What the firmware's boot menu shows.
    pub description: String,
}

/// After a deploy: registers `disk`'s boot entry on the machine whose agent answers on `conn`.
/// Returns the line to log; never fails the deploy (an agent without `--allow-firmware`, a
/// BIOS machine or a disk without a vendor loader gets a note).
pub fn register(conn: &Connection, disk: &Arc<dyn BlockDevice>) -> String {
    let entry = match for_disk(disk) {
        Ok(e) => e,
        Err(why) => return format!("no UEFI boot entry registered: {why}"),
    };
    let request = Request::SetBootEntry {
        load_option: entry.load_option.clone().into(),
    };
    match conn.call_blocking(request) {
        Ok(Reply::BootEntry(n)) => format!(
            "UEFI boot entry Boot{n:04X} \"{}\" starts {} (partition {}), first in the boot order",
            entry.description, entry.loader, entry.partition
        ),
        Ok(Reply::Error { message, .. }) => format!("no UEFI boot entry registered: {message}"),
        Ok(_) => "no UEFI boot entry registered: the agent answered something else".into(),
        Err(e) => format!("no UEFI boot entry registered: {e}"),
    }
}

/// The boot entry for `disk`'s first EFI system partition holding a vendor loader, named
/// after the vendor (`debian`, as `grub-install` names it); `Err` says why there is none (not
/// GPT, no such partition).
pub fn for_disk(disk: &Arc<dyn BlockDevice>) -> Result<BootEntry, String> {
    let table = diskferry_partition::read_table(&**disk)
        .map_err(|e| format!("no partition table to register: {e}"))?;
    if table.scheme != Scheme::Gpt {
        return Err("boot entries are registered for GPT disks only".into());
    }
    let sector = u64::from(table.sector_size);
    for p in table.partitions.iter().filter(|p| is_efi_system(&p.kind)) {
        let Ok(slice) = SliceDevice::new(Arc::clone(disk), p.start, p.size) else {
            continue;
        };
        let Ok(fs) = diskferry_fs::open(Arc::new(slice)) else {
            continue;
        };
        if let Ok(Some(loader)) = diskferry_fs::esp::vendor_loader(&*fs) {
            let description = loader.split('\\').nth(2).unwrap_or("linux").to_string();
            return Ok(BootEntry {
                load_option: load_option(p, sector, &loader, &description),
                loader,
                description,
                partition: p.number,
            });
        }
    }
    Err("no EFI system partition holds a vendor's loader (\\EFI\\<vendor>\\grubx64.efi)".into())
}

/// `EFI_LOAD_OPTION` for `loader` on partition `p` (sectors of `sector` bytes).
pub fn load_option(p: &Partition, sector: u64, loader: &str, description: &str) -> Vec<u8> {
    let mut path = Vec::new();
    // Hard drive media device path: type 4, subtype 1, 42 bytes.
    path.extend_from_slice(&[4, 1, 42, 0]);
    path.extend_from_slice(&p.number.to_le_bytes());
    path.extend_from_slice(&(p.start / sector).to_le_bytes());
    path.extend_from_slice(&(p.size / sector).to_le_bytes());
    path.extend_from_slice(&p.guid.map(|g| g.0).unwrap_or_default());
    path.extend_from_slice(&[2, 2]); // GPT, GUID signature
                                     // File path media device path: type 4, subtype 4, the path in UTF-16 with its NUL.
    let file: Vec<u8> = utf16z(loader);
    path.extend_from_slice(&[4, 4]);
    path.extend_from_slice(&((4 + file.len()) as u16).to_le_bytes());
    path.extend_from_slice(&file);
    // End of the whole device path.
    path.extend_from_slice(&[0x7f, 0xff, 4, 0]);
    let mut out = ACTIVE.to_le_bytes().to_vec();
    out.extend_from_slice(&(path.len() as u16).to_le_bytes());
    out.extend_from_slice(&utf16z(description));
    out.extend_from_slice(&path);
    out
}

fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain([0])
        .flat_map(u16::to_le_bytes)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_partition::{Guid, PartitionType};

    #[test]
    fn the_load_option_is_laid_out_as_the_uefi_specification_says() {
        let guid = Guid::parse("0f0e0d0c-0b0a-0908-0706-050403020100").unwrap();
        let p = Partition {
            number: 1,
            start: 1 << 20,
            size: 100 << 20,
            kind: PartitionType::Gpt(
                Guid::parse(diskferry_partition::gpt_types::EFI_SYSTEM).unwrap(),
            ),
            guid: Some(guid),
            name: String::new(),
            attributes: 0,
            bootable: false,
        };
        let o = load_option(&p, 512, "\\EFI\\d\\g.efi", "d");
        // attributes, path list length, "d\0"
        assert_eq!(&o[..4], &[1, 0, 0, 0]);
        let list = u16::from_le_bytes([o[4], o[5]]) as usize;
        assert_eq!(&o[6..10], &[b'd', 0, 0, 0]);
        let path = &o[10..];
        assert_eq!(path.len(), list);
        assert_eq!(&path[..4], &[4, 1, 42, 0]);
        assert_eq!(u32::from_le_bytes(path[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(path[8..16].try_into().unwrap()), 2048);
        assert_eq!(u64::from_le_bytes(path[16..24].try_into().unwrap()), 204800);
        assert_eq!(&path[24..40], &guid.0);
        assert_eq!(&path[40..42], &[2, 2]);
        let file_len = u16::from_le_bytes([path[44], path[45]]) as usize;
        assert_eq!(file_len, 4 + 2 * ("\\EFI\\d\\g.efi".len() + 1));
        assert_eq!(&path[42 + file_len..], &[0x7f, 0xff, 4, 0]);
    }
}
