//! Answering one connection's requests while its replies are being sent: the connection's
//! thread reads and executes requests in order, collecting replies in a batch; a writer thread
//! sends the batches. A device read overlaps the socket write of the replies before it, and a
//! client keeping many small requests in flight gets their replies in one batch (one hand-over
//! and one system call for many replies).
//!
//! Memory stays bounded: a batch is handed over once it holds [`BATCH_BYTES`] (or when no
//! further request is waiting), and at most [`BATCHES_QUEUED`] batches wait for the writer. A
//! client that stops reading its replies makes the writer time out; the writer then shuts the
//! socket, which ends the reading thread too.

use crate::socket::Stream;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};

use crate::transmission::{next_request, RequestSource, Session};
use crate::NbdError;

/// A batch of replies is handed to the writer once it is this large.
pub const BATCH_BYTES: usize = 256 << 10;
/// Batches waiting for the writer.
pub const BATCHES_QUEUED: usize = 2;

/// Serves `session` until the client disconnects, replies going to `stream`.
pub fn serve_pipelined<R: RequestSource>(
    reader: &mut R,
    stream: &Stream,
    session: &Session,
) -> Result<(), NbdError> {
    let (batches, queued) = sync_channel::<Vec<u8>>(BATCHES_QUEUED);
    std::thread::scope(|scope| {
        scope.spawn(move || send_batches(queued, stream));
        // `batches` moves into the reader and is dropped when it returns: the writer then
        // sees the end of the batches, sends what is left, and the scope can end.
        answer_requests(reader, batches, session)
    })
}

/// The connection's thread: executes requests in order, handing replies over in batches.
fn answer_requests<R: RequestSource>(
    reader: &mut R,
    batches: SyncSender<Vec<u8>>,
    session: &Session,
) -> Result<(), NbdError> {
    let mut batch = Vec::new();
    loop {
        if reader.buffered() == 0
            && !batch.is_empty()
            && batches.send(std::mem::take(&mut batch)).is_err()
        {
            return Ok(()); // the writer gave up: the client stopped reading
        }
        let Some(incoming) = next_request(reader, &mut || Ok(()))? else {
            break;
        };
        session.answer(&incoming, &mut batch);
        if batch.len() >= BATCH_BYTES && batches.send(std::mem::take(&mut batch)).is_err() {
            return Ok(());
        }
    }
    if !batch.is_empty() {
        let _ = batches.send(batch);
    }
    Ok(())
}

/// The writer: sends batches, flushing whenever none is waiting; on a failed write it shuts
/// the socket so the connection's reader stops too.
fn send_batches(batches: Receiver<Vec<u8>>, stream: &Stream) {
    let mut out = BufWriter::with_capacity(BATCH_BYTES, stream);
    let failed = loop {
        let next = match batches.try_recv() {
            Ok(b) => Some(b),
            Err(TryRecvError::Empty) => match out.flush() {
                Ok(()) => batches.recv().ok(),
                Err(e) => break Some(e),
            },
            Err(TryRecvError::Disconnected) => None,
        };
        let Some(batch) = next else {
            break out.flush().err();
        };
        if let Err(e) = out.write_all(&batch) {
            break Some(e);
        }
    };
    if let Some(e) = failed {
        tracing::warn!("sending NBD replies: {e}");
        let _ = stream.shutdown();
    }
}
