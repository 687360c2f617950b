//! The agent's side of a multicast deploy: join the group the server named, write what
//! arrives into the disk, ask for what is missing, say when everything is there.
//!
//! The server hands the agent a [`Credentials`] over its authenticated connection (group,
//! session id, keys, the session's packet count); [`receive`] then runs to completion on the
//! calling thread (the agent runs it on a blocking thread: a plain socket loop with a read
//! timeout, no runtime needed) and returns a [`Report`], or an error the server answers by
//! falling back to a unicast deploy. The decisions live in [`State`] (no I/O, unit tested);
//! this module owns the socket, the disk writes (contiguous packets coalesced into writes of up
//! to [`WRITE_BATCH`]) and the clock. Disks are written through the small [`TargetDisk`] trait:
//! the agent's `LocalDisk`, or memory in tests.

mod missing;
mod session;
mod state;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;

use diskferry_localdisk::LocalDisk;
use diskferry_protocol::multicast::{encode_report, Credentials, ReceiverPacket, MAX_DATAGRAM};
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrIn};

pub use missing::{MissingSet, Taken};
pub use session::{idle, Receiving};
pub use state::{Action, Options, State, Stats, NACK_BUDGET};

/// Largest write the receiver issues (contiguous packets are gathered up to this).
pub const WRITE_BATCH: usize = 1 << 20;
/// The socket receive buffer asked for: about a quarter of a second at 1 Gbit/s, so a receiver
/// descheduled for a moment (a busy agent, a loaded host) does not lose the burst.
pub const RECV_BUFFER: usize = 32 << 20;

/// Where received data goes.
pub trait TargetDisk {
    fn size(&self) -> u64;
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the writes durable.
    fn flush(&self) -> io::Result<()>;
}

impl TargetDisk for LocalDisk {
    fn size(&self) -> u64 {
        LocalDisk::size(self)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.sync()
    }
}

/// A disk in memory (tests, and a dry run).
#[derive(Debug)]
pub struct MemoryDisk(pub Mutex<Vec<u8>>);

impl MemoryDisk {
    pub fn new(size: usize) -> MemoryDisk {
        MemoryDisk(Mutex::new(vec![0; size]))
    }
}

impl TargetDisk for MemoryDisk {
    fn size(&self) -> u64 {
        self.0.lock().expect("memory disk").len() as u64
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = self.0.lock().expect("memory disk");
        let at = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = at
            .checked_add(data.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        disk.get_mut(at..end)
            .ok_or(io::ErrorKind::InvalidInput)?
            .copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the receiver listens.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// The local interface address to join the group on (`None`: the kernel's choice by
    /// route).
    pub interface: Option<Ipv4Addr>,
}

/// Why a session ended without every packet on the disk.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("multicast socket ({op}): {source}")]
    Socket { op: &'static str, source: io::Error },
    #[error("writing the disk at offset {offset}: {source}")]
    Disk { offset: u64, source: io::Error },
    #[error("nothing valid from the sender for {0:?}")]
    SenderSilent(Duration),
    #[error("the sender ended the session with {missing} packets missing here")]
    Dropped { missing: u64 },
    #[error("stopped")]
    Stopped,
}

fn socket_err(op: &'static str) -> impl FnOnce(io::Error) -> ReceiveError {
    move |source| ReceiveError::Socket { op, source }
}

/// What a finished receiver did.
#[derive(Debug, Clone)]
pub struct Report {
    pub stats: Stats,
    pub elapsed: Duration,
    /// The socket receive buffer the kernel granted.
    pub recv_buffer: usize,
}

/// Shared with whoever watches a running receiver: `stop` ends it early, `received` counts
/// the packets held so far.
#[derive(Debug, Default)]
pub struct Control {
    pub stop: AtomicBool,
    pub received: AtomicU64,
}

/// A receiver that has joined its group and not yet received anything.
#[derive(Debug)]
pub struct Joined {
    creds: Credentials,
    socket: UdpSocket,
    recv_buffer: usize,
    started: Instant,
}

impl Joined {
    /// Binds the group's port, joins the group and sizes the receive buffer: once this
    /// returns, every datagram the sender multicasts reaches the socket.
    pub fn join(creds: &Credentials, network: &Network) -> Result<Joined, ReceiveError> {
        let started = Instant::now();
        let (socket, recv_buffer) = join(creds, network)?;
        Ok(Joined {
            creds: creds.clone(),
            socket,
            recv_buffer,
            started,
        })
    }

    /// Receives into `disk` until every packet is written and flushed and the sender has
    /// heard so (or the linger time passed).
    pub fn run(
        self,
        disk: &dyn TargetDisk,
        options: Options,
        control: &Control,
    ) -> Result<Report, ReceiveError> {
        run(self, disk, options, control)
    }
}

/// Joins the session's group and receives into `disk` until every packet is written and
/// flushed and the sender has heard so (or the linger time passed). `control.stop` ends it
/// early.
pub fn receive(
    creds: &Credentials,
    disk: &dyn TargetDisk,
    network: &Network,
    options: Options,
    control: &Control,
) -> Result<Report, ReceiveError> {
    Joined::join(creds, network)?.run(disk, options, control)
}

fn run(
    joined: Joined,
    disk: &dyn TargetDisk,
    options: Options,
    control: &Control,
) -> Result<Report, ReceiveError> {
    let Joined {
        creds,
        socket,
        recv_buffer,
        started,
    } = joined;
    let mut state = State::new(creds.clone(), disk.size(), options.clone(), started);
    let mut writer = Coalescer::default();
    let mut batch = Batch::new();
    let mut reports = Vec::new();
    let mut next_report = started;
    loop {
        if control.stop.load(Ordering::Relaxed) {
            return Err(ReceiveError::Stopped);
        }
        let now = Instant::now();
        if now >= next_report {
            let held = creds.total_packets - state.missing();
            control.received.store(held, Ordering::Relaxed);
            if !state.is_complete() {
                writer.flush(disk)?;
            }
            send_reports(&socket, &mut state, now, &mut reports)?;
            next_report = now + options.report_interval;
        }
        if state.is_complete() && (state.finished_seen() || state.lingered(now)) {
            break;
        }
        if state.finished_seen() && !state.is_complete() {
            return Err(ReceiveError::Dropped {
                missing: state.missing(),
            });
        }
        if now.duration_since(state.last_valid()) > options.sender_silence {
            return Err(ReceiveError::SenderSilent(options.sender_silence));
        }
        let n = match batch.recv(&socket) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(socket_err("receive")(e)),
        };
        for i in 0..n {
            let was_complete = state.is_complete();
            if let Action::Write { offset, data } = state.on_datagram(batch.datagram(i), now) {
                writer.push(disk, offset, data)?;
            }
            if state.is_complete() && !was_complete {
                // Durable before saying so.
                writer.flush(disk)?;
                disk.flush()
                    .map_err(|source| ReceiveError::Disk { offset: 0, source })?;
                next_report = now;
            }
        }
    }
    control
        .received
        .store(creds.total_packets, Ordering::Relaxed);
    Ok(Report {
        stats: state.stats().clone(),
        elapsed: started.elapsed(),
        recv_buffer,
    })
}

/// Binds the group's port, joins the group, sizes the receive buffer.
fn join(creds: &Credentials, network: &Network) -> Result<(UdpSocket, usize), ReceiveError> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, creds.group.port()))
        .map_err(socket_err("bind"))?;
    socket
        .join_multicast_v4(
            creds.group.ip(),
            &network.interface.unwrap_or(Ipv4Addr::UNSPECIFIED),
        )
        .map_err(socket_err("join the group"))?;
    // Root may exceed net.core.rmem_max; anyone else gets what the limit allows.
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(&socket, RECV_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&socket, RECV_BUFFER);
    }
    let granted = sockopt::get_socket_recv_buffer_size(&socket).unwrap_or(0);
    socket
        .set_read_timeout(Some(Duration::from_millis(10)))
        .map_err(socket_err("set a timeout"))?;
    Ok((socket, granted))
}

