//! Network boot over HTTP, for machines that cannot log in: `/boot.ipxe` (an iPXE script that
//! loads the boot environment) and the two files it names, `/boot/vmlinuz` and
//! `/boot/initramfs.img`, from the boot directory (`DATA_DIR/boot` or `--boot-dir`;
//! `deploy/build-bootenv.sh` makes them).
//!
//! `/boot.ipxe` without a MAC answers a two-line script that asks again with the booting
//! interface's MAC (`?mac=${netX/mac}`); with one, what the server knows of the machine decides
//! ([`netboot::choose`]): a known machine with nothing to do gets a script that boots its local
//! disk; any other gets the boot environment, with a script that puts on the kernel command line the
//! dial-back address, the server's *public* key (the agent pins it) and a one-time enrollment
//! token bound to that MAC. Nothing served here opens a client: the private key never leaves
//! the server, and a token only lets an agent ask to be the machine with that MAC — a new
//! machine or a changed identity still waits for an administrator.
//!
//! The dial-back address is the host the machine used to reach this endpoint (its HTTP `Host`
//! header) with the agent port, unless the server was started with `--advertise HOST:PORT`.
//! Errors name no server paths: they go to the server's log.

use std::path::PathBuf;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use diskferry_daemon::catalog::normalize_mac;
use diskferry_daemon::netboot::{self, BootChoice, LocalBoot};

use crate::error::Failure;
use crate::SharedState;

/// Where boot files come from and what the script tells machines.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub dir: PathBuf,
    /// How a BIOS machine with nothing to do boots its disk.
    pub local_boot: LocalBoot,
    /// The agent port's number (the host comes from the request).
    pub agent_port: u16,
    /// `HOST:PORT` to announce instead of the request's host with `agent_port`.
    pub advertise: Option<String>,
    /// The server's public key, for agents to pin.
    pub server_key: diskferry_protocol::PublicKey,
}

/// Files a machine may fetch.
const FILES: [&str; 2] = ["vmlinuz", "initramfs.img"];

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/boot.ipxe", get(script))
        .route("/boot/{file}", get(file))
}

/// A host name or address as it may appear in a script (no spaces, quotes or script syntax).
fn safe_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

fn config(state: &SharedState) -> Result<&BootConfig, Failure> {
    state.boot.get().ok_or_else(|| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "network boot is not set up on this server",
        )
    })
}

/// The query of `/boot.ipxe`.
#[derive(serde::Deserialize)]
struct ScriptQuery {
    mac: Option<String>,
}

async fn script(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Query(query): Query<ScriptQuery>,
) -> Result<Response, Failure> {
    let cfg = config(&state)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| safe_host(h))
        .ok_or_else(|| Failure::bad_request("the request has no usable Host header"))?;
    check_boot_files(cfg)?;
    let body = match query.mac {
        None => format!(
            "#!ipxe\n\
             echo diskferry: asking {host} for this machine's boot script\n\
             chain http://{host}/boot.ipxe?mac=${{netX/mac}}\n"
        ),
        Some(mac) => {
            let mac = normalize_mac(&mac).ok_or_else(|| {
                Failure::bad_request("mac must be a MAC address such as 52:54:00:12:34:56")
            })?;
            let st = std::sync::Arc::clone(&state);
            let m = mac.clone();
            match tokio::task::spawn_blocking(move || netboot::choose(&st.catalog, &m)).await?? {
                BootChoice::Environment { reason } => {
                    let token = state.tokens.issue(&mac);
                    tracing::info!(%mac, "{mac} boots the imaging environment: {reason}");
                    boot_script(cfg, host, &token)
                }
                BootChoice::LocalDisk { machine, reason } => {
                    tracing::info!(%mac, "{mac} ({machine}) boots its local disk: {reason}");
                    netboot::local_disk_script(&machine, &reason, cfg.local_boot)
                }
            }
        }
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

/// The script that loads the boot environment with the agent's settings.
fn boot_script(cfg: &BootConfig, host: &str, token: &str) -> String {
    // The host without its port ([v6]:port or name:port).
    let bare = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let agent = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{bare}:{}", cfg.agent_port));
    format!(
        "#!ipxe\n\
         echo diskferry: loading the boot environment from {host}\n\
         kernel http://{host}/boot/vmlinuz initrd=initramfs.img console=tty0 console=ttyS0,115200 diskferry.server={agent} diskferry.serverkey={key} diskferry.token={token}\n\
         initrd http://{host}/boot/initramfs.img\n\
         boot\n",
        key = cfg.server_key
    )
}

/// Both boot files exist; what is missing goes to the log, not to the booting machine.
fn check_boot_files(cfg: &BootConfig) -> Result<(), Failure> {
    let missing: Vec<String> = FILES
        .iter()
        .map(|f| cfg.dir.join(f))
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        "network boot asked for, but {} missing: build the boot environment with deploy/build-bootenv.sh {}",
        missing.join(" and "),
        cfg.dir.display()
    );
    Err(Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the boot environment is not built on this server (its log says where it belongs)",
    ))
}

async fn file(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, Failure> {
    let cfg = config(&state)?;
    if !FILES.contains(&name.as_str()) {
        return Err(Failure::not_found(format!(
            "no boot file {name:?}; there are: {}",
            FILES.join(", ")
        )));
    }
    let path = cfg.dir.join(&name);
    let f = tokio::fs::File::open(&path).await.map_err(|e| {
        tracing::warn!("boot file {}: {e}", path.display());
        Failure::not_found(format!("boot file {name} is not available"))
    })?;
    let len = f
        .metadata()
        .await
        .map_err(|e| Failure::internal(e.to_string()))?
        .len();
    let body =
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_that_could_inject_script_are_refused() {
        assert!(super::safe_host("10.0.2.2:8080"));
        assert!(super::safe_host("[fe80::1]:80"));
        assert!(!super::safe_host("x\nshell"));
        assert!(!super::safe_host("a b"));
        assert!(!super::safe_host(""));
    }
}
