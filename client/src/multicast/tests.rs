//! The receiver's state machine driven by hand-made datagrams.

use std::time::{Duration, Instant};

use diskferry_protocol::multicast::{
    encode_data, encode_end, Credentials, ReceiverPacket, SeqRange, MAX_DATAGRAM,
};

use super::*;

const SESSION: u64 = 77;
const PAYLOAD: usize = 100;

fn creds(total: u64) -> Credentials {
    Credentials {
        session: SESSION,
        receiver: 2,
        group: "239.9.9.9:4000".parse().unwrap(),
        sender: "10.0.0.1:4001".parse().unwrap(),
        total_packets: total,
        data_key: [3u8; 32],
        report_key: [4u8; 32],
    }
}

fn data(seq: u64) -> Vec<u8> {
    data_at(
        seq,
        seq * PAYLOAD as u64,
        &[seq as u8; PAYLOAD],
        &[3u8; 32],
        SESSION,
    )
}

fn data_at(seq: u64, offset: u64, payload: &[u8], key: &[u8; 32], session: u64) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = encode_data(&mut buf, key, session, seq, offset, payload);
    buf[..n].to_vec()
}

fn end(total: u64, finished: bool) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = encode_end(&mut buf, &[3u8; 32], SESSION, total, finished);
    buf[..n].to_vec()
}

fn state(total: u64) -> (State, Instant) {
    let now = Instant::now();
    let disk = total * PAYLOAD as u64;
    (State::new(creds(total), disk, Options::default(), now), now)
}

fn nacks(reports: &[ReceiverPacket]) -> Vec<(u64, u64)> {
    reports
        .iter()
        .filter_map(|r| match r {
            ReceiverPacket::Nack(n) => Some(n.as_slice().to_vec()),
            _ => None,
        })
        .flatten()
        .map(|r: SeqRange| (r.start, r.end()))
        .collect()
}

#[test]
fn in_order_packets_are_written_and_end_in_done() {
    let (mut s, now) = state(5);
    for seq in 0..5 {
        let d = data(seq);
        assert_eq!(
            s.on_datagram(&d, now),
            Action::Write {
                offset: seq * PAYLOAD as u64,
                data: &[seq as u8; PAYLOAD][..]
            }
        );
    }
    assert!(s.is_complete());
    assert_eq!(s.on_datagram(&data(3), now), Action::Nothing);
    assert_eq!(s.stats().duplicates, 1);
    let mut out = Vec::new();
    s.reports(now, &mut out);
    assert_eq!(out, vec![ReceiverPacket::Done { received: 5 }]);
    assert!(!s.lingered(now));
    assert!(s.lingered(now + Duration::from_secs(3)));
}

#[test]
fn nacks_cover_gaps_below_the_highest_seen_then_the_tail_after_end() {
    let (mut s, now) = state(20);
    for seq in [0, 1, 4, 5, 9] {
        s.on_datagram(&data(seq), now);
    }
    let mut out = Vec::new();
    s.reports(now, &mut out);
    assert_eq!(nacks(&out), vec![(2, 4), (6, 9)]);
    match out[0] {
        ReceiverPacket::Progress(p) => {
            assert_eq!((p.received, p.missing, p.next_seq), (5, 15, 10));
            // 5 lost of 10 first-pass packets is below the sample minimum: no loss figure.
            assert_eq!(p.loss_ppm, None);
        }
        ref other => panic!("{other:?}"),
    }
    // The same ranges are not asked again before the hold-off.
    out.clear();
    s.reports(now + Duration::from_millis(50), &mut out);
    assert_eq!(nacks(&out), vec![]);
    // After the end marker, the tail is missing too; a new round starts after the hold-off.
    s.on_datagram(&end(20, false), now);
    out.clear();
    s.reports(now + Duration::from_millis(100), &mut out);
    assert_eq!(nacks(&out), vec![(10, 20)]);
    out.clear();
    s.reports(now + Duration::from_millis(600), &mut out);
    assert_eq!(nacks(&out), vec![(2, 4), (6, 9), (10, 20)]);
}

