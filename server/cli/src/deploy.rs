//! `diskferry deploy IMAGE TARGET`: an image written onto a disk — a listening client's
//! (`DISK@HOST:PORT`, started with `--allow-write`) or a local raw file or block device —
//! partition table scaled to the target, partitions by mode, verified by reading the target
//! back. A machine registered with a running server (`MACHINE` or `DISK@MACHINE`) is deployed
//! by that server, which holds its connection.
//!
//! Before writing to a listening client, its identity (firmware, Secure Boot, PCI devices)
//! is asked and the image checked against it (`diskferry_imaging::compat`): a firmware the
//! image cannot boot with, or a storage controller its kernels have no boot driver for, is
//! refused unless `--force`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use diskferry_imaging::pipeline::DeployHow;
use diskferry_imaging::source::{open_target, SourceSpec};

use crate::{human_bytes, progress_for, ConnArgs, Mode, ProgressKind};

#[derive(Args)]
pub struct DeployArgs {
    /// The image to deploy (qcow2, VHDX, VHD, VMDK or raw; a capture)
    pub(crate) image: PathBuf,
    /// Where: DISK@HOST:PORT (a client started with --allow-write), a local raw file or block
    /// device, or a machine (MACHINE or DISK@MACHINE: its name or MAC) through the server that
    /// holds it (--data-dir or --server; IMAGE is then one of that server's captures). Not
    /// given with --multicast
    #[arg(required_unless_present_any = ["multicast", "group"], conflicts_with_all = ["multicast", "group"])]
    target: Option<String>,
    /// How to copy each partition (auto: files for ext4/FAT, blocks for NTFS, sectors else)
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub(crate) mode: Mode,
    /// Progress display
    #[arg(long, value_enum, default_value_t = ProgressKind::Bar)]
    pub(crate) progress: ProgressKind,
    /// Reboot the machine when done (machines deployed through a server)
    #[arg(long)]
    pub(crate) reboot: bool,
    /// Read a qcow2 overlay (an incremental capture) through its backing file(s) (never done
    /// implicitly)
    #[arg(long)]
    pub(crate) follow_backing: bool,
    /// Do not add the EFI fallback loader. By default an EFI system partition recreated file
    /// by file that lacks \EFI\BOOT\BOOTX64.EFI gets one, copied from the system's own
    /// loader in \EFI\VENDOR\ (shimx64.efi with its grubx64.efi and mmx64.efi, else
    /// grubx64.efi; and grub.cfg), so firmware with blank boot variables still boots it. Turn
    /// it off to keep the partition exactly as captured: when the target's firmware must only
    /// boot through its own boot entries, or \EFI\BOOT is managed by other means (another
    /// system's loader put there later)
    #[arg(long)]
    pub(crate) no_fallback_loader: bool,
    /// Do not register a UEFI boot entry. By default, once the disk verified, the machine's
    /// agent is asked to add a boot entry for the deployed system's loader (\EFI\VENDOR\
    /// shimx64.efi, else grubx64.efi, on a GPT disk's EFI system partition) first in the
    /// firmware's boot order, as grub-install does; agents started without --allow-firmware
    /// and BIOS machines write none (a note says so)
    #[arg(long)]
    pub(crate) no_boot_entry: bool,
    /// Write even when the compatibility check refuses: the target's firmware (BIOS or UEFI)
    /// must be one the image boots with, and its storage controllers need a driver in the
    /// image's initramfs or kernel, or one --target-hardware adds (a listening client is
    /// asked; a machine through a server is judged by what its agent last announced); the
    /// reasons are then printed as warnings
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) custom: crate::customize::CustomizeArgs,
    #[command(flatten)]
    pub(crate) conn: ConnArgs,
    #[command(flatten)]
    pub(crate) daemon: crate::machines::DaemonArgs,
    #[command(flatten)]
    pub(crate) when: crate::when::WhenArgs,
    #[command(flatten)]
    pub(crate) multicast: crate::multicast::MulticastArgs,
    #[command(flatten)]
    pub(crate) live: crate::live::LiveArgs,
}

