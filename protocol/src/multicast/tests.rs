//! Round trips and hostile datagrams: truncations, bit flips, other sessions, forged kinds.

use super::*;

const SESSION: u64 = 0x1122_3344_5566_7788;
const DATA_KEY: Key = [7u8; 32];
const SECRET: Key = [9u8; 32];

fn key_of(id: u16) -> Option<Key> {
    (id < 4).then(|| report_key(&SECRET, id))
}

fn data_packet(payload: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = encode_data(&mut buf, &DATA_KEY, SESSION, 42, 4096 * 3, payload);
    buf[..n].to_vec()
}

fn reports() -> Vec<ReceiverPacket> {
    let mut full = NackRanges::new();
    for i in 0..MAX_NACK_RANGES as u64 {
        assert!(full.push(SeqRange {
            start: i * 10,
            len: 3
        }));
    }
    assert!(!full.push(SeqRange { start: 1, len: 1 }));
    let mut one = NackRanges::new();
    one.push(SeqRange {
        start: u64::MAX - 5,
        len: 5,
    });
    vec![
        ReceiverPacket::Progress(Progress {
            received: 10,
            missing: 3,
            next_seq: 13,
            loss_ppm: Some(20_000),
        }),
        ReceiverPacket::Progress(Progress {
            received: 0,
            missing: 100,
            next_seq: 0,
            loss_ppm: None,
        }),
        ReceiverPacket::Nack(full),
        ReceiverPacket::Nack(one),
        ReceiverPacket::Done { received: 77 },
    ]
}

fn encoded_report(id: u16, p: &ReceiverPacket) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = encode_report(&mut buf, &report_key(&SECRET, id), SESSION, id, p);
    buf[..n].to_vec()
}

#[test]
fn data_round_trip_at_every_payload_size_fits_the_mtu() {
    for len in [1, 2, 511, 512, 1000, MAX_PAYLOAD] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let d = data_packet(&payload);
        assert!(d.len() <= MAX_DATAGRAM);
        assert_eq!(
            decode_sender(&d, SESSION, &DATA_KEY),
            Ok(SenderPacket::Data {
                seq: 42,
                offset: 4096 * 3,
                payload: &payload
            })
        );
    }
    assert_eq!(DATA_HEADER + MAX_PAYLOAD + MAC_LEN, 1472);
}

#[test]
fn end_round_trip() {
    for finished in [false, true] {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = encode_end(&mut buf, &DATA_KEY, SESSION, 999, finished);
        assert_eq!(
            decode_sender(&buf[..n], SESSION, &DATA_KEY),
            Ok(SenderPacket::End {
                total: 999,
                finished
            })
        );
    }
}

#[test]
fn reports_round_trip_and_fit() {
    for p in reports() {
        let d = encoded_report(3, &p);
        assert!(d.len() <= MAX_DATAGRAM);
        assert_eq!(decode_receiver(&d, SESSION, key_of), Ok((3, p)));
    }
}

#[test]
fn credentials_round_trip_and_refuse_a_unicast_group() {
    let c = Credentials {
        session: SESSION,
        receiver: 3,
        group: "239.1.2.3:5000".parse().unwrap(),
        sender: "10.0.0.1:6000".parse().unwrap(),
        total_packets: 123_456,
        data_key: DATA_KEY,
        report_key: report_key(&SECRET, 3),
    };
    let raw = c.encode();
    assert_eq!(Credentials::decode(&raw), Ok(c.clone()));
    assert!(!format!("{c:?}").contains("7, 7"), "keys stay out of Debug");
    assert_eq!(Credentials::decode(&raw[1..]), Err(Reject::Malformed));
    let mut unicast = c.clone();
    unicast.group = "10.1.2.3:5000".parse().unwrap();
    assert_eq!(
        Credentials::decode(&unicast.encode()),
        Err(Reject::Malformed)
    );
    let mut many = c;
    many.receiver = MAX_RECEIVERS;
    assert_eq!(Credentials::decode(&many.encode()), Err(Reject::Malformed));
}

#[test]
fn every_truncation_and_extension_is_rejected() {
    let mut all = vec![data_packet(&[5u8; 700])];
    all.extend(reports().iter().map(|p| encoded_report(1, p)));
    for d in &all {
        for cut in 0..d.len() {
            assert!(decode_sender(&d[..cut], SESSION, &DATA_KEY).is_err());
            assert!(decode_receiver(&d[..cut], SESSION, key_of).is_err());
        }
        let mut longer = d.clone();
        longer.push(0);
        assert!(decode_sender(&longer, SESSION, &DATA_KEY).is_err());
        assert!(decode_receiver(&longer, SESSION, key_of).is_err());
    }
    assert_eq!(
        decode_sender(&[0u8; MAX_DATAGRAM + 1], SESSION, &DATA_KEY),
        Err(Reject::TooLong)
    );
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let mut all = vec![data_packet(&[5u8; 100])];
    all.extend(reports().iter().map(|p| encoded_report(2, p)));
    for d in &all {
        for bit in 0..d.len() * 8 {
            let mut f = d.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_sender(&f, SESSION, &DATA_KEY).is_err(), "bit {bit}");
            assert!(decode_receiver(&f, SESSION, key_of).is_err(), "bit {bit}");
        }
    }
}

