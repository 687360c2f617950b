//! Chunk hashes: what [`Request::HashChunks`](crate::message::Request::HashChunks) asks for
//! and both sides compute the same way — BLAKE3 over each fixed-size chunk of a range (the
//! last one over what remains). The limits keep a request's work and its reply bounded: a
//! chunk is a power of two from 4 KiB to 16 MiB, a request covers at most [`MAX_HASHES`]
//! chunks (a reply of 128 KiB).

/// One chunk's hash.
pub type ChunkHash = [u8; 32];

/// Smallest chunk a request may ask for.
pub const MIN_HASH_CHUNK: u32 = 4 << 10;
/// Largest chunk a request may ask for (the agent holds one chunk in memory per request).
pub const MAX_HASH_CHUNK: u32 = 16 << 20;
/// Most chunks one request may cover.
pub const MAX_HASHES: usize = 4096;

/// The hash of one chunk's bytes.
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    blake3::hash(data).into()
}

/// How many chunks `len` bytes in chunks of `chunk` make, or why the request is refused.
pub fn hash_count(len: u64, chunk: u32) -> Result<usize, String> {
    if !chunk.is_power_of_two() || !(MIN_HASH_CHUNK..=MAX_HASH_CHUNK).contains(&chunk) {
        return Err(format!(
            "a chunk of {chunk} bytes is not a power of two from {MIN_HASH_CHUNK} to {MAX_HASH_CHUNK}"
        ));
    }
    let n = len.div_ceil(u64::from(chunk));
    match usize::try_from(n) {
        Ok(n) if n <= MAX_HASHES => Ok(n),
        _ => Err(format!(
            "{len} bytes in chunks of {chunk} are more than {MAX_HASHES} chunks"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_limits() {
        assert_eq!(hash_count(0, 1 << 20), Ok(0));
        assert_eq!(hash_count(1, 1 << 20), Ok(1));
        assert_eq!(hash_count((3 << 20) + 1, 1 << 20), Ok(4));
        assert!(hash_count(1 << 20, 3000).is_err());
        assert!(hash_count(1 << 20, 2048).is_err());
        assert!(hash_count(1 << 20, 32 << 20).is_err());
        assert!(hash_count(u64::MAX, 1 << 20).is_err());
        assert_eq!(hash_count(4096 << 20, 1 << 20), Ok(4096));
        assert!(hash_count((4096 << 20) + 1, 1 << 20).is_err());
    }

    #[test]
    fn the_hash_is_blake3() {
        // BLAKE3 of the empty input, from the reference implementation's test vectors.
        let empty = chunk_hash(b"");
        assert_eq!(empty[..4], [0xaf, 0x13, 0x49, 0xb9], "{empty:02x?}");
    }
}
