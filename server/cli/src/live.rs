//! Live deploys from the command line: `diskferry deploy IMAGE DISK@HOST:PORT --live` writes
//! the image's Linux root into a pinned file of the machine's running system (its agent
//! started with `--live`), switches its boot to the new system once, and — with
//! `--live-wait` — waits for the reboot: the new system's agent confirming commits it, the
//! old system coming back rolls it back; then the new system takes the disk over (unless
//! `--keep-old`). `diskferry live HOST:PORT` shows where a machine is, and `--commit`,
//! `--rollback` and `--take-over` finish by hand.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use diskferry_fs::overlay::Chain;
use diskferry_imaging::live::flow::{self, Outcome};
use diskferry_imaging::live::takeover::{self, TakeOver};
use diskferry_imaging::live::{self, agent::LiveAgent, boot, LiveOptions, LiveTarget};
use diskferry_imaging::source::SourceSpec;
use diskferry_protocol::{PowerAction, Reply, Request, StaticKey};
use diskferry_remote::Connection;

use crate::deploy::DeployArgs;
use crate::{human_bytes, progress_for, ConnArgs};

/// The live-deploy options of `deploy`.
#[derive(Args, Default)]
pub(crate) struct LiveArgs {
    /// Deploy into the machine's running Linux system: its agent (diskferry-client --live,
    /// running inside it) pins a file the size of the new root, the image's root is written
    /// into the disk sectors under that file, and GRUB boots the new system once at the next
    /// reboot. Nothing else of the running system changes; it stays bootable until the new
    /// system is committed (see --live-wait and `diskferry live`)
    #[arg(long)]
    pub(crate) live: bool,
    /// Size of the live file: bytes or with a unit (K, M, G, T) [default: one and a half
    /// times what the image's root needs]
    #[arg(long, value_name = "SIZE", requires = "live")]
    live_size: Option<String>,
    /// The diskferry-client binary the new system gets, to confirm it came up (a static
    /// build from deploy/build-client.sh runs anywhere) [default: diskferry-client next to
    /// this program]
    #[arg(long, value_name = "PATH", requires = "live")]
    live_agent: Option<PathBuf>,
    /// Then wait up to MINUTES for the machine to reboot (--reboot reboots it): when the new
    /// system's agent answers, commit it (GRUB's default from then on); when the old system
    /// comes back instead, roll back (the exit status is then non-zero)
    #[arg(long, value_name = "MINUTES", requires = "live")]
    live_wait: Option<u64>,
    /// Once committed, keep the old system as the boot host (its GRUB menu boots the new one
    /// by default; it can still be chosen). Without it the new system takes the disk over:
    /// the partition entries are swapped so GRUB boots the new system from its own files,
    /// the machine reboots once more, and the old system's partition (its files, and the
    /// pinned file that held the new one) is removed: its space is free
    #[arg(long, requires = "live_wait")]
    keep_old: bool,
}

