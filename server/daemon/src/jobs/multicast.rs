//! Multicast deploy jobs (`"kind": "multicast"`): one capture onto every machine a request
//! names (`targets`: `MACHINE` or `DISK@MACHINE`) or a group holds (`group`), streamed once
//! through `diskferry_imaging::multicast`. Every machine is checked for compatibility before
//! anything is written to any of them; the job then marks them all transitioning, follows
//! each one's phase and progress in its events (`machines`), and ends with each machine
//! deployed or failed. The job succeeds only when every machine verified.
//!
//! Waiting: the job waits until every machine is connected, waking the sleeping ones every
//! minute; after `wait_minutes` it starts with those that came (saying which did not), or
//! fails when none did. A customization must be the same for every machine: a SPEC that uses
//! `{name}` is refused (deploy those machines one by one).

use std::path::PathBuf;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, CancelFlag, CancellableDevice};
use diskferry_customize::{Spec, TargetHardware};
use diskferry_imaging::multicast::{
    multicast_deploy, MachineState, MulticastHow, Phase, Target, Watch,
};
use diskferry_imaging::pipeline::Mode;
use diskferry_remote::RemoteOptions;

use super::{deploy_how, AfterCheck, Edits, JobDisk, JobError, JobRequest, Jobs, RunError, Work};
use crate::catalog::{state, MachineRecord, WaitingJob};

/// A checked multicast deploy.
pub(super) struct MulticastWork {
    image: PathBuf,
    image_name: String,
    /// (machine id, label, disk name)
    machines: Vec<(i64, String, String)>,
    mode: Mode,
    after: AfterCheck,
    spec: Option<Box<Spec>>,
    hardware: Option<TargetHardware>,
    max_rate: Option<u64>,
}

/// Most machines one multicast job serves.
const MAX_MACHINES: usize = 256;

