//! A remote disk that survives its connection: when the client goes away (restarted, network
//! blip), the next operation gets a new connection with backoff — 0.25 s doubling to 5 s — for
//! up to a configured time, reopens the disk by name, checks it is the same size, and carries
//! on. Where the new connection comes from is a [`Redial`]: connecting to a listening client
//! again ([`DialAddr`]), or waiting for a dial-back machine to call back in
//! (the daemon's `AgentRedial`). Losing and regaining the connection are logged through
//! `tracing`, so a job's log shows them.
//! Reads and writes are idempotent, so a failed request is simply sent again; bulk reads
//! resume after the last piece delivered, so the consumer sees every byte exactly once.

use std::ops::Range;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use diskferry_protocol::chunks::ChunkHash;
use diskferry_protocol::SessionOptions;

use super::{ConnectError, Connection, RemoteDisk, RemoteOptions};
use diskferry_blockdev::{BlockDevice, BlockError, Extent, Result};

/// Why there is no new connection yet (the reconnect loop retries until its patience ends).
#[derive(Debug, thiserror::Error)]
pub enum RedialError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0} has not dialed back yet")]
    NotBack(String),
    #[error("reopening the disk: {0}")]
    Reopen(#[source] BlockError),
}

/// How a lost connection is replaced.
pub trait Redial: Send + Sync {
    /// Where the disk is, for messages.
    fn describe(&self) -> String;
    /// A fresh authenticated connection, or why there is none yet (retried with backoff).
    fn redial(&self, rt: &tokio::runtime::Handle) -> std::result::Result<Connection, RedialError>;
}

/// Connecting again to a listening client.
pub struct DialAddr {
    pub addr: String,
    pub session: SessionOptions,
}

impl Redial for DialAddr {
    fn describe(&self) -> String {
        self.addr.clone()
    }
    fn redial(&self, rt: &tokio::runtime::Handle) -> std::result::Result<Connection, RedialError> {
        Ok(rt.block_on(Connection::connect(&self.addr, &self.session))?)
    }
}

/// Reconnects [`RemoteDisk`]s.
pub struct ReconnectingDisk {
    redial: Arc<dyn Redial>,
    disk: String,
    opts: RemoteOptions,
    rt: tokio::runtime::Handle,
    patience: Duration,
    current: RwLock<Arc<RemoteDisk>>,
    size: u64,
    logical_sector: u32,
    read_only: bool,
}

impl std::fmt::Debug for ReconnectingDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ReconnectingDisk({}@{})",
            self.disk,
            self.redial.describe()
        )
    }
}

impl ReconnectingDisk {
    /// Wraps `first`; reconnects through `redial` for up to `patience`.
    pub fn new(
        first: RemoteDisk,
        redial: Arc<dyn Redial>,
        opts: RemoteOptions,
        rt: tokio::runtime::Handle,
        patience: Duration,
    ) -> ReconnectingDisk {
        ReconnectingDisk {
            redial,
            disk: first.name().to_string(),
            size: first.size(),
            logical_sector: first.logical_sector_size(),
            read_only: first.is_read_only(),
            current: RwLock::new(Arc::new(first)),
            opts,
            rt,
            patience,
        }
    }

    fn disk(&self) -> Arc<RemoteDisk> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces `failed` with a fresh connection (unless another thread already did).
    fn reconnect(&self, failed: &Arc<RemoteDisk>, why: &str) -> Result<()> {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&current, failed) {
            return Ok(());
        }
        tracing::warn!(
            disk = %self.disk,
            at = %self.redial.describe(),
            "lost {}@{} ({why}); reconnecting for up to {} s",
            self.disk,
            self.redial.describe(),
            self.patience.as_secs()
        );
        let deadline = Instant::now() + self.patience;
        let mut delay = Duration::from_millis(250);
        loop {
            self.check_cancelled()?;
            let attempt = self.redial.redial(&self.rt).and_then(|conn| {
                self.rt
                    .block_on(conn.open(&self.disk, !self.read_only, self.opts.clone()))
                    .map_err(RedialError::Reopen)
            });
            match attempt {
                Ok(disk) if disk.size() == self.size => {
                    tracing::info!(
                        disk = %self.disk,
                        at = %self.redial.describe(),
                        "reconnected to {}@{}",
                        self.disk,
                        self.redial.describe()
                    );
                    *current = Arc::new(disk);
                    return Ok(());
                }
                Ok(disk) => {
                    return Err(BlockError::Disconnected(format!(
                        "{} came back with a different size ({} bytes, was {})",
                        self.disk,
                        disk.size(),
                        self.size
                    )))
                }
                Err(e) if Instant::now() + delay > deadline => {
                    return Err(BlockError::Disconnected(format!(
                        "{why}; gave up reconnecting after {} s: {e}",
                        self.patience.as_secs()
                    )))
                }
                Err(_) => {
                    self.sleep_unless_cancelled(delay)?;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// A cancelled job stops waiting for its client at once.
    fn check_cancelled(&self) -> Result<()> {
        match &self.opts.cancel {
            Some(flag) if flag.is_cancelled() => Err(BlockError::Cancelled),
            _ => Ok(()),
        }
    }

    fn sleep_unless_cancelled(&self, total: Duration) -> Result<()> {
        let until = Instant::now() + total;
        loop {
            self.check_cancelled()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// Runs `op` on the current disk, reconnecting and retrying while it reports a lost
    /// connection.
    fn retry<T>(&self, mut op: impl FnMut(&RemoteDisk) -> Result<T>) -> Result<T> {
        loop {
            let disk = self.disk();
            match op(&disk) {
                Err(BlockError::Disconnected(why)) => self.reconnect(&disk, &why)?,
                other => return other,
            }
        }
    }
}

impl BlockDevice for ReconnectingDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical_sector
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.retry(|d| d.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.retry(|d| d.write_at(buf, offset))
    }

    fn flush(&self) -> Result<()> {
        self.retry(|d| d.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.retry(|d| d.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.retry(|d| d.write_zeroes(offset, len))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.retry(|d| d.block_status(offset, len))
    }

    fn chunk_hashes(&self, offset: u64, len: u64, chunk: u32) -> Result<Vec<ChunkHash>> {
        self.retry(|d| d.chunk_hashes(offset, len, chunk))
    }

    /// Bulk reads resume after the last piece handed to `sink` (pieces arrive in order).
    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> Result<()>,
    ) -> Result<()> {
        // Everything before (index, offset) has been delivered.
        let (mut index, mut pos) = (0usize, ranges.first().map_or(0, |r| r.start));
        loop {
            let mut remaining: Vec<Range<u64>> = Vec::with_capacity(ranges.len() - index);
            if let Some(r) = ranges.get(index) {
                if pos < r.end {
                    remaining.push(pos.max(r.start)..r.end);
                }
                remaining.extend(ranges[index + 1..].iter().cloned());
            }
            if remaining.is_empty() {
                return Ok(());
            }
            let disk = self.disk();
            let result = disk.read_ranges(&remaining, &mut |off, data| {
                let end = off + data.len() as u64;
                while index < ranges.len()
                    && !(ranges[index].start <= off && off < ranges[index].end)
                {
                    index += 1;
                }
                sink(off, data)?;
                pos = end;
                Ok(())
            });
            match result {
                Err(BlockError::Disconnected(why)) => self.reconnect(&disk, &why)?,
                other => return other,
            }
        }
    }
}
