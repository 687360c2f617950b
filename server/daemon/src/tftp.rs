//! A read-only TFTP server (RFC 1350, with the blksize and tsize options of RFC 2347–2349) for
//! machines whose firmware only does legacy PXE: they fetch iPXE (`undionly.kpxe`,
//! `ipxe.efi`, `snponly.efi` from Debian's `ipxe` package) and iPXE then loads `/boot.ipxe`
//! over HTTP. Files are served by plain name from a list of directories — no paths, no
//! writes.
//!
//! UDP sources are spoofable, so the server does little for a request it cannot verify:
//!
//! - **Bounded transfers.** At most [`MAX_TRANSFERS`] run at once, and [`MAX_PER_SOURCE`] per
//!   source address. A request over either cap is *dropped* without a reply: an answer would
//!   be traffic towards a possibly spoofed address, and a real client resends its request
//!   after its own timeout, when a slot may be free. Only admitted requests get a task and a
//!   socket; anything that is not a well-formed read request is dropped too.
//! - **Bounded amplification.** Until the peer acknowledges something, the first packet (an
//!   OACK, or DATA 1 without options) is sent at most [`FIRST_SENDS`] times, 1 s then 2 s
//!   apart; only an acknowledged transfer gets the ordinary [`RETRIES`]. An error (not found,
//!   too large) is sent once. The largest first packet is DATA 1 at the default 512-byte block
//!   (516 bytes; an OACK is at most 30, an error 28), so one spoofed request makes the server
//!   send at most [`UNACKED_BYTES_MAX`] = 2 × 516 = 1,032 bytes. The smallest request naming
//!   a file is 10 bytes (`00 01 'x' 00 "octet" 00`): the worst ratio of bytes out to bytes in
//!   is 1,032 / 10 ≈ 103, ≈ 47 for `undionly.kpxe` (22 bytes in), ≈ 1.4 for a request with
//!   options (answered by an OACK). Before, it was 5 × 516 = 2,580 bytes per request (≈ 107
//!   for `undionly.kpxe`), for any number of requests. With the per-source cap an address that
//!   never acknowledges receives at most 4 × 1,032 bytes per 3 s (the time an unacknowledged
//!   transfer holds its slot), and all addresses together at most 32 × 1,032 bytes per 3 s.
//! - **Size first, then stream.** The file's size is checked from its metadata before
//!   anything is read ([`MAX_FILE`]), then blocks are read from the open file as they are
//!   sent: memory per transfer is one block and a 64 KiB read buffer, whatever the file.
//! - **Replies from the listener's address.** Each transfer's socket is bound to the
//!   listener's IP address (a new port identifies the transfer), so a server listening on
//!   127.0.0.1 or on one interface never answers from another.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::admission::{self, Admission, Ticket};

use tokio::fs::File;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::net::UdpSocket;

const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;
/// Block size without the blksize option.
const DEFAULT_BLOCK: usize = 512;
/// Largest block size granted (fits a 1500-byte Ethernet frame).
const MAX_BLOCK: usize = 1468;
/// Wait for an acknowledgement before resending.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Sends of a block once the peer has acknowledged something.
const RETRIES: u32 = 5;
/// Sends of the first packet while the peer has acknowledged nothing (it may be spoofed).
pub const FIRST_SENDS: u32 = 2;
/// Most bytes one request makes the server send to a peer that never acknowledges: every
/// send of the largest first packet (DATA 1 at the default block size).
pub const UNACKED_BYTES_MAX: usize = FIRST_SENDS as usize * (4 + DEFAULT_BLOCK);
/// Transfers running at once.
pub const MAX_TRANSFERS: usize = 32;
/// Transfers running at once for one source address.
pub const MAX_PER_SOURCE: usize = 4;
/// Largest file served (iPXE images are well under 1 MiB; kernels go over HTTP).
pub const MAX_FILE: u64 = 64 << 20;
/// Read buffer per transfer (blocks are at most [`MAX_BLOCK`]).
const READ_BUFFER: usize = 64 << 10;
/// Longest one transfer may hold its slot: iPXE images take seconds even on slow links, so a
/// client that acknowledges just often enough cannot keep the slots for good.
pub const MAX_TRANSFER_TIME: Duration = Duration::from_secs(120);

