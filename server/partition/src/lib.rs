//! Partition tables: reading MBR (with extended/logical partitions) and GPT (primary header,
//! falling back to the backup) into one [`PartitionTable`], and giving each partition as a
//! [`BlockDevice`] slice.
//!
//! Everything read from the disk is checked before use: table sizes are bounded, CRCs are
//! verified, partitions must lie inside the disk, and the chain of extended boot records is
//! walked at most [`mbr::MAX_LOGICAL`] steps with loop detection.

pub mod gpt;
pub mod mbr;
pub mod nested;
pub mod ondisk;
mod resize;
mod types;
mod write;

use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockError, SliceDevice};
pub use gpt::Guid;
pub use resize::{Anchor, Gap};
pub use types::{gpt_types, is_bios_boot, is_efi_system, type_name};
pub use write::write_table;

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("reading the partition table: {0}")]
    Io(#[from] BlockError),
    #[error("the partition table is damaged: {0}")]
    Damaged(String),
    #[error(
        "the partition table is damaged: neither GPT header is valid \
         (primary GPT: {primary}; backup GPT: {backup})"
    )]
    NoValidGpt {
        primary: Box<gpt::HeaderError>,
        backup: Box<gpt::HeaderError>,
    },
}

pub type Result<T, E = PartitionError> = std::result::Result<T, E>;

/// Which partitioning scheme a disk uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Mbr,
    Gpt,
    /// No table: the whole disk is one filesystem (or nothing known).
    None,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Mbr => "mbr",
            Scheme::Gpt => "gpt",
            Scheme::None => "none",
        }
    }
}

/// A partition's type, as its table records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionType {
    /// MBR system ID.
    Mbr(u8),
    /// GPT partition type GUID.
    Gpt(Guid),
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Numbered as the table does: GPT entry index + 1; MBR slots 1–4, logical partitions
    /// from 5 in chain order.
    pub number: u32,
    /// Offset and length in bytes.
    pub start: u64,
    pub size: u64,
    pub kind: PartitionType,
    /// GPT: the unique partition GUID, name and attribute bits.
    pub guid: Option<Guid>,
    pub name: String,
    pub attributes: u64,
    /// MBR: the active (boot) flag.
    pub bootable: bool,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }

    /// A readable name for the partition's type ("EFI System", "Linux filesystem", ...).
    pub fn type_name(&self) -> String {
        type_name(&self.kind)
    }
}

/// A disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    pub scheme: Scheme,
    /// The sector size the table is laid out in.
    pub sector_size: u32,
    /// GPT disk GUID.
    pub disk_guid: Option<Guid>,
    /// MBR disk signature (bytes 440..444).
    pub mbr_signature: Option<u32>,
    pub partitions: Vec<Partition>,
    /// GPT: how many entries the entry array holds (usually 128).
    pub gpt_entries: u32,
    /// MBR: the extended partition holding the logical ones, if any.
    pub mbr_extended: Option<MbrExtended>,
    /// Things a user should know: a damaged primary GPT, skipped entries.
    pub warnings: Vec<String>,
}

/// An MBR's extended partition: where it lies, its system ID, and the byte offset of the
/// extended boot record before each logical partition (in partition order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrExtended {
    pub slot: u32,
    pub start: u64,
    pub size: u64,
    pub system_id: u8,
    pub ebrs: Vec<u64>,
}

/// Reads the partition table of `disk`. A disk with no recognisable table gives
/// [`Scheme::None`] and no partitions; a table that is present but damaged beyond use is an
/// error saying what is wrong.
pub fn read_table(disk: &dyn BlockDevice) -> Result<PartitionTable> {
    let mut sector0 = vec![0u8; ondisk::mbr::LEN];
    if disk.size() < ondisk::mbr::LEN as u64 {
        return Ok(none(disk));
    }
    disk.read_at(&mut sector0, 0)?;
    let mbr = mbr::parse_sector(&sector0);
    let protective = mbr.as_ref().is_some_and(|m| {
        m.entries
            .iter()
            .any(|e| e.system_id == ondisk::mbr_entry::PROTECTIVE_ID)
    });
    // A GPT may also hide behind a hybrid MBR; look for one whenever the MBR points at it, or
    // when there is no MBR at all (some tools write none).
    if protective || mbr.is_none() {
        let preferred = disk.logical_sector_size();
        for sector in [preferred, if preferred == 512 { 4096 } else { 512 }] {
            if let Some(table) = gpt::read(disk, sector)? {
                let mut table = table;
                table.mbr_signature = mbr.as_ref().map(|m| m.signature);
                return Ok(table);
            }
        }
        if protective {
            return Err(PartitionError::Damaged(
                "the MBR says the disk is GPT, but neither GPT header is valid".into(),
            ));
        }
    }
    match mbr {
        Some(m) if m.entries.iter().any(|e| e.system_id != 0) && !m.looks_like_boot_sector => {
            mbr::read(disk, &m)
        }
        _ => Ok(none(disk)),
    }
}

fn none(disk: &dyn BlockDevice) -> PartitionTable {
    PartitionTable {
        scheme: Scheme::None,
        sector_size: disk.logical_sector_size(),
        disk_guid: None,
        mbr_signature: None,
        partitions: Vec::new(),
        gpt_entries: 0,
        mbr_extended: None,
        warnings: Vec::new(),
    }
}

/// The partition as a block device of its own.
pub fn open_partition(disk: Arc<dyn BlockDevice>, partition: &Partition) -> Result<SliceDevice> {
    Ok(SliceDevice::new(disk, partition.start, partition.size)?)
}
