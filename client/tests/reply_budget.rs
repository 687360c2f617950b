//! The agent's memory is bounded for every request, not only reads and writes (issue 14,
//! finding 9). Playing the server over the wire, these tests send thousands of block-status
//! requests and read no reply: before, the agent kept reading them and queued every reply
//! (3,000 replies of 4096 extents took it from 16 to 200 MiB); now it stops reading once its
//! budget is spent, and answers everything once the replies are read.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diskferry_protocol::handshake::initiate;
use diskferry_protocol::stream::{split, FrameReader, FrameWriter};
use diskferry_protocol::{Message, Reply, Request, SessionOptions, StaticKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

/// Block-status requests sent without reading a reply (the finding's figure).
const REQUESTS: usize = 3000;
/// The test disk: data in every other 4 KiB block, so one block status is 4096 extents.
const DISK: u64 = 32 << 20;
/// The agent's budget in the binary test (`--max-inflight`).
const BUDGET: u32 = 8 << 20;
/// What the agent may reach: its own 16 MiB or so, the budget, and slack.
const RSS_LIMIT_KIB: u64 = 64 << 10;

/// The one place that knows the key model: a file with the server's public key for the agent,
/// and the agent's and the server's session options.
fn keys(dir: &Path) -> (PathBuf, SessionOptions, SessionOptions) {
    let server = StaticKey::generate();
    let file = dir.join("server.pub");
    std::fs::write(&file, server.public().to_string()).unwrap();
    (
        file,
        SessionOptions::agent(StaticKey::generate(), server.public()),
        SessionOptions::controller(server),
    )
}

type Halves<S> = (FrameReader<ReadHalf<S>>, FrameWriter<WriteHalf<S>>);

/// Authenticates as the server on `io`.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    opts: &SessionOptions,
) -> Halves<S> {
    let session = initiate(&mut io, opts).await.expect("handshake");
    let (r, w) = tokio::io::split(io);
    split(session, r, w)
}

