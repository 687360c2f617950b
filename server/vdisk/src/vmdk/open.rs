//! Opening a VMDK sparse extent: the header (for a stream-optimized image whose header says
//! "directory at the end", the footer before the end-of-stream marker), its fields checked,
//! then the grain directory and the grain tables it points to — every size bounded and every
//! table inside the file, and all tables together no larger than the file. Reading a
//! compressed grain checks its marker and what it inflates to.

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ondisk::{gte, header, marker, SECTOR};
use super::{State, Vmdk};
use crate::error::{check_field, Allowed, AtPath};
use crate::{read_bounded, Foreign, FormatError, ImageError};
use diskferry_blockdev::{BlockDevice, BlockError};

/// Most grain directory entries accepted (2 TiB of 64 KiB grains needs 65,536).
const MAX_GD_ENTRIES: u64 = 1 << 20;
/// Largest extent (2 TiB, as the format's 32-bit sector offsets allow).
const MAX_CAPACITY: u64 = 1 << 32;

type Result<T> = std::result::Result<T, ImageError>;

/// What the header says about the extent, checked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Params {
    pub capacity: u64,
    pub grain_sectors: u64,
    pub gtes_per_gt: u64,
    pub gd_offset: u64,
    pub compressed: bool,
    pub zero_grain: bool,
}

impl Params {
    pub fn grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_sectors)
    }

    pub fn gd_entries(&self) -> u64 {
        self.grains().div_ceil(self.gtes_per_gt)
    }
}

/// Largest embedded descriptor read.
const MAX_DESCRIPTOR: u64 = 64 << 10;

/// Whether the file whose "KDMV" header is `h` holds a whole disk: its embedded descriptor
/// says monolithicSparse or streamOptimized. An extent of a split image has an empty
/// descriptor (or none), and the disk goes on in other files.
pub(crate) fn is_whole_disk(
    file: &dyn BlockDevice,
    h: &[u8],
) -> std::result::Result<bool, BlockError> {
    let at = header::DESCRIPTOR_OFFSET.get(h).saturating_mul(SECTOR);
    let len = header::DESCRIPTOR_SIZE
        .get(h)
        .saturating_mul(SECTOR)
        .min(MAX_DESCRIPTOR)
        .min(file.size().saturating_sub(at));
    if at == 0 || len == 0 {
        return Ok(false);
    }
    let mut text = vec![0u8; len as usize];
    file.read_at(&mut text, at)?;
    let names = |t: &str| {
        let wanted = format!("createType=\"{t}\"");
        text.windows(wanted.len()).any(|w| w == wanted.as_bytes())
    };
    Ok(names("monolithicSparse") || names("streamOptimized"))
}

impl Vmdk {
    /// Opens a monolithicSparse or streamOptimized image read-only.
    pub fn open(file: Arc<dyn BlockDevice>, path: &Path) -> Result<Vmdk> {
        let first = read_bounded(&*file, path, "header", header::LEN as u64, 0)?;
        if header::MAGIC.get(&first) != *header::MAGIC_VALUE {
            return Err(FormatError::NotFormat {
                format: "VMDK",
                magic: "KDMV",
            })
            .at(path);
        }
        if !is_whole_disk(&*file, &first).at(path)? {
            return Err(ImageError::Foreign {
                path: path.to_path_buf(),
                format: Foreign::VmdkSplitExtent,
            });
        }
        let h = match header::GD_OFFSET.get(&first) {
            header::GD_AT_END => stream_footer(&*file, path)?,
            _ => first,
        };
        let p = params(&h).at(path)?;
        let tables = load_tables(&*file, path, &p)?;
        Ok(Vmdk {
            path: path.to_path_buf(),
            size: p.capacity * SECTOR,
            grain: p.grain_sectors * SECTOR,
            gtes_per_gt: p.gtes_per_gt,
            zero_grain: p.zero_grain,
            compressed: p.compressed,
            state: Mutex::new(State {
                tables,
                dirty: Vec::new(),
                next_free: file.size().next_multiple_of(SECTOR),
                inflated: None,
                pending: None,
            }),
            file,
            writer: None,
        })
    }
}

/// A stream-optimized image's footer: the header copy between a footer marker and the
/// end-of-stream marker that end the file.
fn stream_footer(file: &dyn BlockDevice, path: &Path) -> Result<Vec<u8>> {
    let missing = FormatError::Missing {
        structure: "stream-optimized image",
        item: "footer and end-of-stream marker at its end",
    };
    let len = 3 * marker::LEN as u64;
    let Some(at) = file.size().checked_sub(len) else {
        return Err(missing).at(path);
    };
    let tail = read_bounded(file, path, "footer", len, at)?;
    let (foot_marker, rest) = tail.split_at(marker::LEN);
    let (foot, eos) = rest.split_at(header::LEN);
    let is_marker = |m: &[u8], value: Option<u64>, kind: u32| {
        marker::SIZE.get(m) == 0
            && marker::TYPE.get(m) == kind
            && value.is_none_or(|v| marker::VALUE.get(m) == v)
    };
    if !is_marker(foot_marker, None, marker::FOOTER)
        || !is_marker(eos, Some(0), marker::END_OF_STREAM)
        || header::MAGIC.get(foot) != *header::MAGIC_VALUE
    {
        return Err(missing).at(path);
    }
    Ok(foot.to_vec())
}

