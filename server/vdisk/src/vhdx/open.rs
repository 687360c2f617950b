//! Opening a VHDX: the file identifier, the current header, the log (replayed in memory), a
//! valid region table, the metadata items and the BAT — each bounded and checked before use.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ondisk::{
    bat, checksum, file_parameters, header, ident, metadata_entry, metadata_table, region_entry,
    region_table, scalar_item, MIB,
};
use super::{log, Geometry, State, Vhdx};
use crate::error::{check_field, Allowed, AtPath};
use crate::read_bounded as read;
use crate::{FormatError, ImageError};
use diskferry_blockdev::BlockDevice;
use diskferry_layout::Guid;

/// Largest metadata region and BAT accepted (a BAT of 256 MiB maps petabytes).
const MAX_METADATA: u64 = MIB;
const MAX_BAT: u64 = 256 * MIB;

type Result<T> = std::result::Result<T, ImageError>;

/// Where a region lies in the file.
#[derive(Clone, Copy)]
struct Region {
    offset: u64,
    len: u64,
}

impl Vhdx {
    /// Opens an image read-only. A log left by a writer that stopped before applying it is
    /// replayed in memory (the file is not changed).
    pub fn open(file: Arc<dyn BlockDevice>, path: &Path) -> Result<Vhdx> {
        if read(&*file, path, "file identifier", 8, 0)? != ident::SIGNATURE_VALUE {
            return Err(FormatError::NotFormat {
                format: "VHDX",
                magic: "vhdxfile",
            })
            .at(path);
        }
        let current = current_header(&*file, path)?;
        let file = replay_log(file, path, &current)?;
        let (meta_region, bat_region) = regions(&*file, path)?;
        let meta = read(
            &*file,
            path,
            "metadata region",
            meta_region.len,
            meta_region.offset,
        )?;
        let geometry = parameters(&meta, path)?;
        let chunk_ratio = geometry.chunk_ratio();
        let needed = bat::entries(geometry.blocks(), chunk_ratio) * bat::ENTRY_LEN;
        check_field(
            "region table",
            "BAT length",
            bat_region.len,
            Allowed::Range {
                min: needed,
                max: MAX_BAT,
            },
        )
        .at(path)?;
        let raw = read(&*file, path, "BAT", needed, bat_region.offset)?;
        let bat: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let next_free = file.size().div_ceil(MIB) * MIB;
        Ok(Vhdx {
            file,
            path: path.to_path_buf(),
            size: geometry.size,
            block_size: geometry.block_size,
            logical_sector: geometry.logical_sector,
            chunk_ratio,
            bat_offset: bat_region.offset,
            state: Mutex::new(State {
                bat,
                dirty: false,
                next_free,
            }),
            writable: false,
        })
    }
}

/// The current header: a valid signature and checksum, and the highest sequence number.
fn current_header(file: &dyn BlockDevice, path: &Path) -> Result<Vec<u8>> {
    let mut current: Option<Vec<u8>> = None;
    for at in header::OFFSETS {
        let h = read(file, path, "header", header::LEN as u64, at)?;
        if header::SIGNATURE.get(&h) != *header::SIGNATURE_VALUE
            || header::CHECKSUM.get(&h) != checksum(&h, header::CHECKSUM)
        {
            continue;
        }
        let newer = |c: &Vec<u8>| header::SEQUENCE_NUMBER.get(&h) > header::SEQUENCE_NUMBER.get(c);
        if current.as_ref().is_none_or(newer) {
            current = Some(h);
        }
    }
    current
        .ok_or(FormatError::NoValidCopy {
            structure: "header",
        })
        .at(path)
}

/// The file as it reads after replaying the log the header names (the file itself is never
/// changed); the file as it is when the header names no log or the log holds nothing valid.
fn replay_log(
    file: Arc<dyn BlockDevice>,
    path: &Path,
    current: &[u8],
) -> Result<Arc<dyn BlockDevice>> {
    let guid = header::LOG_GUID.get(current);
    if guid.is_zero() {
        return Ok(file);
    }
    let (len, offset) = (
        u64::from(header::LOG_LENGTH.get(current)),
        header::LOG_OFFSET.get(current),
    );
    if len == 0 || !len.is_multiple_of(MIB) || !offset.is_multiple_of(MIB) || len > log::MAX_LOG {
        return Err(FormatError::from(log::LogError::Misplaced { offset, len })).at(path);
    }
    let raw = read(&*file, path, "log", len, offset)?;
    match log::replay(&raw, guid)
        .map_err(FormatError::from)
        .at(path)?
    {
        Some(replay) if replay.flushed_file_offset > file.size() => {
            Err(FormatError::from(log::LogError::Truncated {
                file_size: file.size(),
                flushed: replay.flushed_file_offset,
            }))
            .at(path)
        }
        Some(replay) => Ok(Arc::new(log::Replayed::new(file, replay))),
        // A log GUID with no valid entries: nothing was logged that needs replaying.
        None => Ok(file),
    }
}

