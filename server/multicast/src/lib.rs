//! The sending side of a multicast deploy: one image streamed once to every machine of a group.
//!
//! The caller (`diskferry_imaging::multicast`, for the CLI and the daemon's multicast jobs)
//! plans the session from the extents of the disk it staged once on the server ([`Plan`]),
//! binds a [`Session`], hands each machine's agent its [`Credentials`] over the authenticated
//! control connection (`MulticastJoin`), and runs the session.
//! The run streams every packet once to the group, repairs what receivers report missing
//! ([`repair`]: by multicast when two or more miss a range, by unicast otherwise), paces to a
//! rate that follows the slowest live receiver ([`rate`]), drops a receiver silent for longer
//! than its timeout without stalling the others, and ends when every live receiver has said it
//! holds everything. The [`SessionReport`] says, per receiver, done or dropped (the caller
//! falls back to a unicast deploy for the dropped ones), and how much was resent.
//!
//! Datagrams and their MACs are `diskferry_protocol::multicast`; this crate owns the socket,
//! the reads from the [`BlockDevice`], the timing and the decisions.
#![forbid(unsafe_code)]

mod plan;
pub mod rate;
pub mod repair;
mod send;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_protocol::multicast::{report_key, Credentials, Key, MAX_RECEIVERS};

pub use plan::{Plan, MAX_EXTENTS};
pub use rate::{RatePoint, RateSettings};

/// Why a session could not run.
#[derive(Debug, thiserror::Error)]
pub enum MulticastError {
    #[error("invalid session plan: {0}")]
    Plan(String),
    #[error("invalid session configuration: {0}")]
    Config(String),
    #[error("multicast socket ({op}): {source}")]
    Socket {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("reading the image: {0}")]
    Read(#[from] BlockError),
    #[error("no random bytes for the session keys: {0}")]
    Keys(String),
}

/// A session's secrets: the data key every receiver holds (it authenticates the sender's
/// datagrams) and the secret each receiver's own report key is derived from.
#[derive(Clone)]
pub struct SessionKeys {
    data: Key,
    report_secret: Key,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Fresh random keys (one set per session).
    pub fn generate() -> Result<SessionKeys, MulticastError> {
        let mut data = [0u8; 32];
        let mut report_secret = [0u8; 32];
        getrandom::fill(&mut data).map_err(|e| MulticastError::Keys(e.to_string()))?;
        getrandom::fill(&mut report_secret).map_err(|e| MulticastError::Keys(e.to_string()))?;
        Ok(SessionKeys {
            data,
            report_secret,
        })
    }

    fn report_key(&self, receiver: u16) -> Key {
        report_key(&self.report_secret, receiver)
    }
}

/// How a session runs.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Names the session in every datagram (the daemon's job id, or random).
    pub session: u64,
    /// The multicast group and port receivers join.
    pub group: SocketAddrV4,
    /// The local address to send from and receive reports on (an address the agents reach:
    /// it goes into their credentials); port 0 picks one.
    pub bind: SocketAddrV4,
    /// Receivers are numbered `0..receivers`.
    pub receivers: u16,
    /// Multicast TTL (1: the local segment).
    pub ttl: u32,
    pub rate: RateSettings,
    /// How often the rate is reconsidered.
    pub rate_interval: Duration,
    /// A receiver heard from for this long is dropped.
    pub receiver_timeout: Duration,
    /// How long the first data waits for every receiver's first report.
    pub join_timeout: Duration,
    /// How often "first pass over" is repeated once the pass is over.
    pub end_interval: Duration,
    /// Most packets waiting for repair at once.
    pub max_repair_packets: u64,
}

impl SessionConfig {
    /// Defaults for a session of `receivers` machines on `group`, sending from `bind`.
    pub fn new(session: u64, group: SocketAddrV4, bind: SocketAddrV4, receivers: u16) -> Self {
        SessionConfig {
            session,
            group,
            bind,
            receivers,
            ttl: 1,
            rate: RateSettings::default(),
            rate_interval: Duration::from_millis(100),
            receiver_timeout: Duration::from_secs(5),
            join_timeout: Duration::from_secs(5),
            end_interval: Duration::from_millis(100),
            max_repair_packets: 1 << 16,
        }
    }

    fn check(&self) -> Result<(), MulticastError> {
        let bad = |m: &str| Err(MulticastError::Config(m.to_owned()));
        if !self.group.ip().is_multicast() {
            return bad("the group is not a multicast address");
        }
        if self.bind.ip().is_unspecified() || self.bind.ip().is_multicast() {
            return bad("bind to the unicast address agents reach the server at");
        }
        if self.receivers == 0 || self.receivers > MAX_RECEIVERS {
            return bad("between 1 and 1024 receivers");
        }
        if self.rate.min == 0 || self.rate.min > self.rate.max {
            return bad("the minimum rate must be positive and at most the maximum");
        }
        Ok(())
    }
}

/// How one receiver's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It holds every packet, flushed.
    Done,
    /// Silent for longer than the timeout (killed, disconnected, stuck): deploy it by unicast.
    Dropped,
}

/// One receiver in the report.
#[derive(Debug, Clone)]
pub struct ReceiverReport {
    pub id: u16,
    pub outcome: Outcome,
    /// Repair bytes sent to it alone.
    pub unicast_bytes: u64,
    /// Packets it asked for again.
    pub nacked_packets: u64,
    /// Its last loss sample (parts per million).
    pub last_loss_ppm: Option<u32>,
}

/// What a session did.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub receivers: Vec<ReceiverReport>,
    pub packets: u64,
    /// Payload bytes of the first pass.
    pub bytes: u64,
    /// Repair payload bytes sent to the group.
    pub multicast_repair_bytes: u64,
    pub elapsed: Duration,
    pub rate_history: Vec<RatePoint>,
    /// Datagrams on the report port that failed authentication or decoding.
    pub rejected: u64,
    /// NACKs refused because the repair queue was full.
    pub repair_overflow: u64,
}

/// A bound session, ready to hand out credentials and run.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    keys: SessionKeys,
    socket: tokio::net::UdpSocket,
    local: SocketAddrV4,
    gso: bool,
}

impl Session {
    /// Binds the session's socket. Call inside a tokio runtime.
    pub fn bind(config: SessionConfig, keys: SessionKeys) -> Result<Session, MulticastError> {
        config.check()?;
        let (socket, local, gso) = send::open_socket(&config)?;
        Ok(Session {
            config,
            keys,
            socket,
            local,
            gso,
        })
    }

    /// Where receivers send their reports.
    pub fn sender_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// What receiver `receiver` needs to join a session of `plan`.
    pub fn credentials(&self, receiver: u16, plan: &Plan) -> Credentials {
        Credentials {
            session: self.config.session,
            receiver,
            group: self.config.group,
            sender: self.local,
            total_packets: plan.total_packets(),
            data_key: self.keys.data,
            report_key: self.keys.report_key(receiver),
        }
    }

    /// Streams `plan`'s packets from `device` until every live receiver is done.
    pub async fn run(
        self,
        device: Arc<dyn BlockDevice>,
        plan: Arc<Plan>,
    ) -> Result<SessionReport, MulticastError> {
        send::Runner::new(self, device, plan).run().await
    }
}

/// A group address for session `session` in the organisation-local scope (239.255.0.0/16),
/// for callers that do not configure one.
pub fn default_group(session: u64) -> Ipv4Addr {
    let [a, b] = ((session % 0xfffe) as u16 + 1).to_be_bytes();
    Ipv4Addr::new(239, 255, a, b)
}
