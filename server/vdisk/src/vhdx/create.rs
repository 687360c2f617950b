//! Creating a dynamic VHDX laid out as qemu does: the file identifier, two headers, two
//! region tables, an empty 1 MiB log at 1 MiB, the metadata region at 2 MiB and the BAT at
//! 3 MiB; payload blocks are appended after the BAT as they are written.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ondisk::{
    file_parameters, header, ident, metadata_entry, metadata_table, region_entry, region_table,
    scalar_item, seal, MIB,
};
use super::{Geometry, State, Vhdx};
use crate::error::AtPath;
use crate::{CreateError, ImageError};
use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_layout::Guid;

/// Where our images put the log (always empty), the metadata region and the BAT.
const LOG_OFFSET: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const BAT_OFFSET: u64 = 3 * MIB;

/// The random GUIDs of a new image.
struct Ids {
    file_write: Guid,
    data_write: Guid,
    disk: Guid,
}

impl Vhdx {
    /// Creates a dynamic VHDX of `size` bytes with `block_size` blocks (a power of two,
    /// 1..=256 MiB) and 512- or 4096-byte logical sectors, in the empty `file`.
    pub fn create(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
        block_size: u64,
        logical_sector: u32,
    ) -> Result<Vhdx, ImageError> {
        let geometry = Geometry {
            size,
            block_size,
            logical_sector,
        };
        geometry
            .check()
            .map_err(|(field, value, allowed)| CreateError::Parameter {
                field,
                value,
                allowed,
            })
            .at(path)?;
        if file.size() != 0 {
            return Err(CreateError::NotEmpty).at(path);
        }
        let mut random = [0u8; 48];
        getrandom::fill(&mut random)
            .map_err(CreateError::Random)
            .at(path)?;
        let guid = |i: usize| Guid(random[16 * i..16 * (i + 1)].try_into().unwrap_or([0; 16]));
        let ids = Ids {
            file_write: guid(0),
            data_write: guid(1),
            disk: guid(2),
        };
        let entries = geometry.bat_entries();
        let bat_len = (entries * 8).div_ceil(MIB) * MIB;
        let first_block = BAT_OFFSET + bat_len;
        file.resize(first_block).at(path)?;
        write_structures(&*file, &geometry, &ids, bat_len).at(path)?;
        file.flush().at(path)?;
        Ok(Vhdx {
            file,
            path: path.to_path_buf(),
            size,
            block_size,
            logical_sector,
            chunk_ratio: geometry.chunk_ratio(),
            bat_offset: BAT_OFFSET,
            state: Mutex::new(State {
                bat: vec![0; entries as usize],
                dirty: true,
                next_free: first_block,
            }),
            writable: true,
        })
    }
}

/// Everything before the BAT: identifier, region tables, metadata, and once those are synced
/// the headers — the commit point of creation: a crash before leaves a file that fails to
/// open (no valid header), never a header that points at nothing.
fn write_structures(
    file: &dyn BlockDevice,
    geometry: &Geometry,
    ids: &Ids,
    bat_len: u64,
) -> Result<(), BlockError> {
    let mut id = vec![0u8; ident::LEN];
    ident::SIGNATURE.set(&mut id, ident::SIGNATURE_VALUE);
    ident::CREATOR.set(&mut id, "diskferry");
    file.write_at(&id, 0)?;
    let regions = region_table(bat_len);
    for at in region_table::OFFSETS {
        file.write_at(&regions, at)?;
    }
    file.write_at(&metadata(geometry, ids), METADATA_OFFSET)?;
    file.flush()?;
    for (sequence, at) in header::OFFSETS.into_iter().enumerate() {
        file.write_at(&header(sequence as u64, ids), at)?;
    }
    Ok(())
}

