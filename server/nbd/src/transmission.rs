//! The transmission phase: requests read one at a time from a buffered stream and answered in
//! order; replies are buffered and sent when no further request is already waiting, so a
//! client that keeps many requests in flight gets them answered in few system calls.
//!
//! Bounds: a READ longer than [`MAX_PAYLOAD`] is refused (`EINVAL`); a WRITE longer than that
//! closes the connection (its payload cannot be skipped safely). A request must lie inside the
//! export. Block status needs structured replies and `base:allocation`, and describes at most
//! [`MAX_EXTENTS`] extents.

use std::io::{BufRead, Write};

use diskferry_blockdev::{BlockError, Region};

use crate::export::Export;
use crate::handshake::Negotiated;
use crate::proto::*;
use crate::NbdError;

/// Waits for the next request; the stream's own timeouts bound how long a started request
/// may take to arrive (see `server`).
pub trait RequestSource: BufRead {
    /// Bytes of further requests already received.
    fn buffered(&self) -> usize;
    /// Called before blocking for the first byte of a request (idle clients may wait long)
    /// and after it arrived (the rest must follow promptly).
    fn idle(&mut self, _idle: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// A request and, for a WRITE, its payload.
pub struct Incoming {
    pub request: Request,
    pub payload: Vec<u8>,
}

/// Reads the next request (and a WRITE's payload); `None` when the client disconnects
/// (`CMD_DISC` or end of stream). `before_wait` runs when nothing further is buffered and the
/// read is about to block (flush replies then).
pub fn next_request<R: RequestSource>(
    reader: &mut R,
    before_wait: &mut dyn FnMut() -> std::io::Result<()>,
) -> Result<Option<Incoming>, NbdError> {
    if reader.buffered() == 0 {
        before_wait()?;
        reader.idle(true)?;
        let more = !reader.fill_buf()?.is_empty();
        reader.idle(false)?;
        if !more {
            return Ok(None);
        }
    }
    let mut head = [0u8; Request::LEN];
    reader.read_exact(&mut head)?;
    let request = Request::parse(&head)?;
    if request.kind == CMD_DISC {
        return Ok(None);
    }
    let mut payload = Vec::new();
    if request.kind == CMD_WRITE {
        if request.len > MAX_PAYLOAD {
            return Err(WireError::TooLong {
                what: "write payload",
                len: request.len.into(),
                max: MAX_PAYLOAD.into(),
            }
            .into());
        }
        payload = vec![0u8; request.len as usize];
        reader.read_exact(&mut payload)?;
    }
    Ok(Some(Incoming { request, payload }))
}

/// Serves requests one after the other until the client disconnects.
pub fn serve<R: RequestSource, W: Write>(
    reader: &mut R,
    writer: &mut W,
    negotiated: &Negotiated,
) -> Result<(), NbdError> {
    let session = Session::new(negotiated);
    let mut reply = Vec::new();
    while let Some(incoming) = next_request(reader, &mut || writer.flush())? {
        reply.clear();
        session.answer(&incoming, &mut reply);
        writer.write_all(&reply)?;
    }
    writer.flush()?;
    Ok(())
}

/// One connection's view of its export: what it negotiated. Shared by the threads that
/// answer its requests.
#[derive(Clone)]
pub struct Session {
    export: Export,
    structured: bool,
    allocation: bool,
}

/// An errno for a reply, with a message for structured error chunks.
struct Failure(u32, String);

impl From<BlockError> for Failure {
    fn from(e: BlockError) -> Failure {
        let errno = match &e {
            BlockError::ReadOnly => EPERM,
            BlockError::OutOfRange { .. } => EINVAL,
            BlockError::Unsupported(_) => ENOTSUP,
            _ => EIO,
        };
        tracing::warn!("request failed: {e}");
        Failure(errno, e.to_string())
    }
}

impl Session {
    pub fn new(negotiated: &Negotiated) -> Session {
        Session {
            export: negotiated.export.clone(),
            structured: negotiated.structured,
            allocation: negotiated.allocation,
        }
    }

    /// Executes a request and appends its whole reply to `w`.
    pub fn answer(&self, incoming: &Incoming, w: &mut Vec<u8>) {
        let req = &incoming.request;
        let done = match req.kind {
            CMD_READ => return self.read(w, req),
            CMD_BLOCK_STATUS => return self.block_status(w, req),
            CMD_WRITE => self.write(req, &incoming.payload),
            CMD_FLUSH => self.export.device.flush().map_err(Failure::from),
            CMD_TRIM => self.modify(req, |d| d.discard(req.offset, req.len.into())),
            CMD_WRITE_ZEROES => self.modify(req, |d| d.write_zeroes(req.offset, req.len.into())),
            _ => Err(Failure(EINVAL, format!("unknown command {}", req.kind))),
        };
        match done {
            Ok(()) => w.extend_from_slice(&simple_reply(0, req.cookie)),
            Err(f) => self.fail(w, req.cookie, f),
        }
    }

    /// Checks that the request lies in the export.
    fn in_bounds(&self, req: &Request) -> Result<(), Failure> {
        let size = self.export.device.size();
        match req.offset.checked_add(req.len.into()) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Failure(
                if req.kind == CMD_WRITE {
                    ENOSPC
                } else {
                    EINVAL
                },
                format!("{}+{} is past the end ({size} bytes)", req.offset, req.len),
            )),
        }
    }

