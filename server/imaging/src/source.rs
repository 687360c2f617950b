//! What a SOURCE argument names, and opening it as a block device: `DISK@HOST:PORT` for a disk
//! of a listening diskferry-client, anything else a local file or block device — read through
//! its image format (qcow2) when it has one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::SessionOptions;

use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_remote::{
    ConnectError, Connection, DialAddr, ReconnectingDisk, Redial, RemoteOptions,
};

/// A parsed SOURCE argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A disk of a remote client: its name there, and the client's address.
    Remote {
        disk: String,
        addr: String,
    },
    Local(PathBuf),
}

impl SourceSpec {
    /// `DISK@HOST:PORT` (the part after the last `@` must end in `:PORT`) is remote; anything
    /// else is a local path.
    pub fn parse(s: &str) -> SourceSpec {
        if let Some((disk, addr)) = s.rsplit_once('@') {
            // An IPv6 host is bracketed; a bare colon in the host is a MAC address (a machine
            // a server holds: DISK@52:54:00:12:34:56), not HOST:PORT.
            let port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
                let host_ok = host.starts_with('[') || !host.contains(':');
                !host.is_empty() && host_ok && port.parse::<u16>().is_ok()
            });
            if !disk.is_empty() && port_ok {
                return SourceSpec::Remote {
                    disk: disk.to_string(),
                    addr: addr.to_string(),
                };
            }
        }
        SourceSpec::Local(PathBuf::from(s))
    }
}

