//! A connection's multicast session on the agent: joined when the server asks
//! (`MulticastJoin`), received on a thread of its own into the disk the server opened
//! writable, followed through `MulticastStatus`, and stopped when the connection ends.
//!
//! `DISKFERRY_TEST_MULTICAST_DROP=N` (a test seam, like `DISKFERRY_SYSFS`) makes the receiver
//! drop N % of the data packets it gets, to exercise repair without netem.

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use diskferry_protocol::multicast::Credentials;
use diskferry_protocol::{ErrorCode, MulticastState, MulticastStatus};

use super::{Control, Joined, Network, Options, TargetDisk};
use crate::disks::{DiskError, OpenDisk};

impl TargetDisk for OpenDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write(offset, data)
            .map_err(|e| io::Error::other(e.message))
    }
    fn flush(&self) -> io::Result<()> {
        OpenDisk::flush(self).map_err(|e| io::Error::other(e.message))
    }
}

/// How a finished session ended: `Ok` with every packet flushed, or why not.
type Outcome = Option<Result<(), String>>;

/// One running (or finished) session.
#[derive(Debug)]
pub struct Receiving {
    control: Arc<Control>,
    total: u64,
    outcome: Arc<Mutex<Outcome>>,
    thread: Option<JoinHandle<()>>,
}

impl Receiving {
    /// Joins the group named in `creds` and starts receiving into `disk` (writable). Blocks
    /// for the join only; call it off the runtime.
    pub fn start(creds: &Credentials, disk: Arc<OpenDisk>) -> Result<Receiving, DiskError> {
        if !disk.writable {
            return Err(refused(
                "the disk must be opened writable to receive a deploy",
            ));
        }
        let joined = Joined::join(creds, &Network::default()).map_err(|e| DiskError {
            code: ErrorCode::Io,
            message: format!("joining multicast group {}: {e}", creds.group),
        })?;
        let options = Options {
            test_drop_percent: test_drop_percent(),
            ..Options::default()
        };
        let control = Arc::new(Control::default());
        let outcome = Arc::new(Mutex::new(None));
        let (c, o) = (Arc::clone(&control), Arc::clone(&outcome));
        let session = creds.session;
        let thread = std::thread::Builder::new()
            .name("multicast".into())
            .spawn(move || {
                let result = joined
                    .run(&*disk, options, &c)
                    .map(|report| {
                        tracing::info!(
                            session,
                            elapsed = ?report.elapsed,
                            "multicast session received"
                        );
                    })
                    .map_err(|e| e.to_string());
                *o.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            })
            .map_err(|e| DiskError {
                code: ErrorCode::Io,
                message: format!("cannot start the multicast receiver: {e}"),
            })?;
        Ok(Receiving {
            control,
            total: creds.total_packets,
            outcome,
            thread: Some(thread),
        })
    }

    /// Where the session is.
    pub fn status(&self) -> MulticastStatus {
        let received = self
            .control
            .received
            .load(std::sync::atomic::Ordering::Relaxed);
        let outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let (state, message) = match &*outcome {
            None => (MulticastState::Running, String::new()),
            Some(Ok(())) => (MulticastState::Done, String::new()),
            Some(Err(e)) => (MulticastState::Failed, e.clone()),
        };
        MulticastStatus {
            state,
            received,
            total: self.total,
            message,
        }
    }

    /// Still receiving.
    pub fn is_running(&self) -> bool {
        self.status().state == MulticastState::Running
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.control
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // The loop notices within its 10 ms read timeout; nothing to wait for here.
        drop(self.thread.take());
    }
}

/// The status of a connection that joined nothing.
pub fn idle() -> MulticastStatus {
    MulticastStatus {
        state: MulticastState::Idle,
        received: 0,
        total: 0,
        message: String::new(),
    }
}

fn refused(message: &str) -> DiskError {
    DiskError {
        code: ErrorCode::ReadOnly,
        message: message.into(),
    }
}

fn test_drop_percent() -> u8 {
    std::env::var("DISKFERRY_TEST_MULTICAST_DROP")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|p: &u8| *p < 100)
        .unwrap_or(0)
}
