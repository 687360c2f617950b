//! Multicast deploy: one image onto many machines at once, streamed once.
//!
//! 1. **Stage** ([`stage`]): the image is deployed once, on the server, onto a sparse file of
//!    the smallest target's size — files-mode partitions recreated, the table scaled, the
//!    result verified through the filesystem readers — and what every target must hold is
//!    split into ranges to send and ranges to zero.
//! 2. **Zero**: each agent zeroes the zero ranges on its side (`WriteZeroes`; no bytes move).
//! 3. **Session**: the agents join the session's group over their authenticated connections
//!    (`MulticastJoin`, with per-receiver keys) and `diskferry_multicast` streams the data
//!    ranges once, repairing what receivers miss; the agents are followed through
//!    `MulticastStatus` for per-machine progress.
//! 4. **Fallback**: a machine the session dropped (silent, killed, too lossy) or that could not
//!    join gets the same ranges by unicast on its connection, when it still answers.
//! 5. **Verify**: every range a machine must hold is hashed by its agent and compared with the
//!    stage's hashes (the stage itself was verified against the image in step 1), so no data
//!    is read back over the network. A larger disk then gets its GPT's backup header moved to
//!    its own end.
//!
//! One machine's failure never stops the others: the report says, per machine, how its disk
//! was written and whether it verified.

mod fleet;
mod stage;

mod send;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::BlockDevice;
use diskferry_remote::RemoteDisk;
use serde::Serialize;

use crate::pipeline::{DeployError, DeployHow, DeployReport};
use crate::progress::{Progress, Silent};
use crate::ranges;
use fleet::Fleet;
pub use stage::Staged;

/// One machine of a multicast deploy: its name in messages and its disk, opened writable on
/// the agent's connection.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub disk: Arc<RemoteDisk>,
}

/// How a multicast deploy goes.
#[derive(Debug, Clone)]
pub struct MulticastHow {
    /// What a single deploy would do (mode, customization, fallback loader).
    pub deploy: DeployHow,
    /// The group (default: one in 239.255.0.0/16 picked from the session id).
    pub group: Option<Ipv4Addr>,
    /// The group's UDP port (default: one in 49152..65535 picked from the session id).
    pub port: Option<u16>,
    /// The server address the session sends from and agents report to (default: the address
    /// the first machine's connection reached the server at).
    pub bind: Option<Ipv4Addr>,
    /// Most bytes a second the sender sends (default: the multicast crate's maximum).
    pub max_rate: Option<u64>,
    /// A receiver silent this long is dropped from the session (it then gets unicast).
    pub receiver_timeout: Duration,
    /// Where the staged disk is made (a sparse file of the smallest target's size).
    pub stage_dir: PathBuf,
    /// Register each machine's UEFI boot entry once its disk verified (agents that may).
    pub boot_entries: bool,
}

impl MulticastHow {
    /// Defaults: the deploy as given, the group and port from the session id, a 5 s receiver
    /// timeout, the stage in the system's temporary directory.
    pub fn new(deploy: DeployHow) -> MulticastHow {
        MulticastHow {
            deploy,
            group: None,
            port: None,
            bind: None,
            max_rate: None,
            receiver_timeout: Duration::from_secs(5),
            stage_dir: std::env::temp_dir(),
            boot_entries: true,
        }
    }
}

/// Where one machine is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Waiting,
    Zeroing,
    Receiving,
    /// Written by unicast after the session left it behind.
    Unicast,
    Verifying,
    Done,
    Failed,
}

/// One machine's progress and outcome.
#[derive(Debug, Clone, Serialize)]
pub struct MachineState {
    pub name: String,
    pub phase: Phase,
    /// Bytes (of `total`) on the disk so far in this phase.
    pub done: u64,
    pub total: u64,
    /// How its data arrived: `multicast`, or `unicast` with the reason.
    pub delivery: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Gets every machine's state whenever one changes (about twice a second while the session
/// runs).
pub trait Watch: Sync {
    fn machines(&self, states: &[MachineState]);
}

impl Watch for Silent {
    fn machines(&self, _: &[MachineState]) {}
}

/// The session's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    pub group: String,
    pub elapsed_s: f64,
    /// Repair bytes sent to the group and to single receivers.
    pub multicast_repair_bytes: u64,
    pub unicast_repair_bytes: u64,
    /// Datagrams on the report port that failed authentication or decoding.
    pub rejected: u64,
}

