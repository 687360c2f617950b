//! A read-only TFTP server (RFC 1350, with the blksize and tsize options of RFC 2347–2349) for
//! machines whose firmware only does legacy PXE: they fetch iPXE (`undionly.kpxe`,
//! `ipxe.efi`, `snponly.efi` from Debian's `ipxe` package) and iPXE then loads `/boot.ipxe`
//! over HTTP. Files are served by plain name from a list of directories — no paths, no
//! writes. Each transfer gets its own socket and task; blocks are retransmitted on timeout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
const TIMEOUT: Duration = Duration::from_secs(1);
const RETRIES: u32 = 5;
/// Largest file served (iPXE images are well under 1 MiB; kernels go over HTTP).
const MAX_FILE: u64 = 64 << 20;

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

/// Parses a request packet: `Ok(None)` for packets that are not a read request.
/// Why a transfer ended early.
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
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

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

/// Serves requests on `socket` until the process ends.
pub async fn serve(socket: UdpSocket, roots: TftpRoots) {
    let mut buf = vec![0u8; 1024];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let packet = buf[..n].to_vec();
        let roots = roots.clone();
        tokio::spawn(async move {
            if let Err(e) = transfer(&packet, peer, &roots).await {
                tracing::warn!(%peer, "tftp {peer}: {e}");
            }
        });
    }
}

/// Answers one request from a fresh socket (its port identifies the transfer).
async fn transfer(packet: &[u8], peer: SocketAddr, roots: &TftpRoots) -> Result<(), TftpError> {
    let bind: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(peer).await?;
    let req = match parse_request(packet) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let _ = sock.send(&error_packet(4, &e.to_string())).await;
            return Err(e);
        }
    };
    let Some(path) = roots.find(&req.file) else {
        let _ = sock.send(&error_packet(1, "file not found")).await;
        return Err(TftpError::NotFound(req.file));
    };
    let data = tokio::fs::read(&path).await?;
    if data.len() as u64 > MAX_FILE {
        let _ = sock.send(&error_packet(3, "file too large for TFTP")).await;
        return Err(TftpError::TooLarge(path.display().to_string()));
    }
    let block = req.blksize.unwrap_or(DEFAULT_BLOCK);
    // Options acknowledged first; the client answers with ACK 0.
    if req.blksize.is_some() || req.tsize {
        let mut oack = OACK.to_be_bytes().to_vec();
        if let Some(b) = req.blksize {
            oack.extend_from_slice(format!("blksize\0{b}\0").as_bytes());
        }
        if req.tsize {
            oack.extend_from_slice(format!("tsize\0{}\0", data.len()).as_bytes());
        }
        send_until_acked(&sock, &oack, 0).await?;
    }
    let mut number: u16 = 1;
    let mut at = 0usize;
    loop {
        let end = (at + block).min(data.len());
        let mut p = DATA.to_be_bytes().to_vec();
        p.extend_from_slice(&number.to_be_bytes());
        p.extend_from_slice(&data[at..end]);
        send_until_acked(&sock, &p, number).await?;
        if end - at < block {
            return Ok(());
        }
        at = end;
        number = number.wrapping_add(1);
    }
}

/// Sends `packet` and waits for ACK `number`, resending on timeout.
async fn send_until_acked(sock: &UdpSocket, packet: &[u8], number: u16) -> Result<(), TftpError> {
    let mut buf = [0u8; 516];
    for _ in 0..RETRIES {
        sock.send(packet).await?;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break, // timeout: resend
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(n)) if n >= 4 => {
                    let op = u16::from_be_bytes([buf[0], buf[1]]);
                    let got = u16::from_be_bytes([buf[2], buf[3]]);
                    if op == ACK && got == number {
                        return Ok(());
                    }
                    if op == ERROR {
                        return Err(TftpError::GaveUp);
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
    }
    Err(TftpError::NoAck(number))
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
}
