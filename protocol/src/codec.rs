//! Frame encoding and decoding: `u32 length | u8 kind | u64 cookie | body`, big-endian.
//!
//! The length counts everything after itself and is checked against the negotiated limit
//! before a single byte of the frame is buffered; every count inside a body is checked against
//! the bytes actually present before anything is allocated. Data payloads are zero-copy slices
//! of the receive buffer.
//!
//! When the session negotiated compression, a Write or a Data reply may come as its compressed
//! kind (`WRITE_Z`, `DATA_Z`): the same fields, then `codec u8 | raw length u32 | compressed
//! bytes` (see [`crate::compress`]). The decoder restores the plain message, so nothing above
//! it sees the difference; a compressed kind without negotiation, a raw length above the
//! negotiated maximum payload or a payload that does not decompress to exactly that length
//! is an error that closes the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::chunks::{ChunkHash, MAX_HASHES};
use crate::compress::{self, Codec, PREFIX_LEN};
use crate::message::{
    BlockState, DiskInfo, DiskRun, ErrorCode, Extent, LiveMap, Message, MulticastState,
    MulticastStatus, PowerAction, Reply, Request, MAX_IDENTITY, MAX_LIVE_EXTENTS, MAX_LIVE_MENU,
    MAX_LOAD_OPTION,
};
use crate::multicast::Credentials;
use crate::{ProtocolError, FRAME_SLACK, MAX_PAYLOAD_LIMIT};

/// Bytes before the body: length, kind, cookie.
pub const HEADER_LEN: usize = 4 + 1 + 8;

mod kind {
    pub const LIST_DISKS: u8 = 0x01;
    pub const OPEN: u8 = 0x02;
    pub const READ: u8 = 0x03;
    pub const WRITE: u8 = 0x04;
    pub const FLUSH: u8 = 0x05;
    pub const DISCARD: u8 = 0x06;
    pub const BLOCK_STATUS: u8 = 0x07;
    pub const CLOSE: u8 = 0x08;
    pub const IDENTIFY: u8 = 0x09;
    pub const POWER: u8 = 0x0a;
    pub const WRITE_ZEROES: u8 = 0x0b;
    pub const WRITE_Z: u8 = 0x0c;
    pub const HASH_CHUNKS: u8 = 0x0d;
    pub const MULTICAST_JOIN: u8 = 0x0e;
    pub const MULTICAST_STATUS: u8 = 0x0f;
    pub const SET_BOOT_ENTRY: u8 = 0x10;
    pub const LIVE_PREPARE: u8 = 0x11;
    pub const LIVE_REMOVE: u8 = 0x12;
    pub const LIVE_BOOT: u8 = 0x13;
    pub const LIVE_COMMIT: u8 = 0x14;
    pub const DISKS: u8 = 0x81;
    pub const OPENED: u8 = 0x82;
    pub const DATA: u8 = 0x83;
    pub const DONE: u8 = 0x84;
    pub const STATUS: u8 = 0x85;
    pub const IDENTITY: u8 = 0x86;
    pub const DATA_Z: u8 = 0x87;
    pub const HASHES: u8 = 0x88;
    pub const MULTICAST: u8 = 0x89;
    pub const BOOT_ENTRY: u8 = 0x8a;
    pub const LIVE_MAP: u8 = 0x8b;
    pub const ERROR: u8 = 0xff;
}

/// Encoded size of one extent in a Status reply.
const EXTENT_LEN: usize = 9;
/// One run of a [`LiveMap`]: offset and length.
const RUN_LEN: usize = 16;
/// One chunk hash in a [`Reply::Hashes`].
const HASH_LEN: usize = 32;
/// Smallest encoded DiskInfo (all strings empty).
const MIN_DISK_INFO_LEN: usize = 2 + 8 + 4 + 4 + 2 + 2 + 1 + 1;

/// The frame codec. `max_frame` bounds the length field of incoming frames, `max_payload`
/// the decompressed size of a compressed payload.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: u32,
    max_payload: u32,
    compression: Option<Codec>,
}