/// `diskferry live HOST:PORT`: where a machine's live deploy is.
#[derive(Args)]
pub(crate) struct LiveCommandArgs {
    /// The agent's address (diskferry-client --live), HOST:PORT
    addr: String,
    /// Make the running live system the default (run while it is up)
    #[arg(long, conflicts_with = "rollback")]
    commit: bool,
    /// Have the committed live system (running now) take the disk DISK over: its partition
    /// entry and the old system's swap, the machine reboots through the new system's own
    /// GRUB files, and the old system's partition is removed (its space is then free). If
    /// GRUB finds its files by UUID rather than partition number, the swap is undone and the
    /// old system stays the boot host. Run again after a take-over that was cut short, it
    /// finishes it
    #[arg(long, value_name = "DISK", conflicts_with_all = ["commit", "rollback", "reboot", "poweroff"])]
    take_over: Option<String>,
    /// How long --take-over waits for the machine to come back
    #[arg(long, value_name = "MINUTES", default_value_t = 15)]
    wait: u64,
    /// Go back to the old system: from the old system, remove the live system (its
    /// partition entry, GRUB entry and file); from the live system, un-commit it, so the
    /// next boot starts the old one (then run --rollback there)
    #[arg(long)]
    rollback: bool,
    /// Then reboot the machine (its agent must allow it: --allow-power, as the agent a live
    /// deploy gives the new system does)
    #[arg(long, conflicts_with = "poweroff")]
    reboot: bool,
    /// Then power the machine off (cleanly, through its init system)
    #[arg(long)]
    poweroff: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

/// `deploy IMAGE DISK@HOST:PORT --live`.
pub(crate) fn deploy(args: &DeployArgs, target: &str) -> Result<()> {
    let SourceSpec::Remote { disk, addr } = SourceSpec::parse(target) else {
        bail!("--live deploys to DISK@HOST:PORT: the agent running inside the machine's system (diskferry-client --live)");
    };
    let session = crate::session(&args.conn)?;
    let rt = crate::runtime()?;
    let (_, image) = diskferry_vdisk::open_image(&args.image, args.follow_backing)
        .with_context(|| format!("cannot open the image {}", args.image.display()))?;
    let conn = rt
        .block_on(Connection::connect(&addr, &session))
        .with_context(|| format!("cannot reach the agent at {addr}"))?;
    let state = live::state(&conn)?;
    let agent = live_agent(&args.live, state.endpoint, &args.conn)?;
    let opts = LiveOptions {
        size: args
            .live
            .live_size
            .as_deref()
            .map(crate::images::parse_size)
            .transpose()?,
        transform: Chain::of(args.custom.transform(&image)?, Some(Arc::new(agent))),
        disk: Some(disk),
    };
    let again = flow::Listening {
        rt: rt.handle(),
        addr: &addr,
        session: &session,
    };
    let target = LiveTarget {
        rt: rt.handle(),
        conn: &conn,
        redial: again.redial(),
        reconnect: args.conn.reconnect().into(),
    };
    let progress = progress_for(args.progress);
    let title = args
        .image
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let deployed = flow::deploy(&image, &target, &opts, &title, progress.as_ref())?;
    report(&deployed);
    if args.reboot {
        power(&conn, PowerAction::Reboot)?;
    }
    let Some(minutes) = args.live.live_wait else {
        eprintln!("reboot the machine; once the new system is up: diskferry live {addr} --commit (or --rollback)");
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let phase = |what: &str| eprintln!("{what}");
    match flow::finish(conn, &again, &deployed.token, deadline, &phase)? {
        Outcome::Committed => {
            eprintln!("the new system is up and confirmed it: committed (GRUB starts it by default from now on)");
            if args.live.keep_old {
                return Ok(());
            }
            let conn = flow::Redialer::connect(&again)
                .context("the new system's agent stopped answering before the take-over")?;
            // The take-over's reboot gets a wait of its own.
            let deadline = Instant::now() + Duration::from_secs(minutes * 60);
            take_over(conn, &again, &deployed.written.map.disk, deadline)
        }
        Outcome::RolledBack(done) => bail!(
            "the old system came back instead of the new one: rolled back ({})",
            done.join("; ")
        ),
    }
}

/// What was written, for people.
fn report(d: &flow::Deployed) {
    let (w, written) = (&d.written.window, &d.written);
    eprintln!(
        "live system written into {} on {}: {} at byte {} ({} of it the file's, {} bad blocks), partition {}, UUID {}; {} files compared, {:.1} s",
        written.map.path,
        written.map.disk,
        human_bytes(w.len),
        w.start,
        human_bytes(w.own()),
        w.bad.iter().map(|b| b.1).sum::<u64>(),
        d.partition,
        written.uuid,
        written.verify.files_compared,
        written.elapsed.as_secs_f64(),
    );
    eprintln!("GRUB starts it once at the next boot; the running system is unchanged and stays the default until it is committed");
    if let Err(why) = &written.own_loader {
        eprintln!("the new system got no boot loader of its own, so it cannot take the disk over once committed: {why}");
    }
}

/// The agent the new system gets: the binary asked for, or the one next to this program,
/// reached as the old system's agent is and trusting this server's key.
fn live_agent(
    args: &LiveArgs,
    endpoint: Option<(String, String)>,
    conn: &ConnArgs,
) -> Result<LiveAgent> {
    let path = match &args.live_agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("diskferry-client"))
            .context("where this program is")?,
    };
    let binary = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read the agent for the new system, {} (give --live-agent PATH)",
            path.display()
        )
    })?;
    let (how, addr) = endpoint.context("the agent does not say how it is reached: update it")?;
    let key = StaticKey::from_file(conn.key_file()?)?.public().to_string();
    Ok(LiveAgent::new(binary, &how, &addr, &key, None))
}

