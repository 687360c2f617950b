//! Jobs that wait, and the loop that starts them. A request whose time (`at`) is ahead, or
//! whose machine is not connected, is checked as far as it can be without the machine (the
//! image, the output name, the customization) and recorded waiting; a recurring schedule
//! queues one such job each time it is due. Every second the dispatcher starts each due job
//! whose machine is connected (checked in full then), sends the others' machines a magic
//! packet (once a minute, unless the request says `wake: false`) and fails those that waited
//! longer than their `wait_minutes`.

use std::sync::Arc;
use std::time::Duration;

use diskferry_customize::Spec;

use super::when::{self, Every};
use super::{output_format, parse_mode, required, JobError, JobRequest, Jobs};
use crate::catalog::{unix_now, JobState, MachineRecord, QueuedJob, WaitingJob};

/// How long a job waits for its machine unless the request says.
pub(super) const DEFAULT_WAIT_MINUTES: u32 = 15;
/// The longest wait a request may ask for.
const MAX_WAIT_MINUTES: u32 = 24 * 60;
/// Magic packets for a waiting machine go out this often.
pub(super) const REWAKE_SECS: i64 = 60;
/// The dispatcher's pace.
const TICK: Duration = Duration::from_secs(1);

/// Why and until when a request waits.
#[derive(Debug, Clone)]
pub(super) struct Wait {
    machine: Option<MachineRecord>,
    not_before: i64,
}

impl Jobs {
    /// Whether `req` must wait (its time is ahead, or its machine is not connected or busy
    /// with another job).
    pub(super) fn must_wait(&self, req: &JobRequest) -> Result<Option<Wait>, JobError> {
        let now = unix_now();
        let not_before = start_time(req, now)?;
        let machine = self.request_machine(req)?;
        let unavailable = match req.kind.as_str() {
            "multicast" => self.multicast_unavailable(req)?,
            _ => machine.as_ref().is_some_and(|m| {
                self.agents.link(m.id).is_none() || m.state == crate::catalog::state::TRANSITIONING
            }),
        };
        Ok((not_before > now || unavailable).then_some(Wait {
            machine,
            not_before,
        }))
    }

    /// The known machine a request's source (capture) or target (deploy) names, if any.
    fn request_machine(&self, req: &JobRequest) -> Result<Option<MachineRecord>, JobError> {
        let raw = match req.kind.as_str() {
            "capture" => required(&req.source, "source", "capture")?,
            "deploy" => required(&req.target, "target", "deploy")?,
            // Many machines: the job keeps track of them itself.
            "multicast" => return Ok(None),
            "live" => required(&req.target, "target", "live")?,
            other => {
                return Err(JobError::Invalid(format!(
                    "unknown job kind {other:?}: use \"capture\", \"deploy\", \"multicast\" or \"live\""
                )))
            }
        };
        let who = raw.rsplit_once('@').map_or(raw, |(_, w)| w);
        Ok(self.catalog.find_machine(who)?)
    }

    /// Records `req` waiting, after checking what can be checked without its machine.
    pub(super) fn enqueue(
        &self,
        req: &JobRequest,
        wait: Wait,
        schedule_id: Option<i64>,
    ) -> Result<i64, JobError> {
        let params = self.check_offline(req, wait.machine.as_ref())?;
        let request = serde_json::to_value(req)
            .map_err(|e| JobError::Invalid(format!("cannot record the request: {e}")))?;
        let id = self.catalog.queue_job(&QueuedJob {
            kind: &req.kind,
            params: &params,
            request: &request,
            machine_id: wait.machine.as_ref().map(|m| m.id),
            not_before: wait.not_before,
            schedule_id,
        })?;
        let line = match &wait.machine {
            Some(m)
                if wait.not_before <= unix_now()
                    && m.state == crate::catalog::state::TRANSITIONING =>
            {
                format!(
                    "waiting for machine {} to finish its current job",
                    m.label()
                )
            }
            Some(m) if wait.not_before <= unix_now() => {
                format!("waiting for machine {} to connect", m.label())
            }
            None if wait.not_before <= unix_now() => match params["waiting_for"].as_str() {
                Some(away) => format!("waiting for machines {away} to connect"),
                None => "waiting for its machines to finish their current jobs".into(),
            },
            _ => format!("waiting until {}", show_time(wait.not_before)),
        };
        let _ = self.catalog.append_job_log(id, &line);
        tracing::info!(job_id = id, "job {id} queued: {line}");
        Ok(id)
    }

