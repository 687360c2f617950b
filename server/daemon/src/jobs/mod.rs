//! The daemon's jobs: a capture from a machine or listening client into `DATA_DIR/captures`, or
//! a deploy of a catalogued capture onto a machine's disk. A request is checked and recorded,
//! then runs on a blocking thread inside a `job` span through the imaging crate's one API
//! ([`diskferry_imaging::capture`], [`diskferry_imaging::deploy`]); its progress events (the
//! objects `--progress json` prints) go to the catalog and to live watchers, and every log
//! event inside the span — the imaging steps, a reconnect — lands in the job's log
//! ([`crate::joblog`]). Jobs are cancelled through their source ([`CancellableDevice`]).
//! Captures write a chunk map by default and build on a base when there is one ([`chain`]):
//! the one named, or for a machine's disk its newest fitting capture.

mod chain;
mod disk;
mod live;
mod multicast;
mod names;
mod queue;
pub mod when;
pub use queue::show_time;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use diskferry_customize::{Customization, Spec, TargetHardware};
use diskferry_fs::overlay::TreeTransform;
use diskferry_imaging::pipeline::DeployHow;
use diskferry_protocol::SessionOptions;

use diskferry_blockdev::{BlockDevice, CancelFlag, CancellableDevice};
use diskferry_imaging::pipeline::{partial_path_for, DeployError, Mode, OutputOptions};
use diskferry_imaging::progress::{JsonLines, Progress};
use diskferry_imaging::{CaptureJobError, CaptureOptions};
use diskferry_vdisk::ImageFormat;
use serde::Deserialize;
use tokio::sync::watch;

use crate::agents::Agents;
use crate::catalog::{state, CaptureRecording, Catalog, CatalogError, JobState};
pub use chain::{auto_base, BaseCapture, BasePlan, Made};
pub use disk::{JobDisk, OpenError};
use names::{OutputNames, Reservation};

/// What a job request asks for (`POST /api/jobs`, the jobs page, the CLI through a server).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// "capture", "deploy", "multicast" (one capture onto many machines at once) or "live"
    /// (a capture's Linux root into the running system of a listening live agent).
    pub kind: String,
    /// Capture: what to read — a machine (name or MAC), `DISK@MACHINE`, or `DISK@HOST:PORT`
    /// of a listening client.
    #[serde(default)]
    pub source: Option<String>,
    /// Capture: file name inside the captures directory; its extension (.vhdx, .qcow2, .img)
    /// sets the format.
    #[serde(default)]
    pub output: Option<String>,
    /// Deploy: the capture to write (its id or name).
    #[serde(default)]
    pub image: Option<String>,
    /// Deploy: where — a machine, `DISK@MACHINE`, or `DISK@HOST:PORT`.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    /// Capture: compare source and output afterwards (deploys always verify).
    #[serde(default)]
    pub verify: bool,
    /// Deploy: reboot the machine when done.
    #[serde(default)]
    pub reboot: bool,
    /// Deploy: write even when the compatibility check refuses (the machine's firmware or
    /// storage controllers do not fit the image); the reasons are logged as warnings.
    #[serde(default)]
    pub force: bool,
    /// Capture: the capture to build on (its id or name); an unusable one fails the job.
    #[serde(default)]
    pub base: Option<String>,
    /// Capture: "auto" (the newest fitting capture of the same machine and disk, else in
    /// full; the default for a machine's disk) or "full".
    #[serde(default)]
    pub incremental: Option<String>,
    /// Capture: write the chunk map beside a full capture (default true; an incremental
    /// capture always has one).
    #[serde(default)]
    pub chunk_map: Option<bool>,
    /// Deploy and capture: a customization SPEC (TOML, as `--customize` reads) applied to the
    /// Linux root as it is recreated; `{name}` is the machine's registered name.
    #[serde(default)]
    pub customize: Option<String>,
    /// Deploy and capture: reconfigure the Linux system for this hardware (virtio, ahci, nvme,
    /// hyperv, vmware): drivers into its initramfs, root by UUID, network unpinned from MACs.
    #[serde(default)]
    pub target_hardware: Option<String>,
    /// When to start (`now`, `+30m`, `HH:MM`, `YYYY-MM-DD HH:MM` in the server's time zone,
    /// or RFC 3339); a job for a machine that is not connected waits for it either way.
    #[serde(default)]
    pub at: Option<String>,
    /// Wake the machine with a magic packet when it is not connected (default true).
    #[serde(default)]
    pub wake: Option<bool>,
    /// How long a job waits for its machine to connect before it fails, in minutes
    /// (default 15).
    #[serde(default)]
    pub wait_minutes: Option<u32>,
    /// Multicast: the machines (`MACHINE` or `DISK@MACHINE`).
    #[serde(default)]
    pub targets: Option<Vec<String>>,
    /// Multicast: every machine of this group.
    #[serde(default)]
    pub group: Option<String>,
    /// Multicast: most megabits a second to send (the rate also adapts to the slowest
    /// machine).
    #[serde(default)]
    pub max_rate_mbit: Option<u64>,
    /// Deploy and multicast: add the EFI fallback loader (`\EFI\BOOT\BOOTX64.EFI`) to EFI
    /// system partitions lacking it (default true).
    #[serde(default)]
    pub fallback_loader: Option<bool>,
    /// Deploy and multicast: register a UEFI boot entry for the deployed system on UEFI
    /// machines whose agent allows it (`--allow-firmware`; default true).
    #[serde(default)]
    pub boot_entry: Option<bool>,
    /// Live: the live file's size in MiB (default: one and a half times what the root needs).
    #[serde(default)]
    pub live_size_mib: Option<u64>,
    /// Live: minutes to wait for the machine to reboot into the new system (committed) or
    /// back into the old one (rolled back); 0 ends the job once the boot is switched
    /// (default 30).
    #[serde(default)]
    pub live_wait_minutes: Option<u32>,
    /// Live: once committed, keep the old system as the boot host instead of having the new
    /// system take the disk over (default false: taken over, the old partition removed).
    #[serde(default)]
    pub live_keep_old: Option<bool>,
}