pub fn run(args: &DeployArgs) -> Result<()> {
    let Some(target) = args.target.as_deref() else {
        if args.live.live {
            anyhow::bail!("--live deploys to one machine: DISK@HOST:PORT");
        }
        return crate::multicast::run(args);
    };
    if args.live.live {
        return crate::live::deploy(args, target);
    }
    let spec = SourceSpec::parse(target);
    let is_local_file = matches!(&spec, SourceSpec::Local(p) if p.exists());
    if !matches!(spec, SourceSpec::Remote { .. }) && !is_local_file {
        return deploy_through_server(args, target);
    }
    if args.reboot {
        anyhow::bail!(
            "--reboot needs a machine deployed through a server (--data-dir or --server)"
        );
    }
    crate::when::refuse_without_server(&args.when)?;
    let session = match &spec {
        SourceSpec::Remote { .. } => Some(crate::session(&args.conn)?),
        SourceSpec::Local(_) => None,
    };
    let rt = crate::runtime()?;
    let (_, image) = diskferry_vdisk::open_image(&args.image, args.follow_backing)
        .with_context(|| format!("cannot open the image {}", args.image.display()))?;
    let how = DeployHow {
        mode: args.mode.into(),
        transform: args.custom.transform(&image)?,
        fallback_loader: !args.no_fallback_loader,
    };
    if let SourceSpec::Remote { addr, .. } = &spec {
        check_compatibility(args, target, &image, addr, rt.handle(), session.as_ref())?;
    }
    let dst = open_target(&spec, rt.handle(), session.as_ref(), args.conn.reconnect())?;
    let progress = progress_for(args.progress);
    let report =
        diskferry_imaging::deploy(image, Arc::clone(&dst), target, &how, progress.as_ref())?;
    if let (false, SourceSpec::Remote { addr, .. }, Some(session)) =
        (args.no_boot_entry, &spec, &session)
    {
        let line = rt
            .block_on(diskferry_remote::Connection::connect(addr, session))
            .map(|conn| diskferry_imaging::boot_entry::register(&conn, &dst))
            .unwrap_or_else(|e| format!("no UEFI boot entry registered: {e}"));
        eprintln!("{line}");
    }
    let written: u64 = report.disk.partitions.iter().map(|p| p.read).sum();
    let secs = report.disk.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "deployed {} ({} table) onto {} ({}): {} copied, {:.1} s, {:.0} MB/s",
        args.image.display(),
        report.disk.scheme,
        target,
        human_bytes(report.disk.output_size),
        human_bytes(written + report.disk.boot_bytes),
        secs,
        (written + report.disk.boot_bytes) as f64 / secs / 1e6,
    );
    Ok(())
}

/// Asks the client at `addr` what it is and checks `image` against it: refusals end the
/// deploy before anything is written, unless `--force` (then they are warnings).
pub(crate) fn check_compatibility(
    args: &DeployArgs,
    target: &str,
    image: &Arc<dyn diskferry_blockdev::BlockDevice>,
    addr: &str,
    rt: &tokio::runtime::Handle,
    session: Option<&diskferry_protocol::SessionOptions>,
) -> Result<()> {
    let doc = diskferry_imaging::source::identify_listening(rt, addr, session)?;
    let machine: diskferry_customize::compat::MachineFacts = serde_json::from_str(&doc)
        .with_context(|| format!("the client at {addr} sent an unreadable identity"))?;
    let disk = match SourceSpec::parse(target) {
        SourceSpec::Remote { disk, .. } => disk,
        SourceSpec::Local(_) => String::new(),
    };
    let machine = machine.writing(&disk);
    let findings =
        diskferry_imaging::compat::check_deploy(image, &machine, args.custom.target_hardware);
    let refused: Vec<&str> = findings
        .iter()
        .filter(|f| f.refuses())
        .map(|f| f.reason.as_str())
        .collect();
    for f in findings.iter().filter(|f| !f.refuses()) {
        eprintln!("diskferry: {f}");
    }
    if refused.is_empty() {
        return Ok(());
    }
    if args.force {
        for r in &refused {
            eprintln!("diskferry: warning (--force): {r}");
        }
        return Ok(());
    }
    anyhow::bail!(
        "the image does not fit {} (nothing was written):\n  - {}",
        target,
        refused.join("\n  - ")
    )
}

/// A machine (`MACHINE` or `DISK@MACHINE`) is deployed by the server that holds its connection;
/// the image must be one of that server's captures.
fn deploy_through_server(args: &DeployArgs, target: &str) -> Result<()> {
    if !args.daemon.given() {
        anyhow::bail!(
            "{} is not DISK@HOST:PORT or an existing file; to deploy a machine, say which server holds it: --data-dir DIR or --server URL --token-file FILE",
            target
        );
    }
    let image = server_image_name(args)?;
    let daemon = crate::machines::Daemon::find(&args.daemon)?;
    let mut request = server_request(args, "deploy", &image)?;
    request["target"] = target.into();
    if args.when.submit(&daemon, &mut request)? {
        return Ok(());
    }
    daemon.run_job(request)?;
    eprintln!("deployed {image} onto {target}");
    Ok(())
}

/// A server job writing `image` (`kind` deploy or multicast) as the options say; the caller
/// adds where.
pub(crate) fn server_request(
    args: &DeployArgs,
    kind: &str,
    image: &str,
) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "kind": kind, "image": image,
        "mode": diskferry_imaging::pipeline::Mode::from(args.mode).name(),
        "reboot": args.reboot, "force": args.force, "customize": args.custom.spec_text()?,
        "target_hardware": args.custom.target_hardware.map(|h| h.name()),
        "fallback_loader": !args.no_fallback_loader, "boot_entry": !args.no_boot_entry,
    }))
}

/// IMAGE as the server knows it: by name among its captures.
pub(crate) fn server_image_name(args: &DeployArgs) -> Result<String> {
    Ok(match args.daemon.captures_dir() {
        Some(dir)
            if args.image.starts_with(&dir)
                || args.image.parent() == Some(std::path::Path::new("")) =>
        {
            args.image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        }
        Some(dir) if args.image.exists() => anyhow::bail!(
            "{} is not among the server's captures: copy it into {} first",
            args.image.display(),
            dir.display()
        ),
        _ => args.image.to_string_lossy().into_owned(),
    })
}
