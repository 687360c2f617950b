//! The multicast data path's datagrams: the codec only, no I/O.
//!
//! One sender streams a session's packets to a UDP multicast group; receivers (agents that
//! joined the group when their authenticated control connection told them to) report back to
//! the sender by unicast. Every datagram is
//!
//! ```text
//! "DFMC" | version u8 | kind u8 | receiver u16 | session u64 | body | mac [16]
//! ```
//!
//! big-endian like the rest of the wire, and at most [`MAX_DATAGRAM`] bytes: a 1500-byte MTU
//! minus the IPv4 and UDP headers, so no datagram is ever fragmented. The MAC is keyed BLAKE3
//! over everything before it, truncated to 16 bytes. Sender packets ([`SenderPacket`]: data,
//! end) are keyed with the session's data key, which every receiver holds; each receiver's
//! packets ([`ReceiverPacket`]: progress, NACK, done) with that receiver's own report key,
//! derived by the sender from a secret receivers never see ([`report_key`]), so one member of
//! a session cannot speak for another. The keys, the group and the session's size reach each
//! receiver over its Noise connection as [`Credentials`].
//!
//! Decoding is bounded: a datagram longer than [`MAX_DATAGRAM`], a NACK with more than
//! [`MAX_NACK_RANGES`] ranges, an empty or oversized payload, a bad MAC or another session's
//! packet is a [`Reject`] (which callers count), never a panic or an allocation.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest datagram: a 1500-byte Ethernet MTU minus 20 bytes of IPv4 and 8 of UDP header.
pub const MAX_DATAGRAM: usize = 1472;
/// Bytes of the common header.
pub const HEADER: usize = 16;
/// Bytes of the truncated MAC closing every datagram.
pub const MAC_LEN: usize = 16;
/// Bytes of a data packet before its payload (header, sequence, offset).
pub const DATA_HEADER: usize = HEADER + 16;
/// Payload bytes of a full data packet: what fits in [`MAX_DATAGRAM`].
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - DATA_HEADER - MAC_LEN;
/// Most missing ranges one NACK carries.
pub const MAX_NACK_RANGES: usize = 64;
/// Most receivers one session serves (receiver ids are below this).
pub const MAX_RECEIVERS: u16 = 1024;
/// The only version this build speaks.
pub const VERSION: u8 = 1;

const MAGIC: [u8; 4] = *b"DFMC";
const KIND_DATA: u8 = 0x01;
const KIND_END: u8 = 0x02;
const KIND_PROGRESS: u8 = 0x10;
const KIND_NACK: u8 = 0x11;
const KIND_DONE: u8 = 0x12;
/// The loss field's value when a report has no loss sample.
const NO_LOSS_SAMPLE: u32 = u32::MAX;

/// A 32-byte BLAKE3 key.
pub type Key = [u8; 32];

/// The report key of receiver `receiver`, derived from the session's report secret (held by
/// the sender alone).
pub fn report_key(secret: &Key, receiver: u16) -> Key {
    let mut material = [0u8; 34];
    material[..32].copy_from_slice(secret);
    material[32..].copy_from_slice(&receiver.to_be_bytes());
    blake3::derive_key("diskferry multicast report key v1", &material)
}

/// Why a datagram was dropped. Every one is counted by the side that received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("shorter than a header and a MAC")]
    TooShort,
    #[error("longer than {MAX_DATAGRAM} bytes")]
    TooLong,
    #[error("not a diskferry multicast datagram")]
    BadMagic,
    #[error("unknown version")]
    BadVersion,
    #[error("unknown or misdirected kind")]
    BadKind,
    #[error("another session's datagram")]
    OtherSession,
    #[error("unknown receiver")]
    UnknownReceiver,
    #[error("MAC does not match")]
    BadMac,
    #[error("malformed body")]
    Malformed,
}

