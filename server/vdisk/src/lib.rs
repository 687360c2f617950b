//! Sparse virtual disk formats as block devices. Each format answers "where does virtual
//! range X live?" with a [`Mapping`], and a separate step performs the I/O — so metadata
//! logic is testable without files, and locks on metadata stay short.
//!
//! Today: raw images, qcow2 (read any, write version 3, overlays), VHDX (read, write
//! dynamic), VHD (read and write fixed and dynamic) and VMDK (read and write monolithicSparse
//! and streamOptimized). [`detect`] names the containers it recognises but cannot read;
//! [`chain`] commits and rebases qcow2 backing chains.

pub mod chain;
mod detect;
mod error;
pub mod qcow2;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use detect::{detect, DetectError, Detected, Foreign};

use error::AtPath;
pub use error::{Allowed, CreateError, FormatError, ImageError, LogError};

use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockError, Extent, FileDevice, Region};

/// Hyper-V's own VHDX block size (a fixed choice for tests and callers that want it).
pub const VHDX_BLOCK_SIZE: u64 = 32 << 20;

/// The block size of a new VHDX of `size` bytes, chosen as qemu-img chooses it (8 MiB up to
/// 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB beyond): smaller blocks keep a
/// sparse image's file close to the data it holds.
pub fn vhdx_block_size(size: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    match size {
        s if s > 32 << 40 => 64 << 20,
        s if s > 100 * GIB => 32 << 20,
        s if s > GIB => 16 << 20,
        _ => 8 << 20,
    }
}

/// Cluster size of the qcow2 images we create (qemu's default).
pub const QCOW2_CLUSTER_BITS: u32 = 16;

/// The image formats diskferry writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A sparse file holding the disk byte for byte.
    Raw,
    /// qcow2 version 3, 64 KiB clusters.
    Qcow2,
    /// Dynamic VHDX, 512- or 4096-byte sectors; blocks of `block_size` bytes (a power of two,
    /// 1–256 MiB), or by the disk's size as qemu-img chooses ([`vhdx_block_size`]) when `None`.
    Vhdx { block_size: Option<u64> },
    /// Dynamic VHD, 2 MiB blocks.
    Vhd,
    /// Fixed VHD: the disk followed by a footer.
    VhdFixed,
    /// monolithicSparse VMDK, 64 KiB grains.
    Vmdk,
    /// streamOptimized VMDK: compressed grains, for ESXi and OVA imports.
    VmdkStream,
}

impl ImageFormat {
    /// A VHDX with blocks by disk size.
    pub const VHDX: ImageFormat = ImageFormat::Vhdx { block_size: None };

    /// The format an output name suggests (see [`ImageFormat::from_output_name`]); anything
    /// else is raw.
    pub fn from_extension(path: &Path) -> ImageFormat {
        ImageFormat::from_output_name(path).unwrap_or(ImageFormat::Raw)
    }

    /// The format an output name states, if it states one: `.qcow2`, `.vhdx`, `.vhd` (dynamic),
    /// `.vmdk` (monolithicSparse), `.img` or `.raw` (any case). The one place that maps file
    /// names to formats.
    pub fn from_output_name(path: &Path) -> Option<ImageFormat> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("qcow2") => Some(ImageFormat::Qcow2),
            Some("vhdx") => Some(ImageFormat::VHDX),
            Some("vhd") => Some(ImageFormat::Vhd),
            Some("vmdk") => Some(ImageFormat::Vmdk),
            Some("img" | "raw") => Some(ImageFormat::Raw),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhdx { .. } => "vhdx",
            ImageFormat::Vhd => "vhd",
            ImageFormat::VhdFixed => "vhd-fixed",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::VmdkStream => "vmdk-stream",
        }
    }
}

/// Longest chain of backing files followed.
pub const MAX_BACKING_DEPTH: u32 = 16;

