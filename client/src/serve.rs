//! One connection: authenticate, then answer block requests until the peer leaves.
//!
//! The reader loop decodes requests and starts each one's disk I/O on the blocking pool; a
//! writer task sends the replies in completion order (cookies let the server match them).
//!
//! Memory is bounded by one budget per connection (`--max-inflight` bytes, a semaphore):
//! every request takes, before it is started, the most its reply can hold — a read's payload,
//! a write's data, 4096 extents for a block status, 256 KiB for an identity, at least
//! [`REPLY_FLOOR`] for anything (an error, `Done`) — and gives it back once its reply is
//! written to the socket (a compressed reply holds the budget of its raw payload). When the budget is spent the reader stops reading the socket, so a
//! peer that sends requests without reading replies meets TCP backpressure instead of growing
//! the agent (3,000 unread block-status replies grew it from 16 to 200 MiB before). A request
//! that needs more than the whole budget takes all of it: it waits for the others to be
//! written, then runs alone, so nothing waits forever.
//!
//! When the session negotiated compression, each read reply is compressed on the disk thread
//! that read it, while the session's compressor finds that it pays (see
//! `diskferry_protocol::compress`); the writer task then sends it as it comes.

use std::collections::HashMap;
use std::mem::size_of;
use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::Bytes;
use diskferry_protocol::compress::Compressor;
use diskferry_protocol::handshake::respond;
use diskferry_protocol::stream::{split, DataReply, FrameReader, FrameWriter};
use diskferry_protocol::{
    ErrorCode, Extent, Message, PowerAction, ProtocolError, Reply, Request, Session,
    SessionOptions, MAX_IDENTITY,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::disks::{self, DiskError, DiskSpec, OpenDisk, MAX_STATUS_EXTENTS};
use crate::live::{Live, LiveError};
use crate::multicast::{self, Receiving};
use diskferry_protocol::multicast::Credentials;

/// Replies are batched into one socket write until this many bytes are queued.
const WRITE_BATCH: usize = 4 << 20;
/// The least budget a request takes: its queued reply, an error message, a short reply.
const REPLY_FLOOR: u32 = 1 << 10;
/// Budget of a block status: its most extents, as held in memory.
const STATUS_REPLY: u32 = (MAX_STATUS_EXTENTS * size_of::<Extent>()) as u32 + REPLY_FLOOR;
/// Most a HashChunks reply holds: 32 bytes a chunk.
const HASHES_REPLY: u32 = (diskferry_protocol::chunks::MAX_HASHES * 32) as u32 + REPLY_FLOOR;
/// Budget of an identity: the largest document.
const IDENTITY_REPLY: u32 = MAX_IDENTITY as u32 + REPLY_FLOOR;
/// Budget of one disk in a disk list (its name is a path, at most 4 KiB on Linux).
const DISK_REPLY: u32 = 8 << 10;

/// What every connection of this client shares.
#[derive(Debug)]
pub struct Config {
    pub disks: Vec<DiskSpec>,
    pub allow_write: bool,
    pub session: SessionOptions,
    /// Most payload bytes in flight per connection.
    pub max_inflight: u32,
    /// Log nothing (for in-process use).
    pub quiet: bool,
    /// Obey `Power` requests (reboot, power off): only the boot environment asks for this.
    pub allow_power: bool,
    /// Obey `SetBootEntry` (write UEFI boot variables): only the boot environment asks.
    pub allow_firmware: bool,
    /// Live mode (`--live`): the live file, and writes only into it.
    pub live: Option<Arc<Live>>,
}

/// What the writer task sends, with the in-flight budget it releases once written.
enum Outgoing {
    Reply(Message),
    /// A read's payload, built in place (see `data_reply_buffer`), maybe compressed.
    Data {
        cookie: u64,
        reply: DataReply,
    },
}

type Queued = (Outgoing, OwnedSemaphorePermit);

/// Serves one accepted connection to completion.
pub async fn serve<S>(mut io: S, config: Arc<Config>) -> Result<(), ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let session = respond(&mut io, &config.session).await?;
    serve_session(io, session, config).await
}

/// Answers requests on an authenticated connection (accepted, or dialled by us) until the
/// peer leaves.
pub async fn serve_session<S>(
    io: S,
    session: Session,
    config: Arc<Config>,
) -> Result<(), ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_payload = session.max_payload;
    let (r, w) = tokio::io::split(io);
    let (mut reader, writer) = split(session, r, w);
    let compressor = writer.compressor();
    let (tx, rx) = mpsc::unbounded_channel::<Queued>();
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let mut conn = Connection::new(config, tx, max_payload, compressor);
    let result = conn.answer_all(&mut reader).await;
    drop(conn.tx);
    // In-flight operations finish and their replies are sent before the connection closes.
    let written = writer_task
        .await
        .unwrap_or_else(|e| Err(ProtocolError::Io(std::io::Error::other(e))));
    session_outcome(result, written)
}

