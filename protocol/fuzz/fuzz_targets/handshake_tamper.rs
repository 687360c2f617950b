//! A real agent and a real server run the handshake through a relay the fuzzer controls: the
//! input says which bytes of each direction to flip and where to cut the stream. Whatever the
//! relay does, both sides must end (an error or a session) without panicking, and a server
//! that accepts must have learnt exactly the agent's key and credential — a tampered handshake
//! never authenticates anyone else. Run: `cd protocol/fuzz && cargo fuzz run handshake_tamper`.
#![no_main]

use std::time::Duration;

use diskferry_protocol::handshake::{initiate, respond};
use diskferry_protocol::{SessionOptions, StaticKey};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// What the relay does to one direction: XOR these bytes at these stream offsets, and stop
/// forwarding after `cut` bytes.
#[derive(Debug, Default, Clone)]
struct Tamper {
    flips: Vec<(usize, u8)>,
    cut: Option<usize>,
}

/// Input: for each direction, a cut byte (0xff = none, else cut at n*2) and up to 8 flips of
/// (offset u8 × 2, mask u8).
fn parse(data: &[u8]) -> [Tamper; 2] {
    let mut it = data.iter().copied();
    let mut dir = || {
        let mut t = Tamper::default();
        let cut = it.next().unwrap_or(0xff);
        t.cut = (cut != 0xff).then_some(usize::from(cut) * 2);
        let n = it.next().unwrap_or(0) % 9;
        for _ in 0..n {
            let (Some(at), Some(mask)) = (it.next(), it.next()) else { break };
            if mask != 0 {
                t.flips.push((usize::from(at) * 2, mask));
            }
        }
        t
    };
    [dir(), dir()]
}

/// Copies `from` to `to`, tampering on the way; closes `to` when `from` ends or at the cut.
async fn relay(mut from: tokio::io::ReadHalf<DuplexStream>, mut to: tokio::io::WriteHalf<DuplexStream>, t: Tamper) {
    let mut pos = 0usize;
    let mut buf = [0u8; 512];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = buf[..n].to_vec();
        for (at, mask) in &t.flips {
            if (pos..pos + n).contains(at) {
                chunk[at - pos] ^= mask;
            }
        }
        let keep = t.cut.map_or(n, |c| c.saturating_sub(pos).min(n));
        if to.write_all(&chunk[..keep]).await.is_err() || keep < n {
            break;
        }
        pos += n;
    }
    let _ = to.shutdown().await;
}

fuzz_target!(|data: &[u8]| {
    let [up, down] = parse(data);
    let tampered = !up.flips.is_empty() || up.cut.is_some() || !down.flips.is_empty() || down.cut.is_some();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let server_key = StaticKey::generate();
        let agent_key = StaticKey::generate();
        let mut agent = SessionOptions::agent(agent_key.clone(), server_key.public());
        agent.credential = b"token".to_vec();
        agent.timeout = Duration::from_millis(500);
        let mut server = SessionOptions::controller(server_key);
        server.timeout = Duration::from_millis(500);
        let (mut a, a_relay) = tokio::io::duplex(4096);
        let (mut s, s_relay) = tokio::io::duplex(4096);
        let (ar, aw) = tokio::io::split(a_relay);
        let (sr, sw) = tokio::io::split(s_relay);
        let relays = tokio::spawn(async move {
            tokio::join!(relay(ar, sw, up), relay(sr, aw, down));
        });
        // Each side hangs up when it is done, as real peers do, so the other learns at once.
        let agent_side = async move {
            let r = initiate(&mut a, &agent).await;
            drop(a);
            r
        };
        let server_side = async move {
            let r = respond(&mut s, &server).await;
            drop(s);
            r
        };
        let (ra, rs) = tokio::join!(agent_side, server_side);
        let _ = relays.await;
        if let Ok(session) = &rs {
            assert_eq!(session.peer_key, agent_key.public(), "the server learnt another key");
            assert_eq!(session.credential, b"token", "the credential changed on the way");
        }
        if !tampered {
            assert!(ra.is_ok() && rs.is_ok(), "an untouched handshake fails: {ra:?} {rs:?}");
        }
    });
});
