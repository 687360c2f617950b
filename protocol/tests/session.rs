//! Handshake and record layer over real in-memory duplex streams.

use std::time::Duration;

use bytes::Bytes;
use diskferry_protocol::handshake::{initiate, respond};
use diskferry_protocol::stream::split;
use diskferry_protocol::{Message, ProtocolError, Reply, Request, Role, SessionOptions, StaticKey};

/// The one server identity these tests use.
fn server_key() -> &'static StaticKey {
    static KEY: std::sync::OnceLock<StaticKey> = std::sync::OnceLock::new();
    KEY.get_or_init(StaticKey::generate)
}

/// Options for a side: the server holds the identity; an agent pins its public key.
fn opts(role: Role) -> SessionOptions {
    match role {
        Role::Controller => SessionOptions::controller(server_key().clone()),
        Role::Agent => SessionOptions::agent(StaticKey::generate(), server_key().public()),
    }
}

async fn pair(
    a: SessionOptions,
    b: SessionOptions,
) -> (
    Result<diskferry_protocol::Session, ProtocolError>,
    Result<diskferry_protocol::Session, ProtocolError>,
    tokio::io::DuplexStream,
    tokio::io::DuplexStream,
) {
    let (mut x, mut y) = tokio::io::duplex(1 << 20);
    let (ra, rb) = tokio::join!(initiate(&mut x, &a), respond(&mut y, &b));
    (ra, rb, x, y)
}

