//! `diskferry export SOURCE`: serves a capture (qcow2 chains followed), a local disk, or a
//! listening client's disk over NBD, so qemu, `nbdcopy`, `nbdinfo` or the kernel's NBD client
//! use it directly. Read-only unless `--writable`; a capture never changes, so its writes go to
//! a redo log: a qcow2 overlay (`--redo FILE.qcow2`, kept) or memory (`--redo ram:SIZE[:SPILL]`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use diskferry_blockdev::{BlockDevice, CowDevice, HybridOptions, HybridVolume};
use diskferry_fs::host::HostFs;
use diskferry_imaging::skeleton::{SkeletonDisk, SkeletonStats};
use diskferry_imaging::source::{open_source, open_target, SourceSpec};
use diskferry_nbd::{Export, Exports, Limits, Server};

use crate::{human_bytes, images, runtime, session, ConnArgs};

#[derive(Args)]
pub(crate) struct ExportArgs {
    /// What to serve: an image (raw, qcow2 — backing files followed —, VHDX, VHD, VMDK), a
    /// local disk, DISK@HOST:PORT, a listening diskferry-client's disk, or a machine held by a
    /// server (MACHINE or DISK@MACHINE, with --data-dir or --server: the server serves it)
    #[arg(required_unless_present = "files")]
    source: Option<String>,
    /// Serve a skeleton disk instead, whose filesystem metadata is built in memory and whose
    /// file data is read from the source's files — nothing is copied: of DIR (a directory: GPT
    /// and one ext4), of IMAGE (a captured disk: its table, boot code and other partitions
    /// kept, each ext2/3/4 and FAT partition replaced by its skeleton, so it boots as the
    /// capture does), or of IMAGE:PART (that partition's filesystem, same kind and identity,
    /// on a GPT disk of its own; an EFI System Partition stays one). Writable only with
    /// --redo ram:SIZE
    #[arg(long, value_name = "DIR|IMAGE|IMAGE:PART", conflicts_with = "source")]
    files: Option<String>,
    /// Address to serve NBD on. Loopback only: this NBD server offers no TLS yet, so reach it
    /// from another machine through an SSH tunnel (ssh -L 10809:127.0.0.1:10809 HOST)
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The export's name [default: the image's file name, or the remote disk's name]
    #[arg(long)]
    name: Option<String>,
    /// Accept writes. An image never changes: its writes need --redo. A remote disk without
    /// --redo is written in place (its client must run with --allow-write)
    #[arg(long)]
    writable: bool,
    /// Where writes go instead of SOURCE: FILE.qcow2 — a qcow2 overlay on the image, created
    /// when missing and taken up again when it already is one (qemu and `diskferry deploy
    /// --follow-backing` read it later) — or ram:SIZE[:SPILLFILE] — memory up to SIZE (K/M/G),
    /// then SPILLFILE, all dropped when the export stops
    #[arg(
        long,
        requires = "writable",
        value_name = "FILE.qcow2|ram:SIZE[:SPILLFILE]"
    )]
    redo: Option<String>,
    /// Most NBD connections served at once (qemu opens one per disk; nbdcopy up to four)
    #[arg(long, default_value_t = 16)]
    max_connections: usize,
    #[command(flatten)]
    conn: ConnArgs,
    /// With --customize, IMAGE is served as its skeleton (the filesystems recreated in
    /// memory) with the customization made; the image never changes
    #[command(flatten)]
    custom: crate::customize::CustomizeArgs,
    /// A machine connected to a server (MACHINE or DISK@MACHINE: its name or MAC) is served
    /// by that server, read-only, on its NBD port: this prints the URL
    #[command(flatten)]
    daemon: crate::machines::DaemonArgs,
}

/// Where writes go.
#[derive(Debug, PartialEq, Eq)]
enum Redo {
    Qcow2(PathBuf),
    Ram { size: u64, spill: Option<PathBuf> },
}