#[test]
fn random_garbage_never_decodes() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; MAX_DATAGRAM + 8];
    for round in 0..20_000 {
        let len = (round * 7) % buf.len();
        for b in buf.iter_mut().take(len) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        // A valid-looking header half the time, so the MAC check is what refuses it.
        if round % 2 == 0 && len >= HEADER {
            buf[..4].copy_from_slice(b"DFMC");
            buf[4] = VERSION;
            buf[8..16].copy_from_slice(&SESSION.to_be_bytes());
        }
        assert!(decode_sender(&buf[..len], SESSION, &DATA_KEY).is_err());
        assert!(decode_receiver(&buf[..len], SESSION, key_of).is_err());
    }
}

#[test]
fn other_sessions_keys_and_directions_are_rejected() {
    let d = data_packet(&[1u8; 64]);
    assert_eq!(
        decode_sender(&d, SESSION + 1, &DATA_KEY),
        Err(Reject::OtherSession)
    );
    assert_eq!(decode_sender(&d, SESSION, &[8u8; 32]), Err(Reject::BadMac));
    // A data packet offered as a report, and a report offered as sender traffic.
    assert!(decode_receiver(&d, SESSION, key_of).is_err());
    let r = encoded_report(1, &ReceiverPacket::Done { received: 1 });
    assert!(decode_sender(&r, SESSION, &DATA_KEY).is_err());
    // A receiver signing as another: receiver 1's key with receiver 2's id.
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = encode_report(
        &mut buf,
        &report_key(&SECRET, 1),
        SESSION,
        2,
        &ReceiverPacket::Done { received: 1 },
    );
    assert_eq!(
        decode_receiver(&buf[..n], SESSION, key_of),
        Err(Reject::BadMac)
    );
    // A receiver the session does not know.
    let r = encoded_report(9, &ReceiverPacket::Done { received: 1 });
    assert_eq!(
        decode_receiver(&r, SESSION, key_of),
        Err(Reject::UnknownReceiver)
    );
    // A receiver holding the data key cannot forge a sender's report-kind datagram either.
    let n = encode_report(
        &mut buf,
        &DATA_KEY,
        SESSION,
        0,
        &ReceiverPacket::Done { received: 1 },
    );
    assert!(decode_sender(&buf[..n], SESSION, &DATA_KEY).is_err());
}

#[test]
fn absurd_nack_counts_and_ranges_are_rejected_even_when_signed() {
    // Hand-built NACK bodies with a valid MAC: the bounds, not the MAC, must refuse them.
    let key = report_key(&SECRET, 1);
    let sign = |body: &[u8]| {
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut w = Writer::new(&mut buf);
        w.header(KIND_NACK, 1, SESSION);
        w.bytes(body);
        let n = w.seal(&key);
        buf[..n].to_vec()
    };
    // count 0, count 65 (with bytes for 65 ranges), count 255 with too few bytes.
    assert_eq!(
        decode_receiver(&sign(&[0]), SESSION, key_of),
        Err(Reject::Malformed)
    );
    let mut many = vec![65u8];
    many.extend(std::iter::repeat_n([0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1], 65).flatten());
    assert_eq!(
        decode_receiver(&sign(&many), SESSION, key_of),
        Err(Reject::Malformed)
    );
    assert_eq!(
        decode_receiver(&sign(&[255, 1, 2, 3]), SESSION, key_of),
        Err(Reject::Malformed)
    );
    // A zero-length range and a range wrapping past u64::MAX.
    let mut zero = vec![1u8];
    zero.extend([0u8; 12]);
    assert_eq!(
        decode_receiver(&sign(&zero), SESSION, key_of),
        Err(Reject::Malformed)
    );
    let mut wrap = vec![1u8];
    wrap.extend(u64::MAX.to_be_bytes());
    wrap.extend(2u32.to_be_bytes());
    assert_eq!(
        decode_receiver(&sign(&wrap), SESSION, key_of),
        Err(Reject::Malformed)
    );
}

#[test]
fn empty_data_payloads_are_rejected_even_when_signed() {
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut w = Writer::new(&mut buf);
    w.header(KIND_DATA, 0, SESSION);
    w.u64(1);
    w.u64(0);
    let n = w.seal(&DATA_KEY);
    assert_eq!(
        decode_sender(&buf[..n], SESSION, &DATA_KEY),
        Err(Reject::Malformed)
    );
}