/// Why a job request was refused (nothing was started).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is malformed or names something impossible.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The request is fine but conflicts with the current state (busy, offline, name taken).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// A connected machine's disk, exported as `DISK@MACHINE` (MACHINE: its name, else its first
/// MAC address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDisk {
    pub machine_id: i64,
    /// The disk's name on its machine.
    pub disk: String,
    pub export: String,
    pub description: String,
}

/// A deploy's mode and the edits it makes.
struct Edits<'a> {
    mode: Mode,
    spec: Option<&'a Spec>,
    hardware: Option<TargetHardware>,
    fallback_loader: bool,
}

/// How a deploy of `img` goes: by its mode, with the customization and reconfiguration it
/// asks for.
fn deploy_how(img: &Arc<dyn BlockDevice>, how: Edits<'_>) -> Result<DeployHow, RunError> {
    Ok(DeployHow {
        mode: how.mode,
        transform: transform_for(img, how.spec, how.hardware)?,
        fallback_loader: how.fallback_loader,
    })
}

/// The customization of `spec` (random material made now) and the reconfiguration for
/// `hardware` of the Linux system on `disk`, when asked for — refused unless `disk` holds a
/// Linux root.
fn transform_for(
    disk: &Arc<dyn BlockDevice>,
    spec: Option<&Spec>,
    hardware: Option<TargetHardware>,
) -> Result<Option<Arc<dyn TreeTransform>>, RunError> {
    if spec.is_none() && hardware.is_none() {
        return Ok(None);
    }
    if diskferry_imaging::inspect::linux_roots(disk).is_empty() {
        return Err(RunError::Customize(
            "the disk holds no Linux root filesystem (ext2/3/4 with /etc/os-release) to customize"
                .into(),
        ));
    }
    let empty = Spec::default();
    let mut c = Customization::new(spec.unwrap_or(&empty), None)
        .map_err(|e| RunError::Customize(e.to_string()))?;
    if let Some(hw) = hardware {
        c = c.with_target_hardware(hw, diskferry_imaging::inspect::filesystem_uuids(disk));
    }
    tracing::info!("{}", c.describe());
    Ok(Some(Arc::new(c)))
}