/// What a multicast deploy did.
#[derive(Debug)]
pub struct MulticastReport {
    /// The deploy onto the server's stage, verified (`None`: the image was sent as it is).
    pub stage: Option<DeployReport>,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub session: Option<SessionSummary>,
    pub machines: Vec<MachineState>,
    pub elapsed: Duration,
}

impl MulticastReport {
    /// Machines whose disk did not end written and verified.
    pub fn failed(&self) -> impl Iterator<Item = &MachineState> {
        self.machines.iter().filter(|m| m.phase != Phase::Done)
    }
}

/// Why nothing was deployed.
#[derive(Debug, thiserror::Error)]
pub enum MulticastDeployError {
    #[error("a multicast deploy needs at least one machine")]
    NoTargets,
    #[error("{0} machines are more than a session serves ({max})", max = diskferry_protocol::multicast::MAX_RECEIVERS)]
    TooMany(usize),
    #[error("{0} is read-only: its client must run with --allow-write")]
    ReadOnly(String),
    #[error(transparent)]
    Stage(#[from] DeployError),
    #[error("no IPv4 address to send from: give one (bind) — the machines' connections do not say which")]
    NoBind,
}

/// Deploys `image` onto every target at once (see the module documentation). Fails as a
/// whole only before anything is written to any machine; afterwards each machine's outcome
/// is in the report.
pub fn multicast_deploy(
    image: Arc<dyn BlockDevice>,
    targets: &[Target],
    how: &MulticastHow,
    progress: &dyn Progress,
    watch: &dyn Watch,
) -> Result<MulticastReport, MulticastDeployError> {
    let started = Instant::now();
    check_targets(targets)?;
    let bind = match how.bind {
        Some(b) => b,
        None => bind_from(targets).ok_or(MulticastDeployError::NoBind)?,
    };
    let size = targets.iter().map(|t| t.disk.size()).min().unwrap_or(0);
    let staged = stage::stage(image, size, &how.deploy, &how.stage_dir, progress)?;
    tracing::info!(
        "staged in {:.1} s: {} to send, {} for each machine to zero",
        started.elapsed().as_secs_f64(),
        crate::units::human_bytes(ranges::bytes(&staged.data)),
        crate::units::human_bytes(ranges::bytes(&staged.zero))
    );
    let fleet = Fleet::new(targets, &staged, watch, how.boot_entries);
    fleet.zero_all();
    let (session, outcomes) = send::multicast(&fleet, how, bind);
    fleet.finish_all(&outcomes);
    Ok(MulticastReport {
        data_bytes: ranges::bytes(&staged.data),
        zero_bytes: ranges::bytes(&staged.zero),
        session,
        machines: fleet.into_states(),
        stage: staged.report,
        elapsed: started.elapsed(),
    })
}

fn check_targets(targets: &[Target]) -> Result<(), MulticastDeployError> {
    if targets.is_empty() {
        return Err(MulticastDeployError::NoTargets);
    }
    if targets.len() > usize::from(diskferry_protocol::multicast::MAX_RECEIVERS) {
        return Err(MulticastDeployError::TooMany(targets.len()));
    }
    if let Some(t) = targets.iter().find(|t| t.disk.is_read_only()) {
        return Err(MulticastDeployError::ReadOnly(t.name.clone()));
    }
    Ok(())
}

/// The IPv4 address the first machine's connection reached us at.
fn bind_from(targets: &[Target]) -> Option<Ipv4Addr> {
    targets
        .iter()
        .find_map(|t| match t.disk.connection().local_addr()? {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        })
}
