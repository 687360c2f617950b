//! A disk of a remote diskferry-client as a local [`BlockDevice`].
//!
//! Small random reads (what filesystem crates do) go through a bounded chunk cache with
//! sequential readahead; [`BlockDevice::read_ranges`] (what captures do) bypasses the cache and
//! keeps `depth` large requests in flight, delivering data in order. All methods block the
//! calling thread: call them from blocking threads, never from async tasks.

mod cache;
mod connection;
mod reconnect;

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use diskferry_protocol::chunks::{self, ChunkHash};
use diskferry_protocol::multicast::Credentials;
use diskferry_protocol::{BlockState, MulticastStatus, Reply, Request};

pub use connection::{Completion, ConnectError, Connection};
pub use reconnect::{DialAddr, ReconnectingDisk, Redial, RedialError};

use self::cache::ChunkCache;
use self::connection::{unexpected, ReplyReceiver};
use diskferry_blockdev::{
    check_range, BlockDevice, BlockError, CancelFlag, Extent, Region, Result,
};

/// Tuning for one remote disk.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Cache granule and request size for small reads. Small (64 KiB), because filesystem
    /// readers scatter small reads (directory blocks, extent trees) over the disk and each
    /// miss fetches a whole granule: with 1 MiB granules a Debian capture moved 379 MiB for
    /// 241 MiB read, with 64 KiB ones 251 MiB (bench/README.md); sequential readers get their
    /// speed from the readahead instead.
    pub chunk_size: u32,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead: usize,
    /// Chunks the cache holds at most.
    pub cache_chunks: usize,
    /// Request size for bulk reads ([`BlockDevice::read_ranges`]) and writes.
    pub request_size: u32,
    /// Requests kept in flight by bulk reads and writes.
    pub depth: usize,
    /// A job's cancel flag: waits for replies end with [`BlockError::Cancelled`] once it is
    /// raised, and so does waiting to reconnect.
    pub cancel: Option<CancelFlag>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            chunk_size: 64 << 10,
            readahead: 64,
            cache_chunks: 1024,
            request_size: 2 << 20,
            depth: 16,
            cancel: None,
        }
    }
}

/// One opened disk on a client connection.
pub struct RemoteDisk {
    conn: Connection,
    name: String,
    handle: u32,
    size: u64,
    logical_sector: u32,
    read_only: bool,
    request_size: u32,
    depth: usize,
    cache: Arc<ChunkCache>,
    cancel: Option<CancelFlag>,
}

impl std::fmt::Debug for RemoteDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDisk")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RemoteDisk {
    /// A request that changes a range without carrying data (discard, write zeroes): refused
    /// on a read-only disk, checked against the size, the cached range dropped.
    fn range_request(
        &self,
        offset: u64,
        len: u64,
        op: &'static str,
        request: impl FnOnce(u32) -> Request,
    ) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)?;
        self.cache.invalidate(offset, len);
        expect_done(self.call(request(self.handle)), op, Some(offset))
    }

    fn new(
        conn: Connection,
        name: String,
        handle: u32,
        size: u64,
        logical_sector: u32,
        read_only: bool,
        opts: RemoteOptions,
    ) -> Self {
        let max = conn.max_payload();
        let chunk = opts.chunk_size.clamp(4096, max);
        RemoteDisk {
            name,
            handle,
            size,
            logical_sector,
            read_only,
            request_size: opts.request_size.clamp(4096, max),
            depth: opts.depth.max(1),
            cache: ChunkCache::new(
                chunk,
                opts.readahead,
                opts.cache_chunks.max(opts.readahead + 2),
                opts.cancel.clone(),
            ),
            cancel: opts.cancel,
            conn,
        }
    }

    /// Sends a request and waits for its reply (or the job's cancellation).
    fn call(&self, request: Request) -> Result<Reply> {
        self.wait(self.conn.request_sync(request))
    }

    fn wait(&self, rx: ReplyReceiver) -> Result<Reply> {
        connection::wait(rx, self.cancel.as_ref())
    }

    /// The disk's name on the client.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection this disk was opened on.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Asks the agent to join a multicast deploy session and receive it into this disk
    /// (opened writable). Returns once it has joined the group.
    pub fn multicast_join(&self, credentials: &Credentials) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let request = Request::MulticastJoin {
            handle: self.handle,
            credentials: Box::new(credentials.clone()),
        };
        expect_done(self.call(request), "multicast join", None)
    }

    /// Where the agent's multicast session on this connection is.
    pub fn multicast_status(&self) -> Result<MulticastStatus> {
        match self.call(Request::MulticastStatus)? {
            Reply::Multicast(status) => Ok(status),
            other => Err(unexpected("multicast status", None, other)),
        }
    }

    /// Submits a read whose reply lands in a oneshot.
    fn read_request(&self, offset: u64, len: u32) -> ReplyReceiver {
        self.conn.request_sync(Request::Read {
            handle: self.handle,
            offset,
            len,
        })
    }
}