/// Why a running job failed.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("connecting to {what}: {source}")]
    Open {
        what: String,
        source: Box<OpenError>,
    },
    #[error(transparent)]
    Image(#[from] CatalogError),
    #[error(transparent)]
    Capture(Box<CaptureJobError>),
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error("machine {0} disconnected before the reboot")]
    GoneBeforeReboot(String),
    #[error("reboot: {0}")]
    Reboot(#[source] diskferry_blockdev::BlockError),
    #[error("customize: {0}")]
    Customize(String),
    #[error(
        "the image does not fit the machine (nothing was written; \"force\" deploys anyway): {0}"
    )]
    Incompatible(String),
    #[error("{0}")]
    Multicast(String),
    #[error("{0}")]
    Live(String),
    #[error("internal error: the job panicked ({0}); this is a bug, please report it")]
    Panicked(String),
}

impl From<Box<CaptureJobError>> for RunError {
    fn from(e: Box<CaptureJobError>) -> RunError {
        RunError::Capture(e)
    }
}

/// A checked job, ready to run.
enum Work {
    Capture(Box<CaptureWork>),
    Deploy {
        image: PathBuf,
        target: JobDisk,
        mode: Mode,
        after: AfterCheck,
        /// Rendered for the target machine.
        customize: Option<Box<Spec>>,
        hardware: Option<TargetHardware>,
    },
    Multicast(Box<multicast::MulticastWork>),
    Live(Box<live::LiveWork>),
}

/// What a deploy does around its write: the compatibility check (skipped in effect by
/// `force`) and the reboot.
#[derive(Debug, Clone, Copy)]
struct AfterCheck {
    force: bool,
    reboot: bool,
    fallback_loader: bool,
    boot_entry: bool,
}

impl AfterCheck {
    fn of(req: &JobRequest) -> AfterCheck {
        AfterCheck {
            force: req.force,
            reboot: req.reboot,
            fallback_loader: req.fallback_loader != Some(false),
            boot_entry: req.boot_entry != Some(false),
        }
    }
}

/// A checked capture.
struct CaptureWork {
    source: JobDisk,
    out: PathBuf,
    output: String,
    options: CaptureOptions,
    /// Rendered for the source machine.
    customize: Option<Box<Spec>>,
    hardware: Option<TargetHardware>,
    plan: BasePlan,
    /// Holds the output name until the job (and this value) ends.
    _name: Reservation,
}

impl Work {
    fn machine(&self) -> Option<i64> {
        match self {
            Work::Capture(c) => c.source.machine(),
            Work::Deploy { target, .. } => target.machine(),
            // Its machines' states are kept by the job itself.
            Work::Multicast(_) => None,
            Work::Live(w) => w.target.machine(),
        }
    }
}

fn required<'a>(v: &'a Option<String>, what: &str, kind: &str) -> Result<&'a str, JobError> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| JobError::Invalid(format!("a {kind} job needs \"{what}\"")))
}

fn parse_mode(raw: Option<&str>) -> Result<Mode, JobError> {
    match raw.unwrap_or("auto") {
        "auto" | "" => Ok(Mode::Auto),
        "files" => Ok(Mode::Files),
        "blocks" => Ok(Mode::Blocks),
        "sectors" => Ok(Mode::Sectors),
        other => Err(JobError::Invalid(format!(
            "unknown mode {other:?}: use auto, files, blocks or sectors"
        ))),
    }
}

/// Log lines a live event carries (the page appends those it has not shown yet).
const LOG_TAIL: usize = 20;

/// A job that is running in this process.
struct Live {
    cancel: CancelFlag,
    events: watch::Sender<serde_json::Value>,
    /// Lines logged so far and the newest of them.
    log_lines: u64,
    log_tail: VecDeque<String>,
}

impl Live {
    /// Sends `event` with the log's line count and tail added.
    fn send(&self, mut event: serde_json::Value) {
        event["log_lines"] = self.log_lines.into();
        event["log_tail"] = serde_json::Value::from(Vec::from(self.log_tail.clone()));
        self.events.send_replace(event);
    }
}

/// Jobs of this server process.
pub struct Jobs {
    catalog: Arc<Catalog>,
    /// The server's side of the handshake, for listening clients.
    session: SessionOptions,
    agents: Arc<Agents>,
    live: Mutex<HashMap<i64, Live>>,
    /// Output names of running captures.
    names: OutputNames,
    /// Where magic packets go.
    wake: Mutex<crate::wake::WakeConfig>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

impl Jobs {
    pub fn new(catalog: Arc<Catalog>, session: SessionOptions, agents: Arc<Agents>) -> Jobs {
        Jobs {
            catalog,
            session,
            agents,
            live: Mutex::new(HashMap::new()),
            names: OutputNames::default(),
            wake: Mutex::default(),
        }
    }

