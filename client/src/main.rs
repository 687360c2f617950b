//! `diskferry-client`: the tiny agent that runs from memory on a PXE-booted machine and serves
//! the raw sectors of its disks to a diskferry server. It never decodes a filesystem.
//!
//! One runtime thread (tokio current-thread) accepts connections and speaks the protocol; disk
//! I/O runs on a small blocking pool so several requests reach the disk at once.

mod args;
mod stderr_log;

use std::io;
use std::process::ExitCode;
use std::sync::Arc;

use diskferry_client::live::Live;
use diskferry_client::{accept_loop, dial_loop, disks, Config};
use diskferry_protocol::{KeyError, PublicKey, SessionOptions, StaticKey};
use tokio::net::TcpListener;

/// Large receive buffers are allocated and freed per request; mimalloc keeps that memory
/// mapped instead of returning it to the OS and faulting it back in (measured in bench/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints one line to stderr with the client's name in front.
macro_rules! log {
    ($($arg:tt)*) => { eprintln!("diskferry-client: {}", format_args!($($arg)*)) };
}

/// The allocator setting the agent runs with, and its value.
const ALLOCATOR_SETTING: (&str, &str) = ("MIMALLOC_ARENA_EAGER_COMMIT", "0");

/// mimalloc commits its arenas eagerly on kernels that overcommit, which kept the agent's
/// resident memory at 120–170 MB through a files-mode capture (many reads of many sizes);
/// with eager commit off, 61 MB, at the same speed (bench/README.md). mimalloc reads its
/// options from the environment before `main` runs, so when the setting is missing the agent
/// starts itself again with it (same process, `exec`); if that cannot be done it goes on.
fn restart_with_allocator_setting() {
    use std::os::unix::process::CommandExt;
    let (key, value) = ALLOCATOR_SETTING;
    if std::env::var_os(key).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    let err = cmd.args(args).env(key, value).exec();
    log!("running with the allocator's defaults ({key}: {err})");
}

fn main() -> ExitCode {
    restart_with_allocator_setting();
    stderr_log::StderrLog::install();
    let args = match args::parse(std::env::args_os().skip(1)) {
        Ok(args::Command::Run(a)) => a,
        Ok(args::Command::Help) => {
            print!("{}", args::HELP);
            return ExitCode::SUCCESS;
        }
        Ok(args::Command::Version) => {
            println!("diskferry-client {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            log!("{e}\nTry 'diskferry-client --help'.");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Disk I/O threads: 4 keep 2 MiB reads streaming; more only cost memory (ARCHITECTURE.md).
        .max_blocking_threads(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the client could not start serving (each says what it was doing).
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot handle signals: {source}")]
    Signals { source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
}

async fn run(args: args::Args) -> Result<(), RunError> {
    let server_key = PublicKey::from_hex_or_file(&args.server_key)?;
    // Early in a boot, the kernel's generator may still be gathering entropy: say why we wait.
    log!("making this agent's key (waits until the kernel's random generator is seeded)");
    let agent_key = match &args.agent_key {
        Some(path) => StaticKey::load_or_create(path)?,
        None => StaticKey::generate(),
    };
    log!(
        "agent key {} (the server shows it when asking for approval); trusting server key {}",
        agent_key.public().fingerprint(),
        server_key.fingerprint()
    );
    let disks = disks::discover(&args.disks);
    if disks.is_empty() {
        log!("warning: no disks found to serve (none in /sys/block; name some with --disk)");
    }
    for d in &disks {
        match disks::describe(d, args.allow_write) {
            Ok(info) => log!(
                "serving {} ({} bytes{})",
                info.name,
                info.size,
                if info.read_only { ", read-only" } else { "" }
            ),
            Err(e) => log!("warning: {} cannot be described: {e}", d.name),
        }
    }
    let mut session = SessionOptions::agent(agent_key, server_key);
    session.plaintext = args.plaintext;
    session.credential = args.token.clone().unwrap_or_default().into_bytes();
    let live = args.live.map(|path| {
        let live = Live::new(path, &disks);
        log!(
            "live mode: the server may deploy into {} ({}); writes go nowhere else",
            live.path().display(),
            match live.pinned_size() {
                Some(size) => format!("pinned already, {size} bytes"),
                None => "not made yet".into(),
            }
        );
        Arc::new(live)
    });
    let config = Arc::new(Config {
        disks,
        allow_write: args.allow_write,
        session,
        max_inflight: args.max_inflight,
        quiet: false,
        allow_power: args.allow_power,
        allow_firmware: args.allow_firmware,
        live,
    });

    // Signal handlers exist before anyone is told we are ready: a SIGTERM right after the
    // "listening on" line must still end the client cleanly.
    use tokio::signal::unix::{signal, SignalKind};
    let signals = |source| RunError::Signals { source };
    let mut term = signal(SignalKind::terminate()).map_err(signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signals)?;
    let listen = match &args.endpoint {
        args::Endpoint::Listen(addr) => addr.clone(),
        args::Endpoint::Connect(server) => {
            log!("dialling {server}");
            if let Some(live) = &config.live {
                live.set_endpoint("connect", server.clone());
            }
            return tokio::select! {
                () = dial_loop(server.clone(), config) => Ok(()),
                _ = interrupt.recv() => { log!("interrupted; exiting"); Ok(()) }
                _ = term.recv() => { log!("terminated; exiting"); Ok(()) }
            };
        }
    };
    let listening = |source| RunError::Listen {
        addr: listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&listen).await.map_err(listening)?;
    let local = listener.local_addr().map_err(listening)?;
    if let Some(live) = &config.live {
        live.set_endpoint("listen", local.to_string());
    }
    // Scripts wait for this exact line on stdout.
    println!("listening on {local}");
    tokio::select! {
        () = accept_loop(listener, config, args.max_connections) => Ok(()),
        _ = interrupt.recv() => { log!("interrupted; exiting"); Ok(()) }
        _ = term.recv() => { log!("terminated; exiting"); Ok(()) }
    }
}
