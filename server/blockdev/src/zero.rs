//! Finding the parts of a buffer worth writing: zeros never reach a sparse output.

/// Granularity of zero detection: runs are whole blocks of this size (the last may be short).
pub const ZERO_BLOCK: usize = 4096;

/// True when every byte is zero. Written so the compiler vectorizes it.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    let all = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    all && chunks.remainder().iter().all(|&b| b == 0)
}

/// The byte ranges of `buf` made of blocks that are not entirely zero, coalesced.
pub fn nonzero_runs(buf: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
        if is_zero(block) {
            continue;
        }
        let start = i * ZERO_BLOCK;
        let end = start + block.len();
        match runs.last_mut() {
            Some(r) if r.end == start => r.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nonzero_blocks_and_coalesces_them() {
        let mut buf = vec![0u8; 10 * ZERO_BLOCK + 100];
        assert!(nonzero_runs(&buf).is_empty());
        buf[ZERO_BLOCK + 5] = 1;
        buf[2 * ZERO_BLOCK + 4095] = 1;
        buf[7 * ZERO_BLOCK] = 9;
        buf[10 * ZERO_BLOCK + 99] = 3;
        assert_eq!(
            nonzero_runs(&buf),
            vec![
                ZERO_BLOCK..3 * ZERO_BLOCK,
                7 * ZERO_BLOCK..8 * ZERO_BLOCK,
                10 * ZERO_BLOCK..10 * ZERO_BLOCK + 100
            ]
        );
        assert!(!is_zero(&[0, 0, 1]));
        assert!(is_zero(&[]));
    }
}