/// Opens a local file or device for reading, through its image format when it has one. An
/// overlay's backing file is opened only when `follow_backing` allows it (relative names are
/// resolved from the overlay's directory), up to [`MAX_BACKING_DEPTH`] levels.
pub fn open_image(
    path: &Path,
    follow_backing: bool,
) -> Result<(Detected, Arc<dyn BlockDevice>), ImageError> {
    open_chain(path, follow_backing, MAX_BACKING_DEPTH)
}

/// Where the backing file `name` stored in the image at `path` lives: relative names are
/// resolved from the image's directory (as qemu resolves them), absolute names stand.
pub fn backing_path(path: &Path, name: &str) -> std::path::PathBuf {
    path.parent().unwrap_or(Path::new(".")).join(name)
}

/// [`open_image`] with at most `depth` more backing files followed.
pub(crate) fn open_chain(
    path: &Path,
    follow: bool,
    depth: u32,
) -> Result<(Detected, Arc<dyn BlockDevice>), ImageError> {
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, false).at(path)?);
    match detect(file.as_ref()).at(path)? {
        Detected::Vhd => Ok((Detected::Vhd, Arc::new(vhd::Vhd::open(file, path)?))),
        Detected::Vmdk => Ok((Detected::Vmdk, Arc::new(vmdk::Vmdk::open(file, path)?))),
        Detected::Qcow2 => {
            let image = qcow2::Qcow2::inspect(Arc::clone(&file), path)?;
            let Some(name) = image.backing_name().map(str::to_string) else {
                return Ok((Detected::Qcow2, Arc::new(image)));
            };
            if !follow {
                return Err(ImageError::Unsupported {
                    path: path.to_path_buf(),
                    feature: format!("reading this overlay without its backing file {name:?}; pass --follow-backing to read through it"),
                });
            }
            if depth == 0 {
                return Err(FormatError::BackingChainTooLong {
                    max: MAX_BACKING_DEPTH,
                })
                .at(path);
            }
            let (_, base) = open_chain(&backing_path(path, &name), follow, depth - 1)?;
            drop(image);
            Ok((
                Detected::Qcow2,
                Arc::new(qcow2::Qcow2::open_with_backing(file, path, base)?),
            ))
        }
        Detected::Vhdx => Ok((Detected::Vhdx, Arc::new(vhdx::Vhdx::open(file, path)?))),
        Detected::Raw => Ok((Detected::Raw, file)),
    }
}

/// Creates a qcow2 overlay at `out` (an empty writable file) on the image at `base`: the
/// overlay names `base` by its absolute path, so it can be moved independently.
pub fn create_overlay(
    file: std::fs::File,
    out: &Path,
    base: &Path,
) -> Result<Arc<dyn BlockDevice>, ImageError> {
    let absolute = std::fs::canonicalize(base)
        .map_err(|source| BlockError::Io {
            op: "resolve",
            offset: None,
            device: base.display().to_string(),
            source,
        })
        .at(base)?;
    let name = absolute
        .to_str()
        .ok_or(CreateError::BackingPathNotUtf8)
        .at(out)?;
    let (detected, base_device) = open_image(&absolute, true)?;
    let container = Arc::new(FileDevice::from_file(file, out, true).at(out)?);
    Ok(Arc::new(qcow2::Qcow2::create_overlay(
        container,
        out,
        base_device,
        name,
        detected.qemu_name(),
        QCOW2_CLUSTER_BITS,
    )?))
}

/// Reopens the qcow2 overlay at `path` for writing, on its backing image, which must be
/// `base` (the same file once both paths are resolved): a redo log taken up again. An overlay
/// of another image, or an image that is no overlay, is refused.
pub fn reopen_overlay(path: &Path, base: &Path) -> Result<Arc<dyn BlockDevice>, ImageError> {
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, true).at(path)?);
    let name = qcow2::backing_name_of(&*file, path)?;
    let resolve = |p: &Path| std::fs::canonicalize(p).ok();
    let theirs = name.as_deref().map(|n| backing_path(path, n));
    if theirs
        .as_deref()
        .and_then(resolve)
        .is_none_or(|t| Some(t) != resolve(base))
    {
        return Err(ImageError::Unsupported {
            path: path.to_path_buf(),
            feature: format!(
                "continuing it on {}: it is {}",
                base.display(),
                match theirs {
                    Some(t) => format!("an overlay of {}", t.display()),
                    None => "not an overlay".into(),
                }
            ),
        });
    }
    let (_, backing) = open_image(base, true)?;
    Ok(Arc::new(qcow2::Qcow2::open_writable(
        file,
        path,
        Some(backing),
    )?))
}

