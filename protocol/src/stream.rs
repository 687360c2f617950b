//! Async frame halves over a tokio connection: [`FrameReader`] and [`FrameWriter`], plaintext or
//! encrypted depending on the [`Session`]. The halves are independent so a connection can read
//! and write from two tasks.
//!
//! Encrypted, the writer packs whole frames into records (see [`crate::record`]) and the
//! reader decrypts each record in place and decodes frames straight out of it: data payloads
//! reach the caller as slices of the receive buffer. Plaintext, large payloads are written from
//! the caller's buffer without a copy.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

use crate::codec::{data_reply_header, encode_head, FrameCodec, HEADER_LEN};
use crate::handshake::record_limit;
use crate::record::{Opener, Sealer, LEN_BYTES, TAG_LEN};
use crate::{Message, ProtocolError, Session};

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
    let mut buf = BytesMut::with_capacity(DATA_HEADROOM + len + TAG_LEN);
    buf.resize(DATA_HEADROOM + len, 0);
    buf
}

/// Splits an established session into its reading and writing halves.
pub fn split<R, W>(session: Session, reader: R, writer: W) -> (FrameReader<R>, FrameWriter<W>) {
    let codec = FrameCodec::new(session.max_payload);
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
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Encodes `msg` into the outgoing buffer (inside a record when the session is encrypted).
    pub fn queue(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        match &mut self.sealer {
            Some(sealer) => {
                self.head.clear();
                let payload = encode_head(msg, &mut self.head, self.max_frame)?;
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
                let payload = encode_head(msg, &mut self.out, self.max_frame)?;
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

    /// Queues a data reply built with [`data_reply_buffer`], without copying its payload.
    pub fn queue_data_reply(
        &mut self,
        cookie: u64,
        mut buf: BytesMut,
    ) -> Result<(), ProtocolError> {
        let len = buf
            .len()
            .checked_sub(DATA_HEADROOM)
            .ok_or_else(|| ProtocolError::malformed("data reply buffer without headroom"))?;
        let header = data_reply_header(cookie, len, self.max_frame)?;
        buf[LEN_BYTES..DATA_HEADROOM].copy_from_slice(&header);
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
        while let Some(buf) = self.queue.pop_front() {
            self.io.write_all(&buf).await?;
        }
        self.queued = 0;
        self.io.flush().await?;
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