    fn writable(&self, req: &Request) -> Result<(), Failure> {
        self.in_bounds(req)?;
        if !self.export.writable {
            return Err(Failure(EPERM, "the export is read-only".into()));
        }
        if req.flags & CMD_FLAG_FAST_ZERO != 0 {
            return Err(Failure(EINVAL, "fast zero was not offered".into()));
        }
        Ok(())
    }

    fn write(&self, req: &Request, payload: &[u8]) -> Result<(), Failure> {
        self.modify(req, |d| d.write_at(payload, req.offset))
    }

    /// A change to the device, flushed when the request asks for FUA.
    fn modify(
        &self,
        req: &Request,
        change: impl FnOnce(&dyn diskferry_blockdev::BlockDevice) -> diskferry_blockdev::Result<()>,
    ) -> Result<(), Failure> {
        self.writable(req)?;
        let device = &*self.export.device;
        change(device)?;
        if req.flags & CMD_FLAG_FUA != 0 {
            device.flush()?;
        }
        Ok(())
    }

    /// A READ's reply, the data read straight into the reply buffer.
    fn read(&self, w: &mut Vec<u8>, req: &Request) {
        if let Err(f) = self.in_bounds(req) {
            return self.fail(w, req.cookie, f);
        }
        if req.len > MAX_PAYLOAD {
            let f = Failure(EINVAL, format!("reads are limited to {MAX_PAYLOAD} bytes"));
            return self.fail(w, req.cookie, f);
        }
        let start = w.len();
        if self.structured {
            let len = 8 + req.len;
            w.extend_from_slice(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                len,
            ));
            w.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            w.extend_from_slice(&simple_reply(0, req.cookie));
        }
        let data = w.len();
        w.resize(data + req.len as usize, 0);
        if let Err(e) = self.export.device.read_at(&mut w[data..], req.offset) {
            w.truncate(start);
            self.fail(w, req.cookie, e.into());
        }
    }

    fn block_status(&self, w: &mut Vec<u8>, req: &Request) {
        if !self.structured || !self.allocation {
            let f = Failure(
                EINVAL,
                "block status needs structured replies and base:allocation".into(),
            );
            return self.fail(w, req.cookie, f);
        }
        let extents = self.in_bounds(req).and_then(|()| self.extents(req));
        let extents = match extents {
            Ok(e) => e,
            Err(f) => return self.fail(w, req.cookie, f),
        };
        let mut body = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for (len, flags) in &extents {
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&flags.to_be_bytes());
        }
        let head = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            body.len() as u32,
        );
        w.extend_from_slice(&head);
        w.extend_from_slice(&body);
    }

    /// `(length, flags)` descriptors from the request's offset, same states joined, at most
    /// [`MAX_EXTENTS`] (one with `REQ_ONE`), covering at most the requested length.
    fn extents(&self, req: &Request) -> Result<Vec<(u32, u32)>, Failure> {
        let end = req.offset + u64::from(req.len);
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = req.offset;
        while at < end {
            let got = self.export.device.block_status(at, end - at)?;
            if got.is_empty() {
                break;
            }
            for e in got {
                let len = e.len.min(end - at);
                let flags = match e.region {
                    Region::Zero => STATE_HOLE | STATE_ZERO,
                    Region::Data | Region::Unknown => 0,
                };
                let same = out.last().is_some_and(|last| last.1 == flags);
                if same {
                    out.last_mut().expect("a last extent").0 += len as u32;
                } else if out.len() == max {
                    return Ok(out);
                } else {
                    out.push((len as u32, flags));
                }
                at += len;
                if at >= end {
                    break;
                }
            }
        }
        if out.is_empty() {
            return Err(Failure(EIO, "the device described no extent".into()));
        }
        Ok(out)
    }

    fn fail(&self, w: &mut Vec<u8>, cookie: u64, f: Failure) {
        let Failure(errno, message) = f;
        if !self.structured {
            w.extend_from_slice(&simple_reply(errno, cookie));
            return;
        }
        let message: String = message.chars().take(1000).collect();
        let message = message.as_bytes();
        let mut body = errno.to_be_bytes().to_vec();
        body.extend_from_slice(&(message.len() as u16).to_be_bytes());
        body.extend_from_slice(message);
        w.extend_from_slice(&structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            body.len() as u32,
        ));
        w.extend_from_slice(&body);
    }
}