    /// Sends magic packets as `wake` says from now on.
    pub fn set_wake_config(&self, wake: crate::wake::WakeConfig) {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = wake;
    }

    /// A connected, approved machine's disk (`MACHINE` or `DISK@MACHINE`), opened read-only
    /// for an NBD export; `cancel` ends its waits. A listening client (`DISK@HOST:PORT`) is
    /// refused: a name an NBD client sends must not make the server dial out.
    pub fn open_machine_disk(
        &self,
        raw: &str,
        rt: &tokio::runtime::Handle,
        cancel: &CancelFlag,
    ) -> Result<(JobDisk, Arc<dyn BlockDevice>), JobError> {
        let disk = JobDisk::resolve(raw, &self.catalog, &self.agents)?;
        if disk.machine().is_none() {
            return Err(JobError::NotFound(format!(
                "{raw:?} is not a known machine"
            )));
        }
        let device = disk
            .open(rt, &self.agents, &self.session, false, cancel)
            .map_err(|e| JobError::Conflict(format!("{}: {e}", disk.describe())))?;
        Ok((disk, device))
    }

    /// Every disk of every connected, approved machine, as an export names it.
    pub fn machine_disks(&self) -> Vec<MachineDisk> {
        let mut out = Vec::new();
        for id in self.agents.online() {
            let (Some(link), Ok(Some(m))) = (
                self.agents.approved_link(id),
                self.catalog.find_machine(&id.to_string()),
            ) else {
                continue;
            };
            let Some(label) = m.name.clone().or_else(|| m.macs.first().cloned()) else {
                continue;
            };
            for d in &link.identity.disks {
                out.push(MachineDisk {
                    machine_id: id,
                    disk: d.name.clone(),
                    export: format!("{}@{label}", d.name),
                    description: format!("disk {} of machine {label}, live, read-only", d.name),
                });
            }
        }
        out.sort_by(|a, b| a.export.cmp(&b.export));
        out
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a request, records the job and starts it on the blocking pool of the current
    /// tokio runtime — or, when its time (`at`) is ahead or its machine is not connected,
    /// records it waiting ([`queue`]); returns its id.
    pub fn start(self: &Arc<Self>, req: JobRequest) -> Result<i64, JobError> {
        match self.must_wait(&req)? {
            Some(wait) => self.enqueue(&req, wait, None),
            None => self.start_checked(req, None),
        }
    }

    /// Checks a request and starts it, as job `existing` (a waiting job) or a new one.
    fn start_checked(
        self: &Arc<Self>,
        req: JobRequest,
        existing: Option<i64>,
    ) -> Result<i64, JobError> {
        let mode = parse_mode(req.mode.as_deref())?;
        let (work, params) = match req.kind.as_str() {
            "capture" => self.check_capture(&req, mode)?,
            "deploy" => self.check_deploy(&req, mode)?,
            "multicast" => self.check_multicast(&req, mode)?,
            "live" => self.check_live(&req)?,
            other => {
                return Err(JobError::Invalid(format!(
                    "unknown job kind {other:?}: use \"capture\", \"deploy\", \"multicast\" or \"live\""
                )))
            }
        };
        if let Some(m) = work.machine() {
            let busy = self
                .catalog
                .find_machine(&m.to_string())?
                .is_some_and(|r| r.state == state::TRANSITIONING);
            if busy {
                return Err(JobError::Conflict(
                    "that machine is busy with another job".into(),
                ));
            }
        }
        let id = match existing {
            Some(id) => {
                self.catalog.set_job_params(id, &params)?;
                id
            }
            None => self.catalog.create_job(&req.kind, &params)?,
        };
        if let Some(m) = work.machine() {
            self.catalog.set_job_machine(id, m)?;
        }
        let (events, _) = watch::channel(serde_json::json!({"state": "queued"}));
        let cancel = CancelFlag::default();
        let live = Live {
            cancel: cancel.clone(),
            events,
            log_lines: 0,
            log_tail: VecDeque::new(),
        };
        self.live().insert(id, live);
        let me = Arc::clone(self);
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || me.run(id, &rt, work, &cancel));
        Ok(id)
    }

