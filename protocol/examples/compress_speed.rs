//! Measures the wire codec on a file, in the 2 MiB chunks bulk reads use: compression and
//! decompression MB/s (one thread) and the ratio, counting chunks that do not shrink as sent
//! raw, as the wire does.
//! Run: cargo run --release -p diskferry-protocol --example compress_speed -- FILE...

use std::time::{Duration, Instant};

use bytes::BytesMut;
use diskferry_protocol::compress::Codec;

const CHUNK: usize = 2 << 20;

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (mut sent, mut raw_chunks) = (0usize, 0usize);
        let (mut ct, mut dt) = (Duration::ZERO, Duration::ZERO);
        for chunk in data.chunks(CHUNK) {
            let mut z = BytesMut::new();
            let t = Instant::now();
            let shrank = Codec::Lz4.compress_into(chunk, &mut z);
            ct += t.elapsed();
            if !shrank {
                sent += chunk.len();
                raw_chunks += 1;
                continue;
            }
            sent += z.len();
            let t = Instant::now();
            let back = Codec::Lz4
                .decompress(chunk.len() as u32, &z, CHUNK as u32)
                .expect("round trip");
            dt += t.elapsed();
            assert!(back == chunk, "round trip differs");
        }
        let mb = data.len() as f64 / 1e6;
        println!(
            "{path}: {:.0} MB, lz4 compress {:.0} MB/s, decompress {}, sent/raw {:.3} ({raw_chunks} of {} chunks raw)",
            mb,
            mb / ct.as_secs_f64(),
            if dt.is_zero() {
                "none (all raw)".to_string()
            } else {
                format!("{:.0} MB/s", mb / dt.as_secs_f64())
            },
            sent as f64 / data.len() as f64,
            data.len().div_ceil(CHUNK),
        );
    }
}
