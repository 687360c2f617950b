//! GPT: the header at LBA 1 (CRC32 over the header, CRC32 over the entry array) and its backup
//! at the last LBA. The primary is used when valid; otherwise the backup, with a warning.

use super::{Partition, PartitionTable, PartitionType, Result, Scheme};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::le::{le32, le64};
pub use diskferry_layout::Guid;

/// Largest partition entry array accepted (the usual one is 128 × 128 bytes = 16 KiB).
const MAX_ENTRY_ARRAY: u64 = 4 << 20;

fn crc32_with_zero_field(data: &[u8], at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&data[..at]);
    h.update(&[0; 4]);
    h.update(&data[at + 4..]);
    h.finalize()
}

/// A header that checked out, with its entry array.
struct Header {
    disk_guid: Guid,
    first_usable: u64,
    last_usable: u64,
    entries: Vec<u8>,
    entry_size: usize,
    alternate: u64,
}

/// Reads and checks the header at `lba`; `Err` says why it is unusable.
fn header_at(disk: &dyn BlockDevice, sector: u64, lba: u64) -> Result<Header, String> {
    let sectors = disk.size() / sector;
    if lba >= sectors {
        return Err(format!("LBA {lba} is beyond the disk"));
    }
    let mut h = vec![0u8; sector as usize];
    disk.read_at(&mut h, lba * sector)
        .map_err(|e| e.to_string())?;
    if &h[..8] != b"EFI PART" {
        return Err("no EFI PART signature".into());
    }
    let size = le32(&h, 12) as usize;
    if !(92..=sector as usize).contains(&size) {
        return Err(format!("header size {size} is out of range"));
    }
    if crc32_with_zero_field(&h[..size], 16) != le32(&h, 16) {
        return Err("header CRC32 mismatch".into());
    }
    if le64(&h, 24) != lba {
        return Err("the header does not say it lives where it was found".into());
    }
    let (first_usable, last_usable) = (le64(&h, 40), le64(&h, 48));
    let entries_lba = le64(&h, 72);
    let (count, entry_size) = (u64::from(le32(&h, 80)), u64::from(le32(&h, 84)));
    if entry_size < 128 || entry_size % 8 != 0 || count * entry_size > MAX_ENTRY_ARRAY {
        return Err(format!(
            "{count} entries of {entry_size} bytes is not a table we accept"
        ));
    }
    if first_usable > last_usable || last_usable >= sectors {
        return Err(format!(
            "usable LBAs {first_usable}..={last_usable} do not fit a {sectors}-sector disk"
        ));
    }
    let array_len = count * entry_size;
    if entries_lba.saturating_mul(sector).saturating_add(array_len) > disk.size() {
        return Err("the partition entry array is beyond the disk".into());
    }
    let mut entries = vec![0u8; array_len as usize];
    disk.read_at(&mut entries, entries_lba * sector)
        .map_err(|e| e.to_string())?;
    if crc32fast::hash(&entries) != le32(&h, 88) {
        return Err("partition entry array CRC32 mismatch".into());
    }
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&h[56..72]);
    Ok(Header {
        disk_guid: Guid(guid),
        first_usable,
        last_usable,
        entries,
        entry_size: entry_size as usize,
        alternate: le64(&h, 32),
    })
}

/// The GPT of `disk` laid out in `sector`-byte sectors; `None` if neither header is there.
pub fn read(disk: &dyn BlockDevice, sector: u32) -> Result<Option<PartitionTable>> {
    let sector = u64::from(sector);
    if disk.size() < sector * 3 {
        return Ok(None);
    }
    let last = disk.size() / sector - 1;
    let mut warnings = Vec::new();
    let header = match header_at(disk, sector, 1) {
        Ok(h) => {
            if let Err(why) = header_at(disk, sector, h.alternate.min(last)) {
                warnings.push(format!("the backup GPT header is unusable ({why})"));
            }
            h
        }
        Err(primary) => match header_at(disk, sector, last) {
            Ok(h) => {
                warnings.push(format!(
                    "the primary GPT header is unusable ({primary}); read the backup"
                ));
                h
            }
            Err(_) if primary == "no EFI PART signature" => return Ok(None),
            Err(backup) => {
                return Err(super::PartitionError::Damaged(format!(
                    "primary GPT: {primary}; backup GPT: {backup}"
                )))
            }
        },
    };
    let mut partitions = Vec::new();
    for (i, e) in header.entries.chunks_exact(header.entry_size).enumerate() {
        let mut type_guid = [0u8; 16];
        type_guid.copy_from_slice(&e[..16]);
        if type_guid == [0; 16] {
            continue;
        }
        let mut unique = [0u8; 16];
        unique.copy_from_slice(&e[16..32]);
        let (first, last_lba) = (le64(e, 32), le64(e, 40));
        let number = i as u32 + 1;
        if first > last_lba || first < header.first_usable || last_lba > header.last_usable {
            warnings.push(format!(
                "partition {number} (LBA {first}..={last_lba}) lies outside the usable area; skipped"
            ));
            continue;
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        partitions.push(Partition {
            number,
            start: first * sector,
            size: (last_lba - first + 1) * sector,
            kind: PartitionType::Gpt(Guid(type_guid)),
            guid: Some(Guid(unique)),
            name: String::from_utf16_lossy(&name),
            attributes: le64(e, 48),
            bootable: false,
        });
    }
    Ok(Some(PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: sector as u32,
        disk_guid: Some(header.disk_guid),
        mbr_signature: None,
        partitions,
        gpt_entries: (header.entries.len() / header.entry_size) as u32,
        mbr_extended: None,
        warnings,
    }))
}

#[cfg(test)]
mod tests {
    use super::Guid;

    #[test]
    fn guids_print_and_parse_in_the_mixed_endian_order_gpt_stores() {
        let esp = Guid::parse("C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap();
        assert_eq!(esp.0[..4], [0x28, 0x73, 0x2A, 0xC1]);
        assert_eq!(esp.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert!(Guid::parse("C12A7328F81F11D2BA4B00A0C93EC93B").is_none());
    }
}
