//! Wire compression: the codecs a side offers in the handshake, compressing one data payload
//! (a Read reply or a Write request; kept raw when it does not shrink), decompressing one into
//! a buffer bounded by the negotiated payload limit, and the adaptive policy that stops
//! compressing when the link is faster than compression or the data does not shrink.
//!
//! A compressed payload travels as `codec u8 | raw length u32 | compressed bytes`. The raw
//! length is the peer's claim: it is checked against the negotiated maximum payload (and
//! against what the codec can possibly produce from that many bytes) before the output buffer
//! is allocated, and the payload must decompress to exactly that length. Why LZ4: measured
//! against zstd in bench/README.md ("Wire compression"); ARCHITECTURE.md, "Decisions".

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::ProtocolError;

/// Capability bit: LZ4 block format.
pub const CAP_LZ4: u8 = 1;
/// The codecs this build can use, as capability bits (what a side offers by default).
pub const SUPPORTED: u8 = CAP_LZ4;
/// Bytes in front of compressed data: the codec and the raw length.
pub const PREFIX_LEN: usize = 1 + 4;
/// Payloads smaller than this are never compressed (not worth a frame kind of their own).
pub const MIN_COMPRESS: usize = 4 << 10;
/// LZ4 produces at most 255 bytes per input byte (a run of length bytes); claims beyond that
/// (plus a little for the shortest sequences) cannot be honest.
const LZ4_MAX_EXPANSION: usize = 255;
const LZ4_EXPANSION_SLACK: usize = 64;

/// A compression codec both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Lz4,
}

impl Codec {
    /// The codec's byte in a compressed payload.
    pub fn id(self) -> u8 {
        match self {
            Codec::Lz4 => 1,
        }
    }

    /// The best codec both capability sets hold, if any.
    pub fn choose(ours: u8, theirs: u8) -> Option<Codec> {
        let common = ours & theirs & SUPPORTED;
        (common & CAP_LZ4 != 0).then_some(Codec::Lz4)
    }

    /// The most `len` bytes compress to (the room the codec wants to compress into).
    pub fn max_output(self, len: usize) -> usize {
        match self {
            Codec::Lz4 => lz4_flex::block::get_maximum_output_size(len),
        }
    }

    /// Appends `raw` compressed to `out` and returns true, or leaves `out` as it was and
    /// returns false when the result would not be at least 1/16 smaller.
    pub fn compress_into(self, raw: &[u8], out: &mut BytesMut) -> bool {
        let start = out.len();
        // The codec wants room for its worst case; what it leaves over is the room a data
        // reply's record tag needs to be sealed in place (the result is 1/16 smaller).
        let worst = self.max_output(raw.len());
        out.resize(start + worst, 0);
        let written = match self {
            Codec::Lz4 => lz4_flex::block::compress_into(raw, &mut out[start..]),
        };
        match written {
            Ok(n) if n < raw.len() - raw.len() / 16 => {
                out.truncate(start + n);
                true
            }
            _ => {
                out.truncate(start);
                false
            }
        }
    }

    /// Decompresses a payload announced as `raw_len` bytes, which must not exceed
    /// `max_payload`; the output buffer is allocated only after both checks.
    pub fn decompress(
        self,
        raw_len: u32,
        data: &[u8],
        max_payload: u32,
    ) -> Result<Bytes, ProtocolError> {
        let possible = data
            .len()
            .saturating_mul(LZ4_MAX_EXPANSION)
            .saturating_add(LZ4_EXPANSION_SLACK);
        if raw_len > max_payload || raw_len as usize > possible {
            return Err(ProtocolError::CompressionBomb {
                claimed: raw_len.into(),
                compressed: data.len() as u64,
                max: max_payload.into(),
            });
        }
        let mut out = vec![0u8; raw_len as usize];
        let n = match self {
            Codec::Lz4 => lz4_flex::block::decompress_into(data, &mut out)
                .map_err(|e| ProtocolError::Decompress(e.to_string()))?,
        };
        if n != out.len() {
            return Err(ProtocolError::Decompress(format!(
                "{} bytes decompressed to {n} where {raw_len} were announced",
                data.len()
            )));
        }
        Ok(Bytes::from(out))
    }
}

/// Decodes a compressed payload's prefix and data with the session's codec (none means the
/// peer compressed without having negotiated it).
pub fn decode_payload(
    negotiated: Option<Codec>,
    id: u8,
    raw_len: u32,
    data: &[u8],
    max_payload: u32,
) -> Result<Bytes, ProtocolError> {
    match negotiated {
        Some(codec) if codec.id() == id => codec.decompress(raw_len, data, max_payload),
        _ => Err(ProtocolError::malformed(format!(
            "a payload compressed with codec {id}, which was not negotiated"
        ))),
    }
}