impl Redo {
    fn parse(s: &str) -> Result<Redo> {
        let Some(ram) = s.strip_prefix("ram:") else {
            return Ok(Redo::Qcow2(PathBuf::from(s)));
        };
        let (size, spill) = match ram.split_once(':') {
            Some((size, spill)) if !spill.is_empty() => (size, Some(PathBuf::from(spill))),
            _ => (ram, None),
        };
        let size = images::parse_size(size).with_context(|| format!("--redo {s}: SIZE"))?;
        if size == 0 {
            bail!("--redo {s}: SIZE must be more than 0");
        }
        Ok(Redo::Ram { size, spill })
    }
}

pub(crate) fn run(args: &ExportArgs) -> Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "{} is not a loopback address: diskferry's NBD exports have no TLS yet, so they \
             listen on loopback only; from another machine, tunnel: ssh -L 10809:127.0.0.1:10809 \
             THIS_HOST",
            args.listen
        );
    }
    if let Some(source) = &args.source {
        let spec = SourceSpec::parse(source);
        if args.daemon.given() && matches!(&spec, SourceSpec::Local(p) if !p.exists()) {
            return print_machine_export(args, source);
        }
    }
    let redo = args.redo.as_deref().map(Redo::parse).transpose()?;
    let rt = runtime()?;
    // A customized image is served as its skeleton: that is where its trees are recreated.
    let files = match (&args.files, &args.source) {
        (None, Some(source)) if args.custom.any() => {
            if !Path::new(source).is_file() {
                bail!(
                    "--customize applies to an image file (served as its skeleton), not {source}"
                );
            }
            eprintln!("customizing: {source} is served as its skeleton");
            Some(source.clone())
        }
        (files, _) => files.clone(),
    };
    let (device, what, default) = match (&files, &args.source) {
        (Some(files), _) => {
            let (dev, what) = skeleton_device(files, args, redo.as_ref())?;
            (dev, what, default_name(&SourceSpec::Local(files.into())))
        }
        (None, Some(source)) => {
            let spec = SourceSpec::parse(source);
            let (dev, what) = open_device(args, source, &spec, redo.as_ref(), rt.handle())?;
            (dev, what, default_name(&spec))
        }
        (None, None) => bail!("give SOURCE or --files"),
    };
    let name = args.name.clone().unwrap_or(default);
    let export = Export {
        name: name.clone(),
        description: what.clone(),
        device: Arc::clone(&device),
        writable: args.writable,
    };
    let limits = Limits {
        max_connections: args.max_connections.max(1),
        ..Limits::default()
    };
    let server = Server::bind(args.listen, Exports::new(vec![export]), limits)?;
    let addr = server.local_addr()?;
    print_usage(addr, &name, &what, device.size(), args.writable);
    std::thread::spawn(move || server.run(&AtomicBool::new(false)));
    rt.block_on(stopped())?;
    device
        .flush()
        .context("flushing the writes before stopping")?;
    // The connections' threads still hold the volume: its spill file goes now, not at a drop
    // that process exit never runs.
    if let Some(Redo::Ram {
        spill: Some(spill), ..
    }) = &redo
    {
        std::fs::remove_file(spill)
            .with_context(|| format!("removing the spill file {}", spill.display()))?;
    }
    eprintln!(
        "stopped{}",
        if args.writable {
            "; writes flushed"
        } else {
            ""
        }
    );
    Ok(())
}