/// Where files come from.
#[derive(Debug, Clone)]
pub struct TftpRoots(pub Vec<PathBuf>);

impl TftpRoots {
    /// The first directory holding `name`, if `name` is a plain file name.
    fn find(&self, name: &str) -> Option<PathBuf> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains(['/', '\\', '\0']) || name.starts_with('.') {
            return None;
        }
        self.0.iter().map(|d| d.join(name)).find(|p| p.is_file())
    }
}

/// A parsed read request.
#[derive(Debug, PartialEq)]
struct ReadRequest {
    file: String,
    blksize: Option<usize>,
    tsize: bool,
}

/// Why a request was dropped or a transfer ended early.
#[derive(Debug, thiserror::Error)]
enum TftpError {
    #[error("packet too short")]
    Short,
    #[error("this server is read-only")]
    ReadOnly,
    #[error("malformed read request")]
    Malformed,
    #[error("unsupported mode {0}")]
    Mode(String),
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: too large")]
    TooLarge(String),
    #[error("the client gave up")]
    GaveUp,
    #[error("no acknowledgement of block {0}")]
    NoAck(u16),
    #[error("never acknowledged the first packet (a spoofed request, or a client gone)")]
    Unanswered,
    #[error("the transfer took longer than {} s", MAX_TRANSFER_TIME.as_secs())]
    TooSlow,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl TftpError {
    /// The error packet that tells the peer why its file is not coming (for the errors of
    /// [`open_file`]).
    fn packet(&self) -> Option<Vec<u8>> {
        match self {
            TftpError::NotFound(_) => Some(error_packet(1, "file not found")),
            TftpError::TooLarge(_) => Some(error_packet(3, "file too large for TFTP")),
            TftpError::Io(_) => Some(error_packet(0, "cannot read the file")),
            _ => None,
        }
    }
}

/// Parses a request packet: `Ok(None)` for packets that are not a read request.
fn parse_request(p: &[u8]) -> Result<Option<ReadRequest>, TftpError> {
    if p.len() < 4 {
        return Err(TftpError::Short);
    }
    let op = u16::from_be_bytes([p[0], p[1]]);
    if op == WRQ {
        return Err(TftpError::ReadOnly);
    }
    if op != RRQ {
        return Ok(None);
    }
    let fields: Vec<&[u8]> = p[2..].split(|&b| b == 0).collect();
    // name, mode, then option/value pairs; the packet ends with a NUL (an empty last field).
    if fields.len() < 3 || !fields.last().is_some_and(|f| f.is_empty()) {
        return Err(TftpError::Malformed);
    }
    let text = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    let file = text(fields[0]);
    let mode = text(fields[1]).to_ascii_lowercase();
    if mode != "octet" && mode != "netascii" {
        return Err(TftpError::Mode(mode));
    }
    let mut req = ReadRequest {
        file,
        blksize: None,
        tsize: false,
    };
    let opts = &fields[2..fields.len() - 1];
    for pair in opts.chunks(2) {
        let [name, value] = pair else { break };
        match text(name).to_ascii_lowercase().as_str() {
            "blksize" => {
                if let Ok(n) = text(value).parse::<usize>() {
                    if n >= 8 {
                        req.blksize = Some(n.min(MAX_BLOCK));
                    }
                }
            }
            "tsize" => req.tsize = true,
            _ => {}
        }
    }
    Ok(Some(req))
}

fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + msg.len());
    p.extend_from_slice(&ERROR.to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.push(0);
    p
}

/// The caps and the wait a server works with (tests shorten or lengthen the wait).
#[derive(Debug, Clone, Copy)]
struct Limits {
    transfers: usize,
    per_source: usize,
    timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            transfers: MAX_TRANSFERS,
            per_source: MAX_PER_SOURCE,
            timeout: TIMEOUT,
        }
    }
}

/// Serves requests on `socket` until the process ends.
pub async fn serve(socket: UdpSocket, roots: TftpRoots) {
    serve_with(socket, roots, Limits::default()).await;
}

