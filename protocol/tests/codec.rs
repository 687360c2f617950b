//! Frame codec: round trips under every split, and hostile input that must be rejected.

use bytes::{BufMut, Bytes, BytesMut};
use diskferry_protocol::multicast::Credentials;
use diskferry_protocol::{
    BlockState, DiskInfo, DiskRun, ErrorCode, Extent, FrameCodec, LiveMap, Message, MulticastState,
    MulticastStatus, PowerAction, ProtocolError, Reply, Request, MAX_LIVE_EXTENTS,
};
use rand::{Rng, SeedableRng};
use tokio_util::codec::{Decoder, Encoder};

fn samples() -> Vec<Message> {
    let data: Bytes = (0..200_000u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    vec![
        Message::Request {
            cookie: 1,
            request: Request::ListDisks,
        },
        Message::Request {
            cookie: 101,
            request: Request::Identify,
        },
        Message::Request {
            cookie: 104,
            request: Request::WriteZeroes {
                handle: 3,
                offset: 1 << 20,
                len: 1 << 40,
            },
        },
        Message::Request {
            cookie: 105,
            request: Request::MulticastJoin {
                handle: 3,
                credentials: Box::new(credentials()),
            },
        },
        Message::Request {
            cookie: 106,
            request: Request::MulticastStatus,
        },
        Message::Request {
            cookie: 108,
            request: Request::SetBootEntry {
                load_option: Bytes::from_static(b"\x01\0\0\0\x04\0d\0\0\0\x7f\xff\x04\0"),
            },
        },
        Message::Reply {
            cookie: 108,
            reply: Reply::BootEntry(0x0004),
        },
        Message::Request {
            cookie: 109,
            request: Request::LivePrepare { size: 3 << 30 },
        },
        Message::Request {
            cookie: 110,
            request: Request::LiveRemove,
        },
        Message::Request {
            cookie: 111,
            request: Request::LiveBoot {
                menu: "menuentry \"x\" --id diskferry-live { linux /vmlinuz }".into(),
            },
        },
        Message::Request {
            cookie: 112,
            request: Request::LiveCommit { committed: true },
        },
        Message::Request {
            cookie: 111,
            request: Request::LiveBoot {
                menu: "menuentry \"x\" --id diskferry-live { linux /vmlinuz }".into(),
            },
        },
        Message::Request {
            cookie: 112,
            request: Request::LiveCommit { committed: true },
        },
        Message::Reply {
            cookie: 109,
            reply: Reply::LiveMap(LiveMap {
                disk: "/dev/vda".into(),
                path: "/diskferry-live".into(),
                block_size: 4096,
                runs: vec![
                    DiskRun {
                        offset: 1 << 30,
                        len: 2 << 30,
                    },
                    DiskRun {
                        offset: 5 << 30,
                        len: 1 << 30,
                    },
                ],
            }),
        },
        Message::Reply {
            cookie: 106,
            reply: Reply::Multicast(MulticastStatus {
                state: MulticastState::Failed,
                received: 17,
                total: 1 << 40,
                message: "nothing valid from the sender for 10s".into(),
            }),
        },
        Message::Reply {
            cookie: 107,
            reply: Reply::Multicast(MulticastStatus {
                state: MulticastState::Running,
                received: 0,
                total: 0,
                message: String::new(),
            }),
        },
        Message::Request {
            cookie: 102,
            request: Request::Power {
                action: PowerAction::Reboot,
            },
        },
        Message::Request {
            cookie: 103,
            request: Request::Power {
                action: PowerAction::Poweroff,
            },
        },
        Message::Reply {
            cookie: 101,
            reply: Reply::Identity(
                r#"{"macs":["52:54:00:12:34:56"],"product":"Standard PC é"}"#.into(),
            ),
        },
        Message::Request {
            cookie: 2,
            request: Request::Open {
                disk: "/dev/nvme0n1".into(),
                writable: true,
            },
        },
        Message::Request {
            cookie: 3,
            request: Request::Read {
                handle: 7,
                offset: 1 << 40,
                len: 4 << 20,
            },
        },
        Message::Request {
            cookie: 4,
            request: Request::Write {
                handle: 7,
                offset: 512,
                data: data.clone(),
            },
        },
        Message::Request {
            cookie: 5,
            request: Request::Flush { handle: 7 },
        },
        Message::Request {
            cookie: 6,
            request: Request::Discard {
                handle: 7,
                offset: 4096,
                len: 1 << 30,
            },
        },
        Message::Request {
            cookie: 7,
            request: Request::BlockStatus {
                handle: 7,
                offset: 0,
                len: u64::MAX,
            },
        },
        Message::Request {
            cookie: u64::MAX,
            request: Request::Close { handle: 7 },
        },
        Message::Request {
            cookie: 8,
            request: Request::HashChunks {
                handle: 7,
                offset: 1 << 20,
                len: 3 << 30,
                chunk: 1 << 20,
            },
        },
        Message::Reply {
            cookie: 8,
            reply: Reply::Hashes((0..=255u8).map(|i| [i; 32]).collect()),
        },
        Message::Reply {
            cookie: 9,
            reply: Reply::Hashes(Vec::new()),
        },
        Message::Reply {
            cookie: 1,
            reply: Reply::Disks(vec![
                DiskInfo {
                    name: "/dev/sda".into(),
                    size: 500 << 30,
                    logical_sector: 512,
                    physical_sector: 4096,
                    model: "Samsung SSD 870".into(),
                    serial: "S5Y1NX0R".into(),
                    rotational: false,
                    read_only: true,
                },
                DiskInfo::default(),
            ]),
        },
        Message::Reply {
            cookie: 2,
            reply: Reply::Opened {
                handle: 7,
                size: 1 << 33,
                logical_sector: 4096,
                physical_sector: 4096,
                read_only: false,
            },
        },
        Message::Reply {
            cookie: 3,
            reply: Reply::Data(data),
        },
        Message::Reply {
            cookie: 4,
            reply: Reply::Done,
        },
        Message::Reply {
            cookie: 5,
            reply: Reply::Status(vec![
                Extent {
                    len: 1 << 20,
                    state: BlockState::Data,
                },
                Extent {
                    len: 1 << 30,
                    state: BlockState::Zero,
                },
                Extent {
                    len: 4096,
                    state: BlockState::Unknown,
                },
            ]),
        },
        Message::Reply {
            cookie: 6,
            reply: Reply::Error {
                code: ErrorCode::ReadOnly,
                message: "read-only client".into(),
            },
        },
        Message::Reply {
            cookie: 7,
            reply: Reply::Error {
                code: ErrorCode::Other(999),
                message: String::new(),
            },
        },
    ]
}

fn credentials() -> Credentials {
    Credentials {
        session: 9,
        receiver: 3,
        group: "239.255.0.9:5500".parse().unwrap(),
        sender: "10.0.0.1:40000".parse().unwrap(),
        total_packets: 1 << 30,
        data_key: [1; 32],
        report_key: [2; 32],
    }
}

fn encode_all(msgs: &[Message]) -> BytesMut {
    let mut codec = FrameCodec::new(1 << 20);
    let mut out = BytesMut::new();
    for m in msgs {
        codec.encode(m, &mut out).unwrap();
    }
    out
}

/// Feeds `wire` to a decoder in pieces whose sizes come from `next_len`.
fn decode_in_pieces(
    wire: &[u8],
    mut next_len: impl FnMut() -> usize,
) -> Result<Vec<Message>, ProtocolError> {
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < wire.len() {
        let n = next_len().clamp(1, wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        while let Some(m) = codec.decode(&mut buf)? {
            out.push(m);
        }
    }
    if let Some(m) = codec.decode_eof(&mut buf)? {
        out.push(m);
    }
    Ok(out)
}

#[test]
fn every_message_round_trips_whole() {
    let msgs = samples();
    let wire = encode_all(&msgs);
    assert_eq!(decode_in_pieces(&wire, || usize::MAX).unwrap(), msgs);
}

#[test]
fn byte_by_byte_decoding_yields_the_same_messages() {
    let msgs = samples();
    let wire = encode_all(&msgs);
    assert_eq!(decode_in_pieces(&wire, || 1).unwrap(), msgs);
}

#[test]
fn random_splits_yield_the_same_messages() {
    let msgs = samples();
    let wire = encode_all(&msgs);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd15c);
    for _ in 0..200 {
        let max = rng.gen_range(1..70_000);
        assert_eq!(
            decode_in_pieces(&wire, || rng.gen_range(1..=max)).unwrap(),
            msgs
        );
    }
}

#[test]
fn oversized_length_is_rejected_before_buffering() {
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    buf.put_u8(0x83);
    let capacity_before = buf.capacity();
    match codec.decode(&mut buf) {
        Err(ProtocolError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u64::from(u32::MAX));
            assert_eq!(max, u64::from(codec.max_frame()));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(
        buf.capacity(),
        capacity_before,
        "nothing may be reserved for a rejected frame"
    );
}

#[test]
fn encoder_refuses_payloads_above_the_limit() {
    let mut codec = FrameCodec::new(64 << 10);
    let data = Bytes::from(vec![1u8; 200 << 10]);
    let mut out = BytesMut::new();
    let err = codec
        .encode(
            &Message::Reply {
                cookie: 1,
                reply: Reply::Data(data),
            },
            &mut out,
        )
        .unwrap_err();
    assert!(matches!(err, ProtocolError::FrameTooLarge { .. }), "{err}");
    assert!(
        out.is_empty(),
        "a refused frame leaves nothing half-written"
    );
}

#[test]
fn truncated_stream_is_an_error_not_a_message() {
    let msgs = samples();
    let wire = encode_all(&msgs[..3]);
    for cut in [1, 4, 12, wire.len() - 1] {
        let err = decode_in_pieces(&wire[..cut], || 3).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Truncated),
            "cut at {cut}: {err}"
        );
    }
}