/// Creates an image of `size` virtual bytes in the empty, writable `file` (named `path` in
/// errors) and returns it as a writable block device. With `compress`, whole data clusters are
/// stored compressed where that saves space (qcow2 only; a streamOptimized VMDK always
/// compresses); `logical_sector` (512 or 4096) is recorded where the format has it (VHDX) —
/// captures pass the source disk's. Container sizes are rounded up as qemu-img rounds them
/// ([`virtual_size`]; a VHD's to a whole geometry, [`vhd::geometry_for`]). Call `flush` before
/// using the file.
pub fn create_image(
    format: ImageFormat,
    file: std::fs::File,
    path: &Path,
    size: u64,
    compress: bool,
    logical_sector: u32,
) -> Result<Arc<dyn BlockDevice>, ImageError> {
    if compress && !matches!(format, ImageFormat::Qcow2 | ImageFormat::VmdkStream) {
        return Err(ImageError::Unsupported {
            path: path.to_path_buf(),
            feature: "compression outside qcow2".into(),
        });
    }
    let container: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::from_file(file, path, true).at(path)?);
    let sized = virtual_size(size, 512);
    Ok(match format {
        ImageFormat::Raw => {
            container.resize(size).at(path)?;
            container
        }
        ImageFormat::Vhdx { block_size } => {
            let size = virtual_size(size, logical_sector);
            let block_size = block_size.unwrap_or_else(|| vhdx_block_size(size));
            Arc::new(vhdx::Vhdx::create(
                container,
                path,
                size,
                block_size,
                logical_sector,
            )?)
        }
        ImageFormat::Qcow2 => {
            let image = qcow2::Qcow2::create(container, path, sized, QCOW2_CLUSTER_BITS)?;
            image.set_compress(compress)?;
            Arc::new(image)
        }
        ImageFormat::Vhd => Arc::new(vhd::Vhd::create(container, path, size, false)?),
        ImageFormat::VhdFixed => Arc::new(vhd::Vhd::create(container, path, size, true)?),
        ImageFormat::Vmdk => Arc::new(vmdk::Vmdk::create_sparse(container, path, sized)?),
        ImageFormat::VmdkStream => Arc::new(vmdk::Vmdk::create_stream(container, path, sized)?),
    })
}

/// A container image's virtual size for `size` bytes of content: whole sectors, rounded up as
/// qemu-img does (a disk of 1,000,100 bytes becomes 1,000,448; the tail reads as zeros). A
/// raw output keeps the exact size.
pub fn virtual_size(size: u64, sector: u32) -> u64 {
    size.next_multiple_of(u64::from(sector.max(512)))
}