fn send_reports(
    socket: &UdpSocket,
    state: &mut State,
    now: Instant,
    reports: &mut Vec<ReceiverPacket>,
) -> Result<(), ReceiveError> {
    reports.clear();
    state.reports(now, reports);
    let creds = state.credentials().clone();
    let mut out = [0u8; MAX_DATAGRAM];
    for report in reports.iter() {
        let n = encode_report(
            &mut out,
            &creds.report_key,
            creds.session,
            creds.receiver,
            report,
        );
        match socket.send_to(&out[..n], SocketAddr::V4(creds.sender)) {
            Ok(_) => {}
            // A full queue or an unreachable sender: the next interval tries again.
            Err(e) => tracing::debug!("multicast report not sent: {e}"),
        }
    }
    Ok(())
}

/// Datagrams received [`RECV_BATCH`] at a time with one `recvmmsg` (a per-datagram
/// `recv_from` cost a receiver most of its CPU at 1 Gbit/s on a loaded host).
struct Batch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    headers: MultiHeaders<SockaddrIn>,
}

/// Datagrams one receive call takes at most.
const RECV_BATCH: usize = 32;

impl Batch {
    fn new() -> Batch {
        Batch {
            // One byte more than a datagram may hold: a longer one shows as too long.
            bufs: vec![vec![0u8; MAX_DATAGRAM + 1]; RECV_BATCH],
            lens: vec![0; RECV_BATCH],
            headers: MultiHeaders::preallocate(RECV_BATCH, None),
        }
    }

    /// Waits (the socket's read timeout) for at least one datagram and takes what is queued,
    /// up to [`RECV_BATCH`]; returns how many.
    fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
            self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let got = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )
        .map_err(io::Error::from)?;
        let mut n = 0;
        for (len, msg) in self.lens.iter_mut().zip(got) {
            *len = msg.bytes;
            n += 1;
        }
        Ok(n)
    }

    /// Datagram `i` of the last receive.
    fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i].min(MAX_DATAGRAM + 1)]
    }
}

/// Gathers contiguous payloads into one write of up to [`WRITE_BATCH`] bytes.
#[derive(Debug, Default)]
struct Coalescer {
    buf: Vec<u8>,
    offset: u64,
}

impl Coalescer {
    fn push(
        &mut self,
        disk: &dyn TargetDisk,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ReceiveError> {
        let contiguous = self.offset + self.buf.len() as u64 == offset;
        if !self.buf.is_empty() && (!contiguous || self.buf.len() + data.len() > WRITE_BATCH) {
            self.flush(disk)?;
        }
        if self.buf.is_empty() {
            self.offset = offset;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self, disk: &dyn TargetDisk) -> Result<(), ReceiveError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        disk.write_at(&self.buf, self.offset)
            .map_err(|source| ReceiveError::Disk {
                offset: self.offset,
                source,
            })?;
        self.buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