fn frame(kind: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32((1 + 8 + body.len()) as u32);
    b.put_u8(kind);
    b.put_u64(42);
    b.put_slice(body);
    b
}

fn decode_one(mut b: BytesMut) -> Result<Option<Message>, ProtocolError> {
    FrameCodec::new(1 << 20).decode(&mut b)
}

#[test]
fn malformed_frames_are_errors() {
    // Unknown kinds, requests and replies.
    assert!(matches!(
        decode_one(frame(0x42, &[])),
        Err(ProtocolError::UnknownKind(0x42))
    ));
    assert!(matches!(
        decode_one(frame(0x99, &[])),
        Err(ProtocolError::UnknownKind(0x99))
    ));
    // Read with a body cut short.
    assert!(matches!(
        decode_one(frame(0x03, &[0, 0, 0, 1, 0])),
        Err(ProtocolError::Malformed(_))
    ));
    // Trailing garbage after a complete Flush.
    assert!(matches!(
        decode_one(frame(0x05, &[0, 0, 0, 1, 9])),
        Err(ProtocolError::Malformed(_))
    ));
    // A string longer than the frame.
    assert!(matches!(
        decode_one(frame(0x02, &[0xff, 0xff, b'a'])),
        Err(ProtocolError::Malformed(_))
    ));
    // A string that is not UTF-8.
    assert!(matches!(
        decode_one(frame(0x02, &[0, 2, 0xc3, 0x28, 0])),
        Err(ProtocolError::Malformed(_))
    ));
    // A boolean that is neither 0 nor 1.
    assert!(matches!(
        decode_one(frame(0x02, &[0, 1, b'a', 7])),
        Err(ProtocolError::Malformed(_))
    ));
    // A disk list claiming four billion entries in a few bytes: refused before allocating.
    assert!(matches!(
        decode_one(frame(0x81, &[0xff, 0xff, 0xff, 0xff, 0, 0])),
        Err(ProtocolError::Malformed(_))
    ));
    // An extent list claiming more entries than fit.
    assert!(matches!(
        decode_one(frame(0x85, &[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0])),
        Err(ProtocolError::Malformed(_))
    ));
    // An unknown extent state.
    assert!(matches!(
        decode_one(frame(0x85, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 9])),
        Err(ProtocolError::Malformed(_))
    ));
    // A length shorter than the header.
    let mut b = BytesMut::new();
    b.put_u32(3);
    b.put_slice(&[0, 0, 0]);
    assert!(matches!(decode_one(b), Err(ProtocolError::Malformed(_))));
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let wire = encode_all(&samples());
    for _ in 0..5_000 {
        let mut bytes = wire[..rng.gen_range(0..wire.len().min(4096))].to_vec();
        for _ in 0..rng.gen_range(1..8) {
            if !bytes.is_empty() {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
        }
        let mut codec = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
    }
}