/// A header with `sequence` number; the log GUID stays zero (nothing to replay).
fn header(sequence: u64, ids: &Ids) -> Vec<u8> {
    let mut h = vec![0u8; header::LEN];
    header::SIGNATURE.set(&mut h, header::SIGNATURE_VALUE);
    header::SEQUENCE_NUMBER.set(&mut h, sequence);
    header::FILE_WRITE_GUID.set(&mut h, ids.file_write);
    header::DATA_WRITE_GUID.set(&mut h, ids.data_write);
    header::VERSION.set(&mut h, 1);
    header::LOG_LENGTH.set(&mut h, MIB as u32);
    header::LOG_OFFSET.set(&mut h, LOG_OFFSET);
    seal(&mut h, header::CHECKSUM);
    h
}

/// The region table: the BAT and the metadata region, both required.
fn region_table(bat_len: u64) -> Vec<u8> {
    let mut t = vec![0u8; region_table::LEN];
    region_table::SIGNATURE.set(&mut t, region_table::SIGNATURE_VALUE);
    let regions = [
        (region_entry::BAT, BAT_OFFSET, bat_len),
        (region_entry::METADATA, METADATA_OFFSET, MIB),
    ];
    region_table::ENTRY_COUNT.set(&mut t, regions.len() as u32);
    for (i, (id, offset, len)) in regions.into_iter().enumerate() {
        let e = region_table::ENTRIES.get_mut(&mut t, i);
        region_entry::GUID.set(e, id);
        region_entry::FILE_OFFSET.set(e, offset);
        region_entry::LENGTH.set(e, len as u32);
        region_entry::REQUIRED.set(e, 1);
    }
    seal(&mut t, region_table::CHECKSUM);
    t
}

/// The metadata table with its five items, their values from 64 KiB into the region.
fn metadata(geometry: &Geometry, ids: &Ids) -> Vec<u8> {
    use metadata_entry::{FLAG_IS_REQUIRED as REQUIRED, FLAG_IS_VIRTUAL_DISK as VIRTUAL_DISK};
    let mut params = [0u8; file_parameters::LEN];
    file_parameters::BLOCK_SIZE.set(&mut params, geometry.block_size as u32);
    let mut size = [0u8; 8];
    scalar_item::U64.set(&mut size, geometry.size);
    let (mut logical, mut physical) = ([0u8; 4], [0u8; 4]);
    scalar_item::U32.set(&mut logical, geometry.logical_sector);
    scalar_item::U32.set(&mut physical, 4096);
    let items: [(Guid, &[u8], u32); 5] = [
        (metadata_entry::FILE_PARAMETERS, &params, REQUIRED),
        (
            metadata_entry::VIRTUAL_DISK_SIZE,
            &size,
            VIRTUAL_DISK | REQUIRED,
        ),
        (
            metadata_entry::VIRTUAL_DISK_ID,
            &ids.disk.0,
            VIRTUAL_DISK | REQUIRED,
        ),
        (
            metadata_entry::LOGICAL_SECTOR_SIZE,
            &logical,
            VIRTUAL_DISK | REQUIRED,
        ),
        (
            metadata_entry::PHYSICAL_SECTOR_SIZE,
            &physical,
            VIRTUAL_DISK | REQUIRED,
        ),
    ];
    let mut meta = vec![0u8; metadata_table::VALUES_OFFSET + 4096];
    metadata_table::SIGNATURE.set(&mut meta, metadata_table::SIGNATURE_VALUE);
    metadata_table::ENTRY_COUNT.set(&mut meta, items.len() as u16);
    let mut value_at = metadata_table::VALUES_OFFSET;
    for (i, (id, value, flags)) in items.into_iter().enumerate() {
        let e = metadata_table::ENTRIES.get_mut(&mut meta, i);
        metadata_entry::ITEM_ID.set(e, id);
        metadata_entry::OFFSET.set(e, value_at as u32);
        metadata_entry::LENGTH.set(e, value.len() as u32);
        metadata_entry::FLAGS.set(e, flags);
        meta[value_at..value_at + value.len()].copy_from_slice(value);
        value_at += value.len().next_multiple_of(8);
    }
    meta
}
