//! LZNT1, the compression NTFS applies to one compression unit at a time ([MS-XCA] 2.5):
//! decompression of a unit's stored bytes into a caller's buffer of the unit's size.
//!
//! A unit is a series of chunks, each a 2-byte header and a body: bit 15 of the header says
//! whether the body is compressed, bits 12–14 hold the signature 3, bits 0–11 the body's
//! length less one. A chunk expands to at most 4096 bytes; an uncompressed body is stored as
//! is. A compressed body is groups of a flag byte and eight tokens, bit *i* saying whether
//! token *i* is a literal byte (0) or a 16-bit back-reference (1) whose split between
//! displacement and length bits depends on how much of the chunk is already out. A zero
//! header, or the end of the stored bytes, ends the unit; whatever is not written reads as
//! zeros. Every header, displacement and length is checked: a corrupt unit is an error,
//! never a panic or a write outside the buffer.

/// Bytes a chunk expands to.
pub const CHUNK: usize = 4096;

/// Why a compression unit could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lznt1Error {
    #[error("chunk at byte {at} has signature {signature}, not 3")]
    Signature { at: usize, signature: u16 },
    #[error("chunk at byte {at} claims {len} bytes, past the {stored} stored")]
    ChunkPastEnd {
        at: usize,
        len: usize,
        stored: usize,
    },
    #[error("chunk at byte {at} expands past the {unit}-byte unit")]
    TooManyChunks { at: usize, unit: usize },
    #[error("chunk at byte {at}: a token is cut short by the chunk's end")]
    TokenCut { at: usize },
    #[error("chunk at byte {at}: back-reference {displacement} bytes back from {pos}")]
    Displacement {
        at: usize,
        displacement: usize,
        pos: usize,
    },
    #[error("chunk at byte {at}: expands past {CHUNK} bytes")]
    Overflow { at: usize },
}

/// Expands the stored bytes `src` of one compression unit into `out` (the unit's size, a
/// multiple of [`CHUNK`]); bytes no chunk writes are zeroed.
pub fn decompress(src: &[u8], out: &mut [u8]) -> Result<(), Lznt1Error> {
    out.fill(0);
    let mut at = 0;
    let mut chunk_out = 0;
    while at + 2 <= src.len() {
        let header = u16::from_le_bytes([src[at], src[at + 1]]);
        if header == 0 {
            break;
        }
        let signature = (header >> 12) & 7;
        if signature != 3 {
            return Err(Lznt1Error::Signature { at, signature });
        }
        let len = usize::from(header & 0x0FFF) + 1;
        let body = src
            .get(at + 2..at + 2 + len)
            .ok_or(Lznt1Error::ChunkPastEnd {
                at,
                len,
                stored: src.len(),
            })?;
        let unit = out.len();
        let dst = out
            .get_mut(chunk_out..chunk_out + CHUNK)
            .ok_or(Lznt1Error::TooManyChunks { at, unit })?;
        if header & 0x8000 == 0 {
            // At most 4096 bytes: the length field has 12 bits.
            dst[..len].copy_from_slice(body);
        } else {
            expand_chunk(body, dst, at)?;
        }
        at += 2 + len;
        chunk_out += CHUNK;
    }
    Ok(())
}

/// Expands one compressed chunk body into `dst` ([`CHUNK`] bytes); `at` (the chunk's place
/// in the unit) is for errors.
fn expand_chunk(body: &[u8], dst: &mut [u8], at: usize) -> Result<(), Lznt1Error> {
    let mut i = 0;
    let mut pos = 0;
    while i < body.len() {
        let flags = body[i];
        i += 1;
        for bit in 0..8 {
            if i >= body.len() {
                break;
            }
            if flags & (1 << bit) == 0 {
                *dst.get_mut(pos).ok_or(Lznt1Error::Overflow { at })? = body[i];
                pos += 1;
                i += 1;
                continue;
            }
            let token = body.get(i..i + 2).ok_or(Lznt1Error::TokenCut { at })?;
            let token = u16::from_le_bytes([token[0], token[1]]);
            i += 2;
            let (displacement, len) = split_token(token, pos);
            if displacement > pos {
                return Err(Lznt1Error::Displacement {
                    at,
                    displacement,
                    pos,
                });
            }
            if pos + len > dst.len() {
                return Err(Lznt1Error::Overflow { at });
            }
            // Byte by byte: the source may overlap what this copy writes.
            for k in pos..pos + len {
                dst[k] = dst[k - displacement];
            }
            pos += len;
        }
    }
    Ok(())
}