/// A machine's disk is served by the server holding its connection: say where.
fn print_machine_export(args: &ExportArgs, source: &str) -> Result<()> {
    if args.writable || args.name.is_some() {
        bail!(
            "the server serves a machine's disk read-only under the name DISK@MACHINE: drop \
             --writable and --name (for writes on top, qemu-img create -f qcow2 -F raw -b URL \
             redo.qcow2)"
        );
    }
    let url = crate::machines::machine_export_url(&args.daemon, source)?;
    println!("{url}");
    eprintln!(
        "the server serves {source} read-only at that URL while the machine stays connected: \
         qemu-img compare, nbdcopy, nbdinfo or qemu -drive file={url},format=raw,readonly=on"
    );
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
async fn stopped() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// The device served, and a line saying what it is.
fn open_device(
    args: &ExportArgs,
    source: &str,
    spec: &SourceSpec,
    redo: Option<&Redo>,
    rt: &tokio::runtime::Handle,
) -> Result<(Arc<dyn BlockDevice>, String)> {
    let session = match spec {
        SourceSpec::Remote { .. } => Some(session(&args.conn)?),
        SourceSpec::Local(_) => None,
    };
    let reconnect = args.conn.reconnect();
    match (spec, redo) {
        (SourceSpec::Local(path), None) if args.writable => bail!(
            "{} is an image, and images never change: add --redo FILE.qcow2 (kept) or --redo \
             ram:SIZE (dropped at exit) to take the writes",
            path.display()
        ),
        (SourceSpec::Remote { .. }, None) if args.writable => {
            let dev = open_target(spec, rt, session.as_ref(), reconnect)?;
            Ok((dev, format!("{} (written in place)", source)))
        }
        (_, None) => {
            let dev = open_source(spec, rt, session.as_ref(), true, reconnect)?;
            Ok((dev, format!("{} (read-only)", source)))
        }
        (SourceSpec::Local(path), Some(Redo::Qcow2(redo))) => {
            Ok((qcow2_redo(path, redo)?, format!("{} with its writes in {}", source, redo.display())))
        }
        (SourceSpec::Remote { .. }, Some(Redo::Qcow2(_))) => bail!(
            "a qcow2 redo log needs an image file to stand on; for a remote disk use --redo ram:SIZE[:SPILLFILE]"
        ),
        (_, Some(Redo::Ram { size, spill })) => {
            let base = open_source(spec, rt, session.as_ref(), true, reconnect)?;
            let dev = ram_redo(base, *size, spill.clone())?;
            let spill = spill.as_ref().map(|p| format!(", then {}", p.display())).unwrap_or_default();
            Ok((dev, format!("{} with its writes in memory (up to {}{spill})", source, human_bytes(*size))))
        }
    }
}

/// A copy-on-write layer over `base` whose writes stay in memory up to `ram` bytes, then go
/// to `spill` (created, and removed when the export stops).
fn ram_redo(
    base: Arc<dyn BlockDevice>,
    ram: u64,
    spill: Option<PathBuf>,
) -> Result<Arc<dyn BlockDevice>> {
    let options = HybridOptions {
        ram_limit: ram,
        spill,
    };
    let top = HybridVolume::new(base.size(), options).context("the memory redo log")?;
    Ok(Arc::new(CowDevice::new(base, Arc::new(top))?))
}

/// A skeleton disk of `files` (a directory, or IMAGE:PART), under a memory redo when writable.
fn skeleton_device(
    files: &str,
    args: &ExportArgs,
    redo: Option<&Redo>,
) -> Result<(Arc<dyn BlockDevice>, String)> {
    let writable = args.writable;
    let (skeleton, stats) = skeleton_of(files, &args.custom)?;
    eprintln!(
        "skeleton of {files}: {} files, {} directories, {} of file data mapped, {} of metadata in memory, ready in {:.2} s",
        stats.files,
        stats.dirs,
        human_bytes(stats.mapped_bytes),
        human_bytes(stats.metadata_bytes),
        stats.elapsed.as_secs_f64()
    );
    for (path, why) in stats.skipped.iter().take(20) {
        eprintln!("  left out {path}: {why}");
    }
    for c in &stats.changes {
        eprintln!("  customized: {c}");
    }
    let skeleton: Arc<dyn BlockDevice> = Arc::new(skeleton);
    match redo {
        None if writable => bail!("a skeleton's files are never written: add --redo ram:SIZE[:SPILLFILE] to take the writes"),
        None => Ok((skeleton, format!("skeleton of {files} (read-only)"))),
        Some(Redo::Qcow2(_)) => bail!("a skeleton is not a file a qcow2 redo log can stand on: use --redo ram:SIZE[:SPILLFILE]"),
        Some(Redo::Ram { size, spill }) => {
            let dev = ram_redo(skeleton, *size, spill.clone())?;
            Ok((dev, format!("skeleton of {files} with its writes in memory")))
        }
    }
}

/// The skeleton of `files`: a host directory's tree, a whole captured disk (IMAGE: its table,
/// boot code and other partitions kept, each ext2/3/4 and FAT replaced), or one partition
/// (IMAGE:PART: the same filesystem on a disk of its own).
fn skeleton_of(
    files: &str,
    custom: &crate::customize::CustomizeArgs,
) -> Result<(SkeletonDisk, SkeletonStats)> {
    let path = Path::new(files);
    if custom.any() && !path.is_file() {
        bail!("--customize applies to a whole image's skeleton (--files IMAGE), not {files}");
    }
    let built = if path.is_dir() {
        let tree = HostFs::open(path).with_context(|| format!("reading {files}"))?;
        SkeletonDisk::of_tree(Arc::new(tree))
    } else if path.is_file() {
        let (_, disk) = diskferry_vdisk::open_image(path, true)?;
        let transform = custom.transform(&disk)?;
        SkeletonDisk::of_disk_with(disk, transform.as_deref())
    } else {
        let Some((image, part)) = files.rsplit_once(':') else {
            bail!("--files {files}: not a directory, an image, or IMAGE:PART");
        };
        let number: u32 = part
            .parse()
            .with_context(|| format!("--files {files}: PART is a partition number"))?;
        let (_, disk) = diskferry_vdisk::open_image(Path::new(image), true)?;
        SkeletonDisk::of_partition(disk, number)
    };
    built.with_context(|| format!("building the skeleton of {files}"))
}

/// The qcow2 overlay at `redo` on the image at `image`: created, or taken up again.
fn qcow2_redo(image: &Path, redo: &Path) -> Result<Arc<dyn BlockDevice>> {
    if redo.exists() {
        let dev = diskferry_vdisk::reopen_overlay(redo, image)?;
        eprintln!("continuing the redo log {}", redo.display());
        return Ok(dev);
    }
    let file = std::fs::File::create_new(redo)
        .with_context(|| format!("creating the redo log {}", redo.display()))?;
    let created = diskferry_vdisk::create_overlay(file, redo, image);
    if created.is_err() {
        let _ = std::fs::remove_file(redo);
    }
    let dev = created?;
    dev.flush()?;
    Ok(dev)
}

fn default_name(spec: &SourceSpec) -> String {
    match spec {
        SourceSpec::Remote { disk, .. } => Path::new(disk)
            .file_name()
            .map_or_else(|| disk.clone(), |n| n.to_string_lossy().into_owned()),
        SourceSpec::Local(path) => path
            .file_name()
            .map_or_else(|| "disk".into(), |n| n.to_string_lossy().into_owned()),
    }
}

/// What to tell the user: the URL and how to use it.
fn print_usage(addr: SocketAddr, name: &str, what: &str, size: u64, writable: bool) {
    let url = format!("nbd://{addr}/{name}");
    println!("serving {what}, {}, as {url}", human_bytes(size));
    let snapshot = if writable { "" } else { " -snapshot" };
    println!(
        "  boot it:  qemu-system-x86_64 -m 2048 -drive file={url},format=raw,if=virtio{snapshot}"
    );
    println!("  copy it:  nbdcopy {url} disk.raw");
    println!("  map it:   nbdinfo --map {url}");
    println!(
        "Ctrl-C stops serving{}",
        if writable {
            " (writes are flushed first)"
        } else {
            ""
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redo_targets_parse() {
        assert_eq!(
            Redo::parse("r.qcow2").unwrap(),
            Redo::Qcow2("r.qcow2".into())
        );
        assert_eq!(
            Redo::parse("ram:2G").unwrap(),
            Redo::Ram {
                size: 2 << 30,
                spill: None
            }
        );
        assert_eq!(
            Redo::parse("ram:512M:/tmp/spill").unwrap(),
            Redo::Ram {
                size: 512 << 20,
                spill: Some("/tmp/spill".into())
            }
        );
        assert!(Redo::parse("ram:").is_err());
        assert!(Redo::parse("ram:0").is_err());
        assert!(Redo::parse("ram:lots").is_err());
    }
}