    /// The parts of a request that need no connected machine; returns what the jobs page
    /// shows of it.
    fn check_offline(
        &self,
        req: &JobRequest,
        machine: Option<&MachineRecord>,
    ) -> Result<serde_json::Value, JobError> {
        let mode = parse_mode(req.mode.as_deref())?;
        wait_minutes(req)?;
        let (what, place) = match req.kind.as_str() {
            "multicast" => return self.check_multicast_offline(req),
            "capture" => {
                let output = required(&req.output, "output", "capture")?;
                output_format(output)?;
                (output, required(&req.source, "source", "capture")?)
            }
            _ => {
                let image = required(&req.image, "image", "deploy")?;
                self.find_capture(image)?;
                (image, required(&req.target, "target", "deploy")?)
            }
        };
        if let Some(text) = req.customize.as_deref().filter(|t| !t.trim().is_empty()) {
            let invalid =
                |e: diskferry_customize::SpecError| JobError::Invalid(format!("customize: {e}"));
            let name = machine.and_then(|m| m.name.as_deref());
            Spec::parse(text)
                .and_then(|s| s.render(name))
                .map_err(invalid)?;
        }
        super::target_hardware(req)?;
        let (source, output) = match req.kind.as_str() {
            "capture" => (place, what),
            _ => (what, place),
        };
        Ok(serde_json::json!({
            "source": source, "output": output, "mode": mode.name(),
            "waiting_for": machine.map(MachineRecord::label), "at": req.at,
        }))
    }

    /// Records a recurring schedule of `req`; returns its id.
    pub fn add_schedule(&self, req: &JobRequest, every: &str) -> Result<i64, JobError> {
        if req.at.is_some() {
            return Err(JobError::Invalid(
                "a schedule has no \"at\": its recurrence says when".into(),
            ));
        }
        let every = Every::parse(every).map_err(|e| JobError::Invalid(e.to_string()))?;
        let machine = self.request_machine(req)?;
        self.check_offline(req, machine.as_ref())?;
        let tz = when::local_zone();
        let next = every.next_after(jiff::Timestamp::now(), &tz).as_second();
        let request = serde_json::to_value(req)
            .map_err(|e| JobError::Invalid(format!("cannot record the request: {e}")))?;
        Ok(self.catalog.add_schedule(
            &req.kind,
            &request,
            machine.map(|m| m.id),
            &every.canonical(),
            next,
        )?)
    }

    /// Sends the machine `key` names a magic packet; says where it went.
    pub fn wake_machine(&self, key: &str) -> Result<String, JobError> {
        let m = self
            .catalog
            .find_machine(key)?
            .ok_or_else(|| JobError::NotFound(format!("no machine {key:?}")))?;
        self.wake(&m)
    }

    pub(super) fn wake(&self, m: &MachineRecord) -> Result<String, JobError> {
        let last = m.address.as_deref().and_then(|a| a.parse().ok());
        let config = self.wake.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (dests, why) = crate::wake::wake(&config, &m.macs, last)
            .map_err(|e| JobError::Conflict(format!("waking {}: {e}", m.label())))?;
        let to: Vec<String> = dests.iter().map(|d| d.to_string()).collect();
        Ok(format!(
            "magic packet for {} ({}) sent to {} ({why})",
            m.label(),
            m.macs.join(", "),
            to.join(", ")
        ))
    }