/// A back-reference's (displacement, length) when `pos` bytes of the chunk are out: the
/// displacement takes 4 bits while at most 16 bytes are out and one more bit each time that
/// count doubles, the length the other bits, plus 3.
fn split_token(token: u16, pos: usize) -> (usize, usize) {
    let mut displacement_bits = 4;
    let mut seen = pos.saturating_sub(1);
    while seen >= 0x10 {
        displacement_bits += 1;
        seen >>= 1;
    }
    let length_bits = 16 - displacement_bits;
    let displacement = usize::from(token >> length_bits) + 1;
    let len = usize::from(token & ((1u16 << length_bits) - 1)) + 3;
    (displacement, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of [MS-XCA] 3.3: 142 bytes in one compressed chunk of 59.
    const EXAMPLE: [u8; 59] = [
        0x38, 0xb0, 0x88, 0x46, 0x23, 0x20, 0x00, 0x20, 0x47, 0x20, 0x41, 0x00, 0x10, 0xa2, 0x47,
        0x01, 0xa0, 0x45, 0x20, 0x44, 0x00, 0x08, 0x45, 0x01, 0x50, 0x79, 0x00, 0xc0, 0x45, 0x20,
        0x05, 0x24, 0x13, 0x88, 0x05, 0xb4, 0x02, 0x4a, 0x44, 0xef, 0x03, 0x58, 0x02, 0x8c, 0x09,
        0x16, 0x01, 0x48, 0x45, 0x00, 0xbe, 0x00, 0x9e, 0x00, 0x04, 0x01, 0x18, 0x90, 0x00,
    ];
    const EXAMPLE_TEXT: &str = "F# F# G A A G F# E D D E F# F# E E F# F# G A A G F# E D D E \
        F# E D D E E F# D E F# G F# D E F# G F# E D E A F# F# G A A G F# E D D E F# E D D\0";

    #[test]
    fn expands_the_specification_example() {
        let mut out = vec![0xAAu8; CHUNK];
        decompress(&EXAMPLE, &mut out).unwrap();
        let text = EXAMPLE_TEXT.replace("        ", "");
        assert_eq!(text.len(), 142);
        assert_eq!(&out[..142], text.as_bytes());
        assert!(out[142..].iter().all(|&b| b == 0), "the rest is zeros");
    }

    #[test]
    fn uncompressed_chunks_and_end_marker() {
        let mut src = vec![0xFF, 0x3F];
        src.extend((0..CHUNK).map(|i| i as u8));
        src.extend([0x02, 0x30, b'a', b'b', b'c', 0, 0, 0xFF]);
        let mut out = vec![1u8; 3 * CHUNK];
        decompress(&src, &mut out).unwrap();
        assert!(out[..CHUNK].iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_eq!(&out[CHUNK..CHUNK + 4], b"abc\0");
        assert!(out[CHUNK + 3..].iter().all(|&b| b == 0));
    }

    #[test]
    fn corrupt_units_are_errors() {
        let mut out = vec![0u8; CHUNK];
        // Bad signature.
        assert!(matches!(
            decompress(&[0x00, 0xb0 ^ 0x10, 0], &mut out),
            Err(Lznt1Error::Signature { .. })
        ));
        // Body longer than what is stored.
        assert!(matches!(
            decompress(&[0x10, 0xb0, 0, 0], &mut out),
            Err(Lznt1Error::ChunkPastEnd { .. })
        ));
        // A back-reference before anything was written.
        assert!(matches!(
            decompress(&[0x02, 0xb0, 0x01, 0x00, 0x00], &mut out),
            Err(Lznt1Error::Displacement { .. })
        ));
        // A second chunk in a one-chunk unit.
        assert!(matches!(
            decompress(&[0x00, 0x30, b'x', 0x00, 0x30, b'y'], &mut out),
            Err(Lznt1Error::TooManyChunks { .. })
        ));
        // A token cut in half.
        assert!(matches!(
            decompress(&[0x02, 0xb0, 0x02, b'a', 0x00], &mut out),
            Err(Lznt1Error::TokenCut { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_write_past_the_unit() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4c5a_4e54);
        let mut out = vec![0u8; 4 * CHUNK];
        for round in 0..3000 {
            // Half random, half the specification example with a few bytes changed.
            let src: Vec<u8> = if round % 2 == 0 {
                let len = rng.gen_range(0..3 * CHUNK);
                (0..len).map(|_| rng.gen()).collect()
            } else {
                let mut e = EXAMPLE.to_vec();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..e.len());
                    e[at] = rng.gen();
                }
                e
            };
            let _ = decompress(&src, &mut out);
        }
    }

    #[test]
    fn runs_longer_than_a_chunk_are_refused() {
        // 'a', then references of the longest length until they pass 4096 bytes.
        let mut body = vec![0b1111_1110u8, b'a'];
        for _ in 0..7 {
            body.extend(0x0FFFu16.to_le_bytes()); // displacement 1, length 4098 at pos 1
        }
        let mut src = ((body.len() as u16 - 1) | 0xB000).to_le_bytes().to_vec();
        src.extend(body);
        let mut out = vec![0u8; CHUNK];
        assert!(matches!(
            decompress(&src, &mut out),
            Err(Lznt1Error::Overflow { .. })
        ));
    }
}
