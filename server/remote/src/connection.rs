//! One authenticated connection to a diskferry-client, shared by every disk opened on it.
//!
//! Requests get a fresh cookie and a completion callback; a writer task batches them onto the
//! socket and a reader task matches replies to callbacks by cookie, in whatever order they come.
//! When the connection dies, every pending and every later request fails with the reason.
//! With compression negotiated, the writer compresses write payloads while it pays and the
//! reader decompresses replies within the negotiated limit; a peer that lies about a payload's
//! size (a decompression bomb) closes the connection with the protocol error as the reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diskferry_protocol::compress::Codec;
use diskferry_protocol::handshake::{initiate, respond};
use diskferry_protocol::stream::split;
use diskferry_protocol::{
    DiskInfo, LiveMap, Message, ProtocolError, PublicKey, Reply, Request, SessionOptions,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::RemoteOptions;
use diskferry_blockdev::{BlockError, CancelFlag};

use crate::RemoteDisk;

/// Requests are batched into one socket write until this many bytes are queued.
const WRITE_BATCH: usize = 1 << 20;
/// How long closing waits for the peer to take our last bytes.
const GOODBYE: Duration = Duration::from_secs(5);

/// Called once with the reply to a request (or the reason there will be none).
pub type Completion = Box<dyn FnOnce(Result<Reply, BlockError>) + Send>;

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "cannot connect to {addr}: {source} (is diskferry-client running and listening there?)"
    )]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: ProtocolError },
}

struct State {
    pending: HashMap<u64, Completion>,
    /// Set once the connection is dead: why.
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Becomes true when the connection dies.
    dead: tokio::sync::watch::Sender<bool>,
    next_cookie: AtomicU64,
    max_payload: u32,
    /// The protocol version both sides speak.
    version: u16,
    /// The codec both sides offered: writes go compressed while it pays, replies may come so.
    compression: Option<Codec>,
    peer: String,
    /// The peer's static key, proven by the handshake.
    peer_key: PublicKey,
    /// Our end of the transport, when it is a socket: the address the peer reached us at.
    local: Option<std::net::SocketAddr>,
    /// When the peer last made progress: a frame arrived, or a request was sent while none
    /// was outstanding.
    progress: Mutex<Instant>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead and fails everything pending (with the first reason given).
    fn close(&self, reason: String) {
        let (reason, drained) = {
            let mut st = self.lock();
            let reason = st.closed.get_or_insert(reason).clone();
            (
                reason,
                st.pending
                    .drain()
                    .map(|(_, c)| c)
                    .collect::<Vec<Completion>>(),
            )
        };
        for c in drained {
            c(Err(BlockError::Disconnected(reason.clone())));
        }
        self.dead.send_replace(true);
    }
}

