//! A small adversarial agent, written for the attack tests: it speaks the real protocol
//! (`diskferry_protocol`) but says whatever the test wants — a forged identity (another
//! machine's MACs), a disk geometry no real disk has, or nothing at all (a stalled peer) — and
//! records every request the server sends it, so a test can prove that no job and no byte
//! reached it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use diskferry_protocol::handshake::initiate;
use diskferry_protocol::stream::split;
use diskferry_protocol::{
    DiskInfo, ErrorCode, Message, PublicKey, Reply, Request, SessionOptions, StaticKey,
};

/// What the rogue claims and how it behaves.
#[derive(Clone)]
pub struct Script {
    /// The identity document it announces.
    pub identity: serde_json::Value,
    /// The disk it serves (named as in the identity).
    pub disk: String,
    pub size: u64,
    /// The disk's bytes: reads return them, writes land in them.
    pub bytes: Arc<Mutex<Vec<u8>>>,
    /// The logical sector size its `Opened` replies claim.
    pub logical_sector: u32,
    /// Answer `Open`, then never answer a read again.
    pub stall_reads: bool,
    /// The one-time token it presents, if any.
    pub token: Option<String>,
}

impl Script {
    /// A machine with these MACs and one disk of `size` bytes, honest about its geometry.
    pub fn machine(macs: &[&str], serial: &str, size: u64) -> Script {
        let disk = "/dev/vda".to_string();
        Script {
            identity: serde_json::json!({
                "hostname": "rogue", "macs": macs, "vendor": "QEMU", "product": "Standard PC",
                "serial": serial, "uuid": format!("uuid-{serial}"), "cpus": 1, "memory": 1u64 << 30,
                "disks": [{"name": disk, "size": size, "model": "disk", "serial": serial}],
            }),
            disk,
            size,
            bytes: Arc::new(Mutex::new(vec![0u8; size as usize])),
            logical_sector: 512,
            stall_reads: false,
            token: None,
        }
    }
}

/// What the server did to the rogue.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// The handshake went through.
    pub authenticated: bool,
    /// Why the connection ended (or failed to start).
    pub ended: Option<String>,
    pub opens: usize,
    pub reads: usize,
    /// Bytes the server sent in writes (a deploy's image streaming to us).
    pub written: u64,
}

/// A running rogue agent: one connection, on its own thread; dropped, it hangs up.
pub struct Rogue {
    seen: Arc<Mutex<Seen>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rogue {
    /// Dials the agent port at `addr`, pinning `server`, and plays `script`.
    pub fn start(addr: &str, server: PublicKey, script: Script) -> Rogue {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (addr, seen2) = (addr.to_string(), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let ended = tokio::select! {
                    r = play(&addr, server, script, &seen2) => r.err().unwrap_or_else(|| "closed".into()),
                    _ = stopped => "stopped".into(),
                };
                seen2.lock().unwrap().ended = Some(ended);
            });
        });
        Rogue {
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until the connection has ended (or `limit` passed); returns what was seen.
    pub fn wait_ended(&self, limit: Duration) -> Seen {
        diskferry_e2e::wait_for(limit, || self.seen().ended.is_some());
        self.seen()
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Handshake, then answer requests until the server hangs up.
async fn play(
    addr: &str,
    server: PublicKey,
    script: Script,
    seen: &Mutex<Seen>,
) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut opts = SessionOptions::agent(StaticKey::generate(), server);
    opts.credential = script.token.clone().unwrap_or_default().into_bytes();
    let session = initiate(&mut stream, &opts)
        .await
        .map_err(|e| e.to_string())?;
    seen.lock().unwrap().authenticated = true;
    let (r, w) = tokio::io::split(stream);
    let (mut reader, mut writer) = split(session, r, w);
    while let Some(msg) = reader.next().await.map_err(|e| e.to_string())? {
        let Message::Request { cookie, request } = msg else {
            return Err("the server sent a reply".into());
        };
        if let Some(reply) = answer(&script, request, seen) {
            writer
                .send(&Message::Reply { cookie, reply })
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The reply to one request (`None`: stay silent).
fn answer(script: &Script, request: Request, seen: &Mutex<Seen>) -> Option<Reply> {
    let mut seen = seen.lock().unwrap();
    Some(match request {
        Request::Identify => Reply::Identity(script.identity.to_string()),
        Request::ListDisks => Reply::Disks(vec![DiskInfo {
            name: script.disk.clone(),
            size: script.size,
            logical_sector: script.logical_sector,
            physical_sector: script.logical_sector,
            model: "disk".into(),
            serial: String::new(),
            rotational: false,
            read_only: false,
        }]),
        Request::Open { .. } => {
            seen.opens += 1;
            Reply::Opened {
                handle: 1,
                size: script.size,
                logical_sector: script.logical_sector,
                physical_sector: script.logical_sector,
                read_only: false,
            }
        }
        Request::Read { offset, len, .. } => {
            seen.reads += 1;
            if script.stall_reads {
                return None;
            }
            let disk = script.bytes.lock().unwrap();
            let at = offset as usize;
            Reply::Data(Bytes::copy_from_slice(&disk[at..at + len as usize]))
        }
        Request::Write { offset, data, .. } => {
            seen.written += data.len() as u64;
            let at = offset as usize;
            script.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(&data);
            Reply::Done
        }
        Request::BlockStatus { .. } => Reply::Error {
            code: ErrorCode::Unsupported,
            message: "no block status".into(),
        },
        Request::HashChunks { .. } => Reply::Error {
            code: ErrorCode::Unsupported,
            message: "no chunk hashes".into(),
        },
        _ => Reply::Done,
    })
}