async fn serve_with(socket: UdpSocket, roots: TftpRoots, limits: Limits) {
    let local_ip = match socket.local_addr() {
        Ok(a) => a.ip(),
        Err(e) => {
            tracing::error!("tftp: the listening socket has no address: {e}");
            return;
        }
    };
    let admission = Admission::new(admission::Limits {
        per_address: limits.per_source,
        total: limits.transfers,
    });
    let roots = Arc::new(roots);
    let mut buf = vec![0u8; 1024];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some((req, slot)) = admit(&buf[..n], peer, &admission) else {
            continue;
        };
        let roots = Arc::clone(&roots);
        tokio::spawn(async move {
            let _slot = slot;
            let file = req.file.clone();
            let work = transfer(req, peer, local_ip, &roots, limits.timeout);
            let result = tokio::time::timeout(MAX_TRANSFER_TIME, work)
                .await
                .unwrap_or(Err(TftpError::TooSlow));
            match result {
                Ok(()) => {}
                // Likely a spoofed request: not worth a warning each.
                Err(e @ TftpError::Unanswered) => {
                    tracing::debug!(%peer, "tftp {peer}: {file}: {e}")
                }
                Err(e) => tracing::warn!(%peer, "tftp {peer}: {file}: {e}"),
            }
        });
    }
}

/// A well-formed read request under the caps, with its slot; anything else is dropped (and
/// logged at debug level: a flood must not flood the log).
fn admit(
    packet: &[u8],
    peer: SocketAddr,
    admission: &Arc<Admission>,
) -> Option<(ReadRequest, Ticket)> {
    let req = match parse_request(packet) {
        Ok(Some(req)) => req,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(%peer, "tftp {peer}: dropped: {e}");
            return None;
        }
    };
    match admission.admit(peer.ip()) {
        Ok(slot) => Some((req, slot)),
        Err(_) => {
            tracing::debug!(%peer, "tftp {peer}: busy, request for {} dropped", req.file);
            None
        }
    }
}

/// Answers one request from a fresh socket on the listener's address (its port identifies
/// the transfer).
async fn transfer(
    req: ReadRequest,
    peer: SocketAddr,
    local_ip: IpAddr,
    roots: &TftpRoots,
    timeout: Duration,
) -> Result<(), TftpError> {
    let sock = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    sock.connect(peer).await?;
    let mut link = Link {
        sock,
        timeout,
        acknowledged: false,
    };
    let (file, size) = match open_file(roots, &req.file).await {
        Ok(f) => f,
        Err(e) => {
            if let Some(p) = e.packet() {
                let _ = link.sock.send(&p).await;
            }
            return Err(e);
        }
    };
    // Options acknowledged first; the client answers with ACK 0.
    if let Some(oack) = options_ack(&req, size) {
        link.send_until_acked(&oack, 0).await?;
    }
    let block = req.blksize.unwrap_or(DEFAULT_BLOCK);
    let reader = BufReader::with_capacity(READ_BUFFER, file).take(size);
    send_blocks(&mut link, reader, block).await
}

/// The OACK granting a request's options, if it asked for any.
fn options_ack(req: &ReadRequest, size: u64) -> Option<Vec<u8>> {
    if req.blksize.is_none() && !req.tsize {
        return None;
    }
    let mut oack = OACK.to_be_bytes().to_vec();
    if let Some(b) = req.blksize {
        oack.extend_from_slice(format!("blksize\0{b}\0").as_bytes());
    }
    if req.tsize {
        oack.extend_from_slice(format!("tsize\0{size}\0").as_bytes());
    }
    Some(oack)
}

/// The file a request names and its size, checked from its metadata before any read.
async fn open_file(roots: &TftpRoots, name: &str) -> Result<(File, u64), TftpError> {
    let path = roots
        .find(name)
        .ok_or_else(|| TftpError::NotFound(name.to_string()))?;
    let file = File::open(&path).await?;
    let size = file.metadata().await?.len();
    if size > MAX_FILE {
        return Err(TftpError::TooLarge(path.display().to_string()));
    }
    Ok((file, size))
}

