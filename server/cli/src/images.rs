//! `diskferry info`, `create` and `convert`: working with image files.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_imaging::pipeline::{capture_sectors, OutputOptions, PartialOutput};
use diskferry_vdisk::qcow2::Qcow2;
use diskferry_vdisk::{create_image, create_overlay, detect, open_image, Detected, ImageFormat};

use crate::{human_bytes, progress_for, ProgressKind};

/// Parses `10G`, `512M`, `4096`, `1.5T` (binary units; a trailing `B` or `iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size (examples: 4096, 512M, 20G, 1.5T)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(0.0..=(1u64 << 56) as f64).contains(&bytes) {
        bail!("size {s} is out of range");
    }
    Ok(bytes as u64)
}

pub fn info(path: &Path, json: bool) -> Result<()> {
    let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, false)?);
    let on_disk = std::fs::metadata(path)?.blocks() * 512;
    let detected = detect(file.as_ref()).map_err(|e| e.at(path))?;
    let mut fields: Vec<(&str, String)> = vec![("file", path.display().to_string())];
    match detected {
        Detected::Qcow2 => {
            let image = Qcow2::inspect(Arc::clone(&file), path)?;
            let h = image.header();
            fields.push(("format", "qcow2".into()));
            fields.push(("virtual_size", h.size.to_string()));
            fields.push(("allocated_on_disk", on_disk.to_string()));
            fields.push(("cluster_size", h.cluster_size().to_string()));
            fields.push(("version", h.version.to_string()));
            fields.push(("refcount_bits", (1u32 << h.refcount_order).to_string()));
            fields.push(("dirty", (h.incompatible & 1 != 0).to_string()));
            fields.push((
                "backing_file",
                image.backing_name().unwrap_or("none").to_string(),
            ));
        }
        Detected::Vhdx => {
            let image = diskferry_vdisk::vhdx::Vhdx::open(Arc::clone(&file), path)?;
            fields.push(("format", "vhdx".into()));
            fields.push(("virtual_size", image.size().to_string()));
            fields.push(("allocated_on_disk", on_disk.to_string()));
            fields.push(("block_size", image.block_size().to_string()));
            fields.push((
                "logical_sector_size",
                image.logical_sector_size().to_string(),
            ));
        }
        Detected::Vhd => {
            let image = diskferry_vdisk::vhd::Vhd::open(Arc::clone(&file), path)?;
            let kind = if image.is_fixed() { "fixed" } else { "dynamic" };
            fields.push(("format", "vhd".into()));
            fields.push(("subformat", kind.into()));
            fields.push(("virtual_size", image.size().to_string()));
            fields.push(("allocated_on_disk", on_disk.to_string()));
            if let Some(block_size) = image.block_size() {
                fields.push(("block_size", block_size.to_string()));
            }
        }
        Detected::Vmdk => {
            let image = diskferry_vdisk::vmdk::Vmdk::open(Arc::clone(&file), path)?;
            let kind = match image.is_stream_optimized() {
                true => "streamOptimized",
                false => "monolithicSparse",
            };
            fields.push(("format", "vmdk".into()));
            fields.push(("subformat", kind.into()));
            fields.push(("virtual_size", image.size().to_string()));
            fields.push(("allocated_on_disk", on_disk.to_string()));
            fields.push(("cluster_size", image.grain_size().to_string()));
        }
        Detected::Raw => {
            fields.push(("format", "raw".into()));
            fields.push(("virtual_size", file.size().to_string()));
            fields.push(("allocated_on_disk", on_disk.to_string()));
        }
    }
    if json {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| match v.parse::<u64>() {
                Ok(n) if *k != "file" => format!("\"{k}\":{n}"),
                _ if v == "true" || v == "false" => format!("\"{k}\":{v}"),
                _ => format!(
                    "\"{k}\":\"{}\"",
                    v.replace('\\', "\\\\").replace('"', "\\\"")
                ),
            })
            .collect();
        println!("{{{}}}", body.join(","));
    } else {
        for (k, v) in fields {
            let shown = match (k, v.parse::<u64>()) {
                ("virtual_size" | "allocated_on_disk" | "cluster_size" | "block_size", Ok(n)) => {
                    format!("{} ({n} bytes)", human_bytes(n))
                }
                _ => v,
            };
            println!("{:<21} {shown}", format!("{}:", k.replace('_', " ")));
        }
    }
    Ok(())
}

pub fn create(
    out: &Path,
    size: &str,
    format: ImageFormat,
    sector_size: u32,
    force: bool,
) -> Result<()> {
    let size = parse_size(size)?;
    let output = PartialOutput::create(out, force)?;
    let image = create_image(
        format,
        output.file().try_clone()?,
        output.partial_path(),
        size,
        false,
        sector_size,
    )?;
    image.flush()?;
    let virtual_size = image.size();
    drop(image);
    output.commit()?;
    eprintln!(
        "created {} ({}, {} virtual)",
        out.display(),
        format.name(),
        human_bytes(virtual_size)
    );
    Ok(())
}

pub fn convert(
    input: &Path,
    out: &Path,
    output: OutputOptions,
    progress: ProgressKind,
    follow_backing: bool,
) -> Result<()> {
    let (detected, src) = open_image(input, follow_backing)?;
    let format = output.format;
    let bar = progress_for(progress);
    let stats = capture_sectors(src.as_ref(), out, output, bar.as_ref())?;
    let secs = stats.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "converted {} ({}) into {} ({}): {} of data, {} holes skipped, {} written, {:.1} s",
        input.display(),
        detected.name(),
        out.display(),
        format.name(),
        human_bytes(stats.read),
        human_bytes(stats.skipped_by_status),
        human_bytes(stats.written),
        secs
    );
    Ok(())
}

pub fn overlay(base: &Path, out: &Path, force: bool) -> Result<()> {
    let output = PartialOutput::create(out, force)?;
    let image = create_overlay(output.file().try_clone()?, output.partial_path(), base)?;
    image.flush()?;
    drop(image);
    output.commit()?;
    eprintln!(
        "created {}: a qcow2 overlay on {} (which stays unchanged)",
        out.display(),
        base.display()
    );
    Ok(())
}
