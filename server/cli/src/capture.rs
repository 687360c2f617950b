//! `diskferry capture SOURCE OUT`: a disk — local, a listening client's, or a machine held by
//! a running server — into a new sparse image, through the imaging crate's one capture
//! function; and the verification report shared with `diskferry verify`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diskferry_imaging::pipeline::{Mode as DiskMode, OutputOptions};
use diskferry_imaging::source::{open_source, SourceSpec};
use diskferry_imaging::{CaptureOptions, CaptureOutcome, CaptureSummary};
use diskferry_vdisk::ImageFormat;

use crate::{
    human_bytes, images, machines, progress_for, runtime, session, ConnArgs, Mode, ProgressKind,
};

#[derive(Args)]
pub(crate) struct CaptureArgs {
    /// What to capture: DISK@HOST:PORT for a client's disk, a local file or block device, or a
    /// machine (MACHINE or DISK@MACHINE: its name or MAC) through a server (--data-dir/--server)
    source: String,
    /// The image to write (written as OUT.partial and renamed when complete)
    out: PathBuf,
    /// How to copy each partition
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    /// Size of the output disk (bytes, or K/M/G/T): the last partition recreated file by
    /// file (ext2/3/4 or FAT) grows or shrinks, and the partitions after it (swap, an
    /// extended partition with its logical ones, copied partitions) move with it [default:
    /// the source's size]
    #[arg(long)]
    size: Option<String>,
    /// Afterwards, compare every file (content and metadata) and every copied range of the
    /// source with the output; exit non-zero on any difference
    #[arg(long)]
    verify: bool,
    /// Also write OUT.chunks: the source's chunk hashes (64 KiB chunks, computed by the agent
    /// for a remote disk: no data crosses the wire for it), which a later `--base OUT`
    /// capture compares against
    #[arg(long)]
    chunk_map: bool,
    /// Incremental capture on PREVIOUS (a capture of the same disk made with --chunk-map, or
    /// an earlier incremental one): only what changed since is read from the source. On a
    /// whole-disk (--mode sectors) base, the changed chunks go into OUT, a qcow2 overlay
    /// whose backing file is PREVIOUS; on a partition-by-partition base, OUT is a full image
    /// whose unchanged files are taken from PREVIOUS. OUT gets its own chunk map. A machine
    /// captured through the server: PREVIOUS is a capture's name in its catalog (without
    /// --base, the server builds on the machine's latest capture of the disk, if any)
    #[arg(long, value_name = "PREVIOUS")]
    base: Option<PathBuf>,
    #[command(flatten)]
    custom: crate::customize::CustomizeArgs,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    conn: ConnArgs,
    /// A machine (its name or MAC, or DISK@MACHINE) is captured by the server holding its
    /// connection, into that server's captures under OUT's file name
    #[command(flatten)]
    daemon: machines::DaemonArgs,
    #[command(flatten)]
    when: crate::when::WhenArgs,
}

/// How `capture`, `convert` and `customize` write their output and read image sources.
#[derive(Args)]
pub(crate) struct OutputArgs {
    /// Image format of OUT [default: from OUT's extension, `.qcow2` → qcow2, `.vhdx` → vhdx,
    /// `.vhd` → vhd, `.vmdk` → vmdk, anything else raw]
    #[arg(long, value_enum)]
    pub(crate) format: Option<Format>,
    /// VHDX block size: a power of two from 1M to 256M (32M is Hyper-V's own choice)
    /// [default: by the disk's size as qemu-img chooses, 8M up to 1 GiB, 16M up to 100 GiB,
    /// 32M up to 32 TiB, 64M beyond]
    #[arg(long, value_name = "SIZE")]
    pub(crate) vhdx_block_size: Option<String>,
    /// Progress display: a bar on a terminal, or nothing
    #[arg(long, value_enum, default_value_t = ProgressKind::Bar)]
    pub(crate) progress: ProgressKind,
    /// Replace OUT if it exists
    #[arg(long)]
    pub(crate) force: bool,
    /// Read a local qcow2 overlay through its backing file(s) (never done implicitly)
    #[arg(long)]
    pub(crate) follow_backing: bool,
    /// Store data clusters compressed (qcow2 only): smaller archives, slower to write
    #[arg(long)]
    pub(crate) compress: bool,
}

