//! GPT: the header at LBA 1 (CRC32 over the header, CRC32 over the entry array) and its backup
//! at the last LBA. The primary is used when valid; otherwise the backup, with a warning.

use super::ondisk::{crc32_with_zero_field, gpt_entry, gpt_header};
use super::{Partition, PartitionError, PartitionTable, PartitionType, Result, Scheme};
use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_layout::field::Records;
pub use diskferry_layout::Guid;

/// Largest partition entry array accepted (the usual one is 128 × 128 bytes = 16 KiB).
const MAX_ENTRY_ARRAY: u64 = 4 << 20;

/// Why a GPT header (with its entry array) is unusable.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("LBA {lba} is beyond the disk")]
    BeyondDisk { lba: u64 },
    #[error("reading LBA {lba}: {source}")]
    Io {
        lba: u64,
        #[source]
        source: BlockError,
    },
    #[error("no EFI PART signature")]
    NoSignature,
    #[error("header size {0} is out of range")]
    HeaderSize(u32),
    #[error("header CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("the header found at LBA {lba} says it lives at LBA {claims}")]
    Misplaced { lba: u64, claims: u64 },
    #[error("{count} entries of {size} bytes is not a table we accept")]
    EntryArray { count: u32, size: u32 },
    #[error("usable LBAs {first}..={last} do not fit a {sectors}-sector disk")]
    UsableRange { first: u64, last: u64, sectors: u64 },
    #[error("the partition entry array at LBA {lba} is beyond the disk")]
    ArrayBeyondDisk { lba: u64 },
    #[error(
        "partition entry array CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    ArrayCrc { stored: u32, computed: u32 },
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

/// Reads and checks the header at `lba`, and its entry array.
fn header_at(disk: &dyn BlockDevice, sector: u64, lba: u64) -> Result<Header, HeaderError> {
    let sectors = disk.size() / sector;
    if lba >= sectors {
        return Err(HeaderError::BeyondDisk { lba });
    }
    let read = |buf: &mut [u8], lba: u64| {
        disk.read_at(buf, lba * sector)
            .map_err(|source| HeaderError::Io { lba, source })
    };
    let mut h = vec![0u8; sector as usize];
    read(&mut h, lba)?;
    if gpt_header::SIGNATURE.get(&h) != *gpt_header::SIGNATURE_VALUE {
        return Err(HeaderError::NoSignature);
    }
    let size = gpt_header::HEADER_SIZE.get(&h);
    if !(gpt_header::LEN..=sector as usize).contains(&(size as usize)) {
        return Err(HeaderError::HeaderSize(size));
    }
    let (stored, computed) = (
        gpt_header::HEADER_CRC32.get(&h),
        crc32_with_zero_field(&h[..size as usize], gpt_header::HEADER_CRC32),
    );
    if stored != computed {
        return Err(HeaderError::HeaderCrc { stored, computed });
    }
    let claims = gpt_header::MY_LBA.get(&h);
    if claims != lba {
        return Err(HeaderError::Misplaced { lba, claims });
    }
    let first = gpt_header::FIRST_USABLE_LBA.get(&h);
    let last = gpt_header::LAST_USABLE_LBA.get(&h);
    let entries_lba = gpt_header::PARTITION_ENTRY_LBA.get(&h);
    let count = gpt_header::NUMBER_OF_PARTITION_ENTRIES.get(&h);
    let entry_size = gpt_header::SIZE_OF_PARTITION_ENTRY.get(&h);
    let array_len = u64::from(count) * u64::from(entry_size);
    if (entry_size as usize) < gpt_entry::LEN
        || !entry_size.is_multiple_of(8)
        || array_len > MAX_ENTRY_ARRAY
    {
        return Err(HeaderError::EntryArray {
            count,
            size: entry_size,
        });
    }
    if first > last || last >= sectors {
        return Err(HeaderError::UsableRange {
            first,
            last,
            sectors,
        });
    }
    if entries_lba.saturating_mul(sector).saturating_add(array_len) > disk.size() {
        return Err(HeaderError::ArrayBeyondDisk { lba: entries_lba });
    }
    let mut entries = vec![0u8; array_len as usize];
    read(&mut entries, entries_lba)?;
    let (stored, computed) = (
        gpt_header::PARTITION_ENTRY_ARRAY_CRC32.get(&h),
        crc32fast::hash(&entries),
    );
    if stored != computed {
        return Err(HeaderError::ArrayCrc { stored, computed });
    }
    Ok(Header {
        disk_guid: gpt_header::DISK_GUID.get(&h),
        first_usable: first,
        last_usable: last,
        entries,
        entry_size: entry_size as usize,
        alternate: gpt_header::ALTERNATE_LBA.get(&h),
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
            Err(_) if matches!(primary, HeaderError::NoSignature) => return Ok(None),
            Err(backup) => {
                return Err(PartitionError::NoValidGpt {
                    primary: Box::new(primary),
                    backup: Box::new(backup),
                })
            }
        },
    };
    let partitions = partitions(&header, sector, &mut warnings);
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

/// The used entries of the array, numbered by index + 1; entries outside the usable area are
/// skipped with a warning.
fn partitions(header: &Header, sector: u64, warnings: &mut Vec<String>) -> Vec<Partition> {
    let array = Records::new(0, header.entry_size);
    let mut partitions = Vec::new();
    for i in 0..array.fit(header.entries.len()) {
        let e = array.get(&header.entries, i);
        let type_guid = gpt_entry::TYPE_GUID.get(e);
        if type_guid.is_zero() {
            continue;
        }
        let (first, last) = (gpt_entry::STARTING_LBA.get(e), gpt_entry::ENDING_LBA.get(e));
        let number = i as u32 + 1;
        if first > last || first < header.first_usable || last > header.last_usable {
            warnings.push(format!(
                "partition {number} (LBA {first}..={last}) lies outside the usable area; skipped"
            ));
            continue;
        }
        partitions.push(Partition {
            number,
            start: first * sector,
            size: (last - first + 1) * sector,
            kind: PartitionType::Gpt(type_guid),
            guid: Some(gpt_entry::UNIQUE_GUID.get(e)),
            name: gpt_entry::NAME.get(e),
            attributes: gpt_entry::ATTRIBUTES.get(e),
            bootable: false,
        });
    }
    partitions
}
