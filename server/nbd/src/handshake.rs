//! The fixed newstyle handshake: the greeting, then options until the client picks an export
//! (`OPT_GO` or `OPT_EXPORT_NAME`) or leaves. Served options: `LIST`, `INFO`, `GO`,
//! `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the one
//! context `base:allocation`), `ABORT`. `STARTTLS` is answered "unsupported" (exports listen on
//! loopback unless told otherwise; see ARCHITECTURE.md). Option data longer than
//! [`MAX_OPTION_DATA`] and clients that never choose ([`MAX_OPTIONS`]) are cut off.

use std::io::{Read, Write};

use crate::export::{Export, ExportSource};
use crate::proto::*;
use crate::NbdError;

/// What the client chose.
pub struct Negotiated {
    pub export: Export,
    pub structured: bool,
    /// `base:allocation` was selected: block status may be asked.
    pub allocation: bool,
}

/// Runs the handshake on `s`. `Ok(None)`: the client left (abort, or end of stream before it
/// chose).
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    exports: &dyn ExportSource,
) -> Result<Option<Negotiated>, NbdError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    s.flush()?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    let client = u32::from_be_bytes(flags);
    if client & CLIENT_FIXED_NEWSTYLE == 0
        || client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
    {
        return Err(NbdError::Client(format!(
            "client flags {client:#x}: only fixed newstyle clients are served"
        )));
    }
    let mut state = Options {
        exports,
        no_zeroes: client & CLIENT_NO_ZEROES != 0,
        structured: false,
        allocation: false,
    };
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; OptionHeader::LEN];
        s.read_exact(&mut head)?;
        let head = OptionHeader::parse(&head)?;
        if head.len > MAX_OPTION_DATA {
            return Err(WireError::TooLong {
                what: "option data",
                len: head.len.into(),
                max: MAX_OPTION_DATA.into(),
            }
            .into());
        }
        let mut data = vec![0u8; head.len as usize];
        s.read_exact(&mut data)?;
        match state.answer(s, head.option, &data)? {
            Step::More => {}
            Step::Leave => return Ok(None),
            Step::Transmit(export) => {
                return Ok(Some(Negotiated {
                    export,
                    structured: state.structured,
                    allocation: state.allocation,
                }))
            }
        }
        s.flush()?;
    }
    Err(NbdError::Client(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

/// Where the handshake goes after an option.
enum Step {
    More,
    Leave,
    Transmit(Export),
}

/// The handshake's state between options.
struct Options<'a> {
    exports: &'a dyn ExportSource,
    no_zeroes: bool,
    structured: bool,
    allocation: bool,
}

impl Options<'_> {
    fn answer<S: Write>(&mut self, s: &mut S, option: u32, data: &[u8]) -> Result<Step, NbdError> {
        match option {
            OPT_EXPORT_NAME => self.export_name(s, data),
            OPT_ABORT => {
                // The client may already be gone; the acknowledgement is a courtesy.
                let _ = s.write_all(&option_reply(option, REP_ACK, &[]));
                Ok(Step::Leave)
            }
            OPT_LIST if !data.is_empty() => error(s, option, REP_ERR_INVALID, "LIST takes no data"),
            OPT_LIST => self.list(s),
            OPT_INFO | OPT_GO => self.info(s, option, data),
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                error(s, option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            }
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                s.write_all(&option_reply(option, REP_ACK, &[]))?;
                Ok(Step::More)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(s, option, data),
            OPT_STARTTLS => error(
                s,
                option,
                REP_ERR_UNSUP,
                "TLS is not offered on this export",
            ),
            _ => error(s, option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn export_name<S: Write>(&mut self, s: &mut S, data: &[u8]) -> Result<Step, NbdError> {
        let name = String::from_utf8_lossy(data);
        let Some(export) = self.exports.find(&name) else {
            // The protocol has no way to refuse EXPORT_NAME but closing.
            return Err(NbdError::Client(format!("no export named {name:?}")));
        };
        let mut reply = Vec::with_capacity(134);
        reply.extend_from_slice(&export.device.size().to_be_bytes());
        reply.extend_from_slice(&export.transmission_flags().to_be_bytes());
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        s.write_all(&reply)?;
        // Structured replies are negotiated only through GO.
        self.structured = false;
        self.allocation = false;
        Ok(Step::Transmit(export))
    }

    fn list<S: Write>(&self, s: &mut S) -> Result<Step, NbdError> {
        for (name, description) in self.exports.list() {
            let mut data = Vec::new();
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(description.as_bytes());
            s.write_all(&option_reply(OPT_LIST, REP_SERVER, &data))?;
        }
        s.write_all(&option_reply(OPT_LIST, REP_ACK, &[]))?;
        Ok(Step::More)
    }

    fn info<S: Write>(&mut self, s: &mut S, option: u32, data: &[u8]) -> Result<Step, NbdError> {
        let req = match InfoRequest::parse(data) {
            Ok(r) => r,
            Err(e) => return error(s, option, REP_ERR_INVALID, &e.to_string()),
        };
        let Some(export) = self.exports.find(&req.name) else {
            return error(s, option, REP_ERR_UNKNOWN, "no such export");
        };
        let mut info = Vec::new();
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.device.size().to_be_bytes());
        info.extend_from_slice(&export.transmission_flags().to_be_bytes());
        s.write_all(&option_reply(option, REP_INFO, &info))?;
        for kind in &req.infos {
            if let Some(info) = extra_info(&export, *kind) {
                s.write_all(&option_reply(option, REP_INFO, &info))?;
            }
        }
        s.write_all(&option_reply(option, REP_ACK, &[]))?;
        Ok(if option == OPT_GO {
            Step::Transmit(export)
        } else {
            Step::More
        })
    }

    fn meta<S: Write>(&mut self, s: &mut S, option: u32, data: &[u8]) -> Result<Step, NbdError> {
        let req = match MetaRequest::parse(data) {
            Ok(r) => r,
            Err(e) => return error(s, option, REP_ERR_INVALID, &e.to_string()),
        };
        if option == OPT_SET_META_CONTEXT && !self.structured {
            return error(
                s,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
        }
        if self.exports.find(&req.export).is_none() {
            return error(s, option, REP_ERR_UNKNOWN, "no such export");
        }
        let listing = option == OPT_LIST_META_CONTEXT;
        let matches = |q: &str| q == BASE_ALLOCATION || (listing && q == "base:");
        let selected = if listing && req.queries.is_empty() {
            true
        } else {
            req.queries.iter().any(|q| matches(q))
        };
        if selected {
            let mut ctx = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
            s.write_all(&option_reply(option, REP_META_CONTEXT, &ctx))?;
        }
        if !listing {
            self.allocation = selected;
        }
        s.write_all(&option_reply(option, REP_ACK, &[]))?;
        Ok(Step::More)
    }
}

/// The `REP_INFO` payload for an information type asked for beyond the export's size and
/// flags, when there is one.
fn extra_info(export: &Export, kind: u16) -> Option<Vec<u8>> {
    let mut out = kind.to_be_bytes().to_vec();
    match kind {
        INFO_NAME => out.extend_from_slice(export.name.as_bytes()),
        INFO_DESCRIPTION if !export.description.is_empty() => {
            out.extend_from_slice(export.description.as_bytes())
        }
        INFO_BLOCK_SIZE => {
            let (min, preferred, max) = export.block_sizes();
            for v in [min, preferred, max] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        _ => return None,
    }
    Some(out)
}

/// Sends an error reply (with a message for people reading traces) and goes on.
fn error<S: Write>(s: &mut S, option: u32, kind: u32, message: &str) -> Result<Step, NbdError> {
    tracing::debug!(option, "refused: {message}");
    s.write_all(&option_reply(option, kind, message.as_bytes()))?;
    Ok(Step::More)
}