/// Chunks sent raw, at most, after one that did not shrink (doubling from one).
const MAX_BACKOFF: u32 = 64;
/// While compression does not pay, one chunk in this many is compressed anyway to measure.
const PROBE_EVERY: u32 = 32;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.25;
/// Compression must promise this much more throughput than sending raw.
const MARGIN: f64 = 1.1;
/// The link is measured over windows of at least this many bytes, from the start of the
/// window's first write to the end of its last: more than a socket's send buffer holds
/// (Linux autotunes it up to 4 MiB), so writes the buffer absorbs at memory speed do not pass
/// for a fast link. Idle time between writes counts too, which can only make the link look
/// slower and compression more worth trying.
const LINK_WINDOW: usize = 16 << 20;

/// Compresses payloads while it pays: shared by the threads that compress one connection's
/// payloads and the writer that measures how fast the link takes them.
#[derive(Debug)]
pub struct Compressor {
    codec: Codec,
    /// How many payloads may be compressed at once (threads that compress).
    parallel: f64,
    policy: Mutex<Policy>,
}

#[derive(Debug, Default)]
struct Policy {
    /// Input bytes per second of one compressing thread.
    compress_rate: Option<f64>,
    /// Bytes sent per input byte (1 for chunks sent raw).
    ratio: Option<f64>,
    /// Bytes per second the link took, measured while writing.
    link_rate: Option<f64>,
    /// The window being measured: when its first write started, and its bytes so far.
    window: Option<(Instant, usize)>,
    /// Chunks still to send raw before trying again (after one that did not shrink).
    skip: u32,
    backoff: u32,
    since_probe: u32,
    /// The last decision, to log changes.
    paying: bool,
}

fn ewma(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |o| o + ALPHA * (sample - o)))
}

impl Policy {
    /// Whether compression promises more throughput than the raw link: compressed, the
    /// transfer runs at the slower of the compressors and the link carrying shrunken bytes.
    fn pays(&self, parallel: f64) -> bool {
        match (self.compress_rate, self.ratio, self.link_rate) {
            (Some(c), Some(r), Some(l)) => (c * parallel).min(l / r.max(0.001)) > l * MARGIN,
            _ => true, // not measured yet: try
        }
    }

    fn should_try(&mut self, parallel: f64) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        let pays = self.pays(parallel);
        if pays != self.paying {
            self.paying = pays;
            tracing::debug!(
                compress_mb_s = self.compress_rate.unwrap_or(0.0) / 1e6,
                ratio = self.ratio.unwrap_or(1.0),
                link_mb_s = self.link_rate.unwrap_or(0.0) / 1e6,
                "wire compression {}",
                if pays {
                    "on"
                } else {
                    "off: the link is faster"
                }
            );
        }
        if pays {
            return true;
        }
        self.since_probe += 1;
        if self.since_probe >= PROBE_EVERY {
            self.since_probe = 0;
            return true;
        }
        false
    }

    fn record(&mut self, raw: usize, sent: usize, took: Duration, shrank: bool) {
        let secs = took.as_secs_f64().max(1e-6);
        self.compress_rate = ewma(self.compress_rate, raw as f64 / secs);
        self.ratio = ewma(self.ratio, sent as f64 / raw.max(1) as f64);
        if shrank {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF);
            self.skip = self.backoff;
        }
    }
}

