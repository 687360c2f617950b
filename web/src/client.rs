//! A minimal blocking HTTP/1.1 client for talking to a `diskferry serve`: the CLI's
//! `machines` commands and the tests use it. Raw request lines (paths go out exactly as
//! written), `Connection: close`, bodies by Content-Length or chunked, read whole. Over TLS
//! ([`Endpoint::tls`]) the server must show the pinned certificate ([`crate::pin`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use rustls_pki_types::ServerName;

use crate::tls::Fingerprint;

/// Percent-encodes everything but unreserved characters and those in `keep`.
pub fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// A response: status, headers (names lowercased) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON (tests: panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Where a server listens: `HOST:PORT` and, for https, the certificate fingerprint pinned.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: String,
    pub pin: Option<Fingerprint>,
}

impl Endpoint {
    /// Plain HTTP.
    pub fn plain(addr: &str) -> Endpoint {
        Endpoint {
            addr: addr.to_string(),
            pin: None,
        }
    }

    /// HTTPS to a server whose certificate has fingerprint `pin`.
    pub fn tls(addr: &str, pin: Fingerprint) -> Endpoint {
        Endpoint {
            addr: addr.to_string(),
            pin: Some(pin),
        }
    }

    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.pin.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let addr = &self.addr;
        let tcp = TcpStream::connect(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot connect to {addr}: {e}")))?;
        let head = request_head(addr, method, target, headers, body);
        match self.pin {
            None => exchange(tcp, addr, &head, body),
            Some(pin) => exchange(tls_stream(tcp, addr, pin)?, addr, &head, body),
        }
    }
}

/// Sends one request to `addr` over plain HTTP and reads the whole response.
pub fn request(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    Endpoint::plain(addr).request(method, target, headers, body)
}

/// The request line and headers.
fn request_head(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req
}

/// A TLS connection over `tcp`, its handshake done: the server showed the pinned certificate
/// and proved it holds its key.
fn tls_stream(
    mut tcp: TcpStream,
    addr: &str,
    pin: Fingerprint,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let failed = |e: &dyn std::fmt::Display| bad(format!("TLS handshake with {addr} failed: {e}"));
    let config = crate::pin::client_config(pin).map_err(|e| failed(&e))?;
    let mut conn =
        rustls::ClientConnection::new(config, server_name(addr)).map_err(|e| failed(&e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| failed(&e))?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// The name sent to the server (SNI): the host of `addr`; the pin, not the name, is checked.
fn server_name(addr: &str) -> ServerName<'static> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("localhost").expect("a valid name"))
}

/// Writes the request on `s` and reads the response.
fn exchange(
    mut s: impl Read + Write,
    addr: &str,
    head: &str,
    body: &[u8],
) -> std::io::Result<Response> {
    s.write_all(head.as_bytes())?;
    // A server may answer (413) before reading a large body; a failed write is then fine.
    let _ = s.write_all(body);
    let _ = s.flush();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("no HTTP status line from {addr}: {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        // Some servers (chromedriver) keep the connection open after the body.
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}
