//! diskferry's block protocol: everything that crosses the wire between the imaging server and
//! the sector-serving client.
//!
//! Layers, bottom up:
//! - [`key`]: static X25519 keys — the server's identity and each agent's own key.
//! - [`handshake`]: a plaintext hello that negotiates the protocol version and states each
//!   side's role, then a Noise `XK` handshake in which the agent authenticates the server by
//!   its pinned public key and the server learns the agent's key and credential; parameters
//!   (maximum payload, plaintext mode) are agreed *after* authentication.
//! - [`record`]: the Noise transport records that carry the byte stream once encrypted.
//! - [`codec`]: length-delimited, versioned frames ([`Message`]) with every length bounded
//!   before any allocation.
//! - [`compress`]: LZ4 for data payloads when both sides offer it, adaptive (off when the
//!   link is faster than compression or the data does not shrink), bounded on decode.
//! - [`stream`]: async frame reader/writer halves combining the two, for tokio sockets.
//! - [`multicast`]: the datagrams of the multicast deploy path (data, end, NACK, progress,
//!   done), each with a keyed-BLAKE3 MAC; codec only.
//!
//! This is the only crate that knows the wire byte order (big-endian, network order).
#![forbid(unsafe_code)]

pub mod admission;
pub mod chunks;
#[cfg(feature = "io")]
pub mod codec;
#[cfg(feature = "io")]
pub mod compress;
#[cfg(feature = "io")]
pub mod handshake;
#[cfg(feature = "io")]
pub mod key;
pub mod message;
pub mod multicast;
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
#[cfg(feature = "io")]
pub use key::{KeyError, PublicKey, StaticKey};
pub use message::{
    is_live_committed, live_state, BlockState, DiskInfo, DiskRun, ErrorCode, Extent, LiveMap,
    Message, MulticastState, MulticastStatus, PowerAction, Reply, Request, Role, LIVE_COMMITTED,
    LIVE_ENTRY_ID, LIVE_STATE, LIVE_STATE_SIZE, MAX_IDENTITY, MAX_LIVE_EXTENTS, MAX_LIVE_MENU,
    MAX_LOAD_OPTION,
};

/// Protocol versions this build speaks (inclusive range).
/// Version 2 replaced version 1's pre-shared key with server and agent keys (Noise `XK`).
pub const VERSION_MIN: u16 = 2;
/// Highest protocol version this build speaks. Version 3 adds a compression capability byte
/// to the handshake parameters, the compressed frame kinds, and `HashChunks`; a version-2
/// peer gets none of them (it would drop the connection on an unknown kind).
pub const VERSION_MAX: u16 = 3;
/// The first version with [`Request::HashChunks`].
pub const VERSION_HASH_CHUNKS: u16 = 3;

/// Hard ceiling on a data payload (one Read reply or Write request), whatever a peer advertises.
pub const MAX_PAYLOAD_LIMIT: u32 = 32 << 20;
/// Default payload limit advertised in the handshake.
pub const DEFAULT_MAX_PAYLOAD: u32 = 8 << 20;
/// Bytes a frame may carry beyond its data payload (headers, names, extent lists).
pub const FRAME_SLACK: u32 = 64 << 10;