#[test]
fn one_nack_is_bounded_in_ranges_and_packets() {
    let total = 100_000;
    let (mut s, now) = state(total);
    for seq in (0..total).step_by(2) {
        s.on_datagram(&data(seq), now);
    }
    let mut out = Vec::new();
    s.reports(now, &mut out);
    let first = nacks(&out);
    assert_eq!(first.len(), 64);
    // The next interval continues where the last stopped, without waiting for a new round.
    out.clear();
    s.reports(now + Duration::from_millis(50), &mut out);
    let second = nacks(&out);
    assert_eq!(second[0].0, first[63].1 + 1);

    let (mut s, now) = state(total);
    s.on_datagram(&end(total, false), now);
    out.clear();
    s.reports(now, &mut out);
    assert_eq!(nacks(&out), vec![(0, NACK_BUDGET)]);
}

#[test]
fn loss_is_measured_on_the_first_pass_only() {
    let (mut s, now) = state(1000);
    // 1 packet in 10 lost over 500 packets.
    for seq in (0..500).filter(|s| s % 10 != 9) {
        s.on_datagram(&data(seq), now);
    }
    let mut out = Vec::new();
    s.reports(now, &mut out);
    let ReceiverPacket::Progress(p) = out[0] else {
        panic!()
    };
    // The last lost packet (499) is not known yet: 49 of 499.
    assert_eq!(p.loss_ppm, Some(49 * 1_000_000 / 499));
    // Repairs of old packets are not first-pass traffic: no new sample.
    for seq in (9..499).step_by(10) {
        s.on_datagram(&data(seq), now);
    }
    out.clear();
    s.reports(now, &mut out);
    let ReceiverPacket::Progress(p) = out[0] else {
        panic!()
    };
    assert_eq!(p.loss_ppm, None);
}

#[test]
fn hostile_datagrams_are_counted_and_ignored() {
    let total = 10;
    let (mut s, now) = state(total);
    let disk = total * PAYLOAD as u64;
    let attacks = [
        data_at(1, 0, &[1; 10], &[9u8; 32], SESSION), // wrong key
        data_at(1, 0, &[1; 10], &[3u8; 32], SESSION + 1), // other session
        data(total),                                  // sequence past the total
        data_at(1, disk - 5, &[1; 10], &[3u8; 32], SESSION), // runs past the disk
        data_at(1, u64::MAX - 3, &[1; 10], &[3u8; 32], SESSION), // offset overflow
        end(total + 1, true),                         // a different session size
        vec![0u8; 3],
        vec![0xffu8; MAX_DATAGRAM + 1],
    ];
    for a in &attacks {
        assert_eq!(s.on_datagram(a, now), Action::Nothing);
    }
    assert_eq!(s.stats().rejected, 4);
    assert_eq!(s.stats().out_of_range, 4);
    assert_eq!(s.missing(), total);
    assert!(!s.finished_seen());
}

#[test]
fn the_test_drop_knob_drops_about_its_share() {
    let total = 20_000;
    let now = Instant::now();
    let options = Options {
        test_drop_percent: 2,
        ..Options::default()
    };
    let mut s = State::new(creds(total), total * PAYLOAD as u64, options, now);
    for seq in 0..total {
        s.on_datagram(&data(seq), now);
    }
    let dropped = s.stats().test_dropped;
    assert!((250..550).contains(&dropped), "{dropped} of {total}");
    assert_eq!(s.missing(), dropped);
}

#[test]
fn the_coalescer_writes_contiguous_runs_once() {
    struct Counting(MemoryDisk, std::sync::atomic::AtomicUsize);
    impl TargetDisk for Counting {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn write_at(&self, d: &[u8], o: u64) -> std::io::Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.write_at(d, o)
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let disk = Counting(MemoryDisk::new(10_000), Default::default());
    let mut c = Coalescer::default();
    for i in 0..10u64 {
        c.push(&disk, i * 100, &[i as u8 + 1; 100]).unwrap();
    }
    c.push(&disk, 5000, &[0xaa; 100]).unwrap();
    c.flush(&disk).unwrap();
    assert_eq!(disk.1.load(std::sync::atomic::Ordering::Relaxed), 2);
    let bytes = disk.0 .0.lock().unwrap();
    assert_eq!(bytes[0], 1);
    assert_eq!(bytes[999], 10);
    assert_eq!(bytes[1000], 0);
    assert_eq!(&bytes[5000..5100], &[0xaa; 100][..]);
    drop(bytes);
    assert!(MemoryDisk::new(10).write_at(&[1; 5], 8).is_err());
}