/// What the sender multicasts (or unicasts, for a repair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderPacket<'a> {
    /// Packet `seq` of the session: `payload` belongs at byte `offset` of the disk.
    Data {
        seq: u64,
        offset: u64,
        payload: &'a [u8],
    },
    /// The first pass is over: the session has `total` packets; everything a receiver lacks is
    /// missing. With `finished`, the session is over for everyone.
    End { total: u64, finished: bool },
}

/// One missing range of packet sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    pub start: u64,
    pub len: u32,
}

impl SeqRange {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(u64::from(self.len))
    }
}

/// A bounded list of missing ranges, stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackRanges {
    ranges: [SeqRange; MAX_NACK_RANGES],
    count: u8,
}

impl NackRanges {
    pub fn new() -> NackRanges {
        NackRanges {
            ranges: [SeqRange { start: 0, len: 0 }; MAX_NACK_RANGES],
            count: 0,
        }
    }

    /// Adds a range; false when the list is full (the range is not added).
    pub fn push(&mut self, range: SeqRange) -> bool {
        if usize::from(self.count) == MAX_NACK_RANGES {
            return false;
        }
        self.ranges[usize::from(self.count)] = range;
        self.count += 1;
        true
    }

    pub fn as_slice(&self) -> &[SeqRange] {
        &self.ranges[..usize::from(self.count)]
    }

    pub fn is_full(&self) -> bool {
        usize::from(self.count) == MAX_NACK_RANGES
    }
}

impl Default for NackRanges {
    fn default() -> Self {
        NackRanges::new()
    }
}

/// A receiver's state, sent every report interval (the first one says "joined").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Packets held.
    pub received: u64,
    /// Packets still missing.
    pub missing: u64,
    /// The next sequence number after the highest one seen (0 before any).
    pub next_seq: u64,
    /// Share of the first-pass packets lost in the last interval, in parts per million; `None`
    /// when too few packets arrived to tell.
    pub loss_ppm: Option<u32>,
}

/// What a receiver sends to the sender.
// A NACK's ranges are inline (1 KiB) so decoding a hostile datagram never allocates.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverPacket {
    Progress(Progress),
    /// These ranges are missing, please resend.
    Nack(NackRanges),
    /// Every packet is on the disk, flushed.
    Done {
        received: u64,
    },
}

/// What the control connection hands one receiver before a session: enough to join, verify
/// and report. Encoded with [`Credentials::encode`] as a fixed [`Credentials::LEN`] bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub session: u64,
    pub receiver: u16,
    /// The multicast group and port to join.
    pub group: SocketAddrV4,
    /// Where reports go (the sender's socket).
    pub sender: SocketAddrV4,
    /// Packets in the session.
    pub total_packets: u64,
    pub data_key: Key,
    pub report_key: Key,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("session", &self.session)
            .field("receiver", &self.receiver)
            .field("group", &self.group)
            .field("sender", &self.sender)
            .field("total_packets", &self.total_packets)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Encoded length.
    pub const LEN: usize = 8 + 2 + 6 + 6 + 8 + 32 + 32;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut w = Writer::new(&mut out);
        w.u64(self.session);
        w.u16(self.receiver);
        w.addr(self.group);
        w.addr(self.sender);
        w.u64(self.total_packets);
        w.bytes(&self.data_key);
        w.bytes(&self.report_key);
        out
    }

    /// Decodes exactly [`Credentials::LEN`] bytes; the group must be a multicast address and
    /// the receiver id below [`MAX_RECEIVERS`].
    pub fn decode(raw: &[u8]) -> Result<Credentials, Reject> {
        if raw.len() != Self::LEN {
            return Err(Reject::Malformed);
        }
        let mut r = Reader::new(raw);
        let c = Credentials {
            session: r.u64()?,
            receiver: r.u16()?,
            group: r.addr()?,
            sender: r.addr()?,
            total_packets: r.u64()?,
            data_key: r.key()?,
            report_key: r.key()?,
        };
        if !c.group.ip().is_multicast() || c.receiver >= MAX_RECEIVERS {
            return Err(Reject::Malformed);
        }
        Ok(c)
    }
}