    /// Starts, wakes or fails waiting jobs and queues due schedules, every second, for as
    /// long as the server runs.
    pub async fn dispatch_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = Arc::clone(&self);
            let rt = tokio::runtime::Handle::current();
            // Catalog work blocks; a job started here spawns on the runtime.
            let _ = tokio::task::spawn_blocking(move || {
                let _guard = rt.enter();
                me.dispatch(unix_now())
            })
            .await;
        }
    }

    /// One round of the dispatcher at time `now`.
    pub fn dispatch(self: &Arc<Self>, now: i64) {
        self.queue_due_schedules(now);
        let waiting = match self.catalog.waiting_jobs() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("reading waiting jobs: {e}");
                return;
            }
        };
        for job in waiting.into_iter().filter(|j| j.not_before <= now) {
            if !self.live().contains_key(&job.id) {
                self.dispatch_job(job, now);
            }
        }
    }

    fn dispatch_job(self: &Arc<Self>, job: WaitingJob, now: i64) {
        let req: JobRequest = match serde_json::from_str(&job.request) {
            Ok(r) => r,
            Err(e) => return self.fail_waiting(job.id, &format!("unreadable request: {e}")),
        };
        if req.kind == "multicast" {
            return self.dispatch_multicast(job, req, now);
        }
        let machine = match job.machine_id.map(|id| self.catalog.machine(id)) {
            Some(Ok(Some(m))) => Some(m),
            Some(Ok(None)) => return self.fail_waiting(job.id, "its machine was forgotten"),
            Some(Err(e)) => return tracing::warn!("job {}: {e}", job.id),
            None => None,
        };
        let there = machine
            .as_ref()
            .is_none_or(|m| self.agents.approved_link(m.id).is_some());
        if there {
            return self.start_waiting(job.id, req);
        }
        let m = machine.expect("a job that waits for nothing is there");
        let minutes = wait_minutes(&req).unwrap_or(DEFAULT_WAIT_MINUTES);
        if now - job.not_before > i64::from(minutes) * 60 {
            let woken = job.woken_at.map_or(String::new(), |_| {
                " after a magic packet (is Wake-on-LAN enabled in its firmware, and the network boot first?)".into()
            });
            return self.fail_waiting(
                job.id,
                &format!(
                    "machine {} did not connect within {minutes} minutes{woken}",
                    m.label()
                ),
            );
        }
        let asleep = self.agents.link(m.id).is_none();
        let due = job.woken_at.is_none_or(|t| now - t >= REWAKE_SECS);
        if req.wake != Some(false) && asleep && due {
            let line = self.wake(&m).unwrap_or_else(|e| e.to_string());
            let _ = self.catalog.set_job_woken(job.id, now);
            let _ = self.catalog.append_job_log(job.id, &line);
        }
    }

    /// Starts a waiting job whose machine is there; a busy machine keeps it waiting.
    pub(super) fn start_waiting(self: &Arc<Self>, id: i64, req: JobRequest) {
        match self.start_checked(req, Some(id)) {
            Ok(_) => tracing::info!(job_id = id, "waiting job {id} starts"),
            Err(JobError::Conflict(why)) => {
                tracing::debug!(job_id = id, "waiting job {id} still waits: {why}")
            }
            Err(e) => self.fail_waiting(id, &e.to_string()),
        }
    }

    pub(super) fn fail_waiting(&self, id: i64, why: &str) {
        tracing::warn!(job_id = id, "waiting job {id} failed: {why}");
        let _ = self.catalog.append_job_log(id, why);
        let _ = self.catalog.end_waiting_job(id, JobState::Failed, why);
    }

    fn queue_due_schedules(&self, now: i64) {
        let Ok(schedules) = self.catalog.schedules() else {
            return;
        };
        let tz = when::local_zone();
        for s in schedules.into_iter().filter(|s| s.next_at <= now) {
            let next = Every::parse(&s.every).map_or(i64::MAX, |e| {
                e.next_after(jiff::Timestamp::from_second(now).unwrap_or_default(), &tz)
                    .as_second()
            });
            let queued = serde_json::from_value::<JobRequest>(s.request.clone())
                .map_err(|e| JobError::Invalid(e.to_string()))
                .and_then(|req| {
                    let machine = self.request_machine(&req)?;
                    let wait = Wait {
                        machine,
                        not_before: now,
                    };
                    self.enqueue(&req, wait, Some(s.id))
                });
            match queued {
                Ok(job) => {
                    tracing::info!("schedule {} ({}) queued job {job}", s.id, s.every);
                    let _ = self.catalog.schedule_ran(s.id, job, next);
                }
                Err(e) => {
                    tracing::warn!(
                        "schedule {} ({}) could not queue its job: {e}",
                        s.id,
                        s.every
                    );
                    let _ = self
                        .catalog
                        .schedule_ran(s.id, s.last_job.unwrap_or(0), next);
                }
            }
        }
    }
}

/// When a request may start.
fn start_time(req: &JobRequest, now: i64) -> Result<i64, JobError> {
    let Some(at) = req.at.as_deref() else {
        return Ok(now);
    };
    let now_ts = jiff::Timestamp::from_second(now).unwrap_or_default();
    when::parse_at(at, now_ts, &when::local_zone())
        .map(|t| t.as_second())
        .map_err(|e| JobError::Invalid(format!("at: {e}")))
}

pub(super) fn wait_minutes(req: &JobRequest) -> Result<u32, JobError> {
    match req.wait_minutes {
        None => Ok(DEFAULT_WAIT_MINUTES),
        Some(m) if (1..=MAX_WAIT_MINUTES).contains(&m) => Ok(m),
        Some(m) => Err(JobError::Invalid(format!(
            "wait_minutes: {m} is not between 1 and {MAX_WAIT_MINUTES}"
        ))),
    }
}

/// A time for people, in the server's time zone.
pub fn show_time(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| {
            t.to_zoned(when::local_zone())
                .strftime("%Y-%m-%d %H:%M %Z")
                .to_string()
        })
        .unwrap_or_else(|_| secs.to_string())
}