    fn check_capture(
        &self,
        req: &JobRequest,
        mode: Mode,
    ) -> Result<(Work, serde_json::Value), JobError> {
        let source = required(&req.source, "source", "capture")?;
        let output = required(&req.output, "output", "capture")?.to_string();
        let disk = JobDisk::resolve(source, &self.catalog, &self.agents)?;
        let format = output_format(&output)?;
        let out = self.catalog.captures_dir().join(&output);
        // Reserved before the check, so no other request can pass it until this job ends.
        let name = self
            .names
            .reserve(&out)
            .filter(|_| !out.exists() && !partial_path_for(&out).exists())
            .ok_or_else(|| {
                JobError::Conflict(format!(
                    "a capture named {output} exists already or is being written; choose another name"
                ))
            })?;
        let plan = BasePlan::of_request(
            &self.catalog,
            req.base.as_deref(),
            req.incremental.as_deref(),
            disk.machine().is_some(),
            (&disk.origin(), disk.disk()),
            (mode, format),
        )?;
        let (customize, hardware) = self.edits_of(req, &disk)?;
        let params = serde_json::json!({
            "source": source, "output": output, "mode": mode.name(), "verify": req.verify,
            "incremental": plan.name(), "base": plan.first().map(|b| &b.name),
            "customized": customize.is_some(), "target_hardware": hardware.map(TargetHardware::name),
        });
        let options = CaptureOptions {
            output: OutputOptions {
                format,
                compress: false,
                overwrite: false,
            },
            mode,
            size: None,
            verify: req.verify,
            chunk_map: req.chunk_map.unwrap_or(true),
            base: None,
            transform: None,
        };
        let work = Work::Capture(Box::new(CaptureWork {
            source: disk,
            out,
            output,
            options,
            customize,
            hardware,
            plan,
            _name: name,
        }));
        Ok((work, params))
    }

    fn check_deploy(
        &self,
        req: &JobRequest,
        mode: Mode,
    ) -> Result<(Work, serde_json::Value), JobError> {
        let image = required(&req.image, "image", "deploy")?;
        let target = required(&req.target, "target", "deploy")?;
        let rec = self.find_capture(image)?;
        let disk = JobDisk::resolve(target, &self.catalog, &self.agents)?;
        let (customize, hardware) = self.edits_of(req, &disk)?;
        let params = serde_json::json!({
            "image": rec.name, "target": target, "mode": mode.name(), "reboot": req.reboot,
            "force": req.force,
            "source": rec.name, "output": target, "customized": customize.is_some(),
            "target_hardware": hardware.map(TargetHardware::name),
        });
        let work = Work::Deploy {
            image: self.catalog.capture_file(&rec),
            target: disk,
            mode,
            after: AfterCheck::of(req),
            customize,
            hardware,
        };
        Ok((work, params))
    }

    fn check_live(&self, req: &JobRequest) -> Result<(Work, serde_json::Value), JobError> {
        let image = required(&req.image, "image", "live")?;
        let target = required(&req.target, "target", "live")?;
        let rec = self.find_capture(image)?;
        let disk = JobDisk::resolve(target, &self.catalog, &self.agents)?;
        let (customize, hardware) = self.edits_of(req, &disk)?;
        let (size, wait_minutes) = live::check(req)?;
        let keep_old = req.live_keep_old.unwrap_or(false);
        let params = serde_json::json!({
            "image": rec.name, "target": target, "reboot": req.reboot,
            "source": rec.name, "output": target, "customized": customize.is_some(),
            "target_hardware": hardware.map(TargetHardware::name),
            "live_size_mib": req.live_size_mib, "live_wait_minutes": wait_minutes,
            "live_keep_old": keep_old, "live": "queued",
        });
        let work = Work::Live(Box::new(live::LiveWork {
            image: self.catalog.capture_file(&rec),
            title: rec.name.clone(),
            target: disk,
            size,
            reboot: req.reboot,
            wait_minutes,
            keep_old,
            customize,
            hardware,
            committed: Default::default(),
        }));
        Ok((work, params))
    }