/// Most bytes one HashChunks request covers.
const HASH_SPAN: u64 = 256 << 20;

/// Checks a data reply's length: a short or long reply is a broken peer, never truncated data.
fn expect_data(reply: Result<Reply>, offset: u64, len: usize) -> Result<Bytes> {
    match reply? {
        Reply::Data(d) if d.len() == len => Ok(d),
        Reply::Data(d) => Err(BlockError::Protocol(format!(
            "asked {len} bytes at offset {offset}, got {}",
            d.len()
        ))),
        other => Err(unexpected("read", Some(offset), other)),
    }
}

fn expect_done(reply: Result<Reply>, op: &'static str, offset: Option<u64>) -> Result<()> {
    match reply? {
        Reply::Done => Ok(()),
        other => Err(unexpected(op, offset, other)),
    }
}

impl BlockDevice for RemoteDisk {
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
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if buf.len() as u64 > self.cache.capacity_bytes() / 2 {
            // Too big to stage in the cache: a pipelined bulk read straight into the buffer.
            let mut pos = 0usize;
            let whole = offset..offset + buf.len() as u64;
            return self.read_ranges(std::slice::from_ref(&whole), &mut |_, data: Bytes| {
                buf[pos..pos + data.len()].copy_from_slice(&data);
                pos += data.len();
                Ok(())
            });
        }
        self.cache
            .read(buf, offset, self.size, &|chunk_off, len, done| {
                self.conn.submit(
                    Request::Read {
                        handle: self.handle,
                        offset: chunk_off,
                        len,
                    },
                    done,
                )
            })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, buf.len() as u64)?;
        self.cache.invalidate(offset, buf.len() as u64);
        let mut inflight = VecDeque::new();
        let mut pos = 0usize;
        while pos < buf.len() || !inflight.is_empty() {
            if pos < buf.len() && inflight.len() < self.depth {
                let n = (buf.len() - pos).min(self.request_size as usize);
                let off = offset + pos as u64;
                let data = Bytes::copy_from_slice(&buf[pos..pos + n]);
                inflight.push_back((
                    off,
                    self.conn.request_sync(Request::Write {
                        handle: self.handle,
                        offset: off,
                        data,
                    }),
                ));
                pos += n;
                continue;
            }
            if let Some((off, rx)) = inflight.pop_front() {
                expect_done(self.wait(rx), "write", Some(off))?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        expect_done(
            self.call(Request::Flush {
                handle: self.handle,
            }),
            "flush",
            None,
        )
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.range_request(offset, len, "discard", |handle| Request::Discard {
            handle,
            offset,
            len,
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.range_request(offset, len, "write zeroes", |handle| Request::WriteZeroes {
            handle,
            offset,
            len,
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let reply = self.call(Request::BlockStatus {
            handle: self.handle,
            offset,
            len: end - offset,
        })?;
        let Reply::Status(extents) = reply else {
            return Err(unexpected("block status", Some(offset), reply));
        };
        let mut pos = offset;
        let mut out = Vec::with_capacity(extents.len());
        for e in extents {
            if e.len == 0 || e.len > end - pos {
                return Err(BlockError::Protocol(format!(
                    "block status extent of {} bytes at {pos} overruns {end}",
                    e.len
                )));
            }
            let region = match e.state {
                BlockState::Data => Region::Data,
                BlockState::Zero => Region::Zero,
                BlockState::Unknown => Region::Unknown,
            };
            out.push(Extent {
                offset: pos,
                len: e.len,
                region,
            });
            pos += e.len;
        }
        Ok(out)
    }

    /// The agent hashes: requests of at most [`HASH_SPAN`] bytes (so each reply comes well
    /// within the reply timeout even from a slow disk), a few in flight to keep its disk busy.
    fn chunk_hashes(&self, offset: u64, len: u64, chunk: u32) -> Result<Vec<ChunkHash>> {
        if self.conn.version() < diskferry_protocol::VERSION_HASH_CHUNKS {
            return Err(BlockError::Unsupported(
                "chunk hashes: the agent speaks an older protocol (update diskferry-client)",
            ));
        }
        let count = chunks::hash_count(len, chunk).map_err(BlockError::Protocol)?;
        check_range(self.size, offset, len)?;
        let span = (HASH_SPAN / u64::from(chunk)).max(1) * u64::from(chunk);
        let mut pieces = (offset..offset + len)
            .step_by(span as usize)
            .map(|at| (at, (offset + len - at).min(span)));
        let mut inflight = VecDeque::new();
        let mut out = Vec::with_capacity(count);
        loop {
            while inflight.len() < self.depth.min(4) {
                let Some((at, n)) = pieces.next() else { break };
                let request = Request::HashChunks {
                    handle: self.handle,
                    offset: at,
                    len: n,
                    chunk,
                };
                inflight.push_back((at, n, self.conn.request_sync(request)));
            }
            let Some((at, n, rx)) = inflight.pop_front() else {
                return Ok(out);
            };
            match self.wait(rx)? {
                Reply::Hashes(h) if h.len() as u64 == n.div_ceil(u64::from(chunk)) => out.extend(h),
                Reply::Hashes(h) => {
                    return Err(BlockError::Protocol(format!(
                        "asked the hashes of {n} bytes at offset {at} in chunks of {chunk}, got {}",
                        h.len()
                    )))
                }
                other => return Err(unexpected("hash chunks", Some(at), other)),
            }
        }
    }

    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> Result<()>,
    ) -> Result<()> {
        for r in ranges {
            check_range(self.size, r.start, r.end.saturating_sub(r.start))?;
        }
        let mut requests = requests_for(ranges, self.request_size).into_iter();
        let mut inflight = VecDeque::with_capacity(self.depth);
        loop {
            while inflight.len() < self.depth {
                match requests.next() {
                    Some(req) => {
                        let rx = self.read_request(req.offset, req.len);
                        inflight.push_back((req, rx));
                    }
                    None => break,
                }
            }
            let Some((req, rx)) = inflight.pop_front() else {
                return Ok(());
            };
            let data = expect_data(self.wait(rx), req.offset, req.len as usize)?;
            for piece in &req.pieces {
                let at = (piece.start - req.offset) as usize..(piece.end - req.offset) as usize;
                sink(piece.start, data.slice(at))?;
            }
        }
    }
}

/// Most bytes between two ranges that one request still reads through: the bytes of the gap
/// cross the wire for nothing, but a filesystem's small files lie side by side, and one
/// request per file (a Debian install is mostly files of a few KiB) left the link idle
/// between tiny replies and gave the compressor nothing to work with.
const MAX_GAP: u64 = 32 << 10;

/// One read request and the pieces of the asked-for ranges it carries, in order.
#[derive(Debug, PartialEq, Eq)]
struct ReadRequest {
    offset: u64,
    len: u32,
    pieces: Vec<Range<u64>>,
}

/// The requests that read `ranges` (in their order): a range longer than `request_size` is
/// cut into requests of that size; consecutive ranges going forward with gaps of at most
/// [`MAX_GAP`] share a request while it stays within `request_size`.
fn requests_for(ranges: &[Range<u64>], request_size: u32) -> Vec<ReadRequest> {
    let step = u64::from(request_size);
    let mut out: Vec<ReadRequest> = Vec::new();
    for r in ranges.iter().filter(|r| r.start < r.end) {
        let mut at = r.start;
        while at < r.end {
            let end = r.end.min(at + step);
            let joins = out.last().is_some_and(|last| {
                let last_end = last.offset + u64::from(last.len);
                at >= last_end && at - last_end <= MAX_GAP && end - last.offset <= step
            });
            match out.last_mut() {
                Some(last) if joins => {
                    last.len = (end - last.offset) as u32;
                    last.pieces.push(at..end);
                }
                _ => out.push(ReadRequest {
                    offset: at,
                    len: (end - at) as u32,
                    pieces: std::iter::once(at..end).collect(),
                }),
            }
            at = end;
        }
    }
    out
}

impl Drop for RemoteDisk {
    fn drop(&mut self) {
        self.conn.submit(
            Request::Close {
                handle: self.handle,
            },
            Box::new(|_| {}),
        );
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;

    #[test]
    fn small_ranges_close_together_share_a_request() {
        let got = requests_for(
            &[0..4096, 8192..12288, 200_000..204_800, 204_800..205_000],
            1 << 20,
        );
        assert_eq!(
            got,
            [
                ReadRequest {
                    offset: 0,
                    len: 12288,
                    pieces: vec![0..4096, 8192..12288]
                },
                ReadRequest {
                    offset: 200_000,
                    len: 5000,
                    pieces: vec![200_000..204_800, 204_800..205_000]
                },
            ]
        );
    }

    #[test]
    fn long_ranges_are_cut_and_backward_ranges_start_their_own_request() {
        let got = requests_for(
            &[0..(3 << 20), (3 << 20)..(3 << 20) + 10, 100..200],
            1 << 20,
        );
        let shape: Vec<(u64, u32, usize)> = got
            .iter()
            .map(|r| (r.offset, r.len, r.pieces.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (0, 1 << 20, 1),
                (1 << 20, 1 << 20, 1),
                (2 << 20, 1 << 20, 1),
                (3 << 20, 10, 1),
                (100, 100, 1)
            ]
        );
    }
}
