//! Live deploy jobs (`"kind": "live"`): a capture's Linux root written into the running
//! system of a machine whose agent runs in live mode — a listening agent (`DISK@HOST:PORT`)
//! or a machine that dials back (`MACHINE`, `DISK@MACHINE`) — booted once, and, when the job
//! waits (`live_wait_minutes`), committed when the new system's agent answers or rolled back
//! when the old system's does. The new system's agent is started as the old one was; one
//! that dials back brings a one-time enrollment token (as a network-booted machine's does),
//! so its new key is taken as the machine's. Once committed the new system takes the disk
//! over (unless `live_keep_old`), rebooting once more. The job's parameters carry where it
//! stands (`"live": "writing" | "switched" | "rebooting" | "committed" | "taking over" |
//! "taken over" | "committed, old system kept" | "rolled back"`) for the API and the pages;
//! the steps go to its log. Everything is done by `diskferry_imaging::live`,
//! as for the CLI.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::{BlockDevice, CancelFlag, CancellableDevice};
use diskferry_customize::{Spec, TargetHardware};
use diskferry_fs::overlay::Chain;
use diskferry_imaging::live::agent::LiveAgent;
use diskferry_imaging::live::flow::{self, Outcome, Redialer};
use diskferry_imaging::live::takeover::{self, TakeOver};
use diskferry_imaging::live::{self, LiveDeployError, LiveOptions, LiveTarget};
use diskferry_imaging::source::open_on_connection;
use diskferry_protocol::PowerAction;
use diskferry_remote::{Connection, Redial};

use super::{transform_for, JobDisk, JobError, JobRequest, Jobs, RunError};
use crate::agents::{AgentRedial, Agents};

/// How long a live job waits for the machine to reboot and answer, by default.
const DEFAULT_WAIT_MINUTES: u32 = 30;

/// A checked live deploy.
pub(super) struct LiveWork {
    pub image: PathBuf,
    pub title: String,
    pub target: JobDisk,
    pub size: Option<u64>,
    pub reboot: bool,
    /// Minutes to wait for the outcome; 0: end once the boot is switched.
    pub wait_minutes: u32,
    /// Once committed, keep the old system as the boot host (no take-over).
    pub keep_old: bool,
    pub customize: Option<Box<Spec>>,
    pub hardware: Option<TargetHardware>,
    /// Set once the new system is committed (the machine is then deployed).
    pub committed: AtomicBool,
}

/// The live-deploy part of a request: the size and the wait.
pub(super) fn check(req: &JobRequest) -> Result<(Option<u64>, u32), JobError> {
    let size =
        match req.live_size_mib {
            Some(m) => Some(m.checked_mul(1 << 20).filter(|s| *s > 0).ok_or_else(|| {
                JobError::Invalid("\"live_size_mib\" must be a size above 0".into())
            })?),
            None => None,
        };
    Ok((size, req.live_wait_minutes.unwrap_or(DEFAULT_WAIT_MINUTES)))
}

/// How the machine is reached again after its reboot: at its listening address, or when it
/// dials back with an approved key.
struct Again<'a> {
    rt: &'a tokio::runtime::Handle,
    target: &'a JobDisk,
    agents: &'a Arc<Agents>,
    session: &'a diskferry_protocol::SessionOptions,
}

impl Again<'_> {
    /// The listening agent, as the CLI reaches one.
    fn listening<'s>(&'s self, addr: &'s str) -> flow::Listening<'s> {
        flow::Listening {
            rt: self.rt,
            addr,
            session: self.session,
        }
    }

    fn redial(&self) -> Arc<dyn Redial> {
        match self.target {
            JobDisk::Listening { addr, .. } => self.listening(addr).redial(),
            JobDisk::Machine { id, label, .. } => Arc::new(AgentRedial {
                agents: Arc::clone(self.agents),
                machine_id: *id,
                label: label.clone(),
            }),
        }
    }
}

impl Redialer for Again<'_> {
    fn connect(&self) -> Option<Connection> {
        match self.target {
            JobDisk::Listening { addr, .. } => self.listening(addr).connect(),
            JobDisk::Machine { id, .. } => self.agents.approved_link(*id).map(|l| l.connection),
        }
    }

    fn open_disk(
        &self,
        conn: &Connection,
        disk: &str,
    ) -> Result<Arc<dyn BlockDevice>, LiveDeployError> {
        Ok(open_on_connection(
            self.rt,
            conn,
            disk,
            true,
            self.redial(),
            Duration::from_secs(30),
        )?)
    }
}

