//! The messages of the block protocol: requests from the server, replies from the client.
//!
//! Every request carries a 64-bit cookie chosen by the requester; the reply echoes it. Replies
//! may arrive in any order, so many requests can be in flight on one connection.

use bytes::Bytes;

/// One frame on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request { cookie: u64, request: Request },
    Reply { cookie: u64, reply: Reply },
}

/// What the imaging server asks of a client. Offsets and lengths are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Describe every disk the client serves.
    ListDisks,
    /// Open a disk by name; the reply carries a handle for the other requests.
    Open {
        disk: String,
        writable: bool,
    },
    Read {
        handle: u32,
        offset: u64,
        len: u32,
    },
    Write {
        handle: u32,
        offset: u64,
        data: Bytes,
    },
    /// Make previous writes durable.
    Flush {
        handle: u32,
    },
    /// The range's contents are no longer needed (reads may then return zeros).
    Discard {
        handle: u32,
        offset: u64,
        len: u64,
    },
    /// Which parts of the range are known to be zero, cheaply.
    BlockStatus {
        handle: u32,
        offset: u64,
        len: u64,
    },
    Close {
        handle: u32,
    },
    /// The range must read as zeros afterwards; the client zeroes it on its side (hole
    /// punching, the device's write-zeroes), so no zeros cross the wire.
    WriteZeroes {
        handle: u32,
        offset: u64,
        len: u64,
    },
    /// Hash the range in fixed chunks (see [`crate::chunks`]): answered with
    /// [`Reply::Hashes`], one hash per chunk, so the server learns what changed without the
    /// bytes crossing the wire.
    HashChunks {
        handle: u32,
        offset: u64,
        len: u64,
        chunk: u32,
    },
    /// Describe the machine (dial-back agents): answered with [`Reply::Identity`].
    Identify,
    /// Reboot or power off the machine, after answering (only agents allowed to).
    Power {
        action: PowerAction,
    },
    /// Join a multicast deploy session ([`crate::multicast`]) and receive it into the disk
    /// opened writable as `handle`. Answered with [`Reply::Done`] once the group is joined;
    /// the session then runs on its own, one per connection, and ends with the connection.
    MulticastJoin {
        handle: u32,
        credentials: Box<crate::multicast::Credentials>,
    },
    /// How this connection's multicast session is going: answered with [`Reply::Multicast`].
    MulticastStatus,
    /// Add a UEFI boot entry holding `load_option` (an `EFI_LOAD_OPTION`: attributes, file
    /// path list length, description, device path; at most [`MAX_LOAD_OPTION`] bytes) and put
    /// it first in `BootOrder`; answered with [`Reply::BootEntry`]. Only agents started with
    /// `--allow-firmware` obey.
    SetBootEntry {
        load_option: Bytes,
    },
    /// Create and pin the live file (agents started with `--live`): an ordinary file of
    /// `size` bytes in the running system's filesystem, allocated, made immutable, and mapped
    /// to the disk sectors holding it. Answered with [`Reply::LiveMap`]; writes to the disk
    /// are then allowed inside the map and nowhere else. Size 0 asks for the map of the file
    /// pinned; a pinned file is never handed out again to be written (refused).
    LivePrepare {
        size: u64,
    },
    /// Unpin and delete the live file; its space returns to the running system.
    LiveRemove,
    /// Install `menu` (GRUB script, at most [`MAX_LIVE_MENU`] bytes) as the running system's
    /// custom GRUB menu and boot its `diskferry-live` entry once (`next_entry`); an empty menu
    /// undoes it. Live agents only.
    LiveBoot {
        menu: String,
    },
    /// Mark the running (live-deployed) system committed, so its GRUB entry becomes the
    /// default — or no longer. Live agents only.
    LiveCommit {
        committed: bool,
    },
}

/// Largest menu a [`Request::LiveBoot`] may carry.
pub const MAX_LIVE_MENU: usize = 64 << 10;
/// The GRUB menu entry id of a live system (what `next_entry` names).
pub const LIVE_ENTRY_ID: &str = "diskferry-live";
/// A live system's state file (path from its root): a GRUB script of
/// [`LIVE_STATE_SIZE`] bytes setting `diskferry_committed` to 0 or 1, made by the deploy and
/// rewritten in place by the agent (GRUB reads it without the journal), which the running
/// system's menu sources: committed, the live system's entry is the default.
pub const LIVE_STATE: &str = "etc/diskferry/live.cfg";
/// The state file's size.
pub const LIVE_STATE_SIZE: usize = 1024;

/// The first line of a committed state file.
pub const LIVE_COMMITTED: &str = "set diskferry_committed=1\n";

/// Whether a state file's bytes (or their start) say committed.
pub fn is_live_committed(state: &[u8]) -> bool {
    state.starts_with(LIVE_COMMITTED.as_bytes())
}

/// The state file's content, committed or not: the assignment, then `#` lines to the size.
pub fn live_state(committed: bool) -> Vec<u8> {
    let mut b = format!("set diskferry_committed={}\n", u8::from(committed)).into_bytes();
    while b.len() < LIVE_STATE_SIZE {
        let line = (LIVE_STATE_SIZE - b.len()).min(64);
        b.extend(std::iter::repeat_n(b'#', line - 1));
        b.push(b'\n');
    }
    b
}

/// Largest load option a [`Request::SetBootEntry`] may carry.
pub const MAX_LOAD_OPTION: usize = 4096;

/// What a [`Request::Power`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Reboot,
    Poweroff,
}

/// Largest identity document a reply may carry.
pub const MAX_IDENTITY: usize = 256 << 10;

