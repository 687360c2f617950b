//! Async frame halves over a tokio connection: [`FrameReader`] and [`FrameWriter`], plaintext or
//! encrypted depending on the [`Session`]. The halves are independent so a connection can read
//! and write from two tasks.
//!
//! Encrypted, the writer packs whole frames into records (see [`crate::record`]) and the
//! reader decrypts each record in place and decodes frames straight out of it: data payloads
//! reach the caller as slices of the receive buffer. Plaintext, large payloads are written from
//! the caller's buffer without a copy.
//!
//! With compression negotiated, the writer owns a [`Compressor`] (shared with whoever builds
//! data replies, [`FrameWriter::compressor`]): payloads of [`FrameWriter::queue`] go
//! compressed while it pays, and every flush tells it how fast the link took the bytes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

use crate::codec::{
    data_reply_header, encode_head, encode_head_compressed, zdata_reply_header, FrameCodec,
    HEADER_LEN,
};
use crate::compress::{Compressor, PREFIX_LEN};
use crate::handshake::record_limit;
use crate::record::{Opener, Sealer, LEN_BYTES, TAG_LEN};
use crate::{Message, ProtocolError, Role, Session};

/// Minimum free room to offer the socket per read.
const READ_CHUNK: usize = 256 << 10;
/// Payloads at least this large are sent without copying in plaintext mode.
const ZERO_COPY_MIN: usize = 64 << 10;

/// Room a data reply built in place needs in front of its payload: a record length and a
/// frame header.
pub const DATA_HEADROOM: usize = LEN_BYTES + HEADER_LEN;

/// A buffer for a data reply of `len` bytes built in place: fill `buf[DATA_HEADROOM..]`, then
/// hand it to [`FrameWriter::queue_data_reply`]. It has room for the record's tag, so an
/// encrypted reply is sealed where it lies and a plaintext one is sent as is.
pub fn data_reply_buffer(len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(granular(DATA_HEADROOM + len + TAG_LEN));
    buf.resize(DATA_HEADROOM + len, 0);
    buf
}

/// Reply buffers are allocated in multiples of this: an agent serving a filesystem reader's
/// reads of every size otherwise leaves the allocator holding pages of dozens of size
/// classes (a files-mode capture of a Debian disk peaked at 174 MB of agent memory).
const BUFFER_GRANULE: usize = 64 << 10;

/// `len` rounded up to whole [`BUFFER_GRANULE`]s.
fn granular(len: usize) -> usize {
    len.next_multiple_of(BUFFER_GRANULE)
}

/// Room a compressed data reply built in place needs in front of its compressed bytes.
pub const ZDATA_HEADROOM: usize = DATA_HEADROOM + PREFIX_LEN;

/// A data reply built in place, ready for [`FrameWriter::queue_data`]: raw (a
/// [`data_reply_buffer`]) or compressed (behind [`ZDATA_HEADROOM`]).
#[derive(Debug)]
pub struct DataReply {
    buf: BytesMut,
    /// The payload's length before compression; `None` when it is raw.
    raw_len: Option<usize>,
}

impl DataReply {
    /// A reply built with [`data_reply_buffer`], sent as it is.
    pub fn raw(buf: BytesMut) -> Self {
        DataReply { buf, raw_len: None }
    }

    /// A reply built with [`data_reply_buffer`], compressed when `compressor` finds it pays
    /// and the payload shrinks (run it where the payload was read: it costs CPU).
    pub fn compressed(buf: BytesMut, compressor: Option<&Compressor>) -> Self {
        let Some(c) = compressor else {
            return Self::raw(buf);
        };
        let payload = buf.get(DATA_HEADROOM..).unwrap_or_default();
        let room = ZDATA_HEADROOM + c.codec().max_output(payload.len()) + TAG_LEN;
        let mut out = BytesMut::with_capacity(granular(room));
        out.resize(ZDATA_HEADROOM, 0);
        if c.compress(payload, &mut out) {
            DataReply {
                raw_len: Some(payload.len()),
                buf: out,
            }
        } else {
            Self::raw(buf)
        }
    }

