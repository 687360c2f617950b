//! Running jobs for the web side: a capture from a listening client into
//! `DATA_DIR/captures`, with its progress events (the same objects `--progress json` prints)
//! stored in the catalog and broadcast live to watchers, its log, and cancellation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use diskferry::agents::Agents;
use diskferry::blockdev::{BlockDevice, CancelFlag, CancellableDevice, RemoteOptions};
use diskferry::catalog::{Catalog, JobState};
use diskferry::pipeline::verify::verify_disks;
use diskferry::pipeline::{capture_disk, Mode, OutputOptions};
use diskferry::progress::{JsonLines, Progress};
use diskferry::source::{open_source, SourceSpec, DEFAULT_RECONNECT};
use diskferry::vdisk::ImageFormat;
use diskferry_protocol::{Psk, Role, SessionOptions};
use serde::Deserialize;
use tokio::sync::watch;

use crate::error::Failure;

/// What `POST /api/jobs` asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// "capture" (deploys come with the PXE registry).
    pub kind: String,
    /// `DISK@HOST:PORT` of a listening client.
    pub source: String,
    /// File name for the capture inside the captures directory; its extension (.vhdx, .qcow2,
    /// .img) sets the format.
    pub output: String,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub verify: bool,
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
        if req.kind != "capture" {
            return Err(Failure::bad_request(format!(
                "unknown job kind {:?}: only \"capture\" can be started here",
                req.kind
            )));
        }
        let mode = match req.mode.as_deref().unwrap_or("auto") {
            "auto" => Mode::Auto,
            "files" => Mode::Files,
            "blocks" => Mode::Blocks,
            "sectors" => Mode::Sectors,
            other => {
                return Err(Failure::bad_request(format!(
                    "unknown mode {other:?}: use auto, files, blocks or sectors"
                )))
            }
        };
        let spec = self.resolve_source(req.source.trim())?;
        let format = output_format(&req.output)?;
        let out = self.catalog.captures_dir().join(&req.output);
        if out.exists() || out.with_extension("partial").exists() {
            return Err(Failure::new(
                axum::http::StatusCode::CONFLICT,
                format!(
                    "a capture named {} exists already; choose another name",
                    req.output
                ),
            ));
        }
        let params = serde_json::json!({
            "source": req.source.trim(), "output": req.output, "mode": mode.name(),
            "verify": req.verify,
        });
        let id = self.catalog.create_job("capture", &params)?;
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
        let source_name = req.source.trim().to_string();
        tokio::task::spawn_blocking(move || {
            let _ = me.catalog.start_job(id);
            me.publish(id, serde_json::json!({"state": "running"}));
            // A machine being captured is transitioning, then back to what it was.
            let machine = match &spec {
                Source::Machine { id: m, .. } => me
                    .catalog
                    .find_machine(&m.to_string())
                    .ok()
                    .flatten()
                    .map(|rec| (*m, rec.state)),
                Source::Listening { .. } => None,
            };
            if let Some((m, _)) = &machine {
                let _ = me
                    .catalog
                    .set_machine_state(*m, diskferry::catalog::state::TRANSITIONING);
            }
            let result = me.run_capture(id, &rt, &spec, &out, format, mode, req.verify, &cancel);
            let (state, error) = match result {
                Ok(()) => (JobState::Succeeded, None),
                Err(_) if cancel.is_cancelled() => {
                    (JobState::Cancelled, Some("cancelled".to_string()))
                }
                Err(e) => (JobState::Failed, Some(e)),
            };
            if let Some(e) = &error {
                me.log(id, &format!("{}: {e}", state.name()));
            } else {
                me.log(id, "done");
                let _ = me.catalog.refresh_captures();
                let _ = me.catalog.set_source_machine(&req.output, &spec.origin());
            }
            if let Some((m, before)) = &machine {
                let _ = me.catalog.set_machine_state(*m, before);
            }
            let _ = me.catalog.finish_job(id, state, error.as_deref());
            me.publish(
                id,
                serde_json::json!({"state": state.name(), "error": error, "source": source_name}),
            );
            me.live().remove(&id);
        });
        Ok(id)
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
        let src = self.open(spec, rt)?;
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
        let report = capture_disk(Arc::clone(&src), out, output, mode, None, &progress)
            .map_err(|e| e.to_string())?;
        for p in &report.partitions {
            self.log(
                id,
                &format!(
                    "partition {}: {} by {} ({} bytes read){}",
                    p.number,
                    p.filesystem,
                    p.mode.name(),
                    p.read,
                    p.note
                        .as_ref()
                        .map(|n| format!(" — {n}"))
                        .unwrap_or_default()
                ),
            );
        }
        if verify {
            self.log(id, "verifying");
            let (_, written) =
                diskferry::vdisk::open_image(out, false).map_err(|e| e.to_string())?;
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

    /// Opens the source disk (read-only) as a block device.
    fn open(
        &self,
        src: &Source,
        rt: &tokio::runtime::Handle,
    ) -> Result<Arc<dyn BlockDevice>, String> {
        match src {
            Source::Listening { disk, addr } => {
                let psk = Psk::from_file(&self.key_file).map_err(|e| e.to_string())?;
                let session = SessionOptions::new(Role::Controller, psk);
                let spec = SourceSpec::Remote {
                    disk: disk.clone(),
                    addr: addr.clone(),
                };
                open_source(&spec, rt, Some(&session), false, DEFAULT_RECONNECT)
                    .map_err(|e| e.to_string())
            }
            Source::Machine { id, label, disk } => {
                let link = self
                    .agents
                    .link(*id)
                    .ok_or_else(|| format!("machine {label} disconnected"))?;
                let dev = rt
                    .block_on(link.connection.open(disk, false, RemoteOptions::default()))
                    .map_err(|e| e.to_string())?;
                Ok(Arc::new(dev))
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
