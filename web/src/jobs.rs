//! Running jobs for the web side: a capture from a listening client into
//! `DATA_DIR/captures`, with its progress events (the same objects `--progress json` prints)
//! stored in the catalog and broadcast live to watchers, its log, and cancellation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use diskferry_blockdev::{BlockDevice, CancelFlag, CancellableDevice};
use diskferry_daemon::agents::Agents;
use diskferry_daemon::catalog::{Catalog, JobState};
use diskferry_imaging::pipeline::verify::verify_disks;
use diskferry_imaging::pipeline::{capture_disk, Mode, OutputOptions};
use diskferry_imaging::progress::{JsonLines, Progress};
use diskferry_imaging::source::{open_source, open_target, SourceSpec, DEFAULT_RECONNECT};
use diskferry_protocol::{Psk, Role, SessionOptions};
use diskferry_remote::{ReconnectingDisk, RemoteOptions};
use diskferry_vdisk::ImageFormat;
use serde::Deserialize;
use tokio::sync::watch;

use crate::error::Failure;

/// What `POST /api/jobs` asks for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// "capture" or "deploy".
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
}

/// A checked job, ready to run.
enum Work {
    Capture {
        source: Source,
        out: PathBuf,
        output: String,
        format: ImageFormat,
        mode: Mode,
        verify: bool,
    },
    Deploy {
        image: PathBuf,
        target: Source,
        mode: Mode,
        reboot: bool,
    },
}

impl Work {
    fn machine(&self) -> Option<i64> {
        match self {
            Work::Capture {
                source: Source::Machine { id, .. },
                ..
            }
            | Work::Deploy {
                target: Source::Machine { id, .. },
                ..
            } => Some(*id),
            _ => None,
        }
    }
}

fn required<'a>(v: &'a Option<String>, what: &str, kind: &str) -> Result<&'a str, Failure> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Failure::bad_request(format!("a {kind} job needs \"{what}\"")))
}

/// Log lines a live event carries (the page appends those it has not shown yet).
const LOG_TAIL: usize = 20;

/// A job that is running in this process.
struct Live {
    cancel: CancelFlag,
    events: watch::Sender<serde_json::Value>,
    /// Lines logged so far and the newest of them.
    log_lines: u64,
    log_tail: std::collections::VecDeque<String>,
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
    key_file: PathBuf,
    agents: Arc<Agents>,
    live: Mutex<HashMap<i64, Live>>,
}

