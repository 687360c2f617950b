//! The protocol's error type: everything that closes a connection.

use std::io;

/// An error that ends a connection: I/O failure, a malformed or hostile frame, a failed
/// handshake. (Errors *about a request* travel as [`crate::Reply::Error`] instead.)
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the negotiated limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u64 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("the connection closed in the middle of a frame")]
    Truncated,
    #[error("the peer closed the connection")]
    Closed,
    #[error("not a diskferry peer (bad magic in hello)")]
    BadMagic,
    #[error("no common protocol version: we speak {our_min}..={our_max}, the peer {peer_min}..={peer_max}")]
    VersionMismatch {
        our_min: u16,
        our_max: u16,
        peer_min: u16,
        peer_max: u16,
    },
    #[error("authentication failed: the agent trusts another server key (its --server-key is not the public half of this --key-file), or the handshake was tampered with")]
    AuthenticationFailed,
    #[error("authentication failed: the server refused the handshake, this agent pins another server key (check --server-key against `diskferry keygen --public` on the server)")]
    ServerKeyRefused,
    #[error("authentication failed: the peer did not prove it holds the pinned server key, it is not our server (check --server-key)")]
    ServerNotProven,
    #[error("an agent needs the server's public key to connect (--server-key)")]
    NoServerKey,
    #[error("both peers claim the role {0:?}; one must serve disks and the other use them")]
    RoleConflict(crate::Role),
    #[error("the handshake did not finish within {0} s")]
    HandshakeTimeout(u64),
    #[error("decryption failed: the stream was corrupted or tampered with")]
    Decrypt,
    #[error("encryption failed: {0}")]
    Encrypt(String),
    #[error("decompression bomb: {compressed} compressed bytes claim {claimed} bytes, above the negotiated limit of {max} or more than the codec can produce")]
    CompressionBomb {
        claimed: u64,
        compressed: u64,
        max: u64,
    },
    #[error("a compressed payload is corrupt: {0}")]
    Decompress(String),
}

impl ProtocolError {
    pub fn malformed(what: impl Into<String>) -> Self {
        ProtocolError::Malformed(what.into())
    }
}