    /// Whether the payload travels compressed.
    pub fn is_compressed(&self) -> bool {
        self.raw_len.is_some()
    }
}

/// How many threads compress one side's payloads: an agent compresses read replies on its
/// disk threads (at most four), the server its writes in the connection's writer task.
fn compressing_threads(peer: Role) -> usize {
    match peer {
        Role::Controller => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        Role::Agent => 1,
    }
}

/// Splits an established session into its reading and writing halves.
pub fn split<R, W>(session: Session, reader: R, writer: W) -> (FrameReader<R>, FrameWriter<W>) {
    let codec = FrameCodec::new(session.max_payload).with_compression(session.compression);
    let compressor = session
        .compression
        .map(|c| Arc::new(Compressor::new(c, compressing_threads(session.peer_role))));
    let record_limit = record_limit(session.max_payload);
    let (sealer, opener) = match session.cipher {
        Some((s, o)) => (Some(s), Some(o)),
        None => (None, None),
    };
    (
        FrameReader {
            io: reader,
            raw: BytesMut::new(),
            plain: BytesMut::new(),
            opener,
            codec: codec.clone(),
        },
        FrameWriter {
            io: writer,
            head: BytesMut::new(),
            out: BytesMut::new(),
            queue: VecDeque::new(),
            queued: 0,
            sealer,
            open_record: None,
            record_limit,
            max_frame: codec.max_frame(),
            compressor,
        },
    )
}

/// Receives frames.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    /// Encrypted bytes not yet forming a whole record.
    raw: BytesMut,
    /// Decrypted (or plaintext) bytes not yet forming a whole frame.
    plain: BytesMut,
    opener: Option<Opener>,
    codec: FrameCodec,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// The next frame, or `None` when the peer closed the connection between frames.
    pub async fn next(&mut self) -> Result<Option<Message>, ProtocolError> {
        loop {
            if let Some(msg) = self.codec.decode(&mut self.plain)? {
                return Ok(Some(msg));
            }
            let target = match &mut self.opener {
                Some(opener) => {
                    if let Some(record) = opener.open(&mut self.raw)? {
                        if self.plain.is_empty() {
                            self.plain = record; // the usual case: no copy
                        } else {
                            self.plain.extend_from_slice(&record);
                        }
                        continue;
                    }
                    &mut self.raw
                }
                None => &mut self.plain,
            };
            if target.capacity() - target.len() < READ_CHUNK {
                target.reserve(READ_CHUNK);
            }
            if self.io.read_buf(target).await? == 0 {
                if self.raw.is_empty() && self.plain.is_empty() {
                    return Ok(None);
                }
                return Err(ProtocolError::Truncated);
            }
        }
    }
}