/// The metadata region and the BAT region from the first valid region table.
fn regions(file: &dyn BlockDevice, path: &Path) -> Result<(Region, Region)> {
    let mut tables = Vec::new();
    for at in region_table::OFFSETS {
        tables.push(read(
            file,
            path,
            "region table",
            region_table::LEN as u64,
            at,
        )?);
    }
    let table = tables
        .into_iter()
        .find(|t| {
            region_table::SIGNATURE.get(t) == *region_table::SIGNATURE_VALUE
                && region_table::CHECKSUM.get(t) == checksum(t, region_table::CHECKSUM)
        })
        .ok_or(FormatError::NoValidCopy {
            structure: "region table",
        })
        .at(path)?;
    let count = region_table::ENTRY_COUNT.get(&table) as usize;
    let max = region_table::MAX_ENTRIES.min(region_table::ENTRIES.fit(table.len()));
    if count > max {
        return Err(FormatError::TooManyEntries {
            structure: "region table",
            count: count as u64,
            max: max as u64,
        })
        .at(path);
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..count {
        let e = region_table::ENTRIES.get(&table, i);
        let offset = region_entry::FILE_OFFSET.get(e);
        let len = u64::from(region_entry::LENGTH.get(e));
        if !offset.is_multiple_of(MIB)
            || !len.is_multiple_of(MIB)
            || offset.saturating_add(len) > file.size()
        {
            return Err(FormatError::Misplaced {
                structure: "region",
                index: Some(i as u64),
                offset,
            })
            .at(path);
        }
        match region_entry::GUID.get(e) {
            region_entry::BAT => bat = Some(Region { offset, len }),
            region_entry::METADATA => meta = Some(Region { offset, len }),
            id if region_entry::REQUIRED.get(e) & 1 != 0 => {
                return Err(FormatError::UnknownRequired {
                    structure: "region table",
                    index: i as u64,
                    id,
                })
                .at(path)
            }
            _ => {}
        }
    }
    let missing = |item| FormatError::Missing {
        structure: "region table",
        item,
    };
    let meta = meta.ok_or(missing("metadata region")).at(path)?;
    let bat = bat.ok_or(missing("BAT region")).at(path)?;
    check_field(
        "region table",
        "metadata region length",
        meta.len,
        Allowed::Limit(MAX_METADATA),
    )
    .at(path)?;
    Ok((meta, bat))
}

/// The value of metadata item `id`, at least `len` bytes of it.
fn item<'m>(
    meta: &'m [u8],
    id: Guid,
    len: usize,
    name: &'static str,
) -> std::result::Result<&'m [u8], FormatError> {
    let entries = usize::from(metadata_table::ENTRY_COUNT.get(meta));
    for i in 0..entries {
        let e = metadata_table::ENTRIES.get(meta, i);
        if metadata_entry::ITEM_ID.get(e) == id {
            let offset = metadata_entry::OFFSET.get(e) as usize;
            let stored = metadata_entry::LENGTH.get(e) as usize;
            if stored < len || offset.saturating_add(len) > meta.len() {
                return Err(FormatError::Misplaced {
                    structure: "metadata item",
                    index: Some(i as u64),
                    offset: offset as u64,
                });
            }
            return Ok(&meta[offset..offset + len]);
        }
    }
    Err(FormatError::Missing {
        structure: "metadata table",
        item: name,
    })
}

/// Block size, sector size and virtual size from the metadata region; differencing images
/// are refused.
fn parameters(meta: &[u8], path: &Path) -> Result<Geometry> {
    if meta.len() < metadata_table::ENTRIES.offset {
        return Err(FormatError::Short {
            structure: "metadata region",
            len: meta.len() as u64,
            needed: metadata_table::ENTRIES.offset as u64,
        })
        .at(path);
    }
    if metadata_table::SIGNATURE.get(meta) != *metadata_table::SIGNATURE_VALUE {
        return Err(FormatError::Missing {
            structure: "metadata region",
            item: "metadata signature",
        })
        .at(path);
    }
    let entries = usize::from(metadata_table::ENTRY_COUNT.get(meta));
    let max = metadata_table::MAX_ENTRIES.min(metadata_table::ENTRIES.fit(meta.len()));
    if entries > max {
        return Err(FormatError::TooManyEntries {
            structure: "metadata table",
            count: entries as u64,
            max: max as u64,
        })
        .at(path);
    }
    let params = item(
        meta,
        metadata_entry::FILE_PARAMETERS,
        file_parameters::LEN,
        "file parameters item",
    )
    .at(path)?;
    if file_parameters::FLAGS.get(params) & file_parameters::FLAG_HAS_PARENT != 0 {
        return Err(ImageError::Unsupported {
            path: path.to_path_buf(),
            feature: "differencing VHDX (has a parent)".into(),
        });
    }
    let size = item(
        meta,
        metadata_entry::VIRTUAL_DISK_SIZE,
        8,
        "virtual disk size item",
    )
    .at(path)?;
    let sector = item(
        meta,
        metadata_entry::LOGICAL_SECTOR_SIZE,
        4,
        "logical sector size item",
    )
    .at(path)?;
    let geometry = Geometry {
        size: scalar_item::U64.get(size),
        block_size: u64::from(file_parameters::BLOCK_SIZE.get(params)),
        logical_sector: scalar_item::U32.get(sector),
    };
    geometry
        .check()
        .map_err(|(field, value, allowed)| FormatError::Field {
            structure: "metadata",
            field,
            value,
            allowed,
        })
        .at(path)?;
    Ok(geometry)
}
