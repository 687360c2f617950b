//! Dial-back mode: the agent connects to the server (machines booted over PXE cannot be
//! reached, they reach out), authenticates as the agent, and then serves the server's requests
//! on that connection exactly as on an accepted one. When the server is down or the connection
//! drops, it tries again with backoff (1 s doubling to 30 s), forever.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_protocol::handshake::initiate;
use diskferry_protocol::ProtocolError;
use tokio::net::TcpStream;

use crate::{log, serve, Config};

/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why one dial-back session ended (the log line puts the server's address in front).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No TCP connection to the server.
    #[error("cannot connect: {source}")]
    Connect { source: io::Error },
    /// Connected, but the two sides did not agree on a session (key, version, role).
    #[error("handshake failed: {source}")]
    Handshake { source: ProtocolError },
    /// The authenticated connection failed while serving.
    #[error(transparent)]
    Serve(ProtocolError),
}

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

async fn session(server: &str, config: &Arc<Config>) -> Result<(), SessionError> {
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|source| SessionError::Connect { source })?;
    let _ = stream.set_nodelay(true);
    let session = initiate(&mut stream, &config.session)
        .await
        .map_err(|source| SessionError::Handshake { source })?;
    log(
        config,
        format_args!("{server}: connected and authenticated"),
    );
    serve::serve_session(stream, session, Arc::clone(config))
        .await
        .map_err(SessionError::Serve)
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use diskferry_protocol::{SessionOptions, StaticKey};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    fn config() -> Arc<Config> {
        Arc::new(Config {
            disks: Vec::new(),
            allow_write: false,
            session: SessionOptions::agent(StaticKey::generate(), StaticKey::generate().public()),
            max_inflight: 1 << 20,
            quiet: true,
            allow_power: false,
            allow_firmware: false,
            live: None,
        })
    }

    #[tokio::test]
    async fn a_refused_connection_says_so_and_keeps_the_io_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = session(&addr, &config()).await.unwrap_err();
        assert!(matches!(e, SessionError::Connect { .. }), "{e:?}");
        let source = e.source().expect("the io error is kept");
        assert_eq!(e.to_string(), format!("cannot connect: {source}"));
    }

    #[tokio::test]
    async fn a_peer_that_hangs_up_fails_the_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.shutdown().await.unwrap();
        });
        let e = session(&addr, &config()).await.unwrap_err();
        server.await.unwrap();
        assert!(matches!(e, SessionError::Handshake { .. }), "{e:?}");
        assert!(e.source().unwrap().is::<ProtocolError>());
        assert!(e.to_string().starts_with("handshake failed: "), "{e}");
    }
}