/// Sends `reader` as DATA blocks of `block` bytes, each once the previous one is
/// acknowledged; a block shorter than `block` (perhaps empty) ends the transfer.
async fn send_blocks(
    link: &mut Link,
    mut reader: impl AsyncRead + Unpin,
    block: usize,
) -> Result<(), TftpError> {
    let mut packet = Vec::with_capacity(4 + block);
    let mut number: u16 = 1;
    loop {
        packet.clear();
        packet.extend_from_slice(&DATA.to_be_bytes());
        packet.extend_from_slice(&number.to_be_bytes());
        packet.resize(4 + block, 0);
        let got = read_full(&mut reader, &mut packet[4..]).await?;
        packet.truncate(4 + got);
        link.send_until_acked(&packet, number).await?;
        if got < block {
            return Ok(());
        }
        number = number.wrapping_add(1);
    }
}

/// Fills `buf` unless the reader ends first; returns how much was read.
async fn read_full(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match reader.read(&mut buf[at..]).await? {
            0 => break,
            n => at += n,
        }
    }
    Ok(at)
}

/// One transfer's socket, connected to its peer, and whether the peer has acknowledged
/// anything yet (until it has, it may be a spoofed address and gets only [`FIRST_SENDS`]).
struct Link {
    sock: UdpSocket,
    timeout: Duration,
    acknowledged: bool,
}

impl Link {
    /// Sends `packet` until ACK `number` comes back: [`RETRIES`] times a `timeout` apart once
    /// the peer has acknowledged something, else [`FIRST_SENDS`] times with doubling waits.
    async fn send_until_acked(&mut self, packet: &[u8], number: u16) -> Result<(), TftpError> {
        let (sends, growth) = if self.acknowledged {
            (RETRIES, 1)
        } else {
            (FIRST_SENDS, 2)
        };
        let mut wait = self.timeout;
        for _ in 0..sends {
            self.sock.send(packet).await?;
            if self.acked_within(number, wait).await? {
                self.acknowledged = true;
                return Ok(());
            }
            wait *= growth;
        }
        Err(match self.acknowledged {
            true => TftpError::NoAck(number),
            false => TftpError::Unanswered,
        })
    }

