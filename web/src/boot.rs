//! Network boot over HTTP, for machines that cannot log in: `/boot.ipxe` (an iPXE script that
//! loads the boot environment with the dial-back address and the agent key on the kernel
//! command line) and the two files it names, `/boot/vmlinuz` and `/boot/initramfs.img`, from
//! the boot directory (`DATA_DIR/boot` or `--boot-dir`; `deploy/build-bootenv.sh` makes them).
//!
//! The dial-back address is the host the machine used to reach this endpoint (its HTTP `Host`
//! header) with the agent port, unless the server was started with `--advertise HOST:PORT`.
//! These routes need no login: a booting machine has none. They expose the agent key to the
//! boot network, which is why agents get a key of their own (`DATA_DIR/agent.key`).

use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::Failure;
use crate::SharedState;

/// Where boot files come from and what the script tells machines.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub dir: PathBuf,
    /// The agent port's number (the host comes from the request).
    pub agent_port: u16,
    /// `HOST:PORT` to announce instead of the request's host with `agent_port`.
    pub advertise: Option<String>,
    /// The agent key's text.
    pub key: String,
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

async fn script(State(state): State<SharedState>, headers: HeaderMap) -> Result<Response, Failure> {
    let cfg = config(&state)?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| safe_host(h))
        .ok_or_else(|| Failure::bad_request("the request has no usable Host header"))?;
    // The host without its port ([v6]:port or name:port).
    let bare = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let agent = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{bare}:{}", cfg.agent_port));
    for f in FILES {
        if !cfg.dir.join(f).is_file() {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} is missing: build the boot environment with deploy/build-bootenv.sh {}",
                    cfg.dir.join(f).display(),
                    cfg.dir.display()
                ),
            ));
        }
    }
    let body = format!(
        "#!ipxe\n\
         echo diskferry: loading the boot environment from {host}\n\
         kernel http://{host}/boot/vmlinuz initrd=initramfs.img console=tty0 console=ttyS0,115200 diskferry.server={agent} diskferry.key={key}\n\
         initrd http://{host}/boot/initramfs.img\n\
         boot\n",
        key = cfg.key
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
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
    let f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Failure::not_found(format!("{}: {e}", path.display())))?;
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