/// Sends frames: [`FrameWriter::queue`] several, then [`FrameWriter::flush`] once.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    head: BytesMut,
    out: BytesMut,
    /// Buffers waiting to be written, in order.
    queue: VecDeque<Bytes>,
    queued: usize,
    sealer: Option<Sealer>,
    /// Where the record being filled starts in `out`.
    open_record: Option<usize>,
    record_limit: usize,
    max_frame: u32,
    compressor: Option<Arc<Compressor>>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// The session's compressor, when compression was negotiated: for data replies built
    /// in place ([`DataReply::compressed`]).
    pub fn compressor(&self) -> Option<Arc<Compressor>> {
        self.compressor.clone()
    }

    /// Encodes the head of `msg` into `dst`, compressed when the compressor takes its payload;
    /// returns the payload to send after it.
    fn encode(&self, msg: &Message, dst: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
        if let Some(c) = &self.compressor {
            let raw = match msg {
                Message::Request {
                    request: crate::Request::Write { data, .. },
                    ..
                }
                | Message::Reply {
                    reply: crate::Reply::Data(data),
                    ..
                } => &data[..],
                _ => &[],
            };
            let mut z = BytesMut::new();
            if c.compress(raw, &mut z) {
                encode_head_compressed(msg, c.codec(), z.len(), dst, self.max_frame)?;
                return Ok(Some(z.freeze()));
            }
        }
        encode_head(msg, dst, self.max_frame)
    }

    /// Encodes `msg` into the outgoing buffer (inside a record when the session is encrypted).
    pub fn queue(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        let payload = self.encode(msg, &mut head);
        self.head = head;
        let payload = payload?;
        match &mut self.sealer {
            Some(sealer) => {
                let size = self.head.len() + payload.as_ref().map_or(0, Bytes::len);
                if let Some(start) = self.open_record {
                    if self.out.len() - start - LEN_BYTES + size > self.record_limit {
                        sealer.seal(&mut self.out, start)?;
                        self.open_record = None;
                    }
                }
                if self.open_record.is_none() {
                    self.out.reserve(LEN_BYTES + size + crate::record::TAG_LEN);
                    self.open_record = Some(sealer.begin(&mut self.out));
                }
                self.out.extend_from_slice(&self.head);
                if let Some(p) = payload {
                    self.out.extend_from_slice(&p);
                }
            }
            None => {
                self.out.extend_from_slice(&self.head);
                if let Some(p) = payload {
                    if p.len() >= ZERO_COPY_MIN {
                        self.push_out();
                        self.queued += p.len();
                        self.queue.push_back(p);
                    } else {
                        self.out.extend_from_slice(&p);
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues a data reply built with [`data_reply_buffer`], raw, without copying its payload.
    pub fn queue_data_reply(&mut self, cookie: u64, buf: BytesMut) -> Result<(), ProtocolError> {
        self.queue_data(cookie, DataReply::raw(buf))
    }

    /// Queues a data reply built in place, raw or compressed, without copying its payload.
    pub fn queue_data(&mut self, cookie: u64, reply: DataReply) -> Result<(), ProtocolError> {
        let DataReply { mut buf, raw_len } = reply;
        let headroom = match raw_len {
            Some(_) => ZDATA_HEADROOM,
            None => DATA_HEADROOM,
        };
        let len = buf
            .len()
            .checked_sub(headroom)
            .ok_or_else(|| ProtocolError::malformed("data reply buffer without headroom"))?;
        match (raw_len, &self.compressor) {
            (Some(raw_len), Some(c)) => {
                let header = zdata_reply_header(cookie, c.codec(), raw_len, len, self.max_frame)?;
                buf[LEN_BYTES..ZDATA_HEADROOM].copy_from_slice(&header);
            }
            (Some(_), None) => {
                return Err(ProtocolError::malformed(
                    "a compressed reply on a session without compression",
                ))
            }
            (None, _) => {
                let header = data_reply_header(cookie, len, self.max_frame)?;
                buf[LEN_BYTES..DATA_HEADROOM].copy_from_slice(&header);
            }
        }
        let frame = match &mut self.sealer {
            Some(sealer) => {
                // Records hold whole frames in order: close the one being filled first.
                if let Some(start) = self.open_record.take() {
                    sealer.seal(&mut self.out, start)?;
                }
                sealer.seal(&mut buf, 0)?;
                buf
            }
            None => buf.split_off(LEN_BYTES),
        };
        self.push_out();
        self.queued += frame.len();
        self.queue.push_back(frame.freeze());
        Ok(())
    }

    /// Bytes queued but not yet written.
    pub fn pending(&self) -> usize {
        self.queued + self.out.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        if let (Some(sealer), Some(start)) = (&mut self.sealer, self.open_record.take()) {
            sealer.seal(&mut self.out, start)?;
        }
        self.push_out();
        let started = Instant::now();
        let bytes = self.queued;
        while let Some(buf) = self.queue.pop_front() {
            self.io.write_all(&buf).await?;
        }
        self.queued = 0;
        self.io.flush().await?;
        if let Some(c) = &self.compressor {
            c.record_link(bytes, started);
        }
        Ok(())
    }

    /// Queues and flushes one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        self.queue(msg)?;
        self.flush().await
    }

    /// Shuts the write side down (the peer sees end of stream).
    pub async fn shutdown(&mut self) -> Result<(), ProtocolError> {
        self.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }

    fn push_out(&mut self) {
        if !self.out.is_empty() {
            let chunk = self.out.split().freeze();
            self.queued += chunk.len();
            self.queue.push_back(chunk);
        }
    }
}