impl Jobs {
    /// The machines a multicast request names (`targets`) or its group holds, each with the
    /// disk it names (`DISK@MACHINE`), if any.
    pub(super) fn multicast_machines(
        &self,
        req: &JobRequest,
    ) -> Result<Vec<(MachineRecord, Option<String>)>, JobError> {
        let named = req.targets.as_deref().unwrap_or_default();
        let group = req
            .group
            .as_deref()
            .map(str::trim)
            .filter(|g| !g.is_empty());
        let out = match (named.is_empty(), group) {
            (false, None) => {
                let mut out = Vec::new();
                for raw in named {
                    let (disk, who) = match raw.rsplit_once('@') {
                        Some((d, w)) => (Some(d.to_string()), w),
                        None => (None, raw.as_str()),
                    };
                    let m = self.catalog.find_machine(who)?.ok_or_else(|| {
                        JobError::NotFound(format!(
                            "no machine {who:?} (a name, MAC address or id)"
                        ))
                    })?;
                    if out.iter().any(|(o, _): &(MachineRecord, _)| o.id == m.id) {
                        return Err(JobError::Invalid(format!("machine {who} is named twice")));
                    }
                    out.push((m, disk));
                }
                out
            }
            (true, Some(g)) => {
                let members = self.catalog.group_members(g)?;
                if members.is_empty() {
                    return Err(JobError::NotFound(format!("group {g:?} has no machines")));
                }
                members.into_iter().map(|m| (m, None)).collect()
            }
            _ => {
                return Err(JobError::Invalid(
                    "a multicast job needs \"targets\" (machines) or \"group\", not both".into(),
                ))
            }
        };
        if out.len() > MAX_MACHINES {
            return Err(JobError::Invalid(format!(
                "{} machines: a multicast job serves at most {MAX_MACHINES}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Whether any machine of a multicast request is not connected or busy.
    pub(super) fn multicast_unavailable(&self, req: &JobRequest) -> Result<bool, JobError> {
        Ok(self.multicast_machines(req)?.iter().any(|(m, _)| {
            self.agents.approved_link(m.id).is_none() || m.state == state::TRANSITIONING
        }))
    }

    /// The customization of a multicast request: the same for every machine.
    pub(super) fn multicast_spec(&self, req: &JobRequest) -> Result<Option<Box<Spec>>, JobError> {
        let Some(text) = req.customize.as_deref().filter(|t| !t.trim().is_empty()) else {
            return Ok(None);
        };
        let invalid = |e: diskferry_customize::SpecError| {
            JobError::Invalid(format!(
                "customize: {e} (a multicast deploy sends one image to every machine: a SPEC that uses {{name}} needs deploys one by one)"
            ))
        };
        let spec = Spec::parse(text).map_err(invalid)?;
        Ok(Some(Box::new(spec.render(None).map_err(invalid)?)))
    }

    /// The parts of a multicast request that need no connected machine; returns what the
    /// jobs page shows of it.
    pub(super) fn check_multicast_offline(
        &self,
        req: &JobRequest,
    ) -> Result<serde_json::Value, JobError> {
        let image = super::required(&req.image, "image", "multicast")?;
        self.find_capture(image)?;
        let machines = self.multicast_machines(req)?;
        self.multicast_spec(req)?;
        super::target_hardware(req)?;
        let away: Vec<String> = machines
            .iter()
            .filter(|(m, _)| self.agents.approved_link(m.id).is_none())
            .map(|(m, _)| m.label())
            .collect();
        Ok(serde_json::json!({
            "source": image, "output": format!("{} machines (multicast)", machines.len()),
            "mode": super::parse_mode(req.mode.as_deref())?.name(),
            "waiting_for": (!away.is_empty()).then(|| away.join(", ")), "at": req.at,
        }))
    }

    /// Checks a multicast request whose machines are all connected.
    pub(super) fn check_multicast(
        &self,
        req: &JobRequest,
        mode: Mode,
    ) -> Result<(Work, serde_json::Value), JobError> {
        let image = super::required(&req.image, "image", "multicast")?;
        let rec = self.find_capture(image)?;
        let mut machines = Vec::new();
        for (m, disk) in self.multicast_machines(req)? {
            let raw = match &disk {
                Some(d) => format!("{d}@{}", m.id),
                None => m.id.to_string(),
            };
            let JobDisk::Machine { id, label, disk } =
                JobDisk::resolve(&raw, &self.catalog, &self.agents)?
            else {
                unreachable!("a catalogued machine resolves to a machine");
            };
            if m.state == state::TRANSITIONING {
                return Err(JobError::Conflict(format!(
                    "machine {label} is busy with another job"
                )));
            }
            machines.push((id, label, disk));
        }
        let spec = self.multicast_spec(req)?;
        let hardware = super::target_hardware(req)?;
        let labels: Vec<&str> = machines.iter().map(|(_, l, _)| l.as_str()).collect();
        let params = serde_json::json!({
            "image": rec.name, "targets": labels, "group": req.group, "mode": mode.name(),
            "reboot": req.reboot, "force": req.force, "source": rec.name,
            "output": format!("{} machines (multicast)", labels.len()),
            "customized": spec.is_some(), "target_hardware": hardware.map(TargetHardware::name),
        });
        let work = Work::Multicast(Box::new(MulticastWork {
            image: self.catalog.capture_file(&rec),
            image_name: rec.name.clone(),
            machines,
            mode,
            after: AfterCheck::of(req),
            spec,
            hardware,
            max_rate: req.max_rate_mbit.map(|m| m.saturating_mul(125_000)),
        }));
        Ok((work, params))
    }

    /// A waiting multicast job, once a second: start it when every machine is there; wake
    /// the sleeping ones; past its wait, start with those that came or fail.
    pub(super) fn dispatch_multicast(
        self: &Arc<Self>,
        job: WaitingJob,
        mut req: JobRequest,
        now: i64,
    ) {
        let members = match self.multicast_machines(&req) {
            Ok(m) => m,
            Err(e) => return self.fail_waiting(job.id, &e.to_string()),
        };
        let (here, away): (Vec<_>, Vec<_>) = members
            .into_iter()
            .partition(|(m, _)| self.agents.approved_link(m.id).is_some());
        if away.is_empty() {
            return self.start_waiting(job.id, req);
        }
        let minutes =
            super::queue::wait_minutes(&req).unwrap_or(super::queue::DEFAULT_WAIT_MINUTES);
        if now - job.not_before > i64::from(minutes) * 60 {
            let missing: Vec<String> = away.iter().map(|(m, _)| m.label()).collect();
            if here.is_empty() {
                return self.fail_waiting(
                    job.id,
                    &format!(
                        "no machine connected within {minutes} minutes ({})",
                        missing.join(", ")
                    ),
                );
            }
            let line = format!(
                "starting without {} (not connected within {minutes} minutes)",
                missing.join(", ")
            );
            let _ = self.catalog.append_job_log(job.id, &line);
            req.targets = Some(
                here.iter()
                    .map(|(m, d)| match d {
                        Some(d) => format!("{d}@{}", m.id),
                        None => m.id.to_string(),
                    })
                    .collect(),
            );
            req.group = None;
            return self.start_waiting(job.id, req);
        }
        let due = job
            .woken_at
            .is_none_or(|t| now - t >= super::queue::REWAKE_SECS);
        if req.wake != Some(false) && due {
            for (m, _) in away
                .iter()
                .filter(|(m, _)| self.agents.link(m.id).is_none())
            {
                let line = self.wake(m).unwrap_or_else(|e| e.to_string());
                let _ = self.catalog.append_job_log(job.id, &line);
            }
            let _ = self.catalog.set_job_woken(job.id, now);
        }
    }

    /// Runs a checked multicast deploy (see the module documentation).
    pub(super) fn run_multicast(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        w: &MulticastWork,
        cancel: &CancelFlag,
    ) -> Result<(), RunError> {
        let img = self.catalog.open_capture(&w.image)?;
        let img: Arc<dyn BlockDevice> = Arc::new(CancellableDevice::new(img, cancel.clone()));
        for (m, label, disk) in &w.machines {
            let target = JobDisk::Machine {
                id: *m,
                label: label.clone(),
                disk: disk.clone(),
            };
            self.check_fit(&img, &target, w.hardware, w.after.force)
                .map_err(|e| RunError::Incompatible(format!("{label}: {e}")))?;
        }
        let how = deploy_how(
            &img,
            Edits {
                mode: w.mode,
                spec: w.spec.as_deref(),
                hardware: w.hardware,
                fallback_loader: w.after.fallback_loader,
            },
        )?;
        let targets = self.open_all(rt, w, cancel)?;
        let before: Vec<(i64, String)> = w
            .machines
            .iter()
            .filter_map(|(m, _, _)| {
                let st = self.catalog.machine(*m).ok().flatten()?.state;
                let _ = self.catalog.set_machine_state(*m, state::TRANSITIONING);
                Some((*m, st))
            })
            .collect();
        tracing::info!(
            "multicast deploy of {} to {} machines",
            w.image_name,
            targets.len()
        );
        let mut mhow = MulticastHow::new(how);
        mhow.stage_dir = self.catalog.data_dir().to_path_buf();
        mhow.max_rate = w.max_rate;
        mhow.boot_entries = w.after.boot_entry;
        let progress = self.progress_sink(id);
        let watch = JobWatch { jobs: self, id };
        let report = match multicast_deploy(img, &targets, &mhow, &progress, &watch) {
            Ok(r) => r,
            Err(e) => {
                for (m, st) in &before {
                    let _ = self.catalog.set_machine_state(*m, st);
                }
                return Err(RunError::Multicast(e.to_string()));
            }
        };
        for ((m, label, _), s) in w.machines.iter().zip(&report.machines) {
            let done = s.phase == Phase::Done;
            let _ = self
                .catalog
                .set_machine_state(*m, if done { state::DEPLOYED } else { state::FAILED });
            if done && w.after.reboot {
                self.reboot(rt, *m, label);
            }
        }
        let _ = self.catalog.set_job_result(
            id,
            &serde_json::json!({
                "machines": report.machines, "session": report.session,
                "data_bytes": report.data_bytes, "zero_bytes": report.zero_bytes,
                "elapsed_s": report.elapsed.as_secs_f64(),
            }),
        );
        let failed: Vec<String> = report
            .failed()
            .map(|s| format!("{}: {}", s.name, s.error.as_deref().unwrap_or("failed")))
            .collect();
        if failed.is_empty() {
            tracing::info!("every machine deployed and verified");
            Ok(())
        } else {
            Err(RunError::Multicast(format!(
                "{} of {} machines failed: {}",
                failed.len(),
                report.machines.len(),
                failed.join("; ")
            )))
        }
    }

    /// Each machine's disk, opened writable on its agent's connection.
    fn open_all(
        &self,
        rt: &tokio::runtime::Handle,
        w: &MulticastWork,
        cancel: &CancelFlag,
    ) -> Result<Vec<Target>, RunError> {
        let mut targets = Vec::new();
        for (m, label, disk) in &w.machines {
            let gone = || RunError::Open {
                what: format!("{disk} on machine {label}"),
                source: Box::new(super::OpenError::Disconnected(label.clone())),
            };
            let link = self.agents.approved_link(*m).ok_or_else(gone)?;
            let opts = RemoteOptions {
                cancel: Some(cancel.clone()),
                ..RemoteOptions::default()
            };
            let remote = rt
                .block_on(link.connection.open(disk, true, opts))
                .map_err(|e| {
                    RunError::Multicast(format!("opening {disk} on machine {label}: {e}"))
                })?;
            targets.push(Target {
                name: label.clone(),
                disk: Arc::new(remote),
            });
        }
        Ok(targets)
    }

    /// Asks a deployed machine to reboot (a failure is logged: the disk is deployed).
    fn reboot(&self, rt: &tokio::runtime::Handle, m: i64, label: &str) {
        let Some(link) = self.agents.approved_link(m) else {
            return tracing::warn!("machine {label} disconnected before the reboot");
        };
        match rt.block_on(
            link.connection
                .power(diskferry_protocol::PowerAction::Reboot),
        ) {
            Ok(()) => tracing::info!("machine {label}: reboot requested"),
            Err(e) => tracing::warn!("machine {label}: reboot: {e}"),
        }
    }
}

/// Publishes every machine's state in the job's events and progress record.
struct JobWatch<'a> {
    jobs: &'a Arc<Jobs>,
    id: i64,
}

impl Watch for JobWatch<'_> {
    fn machines(&self, states: &[MachineState]) {
        let done: u64 = states.iter().map(|s| s.done).sum();
        let total: u64 = states.iter().map(|s| s.total).sum();
        let event = serde_json::json!({
            "phase": "multicast", "done": done, "total": total, "machines": states,
        });
        let _ = self.jobs.catalog.set_job_progress(self.id, &event);
        let mut live = event;
        live["state"] = "running".into();
        self.jobs.publish(self.id, live);
    }
}
