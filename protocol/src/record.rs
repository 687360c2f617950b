//! The encrypted record layer: after the handshake, the byte stream of frames is cut into Noise
//! transport messages of at most 65535 bytes, each sent as `u16 length | ciphertext+tag`.
//!
//! Each direction has its own nonce counter, so the sending and receiving halves of a
//! connection work independently (two tasks, no lock).

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use snow::StatelessTransportState;

use crate::ProtocolError;

/// Largest Noise message.
pub const MAX_RECORD: usize = 65535;
/// AEAD tag appended to every record.
pub const TAG_LEN: usize = 16;
/// Plaintext carried by a full record.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_RECORD - TAG_LEN;

/// Encrypts outgoing bytes into records.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    pending: Vec<u8>,
}

/// Decrypts incoming records.
pub struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

/// The two halves of an established encrypted channel.
pub fn split(state: StatelessTransportState) -> (Sealer, Opener) {
    let state = Arc::new(state);
    (
        Sealer {
            state: Arc::clone(&state),
            nonce: 0,
            pending: Vec::with_capacity(MAX_RECORD_PLAINTEXT),
        },
        Opener { state, nonce: 0 },
    )
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Appends `piece` to the outgoing stream. Full records are sealed into `out` at once; a
    /// tail shorter than a record waits for more bytes or [`Sealer::finish`].
    pub fn push(&mut self, mut piece: &[u8], out: &mut BytesMut) -> Result<(), ProtocolError> {
        while !piece.is_empty() {
            if self.pending.is_empty() && piece.len() >= MAX_RECORD_PLAINTEXT {
                let (chunk, rest) = piece.split_at(MAX_RECORD_PLAINTEXT);
                self.seal_record(chunk, out)?;
                piece = rest;
                continue;
            }
            let take = (MAX_RECORD_PLAINTEXT - self.pending.len()).min(piece.len());
            self.pending.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
            if self.pending.len() == MAX_RECORD_PLAINTEXT {
                self.flush_pending(out)?;
            }
        }
        Ok(())
    }

    /// Seals whatever is pending, so everything pushed so far can be sent.
    pub fn finish(&mut self, out: &mut BytesMut) -> Result<(), ProtocolError> {
        if !self.pending.is_empty() {
            self.flush_pending(out)?;
        }
        Ok(())
    }

    fn flush_pending(&mut self, out: &mut BytesMut) -> Result<(), ProtocolError> {
        let pending = std::mem::take(&mut self.pending);
        let result = self.seal_record(&pending, out);
        self.pending = pending;
        self.pending.clear();
        result
    }

    fn seal_record(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<(), ProtocolError> {
        let len = plain.len() + TAG_LEN;
        out.reserve(2 + len);
        out.put_u16(len as u16);
        let start = out.len();
        out.resize(start + len, 0);
        let written = self
            .state
            .write_message(self.nonce, plain, &mut out[start..])
            .map_err(|e| ProtocolError::Encrypt(e.to_string()))?;
        if written != len {
            return Err(ProtocolError::Encrypt(format!(
                "sealed {written} bytes, expected {len}"
            )));
        }
        self.nonce += 1;
        Ok(())
    }
}

impl Opener {
    /// Decrypts every complete record at the front of `raw` and appends the plaintext to
    /// `plain`. An incomplete record stays in `raw` for the next call.
    pub fn open(&mut self, raw: &mut BytesMut, plain: &mut BytesMut) -> Result<(), ProtocolError> {
        while raw.len() >= 2 {
            let len = u16::from_be_bytes([raw[0], raw[1]]) as usize;
            if len < TAG_LEN {
                return Err(ProtocolError::malformed(format!(
                    "encrypted record of {len} bytes is shorter than its tag"
                )));
            }
            if raw.len() < 2 + len {
                raw.reserve(2 + len - raw.len());
                return Ok(());
            }
            let start = plain.len();
            plain.resize(start + len - TAG_LEN, 0);
            let n = self
                .state
                .read_message(self.nonce, &raw[2..2 + len], &mut plain[start..])
                .map_err(|_| ProtocolError::Decrypt)?;
            plain.truncate(start + n);
            self.nonce += 1;
            raw.advance(2 + len);
        }
        Ok(())
    }
}
