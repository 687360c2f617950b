//! `mkfs`: building a filesystem image (raw, or qcow2/VHDX by extension) from a host
//! directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use diskferry_blockdev::BlockDevice;
use diskferry_fs::ext4::write::{suggested_size, write_ext4, Ext4Options};
use diskferry_fs::fat_write::{write_fat, FatOptions};
use diskferry_fs::host::HostFs;
use diskferry_fs::{tree, Filesystem};
use diskferry_imaging::pipeline::PartialOutput;
use diskferry_vdisk::{create_image, ImageFormat};

use crate::human_bytes;
use crate::images::parse_size;

#[derive(Clone, Copy, ValueEnum)]
pub enum FsType {
    /// ext4 with 4 KiB blocks, 256-byte inodes, a journal, extents, flex_bg and metadata_csum
    Ext4,
    /// FAT12/16/32 (the type follows the size)
    Fat,
}

/// What a tree needs: bytes of file data (each file's allocated bytes rounded up to 4 KiB),
/// and entries.
fn tree_needs(src: &dyn Filesystem) -> Result<(u64, u64)> {
    tree::space_needed(src).map_err(|e| anyhow::anyhow!("cannot read the source tree: {e}"))
}

struct Report {
    files: u64,
    dirs: u64,
    bytes: u64,
    skipped: Vec<(String, String)>,
}

/// A UUID in its usual text form.
fn parse_uuid(s: &str) -> Result<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 {
        bail!("{s} is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)");
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("{s} is not a UUID"))?;
    }
    Ok(out)
}

pub struct MkfsArgs<'a> {
    pub fs: FsType,
    pub out: &'a Path,
    pub from: &'a Path,
    pub size: Option<&'a str>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    pub force: bool,
}

/// `XXXX-XXXX` (as FAT tools print a serial) or 8 hex digits.
fn parse_serial(s: &str) -> Result<u32> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 8 {
        bail!("{s} is not a FAT volume serial: use XXXX-XXXX (8 hex digits)");
    }
    u32::from_str_radix(&hex, 16).with_context(|| format!("{s} is not a FAT volume serial"))
}

pub fn mkfs(a: MkfsArgs<'_>) -> Result<()> {
    let src = HostFs::open(a.from).with_context(|| format!("cannot read {}", a.from.display()))?;
    let size = choose_size(&a, &src)?;
    let format = ImageFormat::from_extension(a.out);
    let output = PartialOutput::create(a.out, a.force)?;
    let image: Arc<dyn BlockDevice> = create_image(
        format,
        output.file().try_clone()?,
        output.partial_path(),
        size,
        false,
        512,
    )?;
    let report = write_filesystem(&a, &src, &image)?;
    image.flush()?;
    drop(image);
    output.commit()?;
    for (path, why) in &report.skipped {
        eprintln!("diskferry: skipped {path}: {why}");
    }
    eprintln!(
        "wrote {} ({}, {}): {} files, {} directories, {} of data{}",
        a.out.display(),
        format.name(),
        human_bytes(size),
        report.files,
        report.dirs,
        human_bytes(report.bytes),
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} entries skipped", report.skipped.len())
        }
    );
    Ok(())
}

/// The image size: `--size`, or what the tree needs plus a tenth; refused when too small.
fn choose_size(a: &MkfsArgs<'_>, src: &HostFs) -> Result<u64> {
    let (data, entries) = tree_needs(src)?;
    let needed = match a.fs {
        FsType::Ext4 => suggested_size(data, entries) * 10 / 11,
        // Room for the data, 256 bytes per entry (long names), the FATs and slack.
        FsType::Fat => data + entries * 256 + data / 32 + (1 << 20),
    };
    let size = match a.size {
        Some(s) => parse_size(s)?,
        None => (needed + needed / 10)
            .next_multiple_of(1 << 20)
            .max(2 << 20),
    };
    if needed > size {
        bail!(
            "{} needs about {} but --size is {}: nothing was written",
            a.from.display(),
            human_bytes(needed),
            human_bytes(size)
        );
    }
    Ok(size)
}

/// The filesystem of `--fs` written from `src` onto `image`.
fn write_filesystem(
    a: &MkfsArgs<'_>,
    src: &HostFs,
    image: &Arc<dyn BlockDevice>,
) -> Result<Report> {
    Ok(match a.fs {
        FsType::Ext4 => {
            let options = Ext4Options {
                label: a.label.clone(),
                uuid: a.uuid.as_deref().map(parse_uuid).transpose()?,
                ..Ext4Options::default()
            };
            let r = write_ext4(Arc::clone(image), src, &options)?;
            Report {
                files: r.files + r.symlinks + r.special,
                dirs: r.dirs,
                bytes: r.bytes,
                skipped: r.skipped,
            }
        }
        FsType::Fat => {
            let options = FatOptions {
                label: a.label.clone(),
                serial: a.uuid.as_deref().map(parse_serial).transpose()?,
                ..FatOptions::default()
            };
            let r = write_fat(Arc::clone(image), src, &options)?;
            Report {
                files: r.files,
                dirs: r.dirs,
                bytes: r.bytes,
                skipped: r.skipped,
            }
        }
    })
}