#[test]
fn bad_power_actions_and_non_utf8_identities_are_rejected() {
    let mut codec = FrameCodec::new(1 << 20);
    for (kind, body) in [(0x0au8, vec![9u8]), (0x86, vec![0xff, 0xfe])] {
        let mut buf = BytesMut::new();
        buf.put_u32((1 + 8 + body.len()) as u32);
        buf.put_u8(kind);
        buf.put_u64(1);
        buf.put_slice(&body);
        assert!(codec.decode(&mut buf).is_err(), "kind {kind:#x}");
    }
}

#[test]
fn a_hash_list_longer_than_the_limit_or_the_frame_is_refused() {
    use diskferry_protocol::chunks::MAX_HASHES;
    let mut codec = FrameCodec::new(1 << 20);
    for (count, hashes) in [(MAX_HASHES as u32 + 1, MAX_HASHES + 1), (1000, 999)] {
        let mut body = BytesMut::new();
        body.put_u8(0x88); // HASHES
        body.put_u64(1);
        body.put_u32(count);
        body.put_slice(&vec![0u8; hashes * 32]);
        let mut frame = BytesMut::new();
        frame.put_u32(body.len() as u32);
        frame.put_slice(&body);
        let got = codec.decode(&mut frame);
        assert!(
            matches!(got, Err(ProtocolError::Malformed(_))),
            "{count} hashes claimed, {hashes} sent: {got:?}"
        );
    }
}