/// A handle on a live connection; cheap to clone. The connection closes when the last handle
/// (including those inside opened disks) is dropped.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Message>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to a listening client and authenticates. Must run inside a tokio runtime.
    pub async fn connect(addr: &str, opts: &SessionOptions) -> Result<Connection, ConnectError> {
        let mut stream =
            TcpStream::connect(addr)
                .await
                .map_err(|source| ConnectError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        let session =
            initiate(&mut stream, opts)
                .await
                .map_err(|source| ConnectError::Handshake {
                    addr: addr.to_string(),
                    source,
                })?;
        let local = stream.local_addr().ok();
        Ok(Connection::start(
            stream,
            session,
            addr.to_string(),
            opts.reply_timeout,
            local,
        ))
    }

    /// Authenticates a client that connected to us (dial-back mode) over `io`, whose local
    /// end is `local` when it is a socket; also returns the credential it presented (an
    /// enrollment token, or nothing).
    pub async fn accept<S>(
        mut io: S,
        opts: &SessionOptions,
        peer: String,
        local: Option<std::net::SocketAddr>,
    ) -> Result<(Connection, Vec<u8>), ConnectError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut session =
            respond(&mut io, opts)
                .await
                .map_err(|source| ConnectError::Handshake {
                    addr: peer.clone(),
                    source,
                })?;
        let credential = std::mem::take(&mut session.credential);
        Ok((
            Connection::start(io, session, peer, opts.reply_timeout, local),
            credential,
        ))
    }

    /// Our address on the connection's socket: where the peer reached us (a multicast
    /// session's sender binds it, so agents' reports come back the way they connected).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.local
    }

    /// The peer's static key, as the handshake proved it.
    pub fn peer_key(&self) -> PublicKey {
        self.shared.peer_key
    }

    fn start<S>(
        io: S,
        session: diskferry_protocol::Session,
        peer: String,
        reply_timeout: Duration,
        local: Option<std::net::SocketAddr>,
    ) -> Connection
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
            }),
            dead: tokio::sync::watch::channel(false).0,
            next_cookie: AtomicU64::new(1),
            max_payload: session.max_payload,
            version: session.version,
            compression: session.compression,
            peer,
            peer_key: session.peer_key,
            local,
            progress: Mutex::new(Instant::now()),
        });
        tokio::spawn(watch_stalls(Arc::downgrade(&shared), reply_timeout));
        let (r, w) = tokio::io::split(io);
        let (mut reader, mut writer) = split(session, r, w);
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();

        let ws = Arc::clone(&shared);
        let mut dead = shared.dead.subscribe();
        tokio::spawn(async move {
            let result = async {
                while let Some(first) = rx.recv().await {
                    writer.queue(&first)?;
                    while writer.pending() < WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(m) => writer.queue(&m)?,
                            Err(_) => break,
                        }
                    }
                    writer.flush().await?;
                }
                // Every handle is gone: say goodbye, but never wait long for a peer that
                // does not read.
                let _ = tokio::time::timeout(GOODBYE, writer.shutdown()).await;
                Ok::<(), ProtocolError>(())
            };
            let reason = tokio::select! {
                r = result => match r {
                    Ok(()) => format!("the connection to {} was closed", ws.peer),
                    Err(e) => format!("sending to {}: {e}", ws.peer),
                },
                _ = dead.wait_for(|d| *d) => return,
            };
            ws.close(reason);
        });

        let rs = Arc::clone(&shared);
        let mut dead = shared.dead.subscribe();
        tokio::spawn(async move {
            let reason = loop {
                let next = tokio::select! {
                    next = reader.next() => next,
                    // Closed on our side (stall, every handle dropped): stop reading.
                    _ = dead.wait_for(|d| *d) => return,
                };
                *rs.progress.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                match next {
                    Ok(Some(Message::Reply { cookie, reply })) => {
                        let completion = rs.lock().pending.remove(&cookie);
                        match completion {
                            Some(c) => c(Ok(reply)),
                            None => break format!("{} answered unknown request {cookie}", rs.peer),
                        }
                    }
                    Ok(Some(Message::Request { .. })) => {
                        break format!("{} sent a request; it must only answer", rs.peer)
                    }
                    Ok(None) => break format!("{} closed the connection", rs.peer),
                    Err(e) => break format!("{}: {e}", rs.peer),
                }
            };
            rs.close(reason);
        });
        Connection { shared, tx }
    }

    /// Resolves when the connection has died (the peer left, or the transport failed).
    pub async fn closed(&self) {
        let mut rx = self.shared.dead.subscribe();
        let _ = rx.wait_for(|dead| *dead).await;
    }

    /// Why the connection died, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.lock().closed.clone()
    }

    /// Largest data payload either side accepts in one frame.
    pub fn max_payload(&self) -> u32 {
        self.shared.max_payload
    }

    /// The protocol version the handshake settled on.
    pub fn version(&self) -> u16 {
        self.shared.version
    }

    /// The wire compression the handshake settled on, if any.
    pub fn compression(&self) -> Option<Codec> {
        self.shared.compression
    }

    /// The address of the client.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Sends a request; `done` runs with its reply (on the connection's task: keep it short).
    pub fn submit(&self, request: Request, done: Completion) {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                let reason = reason.clone();
                drop(st);
                done(Err(BlockError::Disconnected(reason)));
                return;
            }
            if st.pending.is_empty() {
                // The wait for this reply starts now, not at the last frame of an idle link.
                *self
                    .shared
                    .progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Instant::now();
            }
            st.pending.insert(cookie, done);
        }
        if self.tx.send(Message::Request { cookie, request }).is_err() {
            self.shared.close("the connection's writer stopped".into());
        }
    }

    /// Sends a request; the receiver yields its reply.
    pub fn request(&self, request: Request) -> oneshot::Receiver<Result<Reply, BlockError>> {
        let (tx, rx) = oneshot::channel();
        self.submit(
            request,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx
    }

    /// Sends a request and waits for its reply, from async code.
    pub async fn call(&self, request: Request) -> Result<Reply, BlockError> {
        self.request(request)
            .await
            .unwrap_or_else(|_| Err(BlockError::Disconnected("request dropped".into())))
    }

    /// Sends a request and waits for its reply, from a blocking thread (never on the runtime).
    pub fn call_blocking(&self, request: Request) -> Result<Reply, BlockError> {
        wait(self.request_sync(request), None)
    }

    /// Sends a request; the receiver, for blocking threads ([`wait`]), yields its reply.
    pub(crate) fn request_sync(&self, request: Request) -> ReplyReceiver {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            request,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx
    }

    /// The disks the client serves.
    pub async fn list_disks(&self) -> Result<Vec<DiskInfo>, BlockError> {
        match self.call(Request::ListDisks).await? {
            Reply::Disks(d) => Ok(d),
            other => Err(unexpected("list disks", None, other)),
        }
    }

    /// Asks the agent to write a UEFI boot entry holding `load_option`, first in the boot
    /// order; returns its number.
    pub async fn set_boot_entry(&self, load_option: Vec<u8>) -> Result<u16, BlockError> {
        let request = Request::SetBootEntry {
            load_option: load_option.into(),
        };
        match self.call(request).await? {
            Reply::BootEntry(n) => Ok(n),
            other => Err(unexpected("set boot entry", None, other)),
        }
    }

    /// Asks a live agent to create and pin its live file of `size` bytes (or answer the map
    /// of the one pinned at that size): where on which disk the file's bytes lie.
    pub async fn live_prepare(&self, size: u64) -> Result<LiveMap, BlockError> {
        match self.call(Request::LivePrepare { size }).await? {
            Reply::LiveMap(map) => Ok(map),
            other => Err(unexpected("prepare the live file", None, other)),
        }
    }

    /// Asks a live agent to unpin and delete its live file.
    pub async fn live_remove(&self) -> Result<(), BlockError> {
        match self.call(Request::LiveRemove).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("remove the live file", None, other)),
        }
    }

    /// The machine's identity document (JSON), from a dial-back agent.
    pub async fn identify(&self) -> Result<String, BlockError> {
        match self.call(Request::Identify).await? {
            Reply::Identity(doc) => Ok(doc),
            other => Err(unexpected("identify", None, other)),
        }
    }

    /// Asks the agent to reboot or power off its machine.
    pub async fn power(&self, action: diskferry_protocol::PowerAction) -> Result<(), BlockError> {
        match self.call(Request::Power { action }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("power", None, other)),
        }
    }

    /// Opens a disk by name.
    pub async fn open(
        &self,
        disk: &str,
        writable: bool,
        opts: RemoteOptions,
    ) -> Result<RemoteDisk, BlockError> {
        match self
            .call(Request::Open {
                disk: disk.to_string(),
                writable,
            })
            .await?
        {
            Reply::Opened {
                handle,
                size,
                logical_sector,
                read_only,
                ..
            } => {
                check_geometry(size, logical_sector)?;
                Ok(RemoteDisk::new(
                    self.clone(),
                    disk.to_string(),
                    handle,
                    size,
                    logical_sector,
                    read_only,
                    opts,
                ))
            }
            other => Err(unexpected("open", None, other)),
        }
    }
}

