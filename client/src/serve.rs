//! One connection: authenticate, then answer block requests until the peer leaves.
//!
//! The reader loop decodes requests and starts each one's disk I/O on the blocking pool; a
//! writer task sends the replies in completion order (cookies let the server match them).
//! In-flight payload bytes are capped by a semaphore: when the cap is reached the reader stops
//! reading the socket, so a peer cannot make the client allocate more than the cap.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use diskferry_protocol::handshake::respond;
use diskferry_protocol::stream::split;
use diskferry_protocol::{
    ErrorCode, Message, ProtocolError, Reply, Request, Session, SessionOptions,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::disks::{self, DiskError, DiskSpec, OpenDisk};

/// Replies are batched into one socket write until this many bytes are queued.
const WRITE_BATCH: usize = 4 << 20;

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
}

/// What the writer task sends, with the in-flight budget it releases once written.
enum Outgoing {
    Reply(Message),
    /// A read's payload, built in place (see `data_reply_buffer`).
    Data {
        cookie: u64,
        buf: BytesMut,
    },
}

type Queued = (Outgoing, Option<OwnedSemaphorePermit>);

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
    let (mut reader, mut writer) = split(session, r, w);

    let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
    let writer_task = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut permits = Vec::new();
            let mut next = Some(first);
            while let Some((out, permit)) = next.take() {
                match out {
                    Outgoing::Reply(msg) => writer.queue(&msg)?,
                    Outgoing::Data { cookie, buf } => writer.queue_data_reply(cookie, buf)?,
                }
                permits.extend(permit);
                if writer.pending() < WRITE_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            writer.flush().await?;
            drop(permits);
        }
        writer.shutdown().await
    });

    let budget = Arc::new(Semaphore::new(config.max_inflight.max(max_payload) as usize));
    let mut handles: HashMap<u32, Arc<OpenDisk>> = HashMap::new();
    let mut next_handle: u32 = 1;
    let result = loop {
        if tx.is_closed() {
            // The writer stopped (the socket failed): nothing more can be answered.
            break Ok(());
        }
        let msg = match reader.next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let Message::Request { cookie, request } = msg else {
            break Err(ProtocolError::malformed("a reply was sent to the client"));
        };
        let reply = |reply: Reply| (Outgoing::Reply(Message::Reply { cookie, reply }), None);
        match request {
            Request::ListDisks => {
                let list = config
                    .disks
                    .iter()
                    .filter_map(|d| disks::describe(d, config.allow_write).ok())
                    .collect();
                let _ = tx.send(reply(Reply::Disks(list)));
            }
            Request::Open { disk, writable } => {
                let _ = tx.send(reply(
                    open(&config, &disk, writable, &mut handles, &mut next_handle).await,
                ));
            }
            Request::Close { handle } => {
                let r = match handles.remove(&handle) {
                    Some(_) => Reply::Done,
                    None => bad_handle(handle),
                };
                let _ = tx.send(reply(r));
            }
            Request::Read {
                handle,
                offset,
                len,
            } => {
                let disk = match open_disk(&handles, handle) {
                    Ok(d) => d,
                    Err(r) => {
                        let _ = tx.send(reply(r));
                        continue;
                    }
                };
                if len > max_payload {
                    let _ = tx.send(reply(error(DiskError {
                        code: ErrorCode::TooLarge,
                        message: format!(
                            "read of {len} bytes exceeds the negotiated maximum of {max_payload}"
                        ),
                    })));
                    continue;
                }
                if let Err(e) = disk.check_read(offset, len) {
                    let _ = tx.send(reply(error(e)));
                    continue;
                }
                // Bounded allocation: wait for budget before the buffer exists.
                let Ok(permit) = Arc::clone(&budget).acquire_many_owned(len.max(1)).await else {
                    break Ok(());
                };
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    let out = match disk.read_reply(offset, len) {
                        Ok(buf) => Outgoing::Data { cookie, buf },
                        Err(e) => Outgoing::Reply(Message::Reply {
                            cookie,
                            reply: error(e),
                        }),
                    };
                    let _ = tx.send((out, Some(permit)));
                });
            }
            Request::Write {
                handle,
                offset,
                data,
            } => {
                let disk = match open_disk(&handles, handle) {
                    Ok(d) => d,
                    Err(r) => {
                        let _ = tx.send(reply(r));
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&budget)
                    .acquire_many_owned((data.len() as u32).max(1))
                    .await
                else {
                    break Ok(());
                };
                run(&tx, cookie, Some(permit), move || {
                    disk.write(offset, &data).map(|()| Reply::Done)
                });
            }
            Request::Flush { handle } => with_disk(&tx, cookie, &handles, handle, |d| {
                d.flush().map(|()| Reply::Done)
            }),
            Request::Discard {
                handle,
                offset,
                len,
            } => with_disk(&tx, cookie, &handles, handle, move |d| {
                d.discard(offset, len).map(|()| Reply::Done)
            }),
            Request::BlockStatus {
                handle,
                offset,
                len,
            } => with_disk(&tx, cookie, &handles, handle, move |d| {
                d.block_status(offset, len).map(Reply::Status)
            }),
            Request::WriteZeroes {
                handle,
                offset,
                len,
            } => with_disk(&tx, cookie, &handles, handle, move |d| {
                d.write_zeroes(offset, len).map(|()| Reply::Done)
            }),
            Request::Identify => {
                let config = Arc::clone(&config);
                run(&tx, cookie, None, move || {
                    Ok(Reply::Identity(crate::identity::collect(&config)))
                });
            }
            Request::Power { action } => {
                if !config.allow_power {
                    let _ = tx.send(reply(error(DiskError {
                        code: ErrorCode::Unsupported,
                        message: "this client was started without --allow-power".into(),
                    })));
                    continue;
                }
                let _ = tx.send(reply(Reply::Done));
                crate::log(&config, format_args!("{action:?} requested by the server"));
                tokio::spawn(async move {
                    // Let the reply reach the server first.
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    crate::power::act(action);
                });
            }
        }
    };
    drop(tx);
    // In-flight operations finish and their replies are sent before the connection closes.
    let written = writer_task
        .await
        .unwrap_or_else(|e| Err(ProtocolError::Io(std::io::Error::other(e))));
    match (result, written) {
        (Err(e), _) => Err(e),
        // The peer hanging up while replies were still being sent is an ordinary end.
        (Ok(()), Ok(()) | Err(ProtocolError::Io(_))) => Ok(()),
        (Ok(()), Err(e)) => Err(e),
    }
}