/// How a connection ended, from the reader's and the writer's results.
fn session_outcome(
    read: Result<(), ProtocolError>,
    written: Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    match (read, written) {
        (Err(e), _) => Err(e),
        // The peer hanging up while replies were still being sent is an ordinary end.
        (Ok(()), Ok(()) | Err(ProtocolError::Io(_))) => Ok(()),
        (Ok(()), Err(e)) => Err(e),
    }
}

/// The writer task: sends replies in the order they are queued, batching them into one socket
/// write up to [`WRITE_BATCH`] bytes, and releases their in-flight budget once written. When
/// every sender is gone it shuts the socket's write half.
async fn write_replies<W>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) -> Result<(), ProtocolError>
where
    W: AsyncWrite + Unpin,
{
    while let Some(first) = rx.recv().await {
        let mut permits = Vec::new();
        let mut next = Some(first);
        while let Some((out, permit)) = next.take() {
            match out {
                Outgoing::Reply(msg) => writer.queue(&msg)?,
                Outgoing::Data { cookie, reply } => writer.queue_data(cookie, reply)?,
            }
            permits.push(permit);
            if writer.pending() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        writer.flush().await?;
        drop(permits);
    }
    writer.shutdown().await
}

/// The reading side of one connection: what it has open and what it may still allocate.
struct Connection {
    config: Arc<Config>,
    /// To the writer task; every operation in flight holds a clone.
    tx: mpsc::UnboundedSender<Queued>,
    /// Reply bytes that may still be in flight (`Config::max_inflight`).
    budget: Arc<Semaphore>,
    /// The whole budget.
    capacity: u32,
    handles: HashMap<u32, Arc<OpenDisk>>,
    next_handle: u32,
    /// Largest read or write the session allows.
    max_payload: u32,
    /// Compresses read replies, when the session negotiated it.
    compressor: Option<Arc<Compressor>>,
    /// This connection's multicast session, stopped when the connection ends.
    multicast: Option<Receiving>,
}

impl Connection {
    fn new(
        config: Arc<Config>,
        tx: mpsc::UnboundedSender<Queued>,
        max_payload: u32,
        compressor: Option<Arc<Compressor>>,
    ) -> Self {
        let capacity = config.max_inflight.max(max_payload);
        Connection {
            config,
            tx,
            budget: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            handles: HashMap::new(),
            next_handle: 1,
            max_payload,
            compressor,
            multicast: None,
        }
    }

    /// Reads requests and starts answering each, until the peer leaves or the writer stops.
    async fn answer_all<R>(&mut self, reader: &mut FrameReader<R>) -> Result<(), ProtocolError>
    where
        R: AsyncRead + Unpin,
    {
        loop {
            if self.tx.is_closed() {
                // The writer stopped (the socket failed): nothing more can be answered.
                return Ok(());
            }
            let Some(msg) = reader.next().await? else {
                return Ok(());
            };
            let Message::Request { cookie, request } = msg else {
                return Err(ProtocolError::malformed("a reply was sent to the client"));
            };
            if self.answer(cookie, request).await.is_break() {
                return Ok(());
            }
        }
    }

    /// Answers one request, or starts the disk I/O whose reply the writer task will send,
    /// once the budget has room for its reply. `Break` means the connection is ending.
    async fn answer(&mut self, cookie: u64, request: Request) -> ControlFlow<()> {
        // Bounded memory: nothing is started, and nothing more is read, before this.
        let Ok(permit) = Arc::clone(&self.budget)
            .acquire_many_owned(self.cost(&request))
            .await
        else {
            return ControlFlow::Break(());
        };
        match request {
            Request::ListDisks => {
                let list = self
                    .config
                    .disks
                    .iter()
                    .filter_map(|d| disks::describe(d, self.config.allow_write).ok())
                    .collect();
                self.reply(cookie, Reply::Disks(list), permit);
            }
            Request::Open { disk, writable } => {
                let r = self.open(&disk, writable).await;
                self.reply(cookie, r, permit);
            }
            Request::Close { handle } => {
                let r = match self.handles.remove(&handle) {
                    Some(_) => Reply::Done,
                    None => bad_handle(handle),
                };
                self.reply(cookie, r, permit);
            }
            Request::Read {
                handle,
                offset,
                len,
            } => self.read(cookie, handle, offset, len, permit),
            Request::Write {
                handle,
                offset,
                data,
            } => self.write(cookie, handle, offset, data, permit),
            Request::Identify => {
                let config = Arc::clone(&self.config);
                run(&self.tx, cookie, permit, move || {
                    Ok(Reply::Identity(crate::identity::collect(&config)))
                });
            }
            Request::Power { action } => self.power(cookie, action, permit),
            Request::MulticastJoin {
                handle,
                credentials,
            } => {
                let r = self.join_multicast(handle, *credentials).await;
                self.reply(cookie, r, permit);
            }
            Request::SetBootEntry { load_option } => {
                self.set_boot_entry(cookie, load_option, permit)
            }
            Request::LivePrepare { size } => self.live(cookie, permit, move |live, disks| {
                let map = live.prepare(size, disks)?;
                let done = format!(
                    "live file {} pinned: {} bytes in {} runs on {}",
                    map.path,
                    map.size(),
                    map.runs.len(),
                    map.disk
                );
                Ok((Reply::LiveMap(map), done))
            }),
            Request::LiveRemove => self.live(cookie, permit, |live, _| {
                let removed = live.remove()?;
                let done = format!("live file {} removed: {removed}", live.path().display());
                Ok((Reply::Done, done))
            }),
            Request::LiveBoot { menu } => self.live(cookie, permit, move |live, _| {
                live.boot_once(&menu)?;
                let done = if menu.is_empty() {
                    "GRUB menu of the live system removed"
                } else {
                    "GRUB boots the live system once at the next boot"
                };
                Ok((Reply::Done, done.into()))
            }),
            Request::LiveCommit { committed } => self.live(cookie, permit, move |live, _| {
                live.commit(committed)?;
                Ok((Reply::Done, format!("this system committed: {committed}")))
            }),
            Request::MulticastStatus => {
                let status = self
                    .multicast
                    .as_ref()
                    .map_or_else(multicast::idle, Receiving::status);
                self.reply(cookie, Reply::Multicast(status), permit);
            }
            disk_op @ (Request::Flush { .. }
            | Request::Discard { .. }
            | Request::BlockStatus { .. }
            | Request::HashChunks { .. }
            | Request::WriteZeroes { .. }) => self.disk_op(cookie, disk_op, permit),
        }
        ControlFlow::Continue(())
    }

    /// The budget `request` takes until its reply is written: the most its reply (or, for a
    /// write, its data) can hold, at least [`REPLY_FLOOR`], at most the whole budget.
    fn cost(&self, request: &Request) -> u32 {
        let most = match request {
            Request::Read { len, .. } if *len <= self.max_payload => *len,
            Request::Write { data, .. } => u32::try_from(data.len()).unwrap_or(u32::MAX),
            Request::BlockStatus { .. } => STATUS_REPLY,
            // The block it reads into, and a reply of at most 128 KiB.
            Request::HashChunks { chunk, len, .. } => {
                let block = u64::from(*chunk)
                    .max(diskferry_protocol::chunks::HASH_READ)
                    .min(*len);
                u32::try_from(block).unwrap_or(u32::MAX).max(HASHES_REPLY)
            }
            Request::Identify => IDENTITY_REPLY,
            Request::ListDisks => DISK_REPLY
                .saturating_mul(u32::try_from(self.config.disks.len()).unwrap_or(u32::MAX)),
            _ => 0,
        };
        most.max(REPLY_FLOOR).min(self.capacity)
    }

    /// The requests that are one call on an open disk, run on the blocking pool.
    fn disk_op(&self, cookie: u64, request: Request, permit: OwnedSemaphorePermit) {
        match request {
            Request::Flush { handle } => {
                self.on_disk(cookie, handle, permit, |d| d.flush().map(|()| Reply::Done))
            }
            Request::Discard {
                handle,
                offset,
                len,
            } => self.on_disk(cookie, handle, permit, move |d| {
                d.discard(offset, len).map(|()| Reply::Done)
            }),
            Request::BlockStatus {
                handle,
                offset,
                len,
            } => self.on_disk(cookie, handle, permit, move |d| {
                d.block_status(offset, len).map(Reply::Status)
            }),
            Request::WriteZeroes {
                handle,
                offset,
                len,
            } => self.on_disk(cookie, handle, permit, move |d| {
                d.write_zeroes(offset, len).map(|()| Reply::Done)
            }),
            Request::HashChunks {
                handle,
                offset,
                len,
                chunk,
            } => self.on_disk(cookie, handle, permit, move |d| {
                d.hash_chunks(offset, len, chunk).map(Reply::Hashes)
            }),
            other => unreachable!("answer() sends only disk operations here, not {other:?}"),
        }
    }

    /// Runs `op` on the disk behind `handle`, or answers that there is none.
    fn on_disk(
        &self,
        cookie: u64,
        handle: u32,
        permit: OwnedSemaphorePermit,
        op: impl FnOnce(&OpenDisk) -> Result<Reply, DiskError> + Send + 'static,
    ) {
        match open_disk(&self.handles, handle) {
            Ok(disk) => run(&self.tx, cookie, permit, move || op(&disk)),
            Err(reply) => self.reply(cookie, reply, permit),
        }
    }

    /// Queues a reply that needs no disk I/O.
    fn reply(&self, cookie: u64, reply: Reply, permit: OwnedSemaphorePermit) {
        queue(&self.tx, cookie, reply, permit);
    }

    /// Starts a read (its budget, taken in [`Self::answer`], covers the buffer).
    fn read(&self, cookie: u64, handle: u32, offset: u64, len: u32, permit: OwnedSemaphorePermit) {
        let disk = match self.readable(handle, offset, len) {
            Ok(d) => d,
            Err(r) => return self.reply(cookie, r, permit),
        };
        let tx = self.tx.clone();
        let compressor = self.compressor.clone();
        tokio::task::spawn_blocking(move || {
            let out = match disk.read_reply(offset, len) {
                Ok(buf) => Outgoing::Data {
                    cookie,
                    reply: DataReply::compressed(buf, compressor.as_deref()),
                },
                Err(e) => Outgoing::Reply(Message::Reply {
                    cookie,
                    reply: error(e),
                }),
            };
            let _ = tx.send((out, permit));
        });
    }

    /// The disk a read may go to, or the error reply: unknown handle, too large, out of range.
    fn readable(&self, handle: u32, offset: u64, len: u32) -> Result<Arc<OpenDisk>, Reply> {
        let disk = open_disk(&self.handles, handle)?;
        let max_payload = self.max_payload;
        if len > max_payload {
            return Err(error(DiskError {
                code: ErrorCode::TooLarge,
                message: format!(
                    "read of {len} bytes exceeds the negotiated maximum of {max_payload}"
                ),
            }));
        }
        disk.check_read(offset, len).map_err(error)?;
        Ok(disk)
    }

    /// Starts a write (its budget, taken in [`Self::answer`], covers the data).
    fn write(
        &self,
        cookie: u64,
        handle: u32,
        offset: u64,
        data: Bytes,
        permit: OwnedSemaphorePermit,
    ) {
        self.on_disk(cookie, handle, permit, move |d| {
            d.write(offset, &data).map(|()| Reply::Done)
        });
    }

    /// Reboots or powers off (after the reply has had time to leave), if this client may.
    fn power(&self, cookie: u64, action: PowerAction, permit: OwnedSemaphorePermit) {
        if !self.config.allow_power {
            let refused = error(DiskError {
                code: ErrorCode::Unsupported,
                message: "this client was started without --allow-power".into(),
            });
            return self.reply(cookie, refused, permit);
        }
        self.reply(cookie, Reply::Done, permit);
        crate::log(
            &self.config,
            format_args!("{action:?} requested by the server"),
        );
        let graceful = self.config.live.is_some();
        tokio::spawn(async move {
            // Let the reply reach the server first.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            tokio::task::spawn_blocking(move || crate::power::act(action, graceful));
        });
    }

    /// Runs a live operation on the blocking pool, if this agent is live; logs what it did.
    fn live(
        &self,
        cookie: u64,
        permit: OwnedSemaphorePermit,
        op: impl FnOnce(&Live, &[DiskSpec]) -> Result<(Reply, String), LiveError> + Send + 'static,
    ) {
        let config = Arc::clone(&self.config);
        run(&self.tx, cookie, permit, move || {
            let live = config.live.as_deref().ok_or(LiveError::NotLive)?;
            let (reply, done) = op(live, &config.disks)?;
            crate::log(&config, format_args!("{done}"));
            Ok(reply)
        });
    }

    /// Writes a UEFI boot entry, if this client may.
    fn set_boot_entry(&self, cookie: u64, option: Bytes, permit: OwnedSemaphorePermit) {
        if !self.config.allow_firmware {
            let refused = error(DiskError {
                code: ErrorCode::PermissionDenied,
                message:
                    "this client was started without --allow-firmware: it writes no boot entries"
                        .into(),
            });
            return self.reply(cookie, refused, permit);
        }
        let config = Arc::clone(&self.config);
        run(&self.tx, cookie, permit, move || {
            let number = crate::efi::set_boot_entry(&option)?;
            crate::log(
                &config,
                format_args!("boot entry Boot{number:04X} written, first in the boot order"),
            );
            Ok(Reply::BootEntry(number))
        });
    }

    /// Joins a multicast session into the disk behind `handle` (one session at a time).
    async fn join_multicast(&mut self, handle: u32, creds: Credentials) -> Reply {
        if self.multicast.as_ref().is_some_and(Receiving::is_running) {
            return error(DiskError {
                code: ErrorCode::Unsupported,
                message: "a multicast session is already running on this connection".into(),
            });
        }
        let disk = match open_disk(&self.handles, handle) {
            Ok(d) => d,
            Err(reply) => return reply,
        };
        let (session, group) = (creds.session, creds.group);
        match tokio::task::spawn_blocking(move || Receiving::start(&creds, disk)).await {
            Ok(Ok(receiving)) => {
                crate::log(
                    &self.config,
                    format_args!("joined multicast session {session} on {group}"),
                );
                self.multicast = Some(receiving);
                Reply::Done
            }
            Ok(Err(e)) => error(e),
            Err(e) => error(DiskError {
                code: ErrorCode::Io,
                message: format!("join task failed: {e}"),
            }),
        }
    }

    /// Opens a served disk and gives it a handle (or says why not).
    async fn open(&mut self, name: &str, writable: bool) -> Reply {
        let config = &self.config;
        if writable && !config.allow_write && config.live.is_none() {
            return error(DiskError {
                code: ErrorCode::ReadOnly,
                message: "this client is read-only; start it with --allow-write to permit writes"
                    .into(),
            });
        }
        let Some(spec) = config.disks.iter().find(|d| d.name == name).cloned() else {
            return error(DiskError {
                code: ErrorCode::NotFound,
                message: format!("no disk named {name:?} is served here"),
            });
        };
        let info = disks::describe(&spec, config.allow_write);
        let live = config.live.clone();
        let opened =
            tokio::task::spawn_blocking(move || OpenDisk::open(&spec, writable, live)).await;
        match (opened, info) {
            (Ok(Ok(disk)), Ok(info)) => {
                let handle = self.next_handle;
                self.next_handle = self.next_handle.wrapping_add(1).max(1);
                let read_only = !disk.writable;
                let size = disk.size;
                self.handles.insert(handle, Arc::new(disk));
                Reply::Opened {
                    handle,
                    size,
                    logical_sector: info.logical_sector,
                    physical_sector: info.physical_sector,
                    read_only,
                }
            }
            (Ok(Err(e)), _) => error(e),
            (_, Err(e)) => error(DiskError {
                code: ErrorCode::Io,
                message: format!("cannot describe {name}: {e}"),
            }),
            (Err(e), _) => error(DiskError {
                code: ErrorCode::Io,
                message: format!("open task failed: {e}"),
            }),
        }
    }
}

/// Queues a reply with the budget it holds until it is written.
fn queue(
    tx: &mpsc::UnboundedSender<Queued>,
    cookie: u64,
    reply: Reply,
    permit: OwnedSemaphorePermit,
) {
    let _ = tx.send((Outgoing::Reply(Message::Reply { cookie, reply }), permit));
}

/// The disk behind a handle, or the error reply for an unknown handle.
fn open_disk(handles: &HashMap<u32, Arc<OpenDisk>>, handle: u32) -> Result<Arc<OpenDisk>, Reply> {
    handles
        .get(&handle)
        .cloned()
        .ok_or_else(|| bad_handle(handle))
}

/// Runs blocking disk I/O off the runtime thread; the reply goes to the writer task.
fn run(
    tx: &mpsc::UnboundedSender<Queued>,
    cookie: u64,
    permit: OwnedSemaphorePermit,
    op: impl FnOnce() -> Result<Reply, DiskError> + Send + 'static,
) {
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let reply = op().unwrap_or_else(error);
        queue(&tx, cookie, reply, permit);
    });
}

fn error(e: DiskError) -> Reply {
    Reply::Error {
        code: e.code,
        message: e.message,
    }
}

fn bad_handle(handle: u32) -> Reply {
    Reply::Error {
        code: ErrorCode::BadHandle,
        message: format!("no open disk has handle {handle}"),
    }
}
