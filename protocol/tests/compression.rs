//! Wire compression over real sessions: negotiation (both offer → LZ4; one side without, or a
//! version-2 peer → none), payloads from a real ext4 image (made by mke2fs) travelling
//! compressed and byte-identical, random payloads travelling raw, and hostile compressed
//! frames — decompression bombs and lying lengths — closing the connection.

use std::process::Command;

use bytes::{BufMut, Bytes, BytesMut};
use diskferry_protocol::compress::Codec;
use diskferry_protocol::handshake::{initiate, respond};
use diskferry_protocol::stream::{data_reply_buffer, split, DataReply, DATA_HEADROOM};
use diskferry_protocol::{
    FrameCodec, Message, ProtocolError, Reply, Request, Role, Session, SessionOptions, StaticKey,
};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

fn opts(role: Role, server: &StaticKey) -> SessionOptions {
    match role {
        Role::Controller => SessionOptions::controller(server.clone()),
        Role::Agent => SessionOptions::agent(StaticKey::generate(), server.public()),
    }
}

/// Handshakes a server and an agent with the options `tweak` adjusts; returns both sessions
/// and their streams (server first).
async fn sessions(
    tweak: impl Fn(&mut SessionOptions, &mut SessionOptions),
) -> (
    (Session, tokio::io::DuplexStream),
    (Session, tokio::io::DuplexStream),
) {
    let key = StaticKey::generate();
    let (mut server, mut agent) = (opts(Role::Controller, &key), opts(Role::Agent, &key));
    tweak(&mut server, &mut agent);
    let (mut x, mut y) = tokio::io::duplex(64 << 20);
    let (s, a) = tokio::join!(initiate(&mut x, &server), respond(&mut y, &agent));
    ((s.unwrap(), x), (a.unwrap(), y))
}

/// A real ext4 image: mke2fs fills 4 MiB with the system's license texts.
fn ext4_image() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let ok = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d", "/usr/share/common-licenses"])
        .arg(&img)
        .arg("4M")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mke2fs (e2fsprogs) is installed");
    assert!(ok.success());
    std::fs::read(img).unwrap()
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[tokio::test]
async fn both_sides_offering_lz4_get_it_one_without_gets_none() {
    let ((s, _), (a, _)) = sessions(|_, _| {}).await;
    assert_eq!(s.version, 3);
    assert_eq!(
        (s.compression, a.compression),
        (Some(Codec::Lz4), Some(Codec::Lz4))
    );

    let ((s, _), (a, _)) = sessions(|_, agent| agent.compression = 0).await;
    assert_eq!((s.compression, a.compression), (None, None));
    let ((s, _), (a, _)) = sessions(|server, _| server.compression = 0).await;
    assert_eq!((s.compression, a.compression), (None, None));
}

#[tokio::test]
async fn a_version_2_peer_gets_no_compression_and_still_works() {
    for old_agent in [true, false] {
        let ((s, x), (a, y)) = sessions(|server, agent| {
            if old_agent {
                agent.version_max = 2;
            } else {
                server.version_max = 2;
            }
        })
        .await;
        assert_eq!((s.version, a.version), (2, 2));
        assert_eq!((s.compression, a.compression), (None, None));
        let (xr, xw) = tokio::io::split(x);
        let (yr, yw) = tokio::io::split(y);
        let (_, mut ws) = split(s, xr, xw);
        let (mut ra, _) = split(a, yr, yw);
        let write = Message::Request {
            cookie: 7,
            request: Request::Write {
                handle: 1,
                offset: 0,
                data: Bytes::from(vec![0u8; 1 << 20]),
            },
        };
        ws.send(&write).await.unwrap();
        assert_eq!(ra.next().await.unwrap(), Some(write));
    }
}

/// Sends `payload` as a data reply built in place from the agent (plaintext, so the bytes on
/// the wire can be counted) and returns whether it went compressed and the wire bytes.
async fn reply_on_the_wire(payload: &[u8]) -> (bool, Vec<u8>) {
    let ((s, mut x), (a, y)) = sessions(|server, agent| {
        server.plaintext = true;
        agent.plaintext = true;
    })
    .await;
    drop(s);
    let (yr, yw) = tokio::io::split(y);
    let (_, mut wa) = split(a, yr, yw);
    let mut buf = data_reply_buffer(payload.len());
    buf[DATA_HEADROOM..].copy_from_slice(payload);
    let reply = DataReply::compressed(buf, wa.compressor().as_deref());
    let compressed = reply.is_compressed();
    wa.queue_data(9, reply).unwrap();
    wa.shutdown().await.unwrap();
    let mut wire = Vec::new();
    x.read_to_end(&mut wire).await.unwrap();
    (compressed, wire)
}