/// What a client answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Disks(Vec<DiskInfo>),
    Opened {
        handle: u32,
        size: u64,
        logical_sector: u32,
        physical_sector: u32,
        read_only: bool,
    },
    Data(Bytes),
    /// Success without data (Write, Flush, Discard, Close).
    Done,
    /// Consecutive extents starting at the requested offset. They may cover less than was
    /// asked (the requester asks again from where they end), never more.
    Status(Vec<Extent>),
    /// One hash per chunk of a [`Request::HashChunks`], in order.
    Hashes(Vec<crate::chunks::ChunkHash>),
    /// The machine's identity as a JSON document (at most [`MAX_IDENTITY`] bytes): MAC
    /// addresses, DMI vendor/product/serial/UUID, CPUs, memory, disks.
    Identity(String),
    /// The state of the connection's multicast session.
    Multicast(MulticastStatus),
    /// The number of the boot entry a [`Request::SetBootEntry`] wrote (`Boot####`).
    BootEntry(u16),
    /// Where the live file of a [`Request::LivePrepare`] lies on its disk.
    LiveMap(LiveMap),
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Most pieces a [`LiveMap`] may have: a file in more pieces is refused as too fragmented.
pub const MAX_LIVE_EXTENTS: usize = 4096;

/// The live file's file-to-sector map: which disk holds it and, in file order, the runs of
/// disk bytes holding its bytes (the file's offsets follow from the order: the runs cover it
/// from 0 without gaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMap {
    /// The served disk holding the file (the name [`Request::Open`] takes).
    pub disk: String,
    /// The file's path in the running system.
    pub path: String,
    /// The filesystem's block size: every run starts and ends on it.
    pub block_size: u32,
    pub runs: Vec<DiskRun>,
}

/// `len` bytes of the disk from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRun {
    pub offset: u64,
    pub len: u64,
}

impl LiveMap {
    /// The file's size: the sum of its runs.
    pub fn size(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

/// Where a connection's multicast session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MulticastState {
    /// No session was joined on this connection.
    Idle,
    Running,
    /// Every packet is on the disk, flushed.
    Done,
    /// The session ended without every packet (the message says why): the server falls back
    /// to writing this disk by unicast.
    Failed,
}

/// A [`Reply::Multicast`]: the session's state and packet counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MulticastStatus {
    pub state: MulticastState,
    /// Packets held so far.
    pub received: u64,
    /// Packets in the session.
    pub total: u64,
    /// Why it failed (empty otherwise).
    pub message: String,
}

/// A disk as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskInfo {
    /// The path as given to the client, or as in /dev (e.g. `/dev/sda`).
    pub name: String,
    pub size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub model: String,
    pub serial: String,
    pub rotational: bool,
    pub read_only: bool,
}

/// A run of bytes with one known state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub state: BlockState,
}

/// What the client knows about a range without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Allocated: may hold anything, must be read.
    Data,
    /// Reads as zeros (a hole, or discarded).
    Zero,
    /// The client cannot tell cheaply (e.g. a raw block device).
    Unknown,
}

/// Why a request failed. Unknown codes from newer peers are kept as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No disk by that name.
    NotFound,
    /// The client, the disk or the handle is read-only.
    ReadOnly,
    /// Offset or length beyond the end of the disk.
    OutOfRange,
    /// A length above the negotiated maximum payload.
    TooLarge,
    /// The operating system reported an I/O error.
    Io,
    /// No open disk has that handle.
    BadHandle,
    /// The operation is not possible on this disk.
    Unsupported,
    /// Access denied by the operating system.
    PermissionDenied,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NotFound => 1,
            ErrorCode::ReadOnly => 2,
            ErrorCode::OutOfRange => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::Io => 5,
            ErrorCode::BadHandle => 6,
            ErrorCode::Unsupported => 7,
            ErrorCode::PermissionDenied => 8,
            ErrorCode::Other(n) => n,
        }
    }

    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => ErrorCode::NotFound,
            2 => ErrorCode::ReadOnly,
            3 => ErrorCode::OutOfRange,
            4 => ErrorCode::TooLarge,
            5 => ErrorCode::Io,
            6 => ErrorCode::BadHandle,
            7 => ErrorCode::Unsupported,
            8 => ErrorCode::PermissionDenied,
            n => ErrorCode::Other(n),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::NotFound => f.write_str("not found"),
            ErrorCode::ReadOnly => f.write_str("read-only"),
            ErrorCode::OutOfRange => f.write_str("out of range"),
            ErrorCode::TooLarge => f.write_str("too large"),
            ErrorCode::Io => f.write_str("I/O error"),
            ErrorCode::BadHandle => f.write_str("bad handle"),
            ErrorCode::Unsupported => f.write_str("unsupported"),
            ErrorCode::PermissionDenied => f.write_str("permission denied"),
            ErrorCode::Other(n) => write!(f, "error {n}"),
        }
    }
}

impl Message {
    pub fn cookie(&self) -> u64 {
        match self {
            Message::Request { cookie, .. } | Message::Reply { cookie, .. } => *cookie,
        }
    }

    /// Bytes of data payload this message carries (Read reply or Write request).
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Request {
                request: Request::Write { data, .. },
                ..
            } => data.len(),
            Message::Reply {
                reply: Reply::Data(data),
                ..
            } => data.len(),
            _ => 0,
        }
    }
}

/// Which side of the block protocol a peer plays, independent of who opened the TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves disks (diskferry-client).
    Agent,
    /// Uses disks (the diskferry server).
    Controller,
}
