//! `diskferry deploy IMAGE --multicast DISK@HOST:PORT,…`: one image onto many listening
//! clients at once, streamed once over UDP multicast (`diskferry_imaging::multicast`). Each
//! client is checked for compatibility first (as a single deploy is), the image is staged once
//! here, and every machine ends verified by hashes or is reported failed; the exit status is
//! non-zero when any machine failed.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use diskferry_imaging::multicast::{
    multicast_deploy, MachineState, MulticastHow, MulticastReport, Phase, Target, Watch,
};
use diskferry_imaging::pipeline::DeployHow;
use diskferry_imaging::source::SourceSpec;
use diskferry_remote::{Connection, RemoteOptions};

use crate::deploy::DeployArgs;
use crate::{human_bytes, progress_for};

#[derive(Args)]
pub(crate) struct MulticastArgs {
    /// Deploy to many machines at once, sending the image once over UDP multicast: a
    /// comma-separated list of DISK@HOST:PORT (clients started with --allow-write, on this
    /// network segment), or of machines (MACHINE or DISK@MACHINE) of the server given by
    /// --data-dir or --server. The image is built once for the smallest disk; machines the
    /// session leaves behind get it by unicast; every disk is verified by hashes
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "TARGETS",
        conflicts_with = "group"
    )]
    pub multicast: Vec<String>,
    /// Multicast deploy to every machine of this group (`diskferry machine groups`), through
    /// the server given by --data-dir or --server; the job waits for them all to connect
    /// (waking them), and after --wait minutes starts with those that came
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Minutes a server's multicast job waits for its machines [default: 15]
    #[arg(long, value_name = "MINUTES")]
    wait: Option<u32>,
    /// The multicast group to send to [default: one in 239.255.0.0/16 picked per session]
    #[arg(long, value_name = "ADDR", requires = "multicast")]
    multicast_group: Option<Ipv4Addr>,
    /// The group's UDP port [default: one in 49152-65535 picked per session]
    #[arg(long, value_name = "PORT", requires = "multicast")]
    multicast_port: Option<u16>,
    /// This server's address to send from, which the machines reach [default: the address
    /// the first machine's connection uses]
    #[arg(long, value_name = "ADDR", requires = "multicast")]
    multicast_bind: Option<Ipv4Addr>,
    /// Most megabits a second to send; the rate also adapts to the slowest machine's loss
    /// [default: 1000]
    #[arg(long, value_name = "MBIT")]
    max_rate: Option<u64>,
    /// Seconds a machine may stay silent before the session goes on without it (it then gets
    /// the image by unicast, if it still answers)
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5,
        requires = "multicast"
    )]
    receiver_timeout: u64,
}

/// Runs a multicast deploy to the listening clients `--multicast` names.
pub(crate) fn run(args: &DeployArgs) -> Result<()> {
    let m = &args.multicast;
    let direct = !m.multicast.is_empty()
        && m.multicast
            .iter()
            .all(|t| matches!(SourceSpec::parse(t), SourceSpec::Remote { .. }));
    if !direct {
        return through_server(args);
    }
    let specs = parse_targets(&m.multicast)?;
    crate::when::refuse_without_server(&args.when)?;
    if args.reboot {
        bail!("--reboot needs machines deployed through a server");
    }
    let session = crate::session(&args.conn)?;
    let rt = crate::runtime()?;
    let (_, image) = diskferry_vdisk::open_image(&args.image, args.follow_backing)
        .with_context(|| format!("cannot open the image {}", args.image.display()))?;
    for (name, _, addr) in &specs {
        crate::deploy::check_compatibility(args, name, &image, addr, rt.handle(), Some(&session))?;
    }
    let mut targets = Vec::new();
    for (name, disk, addr) in specs {
        let conn = rt
            .block_on(Connection::connect(&addr, &session))
            .with_context(|| format!("cannot reach {name}"))?;
        let opened = rt
            .block_on(conn.open(&disk, true, RemoteOptions::default()))
            .with_context(|| format!("cannot open {name} for writing"))?;
        targets.push(Target {
            name,
            disk: Arc::new(opened),
        });
    }
    let deploy = DeployHow {
        mode: args.mode.into(),
        transform: args.custom.transform(&image)?,
        fallback_loader: !args.no_fallback_loader,
    };
    let mut how = MulticastHow::new(deploy);
    how.group = m.multicast_group;
    how.port = m.multicast_port;
    how.bind = m.multicast_bind;
    how.max_rate = m.max_rate.map(|mbit| mbit.saturating_mul(125_000));
    how.receiver_timeout = Duration::from_secs(m.receiver_timeout.max(1));
    how.boot_entries = !args.no_boot_entry;
    let progress = progress_for(args.progress);
    let report = multicast_deploy(
        image,
        &targets,
        &how,
        progress.as_ref(),
        &PhaseLines::default(),
    )?;
    print_report(&report);
    let failed: Vec<&str> = report.failed().map(|s| s.name.as_str()).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} machines failed: {}",
            failed.len(),
            report.machines.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// A multicast job of the server that holds the machines: `--multicast MACHINE,…` or
