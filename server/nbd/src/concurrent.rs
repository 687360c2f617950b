//! Answering one connection's requests on several threads: the connection's thread reads
//! requests, a few workers execute them (a device read of one overlaps the socket write of
//! another, and random reads proceed in parallel), and one writer sends the replies — in
//! completion order, as NBD allows (each reply names its request's cookie) — flushing its
//! buffer whenever no further reply is ready.
//!
//! Memory stays bounded: a request is admitted only while the bytes of the requests in
//! flight (read lengths, write payloads) stay under [`IN_FLIGHT_BYTES`]. A client that stops
//! reading its replies makes the writer time out; the connection then ends for all threads.

use std::io::{BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Condvar, Mutex};

use crate::proto::{CMD_READ, MAX_PAYLOAD};
use crate::transmission::{next_request, Incoming, RequestSource, Session};
use crate::NbdError;

/// Threads executing one connection's requests.
pub const WORKERS: usize = 4;
/// Most request bytes in flight on one connection (two of the largest requests).
pub const IN_FLIGHT_BYTES: u64 = 2 * MAX_PAYLOAD as u64;

/// Serves `session` until the client disconnects, replies going to `stream`.
pub fn serve_concurrently<R: RequestSource>(
    reader: &mut R,
    stream: &TcpStream,
    session: &Session,
) -> Result<(), NbdError> {
    let budget = Budget::default();
    let (jobs_tx, jobs_rx) = sync_channel::<(Incoming, u64)>(WORKERS);
    let jobs_rx = Mutex::new(jobs_rx);
    let (replies_tx, replies_rx) = sync_channel::<(Vec<u8>, u64)>(WORKERS);
    std::thread::scope(|scope| {
        let budget = &budget;
        scope.spawn(move || send_replies(replies_rx, stream, budget));
        for _ in 0..WORKERS {
            let (jobs, replies) = (&jobs_rx, replies_tx.clone());
            scope.spawn(move || execute(jobs, replies, session));
        }
        drop(replies_tx);
        let read = read_requests(reader, &jobs_tx, budget);
        drop(jobs_tx);
        read
    })
}

/// The connection's thread: admits requests while the budget allows.
fn read_requests<R: RequestSource>(
    reader: &mut R,
    jobs: &SyncSender<(Incoming, u64)>,
    budget: &Budget,
) -> Result<(), NbdError> {
    while let Some(incoming) = next_request(reader, &mut || Ok(()))? {
        let r = &incoming.request;
        let cost = if r.kind == CMD_READ {
            u64::from(r.len.min(MAX_PAYLOAD))
        } else {
            incoming.payload.len() as u64
        };
        if !budget.acquire(cost) || jobs.send((incoming, cost)).is_err() {
            break; // the writer gave up: the client stopped reading
        }
    }
    Ok(())
}

/// A worker: executes requests until there are no more.
fn execute(
    jobs: &Mutex<Receiver<(Incoming, u64)>>,
    replies: SyncSender<(Vec<u8>, u64)>,
    session: &Session,
) {
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((incoming, cost)) = job else { return };
        let mut reply = Vec::new();
        session.answer(&incoming, &mut reply);
        if replies.send((reply, cost)).is_err() {
            return;
        }
    }
}

/// The writer: sends replies, flushing whenever none is waiting; on a failed write it shuts
/// the socket so the connection's reader stops too.
fn send_replies(replies: Receiver<(Vec<u8>, u64)>, stream: &TcpStream, budget: &Budget) {
    let mut out = BufWriter::with_capacity(256 << 10, stream);
    let failed = loop {
        let next = match replies.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => match out.flush() {
                Ok(()) => replies.recv().ok(),
                Err(e) => break Some(e),
            },
            Err(TryRecvError::Disconnected) => None,
        };
        let Some((reply, cost)) = next else {
            break out.flush().err();
        };
        if let Err(e) = out.write_all(&reply) {
            break Some(e);
        }
        budget.release(cost);
    };
    if let Some(e) = failed {
        tracing::warn!("sending NBD replies: {e}");
        budget.close();
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// Bytes of requests in flight, waited on by the reader.
#[derive(Default)]
struct Budget {
    /// (bytes in flight, closed).
    state: Mutex<(u64, bool)>,
    freed: Condvar,
}

impl Budget {
    /// Waits until `cost` more bytes fit (a request larger than the whole budget waits for
    /// an empty one); false once closed.
    fn acquire(&self, cost: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !s.1 && s.0 > 0 && s.0 + cost > IN_FLIGHT_BYTES {
            s = self.freed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.0 += cost;
        !s.1
    }

    fn release(&self, cost: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_sub(cost);
        self.freed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.freed.notify_all();
    }
}
