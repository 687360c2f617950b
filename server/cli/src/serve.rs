//! `diskferry serve`: the long-running server — the web UI and JSON API over the catalog in
//! DATA_DIR (captures under DATA_DIR/captures, jobs, machines), over TLS with `--tls`, and
//! the network boot endpoints, also on a listener of their own with `--boot-listen`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use diskferry_web::tls::{self, ServerTls};

#[derive(Args)]
pub struct ServeArgs {
    /// Where the catalog, the captures (DATA_DIR/captures) and the secrets live; created if
    /// missing
    #[arg(long, value_name = "DIR", env = "DISKFERRY_DATA_DIR")]
    data_dir: PathBuf,
    /// Address of the web UI and API (localhost only unless you say otherwise)
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// Where machines booted into the PXE environment dial back to (diskferry-client
    /// --connect --server-key PUBLIC-KEY); put the boot network's address here
    #[arg(long, default_value = "127.0.0.1:7700", value_name = "ADDR:PORT")]
    agent_listen: SocketAddr,
    /// The boot environment's vmlinuz and initramfs.img, served to PXE machines at /boot/
    /// with an iPXE script at /boot.ipxe [default: DATA_DIR/boot]
    #[arg(long, value_name = "DIR")]
    boot_dir: Option<PathBuf>,
    /// TFTP for legacy PXE firmware: serves iPXE (undionly.kpxe, ipxe.efi, snponly.efi from
    /// Debian's ipxe package) and the boot directory's files, e.g. 0.0.0.0:69; off unless
    /// you say where
    #[arg(long, default_value = "off", value_name = "ADDR:PORT|off")]
    tftp_listen: String,
    /// A second, plain-HTTP listener serving only the network boot endpoints (/boot.ipxe,
    /// /boot/*), for the boot network, so that --listen can stay on the admin network
    #[arg(long, value_name = "ADDR:PORT")]
    boot_listen: Option<SocketAddr>,
    /// Serve the web UI and API over HTTPS, with a self-signed certificate made at the first
    /// start (DATA_DIR/tls) and kept; clients pin its fingerprint, which the log shows
    #[arg(long)]
    tls: bool,
    /// Another name or address the self-signed certificate is made for (besides localhost,
    /// 127.0.0.1 and the --listen address); repeatable; only when the certificate is made
    #[arg(
        long,
        value_name = "NAME",
        requires = "tls",
        conflicts_with = "tls_cert"
    )]
    tls_name: Vec<String>,
    /// Serve HTTPS with this certificate (PEM, the server's first, then its chain) instead of
    /// a self-signed one
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The dial-back address put into the boot script [default: the host the machine used to
    /// reach /boot.ipxe, with the agent port]
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Where the captures are exported over NBD, read-only, each under its path in the
    /// captures directory (nbd://127.0.0.1:10809/NAME.qcow2; the web UI's "Run it" shows how
    /// to boot one), and the disks of connected, approved machines as DISK@MACHINE. TCP on loopback only (NBD has no TLS here yet), or unix:PATH, a socket
    /// only this server's user may connect to (mode 0600). "off" exports nothing
    /// [default: 127.0.0.1:10809, skipped with a warning when that port is taken]
    #[arg(long, value_name = "ADDR:PORT|unix:PATH|off")]
    nbd_listen: Option<String>,
    /// How a BIOS machine with nothing to do leaves the network boot for its disk: "exit"
    /// hands back to the firmware, which tries the next boot device; "sanboot" boots the first
    /// hard disk from iPXE, for firmware that stops after a network boot returns. UEFI
    /// machines always exit
    #[arg(long, default_value = "exit", value_name = "exit|sanboot")]
    local_boot: diskferry_daemon::netboot::LocalBoot,
    /// Send Wake-on-LAN magic packets here instead of to the broadcast address of the
    /// machine's network: a directed broadcast (10.2.0.255) or a relay on a routed network;
    /// port 9 unless given; repeatable
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_relay)]
    wake_relay: Vec<SocketAddr>,
    /// How the daemon writes its log on stderr (DISKFERRY_LOG filters it, default info)
    #[arg(long, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,
}