/// The header's fields, checked against the format and against hostile values.
fn params(h: &[u8]) -> std::result::Result<Params, FormatError> {
    let field = |name, value, allowed| check_field("header", name, value, allowed);
    let flags = header::FLAGS.get(h);
    field(
        "version",
        u64::from(header::VERSION.get(h)),
        Allowed::Range { min: 1, max: 3 },
    )?;
    let capacity = header::CAPACITY.get(h);
    field(
        "capacity",
        capacity,
        Allowed::Range {
            min: 1,
            max: MAX_CAPACITY,
        },
    )?;
    let grain_sectors = header::GRAIN_SIZE.get(h);
    field(
        "grain size",
        grain_sectors,
        Allowed::PowerOfTwo { min: 1, max: 2048 },
    )?;
    let gtes_per_gt = u64::from(header::GTES_PER_GT.get(h));
    field(
        "grain table entries",
        gtes_per_gt,
        Allowed::Range { min: 1, max: 512 },
    )?;
    let algorithm = header::COMPRESS_ALGORITHM.get(h);
    field(
        "compression algorithm",
        u64::from(algorithm),
        Allowed::OneOf(&[0, 1]),
    )?;
    let compressed = algorithm == header::COMPRESS_DEFLATE;
    if compressed && flags & header::FLAG_MARKERS == 0 {
        return Err(FormatError::Missing {
            structure: "compressed extent",
            item: "grain markers",
        });
    }
    if flags & header::FLAG_NEWLINE_CHECK != 0
        && header::NEWLINE_CHECK.get(h) != *header::NEWLINE_CHECK_VALUE
    {
        return Err(FormatError::Missing {
            structure: "header",
            item: "intact newline check bytes (was it copied as text?)",
        });
    }
    let p = Params {
        capacity,
        grain_sectors,
        gtes_per_gt,
        gd_offset: header::GD_OFFSET.get(h),
        compressed,
        zero_grain: flags & header::FLAG_ZERO_GRAIN != 0,
    };
    if p.gd_entries() > MAX_GD_ENTRIES {
        return Err(FormatError::TooManyEntries {
            structure: "grain directory",
            count: p.gd_entries(),
            max: MAX_GD_ENTRIES,
        });
    }
    Ok(p)
}

/// The grain tables the directory points to (entry 0: no table). Together they may not be
/// larger than the file, so a directory pointing many times at one table cannot make us
/// allocate more than the file holds.
fn load_tables(file: &dyn BlockDevice, path: &Path, p: &Params) -> Result<Vec<Option<Box<[u32]>>>> {
    let gd_at = p.gd_offset.saturating_mul(SECTOR);
    let gd = read_bounded(
        file,
        path,
        "grain directory",
        p.gd_entries() * gte::LEN,
        gd_at,
    )?;
    let table_len = p.gtes_per_gt * gte::LEN;
    let mut budget = file.size();
    let mut tables = Vec::with_capacity(p.gd_entries() as usize);
    for sector in le_u32s(&gd) {
        if sector == 0 {
            tables.push(None);
            continue;
        }
        budget = budget.checked_sub(table_len).ok_or(ImageError::Invalid {
            path: path.to_path_buf(),
            problem: FormatError::TooManyEntries {
                structure: "grain tables (together larger than the file)",
                count: tables.len() as u64 + 1,
                max: file.size() / table_len,
            },
        })?;
        let at = u64::from(sector) * SECTOR;
        let raw = read_bounded(file, path, "grain table", table_len, at)?;
        tables.push(Some(le_u32s(&raw).collect()));
    }
    Ok(tables)
}

fn le_u32s(raw: &[u8]) -> impl Iterator<Item = u32> + '_ {
    raw.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
}

/// Inflates compressed grain `index` whose marker is at `host` (inside the file, checked by
/// the mapping): the marker must name the grain's first sector, its data must lie inside the
/// file and be at most two grains long, and it must inflate to at least the grain's bytes.
pub(super) fn inflate_grain(
    image: &Vmdk,
    index: u64,
    host: u64,
) -> std::result::Result<Vec<u8>, BlockError> {
    let invalid = |problem| BlockError::from(image.invalid(problem));
    let file = &*image.file;
    let mut head = [0u8; marker::GRAIN_DATA];
    file.read_at(&mut head, host)?;
    let lba = marker::VALUE.get(&head);
    let expected = index * image.grain / SECTOR;
    check_field(
        "grain marker",
        "sector",
        lba,
        Allowed::Range {
            min: expected,
            max: expected,
        },
    )
    .map_err(invalid)?;
    let stored = u64::from(marker::SIZE.get(&head));
    check_field(
        "grain marker",
        "size",
        stored,
        Allowed::Range {
            min: 1,
            max: 2 * image.grain,
        },
    )
    .map_err(invalid)?;
    let data = read_bounded(
        file,
        &image.path,
        "compressed grain",
        stored,
        host + marker::GRAIN_DATA as u64,
    )
    .map_err(BlockError::from)?;
    let mut out = Vec::with_capacity(image.grain as usize);
    let inflated = flate2::read::ZlibDecoder::new(&data[..])
        .take(image.grain)
        .read_to_end(&mut out);
    let needed = image.grain_len(index) as usize;
    if inflated.is_err() || out.len() < needed {
        return Err(invalid(FormatError::Compressed { offset: host }));
    }
    out.resize(image.grain as usize, 0);
    Ok(out)
}