/// Writes data packet `seq` into `buf` (at least [`MAX_DATAGRAM`] bytes) and returns its
/// length. Panics if `payload` is empty or longer than [`MAX_PAYLOAD`]: the sender's own bug.
pub fn encode_data(
    buf: &mut [u8],
    key: &Key,
    session: u64,
    seq: u64,
    offset: u64,
    payload: &[u8],
) -> usize {
    assert!(!payload.is_empty() && payload.len() <= MAX_PAYLOAD);
    let mut w = Writer::new(buf);
    w.header(KIND_DATA, 0, session);
    w.u64(seq);
    w.u64(offset);
    w.bytes(payload);
    w.seal(key)
}

/// Writes an end packet into `buf` and returns its length.
pub fn encode_end(buf: &mut [u8], key: &Key, session: u64, total: u64, finished: bool) -> usize {
    let mut w = Writer::new(buf);
    w.header(KIND_END, 0, session);
    w.u64(total);
    w.u8(u8::from(finished));
    w.seal(key)
}

/// Writes a receiver's packet into `buf` (at least [`MAX_DATAGRAM`] bytes) and returns its
/// length.
pub fn encode_report(
    buf: &mut [u8],
    key: &Key,
    session: u64,
    receiver: u16,
    packet: &ReceiverPacket,
) -> usize {
    let mut w = Writer::new(buf);
    match packet {
        ReceiverPacket::Progress(p) => {
            w.header(KIND_PROGRESS, receiver, session);
            w.u64(p.received);
            w.u64(p.missing);
            w.u64(p.next_seq);
            w.u32(
                p.loss_ppm
                    .map_or(NO_LOSS_SAMPLE, |l| l.min(NO_LOSS_SAMPLE - 1)),
            );
        }
        ReceiverPacket::Nack(ranges) => {
            w.header(KIND_NACK, receiver, session);
            w.u8(ranges.count);
            for r in ranges.as_slice() {
                w.u64(r.start);
                w.u32(r.len);
            }
        }
        ReceiverPacket::Done { received } => {
            w.header(KIND_DONE, receiver, session);
            w.u64(*received);
        }
    }
    w.seal(key)
}

/// Decodes a datagram that should come from the sender of `session`.
pub fn decode_sender<'a>(
    datagram: &'a [u8],
    session: u64,
    key: &Key,
) -> Result<SenderPacket<'a>, Reject> {
    let (kind, receiver, body) = open(datagram, session, |_, _| Some(*key))?;
    if receiver != 0 {
        return Err(Reject::Malformed);
    }
    let mut r = Reader::new(body);
    let packet = match kind {
        KIND_DATA => {
            let seq = r.u64()?;
            let offset = r.u64()?;
            let payload = r.rest();
            if payload.is_empty() || payload.len() > MAX_PAYLOAD {
                return Err(Reject::Malformed);
            }
            SenderPacket::Data {
                seq,
                offset,
                payload,
            }
        }
        KIND_END => {
            let total = r.u64()?;
            let finished = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(Reject::Malformed),
            };
            SenderPacket::End { total, finished }
        }
        _ => return Err(Reject::BadKind),
    };
    r.finish()?;
    Ok(packet)
}

/// Decodes a datagram that should come from a receiver of `session`; `key_of` gives a
/// receiver's report key (`None`: no such receiver). Returns the receiver id and its packet.
pub fn decode_receiver(
    datagram: &[u8],
    session: u64,
    key_of: impl Fn(u16) -> Option<Key>,
) -> Result<(u16, ReceiverPacket), Reject> {
    let (kind, receiver, body) = open(datagram, session, |_, id| key_of(id))?;
    let mut r = Reader::new(body);
    let packet = match kind {
        KIND_PROGRESS => {
            let received = r.u64()?;
            let missing = r.u64()?;
            let next_seq = r.u64()?;
            let loss = r.u32()?;
            ReceiverPacket::Progress(Progress {
                received,
                missing,
                next_seq,
                loss_ppm: (loss != NO_LOSS_SAMPLE).then_some(loss),
            })
        }
        KIND_NACK => {
            let count = usize::from(r.u8()?);
            if count == 0 || count > MAX_NACK_RANGES {
                return Err(Reject::Malformed);
            }
            let mut ranges = NackRanges::new();
            for _ in 0..count {
                let start = r.u64()?;
                let len = r.u32()?;
                if len == 0 || start.checked_add(u64::from(len)).is_none() {
                    return Err(Reject::Malformed);
                }
                ranges.push(SeqRange { start, len });
            }
            ReceiverPacket::Nack(ranges)
        }
        KIND_DONE => ReceiverPacket::Done { received: r.u64()? },
        _ => return Err(Reject::BadKind),
    };
    r.finish()?;
    Ok((receiver, packet))
}