impl Jobs {
    pub(super) fn run_live(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        w: &LiveWork,
        cancel: &CancelFlag,
    ) -> Result<(), RunError> {
        // Cancelling stops the writing (the file is then removed); once the boot is switched
        // the job runs to its end.
        let img = self.catalog.open_capture(&w.image)?;
        let img: Arc<dyn BlockDevice> = Arc::new(CancellableDevice::new(img, cancel.clone()));
        let again = Again {
            rt,
            target: &w.target,
            agents: &self.agents,
            session: &self.session,
        };
        let conn = again.connect().ok_or_else(|| {
            RunError::Live(format!("cannot reach the agent of {}", w.target.describe()))
        })?;
        let state = live::state(&conn).map_err(live_error)?;
        let agent = self.agent_for(&w.target, state.endpoint)?;
        let edits = transform_for(&img, w.customize.as_deref(), w.hardware)?;
        let opts = LiveOptions {
            size: w.size,
            transform: Chain::of(edits, Some(Arc::new(agent))),
            disk: Some(w.target.disk().to_string()),
        };
        let target = LiveTarget {
            rt,
            conn: &conn,
            redial: again.redial(),
            reconnect: Duration::from_secs(300).into(),
        };
        self.set_live_stage(id, "writing");
        let progress = self.progress_sink(id);
        let deployed =
            flow::deploy(&img, &target, &opts, &w.title, &progress).map_err(live_error)?;
        let window = &deployed.written.window;
        tracing::info!(
            "live system written into {} on {}: {} bytes at byte {}, {} bad blocks, partition {}, UUID {}; GRUB starts it once at the next boot",
            deployed.written.map.path,
            deployed.written.map.disk,
            window.len,
            window.start,
            window.bad.iter().map(|b| b.1).sum::<u64>(),
            deployed.partition,
            deployed.written.uuid
        );
        self.set_live_stage(id, "switched");
        if w.reboot {
            rt.block_on(conn.power(PowerAction::Reboot))
                .map_err(RunError::Reboot)?;
            tracing::info!("reboot requested");
            self.set_live_stage(id, "rebooting");
        }
        if w.wait_minutes == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(u64::from(w.wait_minutes) * 60);
        let phase = |what: &str| tracing::info!("{what}");
        match flow::finish(conn, &again, &deployed.token, deadline, &phase).map_err(live_error)? {
            Outcome::Committed => {
                self.set_live_stage(id, "committed");
                w.committed.store(true, Ordering::Release);
                tracing::info!("the new system came up and is GRUB's default from now on");
                if w.keep_old {
                    return Ok(());
                }
                // The take-over's reboot gets a wait of its own.
                let deadline = Instant::now() + Duration::from_secs(u64::from(w.wait_minutes) * 60);
                self.take_over(id, &again, w.target.disk(), deadline)
            }
            Outcome::RolledBack(done) => {
                self.set_live_stage(id, "rolled back");
                Err(RunError::Live(format!(
                    "the old system came back instead of the new one: rolled back ({})",
                    done.join("; ")
                )))
            }
        }
    }

    /// Has the committed new system take its disk over; "taken over" or, when it cannot
    /// (nothing changed), "committed, old system kept".
    fn take_over(
        &self,
        id: i64,
        again: &Again<'_>,
        disk: &str,
        deadline: Instant,
    ) -> Result<(), RunError> {
        let conn = again.connect().ok_or_else(|| {
            RunError::Live("the new system's agent stopped answering before the take-over".into())
        })?;
        self.set_live_stage(id, "taking over");
        let phase = |what: &str| tracing::info!("{what}");
        match takeover::take_over(conn, again, disk, deadline, &phase).map_err(live_error)? {
            TakeOver::Done { partition, freed } => {
                self.set_live_stage(id, "taken over");
                tracing::info!("taken over: the new system is partition {partition} and boots through its own GRUB; the old system's partition is gone ({freed} bytes free)");
            }
            TakeOver::Kept(why) => {
                self.set_live_stage(id, "committed, old system kept");
                tracing::warn!("not taken over: {why}");
            }
        }
        Ok(())
    }

    /// Records where a live job stands in its parameters.
    fn set_live_stage(&self, id: i64, stage: &str) {
        let mut params = self
            .catalog
            .job(id)
            .ok()
            .flatten()
            .map(|j| j.params)
            .unwrap_or_else(|| serde_json::json!({}));
        params["live"] = serde_json::Value::from(stage);
        if let Err(e) = self.catalog.set_job_params(id, &params) {
            tracing::warn!("the job's live stage is not recorded: {e}");
        }
    }

    /// The agent the new system gets: the diskferry-client next to this program, started as
    /// the old agent was, trusting this server; one that dials back brings an enrollment
    /// token for the machine's first MAC address (usable for 15 minutes: past that, its new
    /// key waits for approval).
    fn agent_for(
        &self,
        target: &JobDisk,
        endpoint: Option<(String, String)>,
    ) -> Result<LiveAgent, RunError> {
        let path = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("diskferry-client")))
            .ok_or_else(|| RunError::Live("where this program is".into()))?;
        let binary = std::fs::read(&path).map_err(|e| {
            RunError::Live(format!(
                "the agent for the new system, {}: {e} (put diskferry-client beside diskferry)",
                path.display()
            ))
        })?;
        let (how, addr) = endpoint.ok_or_else(|| {
            RunError::Live("the agent does not say how it is reached: update it".into())
        })?;
        let token = match target.machine() {
            Some(m) if how == "connect" => self
                .catalog
                .machine(m)?
                .and_then(|r| r.macs.first().cloned())
                .map(|mac| self.agents.issue_token(&mac)),
            _ => None,
        };
        let key = self.session.key.public().to_string();
        Ok(LiveAgent::new(binary, &how, &addr, &key, token.as_deref()))
    }
}

fn live_error(e: LiveDeployError) -> RunError {
    RunError::Live(e.to_string())
}