/// Largest disk a peer may announce: 2^60 bytes (1 EiB), far past any real disk, so offsets
/// computed from it never overflow.
const MAX_DISK_SIZE: u64 = 1 << 60;

/// What a peer says about an opened disk is hostile input: the logical sector must be a power
/// of two from 512 to 4096 (readers divide by it and allocate sectors of it) and the size at
/// most [`MAX_DISK_SIZE`] (a served regular file need not be a whole number of sectors).
fn check_geometry(size: u64, logical_sector: u32) -> Result<(), BlockError> {
    if !logical_sector.is_power_of_two() || !(512..=4096).contains(&logical_sector) {
        return Err(BlockError::Protocol(format!(
            "the client announced a logical sector of {logical_sector} bytes (512 to 4096, a power of two)"
        )));
    }
    if size > MAX_DISK_SIZE {
        return Err(BlockError::Protocol(format!(
            "the client announced a disk of {size} bytes (at most 2^60)"
        )));
    }
    Ok(())
}

/// Where a blocking thread receives one reply.
pub(crate) type ReplyReceiver = std::sync::mpsc::Receiver<Result<Reply, BlockError>>;

/// How often a blocked wait looks at its cancel flag.
pub(crate) const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Blocks the current (non-runtime) thread until a reply arrives, or `cancel` is raised (the
/// reply, if it still comes, is dropped; the connection stays usable).
pub(crate) fn wait(rx: ReplyReceiver, cancel: Option<&CancelFlag>) -> Result<Reply, BlockError> {
    let dropped = || Err(BlockError::Disconnected("request dropped".into()));
    let Some(cancel) = cancel else {
        return rx.recv().unwrap_or_else(|_| dropped());
    };
    loop {
        if cancel.is_cancelled() {
            return Err(BlockError::Cancelled);
        }
        match rx.recv_timeout(CANCEL_POLL) {
            Ok(reply) => return reply,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return dropped(),
        }
    }
}

/// Closes the connection when the peer, with requests outstanding, has sent nothing for
/// `limit`; ends with the connection.
async fn watch_stalls(shared: std::sync::Weak<Shared>, limit: Duration) {
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let st = shared.lock();
        if st.closed.is_some() {
            return;
        }
        let waiting = !st.pending.is_empty();
        drop(st);
        let quiet = shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        if waiting && quiet >= limit {
            shared.close(format!(
                "{} sent nothing for {} s while requests waited for replies",
                shared.peer,
                limit.as_secs_f64()
            ));
            return;
        }
    }
}