/// Asks the agent to reboot or power off its machine.
fn power(conn: &Connection, action: PowerAction) -> Result<()> {
    let verb = match action {
        PowerAction::Reboot => "reboot",
        PowerAction::Poweroff => "power off",
    };
    match conn.call_blocking(Request::Power { action }) {
        Ok(Reply::Done) => {
            eprintln!("the machine is going to {verb}");
            Ok(())
        }
        Ok(Reply::Error { message, .. }) => {
            bail!("cannot {verb} the machine: {message} (do it by hand)")
        }
        Ok(other) => bail!("cannot {verb} the machine: unexpected answer {other:?}"),
        Err(e) => bail!("cannot {verb} the machine: {e}"),
    }
}

/// `diskferry live HOST:PORT [--commit | --rollback]`.
pub(crate) fn run(args: &LiveCommandArgs) -> Result<()> {
    let session = crate::session(&args.conn)?;
    let rt = crate::runtime()?;
    let conn = rt
        .block_on(Connection::connect(&args.addr, &session))
        .with_context(|| format!("cannot reach the agent at {}", args.addr))?;
    let state = live::state(&conn)?;
    let again = flow::Listening {
        rt: rt.handle(),
        addr: &args.addr,
        session: &session,
    };
    if let Some(disk) = &args.take_over {
        let deadline = Instant::now() + Duration::from_secs(args.wait * 60);
        return take_over(conn, &again, disk, deadline);
    }
    match (&state.token, args.commit, args.rollback) {
        (Some(_), true, _) => {
            boot::commit(&conn)?;
            println!("committed: GRUB starts this system by default");
        }
        (None, true, _) => {
            bail!("the running system is not a live-deployed one: boot the new system first")
        }
        (Some(_), _, true) => {
            call(&conn, Request::LiveCommit { committed: false })?;
            println!("un-committed: the next boot starts the old system; run --rollback there to remove this one");
        }
        (None, _, true) => {
            let done = flow::roll_back(&conn, &again)?;
            println!("rolled back: {}", done.join("; "));
        }
        (token, false, false) => print_state(token.as_deref(), state.pinned),
    }
    match (args.reboot, args.poweroff) {
        (true, _) => power(&conn, PowerAction::Reboot),
        (_, true) => power(&conn, PowerAction::Poweroff),
        _ => Ok(()),
    }
}

/// Has the committed live system `conn` reaches take `disk` over, and says how it went.
fn take_over(
    conn: Connection,
    again: &flow::Listening<'_>,
    disk: &str,
    deadline: Instant,
) -> Result<()> {
    let phase = |what: &str| eprintln!("{what}");
    match takeover::take_over(conn, again, disk, deadline, &phase)? {
        TakeOver::Done { partition, freed } => {
            eprintln!(
                "taken over: the new system is partition {partition} and boots through its own GRUB; the old system's partition is gone, {} of it free",
                human_bytes(freed)
            );
        }
        TakeOver::Kept(why) => {
            eprintln!("not taken over: {why}; the old system's GRUB boots the new one by default")
        }
    }
    Ok(())
}

fn print_state(token: Option<&str>, pinned: Option<u64>) {
    match (token, pinned) {
        (Some(t), _) => println!("running a live-deployed system (token {t}); commit it with --commit"),
        (None, Some(size)) => println!("running the old system, with a live file of {} pinned: a live system waits for the next boot (or --rollback)", human_bytes(size)),
        (None, None) => println!("running its own system; no live deploy in progress"),
    }
}

fn call(conn: &Connection, request: Request) -> Result<()> {
    match conn.call_blocking(request)? {
        Reply::Done => Ok(()),
        Reply::Error { message, .. } => bail!("{message}"),
        other => bail!("unexpected answer {other:?}"),
    }
}