/// `--group NAME`.
fn through_server(args: &DeployArgs) -> Result<()> {
    let m = &args.multicast;
    if !args.daemon.given() {
        bail!(
            "--multicast to machines (not DISK@HOST:PORT) and --group need the server that holds them: --data-dir DIR or --server URL --token-file FILE"
        );
    }
    let image = crate::deploy::server_image_name(args)?;
    let daemon = crate::machines::Daemon::find(&args.daemon)?;
    let mut request = crate::deploy::server_request(args, "multicast", &image)?;
    request["max_rate_mbit"] = m.max_rate.into();
    request["wait_minutes"] = m.wait.into();
    match &m.group {
        Some(g) => request["group"] = g.clone().into(),
        None => request["targets"] = m.multicast.clone().into(),
    }
    if args.when.submit(&daemon, &mut request)? {
        return Ok(());
    }
    let what = m
        .group
        .as_ref()
        .map_or_else(|| m.multicast.join(", "), |g| format!("group {g}"));
    daemon.run_job(request)?;
    eprintln!("deployed {image} onto {what} by multicast");
    Ok(())
}

/// Each `DISK@HOST:PORT` as (name, disk, address).
fn parse_targets(list: &[String]) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for t in list.iter().filter(|t| !t.is_empty()) {
        match SourceSpec::parse(t) {
            SourceSpec::Remote { disk, addr } => {
                if out.iter().any(|(n, _, _)| n == t) {
                    bail!("{t} is named twice in --multicast");
                }
                out.push((t.clone(), disk, addr));
            }
            SourceSpec::Local(_) => bail!(
                "{t} is not DISK@HOST:PORT: --multicast deploys to listening clients (machines held by a server are deployed through it: diskferry deploy IMAGE MACHINE)"
            ),
        }
    }
    if out.is_empty() {
        bail!("--multicast needs at least one DISK@HOST:PORT");
    }
    Ok(out)
}

/// Prints a line whenever a machine changes phase.
#[derive(Default)]
struct PhaseLines {
    seen: Mutex<Vec<Phase>>,
}

impl Watch for PhaseLines {
    fn machines(&self, states: &[MachineState]) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.resize(states.len(), Phase::Waiting);
        for (s, last) in states.iter().zip(seen.iter_mut()) {
            if s.phase != *last {
                *last = s.phase.clone();
                match &s.error {
                    Some(e) => eprintln!("{}: failed: {e}", s.name),
                    None => eprintln!("{}: {}", s.name, phase_name(&s.phase)),
                }
            }
        }
    }
}

fn phase_name(p: &Phase) -> &'static str {
    match p {
        Phase::Waiting => "waiting",
        Phase::Zeroing => "zeroing the ranges that must read as zeros",
        Phase::Receiving => "receiving the multicast session",
        Phase::Unicast => "writing by unicast (the session left it behind)",
        Phase::Verifying => "verifying by hashes",
        Phase::Done => "done, verified",
        Phase::Failed => "failed",
    }
}

fn print_report(r: &MulticastReport) {
    if let Some(s) = &r.session {
        eprintln!(
            "multicast session on {}: {} sent in {:.1} s ({:.0} MB/s); repairs {} to the group, {} to single machines; {} forged or broken datagrams rejected",
            s.group,
            human_bytes(r.data_bytes),
            s.elapsed_s,
            r.data_bytes as f64 / s.elapsed_s.max(1e-9) / 1e6,
            human_bytes(s.multicast_repair_bytes),
            human_bytes(s.unicast_repair_bytes),
            s.rejected
        );
    }
    for m in &r.machines {
        match (&m.phase, &m.error) {
            (Phase::Done, _) => eprintln!(
                "  {}: verified ({})",
                m.name,
                m.delivery.as_deref().unwrap_or("?")
            ),
            (_, e) => eprintln!("  {}: FAILED: {}", m.name, e.as_deref().unwrap_or("?")),
        }
    }
    eprintln!(
        "deployed to {} of {} machines in {:.1} s ({} sent, {} zeroed on each)",
        r.machines.iter().filter(|m| m.phase == Phase::Done).count(),
        r.machines.len(),
        r.elapsed.as_secs_f64(),
        human_bytes(r.data_bytes),
        human_bytes(r.zero_bytes)
    );
}
