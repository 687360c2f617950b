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

/// Bytes [`hash_range`] reads at once (or one chunk, when chunks are larger).
pub const HASH_READ: u64 = 1 << 20;

/// The chunk hashes of `offset..offset+len` (the last chunk shorter), read through `read`
/// [`HASH_READ`] bytes at a time: that buffer is the only memory held. An all-zero chunk
/// (free space on most disks) gets the hash of zeros, computed once, instead of being hashed.
pub fn hash_range<E>(
    offset: u64,
    len: u64,
    chunk: u32,
    mut read: impl FnMut(&mut [u8], u64) -> Result<(), E>,
) -> Result<Vec<ChunkHash>, E> {
    let chunk = u64::from(chunk).max(1);
    let block = HASH_READ.max(chunk).min(len) as usize;
    let mut buf = vec![0u8; block];
    let mut zero: Option<(usize, ChunkHash)> = None;
    let mut out = Vec::with_capacity(len.div_ceil(chunk) as usize);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(block as u64) as usize;
        read(&mut buf[..n], at)?;
        for piece in buf[..n].chunks(chunk as usize) {
            out.push(if is_zero(piece) {
                zero_hash(&mut zero, piece.len())
            } else {
                chunk_hash(piece)
            });
        }
        at += n as u64;
    }
    Ok(out)
}

/// Whether every byte is zero (16 bytes at a time).
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// The hash of `len` zero bytes, kept for the next chunk of the same length.
fn zero_hash(cached: &mut Option<(usize, ChunkHash)>, len: usize) -> ChunkHash {
    match cached {
        Some((l, h)) if *l == len => *h,
        _ => {
            let h = chunk_hash(&vec![0u8; len]);
            *cached = Some((len, h));
            h
        }
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn a_range_hashes_chunk_by_chunk_whatever_the_read_size() {
        let mut disk = vec![0u8; (3 << 20) + 5000];
        disk[100] = 1;
        disk[(2 << 20) + 7] = 9;
        for chunk in [4096u32, 64 << 10, 4 << 20] {
            let got = hash_range(10, disk.len() as u64 - 10, chunk, |buf, at| {
                buf.copy_from_slice(&disk[at as usize..at as usize + buf.len()]);
                Ok::<(), ()>(())
            })
            .unwrap();
            let want: Vec<ChunkHash> = disk[10..].chunks(chunk as usize).map(chunk_hash).collect();
            assert_eq!(got, want, "chunk {chunk}");
        }
    }
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