#[tokio::test]
async fn an_ext4_image_travels_compressed_and_random_data_raw() {
    let max = diskferry_protocol::DEFAULT_MAX_PAYLOAD;
    for (payload, should_shrink) in [(ext4_image(), true), (random(4 << 20), false)] {
        let (compressed, wire) = reply_on_the_wire(&payload).await;
        assert_eq!(compressed, should_shrink);
        if should_shrink {
            assert!(wire.len() < payload.len() / 4, "{} bytes sent", wire.len());
        } else {
            assert!(wire.len() > payload.len(), "raw, with its header");
        }
        let mut codec = FrameCodec::new(max).with_compression(Some(Codec::Lz4));
        let got = codec.decode(&mut BytesMut::from(&wire[..])).unwrap();
        let want = Message::Reply {
            cookie: 9,
            reply: Reply::Data(payload.into()),
        };
        assert_eq!(got, Some(want), "byte-identical after the round trip");
    }
}

#[tokio::test]
async fn encrypted_writes_and_replies_round_trip_compressed() {
    let image = Bytes::from(ext4_image());
    let ((s, x), (a, y)) = sessions(|_, _| {}).await;
    let (xr, xw) = tokio::io::split(x);
    let (yr, yw) = tokio::io::split(y);
    let (mut rs, mut ws) = split(s, xr, xw);
    let (mut ra, mut wa) = split(a, yr, yw);
    let write = Message::Request {
        cookie: 1,
        request: Request::Write {
            handle: 1,
            offset: 4096,
            data: image.clone(),
        },
    };
    ws.send(&write).await.unwrap();
    assert_eq!(ra.next().await.unwrap(), Some(write));
    let mut buf = data_reply_buffer(image.len());
    buf[DATA_HEADROOM..].copy_from_slice(&image);
    let reply = DataReply::compressed(buf, wa.compressor().as_deref());
    assert!(reply.is_compressed());
    wa.queue_data(2, reply).unwrap();
    wa.flush().await.unwrap();
    let got = rs.next().await.unwrap();
    assert_eq!(
        got,
        Some(Message::Reply {
            cookie: 2,
            reply: Reply::Data(image)
        })
    );
}

/// A compressed data reply frame, as a hostile peer may write it: `raw_len` is its claim.
fn zdata_frame(codec_id: u8, raw_len: u32, data: &[u8]) -> BytesMut {
    let mut f = BytesMut::new();
    f.put_u32((1 + 8 + 1 + 4 + data.len()) as u32);
    f.put_u8(0x87); // DATA_Z
    f.put_u64(5);
    f.put_u8(codec_id);
    f.put_u32(raw_len);
    f.put_slice(data);
    f
}

fn lz4(raw: &[u8]) -> BytesMut {
    let mut z = BytesMut::new();
    assert!(Codec::Lz4.compress_into(raw, &mut z));
    z
}

#[test]
fn hostile_compressed_frames_are_refused_by_the_decoder() {
    let max = 1 << 20;
    let codec = || FrameCodec::new(max).with_compression(Some(Codec::Lz4));
    // 32 MiB of zeros compress to ~128 KiB, which fits a frame: the claim is above the limit.
    let bomb = lz4(&vec![0u8; 32 << 20]);
    let err = codec()
        .decode(&mut zdata_frame(1, 32 << 20, &bomb))
        .unwrap_err();
    assert!(
        matches!(err, ProtocolError::CompressionBomb { .. }),
        "{err}"
    );
    // An honest-looking claim that decompresses to something else.
    let z = lz4(&vec![7u8; 64 << 10]);
    for claim in [(64 << 10) - 1, (64 << 10) + 1] {
        let err = codec().decode(&mut zdata_frame(1, claim, &z)).unwrap_err();
        assert!(matches!(err, ProtocolError::Decompress(_)), "{err}");
    }
    // A codec that was not negotiated, and compression on a session without it.
    let err = codec()
        .decode(&mut zdata_frame(2, 64 << 10, &z))
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    let err = FrameCodec::new(max)
        .decode(&mut zdata_frame(1, 64 << 10, &z))
        .unwrap_err();
    assert!(matches!(err, ProtocolError::Malformed(_)), "{err}");
    // And the honest frame decodes.
    let ok = codec().decode(&mut zdata_frame(1, 64 << 10, &z)).unwrap();
    assert_eq!(
        ok,
        Some(Message::Reply {
            cookie: 5,
            reply: Reply::Data(vec![7u8; 64 << 10].into())
        })
    );
}

#[tokio::test]
async fn a_bomb_on_a_live_session_ends_it_with_the_typed_error() {
    let ((s, x), (a, mut y)) = sessions(|server, agent| {
        server.plaintext = true;
        agent.plaintext = true;
    })
    .await;
    drop(a);
    let (xr, xw) = tokio::io::split(x);
    let (mut rs, _ws) = split(s, xr, xw);
    let max = diskferry_protocol::DEFAULT_MAX_PAYLOAD;
    let bomb = lz4(&vec![0u8; 2 * max as usize]);
    y.write_all(&zdata_frame(1, 2 * max, &bomb)).await.unwrap();
    let err = rs.next().await.unwrap_err();
    assert!(
        matches!(err, ProtocolError::CompressionBomb { claimed, max: m, .. } if claimed == 2 * u64::from(max) && m == u64::from(max)),
        "{err}"
    );
}