#[tokio::test]
async fn pinned_server_authenticates_and_frames_travel_encrypted() {
    let mut agent = opts(Role::Agent);
    agent.credential = b"one-time token".to_vec();
    let agent_key = agent.key.public();
    let (ra, rb, x, y) = pair(opts(Role::Controller), agent).await;
    let (sa, sb) = (ra.unwrap(), rb.unwrap());
    assert!(!sa.plaintext && !sb.plaintext, "encryption is the default");
    assert_eq!(sa.peer_role, Role::Agent);
    assert_eq!(sb.peer_role, Role::Controller);
    assert_eq!(sa.peer_key, agent_key, "the server learns the agent's key");
    assert_eq!(sa.credential, b"one-time token");
    assert_eq!(sb.peer_key, server_key().public());

    let (xr, xw) = tokio::io::split(x);
    let (yr, yw) = tokio::io::split(y);
    let (_, mut wa) = split(sa, xr, xw);
    let (mut rb, _) = split(sb, yr, yw);
    let big: Bytes = (0..3_000_000u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    let msgs = vec![
        Message::Request {
            cookie: 1,
            request: Request::ListDisks,
        },
        Message::Reply {
            cookie: 2,
            reply: Reply::Data(big),
        },
        Message::Request {
            cookie: 3,
            request: Request::Close { handle: 1 },
        },
    ];
    let sent = msgs.clone();
    let writer = tokio::spawn(async move {
        for m in &sent {
            wa.queue(m).unwrap();
        }
        wa.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    while let Some(m) = rb.next().await.unwrap() {
        got.push(m);
    }
    writer.await.unwrap();
    assert_eq!(got, msgs);
}

#[tokio::test]
async fn an_agent_pinning_another_server_key_is_refused_by_both_sides() {
    let stranger = StaticKey::generate().public();
    let agent = SessionOptions::agent(StaticKey::generate(), stranger);
    let (ra, rb, _, _) = pair(opts(Role::Controller), agent).await;
    assert!(
        matches!(ra, Err(ProtocolError::AuthenticationFailed)),
        "{ra:?}"
    );
    assert!(matches!(rb, Err(ProtocolError::ServerKeyRefused)), "{rb:?}");
}

#[tokio::test]
async fn a_server_without_the_pinned_private_key_cannot_open_an_agent() {
    // The boot script hands the public key to everyone: holding it must open nothing.
    let impostor = SessionOptions::controller(StaticKey::generate());
    let (ra, rb, _, _) = pair(impostor, opts(Role::Agent)).await;
    assert!(ra.is_err(), "{ra:?}");
    assert!(
        matches!(
            rb,
            Err(ProtocolError::ServerKeyRefused | ProtocolError::ServerNotProven)
        ),
        "{rb:?}"
    );
}

#[tokio::test]
async fn an_agent_without_a_pinned_server_key_does_not_start() {
    let mut agent = opts(Role::Agent);
    agent.server_key = None;
    let mut server = opts(Role::Controller);
    server.timeout = Duration::from_millis(200);
    let (_, rb, _, _) = pair(server, agent).await;
    assert!(matches!(rb, Err(ProtocolError::NoServerKey)), "{rb:?}");
}

#[tokio::test]
async fn the_agent_is_the_noise_initiator_whoever_opens_the_connection() {
    // A listening client: the server opens the TCP connection.
    let (ra, rb, _, _) = pair(opts(Role::Agent), opts(Role::Controller)).await;
    let (agent, server) = (ra.unwrap(), rb.unwrap());
    assert_eq!(agent.peer_key, server_key().public());
    assert_eq!(server.peer_role, Role::Agent);
}

#[tokio::test]
async fn plaintext_only_when_both_sides_ask() {
    let mut a = opts(Role::Controller);
    a.plaintext = true;
    let b = opts(Role::Agent);
    let (ra, rb, _, _) = pair(a.clone(), b.clone()).await;
    assert!(!ra.unwrap().plaintext && !rb.unwrap().plaintext);
    let mut b2 = b;
    b2.plaintext = true;
    let (ra, rb, _, _) = pair(a, b2).await;
    assert!(ra.unwrap().plaintext && rb.unwrap().plaintext);
}

#[tokio::test]
async fn max_payload_is_the_smaller_of_both() {
    let mut a = opts(Role::Controller);
    a.max_payload = 1 << 20;
    let mut b = opts(Role::Agent);
    b.max_payload = u32::MAX; // clamped to the hard limit
    let (ra, rb, _, _) = pair(a, b).await;
    assert_eq!(ra.unwrap().max_payload, 1 << 20);
    assert_eq!(rb.unwrap().max_payload, 1 << 20);
}

#[tokio::test]
async fn two_agents_refuse_each_other() {
    let (ra, rb, _, _) = pair(opts(Role::Agent), opts(Role::Agent)).await;
    assert!(
        matches!(ra, Err(ProtocolError::RoleConflict(Role::Agent))),
        "{ra:?}"
    );
    assert!(
        matches!(rb, Err(ProtocolError::RoleConflict(Role::Agent))),
        "{rb:?}"
    );
}

#[tokio::test]
async fn two_servers_refuse_each_other_at_once() {
    let (ra, rb, _, _) = pair(opts(Role::Controller), opts(Role::Controller)).await;
    assert!(matches!(ra, Err(ProtocolError::RoleConflict(_))), "{ra:?}");
    assert!(matches!(rb, Err(ProtocolError::RoleConflict(_))), "{rb:?}");
}

#[tokio::test]
async fn a_version_1_peer_gets_a_clear_mismatch_not_a_hang() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut x, mut y) = tokio::io::duplex(4096);
    let mut old = b"DSKFERRY".to_vec();
    old.extend_from_slice(&[0, 1, 0, 1]);
    x.write_all(&old).await.unwrap();
    let err = respond(&mut y, &opts(Role::Agent)).await.unwrap_err();
    assert!(
        matches!(err, ProtocolError::VersionMismatch { peer_max: 1, .. }),
        "{err}"
    );
    let mut reply = [0u8; 15];
    x.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[8..10], &[0, 0], "version 0: no common version");
}

#[tokio::test]
async fn a_non_diskferry_peer_is_refused() {
    let (mut x, mut y) = tokio::io::duplex(4096);
    use tokio::io::AsyncWriteExt;
    x.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let err = respond(&mut y, &opts(Role::Agent)).await.unwrap_err();
    assert!(matches!(err, ProtocolError::BadMagic), "{err}");
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let (_x, mut y) = tokio::io::duplex(4096);
    let mut o = opts(Role::Agent);
    o.timeout = Duration::from_millis(100);
    let err = respond(&mut y, &o).await.unwrap_err();
    assert!(matches!(err, ProtocolError::HandshakeTimeout(_)), "{err}");
}

