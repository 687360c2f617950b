//! The diskferry agent as a library: discover disks, accept connections, serve sectors.
//!
//! The `diskferry-client` binary is a thin shell over this (arguments, runtime, signals); the
//! server's `demo` command runs the same code in-process. Nothing here decodes a filesystem.
#![forbid(unsafe_code)]

pub mod dialback;
pub mod disks;
pub mod efi;
pub mod identity;
pub mod live;
pub mod multicast;
pub mod power;
pub mod serve;

use std::sync::Arc;

use diskferry_protocol::admission::{Admission, Limits, Refused, Ticket};
use diskferry_protocol::handshake::respond;
use diskferry_protocol::ProtocolError;
use tokio::net::{TcpListener, TcpStream};

pub use dialback::dial_loop;
pub use serve::Config;

/// Logs one event through `tracing` (the binary prints it on stderr with the agent's name in
/// front), unless this agent is quiet (the server's in-process demo).
pub fn log(config: &Config, msg: std::fmt::Arguments<'_>) {
    if !config.quiet {
        tracing::info!("{msg}");
    }
}

/// How many connections may be mid-handshake at once, per address and overall. Only the server
/// can finish a handshake, so everything beyond these is a stranger.
const HANDSHAKES: Limits = Limits {
    per_address: 8,
    total: 32,
};

/// Accepts connections forever. Unauthenticated connections are capped per address and
/// overall ([`HANDSHAKES`]) and turned away when over a cap; a peer that never finishes its
/// handshake is dropped after the handshake timeout. Authenticated sessions (only the server
/// holds the key for one) are capped at `max_sessions`. Cancel the future to stop.
pub async fn accept_loop(listener: TcpListener, config: Arc<Config>, max_sessions: usize) {
    let handshakes = Admission::new(HANDSHAKES);
    let sessions = Admission::new(Limits {
        per_address: max_sessions.max(1),
        total: max_sessions.max(1),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                log(&config, format_args!("accept failed: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = match handshakes.admit(peer.ip()) {
            Ok(t) => t,
            Err(refused) => {
                tracing::debug!(%peer, "turned away: {refused}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = Arc::clone(&config);
        let sessions = Arc::clone(&sessions);
        tokio::spawn(async move {
            match serve_one(stream, ticket, &sessions, Arc::clone(&config)).await {
                Ok(()) => log(&config, format_args!("{peer}: disconnected")),
                Err(e) => log(&config, format_args!("{peer}: {e}")),
            }
        });
    }
}

/// Why an accepted connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("authenticated, but turned away: {0}")]
    Full(#[from] Refused),
}

/// Handshake under a handshake ticket, then serve under a session ticket.
async fn serve_one(
    mut stream: TcpStream,
    handshake: Ticket,
    sessions: &Arc<Admission>,
    config: Arc<Config>,
) -> Result<(), ConnectionError> {
    let session = respond(&mut stream, &config.session).await?;
    drop(handshake);
    let peer = stream.peer_addr().map_err(ProtocolError::Io)?;
    let _session_ticket = sessions.admit(peer.ip())?;
    log(&config, format_args!("{peer}: the server connected"));
    Ok(serve::serve_session(stream, session, config).await?)
}
