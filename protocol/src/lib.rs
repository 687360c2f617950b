//! diskferry's block protocol: everything that crosses the wire between the imaging server and
//! the sector-serving client.
//!
//! Layers, bottom up:
//! - [`handshake`]: a plaintext hello that negotiates the protocol version, then a Noise
//!   `NNpsk0` handshake that authenticates both sides with a pre-shared [`Psk`] and agrees on
//!   parameters (maximum payload, plaintext mode) *after* authentication.
//! - [`record`]: the Noise transport records that carry the byte stream once encrypted.
//! - [`codec`]: length-delimited, versioned frames ([`Message`]) with every length bounded
//!   before any allocation.
//! - [`stream`]: async frame reader/writer halves combining the two, for tokio sockets.
//!
//! This is the only crate that knows the wire byte order (big-endian, network order).
#![forbid(unsafe_code)]

#[cfg(feature = "io")]
pub mod codec;
#[cfg(feature = "io")]
pub mod handshake;
pub mod key;
pub mod message;
#[cfg(feature = "io")]
pub mod record;
#[cfg(feature = "io")]
pub mod stream;

mod error;

#[cfg(feature = "io")]
pub use codec::FrameCodec;
pub use error::ProtocolError;
#[cfg(feature = "io")]
pub use handshake::{Session, SessionOptions};
pub use key::Psk;
pub use message::{
    BlockState, DiskInfo, ErrorCode, Extent, Message, PowerAction, Reply, Request, Role,
    MAX_IDENTITY,
};

/// Protocol versions this build speaks (inclusive range).
pub const VERSION_MIN: u16 = 1;
/// Highest protocol version this build speaks.
pub const VERSION_MAX: u16 = 1;

/// Hard ceiling on a data payload (one Read reply or Write request), whatever a peer advertises.
pub const MAX_PAYLOAD_LIMIT: u32 = 32 << 20;
/// Default payload limit advertised in the handshake.
pub const DEFAULT_MAX_PAYLOAD: u32 = 8 << 20;
/// Bytes a frame may carry beyond its data payload (headers, names, extent lists).
pub const FRAME_SLACK: u32 = 64 << 10;
