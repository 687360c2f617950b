//! Dial-back mode: the agent connects to the server (machines booted over PXE cannot be
//! reached, they reach out), authenticates as the agent, and then serves the server's requests
//! on that connection exactly as on an accepted one. When the server is down or the connection
//! drops, it tries again with backoff (1 s doubling to 30 s), forever.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_protocol::handshake::initiate;
use tokio::net::TcpStream;

use crate::{log, serve, Config};

/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Connects to `server` and serves it, reconnecting for ever. Cancel the future to stop.
pub async fn dial_loop(server: String, config: Arc<Config>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        match session(&server, &config).await {
            Ok(()) => log(
                &config,
                format_args!("{server}: the server closed the connection"),
            ),
            Err(e) => log(&config, format_args!("{server}: {e}")),
        }
        // A session that lasted means the server is fine: come back quickly.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_secs(1);
        }
        log(&config, format_args!("retrying in {} s", backoff.as_secs()));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn session(server: &str, config: &Arc<Config>) -> Result<(), String> {
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let session = initiate(&mut stream, &config.session)
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    log(
        config,
        format_args!("{server}: connected and authenticated"),
    );
    serve::serve_session(stream, session, Arc::clone(config))
        .await
        .map_err(|e| e.to_string())
}
