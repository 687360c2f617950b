//! An NBD server over any [`BlockDevice`](diskferry_blockdev::BlockDevice): what
//! `diskferry export` runs so qemu, `nbdcopy`, `nbdinfo` or the kernel's NBD client can use a
//! capture (or a remote machine's disk) directly.
//!
//! - [`proto`]: the wire format, bounded parsers (fuzzed);
//! - [`handshake`]: fixed newstyle option negotiation;
//! - [`transmission`]: the request loop (read, write, flush, trim, write zeroes, block status
//!   with `base:allocation`; structured replies when negotiated);
//! - [`concurrent`]: replies sent by a writer thread while further requests are executed;
//! - [`server`]: the listener, connection limits and timeouts;
//! - [`socket`]: TCP or Unix sockets (a Unix socket's permissions say who may connect);
//! - [`export`]: the named devices served and their advertised flags.
#![forbid(unsafe_code)]

pub mod concurrent;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod socket;
pub mod transmission;

pub use export::{Export, ExportSource, Exports};
pub use server::{Limits, Server};
pub use socket::ListenAddr;

/// Why an NBD connection (or the server) stopped.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot listen on {addr:?}: {source}")]
    Bind {
        addr: socket::ListenAddr,
        source: std::io::Error,
    },
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client broke the protocol: {0}")]
    Wire(#[from] proto::WireError),
    #[error("{0}")]
    Client(String),
}