    /// The catalogued capture `image` names (its id, name or path).
    fn find_capture(&self, image: &str) -> Result<crate::catalog::CaptureRecord, JobError> {
        self.catalog
            .captures()?
            .into_iter()
            .find(|c| c.name == image || c.path == image || c.id.to_string() == image)
            .ok_or_else(|| {
                JobError::NotFound(format!(
                    "no capture {image:?} in the catalog (give its id or name)"
                ))
            })
    }

    /// The request's customization (checked and rendered for `disk`'s machine) and target
    /// hardware.
    fn edits_of(
        &self,
        req: &JobRequest,
        disk: &JobDisk,
    ) -> Result<(Option<Box<Spec>>, Option<TargetHardware>), JobError> {
        let customize = match req.customize.as_deref().filter(|t| !t.trim().is_empty()) {
            Some(text) => Some(Box::new(self.customization_for(text, disk)?)),
            None => None,
        };
        let hardware = target_hardware(req)?;
        Ok((customize, hardware))
    }

    /// A SPEC checked and rendered for `disk`'s machine (`{name}`: its registered name).
    fn customization_for(&self, text: &str, disk: &JobDisk) -> Result<Spec, JobError> {
        let invalid =
            |e: diskferry_customize::SpecError| JobError::Invalid(format!("customize: {e}"));
        let spec = Spec::parse(text).map_err(invalid)?;
        let name = match disk.machine() {
            Some(id) => self
                .catalog
                .find_machine(&id.to_string())?
                .and_then(|m| m.name),
            None => None,
        };
        spec.render(name.as_deref()).map_err(invalid)
    }

