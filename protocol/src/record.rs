//! The encrypted record layer used after the Noise handshake.
//!
//! The handshake's final split yields one AES-256-GCM key per direction. Each record is
//! `u32 length | ciphertext | 16-byte tag` and holds one or more *whole* frames; nonces count
//! records per direction and are encoded as in Noise (4 zero bytes, then the counter
//! big-endian). Noise's own transport messages stop at 64 KiB, which would force every 2 MiB
//! data frame to be cut up and stitched back together; records here go up to one maximal frame,
//! so the receiver decrypts in place and hands frame payloads on without copying them.
//!
//! The length is checked against the negotiated frame limit before anything is reserved.

use bytes::{Buf, BufMut, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::ProtocolError;

/// AEAD tag appended to every record.
pub const TAG_LEN: usize = 16;
/// The record length field.
pub const LEN_BYTES: usize = 4;

fn key(raw: &[u8; 32]) -> LessSafeKey {
    // AES-256 takes any 32-byte key: this cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).expect("a 32-byte AES-256 key"))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Encrypts outgoing records.
pub struct Sealer {
    key: LessSafeKey,
    counter: u64,
}

/// Decrypts incoming records.
pub struct Opener {
    key: LessSafeKey,
    counter: u64,
    max_plain: usize,
}

/// Both halves from the handshake's keys; `max_plain` bounds a record's plaintext.
pub(crate) fn halves(send: &[u8; 32], recv: &[u8; 32], max_plain: usize) -> (Sealer, Opener) {
    (
        Sealer {
            key: key(send),
            counter: 0,
        },
        Opener {
            key: key(recv),
            counter: 0,
            max_plain,
        },
    )
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Starts a record at the end of `out`; the plaintext is whatever is appended after it
    /// until [`Sealer::seal`]. Returns where the record starts.
    pub fn begin(&self, out: &mut BytesMut) -> usize {
        let start = out.len();
        out.put_u32(0);
        start
    }

    /// Encrypts, in place, the record begun at `start`, and appends its tag.
    pub fn seal(&mut self, out: &mut BytesMut, start: usize) -> Result<(), ProtocolError> {
        let body = start + LEN_BYTES;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter), Aad::empty(), &mut out[body..])
            .map_err(|_| ProtocolError::Encrypt("AES-GCM refused the record".into()))?;
        self.counter += 1;
        out.extend_from_slice(tag.as_ref());
        let len = u32::try_from(out.len() - body)
            .map_err(|_| ProtocolError::Encrypt("record over 4 GiB".into()))?;
        out[start..body].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

impl Opener {
    /// Takes the first complete record off `raw` and returns its plaintext, decrypted in
    /// place. `None` when the record is incomplete: room for the rest is then reserved.
    pub fn open(&mut self, raw: &mut BytesMut) -> Result<Option<BytesMut>, ProtocolError> {
        if raw.len() < LEN_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        if len < TAG_LEN || len - TAG_LEN > self.max_plain {
            return Err(ProtocolError::FrameTooLarge {
                len: len as u64,
                max: (self.max_plain + TAG_LEN) as u64,
            });
        }
        if raw.len() < LEN_BYTES + len {
            raw.reserve(LEN_BYTES + len - raw.len());
            return Ok(None);
        }
        let mut record = raw.split_to(LEN_BYTES + len);
        record.advance(LEN_BYTES);
        let plain_len = self
            .key
            .open_in_place(nonce(self.counter), Aad::empty(), &mut record[..])
            .map_err(|_| ProtocolError::Decrypt)?
            .len();
        self.counter += 1;
        record.truncate(plain_len);
        Ok(Some(record))
    }
}