/// Checks the framing, session and MAC; returns the kind, receiver field and body.
fn open(
    datagram: &[u8],
    session: u64,
    key_of: impl Fn(u8, u16) -> Option<Key>,
) -> Result<(u8, u16, &[u8]), Reject> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Reject::TooLong);
    }
    if datagram.len() < HEADER + MAC_LEN {
        return Err(Reject::TooShort);
    }
    if datagram[..4] != MAGIC {
        return Err(Reject::BadMagic);
    }
    if datagram[4] != VERSION {
        return Err(Reject::BadVersion);
    }
    let kind = datagram[5];
    let receiver = u16::from_be_bytes([datagram[6], datagram[7]]);
    let their_session = u64::from_be_bytes(datagram[8..16].try_into().expect("8 bytes"));
    if their_session != session {
        return Err(Reject::OtherSession);
    }
    let from_receiver = kind >= KIND_PROGRESS;
    if from_receiver && receiver >= MAX_RECEIVERS {
        return Err(Reject::UnknownReceiver);
    }
    let key = key_of(kind, receiver).ok_or(Reject::UnknownReceiver)?;
    let (signed, mac) = datagram.split_at(datagram.len() - MAC_LEN);
    if !same(&mac_of(&key, signed), mac) {
        return Err(Reject::BadMac);
    }
    Ok((kind, receiver, &signed[HEADER..]))
}

fn mac_of(key: &Key, signed: &[u8]) -> [u8; MAC_LEN] {
    let full = blake3::keyed_hash(key, signed);
    full.as_bytes()[..MAC_LEN].try_into().expect("16 bytes")
}

/// Constant-time comparison of two MACs.
fn same(a: &[u8; MAC_LEN], b: &[u8]) -> bool {
    b.len() == MAC_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bounded big-endian writer over a caller's buffer (sized by the caller: [`MAX_DATAGRAM`]).
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, at: 0 }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
    fn addr(&mut self, a: SocketAddrV4) {
        self.bytes(&a.ip().octets());
        self.u16(a.port());
    }
    fn header(&mut self, kind: u8, receiver: u16, session: u64) {
        self.bytes(&MAGIC);
        self.u8(VERSION);
        self.u8(kind);
        self.u16(receiver);
        self.u64(session);
    }
    /// Appends the MAC over everything written; returns the datagram's length.
    fn seal(mut self, key: &Key) -> usize {
        let mac = mac_of(key, &self.buf[..self.at]);
        self.bytes(&mac);
        self.at
    }
}

/// Bounded big-endian reader: running short is [`Reject::Malformed`].
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Reject> {
        if self.buf.len() < N {
            return Err(Reject::Malformed);
        }
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        Ok(head.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, Reject> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Reject> {
        self.take().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, Reject> {
        self.take().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, Reject> {
        self.take().map(u64::from_be_bytes)
    }
    fn key(&mut self) -> Result<Key, Reject> {
        self.take()
    }
    fn addr(&mut self) -> Result<SocketAddrV4, Reject> {
        let ip: [u8; 4] = self.take()?;
        Ok(SocketAddrV4::new(Ipv4Addr::from(ip), self.u16()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn finish(&self) -> Result<(), Reject> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Reject::Malformed)
        }
    }
}

#[cfg(test)]
mod tests;
