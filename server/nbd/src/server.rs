//! The listener: accepts connections, serves each on its own thread, and keeps bad clients
//! from hurting others — at most [`Limits::max_connections`] at once (more are closed at
//! once), a deadline for the whole handshake, and a stall timeout for any request (or reply)
//! once started. An idle client between requests may wait as long as it likes: a VM that does
//! no I/O for an hour must keep its disk.

use std::io::{BufReader, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::concurrent::serve_pipelined;
use crate::export::ExportSource;
use crate::handshake::negotiate;
use crate::socket::{ListenAddr, Listener, Stream};
use crate::transmission::{RequestSource, Session};
use crate::NbdError;

/// How long clients get.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// From connect to the chosen export.
    pub handshake: Duration,
    /// For the rest of a request (or a reply to be taken) once it started.
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 16,
            handshake: Duration::from_secs(10),
            stall: Duration::from_secs(30),
        }
    }
}

/// A bound NBD server.
pub struct Server {
    listener: Listener,
    exports: Arc<dyn ExportSource>,
    limits: Limits,
    active: Arc<AtomicUsize>,
}

impl Server {
    /// Listens on a TCP address.
    pub fn bind(
        addr: SocketAddr,
        exports: impl ExportSource + 'static,
        limits: Limits,
    ) -> Result<Server, NbdError> {
        Server::bind_to(&ListenAddr::Tcp(addr), exports, limits)
    }

    /// Listens on a TCP address or a Unix socket.
    pub fn bind_to(
        addr: &ListenAddr,
        exports: impl ExportSource + 'static,
        limits: Limits,
    ) -> Result<Server, NbdError> {
        let listener = Listener::bind(addr).map_err(|source| NbdError::Bind {
            addr: addr.clone(),
            source,
        })?;
        Ok(Server {
            listener,
            exports: Arc::new(exports),
            limits,
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The TCP address it listens on (an error for a Unix socket).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self.listener.local()? {
            ListenAddr::Tcp(a) => Ok(a),
            ListenAddr::Unix(_) => Err(std::io::Error::other("listening on a Unix socket")),
        }
    }

    /// Where it listens.
    pub fn listen_addr(&self) -> std::io::Result<ListenAddr> {
        self.listener.local()
    }

    /// Connections being served now.
    pub fn active(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.active)
    }

    /// Accepts and serves connections until `stop` is set (checked after each accept; wake
    /// the listener with a connection to make it notice).
    pub fn run(&self, stop: &AtomicBool) {
        loop {
            let conn = self.listener.accept();
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let (stream, peer) = match conn {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accepting an NBD connection: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            self.spawn(stream, peer);
        }
    }

    fn spawn(&self, stream: Stream, peer: String) {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.limits.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, "refused: already {} NBD connections", self.limits.max_connections);
            return;
        }
        let (exports, limits, active) = (
            Arc::clone(&self.exports),
            self.limits,
            Arc::clone(&self.active),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("nbd {peer}"))
            .spawn({
                let peer = peer.clone();
                move || {
                    let served = connection(&stream, &*exports, limits);
                    // The slot is free before the client sees the end of the stream.
                    active.fetch_sub(1, Ordering::SeqCst);
                    drop(stream);
                    match served {
                        Ok(()) => tracing::info!(%peer, "NBD client left"),
                        Err(e) => tracing::warn!(%peer, "NBD connection closed: {e}"),
                    }
                }
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, "no thread for an NBD connection: {e}");
        }
    }
}

/// One connection: handshake within its deadline, then requests.
fn connection(stream: &Stream, exports: &dyn ExportSource, limits: Limits) -> Result<(), NbdError> {
    stream.set_write_timeout(Some(limits.stall))?;
    let deadline = Instant::now() + limits.handshake;
    let negotiated = {
        let mut timed = Deadline { stream, deadline };
        negotiate(&mut timed, exports)?
    };
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    tracing::info!(export = %negotiated.export.name, structured = negotiated.structured, "NBD client chose an export");
    let mut reader = RequestStream {
        inner: BufReader::with_capacity(256 << 10, stream.try_clone()?),
        stall: limits.stall,
    };
    serve_pipelined(&mut reader, stream, &Session::new(&negotiated))
}

/// The handshake's stream: every read and write must finish before the deadline.
struct Deadline<'a> {
    stream: &'a Stream,
    deadline: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Requests: no timeout while idle, the stall timeout once a request started.
struct RequestStream {
    inner: BufReader<Stream>,
    stall: Duration,
}

impl Read for RequestStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::BufRead for RequestStream {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.inner.consume(n)
    }
}

impl RequestSource for RequestStream {
    fn buffered(&self) -> usize {
        self.inner.buffer().len()
    }
    fn idle(&mut self, idle: bool) -> std::io::Result<()> {
        let timeout = if idle { None } else { Some(self.stall) };
        self.inner.get_ref().set_read_timeout(timeout)
    }
}
