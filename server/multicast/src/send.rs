//! The session loop: reads the plan's packets from the device, paces them onto the group,
//! listens to receivers, repairs, drops the silent, ends when every live receiver is done.
//!
//! One task owns the decisions; a blocking reader feeds the first pass in ~1 MiB chunks
//! through a bounded channel, repairs are read on demand (at most [`REPAIR_READ`] packets at a
//! time), and a second task decodes reports (its queue is bounded; a full queue drops reports,
//! which receivers repeat every interval anyway).

use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::BlockDevice;
use diskferry_protocol::multicast::{
    decode_receiver, encode_data, encode_end, Key, ReceiverPacket, MAX_DATAGRAM, MAX_PAYLOAD,
};
use nix::sys::socket::sockopt::UdpGsoSegment;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::rate::{RateControl, TokenBucket};
use crate::repair::{RepairQueue, Target};
use crate::{
    MulticastError, Outcome, Plan, ReceiverReport, Session, SessionConfig, SessionKeys,
    SessionReport,
};

/// Packets per first-pass read (about 1 MiB).
const CHUNK_PACKETS: u64 = 736;
/// Most packets one repair read covers.
const REPAIR_READ: u64 = 256;
/// Bytes a datagram costs on the wire beyond its UDP payload (IPv4, UDP, Ethernet headers).
const WIRE_OVERHEAD: u64 = 20 + 8 + 14;
/// Reports waiting to be handled at most.
const REPORT_QUEUE: usize = 8192;
/// Socket send buffer asked for.
const SEND_BUFFER: usize = 4 << 20;
/// First-pass datagrams handed to the kernel in one send with UDP GSO (`UDP_SEGMENT`): it
/// cuts the buffer into datagrams of [`MAX_DATAGRAM`] bytes itself, so the send path, the
/// qdisc and a bridge handle one buffer instead of 44 (44 × 1472 fits a 64 KiB UDP payload).
const GSO_SEGMENTS: usize = 44;

/// The session's socket, its address, and whether the kernel takes GSO sends on it.
pub(crate) fn open_socket(
    config: &crate::SessionConfig,
) -> Result<(UdpSocket, SocketAddrV4, bool), MulticastError> {
    let err = |op| move |source| MulticastError::Socket { op, source };
    let socket =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err("create"))?;
    socket
        .bind(&SocketAddr::V4(config.bind).into())
        .map_err(err("bind"))?;
    socket
        .set_multicast_if_v4(config.bind.ip())
        .map_err(err("choose the interface"))?;
    socket
        .set_multicast_ttl_v4(config.ttl)
        .map_err(err("set the TTL"))?;
    socket
        .set_multicast_loop_v4(false)
        .map_err(err("disable loopback"))?;
    let _ = socket.set_send_buffer_size(SEND_BUFFER);
    let segment = MAX_DATAGRAM as i32;
    let gso = nix::sys::socket::setsockopt(&socket, UdpGsoSegment, &segment).is_ok();
    socket.set_nonblocking(true).map_err(err("non-blocking"))?;
    let std: std::net::UdpSocket = socket.into();
    let local = match std.local_addr().map_err(err("local address"))? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
    };
    let socket = UdpSocket::from_std(std).map_err(err("register"))?;
    Ok((socket, local, gso))
}

/// One receiver as the sender sees it.
#[derive(Debug)]
struct Slot {
    addr: Option<SocketAddr>,
    last_heard: Instant,
    heard: bool,
    outcome: Option<Outcome>,
    loss_sample: Option<u32>,
    last_loss: Option<u32>,
    unicast_bytes: u64,
    nacked: u64,
}

/// A first-pass chunk: packets `first..` from disk bytes at `offset`.
#[derive(Debug)]
struct Chunk {
    first: u64,
    offset: u64,
    data: Vec<u8>,
    next: usize,
}

