//! The receiver's state machine, free of I/O: datagrams in, disk writes and reports out.
//!
//! It authenticates each datagram ([`diskferry_protocol::multicast`]), checks it against the
//! session (sequence below the total, offset and length inside the disk), tracks what is
//! missing ([`MissingSet`]), measures first-pass loss, and decides which reports are due:
//! progress every interval, NACKs for the missing ranges it knows of (those below the highest
//! sequence seen, or all of them once the sender said its first pass is over), and "done" once
//! nothing is missing.
//!
//! NACK pacing: each interval asks for up to [`MAX_NACK_RANGES`] ranges and
//! [`NACK_BUDGET`] packets, walking forward from a cursor; when the walk reaches the end of
//! what it knows is missing, a new round starts from the beginning, but not before
//! `nack_holdoff` after the previous round started, so a repair in flight is not asked for
//! twice.

use std::time::{Duration, Instant};

use diskferry_protocol::multicast::{
    decode_sender, Credentials, NackRanges, Progress, ReceiverPacket, SenderPacket, SeqRange,
    MAX_NACK_RANGES,
};

use super::missing::{MissingSet, Taken};

/// Most packets one NACK asks for (about 5.8 MB).
pub const NACK_BUDGET: u64 = 4096;
/// Fewest first-pass packets in an interval for a loss sample.
const LOSS_SAMPLE_MIN: u64 = 64;

/// How a receiver behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often progress and NACKs go out.
    pub report_interval: Duration,
    /// Minimum time between two NACK rounds over the same ranges.
    pub nack_holdoff: Duration,
    /// The sender is given up on after this long without a valid datagram.
    pub sender_silence: Duration,
    /// How long a complete receiver keeps saying "done" without hearing that the session is over.
    pub linger: Duration,
    /// Most intervals the missing set keeps (see [`MissingSet`]).
    pub max_ranges: usize,
    /// **Test only.** Drops this many percent of the authenticated data packets, as if the
    /// link had lost them (netem is not available where the loss test runs). 0 in production.
    pub test_drop_percent: u8,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            report_interval: Duration::from_millis(50),
            nack_holdoff: Duration::from_millis(500),
            sender_silence: Duration::from_secs(10),
            linger: Duration::from_secs(2),
            max_ranges: 1 << 16,
            test_drop_percent: 0,
        }
    }
}

/// What to do with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Write `data` at `offset` of the disk.
    Write { offset: u64, data: &'a [u8] },
    /// Nothing (a duplicate, a rejected or a deliberately dropped datagram, an end marker).
    Nothing,
}

/// Counters for the receiver's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub data_packets: u64,
    pub duplicates: u64,
    pub deferred: u64,
    pub bytes_written: u64,
    /// Authenticated packets whose sequence or disk range lies outside the session.
    pub out_of_range: u64,
    /// Datagrams that failed to decode (bad MAC, other session, malformed …).
    pub rejected: u64,
    pub test_dropped: u64,
    pub nacks: u64,
    pub nacked_packets: u64,
}

/// One receiver's session state.
#[derive(Debug)]
pub struct State {
    creds: Credentials,
    disk_size: u64,
    options: Options,
    missing: MissingSet,
    next_seq: u64,
    end_seen: bool,
    finished_seen: bool,
    window_lost: u64,
    window_seen: u64,
    cursor: u64,
    round_started: Option<Instant>,
    last_valid: Instant,
    done_at: Option<Instant>,
    rng: u64,
    stats: Stats,
}

impl State {
    pub fn new(creds: Credentials, disk_size: u64, options: Options, now: Instant) -> State {
        let missing = MissingSet::new(creds.total_packets, options.max_ranges);
        let rng = (creds.session ^ (u64::from(creds.receiver) << 48)) | 1;
        State {
            creds,
            disk_size,
            options,
            missing,
            next_seq: 0,
            end_seen: false,
            finished_seen: false,
            window_lost: 0,
            window_seen: 0,
            cursor: 0,
            round_started: None,
            last_valid: now,
            done_at: None,
            rng,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Every packet is held.
    pub fn is_complete(&self) -> bool {
        self.missing.missing() == 0
    }

    /// Packets still missing.
    pub fn missing(&self) -> u64 {
        self.missing.missing()
    }

    /// The sender said the session is over.
    pub fn finished_seen(&self) -> bool {
        self.finished_seen
    }

    /// When the last valid datagram came.
    pub fn last_valid(&self) -> Instant {
        self.last_valid
    }

    /// Handles one datagram.
    pub fn on_datagram<'a>(&mut self, datagram: &'a [u8], now: Instant) -> Action<'a> {
        match decode_sender(datagram, self.creds.session, &self.creds.data_key) {
            Ok(SenderPacket::Data {
                seq,
                offset,
                payload,
            }) => self.on_data(seq, offset, payload, now),
            Ok(SenderPacket::End { total, finished }) => {
                if total != self.creds.total_packets {
                    self.stats.out_of_range += 1;
                    return Action::Nothing;
                }
                self.last_valid = now;
                self.end_seen = true;
                self.finished_seen |= finished;
                Action::Nothing
            }
            Err(_) => {
                self.stats.rejected += 1;
                Action::Nothing
            }
        }
    }

