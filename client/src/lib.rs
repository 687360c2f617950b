//! The diskferry agent as a library: discover disks, accept connections, serve sectors.
//!
//! The `diskferry-client` binary is a thin shell over this (arguments, runtime, signals); the
//! server's `demo` command runs the same code in-process. Nothing here decodes a filesystem.
#![forbid(unsafe_code)]

pub mod dialback;
pub mod disks;
pub mod identity;
pub mod power;
pub mod serve;

use std::sync::Arc;

use tokio::net::TcpListener;

pub use dialback::dial_loop;
pub use serve::Config;

/// Logs one event through `tracing` (the binary prints it on stderr with the agent's name in
/// front), unless this agent is quiet (the server's in-process demo).
pub fn log(config: &Config, msg: std::fmt::Arguments<'_>) {
    if !config.quiet {
        tracing::info!("{msg}");
    }
}

/// Accepts connections forever, serving each on its own task. Cancel the future to stop.
pub async fn accept_loop(listener: TcpListener, config: Arc<Config>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                log(&config, format_args!("accept failed: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            log(&config, format_args!("{peer}: connected"));
            match serve::serve(stream, Arc::clone(&config)).await {
                Ok(()) => log(&config, format_args!("{peer}: disconnected")),
                Err(e) => log(&config, format_args!("{peer}: {e}")),
            }
        });
    }
}