impl Chunk {
    /// The next packet: (seq, offset, payload range in `data`).
    fn next_packet(&mut self) -> Option<(u64, u64, std::ops::Range<usize>)> {
        if self.next >= self.data.len() {
            return None;
        }
        let i = self.next / MAX_PAYLOAD;
        let end = (self.next + MAX_PAYLOAD).min(self.data.len());
        let range = self.next..end;
        self.next = end;
        Some((
            self.first + i as u64,
            self.offset + range.start as u64,
            range,
        ))
    }
}

/// A report from the report task.
#[derive(Debug)]
struct Heard {
    id: u16,
    packet: ReceiverPacket,
    from: SocketAddr,
    at: Instant,
}

pub(crate) struct Runner {
    config: SessionConfig,
    keys: SessionKeys,
    socket: Arc<UdpSocket>,
    device: Arc<dyn BlockDevice>,
    plan: Arc<Plan>,
    slots: Vec<Slot>,
    rate: RateControl,
    bucket: TokenBucket,
    repairs: RepairQueue,
    /// Repair runs waiting for their data: (first seq, end seq, target).
    repair_runs: VecDeque<(u64, u64, Target)>,
    /// The repair data being sent.
    repair_chunk: Option<(Chunk, Target)>,
    multicast_repair_bytes: u64,
    rejected: Arc<AtomicU64>,
    started: Instant,
    buf: Box<[u8; MAX_DATAGRAM]>,
    /// GSO sends work on this socket (turned off at the first failure).
    gso: bool,
    batch: Vec<u8>,
}

impl Runner {
    pub(crate) fn new(session: Session, device: Arc<dyn BlockDevice>, plan: Arc<Plan>) -> Runner {
        let now = Instant::now();
        let Session {
            config,
            keys,
            socket,
            local: _,
            gso,
        } = session;
        let slots = (0..config.receivers)
            .map(|_| Slot {
                addr: None,
                last_heard: now,
                heard: false,
                outcome: None,
                loss_sample: None,
                last_loss: None,
                unicast_bytes: 0,
                nacked: 0,
            })
            .collect();
        let rate = RateControl::new(config.rate.clone(), now);
        let repairs = RepairQueue::new(config.max_repair_packets);
        Runner {
            config,
            keys,
            // Shared with the report task.
            socket: Arc::new(socket),
            device,
            plan,
            slots,
            rate,
            bucket: TokenBucket::new(now),
            repairs,
            repair_runs: VecDeque::new(),
            repair_chunk: None,
            multicast_repair_bytes: 0,
            rejected: Arc::new(AtomicU64::new(0)),
            started: now,
            buf: Box::new([0u8; MAX_DATAGRAM]),
            gso,
            batch: vec![0u8; GSO_SEGMENTS * MAX_DATAGRAM],
        }
    }