    /// Runs a job to its end on this (blocking) thread, inside its span, and records how it
    /// went.
    fn run(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        work: Work,
        cancel: &CancelFlag,
    ) {
        let me = Arc::clone(self);
        let _route = crate::joblog::route(id, move |line| me.log(id, line));
        let span = tracing::info_span!(crate::joblog::JOB_SPAN, job_id = id);
        let _entered = span.enter();
        let _ = self.catalog.start_job(id);
        self.publish(id, serde_json::json!({"state": "running"}));
        let machine = self.machine_transitioning(&work);
        // A panic (a bug, or input nobody foresaw) fails this job and frees its machine; it
        // must never leave the job running and the machine transitioning for good.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_work(id, rt, &work, cancel)
        }))
        .unwrap_or_else(|panic| Err(RunError::Panicked(panic_message(&*panic))));
        // A deploy refused before it wrote leaves the machine's disk as it was.
        let untouched = matches!(result, Err(RunError::Incompatible(_)));
        let (job_state, error) = match result {
            Ok(()) => (JobState::Succeeded, None),
            Err(_) if cancel.is_cancelled() => (JobState::Cancelled, Some("cancelled".to_string())),
            Err(e) => (JobState::Failed, Some(e.to_string())),
        };
        match &error {
            Some(e) => tracing::error!("{}: {e}", job_state.name()),
            None => tracing::info!("done"),
        }
        if let Some((m, before)) = &machine {
            // A capture leaves the machine as it was; a deploy leaves it deployed, or failed.
            let after = match (&work, &error) {
                (Work::Capture(_), _) => before.as_str(),
                (Work::Deploy { .. }, Some(_)) if untouched => before.as_str(),
                (Work::Deploy { .. }, None) => state::DEPLOYED,
                (Work::Deploy { .. }, Some(_)) => state::FAILED,
                (Work::Live(w), _) if w.committed.load(std::sync::atomic::Ordering::Acquire) => {
                    state::DEPLOYED
                }
                (Work::Multicast(_) | Work::Live(_), _) => before.as_str(),
            };
            let _ = self.catalog.set_machine_state(*m, after);
        }
        let _ = self.catalog.finish_job(id, job_state, error.as_deref());
        self.publish(
            id,
            serde_json::json!({"state": job_state.name(), "error": error}),
        );
        self.live().remove(&id);
    }

    fn run_work(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        work: &Work,
        cancel: &CancelFlag,
    ) -> Result<(), RunError> {
        match work {
            Work::Capture(c) => self.run_capture(id, rt, c, cancel),
            Work::Multicast(w) => self.run_multicast(id, rt, w, cancel),
            Work::Live(w) => self.run_live(id, rt, w, cancel),
            Work::Deploy {
                image,
                target,
                mode,
                after,
                customize,
                hardware,
            } => {
                let how = Edits {
                    mode: *mode,
                    spec: customize.as_deref(),
                    hardware: *hardware,
                    fallback_loader: after.fallback_loader,
                };
                self.run_deploy(id, rt, image, target, how, *after, cancel)
            }
        }
    }

    /// Marks the job's machine transitioning; returns it with its state before.
    fn machine_transitioning(&self, work: &Work) -> Option<(i64, String)> {
        let m = work.machine()?;
        let before = self
            .catalog
            .find_machine(&m.to_string())
            .ok()
            .flatten()?
            .state;
        let _ = self.catalog.set_machine_state(m, state::TRANSITIONING);
        Some((m, before))
    }

    fn catalogue_capture(&self, c: &CaptureWork, made: &Made) {
        let recording = CaptureRecording {
            machine: c.source.origin(),
            disk: c.source.disk().to_string(),
            base: made.base.as_ref().map(|(b, r)| (b.rel.clone(), *r)),
            incremental: made.stats_json(),
        };
        if let Err(e) = self
            .catalog
            .refresh_captures()
            .and_then(|_| self.catalog.record_capture(&c.output, &recording))
        {
            tracing::warn!("the capture is written but not catalogued: {e}");
        }
    }

    fn open(
        &self,
        disk: &JobDisk,
        rt: &tokio::runtime::Handle,
        writable: bool,
        cancel: &CancelFlag,
    ) -> Result<Arc<dyn BlockDevice>, RunError> {
        tracing::info!("connecting to {}", disk.describe());
        disk.open(rt, &self.agents, &self.session, writable, cancel)
            .map_err(|source| RunError::Open {
                what: disk.describe(),
                source: Box::new(source),
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn run_deploy(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        image: &Path,
        target: &JobDisk,
        how: Edits<'_>,
        after: AfterCheck,
        cancel: &CancelFlag,
    ) -> Result<(), RunError> {
        let img = self.catalog.open_capture(image)?;
        let img: Arc<dyn BlockDevice> = Arc::new(CancellableDevice::new(img, cancel.clone()));
        self.check_fit(&img, target, how.hardware, after.force)?;
        let how = deploy_how(&img, how)?;
        let dst = self.open(target, rt, true, cancel)?;
        tracing::info!("image {}", image.display());
        let progress = self.progress_sink(id);
        diskferry_imaging::deploy(img, Arc::clone(&dst), &target.describe(), &how, &progress)?;
        if let (true, Some(m)) = (after.boot_entry, target.machine()) {
            self.register_boot_entry(m, &dst);
        }
        if let (true, JobDisk::Machine { id: m, label, .. }) = (after.reboot, target) {
            let link = self
                .agents
                .approved_link(*m)
                .ok_or_else(|| RunError::GoneBeforeReboot(label.clone()))?;
            rt.block_on(
                link.connection
                    .power(diskferry_protocol::PowerAction::Reboot),
            )
            .map_err(RunError::Reboot)?;
            tracing::info!("reboot requested");
        }
        Ok(())
    }

    /// Registers the deployed system's UEFI boot entry on machine `m`, when it announced UEFI
    /// firmware; the outcome goes to the log.
    fn register_boot_entry(&self, m: i64, disk: &Arc<dyn BlockDevice>) {
        let uefi = self
            .catalog
            .machine(m)
            .ok()
            .flatten()
            .and_then(|r| r.identity)
            .and_then(|i| i.firmware)
            .is_some_and(|f| f == "uefi");
        let Some(link) = self.agents.approved_link(m).filter(|_| uefi) else {
            return;
        };
        tracing::info!(
            "{}",
            diskferry_imaging::boot_entry::register(&link.connection, disk)
        );
    }

    /// The compatibility check of a deploy onto a machine, by what its agent last announced:
    /// warnings go to the log; refusals fail the job before anything is written, unless
    /// `force` (then they are logged as warnings).
    fn check_fit(
        &self,
        img: &Arc<dyn BlockDevice>,
        target: &JobDisk,
        hardware: Option<TargetHardware>,
        force: bool,
    ) -> Result<(), RunError> {
        let Some(identity) = target
            .machine()
            .and_then(|m| self.catalog.machine(m).ok().flatten())
            .and_then(|m| m.identity)
        else {
            return Ok(());
        };
        let findings =
            crate::compat::check_deploy(Arc::clone(img), &identity, target.disk(), hardware);
        let (refused, warned): (Vec<_>, Vec<_>) = findings.iter().partition(|f| f.refuses());
        for f in warned {
            tracing::warn!("compatibility: {}", f.reason);
        }
        if refused.is_empty() {
            return Ok(());
        }
        if force {
            for f in &refused {
                tracing::warn!("compatibility (forced): {}", f.reason);
            }
            return Ok(());
        }
        Err(RunError::Incompatible(
            refused
                .iter()
                .map(|f| f.reason.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ))
    }

    fn run_capture(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        c: &CaptureWork,
        cancel: &CancelFlag,
    ) -> Result<(), RunError> {
        let src = self.open(&c.source, rt, false, cancel)?;
        let src: Arc<dyn BlockDevice> = Arc::new(CancellableDevice::new(src, cancel.clone()));
        tracing::info!("capturing {} bytes to {}", src.size(), c.out.display());
        let progress = self.progress_sink(id);
        let options = CaptureOptions {
            transform: transform_for(&src, c.customize.as_deref(), c.hardware)?,
            ..c.options.clone()
        };
        let (outcome, fallback) =
            chain::capture_on_plan(src, &c.out, &options, &c.plan, &progress)?;
        let made = Made::of(&outcome, &c.plan, fallback);
        tracing::info!("{}", made.line());
        self.catalogue_capture(c, &made);
        let _ = self.catalog.set_job_result(id, &made.json(&c.output));
        Ok(())
    }

    /// Progress that lands in the catalog and in the live channel.
    fn progress_sink(self: &Arc<Self>, id: i64) -> impl Progress {
        let jobs = Arc::clone(self);
        JsonLines::with_sink(move |line| {
            let Ok(mut event) = serde_json::from_str::<serde_json::Value>(line) else {
                return;
            };
            let _ = jobs.catalog.set_job_progress(id, &event);
            event["state"] = "running".into();
            jobs.publish(id, event);
        })
    }

    /// Appends a line to a job's log (the catalog's copy and the live tail).
    fn log(&self, id: i64, line: &str) {
        let _ = self.catalog.append_job_log(id, line);
        if let Some(live) = self.live().get_mut(&id) {
            live.log_lines += 1;
            live.log_tail.push_back(line.to_string());
            if live.log_tail.len() > LOG_TAIL {
                live.log_tail.pop_front();
            }
            let last = live.events.borrow().clone();
            live.send(last);
        }
    }

    fn publish(&self, id: i64, event: serde_json::Value) {
        if let Some(live) = self.live().get(&id) {
            live.send(event);
        }
    }

    /// Asks a running job to stop, or ends a waiting one; false when it is neither.
    pub fn cancel(&self, id: i64) -> bool {
        match self.live().get(&id) {
            Some(live) => {
                live.cancel.cancel();
                true
            }
            None => self
                .catalog
                .end_waiting_job(id, JobState::Cancelled, "cancelled")
                .unwrap_or(false),
        }
    }

    /// A live job's event stream, if it runs in this process.
    pub fn subscribe(&self, id: i64) -> Option<watch::Receiver<serde_json::Value>> {
        self.live().get(&id).map(|l| l.events.subscribe())
    }
}

/// The hardware a request reconfigures for (`target_hardware`), checked.
fn target_hardware(req: &JobRequest) -> Result<Option<TargetHardware>, JobError> {
    req.target_hardware
        .as_deref()
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.parse::<TargetHardware>()
                .map_err(|e| JobError::Invalid(format!("target_hardware: {e}")))
        })
        .transpose()
}

/// The image format an output name asks for; the name must be a plain file name.
fn output_format(name: &str) -> Result<ImageFormat, JobError> {
    if name.is_empty()
        || name.len() > 200
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
    {
        return Err(JobError::Invalid(
            "output must be a plain file name (no directories, not starting with a dot), e.g. web-01.vhdx".into(),
        ));
    }
    ImageFormat::from_output_name(Path::new(name)).ok_or_else(|| {
        JobError::Invalid(
            "output name must end in .vhdx, .vhd, .vmdk, .qcow2 or .img (that sets the format)"
                .into(),
        )
    })
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
