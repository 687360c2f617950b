//! What a server exports: named block devices, each read-only or writable, and how each one's
//! transmission flags and block-size constraints are advertised.

use std::sync::Arc;

use diskferry_blockdev::BlockDevice;

use crate::proto::*;

/// One export: a device under a name.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    /// Shown by `OPT_LIST` and `NBD_INFO_DESCRIPTION` (e.g. what the capture is).
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    /// Writes reach the device; otherwise the export is read-only and writes fail `EPERM`.
    pub writable: bool,
}

impl Export {
    /// The transmission flags: flush, FUA, trim and write-zeroes for writable exports,
    /// `DF` (reads come back in one chunk), and multi-connection safety — every connection
    /// shares the one device, so a flush on any connection covers writes made on all.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_DF | TX_CAN_MULTI_CONN;
        if self.writable {
            flags |= TX_SEND_FUA | TX_SEND_TRIM | TX_SEND_WRITE_ZEROES;
        } else {
            flags |= TX_READ_ONLY;
        }
        flags
    }

    /// Block size constraints: any alignment works, 4 KiB is preferred, payloads are bounded.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (1, 4096, MAX_PAYLOAD)
    }
}

/// Where a server's exports come from: a fixed list ([`Exports`]), or something that looks a
/// name up when a client asks for it (the daemon's catalog of captures).
pub trait ExportSource: Send + Sync {
    /// The export named `name` (the empty name: the default export, if there is one).
    fn find(&self, name: &str) -> Option<Export>;
    /// Every export's name and description, for `OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}

/// A fixed list of exports; the empty name is the first one.
#[derive(Clone, Default)]
pub struct Exports(Vec<Export>);

impl Exports {
    pub fn new(exports: Vec<Export>) -> Exports {
        Exports(exports)
    }
}

impl ExportSource for Exports {
    fn find(&self, name: &str) -> Option<Export> {
        if name.is_empty() {
            return self.0.first().cloned();
        }
        self.0.iter().find(|e| e.name == name).cloned()
    }

    fn list(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
}