/// A sparse file with data in every other 4 KiB block.
fn striped_disk(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("striped.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(DISK).unwrap();
    for block in (0..DISK / 4096).step_by(2) {
        file.write_all_at(&[0xa5; 4096], block * 4096).unwrap();
    }
    path
}

async fn request<W: AsyncWrite + Unpin>(w: &mut FrameWriter<W>, cookie: u64, request: Request) {
    w.send(&Message::Request { cookie, request }).await.unwrap();
}

async fn reply<R: AsyncRead + Unpin>(r: &mut FrameReader<R>) -> (u64, Reply) {
    let next = tokio::time::timeout(Duration::from_secs(60), r.next()).await;
    match next.expect("a reply within a minute").unwrap() {
        Some(Message::Reply { cookie, reply }) => (cookie, reply),
        other => panic!("expected a reply, got {other:?}"),
    }
}

/// Opens `disk` and returns its handle.
async fn open<S: AsyncRead + AsyncWrite + Unpin>(halves: &mut Halves<S>, disk: &Path) -> u32 {
    let disk = disk.display().to_string();
    let writable = false;
    request(&mut halves.1, 0, Request::Open { disk, writable }).await;
    match reply(&mut halves.0).await {
        (0, Reply::Opened { handle, .. }) => handle,
        other => panic!("open: {other:?}"),
    }
}

fn block_status(handle: u32) -> Request {
    Request::BlockStatus {
        handle,
        offset: 0,
        len: DISK,
    }
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The agent process, killed when the test ends, passed or not.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real agent binary, listening on a loopback port; returns it and the port's address.
fn start_agent(key: &Path, disk: &Path) -> (Agent, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_diskferry-client"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--max-inflight",
            &BUDGET.to_string(),
        ])
        .arg("--server-key")
        .arg(key)
        .arg("--disk")
        .arg(disk)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut agent = Agent(child);
    let mut line = String::new();
    BufReader::new(agent.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_string();
    (agent, addr)
}

/// Waits until `progress` and the agent's RSS have both stopped moving for two seconds
/// (the agent has taken all it will take), within a hang guard; returns the agent's peak RSS.
async fn settle(pid: u32, progress: &AtomicUsize) -> u64 {
    let mut last = (usize::MAX, 0);
    let mut still = 0;
    for _ in 0..600 {
        let now = (progress.load(Ordering::Relaxed), status_kib(pid, "VmRSS:"));
        still = if now == last { still + 1 } else { 0 };
        if still == 10 {
            return status_kib(pid, "VmHWM:");
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the agent never settled");
}

#[tokio::test]
async fn unread_block_status_replies_do_not_grow_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let disk = striped_disk(dir.path());
    let (key_file, _, controller) = keys(dir.path());
    let (agent, addr) = start_agent(&key_file, &disk);
    let pid = agent.0.id();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut halves = handshake(stream, &controller).await;
    let handle = open(&mut halves, &disk).await;
    let before = status_kib(pid, "VmRSS:");

    let (mut replies, mut writer) = halves;
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    let sender = tokio::spawn(async move {
        for cookie in 1..=REQUESTS as u64 {
            request(&mut writer, cookie, block_status(handle)).await;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        writer
    });
    let peak = settle(pid, &sent).await;
    let stalled_at = sent.load(Ordering::Relaxed);
    eprintln!(
        "agent RSS {before} KiB before, peak {peak} KiB with {stalled_at} of {REQUESTS} \
         requests sent and no reply read (budget {} KiB)",
        BUDGET >> 10
    );
    assert!(peak < RSS_LIMIT_KIB, "the agent grew to {peak} KiB");

    // Backpressure, not a deadlock: once replies are read, every request is answered.
    for _ in 0..REQUESTS {
        match reply(&mut replies).await {
            (_, Reply::Status(extents)) => assert_eq!(extents.len(), 4096),
            other => panic!("block status: {other:?}"),
        }
    }
    drop(sender.await.unwrap());
}

/// A budget smaller than one reply (an identity is up to 256 KiB, a block status 64 KiB, the
/// session's payload limit and so the budget here 64 KiB): each such request waits for the
/// others and runs alone, and all are answered.
#[tokio::test]
async fn requests_larger_than_the_whole_budget_are_still_answered() {
    let dir = tempfile::tempdir().unwrap();
    let disk = striped_disk(dir.path());
    let (_, mut agent_opts, mut controller) = keys(dir.path());
    agent_opts.max_payload = 64 << 10;
    controller.max_payload = 64 << 10;
    let config = Arc::new(diskferry_client::Config {
        disks: vec![diskferry_client::disks::DiskSpec {
            path: disk.clone(),
            name: disk.display().to_string(),
        }],
        allow_write: false,
        session: agent_opts,
        max_inflight: 1,
        quiet: true,
        allow_power: false,
        allow_firmware: false,
        live: None,
    });
    let (ours, theirs) = tokio::io::duplex(16 << 20);
    let agent = tokio::spawn(diskferry_client::serve::serve(theirs, config));
    let mut halves = handshake(ours, &controller).await;
    let handle = open(&mut halves, &disk).await;
    for cookie in 1..=20 {
        let req = match cookie % 4 {
            0 => Request::Identify,
            1 => Request::ListDisks,
            _ => block_status(handle),
        };
        request(&mut halves.1, cookie, req).await;
    }
    for _ in 1..=20 {
        match reply(&mut halves.0).await {
            (c, Reply::Identity(doc)) if c % 4 == 0 => assert!(doc.starts_with('{')),
            (c, Reply::Disks(list)) if c % 4 == 1 => assert_eq!(list.len(), 1),
            (_, Reply::Status(extents)) => assert_eq!(extents.len(), 4096),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(halves);
    agent.await.unwrap().unwrap();
}