/// Why a source could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0} is a remote disk: a key is needed (--key-file FILE or DISKFERRY_KEY_FILE)")]
    NeedKey(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Image(#[from] diskferry_vdisk::ImageError),
    #[error("cannot open {what}: {source}")]
    Open { what: String, source: BlockError },
}

/// How long a remote source may be away before a job gives up on it.
pub const DEFAULT_RECONNECT: Duration = Duration::from_secs(300);

/// How long a remote disk's user waits for it: how long it may be away, and the cancel flag
/// that ends any wait for a reply or a reconnection at once. A bare `Duration` converts.
#[derive(Debug, Clone, Default)]
pub struct Patience {
    pub reconnect: Duration,
    pub cancel: Option<diskferry_blockdev::CancelFlag>,
}

impl From<Duration> for Patience {
    fn from(reconnect: Duration) -> Patience {
        Patience {
            reconnect,
            cancel: None,
        }
    }
}

/// Opens a source for reading. Remote sources connect on `rt` and need `session`; if their
/// client goes away they are reconnected for up to `reconnect`. Local overlays read through
/// their backing files only with `follow_backing`.
pub fn open_source(
    spec: &SourceSpec,
    rt: &tokio::runtime::Handle,
    session: Option<&SessionOptions>,
    follow_backing: bool,
    reconnect: impl Into<Patience>,
) -> Result<Arc<dyn BlockDevice>, SourceError> {
    match spec {
        SourceSpec::Local(path) => Ok(diskferry_vdisk::open_image(path, follow_backing)?.1),
        SourceSpec::Remote { disk, addr } => {
            open_listening(rt, disk, addr, session, false, reconnect)
        }
    }
}

/// Opens a deploy target for writing: a remote disk (the client must allow writes; reconnected
/// for up to `reconnect` like a source) or a local raw file or block device (written in place;
/// image formats are not targets).
pub fn open_target(
    spec: &SourceSpec,
    rt: &tokio::runtime::Handle,
    session: Option<&SessionOptions>,
    reconnect: impl Into<Patience>,
) -> Result<Arc<dyn BlockDevice>, SourceError> {
    match spec {
        SourceSpec::Local(path) => {
            let dev = diskferry_blockdev::FileDevice::open(path, true).map_err(|source| {
                SourceError::Open {
                    what: path.display().to_string(),
                    source,
                }
            })?;
            Ok(Arc::new(dev))
        }
        SourceSpec::Remote { disk, addr } => {
            open_listening(rt, disk, addr, session, true, reconnect)
        }
    }
}

/// How long a client has to answer `Identify`.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// The identity document of the listening client at `addr` (its firmware, Secure Boot,
/// PCI devices…: what a deploy's compatibility check asks), on a connection of its own.
pub fn identify_listening(
    rt: &tokio::runtime::Handle,
    addr: &str,
    session: Option<&SessionOptions>,
) -> Result<String, SourceError> {
    let session = session.ok_or_else(|| SourceError::NeedKey(addr.to_string()))?;
    let conn = rt.block_on(Connection::connect(addr, session))?;
    let open = |source| SourceError::Open {
        what: format!("the identity of the client at {addr}"),
        source,
    };
    // The timer is made inside the runtime: it needs its reactor.
    rt.block_on(async { tokio::time::timeout(IDENTIFY_TIMEOUT, conn.identify()).await })
        .map_err(|_| {
            open(BlockError::Disconnected(format!(
                "no answer to Identify within {} s",
                IDENTIFY_TIMEOUT.as_secs()
            )))
        })?
        .map_err(open)
}

/// A disk of a listening client: connect, open, and keep it across reconnects.
fn open_listening(
    rt: &tokio::runtime::Handle,
    disk: &str,
    addr: &str,
    session: Option<&SessionOptions>,
    writable: bool,
    reconnect: impl Into<Patience>,
) -> Result<Arc<dyn BlockDevice>, SourceError> {
    let session = session.ok_or_else(|| SourceError::NeedKey(format!("{disk}@{addr}")))?;
    let conn = rt.block_on(Connection::connect(addr, session))?;
    let redial = Arc::new(DialAddr {
        addr: addr.to_string(),
        session: session.clone(),
    });
    open_on_connection(rt, &conn, disk, writable, redial, reconnect)
}

/// Opens `disk` on an authenticated connection — to a listening client, or one a dial-back
/// machine made — and keeps it open across reconnects through `redial` for up to `reconnect`.
/// Every remote disk a job uses is opened here, so all of them survive their client going away.
pub fn open_on_connection(
    rt: &tokio::runtime::Handle,
    conn: &Connection,
    disk: &str,
    writable: bool,
    redial: Arc<dyn Redial>,
    reconnect: impl Into<Patience>,
) -> Result<Arc<dyn BlockDevice>, SourceError> {
    let patience = reconnect.into();
    let opts = RemoteOptions {
        cancel: patience.cancel.clone(),
        ..RemoteOptions::default()
    };
    let remote = rt
        .block_on(conn.open(disk, writable, opts.clone()))
        .map_err(|source| SourceError::Open {
            what: format!(
                "{disk} on {}{}",
                redial.describe(),
                if writable { " for writing" } else { "" }
            ),
            source,
        })?;
    Ok(Arc::new(ReconnectingDisk::new(
        remote,
        redial,
        opts,
        rt.clone(),
        patience.reconnect,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_remote_and_local_sources() {
        assert_eq!(
            SourceSpec::parse("/dev/sda@10.0.0.5:7700"),
            SourceSpec::Remote {
                disk: "/dev/sda".into(),
                addr: "10.0.0.5:7700".into()
            }
        );
        assert_eq!(
            SourceSpec::parse("/tmp/disk@x.img@[::1]:9"),
            SourceSpec::Remote {
                disk: "/tmp/disk@x.img".into(),
                addr: "[::1]:9".into()
            }
        );
        assert_eq!(
            SourceSpec::parse("/images/a@b.qcow2"),
            SourceSpec::Local("/images/a@b.qcow2".into())
        );
        assert_eq!(
            SourceSpec::parse("disk.img"),
            SourceSpec::Local("disk.img".into())
        );
        assert_eq!(
            SourceSpec::parse("@host:1"),
            SourceSpec::Local("@host:1".into())
        );
        // DISK@MAC names a machine held by a server, not a host and port.
        assert_eq!(
            SourceSpec::parse("sda@52:54:00:12:34:56"),
            SourceSpec::Local("sda@52:54:00:12:34:56".into())
        );
    }
}
