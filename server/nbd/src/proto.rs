//! The NBD wire format (the protocol document of the NetworkBlockDevice project): magic
//! numbers, option and command codes, flags, and the fixed-size headers this server reads and
//! writes, as plain values — no I/O here, so the parsers can be fuzzed on byte slices.
//!
//! Every length a peer sends is checked against a bound before anything is allocated for it:
//! [`MAX_OPTION_DATA`] for option payloads, [`MAX_PAYLOAD`] for a request's data.

/// 'NBDMAGIC', the first thing the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// 'IHAVEOPT': starts the newstyle greeting and every option the client sends.
pub const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information types in `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TX_HAS_FLAGS: u16 = 1 << 0;
pub const TX_READ_ONLY: u16 = 1 << 1;
pub const TX_SEND_FLUSH: u16 = 1 << 2;
pub const TX_SEND_FUA: u16 = 1 << 3;
pub const TX_SEND_TRIM: u16 = 1 << 5;
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TX_SEND_DF: u16 = 1 << 7;
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` descriptor flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Errors carried in replies (errno values, as the protocol fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// Largest option payload accepted (the protocol's advice: names and queries are short).
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Largest READ or WRITE payload (advertised as the maximum block size); longer writes close
/// the connection, longer reads are refused with `EINVAL`.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Most extents one block-status reply describes.
pub const MAX_EXTENTS: usize = 1024;
/// Most meta-context queries one option may carry.
pub const MAX_QUERIES: u32 = 64;
/// Most options one client may send before choosing an export.
pub const MAX_OPTIONS: usize = 256;

/// Why a peer's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    Magic { expected: u64, found: u64 },
    #[error("{what} is truncated")]
    Truncated { what: &'static str },
    #[error("{what} of {len} bytes is longer than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{0}")]
    Invalid(&'static str),
}

/// A client's option header: which option, and how many bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8; Self::LEN]) -> Result<OptionHeader, WireError> {
        let magic = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
        if magic != OPT_MAGIC {
            return Err(WireError::Magic {
                expected: OPT_MAGIC,
                found: magic,
            });
        }
        Ok(OptionHeader {
            option: be32(&b[8..12]),
            len: be32(&b[12..16]),
        })
    }
}

/// An option reply header followed by `len` bytes of data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A cursor over option data that fails instead of reading past the end.
pub struct Cursor<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8], what: &'static str) -> Cursor<'a> {
        Cursor { data, what }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.data.len() < n {
            return Err(WireError::Truncated { what: self.what });
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(be32(self.take(4)?))
    }
    /// A u32 length, then that many bytes (bounded by what is left).
    pub fn string(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// What `OPT_INFO` and `OPT_GO` ask: an export name and the information types wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<InfoRequest, WireError> {
        let mut c = Cursor::new(data, "info request");
        let name = utf8(c.string()?)?;
        let count = c.u16()?;
        let infos = (0..count).map(|_| c.u16()).collect::<Result<_, _>>()?;
        if !c.is_empty() {
            return Err(WireError::Invalid("trailing bytes after the info requests"));
        }
        Ok(InfoRequest { name, infos })
    }
}

/// What `OPT_LIST_META_CONTEXT` and `OPT_SET_META_CONTEXT` ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaRequest {
    pub fn parse(data: &[u8]) -> Result<MetaRequest, WireError> {
        let mut c = Cursor::new(data, "meta context request");
        let export = utf8(c.string()?)?;
        let count = c.u32()?;
        if count > MAX_QUERIES {
            return Err(WireError::TooLong {
                what: "meta context query list",
                len: count.into(),
                max: MAX_QUERIES.into(),
            });
        }
        let queries = (0..count)
            .map(|_| c.string().and_then(utf8))
            .collect::<Result<_, _>>()?;
        if !c.is_empty() {
            return Err(WireError::Invalid("trailing bytes after the queries"));
        }
        Ok(MetaRequest { export, queries })
    }
}

/// A transmission-phase request header (its WRITE payload follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub const LEN: usize = 28;

    pub fn parse(b: &[u8; Self::LEN]) -> Result<Request, WireError> {
        let magic = be32(&b[..4]);
        if magic != REQUEST_MAGIC {
            return Err(WireError::Magic {
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            len: be32(&b[24..28]),
        })
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header for `len` bytes of payload.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
    out
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn utf8(b: &[u8]) -> Result<String, WireError> {
    String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid("a name is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_and_lies_about_lengths_are_refused() {
        let mut data = Vec::new();
        data.extend_from_slice(&4u32.to_be_bytes());
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        let req = InfoRequest::parse(&data).unwrap();
        assert_eq!(req.name, "disk");
        assert_eq!(req.infos, [INFO_BLOCK_SIZE, INFO_NAME]);
        // A name length far past the data.
        let mut lie = data.clone();
        lie[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(InfoRequest::parse(&lie).is_err());
        // An info count past the data.
        let mut lie = data.clone();
        lie[8..10].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(InfoRequest::parse(&lie).is_err());
        assert!(InfoRequest::parse(&data[..data.len() - 1]).is_err());
    }

    #[test]
    fn meta_requests_bound_their_query_count() {
        let mut data = Vec::new();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&15u32.to_be_bytes());
        data.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let req = MetaRequest::parse(&data).unwrap();
        assert_eq!(req.queries, [BASE_ALLOCATION]);
        data[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            MetaRequest::parse(&data),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn requests_need_their_magic() {
        let mut b = [0u8; Request::LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[7] = CMD_READ as u8;
        b[27] = 9;
        assert_eq!(Request::parse(&b).unwrap().len, 9);
        b[0] = 0;
        assert!(Request::parse(&b).is_err());
    }
}