impl Jobs {
    pub fn new(catalog: Arc<Catalog>, key_file: PathBuf, agents: Arc<Agents>) -> Jobs {
        Jobs {
            catalog,
            key_file,
            agents,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a request, records the job and starts it; returns its id.
    pub fn start(self: &Arc<Self>, req: JobRequest) -> Result<i64, Failure> {
        let mode = match req.mode.as_deref().unwrap_or("auto") {
            "auto" | "" => Mode::Auto,
            "files" => Mode::Files,
            "blocks" => Mode::Blocks,
            "sectors" => Mode::Sectors,
            other => {
                return Err(Failure::bad_request(format!(
                    "unknown mode {other:?}: use auto, files, blocks or sectors"
                )))
            }
        };
        let (work, params) = match req.kind.as_str() {
            "capture" => {
                let source = required(&req.source, "source", "capture")?;
                let output = required(&req.output, "output", "capture")?.to_string();
                let spec = self.resolve_source(source)?;
                let format = output_format(&output)?;
                let out = self.catalog.captures_dir().join(&output);
                if out.exists() || out.with_extension("partial").exists() {
                    return Err(Failure::new(
                        axum::http::StatusCode::CONFLICT,
                        format!("a capture named {output} exists already; choose another name"),
                    ));
                }
                let params = serde_json::json!({
                    "source": source, "output": output, "mode": mode.name(), "verify": req.verify,
                });
                let work = Work::Capture {
                    source: spec,
                    out,
                    output,
                    format,
                    mode,
                    verify: req.verify,
                };
                (work, params)
            }
            "deploy" => {
                let image = required(&req.image, "image", "deploy")?;
                let target = required(&req.target, "target", "deploy")?;
                let captures = self.catalog.captures()?;
                let rec = captures
                    .iter()
                    .find(|c| c.name == image || c.path == image || c.id.to_string() == image)
                    .ok_or_else(|| {
                        Failure::not_found(format!(
                            "no capture {image:?} in the catalog (give its id or name)"
                        ))
                    })?;
                let spec = self.resolve_source(target)?;
                let params = serde_json::json!({
                    "image": rec.name, "target": target, "mode": mode.name(), "reboot": req.reboot,
                    "source": rec.name, "output": target,
                });
                let work = Work::Deploy {
                    image: self.catalog.capture_file(rec),
                    target: spec,
                    mode,
                    reboot: req.reboot,
                };
                (work, params)
            }
            other => {
                return Err(Failure::bad_request(format!(
                    "unknown job kind {other:?}: use \"capture\" or \"deploy\""
                )))
            }
        };
        if let Some(m) = work.machine() {
            let busy = self
                .catalog
                .find_machine(&m.to_string())?
                .is_some_and(|r| r.state == diskferry_daemon::catalog::state::TRANSITIONING);
            if busy {
                return Err(Failure::new(
                    axum::http::StatusCode::CONFLICT,
                    "that machine is busy with another job",
                ));
            }
        }
        let id = self.catalog.create_job(&req.kind, &params)?;
        let (events, _) = watch::channel(serde_json::json!({"state": "queued"}));
        let cancel = CancelFlag::default();
        self.live().insert(
            id,
            Live {
                cancel: cancel.clone(),
                events,
                log_lines: 0,
                log_tail: Default::default(),
            },
        );
        let me = Arc::clone(self);
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || me.run(id, &rt, work, &cancel));
        Ok(id)
    }

    /// Runs a job to its end on this (blocking) thread and records how it went.
    fn run(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        work: Work,
        cancel: &CancelFlag,
    ) {
        use diskferry_daemon::catalog::state;
        let _ = self.catalog.start_job(id);
        self.publish(id, serde_json::json!({"state": "running"}));
        // The machine is transitioning while the job runs.
        let machine = work.machine().and_then(|m| {
            let before = self
                .catalog
                .find_machine(&m.to_string())
                .ok()
                .flatten()?
                .state;
            let _ = self.catalog.set_machine_state(m, state::TRANSITIONING);
            Some((m, before))
        });
        let result = match &work {
            Work::Capture {
                source,
                out,
                format,
                mode,
                verify,
                ..
            } => self.run_capture(id, rt, source, out, *format, *mode, *verify, cancel),
            Work::Deploy {
                image,
                target,
                mode,
                reboot,
            } => self.run_deploy(id, rt, image, target, *mode, *reboot, cancel),
        };
        let (job_state, error) = match result {
            Ok(()) => (JobState::Succeeded, None),
            Err(_) if cancel.is_cancelled() => (JobState::Cancelled, Some("cancelled".to_string())),
            Err(e) => (JobState::Failed, Some(e)),
        };
        match &error {
            Some(e) => self.log(id, &format!("{}: {e}", job_state.name())),
            None => self.log(id, "done"),
        }
        if let (Work::Capture { output, source, .. }, None) = (&work, &error) {
            if let Err(e) = self
                .catalog
                .refresh_captures()
                .and_then(|_| self.catalog.set_source_machine(output, &source.origin()))
            {
                self.log(
                    id,
                    &format!("the capture is written but not catalogued: {e}"),
                );
            }
        }
        if let Some((m, before)) = &machine {
            // A capture leaves the machine as it was; a deploy leaves it deployed, or failed.
            let after = match (&work, &error) {
                (Work::Capture { .. }, _) => before.as_str(),
                (Work::Deploy { .. }, None) => state::DEPLOYED,
                (Work::Deploy { .. }, Some(_)) => state::FAILED,
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

    #[allow(clippy::too_many_arguments)]
    fn run_deploy(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        image: &std::path::Path,
        target: &Source,
        mode: Mode,
        reboot: bool,
        cancel: &CancelFlag,
    ) -> Result<(), String> {
        let (_, img) = diskferry_vdisk::open_image(image, false).map_err(|e| e.to_string())?;
        let img: Arc<dyn BlockDevice> = Arc::new(CancellableDevice::new(img, cancel.clone()));
        self.log(id, &format!("connecting to {}", target.describe()));
        let dst = self.open_device(target, rt, true)?;
        self.log(
            id,
            &format!(
                "deploying {} ({} bytes) onto {} ({} bytes)",
                image.display(),
                img.size(),
                target.describe(),
                dst.size()
            ),
        );
        let progress = self.progress_sink(id);
        let report =
            diskferry_imaging::pipeline::deploy_disk(img, dst, &target.describe(), mode, &progress)
                .map_err(|e| e.to_string())?;
        for p in &report.disk.partitions {
            self.log(id, &p.to_string());
        }
        self.log(
            id,
            &format!(
                "verified: {} files and {} bytes compared, no differences",
                report.verify.files_compared, report.verify.bytes_compared
            ),
        );
        if reboot {
            if let Source::Machine { id: m, label, .. } = target {
                let link = self
                    .agents
                    .link(*m)
                    .ok_or_else(|| format!("machine {label} disconnected before the reboot"))?;
                rt.block_on(
                    link.connection
                        .power(diskferry_protocol::PowerAction::Reboot),
                )
                .map_err(|e| format!("reboot: {e}"))?;
                self.log(id, "reboot requested");
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_capture(
        self: &Arc<Self>,
        id: i64,
        rt: &tokio::runtime::Handle,
        spec: &Source,
        out: &std::path::Path,
        format: ImageFormat,
        mode: Mode,
        verify: bool,
        cancel: &CancelFlag,
    ) -> Result<(), String> {
        self.log(id, &format!("connecting to {}", spec.describe()));
        let src = self.open_device(spec, rt, false)?;
        let src: Arc<dyn BlockDevice> = Arc::new(CancellableDevice::new(src, cancel.clone()));
        self.log(
            id,
            &format!("capturing {} bytes to {}", src.size(), out.display()),
        );
        let progress = self.progress_sink(id);
        let output = OutputOptions {
            format,
            compress: false,
            overwrite: false,
        };
        let partitioned = diskferry_partition::read_table(&*src)
            .is_ok_and(|t| t.scheme != diskferry_partition::Scheme::None);
        if mode == Mode::Sectors || !partitioned {
            // The whole disk, every non-zero sector (an exact clone; also what a disk without
            // a partition table gets).
            let stats = diskferry_imaging::pipeline::capture_sectors(&*src, out, output, &progress)
                .map_err(|e| e.to_string())?;
            self.log(
                id,
                &format!(
                    "whole disk by sectors: {} bytes read, {} written",
                    stats.read, stats.written
                ),
            );
        } else {
            let report = capture_disk(Arc::clone(&src), out, output, mode, None, &progress)
                .map_err(|e| e.to_string())?;
            for p in &report.partitions {
                self.log(id, &p.to_string());
            }
        }
        if verify {
            self.log(id, "verifying");
            let (_, written) =
                diskferry_vdisk::open_image(out, false).map_err(|e| e.to_string())?;
            let v = verify_disks(&src, &written).map_err(|e| e.to_string())?;
            if v.differences > 0 {
                for d in v.listed.iter().take(50) {
                    self.log(id, &format!("difference: {d}"));
                }
                return Err(format!("verification found {} differences", v.differences));
            }
            self.log(
                id,
                &format!(
                    "verified: {} files and {} bytes compared, no differences",
                    v.files_compared, v.bytes_compared
                ),
            );
        }
        Ok(())
    }

    /// Progress that lands in the catalog and in the live channel.
    fn progress_sink(self: &Arc<Self>, id: i64) -> impl Progress {
        let catalog = Arc::clone(&self.catalog);
        let jobs = Arc::clone(self);
        JsonLines::with_sink(move |line| {
            let Ok(mut event) = serde_json::from_str::<serde_json::Value>(line) else {
                return;
            };
            let _ = catalog.set_job_progress(id, &event);
            event["state"] = "running".into();
            jobs.publish(id, event);
        })
    }

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

    /// Asks a running job to stop; false when it is not running here.
    pub fn cancel(&self, id: i64) -> bool {
        match self.live().get(&id) {
            Some(live) => {
                live.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// A live job's event stream, if it runs in this process.
    pub fn subscribe(&self, id: i64) -> Option<watch::Receiver<serde_json::Value>> {
        self.live().get(&id).map(|l| l.events.subscribe())
    }
}

/// Where a job reads (or, for deploys, writes) a disk.
#[derive(Debug, Clone)]
pub enum Source {
    /// A disk of a listening client, `DISK@HOST:PORT`.
    Listening { disk: String, addr: String },
    /// A disk of a machine connected over the agent port.
    Machine {
        id: i64,
        label: String,
        disk: String,
    },
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Listening { disk, addr } => format!("{disk} on {addr}"),
            Source::Machine { label, disk, .. } => format!("{disk} on machine {label}"),
        }
    }

    /// What the catalog records as the capture's source machine.
    fn origin(&self) -> String {
        match self {
            Source::Listening { addr, .. } => addr.clone(),
            Source::Machine { label, .. } => label.clone(),
        }
    }
}

impl Jobs {
    /// `MACHINE` or `DISK@MACHINE` (a registered name, MAC address or id of a connected
    /// machine; without DISK, its only disk), else `DISK@HOST:PORT` of a listening client.
    pub fn resolve_source(&self, raw: &str) -> Result<Source, Failure> {
        let (disk, who) = match raw.rsplit_once('@') {
            Some((d, w)) => (Some(d), w),
            None => (None, raw),
        };
        if let Some(m) = self.catalog.find_machine(who)? {
            let label = m.name.clone().unwrap_or_else(|| m.macs.join(","));
            let link = self.agents.link(m.id).ok_or_else(|| {
                Failure::new(
                    axum::http::StatusCode::CONFLICT,
                    format!("machine {label} is not connected: boot it into the diskferry PXE environment first"),
                )
            })?;
            let names: Vec<&str> = link
                .identity
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            let disk = match disk {
                Some(d) if names.contains(&d) => d.to_string(),
                Some(d) => {
                    return Err(Failure::bad_request(format!(
                        "machine {label} has no disk {d}; its disks: {}",
                        names.join(", ")
                    )))
                }
                None if names.len() == 1 => names[0].to_string(),
                None => {
                    return Err(Failure::bad_request(format!(
                        "machine {label} has {} disks; name one as DISK@{who}: {}",
                        names.len(),
                        names.join(", ")
                    )))
                }
            };
            return Ok(Source::Machine {
                id: m.id,
                label,
                disk,
            });
        }
        match (disk, SourceSpec::parse(raw)) {
            (Some(_), SourceSpec::Remote { disk, addr }) => Ok(Source::Listening { disk, addr }),
            _ => Err(Failure::bad_request(format!(
                "{raw:?} is neither a known machine (name or MAC address) nor DISK@HOST:PORT of a listening diskferry-client"
            ))),
        }
    }

    /// Opens the disk as a block device, for reading (captures) or writing (deploys).
    fn open_device(
        &self,
        src: &Source,
        rt: &tokio::runtime::Handle,
        writable: bool,
    ) -> Result<Arc<dyn BlockDevice>, String> {
        match src {
            Source::Listening { disk, addr } => {
                let psk = Psk::from_file(&self.key_file).map_err(|e| e.to_string())?;
                let session = SessionOptions::new(Role::Controller, psk);
                let spec = SourceSpec::Remote {
                    disk: disk.clone(),
                    addr: addr.clone(),
                };
                if writable {
                    open_target(&spec, rt, Some(&session)).map_err(|e| e.to_string())
                } else {
                    open_source(&spec, rt, Some(&session), false, DEFAULT_RECONNECT)
                        .map_err(|e| e.to_string())
                }
            }
            Source::Machine { id, label, disk } => {
                let link = self
                    .agents
                    .link(*id)
                    .ok_or_else(|| format!("machine {label} disconnected"))?;
                let dev = rt
                    .block_on(
                        link.connection
                            .open(disk, writable, RemoteOptions::default()),
                    )
                    .map_err(|e| e.to_string())?;
                // If the machine drops off mid-job (agent restarted, network blip), wait for it
                // to dial back and carry on, as with listening clients.
                let redial = diskferry_daemon::agents::AgentRedial {
                    agents: Arc::clone(&self.agents),
                    machine_id: *id,
                    label: label.clone(),
                };
                Ok(Arc::new(ReconnectingDisk::new(
                    dev,
                    Arc::new(redial),
                    RemoteOptions::default(),
                    rt.clone(),
                    DEFAULT_RECONNECT,
                )))
            }
        }
    }
}

/// The image format an output name asks for; the name must be a plain file name.
fn output_format(name: &str) -> Result<ImageFormat, Failure> {
    if name.is_empty()
        || name.len() > 200
        || name.starts_with('.')
        || name.contains(['/', '\\', '\0'])
    {
        return Err(Failure::bad_request(
            "output must be a plain file name (no directories, not starting with a dot), e.g. web-01.vhdx",
        ));
    }
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("vhdx") => Ok(ImageFormat::Vhdx),
        Some("qcow2") => Ok(ImageFormat::Qcow2),
        Some("img") | Some("raw") => Ok(ImageFormat::Raw),
        _ => Err(Failure::bad_request(
            "output name must end in .vhdx, .qcow2 or .img (that sets the format)",
        )),
    }
}
