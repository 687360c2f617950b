//! Opening a VHD: a footer with a valid checksum (the one at the end, else the copy at the
//! start), the virtual size as qemu computes it, and for a dynamic disk its header and BAT —
//! each bounded and checked before use.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ondisk::{bat, bitmap_len, checksum, dynamic, footer, Chs, SECTOR, SIZED_BY_FOOTER};
use super::{Layout, State, Vhd};
use crate::error::{check_field, Allowed, AtPath};
use crate::{read_bounded, Foreign, FormatError, ImageError};
use diskferry_blockdev::BlockDevice;

/// Largest virtual size (2040 GiB, as qemu allows).
pub(crate) const MAX_SIZE: u64 = 0xff00_0000 * SECTOR;
/// Most BAT entries accepted (16 Mi entries map 32 TiB of 2 MiB blocks).
const MAX_BAT_ENTRIES: u64 = 1 << 24;

type Result<T> = std::result::Result<T, ImageError>;

impl Vhd {
    /// Opens an image read-only.
    pub fn open(file: Arc<dyn BlockDevice>, path: &Path) -> Result<Vhd> {
        let (foot, at_end) = find_footer(&*file)
            .at(path)?
            .ok_or(FormatError::NotFormat {
                format: "VHD",
                magic: "conectix",
            })
            .at(path)?;
        let size = virtual_size(&foot);
        check_field(
            "footer",
            "virtual size",
            size,
            Allowed::Range {
                min: SECTOR,
                max: MAX_SIZE,
            },
        )
        .at(path)?;
        let (layout, bat) = match footer::DISK_TYPE.get(&foot) {
            footer::TYPE_FIXED => {
                if !at_end || size > file.size() - footer::LEN as u64 {
                    return Err(FormatError::BeyondEnd {
                        structure: "fixed disk data",
                        offset: 0,
                        len: size,
                    })
                    .at(path);
                }
                (Layout::Fixed, Vec::new())
            }
            footer::TYPE_DYNAMIC => dynamic_tables(&*file, path, &foot, size)?,
            footer::TYPE_DIFFERENCING => {
                return Err(ImageError::Foreign {
                    path: path.to_path_buf(),
                    format: Foreign::VhdDifferencing,
                })
            }
            other => {
                return Err(FormatError::Field {
                    structure: "footer",
                    field: "disk type",
                    value: u64::from(other),
                    allowed: Allowed::OneOf(&[2, 3, 4]),
                })
                .at(path)
            }
        };
        Ok(Vhd {
            path: path.to_path_buf(),
            size,
            layout,
            footer: foot,
            state: Mutex::new(State {
                bat,
                dirty: false,
                next_free: file.size(),
            }),
            file,
            writable: false,
        })
    }
}

/// The footer with a valid cookie and checksum — the one at the end if it is, else the copy at
/// the start — and whether it was the one at the end. `None` when neither is.
pub(crate) fn find_footer(
    file: &dyn BlockDevice,
) -> std::result::Result<Option<(Vec<u8>, bool)>, diskferry_blockdev::BlockError> {
    let len = footer::LEN as u64;
    if file.size() < len {
        return Ok(None);
    }
    for (at, at_end) in [(file.size() - len, true), (0, false)] {
        let mut f = vec![0u8; footer::LEN];
        file.read_at(&mut f, at)?;
        if footer::COOKIE.get(&f) == *footer::COOKIE_VALUE
            && footer::CHECKSUM.get(&f) == checksum(&f, footer::CHECKSUM)
        {
            return Ok(Some((f, at_end)));
        }
    }
    Ok(None)
}

/// The virtual size as qemu reads it: the geometry's, unless the creator sizes by the footer
/// or the geometry is the largest there is.
pub(crate) fn virtual_size(foot: &[u8]) -> u64 {
    let chs = Chs {
        cylinders: footer::CYLINDERS.get(foot),
        heads: footer::HEADS.get(foot),
        sectors: footer::SECTORS_PER_TRACK.get(foot),
    };
    let app = footer::CREATOR_APP.get(foot);
    if SIZED_BY_FOOTER.contains(&&app) || chs.total_sectors() == Chs::MAX.total_sectors() {
        footer::CURRENT_SIZE.get(foot) / SECTOR * SECTOR
    } else {
        chs.total_sectors() * SECTOR
    }
}

/// The dynamic header's block size and BAT, checked against the virtual size and the file.
fn dynamic_tables(
    file: &dyn BlockDevice,
    path: &Path,
    foot: &[u8],
    size: u64,
) -> Result<(Layout, Vec<u32>)> {
    let header_at = footer::DATA_OFFSET.get(foot);
    let h = read_bounded(
        file,
        path,
        "dynamic disk header",
        dynamic::LEN as u64,
        header_at,
    )?;
    if dynamic::COOKIE.get(&h) != *dynamic::COOKIE_VALUE {
        return Err(FormatError::NotFormat {
            format: "dynamic VHD",
            magic: "cxsparse",
        })
        .at(path);
    }
    if dynamic::CHECKSUM.get(&h) != checksum(&h, dynamic::CHECKSUM) {
        return Err(FormatError::NoValidCopy {
            structure: "dynamic disk header",
        })
        .at(path);
    }
    let block_size = u64::from(dynamic::BLOCK_SIZE.get(&h));
    check_field(
        "dynamic disk header",
        "block size",
        block_size,
        Allowed::PowerOfTwo {
            min: 4096,
            max: 256 << 20,
        },
    )
    .at(path)?;
    let entries = u64::from(dynamic::MAX_TABLE_ENTRIES.get(&h));
    check_field(
        "dynamic disk header",
        "max table entries",
        entries,
        Allowed::Range {
            min: size.div_ceil(block_size),
            max: MAX_BAT_ENTRIES,
        },
    )
    .at(path)?;
    let bat_offset = dynamic::TABLE_OFFSET.get(&h);
    let raw = read_bounded(file, path, "BAT", entries * bat::ENTRY_LEN, bat_offset)?;
    let bat = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap_or([0xff; 4])))
        .collect();
    let layout = Layout::Dynamic {
        block_size,
        bitmap_len: bitmap_len(block_size),
        bat_offset,
    };
    Ok((layout, bat))
}
