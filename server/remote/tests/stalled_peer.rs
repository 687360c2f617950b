//! A peer that authenticates and then never answers must not hang its user: with requests
//! outstanding and nothing received for the reply timeout, the connection closes and every
//! waiting request fails with the reason; a cancelled wait ends at once without closing it.

use std::time::{Duration, Instant};

use diskferry_blockdev::BlockDevice;
use diskferry_blockdev::{BlockError, CancelFlag};
use diskferry_protocol::handshake::respond;
use diskferry_protocol::stream::split;
use diskferry_protocol::{Message, Reply, Request, SessionOptions, StaticKey};
use diskferry_remote::{Connection, RemoteOptions};

/// A listening "agent" that completes the handshake, then reads requests and answers none
/// (but `Open`, when `opens` is true).
async fn silent_agent(server: &StaticKey, opens: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opts = SessionOptions::agent(StaticKey::generate(), server.public());
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let session = respond(&mut stream, &opts).await.unwrap();
        let (r, w) = tokio::io::split(stream);
        let (mut reader, mut writer) = split(session, r, w);
        while let Ok(Some(msg)) = reader.next().await {
            if let (
                true,
                Message::Request {
                    cookie,
                    request: Request::Open { .. },
                },
            ) = (opens, msg)
            {
                let reply = Reply::Opened {
                    handle: 1,
                    size: 1 << 20,
                    logical_sector: 512,
                    physical_sector: 512,
                    read_only: true,
                };
                writer
                    .send(&Message::Reply { cookie, reply })
                    .await
                    .unwrap();
            }
        }
    });
    addr
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
