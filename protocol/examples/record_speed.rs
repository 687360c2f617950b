//! Measures the record layer alone on one core: seal and open 1 GiB in 2 MiB records.
//! Run: cargo run --release -p diskferry-protocol --example record_speed
use std::time::Instant;

use bytes::BytesMut;
use diskferry_protocol::handshake::{initiate, respond};
use diskferry_protocol::{SessionOptions, StaticKey};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = StaticKey::generate();
    let (mut a, mut b) = tokio::io::duplex(4096);
    let (ca, cb) = (
        SessionOptions::agent(StaticKey::generate(), server.public()),
        SessionOptions::controller(server),
    );
    let (sa, sb) = rt.block_on(async { tokio::join!(initiate(&mut a, &ca), respond(&mut b, &cb)) });
    let (mut sealer, _) = sa.unwrap().into_record_halves().unwrap();
    let (_, mut opener) = sb.unwrap().into_record_halves().unwrap();
    let data = vec![0x5au8; 2 << 20];
    let total = 1u64 << 30;
    let mut raw = BytesMut::with_capacity(3 << 20);
    let (mut t_seal, mut t_open) = (0f64, 0f64);
    for _ in 0..total / data.len() as u64 {
        let t = Instant::now();
        let start = sealer.begin(&mut raw);
        raw.extend_from_slice(&data);
        sealer.seal(&mut raw, start).unwrap();
        t_seal += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let plain = opener.open(&mut raw).unwrap().unwrap();
        t_open += t.elapsed().as_secs_f64();
        assert_eq!(plain.len(), data.len());
    }
    println!(
        "seal {:.0} MB/s, open {:.0} MB/s",
        total as f64 / t_seal / 1e6,
        total as f64 / t_open / 1e6
    );
}