/// `ADDR` or `ADDR:PORT` (port 9 unless given).
fn parse_relay(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, diskferry_daemon::wake::WOL_PORT))
        })
        .map_err(|_| format!("{s:?} is not ADDR or ADDR:PORT"))
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let rt = crate::runtime()?;
    rt.block_on(serve(args))
}

async fn serve(args: &ServeArgs) -> Result<()> {
    let data_dir = args.data_dir.clone();
    let (state, startup) =
        tokio::task::spawn_blocking(move || diskferry_web::open(&data_dir)).await??;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (in use? try --listen)", args.listen))?;
    let addr = listener.local_addr()?;
    let agent_listener = tokio::net::TcpListener::bind(args.agent_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for agents on {} (in use? try --agent-listen)",
                args.agent_listen
            )
        })?;
    let agent_addr = agent_listener.local_addr()?;
    tokio::spawn(std::sync::Arc::clone(&state.agents).accept_loop(agent_listener));
    state
        .jobs
        .set_wake_config(diskferry_daemon::wake::WakeConfig {
            relays: args.wake_relay.clone(),
        });
    // Jobs waiting for their machine or their time, and schedules.
    tokio::spawn(std::sync::Arc::clone(&state.jobs).dispatch_forever());
    let boot_dir = args
        .boot_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("boot"));
    let _ = state.boot.set(diskferry_web::boot::BootConfig {
        dir: boot_dir.clone(),
        local_boot: args.local_boot,
        agent_port: agent_addr.port(),
        advertise: args.advertise.clone(),
        server_key: startup.server_key,
    });
    let tls = server_tls(args, addr)?;
    let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
    // `diskferry machines --data-dir DIR` finds the running server here.
    std::fs::write(args.data_dir.join("serve.addr"), format!("{url}\n"))
        .context("cannot write DATA_DIR/serve.addr")?;
    log_startup(&startup);
    start_tftp(&args.tftp_listen, &boot_dir).await?;
    start_nbd(args.nbd_listen.as_deref(), &state)?;
    tracing::info!("agents dial back to {agent_addr}");
    let boot_addr = start_boot_listener(args.boot_listen, &state).await?;
    log_boot_readiness(boot_addr.or(tls.is_none().then_some(addr)), &boot_dir);
    // Tests and scripts wait for this line.
    tracing::info!("listening on {url}");
    diskferry_web::serve(listener, state, tls.map(|t| t.config))
        .await
        .context("the web server stopped")
}

/// The certificate the UI is served with, when TLS is asked for; its fingerprint is logged.
fn server_tls(args: &ServeArgs, addr: SocketAddr) -> Result<Option<ServerTls>> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => tls::load(cert, key)?,
        _ if args.tls => {
            let names = tls::subject_names(addr, &args.tls_name);
            tls::self_signed(&args.data_dir, &names)?
        }
        _ => return Ok(None),
    };
    tracing::info!(
        "tls certificate {}{}",
        tls.cert_file.display(),
        if tls.created { " (new)" } else { "" }
    );
    // Clients pin this (`--tls-fingerprint`); tests and scripts read it here.
    tracing::info!("tls certificate fingerprint {}", tls.fingerprint);
    Ok(Some(tls))
}