impl Compressor {
    /// A compressor for `codec` whose payloads are compressed by up to `parallel` threads.
    pub fn new(codec: Codec, parallel: usize) -> Self {
        Compressor {
            codec,
            parallel: parallel.max(1) as f64,
            policy: Mutex::new(Policy::default()),
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    fn policy(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `raw` compressed to `out` when the policy says to try and it shrinks; returns
    /// whether it did (`out` is unchanged otherwise, and the payload goes raw).
    pub fn compress(&self, raw: &[u8], out: &mut BytesMut) -> bool {
        if raw.len() < MIN_COMPRESS || !self.policy().should_try(self.parallel) {
            return false;
        }
        let start = Instant::now();
        let before = out.len();
        let shrank = self.codec.compress_into(raw, out);
        let sent = if shrank {
            out.len() - before
        } else {
            raw.len()
        };
        self.policy()
            .record(raw.len(), sent, start.elapsed(), shrank);
        shrank
    }

    /// Tells the policy a batch of `bytes`, whose write started at `started`, is written.
    pub fn record_link(&self, bytes: usize, started: Instant) {
        let mut p = self.policy();
        let (since, total) = p.window.unwrap_or((started, 0));
        let total = total + bytes;
        if total < LINK_WINDOW {
            p.window = Some((since, total));
            return;
        }
        p.window = None;
        let secs = since.elapsed().as_secs_f64().max(1e-6);
        p.link_rate = ewma(p.link_rate, total as f64 / secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::thread_rng().fill_bytes(&mut v);
        v
    }

    #[test]
    fn choose_needs_both_sides() {
        assert_eq!(Codec::choose(SUPPORTED, SUPPORTED), Some(Codec::Lz4));
        assert_eq!(Codec::choose(SUPPORTED, 0), None);
        assert_eq!(Codec::choose(0, SUPPORTED), None);
        // Bits this build does not know are ignored.
        assert_eq!(Codec::choose(0xfe, 0xfe), None);
    }

    #[test]
    fn round_trip_and_raw_fallback() {
        let raw = text(1 << 20);
        let mut out = BytesMut::new();
        assert!(Codec::Lz4.compress_into(&raw, &mut out));
        assert!(out.len() < raw.len() / 10);
        let back = Codec::Lz4
            .decompress(raw.len() as u32, &out, 1 << 20)
            .unwrap();
        assert_eq!(&back[..], &raw[..]);

        let noise = random(1 << 20);
        let mut out = BytesMut::from(&b"head"[..]);
        assert!(!Codec::Lz4.compress_into(&noise, &mut out));
        assert_eq!(
            &out[..],
            b"head",
            "a chunk that does not shrink leaves nothing behind"
        );
    }

    #[test]
    fn bombs_and_lies_are_refused_before_allocating() {
        let raw = vec![0u8; 1 << 20];
        let mut z = BytesMut::new();
        assert!(Codec::Lz4.compress_into(&raw, &mut z));
        // Claims above the negotiated maximum.
        let err = Codec::Lz4.decompress(u32::MAX, &z, 1 << 20).unwrap_err();
        assert!(
            matches!(err, ProtocolError::CompressionBomb { .. }),
            "{err}"
        );
        // Claims no LZ4 stream of this size can reach.
        let err = Codec::Lz4
            .decompress(1 << 20, &z[..16], 8 << 20)
            .unwrap_err();
        assert!(
            matches!(err, ProtocolError::CompressionBomb { .. }),
            "{err}"
        );
        // A claim below the real size: the bounded buffer overflows, an error.
        let err = Codec::Lz4
            .decompress((1 << 20) - 1, &z, 8 << 20)
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Decompress(_)), "{err}");
        // A claim above the real size: it decompresses short, an error.
        let err = Codec::Lz4
            .decompress((1 << 20) + 1, &z, 8 << 20)
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Decompress(_)), "{err}");
        // Garbage.
        let err = Codec::Lz4
            .decompress(4096, &random(100), 8 << 20)
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Decompress(_)), "{err}");
    }

    #[test]
    fn a_codec_that_was_not_negotiated_is_refused() {
        let err = decode_payload(None, 1, 10, b"x", 1 << 20).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
        let err = decode_payload(Some(Codec::Lz4), 9, 10, b"x", 1 << 20).unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    }

    #[test]
    fn incompressible_chunks_back_off() {
        let c = Compressor::new(Codec::Lz4, 1);
        let noise = random(64 << 10);
        let mut tried = 0;
        for _ in 0..200 {
            let before = c.policy().skip;
            let mut out = BytesMut::new();
            assert!(!c.compress(&noise, &mut out));
            if before == 0 {
                tried += 1;
            }
        }
        // 1 + 2 + 4 + ... + 64, then every 65th: about 8 tries in 200 chunks, not 200.
        assert!(tried <= 10, "tried {tried} of 200 incompressible chunks");
        // Compressible data after the backoff is compressed again.
        for _ in 0..=MAX_BACKOFF {
            c.compress(&text(64 << 10), &mut BytesMut::new());
        }
        assert!(c.compress(&text(64 << 10), &mut BytesMut::new()));
    }

    #[test]
    fn writes_a_socket_buffer_absorbs_do_not_pass_for_a_fast_link() {
        let c = Compressor::new(Codec::Lz4, 1);
        let data = text(1 << 20);
        // A slow link measured in full windows.
        for _ in 0..10 {
            c.record_link(16 << 20, Instant::now() - Duration::from_millis(100));
        }
        // Then batches of 1 MiB each written in 10 µs (into the socket's buffer), 50 ms
        // apart: the window runs from the first write's start, so the link stays slow.
        let start = Instant::now() - Duration::from_millis(50 * 20);
        for i in 0..20u32 {
            c.record_link(1 << 20, start + Duration::from_millis(50 * u64::from(i)));
        }
        assert!(c.compress(&data, &mut BytesMut::new()));
    }

    #[test]
    fn a_link_faster_than_compression_turns_it_off_and_probes() {
        let c = Compressor::new(Codec::Lz4, 1);
        let data = text(1 << 20);
        assert!(c.compress(&data, &mut BytesMut::new()), "unmeasured: try");
        // A link far faster than any compressor (1 TB/s).
        for _ in 0..20 {
            c.record_link(1 << 30, Instant::now() - Duration::from_millis(1));
        }
        let compressed = (0..PROBE_EVERY * 2)
            .filter(|_| c.compress(&data, &mut BytesMut::new()))
            .count();
        assert_eq!(compressed, 2, "only the probes compress");
        // A slow link (windows of 16 MiB in 100 ms: 168 MB/s): compression pays again.
        for _ in 0..40 {
            c.record_link(16 << 20, Instant::now() - Duration::from_millis(100));
        }
        assert!(c.compress(&data, &mut BytesMut::new()));
        assert!(c.compress(&data, &mut BytesMut::new()));
    }
}