/// Fills `buf` from virtual `offset` (already range-checked) piece by piece: `map` says where
/// each piece lives, `fill` performs its I/O into the piece's part of `buf`.
pub(crate) fn read_mapped(
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    map: impl Fn(u64, u64) -> Result<Mapping, ImageError>,
    mut fill: impl FnMut(Mapping, u64, &mut [u8]) -> Result<(), BlockError>,
) -> Result<(), BlockError> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let m = map(pos, (buf.len() - done) as u64)?;
        let n = m.len() as usize;
        if n == 0 {
            return Err(empty_mapping(path, pos));
        }
        fill(m, pos, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Writes `data` — or zeros, for a discard, when it is `None` — over `offset..offset+len`
/// one piece per `unit`-aligned unit (a cluster, a block, a grain), calling `piece(pos, bytes)`
/// for each: the one splitting loop every format's writer uses.
pub(crate) fn write_units(
    offset: u64,
    len: u64,
    unit: u64,
    data: Option<&[u8]>,
    mut piece: impl FnMut(u64, &[u8]) -> Result<(), BlockError>,
) -> Result<(), BlockError> {
    let unit = unit.max(1);
    let zeros = match data {
        Some(_) => Vec::new(),
        None => vec![0u8; unit.min(len) as usize],
    };
    let mut done = 0u64;
    while done < len {
        let pos = offset + done;
        let n = (unit - pos % unit).min(len - done) as usize;
        let bytes = match data {
            Some(d) => &d[done as usize..done as usize + n],
            None => &zeros[..n],
        };
        piece(pos, bytes)?;
        done += n as u64;
    }
    Ok(())
}

/// [`read_mapped`] for formats whose stored data sits as is in the image `file` and whose
/// every other piece reads as zeros (VHD, VHDX): `size` bounds the read.
pub(crate) fn read_stored(
    path: &Path,
    file: &dyn BlockDevice,
    size: u64,
    buf: &mut [u8],
    offset: u64,
    map: impl Fn(u64, u64) -> Result<Mapping, ImageError>,
) -> Result<(), BlockError> {
    diskferry_blockdev::check_range(size, offset, buf.len() as u64)?;
    read_mapped(path, buf, offset, map, |m, _, dst| match m {
        Mapping::Data { host, .. } => file.read_at(dst, host),
        _ => {
            dst.fill(0);
            Ok(())
        }
    })
}

/// Block status from mappings: stored data is `Data`, zero pieces `Zero`, unallocated pieces
/// `unallocated` (zeros, or the backing image's data for an overlay). At most 4096 extents.
pub(crate) fn status_mapped(
    path: &Path,
    offset: u64,
    end: u64,
    unallocated: Region,
    map: impl Fn(u64, u64) -> Result<Mapping, ImageError>,
) -> Result<Vec<Extent>, BlockError> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < 4096 {
        let m = map(pos, end - pos)?;
        if m.is_empty() {
            return Err(empty_mapping(path, pos));
        }
        let region = match m {
            Mapping::Data { .. } | Mapping::Compressed { .. } => Region::Data,
            Mapping::Zero { .. } => Region::Zero,
            Mapping::Unallocated { .. } => unallocated,
        };
        match out.last_mut() {
            Some(last) if last.region == region => last.len += m.len(),
            _ => out.push(Extent {
                offset: pos,
                len: m.len(),
                region,
            }),
        }
        pos += m.len();
    }
    Ok(out)
}

/// `len` bytes of `structure` at `at`, which must lie inside the file: the bound every format
/// checks before allocating a buffer for something the file describes.
pub(crate) fn read_bounded(
    file: &dyn BlockDevice,
    path: &Path,
    structure: &'static str,
    len: u64,
    at: u64,
) -> Result<Vec<u8>, ImageError> {
    if at.saturating_add(len) > file.size() {
        return Err(FormatError::BeyondEnd {
            structure,
            offset: at,
            len,
        })
        .at(path);
    }
    let mut buf = vec![0u8; len as usize];
    file.read_at(&mut buf, at).at(path)?;
    Ok(buf)
}

fn empty_mapping(path: &Path, offset: u64) -> BlockError {
    BlockError::from(ImageError::Invalid {
        path: path.to_path_buf(),
        problem: FormatError::EmptyMapping { offset },
    })
}

/// Where a piece of the virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// `len` bytes stored at `host` in the image file.
    Data { host: u64, len: u64 },
    /// Reads as zeros (explicitly marked).
    Zero { len: u64 },
    /// Never written: zeros, or the backing image's bytes for an overlay.
    Unallocated { len: u64 },
    /// Inside a compressed cluster: `len` bytes from `in_cluster` of the cluster that
    /// decompresses from at most `stored` bytes at `host`.
    Compressed {
        host: u64,
        stored: u64,
        in_cluster: u64,
        len: u64,
    },
}

impl Mapping {
    pub fn len(&self) -> u64 {
        match *self {
            Mapping::Data { len, .. }
            | Mapping::Zero { len }
            | Mapping::Unallocated { len }
            | Mapping::Compressed { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