    /// Waits up to `wait` for ACK `number` (other packets are ignored).
    async fn acked_within(&self, number: u16, wait: Duration) -> Result<bool, TftpError> {
        let mut buf = [0u8; 516];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let n = match tokio::time::timeout_at(deadline, self.sock.recv(&mut buf)).await {
                Err(_) => return Ok(false),
                Ok(r) => r?,
            };
            if n < 4 {
                continue;
            }
            let op = u16::from_be_bytes([buf[0], buf[1]]);
            let got = u16::from_be_bytes([buf[2], buf[3]]);
            if op == ACK && got == number {
                return Ok(true);
            }
            if op == ERROR {
                return Err(TftpError::GaveUp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_paths_are_plain_names() {
        let p = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001432\x00tsize\x000\x00";
        assert_eq!(
            parse_request(p).unwrap(),
            Some(ReadRequest {
                file: "undionly.kpxe".into(),
                blksize: Some(1432),
                tsize: true
            })
        );
        assert!(
            parse_request(b"\x00\x02x\x00octet\x00").is_err(),
            "writes refused"
        );
        assert!(parse_request(b"\x00\x01x\x00mail\x00").is_err());
        assert!(parse_request(b"\x00\x01x").is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ipxe.efi"), b"x").unwrap();
        let roots = TftpRoots(vec![dir.path().to_path_buf()]);
        assert!(roots.find("ipxe.efi").is_some());
        assert!(roots.find("/ipxe.efi").is_some());
        for bad in ["../etc/passwd", "a/b", ".hidden", "", "x\\y"] {
            assert!(roots.find(bad).is_none(), "{bad}");
        }
    }

    use std::net::Ipv4Addr;

    /// A generous wait for packets that must come (a hang guard, not a speed check).
    const MUST_COME: Duration = Duration::from_secs(20);

    fn loopback(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    /// A directory holding `files`, and a server on `ip` serving it.
    async fn start(
        ip: IpAddr,
        files: &[(&str, &[u8])],
        limits: Limits,
    ) -> (tempfile::TempDir, SocketAddr) {
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in files {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let roots = TftpRoots(vec![dir.path().to_path_buf()]);
        tokio::spawn(serve_with(sock, roots, limits));
        (dir, addr)
    }

    fn patient() -> Limits {
        Limits {
            timeout: Duration::from_secs(60),
            ..Limits::default()
        }
    }

    fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
        let mut p = RRQ.to_be_bytes().to_vec();
        for field in [name, "octet"]
            .into_iter()
            .chain(options.iter().flat_map(|(k, v)| [*k, *v]))
        {
            p.extend_from_slice(field.as_bytes());
            p.push(0);
        }
        p
    }

    fn ack(number: u16) -> Vec<u8> {
        [ACK.to_be_bytes(), number.to_be_bytes()].concat()
    }

    async fn client(ip: IpAddr) -> UdpSocket {
        UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap()
    }

    /// The next packet on `sock` within `wait`, with where it came from.
    async fn next_packet(sock: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 2048];
        let (n, from) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        buf.truncate(n);
        Some((buf, from))
    }

    /// Sends a request without options and waits for DATA 1, resending the request the way
    /// clients do while the server is busy; returns DATA 1's payload and the transfer's
    /// address.
    async fn first_block(
        sock: &UdpSocket,
        server: SocketAddr,
        name: &str,
    ) -> (Vec<u8>, SocketAddr) {
        for _ in 0..20 {
            sock.send_to(&rrq(name, &[]), server).await.unwrap();
            if let Some((p, from)) = next_packet(sock, Duration::from_secs(1)).await {
                assert_eq!(&p[..4], &[0, 3, 0, 1], "DATA 1");
                return (p[4..].to_vec(), from);
            }
        }
        panic!("{name}: no answer from {server}");
    }

    /// Acknowledges block by block until the short last block; returns the whole file and
    /// every address a packet came from.
    async fn finish(sock: &UdpSocket, first: (Vec<u8>, SocketAddr)) -> (Vec<u8>, Vec<SocketAddr>) {
        let (mut data, tid) = first;
        let mut sources = vec![tid];
        let mut last = data.len();
        let mut number = 1u16;
        while last == DEFAULT_BLOCK {
            sock.send_to(&ack(number), tid).await.unwrap();
            let (p, from) = next_packet(sock, MUST_COME).await.expect("next block");
            sources.push(from);
            if from.port() != tid.port() {
                continue; // another transfer from a resent request
            }
            number += 1;
            assert_eq!(&p[..4], &[[0, 3], number.to_be_bytes()].concat()[..]);
            data.extend_from_slice(&p[4..]);
            last = p.len() - 4;
        }
        sock.send_to(&ack(number), tid).await.unwrap();
        (data, sources)
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 251) as u8).collect()
    }

    /// A flood over both caps is dropped while they hold; the transfers already admitted
    /// complete, and a request is served again once a slot is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_over_the_caps_are_dropped_and_admitted_ones_complete() {
        let file = sample(3000);
        let (_dir, server) = start(loopback(1), &[("boot.bin", &file)], patient()).await;
        let mut held = Vec::new();
        // MAX_PER_SOURCE from each of 127.0.0.1..: MAX_TRANSFERS in all.
        for source in 0..(MAX_TRANSFERS / MAX_PER_SOURCE) as u8 {
            for _ in 0..MAX_PER_SOURCE {
                let sock = client(loopback(source + 1)).await;
                let first = first_block(&sock, server, "boot.bin").await;
                held.push((sock, first));
            }
            if source == 0 {
                // This source is at its own cap while the total is not.
                let extra = client(loopback(1)).await;
                extra.send_to(&rrq("boot.bin", &[]), server).await.unwrap();
                let answer = next_packet(&extra, Duration::from_secs(1)).await;
                assert!(answer.is_none(), "per-source cap not applied: {answer:?}");
            }
        }
        let outsider = client(loopback(200)).await;
        for _ in 0..50 {
            outsider
                .send_to(&rrq("boot.bin", &[]), server)
                .await
                .unwrap();
        }
        let answer = next_packet(&outsider, Duration::from_secs(1)).await;
        assert!(answer.is_none(), "global cap not applied: {answer:?}");

        for (sock, first) in held.drain(..MAX_PER_SOURCE) {
            assert_eq!(finish(&sock, first).await.0, file);
        }
        // Places are free again: the outsider is served, and so is the first source.
        for ip in [loopback(200), loopback(1)] {
            let sock = client(ip).await;
            let first = first_block(&sock, server, "boot.bin").await;
            assert_eq!(finish(&sock, first).await.0, file);
        }
        for (sock, first) in held {
            assert_eq!(finish(&sock, first).await.0, file);
        }
    }

    /// A listener on 127.0.0.2 answers from 127.0.0.2: a transfer socket on 0.0.0.0 would
    /// answer a client on 127.0.0.1 from 127.0.0.1, the route's source address.
    #[tokio::test]
    async fn transfers_answer_from_the_listeners_address() {
        let file = sample(1500);
        let (_dir, server) = start(loopback(2), &[("boot.bin", &file)], patient()).await;
        let sock = client(loopback(1)).await;
        let first = first_block(&sock, server, "boot.bin").await;
        let (data, sources) = finish(&sock, first).await;
        assert_eq!(data, file);
        assert!(sources.len() > 1);
        for from in sources {
            assert_eq!(from.ip(), server.ip(), "a reply came from {from}");
            assert_ne!(from.port(), server.port(), "a transfer has its own port");
        }
    }

    /// Every byte the server sends for one request that is never acknowledged, and the ratio
    /// to the request's size; the server gives up after two short waits (100 + 200 ms).
    async fn bytes_for_unacked(request: &[u8], file: &[u8]) -> (usize, f64) {
        let limits = Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let (_dir, server) = start(loopback(1), &[("boot.bin", file)], limits).await;
        let spoofed = client(loopback(1)).await;
        spoofed.send_to(request, server).await.unwrap();
        let mut total = 0;
        // Until the server has been silent for well over its waits.
        while let Some((p, _)) = next_packet(&spoofed, Duration::from_secs(2)).await {
            total += p.len();
        }
        (total, total as f64 / request.len() as f64)
    }

    #[tokio::test]
    async fn a_request_never_acknowledged_gets_at_most_the_documented_bytes() {
        let file = sample(64 << 10);
        // Without options the first packet is DATA 1 of 512 bytes: the worst case.
        let request = rrq("boot.bin", &[]);
        let (out, ratio) = bytes_for_unacked(&request, &file).await;
        eprintln!(
            "no options: {} bytes in, {out} bytes out, ratio {ratio:.1}",
            request.len()
        );
        assert!(out >= 4 + DEFAULT_BLOCK, "the first block was sent ({out})");
        assert!(out <= UNACKED_BYTES_MAX, "{out} bytes sent unacknowledged");
        // The documented worst ratio is for the shortest request (a one-letter name).
        assert!(ratio <= UNACKED_BYTES_MAX as f64 / 10.0);
        // With options the first packet is a small OACK.
        let request = rrq("boot.bin", &[("blksize", "1468"), ("tsize", "0")]);
        let (out, ratio) = bytes_for_unacked(&request, &file).await;
        eprintln!(
            "blksize and tsize: {} bytes in, {out} bytes out, ratio {ratio:.1}",
            request.len()
        );
        assert!(out > 0 && out <= FIRST_SENDS as usize * 30, "{out} bytes");
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A 1 TiB sparse file is refused from its size alone: an error comes back and nothing
    /// was read into memory (the old code read whole files before checking).
    #[tokio::test]
    async fn a_file_over_the_limit_is_refused_without_being_read() {
        let (dir, server) = start(loopback(1), &[], patient()).await;
        let huge = std::fs::File::create(dir.path().join("huge.bin")).unwrap();
        huge.set_len(1 << 40).unwrap();
        let before = rss_kib();
        let sock = client(loopback(1)).await;
        sock.send_to(&rrq("huge.bin", &[("tsize", "0")]), server)
            .await
            .unwrap();
        let (p, _) = next_packet(&sock, MUST_COME).await.expect("an answer");
        let grown = rss_kib().saturating_sub(before);
        assert_eq!(&p[..4], &[0, 5, 0, 3], "ERROR 3: {p:?}");
        assert!(String::from_utf8_lossy(&p[4..]).contains("too large"));
        assert!(grown < 16 << 10, "RSS grew by {grown} KiB");
    }
}