impl OutputArgs {
    pub(crate) fn options(&self, format: ImageFormat) -> OutputOptions {
        OutputOptions {
            format,
            compress: self.compress,
            overwrite: self.force,
        }
    }

    /// The explicit format, or the one OUT's extension suggests.
    pub(crate) fn format_for(&self, out: &Path) -> Result<ImageFormat> {
        image_format(self.format, self.vhdx_block_size.as_deref(), out)
    }
}

/// The format of output `out`: `format`, or the one its extension suggests; a VHDX gets
/// `vhdx_block_size` (which no other format takes).
pub(crate) fn image_format(
    format: Option<Format>,
    vhdx_block_size: Option<&str>,
    out: &Path,
) -> Result<ImageFormat> {
    let format = format.map_or_else(|| ImageFormat::from_extension(out), ImageFormat::from);
    match (format, vhdx_block_size) {
        (_, None) => Ok(format),
        (ImageFormat::Vhdx { .. }, Some(size)) => Ok(ImageFormat::Vhdx {
            block_size: Some(images::parse_size(size)?),
        }),
        (other, Some(_)) => bail!(
            "--vhdx-block-size applies to VHDX outputs, not {}",
            other.name()
        ),
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    /// A sparse raw disk image
    Raw,
    /// qcow2 version 3 (64 KiB clusters), sparse
    Qcow2,
    /// Dynamic VHDX (blocks by disk size, or --vhdx-block-size), sparse: what Hyper-V boots
    Vhdx,
    /// Dynamic VHD (2 MiB blocks), sparse: Virtual PC and older Hyper-V
    Vhd,
    /// Fixed VHD: the whole disk plus a footer (what Azure takes)
    VhdFixed,
    /// monolithicSparse VMDK (64 KiB grains), sparse: VMware Workstation and Fusion
    Vmdk,
    /// streamOptimized VMDK (compressed grains): for ESXi and OVA/OVF imports
    VmdkStream,
}

impl From<Format> for ImageFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Raw => ImageFormat::Raw,
            Format::Qcow2 => ImageFormat::Qcow2,
            Format::Vhdx => ImageFormat::VHDX,
            Format::Vhd => ImageFormat::Vhd,
            Format::VhdFixed => ImageFormat::VhdFixed,
            Format::Vmdk => ImageFormat::Vmdk,
            Format::VmdkStream => ImageFormat::VmdkStream,
        }
    }
}

pub(crate) fn run(args: CaptureArgs) -> Result<()> {
    let format = args.output.format_for(&args.out)?;
    let spec = SourceSpec::parse(&args.source);
    if matches!(&spec, SourceSpec::Local(p) if !p.exists()) && args.daemon.given() {
        return capture_through_server(&args);
    }
    crate::when::refuse_without_server(&args.when)?;
    let opts = match &spec {
        SourceSpec::Remote { .. } => Some(session(&args.conn)?),
        SourceSpec::Local(_) => None,
    };
    let rt = runtime()?;
    let src = open_source(
        &spec,
        rt.handle(),
        opts.as_ref(),
        args.output.follow_backing,
        args.conn.reconnect(),
    )?;
    let progress = progress_for(args.output.progress);
    let transform = args.custom.transform(&src)?;
    let options = CaptureOptions {
        output: args.output.options(format),
        mode: args.mode.into(),
        size: args.size.as_deref().map(images::parse_size).transpose()?,
        verify: args.verify,
        chunk_map: args.chunk_map,
        base: args.base.clone(),
        transform,
    };
    let outcome =
        diskferry_imaging::capture(Arc::clone(&src), &args.out, &options, progress.as_ref())?;
    print_capture_summary(&outcome, format);
    Ok(())
}