    fn on_data<'a>(&mut self, seq: u64, offset: u64, data: &'a [u8], now: Instant) -> Action<'a> {
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.disk_size);
        if seq >= self.creds.total_packets || !inside {
            self.stats.out_of_range += 1;
            return Action::Nothing;
        }
        self.last_valid = now;
        if self.test_drop() {
            self.stats.test_dropped += 1;
            return Action::Nothing;
        }
        self.stats.data_packets += 1;
        if seq >= self.next_seq {
            self.window_lost += seq - self.next_seq;
            self.window_seen += 1;
            self.next_seq = seq + 1;
        }
        match self.missing.take(seq) {
            Taken::New => {}
            Taken::Duplicate => {
                self.stats.duplicates += 1;
                return Action::Nothing;
            }
            Taken::Deferred => self.stats.deferred += 1,
        }
        self.stats.bytes_written += data.len() as u64;
        Action::Write { offset, data }
    }

    /// The test-only random drop (xorshift; no dependency for a test knob).
    fn test_drop(&mut self) -> bool {
        if self.options.test_drop_percent == 0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % 100 < u64::from(self.options.test_drop_percent)
    }

    /// The reports due at `now` (call once per report interval), appended to `out`.
    pub fn reports(&mut self, now: Instant, out: &mut Vec<ReceiverPacket>) {
        if self.is_complete() {
            self.done_at.get_or_insert(now);
            out.push(ReceiverPacket::Done {
                received: self.creds.total_packets,
            });
            return;
        }
        out.push(ReceiverPacket::Progress(self.progress()));
        if let Some(nack) = self.nack(now) {
            out.push(ReceiverPacket::Nack(nack));
        }
    }

    /// Whether the receiver has said "done" long enough without hearing the session end.
    pub fn lingered(&self, now: Instant) -> bool {
        self.done_at
            .is_some_and(|t| now.duration_since(t) >= self.options.linger)
    }

    fn progress(&mut self) -> Progress {
        let sampled = self.window_lost + self.window_seen;
        let loss_ppm =
            (sampled >= LOSS_SAMPLE_MIN).then(|| (self.window_lost * 1_000_000 / sampled) as u32);
        if sampled >= LOSS_SAMPLE_MIN {
            self.window_lost = 0;
            self.window_seen = 0;
        }
        Progress {
            received: self.creds.total_packets - self.missing.missing(),
            missing: self.missing.missing(),
            next_seq: self.next_seq,
            loss_ppm,
        }
    }

    /// The next NACK of the current round, if any range is due.
    fn nack(&mut self, now: Instant) -> Option<NackRanges> {
        let limit = if self.end_seen {
            self.creds.total_packets
        } else {
            self.next_seq
        };
        self.round_started.get_or_insert(now);
        if self.missing.ranges_in(self.cursor, limit).next().is_none() {
            let due = self
                .round_started
                .is_some_and(|t| now.duration_since(t) >= self.options.nack_holdoff);
            if !due {
                return None;
            }
            self.cursor = 0;
            self.round_started = Some(now);
        }
        let mut ranges = NackRanges::new();
        let mut budget = NACK_BUDGET;
        for (start, end) in self.missing.ranges_in(self.cursor, limit) {
            let len = (end - start).min(budget);
            ranges.push(SeqRange {
                start,
                len: len as u32,
            });
            budget -= len;
            self.cursor = start + len;
            if budget == 0 || ranges.is_full() {
                break;
            }
        }
        if ranges.as_slice().is_empty() {
            return None;
        }
        self.stats.nacks += 1;
        self.stats.nacked_packets += NACK_BUDGET - budget;
        Some(ranges)
    }
}

const _: () = assert!(MAX_NACK_RANGES <= u8::MAX as usize);
