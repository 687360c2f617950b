//! Live deploy jobs (`"kind": "live"`): a capture's Linux root written into the running
//! system of a machine whose agent listens in live mode (`DISK@HOST:PORT`), booted once, and
//! — when the job waits (`live_wait_minutes`) — committed when the new system's agent answers
//! or rolled back when the old system's does. The job's parameters carry where it stands
//! (`"live": "writing" | "switched" | "rebooting" | "committed" | "rolled back"`), so the API
//! and the jobs page show it; the steps go to the job's log. Everything is done by
//! `diskferry_imaging::live`, as for the CLI.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::BlockDevice;
use diskferry_customize::{Spec, TargetHardware};
use diskferry_fs::overlay::Chain;
use diskferry_imaging::live::agent::LiveAgent;
use diskferry_imaging::live::flow::{self, Outcome, Redialer};
use diskferry_imaging::live::{self, LiveDeployError, LiveOptions, LiveTarget};
use diskferry_imaging::source::open_on_connection;
use diskferry_protocol::PowerAction;
use diskferry_remote::{Connection, DialAddr};

use super::{transform_for, JobDisk, JobError, JobRequest, Jobs, RunError};

/// How long a live job waits for the machine to reboot and answer, by default.
const DEFAULT_WAIT_MINUTES: u32 = 30;

/// A checked live deploy.
pub(super) struct LiveWork {
    pub image: PathBuf,
    pub title: String,
    /// The listening agent's disk and address.
    pub disk: String,
    pub addr: String,
    pub size: Option<u64>,
    pub reboot: bool,
    /// Minutes to wait for the outcome; 0: end once the boot is switched.
    pub wait_minutes: u32,
    pub customize: Option<Box<Spec>>,
    pub hardware: Option<TargetHardware>,
}

/// The live-deploy part of a request: the listening agent it names.
pub(super) fn check(
    req: &JobRequest,
    target: &JobDisk,
) -> Result<(String, String, Option<u64>, u32), JobError> {
    let JobDisk::Listening { disk, addr } = target else {
        return Err(JobError::Invalid(
            "a live deploy reaches a listening agent in live mode: give \"target\" as DISK@HOST:PORT (diskferry-client --listen … --live inside the running system)".into(),
        ));
    };
    let size = req.live_size_mib.map(|m| m << 20);
    if size == Some(0) {
        return Err(JobError::Invalid(
            "\"live_size_mib\" must be above 0".into(),
        ));
    }
    let wait = req.live_wait_minutes.unwrap_or(DEFAULT_WAIT_MINUTES);
    Ok((disk.clone(), addr.clone(), size, wait))
}

/// The listening agent at an address, dialled again after the machine's reboot.
struct Again<'a> {
    rt: &'a tokio::runtime::Handle,
    addr: &'a str,
    session: &'a diskferry_protocol::SessionOptions,
}

impl Redialer for Again<'_> {
    fn connect(&self) -> Option<Connection> {
        self.rt
            .block_on(Connection::connect(self.addr, self.session))
            .ok()
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

impl Again<'_> {
    fn redial(&self) -> Arc<DialAddr> {
        Arc::new(DialAddr {
            addr: self.addr.to_string(),
            session: self.session.clone(),
        })
    }
}

impl Jobs {
    pub(super) fn run_live(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        w: &LiveWork,
    ) -> Result<(), RunError> {
        let stage = |what: &str| self.set_live_stage(id, what);
        let img = self.catalog.open_capture(&w.image)?;
        let again = Again {
            rt,
            addr: &w.addr,
            session: &self.session,
        };
        let conn = again
            .connect()
            .ok_or_else(|| RunError::Live(format!("cannot reach the agent at {}", w.addr)))?;
        let state = live::state(&conn).map_err(live_error)?;
        let agent = agent_for(state.endpoint, &self.session)?;
        let edits = transform_for(&img, w.customize.as_deref(), w.hardware)?;
        let opts = LiveOptions {
            size: w.size,
            transform: Chain::of(edits, Some(Arc::new(agent))),
            disk: Some(w.disk.clone()),
        };
        let target = LiveTarget {
            rt,
            conn: &conn,
            redial: again.redial(),
            reconnect: Duration::from_secs(300).into(),
        };
        stage("writing");
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
        stage("switched");
        if w.reboot {
            rt.block_on(conn.power(PowerAction::Reboot))
                .map_err(RunError::Reboot)?;
            tracing::info!("reboot requested");
            stage("rebooting");
        }
        if w.wait_minutes == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(u64::from(w.wait_minutes) * 60);
        let phase = |what: &str| tracing::info!("{what}");
        match flow::finish(conn, &again, &deployed.token, deadline, &phase).map_err(live_error)? {
            Outcome::Committed => {
                stage("committed");
                tracing::info!("the new system came up and is GRUB's default from now on");
                Ok(())
            }
            Outcome::RolledBack(done) => {
                stage("rolled back");
                Err(RunError::Live(format!(
                    "the old system came back instead of the new one: rolled back ({})",
                    done.join("; ")
                )))
            }
        }
    }

    /// Records where a live job stands in its parameters.
    fn set_live_stage(&self, id: i64, stage: &str) {
        let params = self
            .catalog
            .job(id)
            .ok()
            .flatten()
            .map(|j| j.params)
            .unwrap_or_else(|| serde_json::json!({}));
        let mut params = params;
        params["live"] = serde_json::Value::from(stage);
        if let Err(e) = self.catalog.set_job_params(id, &params) {
            tracing::warn!("the job's live stage is not recorded: {e}");
        }
    }
}

/// The agent the new system gets: the diskferry-client next to this program, started as the
/// old agent was, trusting this server.
fn agent_for(
    endpoint: Option<(String, String)>,
    session: &diskferry_protocol::SessionOptions,
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
    Ok(LiveAgent::new(
        binary,
        &how,
        &addr,
        &session.key.public().to_string(),
    ))
}

fn live_error(e: LiveDeployError) -> RunError {
    RunError::Live(e.to_string())
}