impl FrameCodec {
    /// A codec accepting data payloads up to `max_payload` bytes (clamped to the hard limit),
    /// none of them compressed.
    pub fn new(max_payload: u32) -> Self {
        let max_payload = max_payload.min(MAX_PAYLOAD_LIMIT);
        FrameCodec {
            max_frame: max_payload + FRAME_SLACK,
            max_payload,
            compression: None,
        }
    }

    /// The same codec, also accepting payloads compressed with `codec` (the negotiated one).
    pub fn with_compression(mut self, codec: Option<Codec>) -> Self {
        self.compression = codec;
        self
    }

    /// Largest value the length field may hold.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if len > self.max_frame {
            return Err(ProtocolError::FrameTooLarge {
                len: len.into(),
                max: self.max_frame.into(),
            });
        }
        if (len as usize) < HEADER_LEN - 4 {
            return Err(ProtocolError::malformed(format!(
                "frame length {len} is below the header size"
            )));
        }
        let total = 4 + len as usize;
        if src.len() < total {
            // `total` is bounded by max_frame, so this reservation is bounded too.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total).freeze();
        frame.advance(4);
        decode_frame(frame, self).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        match self.decode(buf)? {
            Some(msg) => Ok(Some(msg)),
            None if buf.is_empty() => Ok(None),
            None => Err(ProtocolError::Truncated),
        }
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        if let Some(payload) = encode_head(msg, dst, self.max_frame)? {
            dst.extend_from_slice(&payload);
        }
        Ok(())
    }
}