/// The last line of a capture: what went where, how much, how fast.
fn print_capture_summary(outcome: &CaptureOutcome, format: ImageFormat) {
    let out = outcome.out.display();
    match &outcome.summary {
        CaptureSummary::WholeDisk(stats) => {
            let secs = stats.elapsed.as_secs_f64().max(1e-9);
            eprintln!(
                "captured {} into {out} ({}): {} read ({} skipped as zero by the client), {} written, {:.1} s, {:.0} MB/s",
                human_bytes(stats.size),
                format.name(),
                human_bytes(stats.read),
                human_bytes(stats.skipped_by_status),
                human_bytes(stats.written),
                secs,
                stats.read as f64 / secs / 1e6
            );
        }
        CaptureSummary::Partitions(report) => {
            let read: u64 = report.partitions.iter().map(|p| p.read).sum();
            let on_disk = std::fs::metadata(&outcome.out)
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks() * 512
                })
                .unwrap_or(0);
            eprintln!(
                "captured {} ({} table) into {out} ({}, {} virtual, {} on disk): {} read, {:.1} s",
                human_bytes(report.source_size),
                report.scheme,
                format.name(),
                human_bytes(report.output_size),
                human_bytes(on_disk),
                human_bytes(read + report.boot_bytes),
                report.elapsed.as_secs_f64()
            );
            let reused: u64 = report.partitions.iter().map(|p| p.reused).sum();
            if reused > 0 {
                eprintln!(
                    "{} of unchanged files taken from the base instead of the source",
                    human_bytes(reused)
                );
            }
        }
        CaptureSummary::Overlay => {
            eprintln!("captured the changed chunks into {out} (a qcow2 overlay on its base)")
        }
    }
    if let Some((base, s)) = &outcome.incremental {
        eprintln!(
            "incremental on {}: {} of {} chunks changed ({}), hashed and compared in {:.1} s",
            base.display(),
            s.changed_chunks,
            s.chunks,
            human_bytes(s.changed_bytes),
            s.elapsed.as_secs_f64()
        );
    }
    if let Some(map) = &outcome.chunk_map {
        eprintln!("chunk map: {}", map.display());
    }
}

/// Captures a machine through the server that holds its connection.
fn capture_through_server(args: &CaptureArgs) -> Result<()> {
    let name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("OUT needs a file name")?;
    if let Some(dir) = args.daemon.captures_dir() {
        let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| p != dir) {
            bail!(
                "a machine is captured by the server into {}: give OUT as a file name ({name})",
                dir.display()
            );
        }
    }
    let mode = DiskMode::from(args.mode).name();
    let mut request = serde_json::json!({
        "kind": "capture", "source": args.source, "output": name, "mode": mode,
        "verify": args.verify, "customize": args.custom.spec_text()?,
        "target_hardware": args.custom.target_hardware.map(|h| h.name()),
    });
    // The server names its captures by file name; without --base it builds on the machine's
    // latest capture of that disk when it has one (and writes a chunk map either way).
    if let Some(base) = &args.base {
        let base = base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("--base needs a file name (a capture in the server's catalog)")?;
        request["base"] = base.into();
    }
    let daemon = machines::Daemon::find(&args.daemon)?;
    if args.when.submit(&daemon, &mut request)? {
        return Ok(());
    }
    let job = daemon.run_job(request)?;
    let summary = job["result"]["summary"].as_str().unwrap_or("done");
    eprintln!(
        "captured {} into the server's captures as {name}: {summary}",
        args.source
    );
    Ok(())
}

/// Runs the verification, prints what differs, and fails if anything does.
pub(crate) fn verify_and_report(
    a: &Arc<dyn diskferry_blockdev::BlockDevice>,
    b: &Arc<dyn diskferry_blockdev::BlockDevice>,
) -> Result<()> {
    let report = diskferry_imaging::pipeline::verify::verify_disks(a, b)?;
    for d in &report.listed {
        eprintln!("  differs: {d}");
    }
    for n in &report.notes {
        eprintln!("  note: {n}");
    }
    if report.differences > 0 {
        bail!(
            "verify: {} differences ({} files, {} compared)",
            report.differences,
            report.files_compared,
            human_bytes(report.bytes_compared)
        );
    }
    eprintln!(
        "verify: no differences ({} files, {} compared)",
        report.files_compared,
        human_bytes(report.bytes_compared)
    );
    Ok(())
}