#[test]
fn bad_multicast_credentials_and_states_are_refused() {
    let raw = credentials().encode();
    let mut join = vec![0, 0, 0, 3];
    join.extend_from_slice(&raw);
    assert!(decode_one(frame(0x0e, &join)).unwrap().is_some());
    // Short, long, or naming a group that is not multicast.
    assert!(decode_one(frame(0x0e, &join[..join.len() - 1])).is_err());
    let mut long = join.clone();
    long.push(0);
    assert!(decode_one(frame(0x0e, &long)).is_err());
    let mut unicast = join.clone();
    unicast[4 + 10] = 10;
    assert!(decode_one(frame(0x0e, &unicast)).is_err());
    // A state past the last one.
    let mut status = vec![4u8];
    status.extend_from_slice(&[0; 16]);
    status.extend_from_slice(&[0, 0]);
    assert!(decode_one(frame(0x89, &status)).is_err());
    status[0] = 2;
    assert!(decode_one(frame(0x89, &status)).unwrap().is_some());
}

#[test]
fn a_live_map_with_more_runs_than_the_limit_or_the_frame_is_refused() {
    let mut body = BytesMut::new();
    for s in ["/dev/vda", "/diskferry-live"] {
        body.put_u16(s.len() as u16);
        body.put_slice(s.as_bytes());
    }
    body.put_u32(4096);
    // Claims more runs than the frame holds.
    let mut short = body.clone();
    short.put_u32(1000);
    short.put_u64(0);
    assert!(decode_one(frame(0x8b, &short)).is_err());
    // More runs than any live map may have, all present.
    let mut long = body.clone();
    long.put_u32(MAX_LIVE_EXTENTS as u32 + 1);
    for i in 0..=MAX_LIVE_EXTENTS as u64 {
        long.put_u64(i << 20);
        long.put_u64(4096);
    }
    let err = FrameCodec::new(1 << 20)
        .decode(&mut frame(0x8b, &long))
        .unwrap_err();
    assert!(err.to_string().contains("more than"), "{err}");
    // The encoder refuses to send one.
    let map = LiveMap {
        disk: "/dev/vda".into(),
        path: "/x".into(),
        block_size: 4096,
        runs: vec![
            DiskRun {
                offset: 0,
                len: 4096
            };
            MAX_LIVE_EXTENTS + 1
        ],
    };
    let msg = Message::Reply {
        cookie: 1,
        reply: Reply::LiveMap(map),
    };
    assert!(FrameCodec::new(1 << 20)
        .encode(&msg, &mut BytesMut::new())
        .is_err());
}