/// The frame header of a Data reply carrying `len` bytes, for replies built in place.
pub fn data_reply_header(
    cookie: u64,
    len: usize,
    max_frame: u32,
) -> Result<[u8; HEADER_LEN], ProtocolError> {
    let body = HEADER_LEN - 4 + len;
    if body > max_frame as usize {
        return Err(ProtocolError::FrameTooLarge {
            len: body as u64,
            max: max_frame.into(),
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&(body as u32).to_be_bytes());
    h[4] = kind::DATA;
    h[5..].copy_from_slice(&cookie.to_be_bytes());
    Ok(h)
}

/// The frame header of a compressed Data reply: header, codec and raw length, for replies
/// built in place; `zlen` compressed bytes follow it.
pub fn zdata_reply_header(
    cookie: u64,
    codec: Codec,
    raw_len: usize,
    zlen: usize,
    max_frame: u32,
) -> Result<[u8; HEADER_LEN + PREFIX_LEN], ProtocolError> {
    let raw_len = checked_raw_len(raw_len, max_frame)?;
    let head = data_reply_header(cookie, PREFIX_LEN + zlen, max_frame)?;
    let mut h = [0u8; HEADER_LEN + PREFIX_LEN];
    h[..HEADER_LEN].copy_from_slice(&head);
    h[4] = kind::DATA_Z;
    h[HEADER_LEN] = codec.id();
    h[HEADER_LEN + 1..].copy_from_slice(&raw_len.to_be_bytes());
    Ok(h)
}

/// A raw payload length must fit a frame as a raw payload would.
fn checked_raw_len(raw_len: usize, max_frame: u32) -> Result<u32, ProtocolError> {
    let max_payload = max_frame.saturating_sub(FRAME_SLACK);
    match u32::try_from(raw_len) {
        Ok(n) if n <= max_payload => Ok(n),
        _ => Err(ProtocolError::FrameTooLarge {
            len: raw_len as u64,
            max: max_payload.into(),
        }),
    }
}

/// Writes the head of `msg` (a Write or a Data reply) as its compressed kind, for a payload
/// that `codec` compressed to `zlen` bytes, which the caller sends after it.
pub fn encode_head_compressed(
    msg: &Message,
    codec: Codec,
    zlen: usize,
    dst: &mut BytesMut,
    max_frame: u32,
) -> Result<(), ProtocolError> {
    let start = dst.len();
    let raw = encode_head(msg, dst, max_frame)?;
    let z_kind = match dst[start + 4] {
        kind::WRITE => kind::WRITE_Z,
        kind::DATA => kind::DATA_Z,
        _ => 0,
    };
    let Some(raw) = raw.filter(|_| z_kind != 0) else {
        dst.truncate(start);
        return Err(ProtocolError::malformed(
            "only Write and Data payloads travel compressed",
        ));
    };
    let raw_len = checked_raw_len(raw.len(), max_frame).inspect_err(|_| dst.truncate(start))?;
    dst[start + 4] = z_kind;
    dst.put_u8(codec.id());
    dst.put_u32(raw_len);
    let body_len = dst.len() - start - 4 + zlen;
    dst[start..start + 4].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(())
}

/// Writes everything of `msg` except its data payload, which is returned so the caller can
/// send it without copying. The length field already accounts for the payload.
pub fn encode_head(
    msg: &Message,
    dst: &mut BytesMut,
    max_frame: u32,
) -> Result<Option<Bytes>, ProtocolError> {
    let start = dst.len();
    dst.put_u32(0); // patched below
    let payload = match msg {
        Message::Request { cookie, request } => {
            encode_request(*cookie, request, dst)?;
            match request {
                Request::Write { data, .. } => Some(data.clone()),
                _ => None,
            }
        }
        Message::Reply { cookie, reply } => {
            encode_reply(*cookie, reply, dst)?;
            match reply {
                Reply::Data(data) => Some(data.clone()),
                _ => None,
            }
        }
    };
    let body_len = dst.len() - start - 4 + payload.as_ref().map_or(0, Bytes::len);
    if body_len > max_frame as usize {
        dst.truncate(start);
        return Err(ProtocolError::FrameTooLarge {
            len: body_len as u64,
            max: max_frame.into(),
        });
    }
    dst[start..start + 4].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(payload)
}

fn put_str(dst: &mut BytesMut, s: &str) -> Result<(), ProtocolError> {
    let len = u16::try_from(s.len())
        .map_err(|_| ProtocolError::malformed("string longer than 65535 bytes"))?;
    dst.put_u16(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

fn encode_request(cookie: u64, request: &Request, dst: &mut BytesMut) -> Result<(), ProtocolError> {
    let kind = match request {
        Request::ListDisks => kind::LIST_DISKS,
        Request::Open { .. } => kind::OPEN,
        Request::Read { .. } => kind::READ,
        Request::Write { .. } => kind::WRITE,
        Request::Flush { .. } => kind::FLUSH,
        Request::Discard { .. } => kind::DISCARD,
        Request::BlockStatus { .. } => kind::BLOCK_STATUS,
        Request::Close { .. } => kind::CLOSE,
        Request::Identify => kind::IDENTIFY,
        Request::Power { .. } => kind::POWER,
        Request::WriteZeroes { .. } => kind::WRITE_ZEROES,
        Request::HashChunks { .. } => kind::HASH_CHUNKS,
        Request::MulticastJoin { .. } => kind::MULTICAST_JOIN,
        Request::MulticastStatus => kind::MULTICAST_STATUS,
        Request::SetBootEntry { .. } => kind::SET_BOOT_ENTRY,
        Request::LivePrepare { .. } => kind::LIVE_PREPARE,
        Request::LiveRemove => kind::LIVE_REMOVE,
        Request::LiveBoot { .. } => kind::LIVE_BOOT,
        Request::LiveCommit { .. } => kind::LIVE_COMMIT,
    };
    dst.put_u8(kind);
    dst.put_u64(cookie);
    match request {
        Request::ListDisks | Request::Identify | Request::MulticastStatus | Request::LiveRemove => {
        }
        Request::LivePrepare { size } => dst.put_u64(*size),
        Request::LiveBoot { menu } => {
            check_menu_len(menu.len())?;
            dst.put_slice(menu.as_bytes());
        }
        Request::LiveCommit { committed } => dst.put_u8(u8::from(*committed)),
        Request::MulticastJoin {
            handle,
            credentials,
        } => {
            dst.put_u32(*handle);
            dst.put_slice(&credentials.encode());
        }
        Request::SetBootEntry { load_option } => {
            check_load_option_len(load_option.len())?;
            dst.put_slice(load_option);
        }
        Request::Power { action } => dst.put_u8(match action {
            PowerAction::Reboot => 1,
            PowerAction::Poweroff => 2,
        }),
        Request::Open { disk, writable } => {
            put_str(dst, disk)?;
            dst.put_u8(u8::from(*writable));
        }
        Request::Read {
            handle,
            offset,
            len,
        } => {
            dst.put_u32(*handle);
            dst.put_u64(*offset);
            dst.put_u32(*len);
        }
        Request::Write { handle, offset, .. } => {
            dst.put_u32(*handle);
            dst.put_u64(*offset);
        }
        Request::Flush { handle } | Request::Close { handle } => dst.put_u32(*handle),
        Request::Discard {
            handle,
            offset,
            len,
        }
        | Request::BlockStatus {
            handle,
            offset,
            len,
        }
        | Request::WriteZeroes {
            handle,
            offset,
            len,
        } => {
            dst.put_u32(*handle);
            dst.put_u64(*offset);
            dst.put_u64(*len);
        }
        Request::HashChunks {
            handle,
            offset,
            len,
            chunk,
        } => {
            dst.put_u32(*handle);
            dst.put_u64(*offset);
            dst.put_u64(*len);
            dst.put_u32(*chunk);
        }
    }
    Ok(())
}

fn encode_reply(cookie: u64, reply: &Reply, dst: &mut BytesMut) -> Result<(), ProtocolError> {
    let kind = match reply {
        Reply::Disks(_) => kind::DISKS,
        Reply::Opened { .. } => kind::OPENED,
        Reply::Data(_) => kind::DATA,
        Reply::Done => kind::DONE,
        Reply::Status(_) => kind::STATUS,
        Reply::Identity(_) => kind::IDENTITY,
        Reply::Hashes(_) => kind::HASHES,
        Reply::Multicast(_) => kind::MULTICAST,
        Reply::BootEntry(_) => kind::BOOT_ENTRY,
        Reply::LiveMap(_) => kind::LIVE_MAP,
        Reply::Error { .. } => kind::ERROR,
    };
    dst.put_u8(kind);
    dst.put_u64(cookie);
    match reply {
        Reply::Disks(disks) => {
            dst.put_u32(disks.len() as u32);
            for d in disks {
                put_str(dst, &d.name)?;
                dst.put_u64(d.size);
                dst.put_u32(d.logical_sector);
                dst.put_u32(d.physical_sector);
                put_str(dst, &d.model)?;
                put_str(dst, &d.serial)?;
                dst.put_u8(u8::from(d.rotational));
                dst.put_u8(u8::from(d.read_only));
            }
        }
        Reply::Opened {
            handle,
            size,
            logical_sector,
            physical_sector,
            read_only,
        } => {
            dst.put_u32(*handle);
            dst.put_u64(*size);
            dst.put_u32(*logical_sector);
            dst.put_u32(*physical_sector);
            dst.put_u8(u8::from(*read_only));
        }
        Reply::Data(_) | Reply::Done => {}
        Reply::Identity(doc) => {
            if doc.len() > MAX_IDENTITY {
                return Err(ProtocolError::malformed(format!(
                    "identity of {} bytes is larger than {MAX_IDENTITY}",
                    doc.len()
                )));
            }
            dst.put_slice(doc.as_bytes());
        }
        Reply::Status(extents) => {
            dst.put_u32(extents.len() as u32);
            for e in extents {
                dst.put_u64(e.len);
                dst.put_u8(match e.state {
                    BlockState::Data => 0,
                    BlockState::Zero => 1,
                    BlockState::Unknown => 2,
                });
            }
        }
        Reply::Hashes(hashes) => {
            if hashes.len() > MAX_HASHES {
                return Err(ProtocolError::malformed(format!(
                    "{} hashes are more than {MAX_HASHES}",
                    hashes.len()
                )));
            }
            dst.put_u32(hashes.len() as u32);
            hashes.iter().for_each(|h| dst.put_slice(h));
        }
        Reply::BootEntry(number) => dst.put_u16(*number),
        Reply::LiveMap(map) => {
            check_live_runs(map.runs.len())?;
            put_str(dst, &map.disk)?;
            put_str(dst, &map.path)?;
            dst.put_u32(map.block_size);
            dst.put_u32(map.runs.len() as u32);
            for r in &map.runs {
                dst.put_u64(r.offset);
                dst.put_u64(r.len);
            }
        }
        Reply::Multicast(status) => {
            dst.put_u8(match status.state {
                MulticastState::Idle => 0,
                MulticastState::Running => 1,
                MulticastState::Done => 2,
                MulticastState::Failed => 3,
            });
            dst.put_u64(status.received);
            dst.put_u64(status.total);
            put_str(dst, &status.message)?;
        }
        Reply::Error { code, message } => {
            dst.put_u16(code.to_u16());
            put_str(dst, message)?;
        }
    }
    Ok(())
}

/// A bounds-checked reader over one frame's bytes.
struct Body {
    buf: Bytes,
}

impl Body {
    fn need(&self, n: usize, what: &str) -> Result<(), ProtocolError> {
        if self.buf.remaining() < n {
            return Err(ProtocolError::malformed(format!(
                "frame ends inside {what}"
            )));
        }
        Ok(())
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtocolError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn bool(&mut self, what: &str) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(ProtocolError::malformed(format!(
                "{what} must be 0 or 1, got {n}"
            ))),
        }
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtocolError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtocolError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtocolError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn string(&mut self, what: &str) -> Result<String, ProtocolError> {
        let len = self.u16(what)? as usize;
        self.need(len, what)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec())
            .map_err(|_| ProtocolError::malformed(format!("{what} is not UTF-8")))
    }
    /// A count of records of at least `min_len` bytes each, checked against what is present.
    fn count(&mut self, min_len: usize, what: &str) -> Result<usize, ProtocolError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_len) > self.buf.remaining() {
            return Err(ProtocolError::malformed(format!(
                "{what}: {n} entries cannot fit in the frame"
            )));
        }
        Ok(n)
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    /// The rest of the frame as a compressed payload, decompressed within the codec's limits.
    fn compressed(&mut self, codec: &FrameCodec) -> Result<Bytes, ProtocolError> {
        let id = self.u8("compression codec")?;
        let raw_len = self.u32("raw length")?;
        let data = self.rest();
        compress::decode_payload(codec.compression, id, raw_len, &data, codec.max_payload)
    }
    fn finish(self, what: &str) -> Result<(), ProtocolError> {
        if self.buf.has_remaining() {
            return Err(ProtocolError::malformed(format!(
                "{} trailing bytes after {what}",
                self.buf.remaining()
            )));
        }
        Ok(())
    }
}

fn decode_frame(buf: Bytes, codec: &FrameCodec) -> Result<Message, ProtocolError> {
    let mut b = Body { buf };
    let kind = b.u8("kind")?;
    let cookie = b.u64("cookie")?;
    let msg = match kind {
        kind::WRITE_Z => Message::Request {
            cookie,
            request: Request::Write {
                handle: b.u32("handle")?,
                offset: b.u64("offset")?,
                data: b.compressed(codec)?,
            },
        },
        kind::DATA_Z => Message::Reply {
            cookie,
            reply: Reply::Data(b.compressed(codec)?),
        },
        k if k < 0x80 => Message::Request {
            cookie,
            request: decode_request(k, &mut b)?,
        },
        k => Message::Reply {
            cookie,
            reply: decode_reply(k, &mut b)?,
        },
    };
    b.finish("the message")?;
    Ok(msg)
}

fn decode_request(kind: u8, b: &mut Body) -> Result<Request, ProtocolError> {
    Ok(match kind {
        kind::LIST_DISKS => Request::ListDisks,
        kind::OPEN => Request::Open {
            disk: b.string("disk name")?,
            writable: b.bool("open mode")?,
        },
        kind::READ => Request::Read {
            handle: b.u32("handle")?,
            offset: b.u64("offset")?,
            len: b.u32("length")?,
        },
        kind::WRITE => Request::Write {
            handle: b.u32("handle")?,
            offset: b.u64("offset")?,
            data: b.rest(),
        },
        kind::FLUSH => Request::Flush {
            handle: b.u32("handle")?,
        },
        kind::DISCARD => Request::Discard {
            handle: b.u32("handle")?,
            offset: b.u64("offset")?,
            len: b.u64("length")?,
        },
        kind::BLOCK_STATUS => Request::BlockStatus {
            handle: b.u32("handle")?,
            offset: b.u64("offset")?,
            len: b.u64("length")?,
        },
        kind::CLOSE => Request::Close {
            handle: b.u32("handle")?,
        },
        kind::WRITE_ZEROES => Request::WriteZeroes {
            handle: b.u32("handle")?,
            offset: b.u64("offset")?,
            len: b.u64("length")?,
        },
        kind::HASH_CHUNKS => Request::HashChunks {
            handle: b.u32("handle")?,
            offset: b.u64("offset")?,
            len: b.u64("length")?,
            chunk: b.u32("chunk size")?,
        },
        kind::IDENTIFY => Request::Identify,
        kind::MULTICAST_STATUS => Request::MulticastStatus,
        kind::LIVE_PREPARE => Request::LivePrepare {
            size: b.u64("live file size")?,
        },
        kind::LIVE_REMOVE => Request::LiveRemove,
        kind::LIVE_BOOT => {
            let raw = b.rest();
            check_menu_len(raw.len())?;
            Request::LiveBoot {
                menu: String::from_utf8(raw.to_vec())
                    .map_err(|_| ProtocolError::malformed("a live menu is not UTF-8"))?,
            }
        }
        kind::LIVE_COMMIT => Request::LiveCommit {
            committed: b.bool("commit flag")?,
        },
        kind::SET_BOOT_ENTRY => {
            let load_option = b.rest();
            check_load_option_len(load_option.len())?;
            Request::SetBootEntry { load_option }
        }
        kind::MULTICAST_JOIN => Request::MulticastJoin {
            handle: b.u32("handle")?,
            credentials: Box::new(
                Credentials::decode(&b.rest())
                    .map_err(|e| ProtocolError::malformed(format!("multicast credentials: {e}")))?,
            ),
        },
        kind::POWER => Request::Power {
            action: match b.u8("power action")? {
                1 => PowerAction::Reboot,
                2 => PowerAction::Poweroff,
                n => {
                    return Err(ProtocolError::malformed(format!(
                        "unknown power action {n}"
                    )))
                }
            },
        },
        other => return Err(ProtocolError::UnknownKind(other)),
    })
}

fn decode_reply(kind: u8, b: &mut Body) -> Result<Reply, ProtocolError> {
    Ok(match kind {
        kind::DISKS => Reply::Disks(decode_disks(b)?),
        kind::OPENED => Reply::Opened {
            handle: b.u32("handle")?,
            size: b.u64("size")?,
            logical_sector: b.u32("logical sector size")?,
            physical_sector: b.u32("physical sector size")?,
            read_only: b.bool("read-only flag")?,
        },
        kind::DATA => Reply::Data(b.rest()),
        kind::IDENTITY => {
            let raw = b.rest();
            if raw.len() > MAX_IDENTITY {
                return Err(ProtocolError::malformed(format!(
                    "identity of {} bytes is larger than {MAX_IDENTITY}",
                    raw.len()
                )));
            }
            Reply::Identity(
                String::from_utf8(raw.to_vec())
                    .map_err(|_| ProtocolError::malformed("identity is not UTF-8"))?,
            )
        }
        kind::DONE => Reply::Done,
        kind::STATUS => Reply::Status(decode_extents(b)?),
        kind::HASHES => Reply::Hashes(decode_hashes(b)?),
        kind::BOOT_ENTRY => Reply::BootEntry(b.u16("boot entry number")?),
        kind::LIVE_MAP => Reply::LiveMap(decode_live_map(b)?),
        kind::MULTICAST => Reply::Multicast(MulticastStatus {
            state: match b.u8("multicast state")? {
                0 => MulticastState::Idle,
                1 => MulticastState::Running,
                2 => MulticastState::Done,
                3 => MulticastState::Failed,
                n => {
                    return Err(ProtocolError::malformed(format!(
                        "unknown multicast state {n}"
                    )))
                }
            },
            received: b.u64("packets received")?,
            total: b.u64("packets in the session")?,
            message: b.string("multicast message")?,
        }),
        kind::ERROR => Reply::Error {
            code: ErrorCode::from_u16(b.u16("error code")?),
            message: b.string("error message")?,
        },
        other => return Err(ProtocolError::UnknownKind(other)),
    })
}

fn check_load_option_len(len: usize) -> Result<(), ProtocolError> {
    if len > MAX_LOAD_OPTION {
        return Err(ProtocolError::malformed(format!(
            "a load option of {len} bytes is larger than {MAX_LOAD_OPTION}"
        )));
    }
    Ok(())
}

fn check_menu_len(len: usize) -> Result<(), ProtocolError> {
    if len > MAX_LIVE_MENU {
        return Err(ProtocolError::malformed(format!(
            "a live menu of {len} bytes is larger than {MAX_LIVE_MENU}"
        )));
    }
    Ok(())
}

fn check_live_runs(n: usize) -> Result<(), ProtocolError> {
    if n > MAX_LIVE_EXTENTS {
        return Err(ProtocolError::malformed(format!(
            "a live map of {n} runs has more than {MAX_LIVE_EXTENTS}"
        )));
    }
    Ok(())
}

fn decode_live_map(b: &mut Body) -> Result<LiveMap, ProtocolError> {
    let disk = b.string("live disk")?;
    let path = b.string("live file path")?;
    let block_size = b.u32("live block size")?;
    let n = b.count(RUN_LEN, "live map")?;
    check_live_runs(n)?;
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        runs.push(DiskRun {
            offset: b.u64("run offset")?,
            len: b.u64("run length")?,
        });
    }
    Ok(LiveMap {
        disk,
        path,
        block_size,
        runs,
    })
}

fn decode_disks(b: &mut Body) -> Result<Vec<DiskInfo>, ProtocolError> {
    let n = b.count(MIN_DISK_INFO_LEN, "disk list")?;
    let mut disks = Vec::with_capacity(n);
    for _ in 0..n {
        disks.push(DiskInfo {
            name: b.string("disk name")?,
            size: b.u64("disk size")?,
            logical_sector: b.u32("logical sector size")?,
            physical_sector: b.u32("physical sector size")?,
            model: b.string("model")?,
            serial: b.string("serial")?,
            rotational: b.bool("rotational flag")?,
            read_only: b.bool("read-only flag")?,
        });
    }
    Ok(disks)
}

fn decode_extents(b: &mut Body) -> Result<Vec<Extent>, ProtocolError> {
    let n = b.count(EXTENT_LEN, "extent list")?;
    let mut extents = Vec::with_capacity(n);
    for _ in 0..n {
        let len = b.u64("extent length")?;
        let state = match b.u8("extent state")? {
            0 => BlockState::Data,
            1 => BlockState::Zero,
            2 => BlockState::Unknown,
            s => {
                return Err(ProtocolError::malformed(format!(
                    "unknown extent state {s}"
                )))
            }
        };
        extents.push(Extent { len, state });
    }
    Ok(extents)
}

fn decode_hashes(b: &mut Body) -> Result<Vec<ChunkHash>, ProtocolError> {
    let n = b.count(HASH_LEN, "hash list")?;
    if n > MAX_HASHES {
        return Err(ProtocolError::malformed(format!(
            "{n} hashes are more than {MAX_HASHES}"
        )));
    }
    let mut hashes = Vec::with_capacity(n);
    for _ in 0..n {
        b.need(HASH_LEN, "a hash")?;
        let mut h = [0u8; HASH_LEN];
        b.buf.copy_to_slice(&mut h);
        hashes.push(h);
    }
    Ok(hashes)
}
