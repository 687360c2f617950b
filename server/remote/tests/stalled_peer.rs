//! A peer that authenticates and then never answers must not hang its user: with requests
//! outstanding and nothing received for the reply timeout, the connection closes and every
//! waiting request fails with the reason; a cancelled wait ends at once without closing it.

use std::time::{Duration, Instant};

use diskferry_blockdev::BlockDevice;
use diskferry_blockdev::{BlockError, CancelFlag};
mod common;

use diskferry_protocol::{Request, SessionOptions, StaticKey};
use diskferry_remote::{Connection, RemoteOptions};

/// A listening "agent" that completes the handshake, then reads requests and answers none
/// (but `Open`, when `opens` is true).
async fn silent_agent(server: &StaticKey, opens: bool) -> String {
    common::scripted_agent(server, move |request| match request {
        Request::Open { .. } if opens => Some(common::opened(1 << 20)),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_after_the_reply_timeout() {
    let server = StaticKey::generate();
    let addr = silent_agent(&server, false).await;
    let mut opts = SessionOptions::controller(server);
    opts.reply_timeout = Duration::from_millis(300);
    let conn = Connection::connect(&addr, &opts).await.unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        conn.open("/dev/vda", false, RemoteOptions::default()),
    )
    .await
    .expect("the open ends: hang guard")
    .unwrap_err();
    assert!(
        matches!(&err, BlockError::Disconnected(why) if why.contains("sent nothing")),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(conn.closed_reason().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_wait_ends_without_closing_the_connection() {
    let server = StaticKey::generate();
    let addr = silent_agent(&server, true).await;
    let opts = SessionOptions::controller(server);
    let conn = Connection::connect(&addr, &opts).await.unwrap();
    let cancel = CancelFlag::default();
    let ropts = RemoteOptions {
        cancel: Some(cancel.clone()),
        ..RemoteOptions::default()
    };
    let disk = conn.open("/dev/vda", false, ropts).await.unwrap();
    let reader = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 0)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    let got = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the cancelled read ends: hang guard")
        .unwrap();
    assert!(matches!(got, Err(BlockError::Cancelled)), "{got:?}");
    assert!(conn.closed_reason().is_none(), "the connection stays up");
}