/// Turns an error reply, or a reply of the wrong kind, into an error.
pub(super) fn unexpected(op: &'static str, offset: Option<u64>, reply: Reply) -> BlockError {
    match reply {
        Reply::Error { code, message } => BlockError::Remote {
            op,
            offset,
            code,
            message,
        },
        other => {
            let kind = match other {
                Reply::Disks(_) => "disk list",
                Reply::Opened { .. } => "open",
                Reply::Data(_) => "data",
                Reply::Done => "done",
                Reply::Status(_) => "status",
                Reply::Hashes(_) => "hashes",
                Reply::Identity(_) => "identity",
                Reply::Multicast(_) => "multicast status",
                Reply::BootEntry(_) => "boot entry",
                Reply::LiveMap(_) => "live map",
                Reply::Error { .. } => "error",
            };
            BlockError::Protocol(format!("unexpected {kind} reply to {op}"))
        }
    }
}

#[cfg(test)]
mod geometry_tests {
    use super::*;

    #[test]
    fn hostile_disk_geometry_is_refused() {
        assert!(check_geometry(1 << 30, 512).is_ok());
        assert!(check_geometry(1 << 30, 4096).is_ok());
        for bad_sector in [0, 1, 256, 513, 1000, 8192, u32::MAX] {
            assert!(check_geometry(1 << 30, bad_sector).is_err(), "{bad_sector}");
        }
        assert!(check_geometry(u64::MAX, 512).is_err());
        assert!(
            check_geometry((1 << 30) + 100, 512).is_ok(),
            "odd-sized files are served"
        );
    }
}