/// The captures' NBD exports, unless "off": on the given loopback address or Unix socket
/// (failing when it cannot be had), or on the default port when it is free.
fn start_nbd(listen: Option<&str>, state: &diskferry_web::SharedState) -> Result<()> {
    use diskferry_nbd::ListenAddr;
    let addr: ListenAddr = match listen {
        Some("off") => return Ok(()),
        Some(a) => a
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--nbd-listen {a}: {e} (or off)"))?,
        None => ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 10809))),
    };
    if matches!(&addr, ListenAddr::Tcp(a) if !a.ip().is_loopback()) {
        anyhow::bail!(
            "--nbd-listen {addr:?}: NBD exports have no TLS yet, so TCP listens on loopback only \
             (or give unix:PATH; reach them from elsewhere through an SSH tunnel)"
        );
    }
    let exports = diskferry_daemon::exports::ServerExports::new(
        std::sync::Arc::clone(&state.catalog),
        std::sync::Arc::clone(&state.jobs),
        tokio::runtime::Handle::current(),
    );
    let server =
        match diskferry_nbd::Server::bind_to(&addr, exports, diskferry_nbd::Limits::default()) {
            Ok(s) => s,
            Err(e) if listen.is_none() => {
                tracing::warn!(
                    "captures are not exported over NBD: {e} (choose a port with --nbd-listen)"
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
    let addr = server.listen_addr()?;
    // Tests and scripts read the address here.
    tracing::info!("captures exported over NBD on {}", addr.url(""));
    let _ = state.nbd.set(addr);
    std::thread::Builder::new()
        .name("nbd exports".into())
        .spawn(move || server.run(&std::sync::atomic::AtomicBool::new(false)))?;
    Ok(())
}

/// The boot endpoints' own plain-HTTP listener, when asked for; its address.
async fn start_boot_listener(
    listen: Option<SocketAddr>,
    state: &diskferry_web::SharedState,
) -> Result<Option<SocketAddr>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (in use? try --boot-listen)"))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read the address here.
    tracing::info!("boot listener on http://{addr} (the boot endpoints only)");
    let state = std::sync::Arc::clone(state);
    tokio::spawn(async move {
        if let Err(e) = diskferry_web::serve_boot(listener, state).await {
            tracing::error!("the boot listener stopped: {e}");
        }
    });
    Ok(Some(addr))
}

/// What the data directory holds and which secrets were made.
fn log_startup(startup: &diskferry_web::Startup) {
    if let Some(pw) = &startup.new_password {
        tracing::info!(
            "generated the admin password: {pw}  (kept in {})",
            startup.password_file.display()
        );
    }
    tracing::info!(
        "API token in {}; server key in {}{}",
        startup.token_file.display(),
        startup.key_file.display(),
        if startup.key_created { " (new)" } else { "" }
    );
    // Clients pin this; it is not secret.
    tracing::info!("server public key {}", startup.server_key);
    let obsolete = startup.key_file.with_file_name("agent.key");
    if obsolete.exists() {
        tracing::warn!(
            "{} is no longer used (agents now pin the server's public key); delete it",
            obsolete.display()
        );
    }
    if startup.interrupted_jobs > 0 {
        tracing::info!(
            "{} job(s) were running when the server last stopped: marked interrupted",
            startup.interrupted_jobs
        );
    }
    tracing::info!("{} capture(s) in the catalog", startup.captures);
}

/// Read-only TFTP for legacy PXE, unless "off"; a port it cannot take is a warning.
async fn start_tftp(listen: &str, boot_dir: &std::path::Path) -> Result<()> {
    if listen == "off" {
        return Ok(());
    }
    match tokio::net::UdpSocket::bind(listen).await {
        Ok(sock) => {
            tracing::info!("tftp on {}", sock.local_addr()?);
            let roots = diskferry_daemon::tftp::TftpRoots(vec![
                boot_dir.to_path_buf(),
                PathBuf::from("/usr/lib/ipxe"),
            ]);
            tokio::spawn(diskferry_daemon::tftp::serve(sock, roots));
        }
        // Port 69 needs root: the rest of the server does not.
        Err(e) => tracing::warn!(
            "tftp: cannot listen on {listen} ({e}); legacy PXE needs another TFTP server or --tftp-listen"
        ),
    }
    Ok(())
}

/// Where machines boot from (`None`: the UI speaks TLS and no --boot-listen was given), and
/// whether the boot files are there.
fn log_boot_readiness(addr: Option<SocketAddr>, boot_dir: &std::path::Path) {
    let Some(addr) = addr else {
        tracing::warn!(
            "network boot needs --boot-listen ADDR:PORT when the UI uses TLS: iPXE fetches the boot files over plain HTTP"
        );
        return;
    };
    let ready = ["vmlinuz", "initramfs.img"]
        .iter()
        .all(|f| boot_dir.join(f).is_file());
    if ready {
        tracing::info!(
            "network boot: http://{addr}/boot.ipxe (files in {})",
            boot_dir.display()
        );
    } else {
        tracing::info!(
            "network boot: not ready; build it with deploy/build-bootenv.sh {}",
            boot_dir.display()
        );
    }
}