async fn open(
    config: &Config,
    name: &str,
    writable: bool,
    handles: &mut HashMap<u32, Arc<OpenDisk>>,
    next_handle: &mut u32,
) -> Reply {
    if writable && !config.allow_write {
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
    let opened = tokio::task::spawn_blocking(move || OpenDisk::open(&spec, writable)).await;
    match (opened, info) {
        (Ok(Ok(disk)), Ok(info)) => {
            let handle = *next_handle;
            *next_handle = next_handle.wrapping_add(1).max(1);
            let read_only = !disk.writable;
            let size = disk.size;
            handles.insert(handle, Arc::new(disk));
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

fn with_disk(
    tx: &mpsc::UnboundedSender<Queued>,
    cookie: u64,
    handles: &HashMap<u32, Arc<OpenDisk>>,
    handle: u32,
    op: impl FnOnce(&OpenDisk) -> Result<Reply, DiskError> + Send + 'static,
) {
    match open_disk(handles, handle) {
        Ok(disk) => run(tx, cookie, None, move || op(&disk)),
        Err(reply) => {
            let _ = tx.send((Outgoing::Reply(Message::Reply { cookie, reply }), None));
        }
    }
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
    permit: Option<OwnedSemaphorePermit>,
    op: impl FnOnce() -> Result<Reply, DiskError> + Send + 'static,
) {
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let reply = op().unwrap_or_else(error);
        let _ = tx.send((Outgoing::Reply(Message::Reply { cookie, reply }), permit));
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