    pub(crate) async fn run(mut self) -> Result<SessionReport, MulticastError> {
        let mut reports = self.spawn_report_task();
        self.wait_for_joins(&mut reports).await;
        let mut chunks = spawn_reader(Arc::clone(&self.device), Arc::clone(&self.plan));
        let mut main: Option<Chunk> = None;
        let mut first_pass_over = self.plan.total_packets() == 0;
        let config = self.config.clone();
        let mut next_rate = Instant::now() + config.rate_interval;
        let mut next_end = Instant::now();
        loop {
            let now = Instant::now();
            while let Ok(heard) = reports.try_recv() {
                self.on_report(heard);
            }
            self.drop_silent(now);
            if self.live().next().is_none() {
                break;
            }
            if now >= next_rate {
                let worst = self.worst_loss();
                self.rate.on_interval(now, worst);
                next_rate = now + config.rate_interval;
            }
            if first_pass_over && now >= next_end {
                self.send_end(false).await?;
                next_end = now + config.end_interval;
            }
            if self.send_repair().await? {
                continue;
            }
            if !first_pass_over {
                if main.is_none() {
                    main = match chunks.recv().await {
                        Some(chunk) => Some(chunk?),
                        None => {
                            first_pass_over = true;
                            continue;
                        }
                    };
                }
                if !self.send_batch(main.as_mut().expect("a chunk")).await? {
                    main = None;
                }
                continue;
            }
            // Nothing to send: wait for a report or the next timer.
            tokio::select! {
                heard = reports.recv() => if let Some(h) = heard { self.on_report(h) },
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        for _ in 0..3 {
            self.send_end(true).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(self.report())
    }

    fn spawn_report_task(&self) -> mpsc::Receiver<Heard> {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let socket = Arc::clone(&self.socket);
        let session = self.config.session;
        let keys: Vec<Key> = (0..self.config.receivers)
            .map(|id| self.keys.report_key(id))
            .collect();
        let rejected = Arc::clone(&self.rejected);
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            loop {
                let (n, from) = match socket.recv_from(&mut buf).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!("multicast report socket: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                match decode_receiver(&buf[..n], session, |id| keys.get(usize::from(id)).copied()) {
                    Ok((id, packet)) => {
                        let heard = Heard {
                            id,
                            packet,
                            from,
                            at: Instant::now(),
                        };
                        match tx.try_send(heard) {
                            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                    Err(_) => {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        rx
    }

    /// Waits until every receiver has reported once, or the join timeout.
    async fn wait_for_joins(&mut self, reports: &mut mpsc::Receiver<Heard>) {
        let deadline = tokio::time::Instant::now() + self.config.join_timeout;
        while self.slots.iter().any(|s| !s.heard) {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(heard)) => self.on_report(heard),
                _ => break,
            }
        }
        let joined = self.slots.iter().filter(|s| s.heard).count();
        tracing::info!(joined, of = self.slots.len(), "multicast session starts");
        // Silence is measured from here: slow joiners get the full timeout.
        let now = Instant::now();
        for s in self.slots.iter_mut().filter(|s| !s.heard) {
            s.last_heard = now;
        }
    }

    fn on_report(&mut self, heard: Heard) {
        let total = self.plan.total_packets();
        let Some(slot) = self.slots.get_mut(usize::from(heard.id)) else {
            return;
        };
        if slot.outcome == Some(Outcome::Dropped) {
            return;
        }
        slot.addr = Some(heard.from);
        slot.last_heard = slot.last_heard.max(heard.at);
        slot.heard = true;
        match heard.packet {
            ReceiverPacket::Progress(p) => {
                if p.loss_ppm.is_some() {
                    slot.loss_sample = p.loss_ppm;
                    slot.last_loss = p.loss_ppm;
                }
            }
            ReceiverPacket::Nack(ranges) if slot.outcome.is_none() => {
                for r in ranges.as_slice() {
                    slot.nacked += u64::from(r.len);
                    self.repairs.request(heard.id, r.start, r.end(), total);
                }
            }
            ReceiverPacket::Nack(_) => {}
            ReceiverPacket::Done { received } => {
                if received == total && slot.outcome.is_none() {
                    slot.outcome = Some(Outcome::Done);
                    tracing::info!(receiver = heard.id, "multicast receiver done");
                }
            }
        }
    }

    fn drop_silent(&mut self, now: Instant) {
        let timeout = self.config.receiver_timeout;
        for (id, s) in self.slots.iter_mut().enumerate() {
            if s.outcome.is_none() && now.duration_since(s.last_heard) > timeout {
                s.outcome = Some(Outcome::Dropped);
                tracing::warn!(
                    receiver = id,
                    ?timeout,
                    "multicast receiver silent: dropped"
                );
            }
        }
    }

    /// Receivers still being served.
    fn live(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.outcome.is_none())
    }

    /// The worst loss sample since the last interval among live receivers (samples consumed).
    fn worst_loss(&mut self) -> Option<u32> {
        self.slots
            .iter_mut()
            .filter(|s| s.outcome.is_none())
            .filter_map(|s| s.loss_sample.take())
            .max()
    }

    /// Sends the next repair packet if one is due; false when there is none.
    async fn send_repair(&mut self) -> Result<bool, MulticastError> {
        loop {
            if let Some((chunk, target)) = self.repair_chunk.as_mut() {
                let target = *target;
                if let Some((seq, offset, range)) = chunk.next_packet() {
                    let data = std::mem::take(&mut chunk.data);
                    let sent = self
                        .send_repair_packet(seq, offset, &data[range], target)
                        .await;
                    if let Some((chunk, _)) = self.repair_chunk.as_mut() {
                        chunk.data = data;
                    }
                    sent?;
                    return Ok(true);
                }
                self.repair_chunk = None;
            }
            if self.repair_runs.is_empty() {
                if self.repairs.is_empty() {
                    return Ok(false);
                }
                let slots = &self.slots;
                let batch = self.repairs.batch(|id| {
                    slots
                        .get(usize::from(id))
                        .is_some_and(|s| s.outcome.is_none())
                });
                self.repair_runs
                    .extend(batch.into_iter().map(|r| (r.start, r.end, r.target)));
                continue;
            }
            let (start, end, target) = self.repair_runs.pop_front().expect("a run");
            let runs = self.plan.runs(start, end.min(start + REPAIR_READ));
            let Some(&(first, offset, len)) = runs.first() else {
                continue;
            };
            let piece_end = runs.get(1).map_or(end.min(start + REPAIR_READ), |r| r.0);
            if piece_end < end {
                self.repair_runs.push_front((piece_end, end, target));
            }
            if let Target::Unicast(id) = target {
                if self.slots[usize::from(id)].outcome.is_some() {
                    continue;
                }
            }
            let chunk = read_chunk(Arc::clone(&self.device), first, offset, len).await?;
            self.repair_chunk = Some((chunk, target));
        }
    }

    /// Paces, seals and sends one repair packet to the group or to one receiver.
    async fn send_repair_packet(
        &mut self,
        seq: u64,
        offset: u64,
        payload: &[u8],
        target: Target,
    ) -> Result<(), MulticastError> {
        let config = &self.config;
        let n = encode_data(
            &mut self.buf[..],
            &self.keys.data,
            config.session,
            seq,
            offset,
            payload,
        );
        let dest = match target {
            Target::Unicast(id) => {
                let slot = &mut self.slots[usize::from(id)];
                let Some(addr) = slot.addr else {
                    return Ok(());
                };
                slot.unicast_bytes += payload.len() as u64;
                addr
            }
            Target::Multicast => {
                self.multicast_repair_bytes += payload.len() as u64;
                SocketAddr::V4(config.group)
            }
        };
        self.pace(n as u64 + WIRE_OVERHEAD).await;
        self.send(n, dest).await
    }

    /// Sends the chunk's next first-pass datagrams: up to [`GSO_SEGMENTS`] in one GSO send
    /// (only the last may be short), one without GSO. False when the chunk is used up.
    async fn send_batch(&mut self, chunk: &mut Chunk) -> Result<bool, MulticastError> {
        let most = if self.gso { GSO_SEGMENTS } else { 1 };
        let (mut len, mut count) = (0, 0);
        while count < most {
            let Some((seq, offset, range)) = chunk.next_packet() else {
                break;
            };
            let n = encode_data(
                &mut self.batch[len..len + MAX_DATAGRAM],
                &self.keys.data,
                self.config.session,
                seq,
                offset,
                &chunk.data[range],
            );
            len += n;
            count += 1;
            if n < MAX_DATAGRAM {
                break;
            }
        }
        if count == 0 {
            return Ok(false);
        }
        self.pace(len as u64 + count as u64 * WIRE_OVERHEAD).await;
        let group = SocketAddr::V4(self.config.group);
        match self.socket.send_to(&self.batch[..len], group).await {
            Ok(_) => Ok(true),
            Err(e) if count > 1 => {
                tracing::warn!("GSO send failed ({e}); sending datagrams one by one");
                self.gso = false;
                for start in (0..len).step_by(MAX_DATAGRAM) {
                    let end = (start + MAX_DATAGRAM).min(len);
                    self.socket
                        .send_to(&self.batch[start..end], group)
                        .await
                        .map_err(|source| MulticastError::Socket { op: "send", source })?;
                }
                Ok(true)
            }
            Err(source) => Err(MulticastError::Socket { op: "send", source }),
        }
    }

    async fn send_end(&mut self, finished: bool) -> Result<(), MulticastError> {
        let config = &self.config;
        let n = encode_end(
            &mut self.buf[..],
            &self.keys.data,
            config.session,
            self.plan.total_packets(),
            finished,
        );
        let group = SocketAddr::V4(config.group);
        self.send(n, group).await
    }

    async fn send(&self, n: usize, dest: SocketAddr) -> Result<(), MulticastError> {
        match self.socket.send_to(&self.buf[..n], dest).await {
            Ok(_) => Ok(()),
            // A unicast repair to a vanished receiver: its timeout will drop it.
            Err(e) if matches!(dest, SocketAddr::V4(a) if !a.ip().is_multicast()) => {
                tracing::debug!(%dest, "repair not sent: {e}");
                Ok(())
            }
            Err(source) => Err(MulticastError::Socket { op: "send", source }),
        }
    }

    async fn pace(&mut self, bytes: u64) {
        let rate = self.rate.rate();
        let burst = (rate / 200).max(64 << 10);
        while let Some(wait) = self.bucket.take(Instant::now(), bytes, rate, burst) {
            tokio::time::sleep(wait).await;
        }
    }

    fn report(self) -> SessionReport {
        SessionReport {
            receivers: self
                .slots
                .iter()
                .enumerate()
                .map(|(id, s)| ReceiverReport {
                    id: id as u16,
                    outcome: s.outcome.clone().unwrap_or(Outcome::Dropped),
                    unicast_bytes: s.unicast_bytes,
                    nacked_packets: s.nacked,
                    last_loss_ppm: s.last_loss,
                })
                .collect(),
            packets: self.plan.total_packets(),
            bytes: self.plan.bytes(),
            multicast_repair_bytes: self.multicast_repair_bytes,
            elapsed: self.started.elapsed(),
            rate_history: self.rate.history().to_vec(),
            rejected: self.rejected.load(Ordering::Relaxed),
            repair_overflow: self.repairs.refused(),
        }
    }
}

/// Reads `len` bytes at `offset` on a blocking thread, as the chunk of packets from `first`.
async fn read_chunk(
    device: Arc<dyn BlockDevice>,
    first: u64,
    offset: u64,
    len: u64,
) -> Result<Chunk, MulticastError> {
    tokio::task::spawn_blocking(move || read_blocking(&*device, first, offset, len))
        .await
        .map_err(|e| MulticastError::Socket {
            op: "read task",
            source: std::io::Error::other(e.to_string()),
        })?
}

fn read_blocking(
    device: &dyn BlockDevice,
    first: u64,
    offset: u64,
    len: u64,
) -> Result<Chunk, MulticastError> {
    let mut data = vec![0u8; len as usize];
    device.read_at(&mut data, offset)?;
    Ok(Chunk {
        first,
        offset,
        data,
        next: 0,
    })
}

/// Reads the first pass in order on a blocking thread, [`CHUNK_PACKETS`] packets at a time,
/// a few chunks ahead of the sender.
fn spawn_reader(
    device: Arc<dyn BlockDevice>,
    plan: Arc<Plan>,
) -> mpsc::Receiver<Result<Chunk, MulticastError>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let step = CHUNK_PACKETS * MAX_PAYLOAD as u64;
        for &(offset, len, first) in plan.extents() {
            let mut from = 0;
            while from < len {
                let n = step.min(len - from);
                let chunk = read_blocking(
                    &*device,
                    first + from / MAX_PAYLOAD as u64,
                    offset + from,
                    n,
                );
                let failed = chunk.is_err();
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
                from += n;
            }
        }
    });
    rx
}