#[tokio::test]
async fn tampered_ciphertext_is_detected() {
    let (ra, rb, x, y) = pair(opts(Role::Controller), opts(Role::Agent)).await;
    let (xr, xw) = tokio::io::split(x);
    let (_, mut wa) = split(ra.unwrap(), xr, xw);
    // Interpose: copy the ciphertext, flip one byte, deliver to the reader.
    let (mut tap_in, tap_out) = tokio::io::duplex(1 << 20);
    wa.queue(&Message::Request {
        cookie: 9,
        request: Request::ListDisks,
    })
    .unwrap();
    wa.flush().await.unwrap();
    drop(wa);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut yr, yw) = tokio::io::split(y);
    let mut cipher = vec![0u8; 4 + 13 + 16];
    yr.read_exact(&mut cipher).await.unwrap();
    cipher[5] ^= 1;
    tap_in.write_all(&cipher).await.unwrap();
    drop(tap_in);
    let (tr, tw) = tokio::io::split(tap_out);
    let (mut rb, _) = split(rb.unwrap(), tr, tw);
    drop(yw);
    let err = rb.next().await.unwrap_err();
    assert!(matches!(err, ProtocolError::Decrypt), "{err}");
}

#[tokio::test]
async fn data_replies_built_in_place_interleave_with_other_frames() {
    use diskferry_protocol::stream::{data_reply_buffer, DATA_HEADROOM};
    for plaintext in [false, true] {
        let mut a = opts(Role::Agent);
        let mut b = opts(Role::Controller);
        a.plaintext = plaintext;
        b.plaintext = plaintext;
        let (ra, rb, x, y) = pair(a, b).await;
        let (xr, xw) = tokio::io::split(x);
        let (yr, yw) = tokio::io::split(y);
        let (_, mut wa) = split(ra.unwrap(), xr, xw);
        let (mut rb, _) = split(rb.unwrap(), yr, yw);
        let payload: Vec<u8> = (0..(2 << 20) + 17).map(|i| (i % 241) as u8).collect();
        let writer = tokio::spawn({
            let payload = payload.clone();
            async move {
                wa.queue(&Message::Reply {
                    cookie: 1,
                    reply: Reply::Done,
                })
                .unwrap();
                let mut buf = data_reply_buffer(payload.len());
                buf[DATA_HEADROOM..].copy_from_slice(&payload);
                wa.queue_data_reply(2, buf).unwrap();
                wa.queue(&Message::Reply {
                    cookie: 3,
                    reply: Reply::Done,
                })
                .unwrap();
                wa.queue_data_reply(4, data_reply_buffer(0)).unwrap();
                wa.shutdown().await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(m) = rb.next().await.unwrap() {
            got.push(m);
        }
        writer.await.unwrap();
        assert_eq!(
            got,
            vec![
                Message::Reply {
                    cookie: 1,
                    reply: Reply::Done
                },
                Message::Reply {
                    cookie: 2,
                    reply: Reply::Data(payload.into())
                },
                Message::Reply {
                    cookie: 3,
                    reply: Reply::Done
                },
                Message::Reply {
                    cookie: 4,
                    reply: Reply::Data(Bytes::new())
                },
            ],
            "plaintext: {plaintext}"
        );
    }
}

#[tokio::test]
async fn a_hostile_record_length_is_refused_before_reserving() {
    use tokio::io::AsyncWriteExt;
    let (ra, rb, x, y) = pair(opts(Role::Controller), opts(Role::Agent)).await;
    drop(ra);
    let (mut xr, mut xw) = tokio::io::split(x);
    xw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let (yr, yw) = tokio::io::split(y);
    let (mut reader, _) = split(rb.unwrap(), yr, yw);
    let err = reader.next().await.unwrap_err();
    assert!(matches!(err, ProtocolError::FrameTooLarge { .. }), "{err}");
    let _ = &mut xr;
}
