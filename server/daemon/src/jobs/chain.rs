//! Which capture a capture job builds on. A request may name its base (a catalogued capture,
//! by name or id: if it turns out unusable the job fails with the reason), ask for a full
//! capture, or leave it to `"incremental": "auto"` — the default for a machine's disk: the
//! newest earlier capture of the same machine and disk whose chunk map is usable and whose
//! layout fits the requested mode and format. An automatic base that the imaging crate then
//! refuses (changed, vanished, another disk size) gives way to a full capture, logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_imaging::pipeline::{IncrementalError, IncrementalStats, Mode};
use diskferry_imaging::progress::Progress;
use diskferry_imaging::units::human_bytes;
use diskferry_imaging::{CaptureJobError, CaptureOptions, CaptureOutcome, CaptureSummary};
use diskferry_vdisk::ImageFormat;

use super::JobError;
use crate::catalog::{CaptureRecord, Catalog, Relation};

/// A base capture: its file and its path inside the captures directory.
#[derive(Debug, Clone)]
pub struct BaseCapture {
    pub file: PathBuf,
    pub rel: String,
    pub name: String,
}

/// How a capture job chooses its base.
#[derive(Debug, Clone)]
pub enum BasePlan {
    Full,
    /// Named in the request: an unusable base fails the job.
    Named(BaseCapture),
    /// Chosen by the server (or none fits): an unusable base falls back to a full capture.
    Auto(Option<BaseCapture>),
}

impl BasePlan {
    /// The plan a request asks for: `base` (name or id), `incremental` ("auto", "full"), or
    /// by default auto for a machine's disk and full for a listening client.
    pub fn of_request(
        catalog: &Catalog,
        base: Option<&str>,
        incremental: Option<&str>,
        machine_disk: bool,
        source: (&str, &str),
        fit: (Mode, ImageFormat),
    ) -> Result<BasePlan, JobError> {
        let auto = match (incremental.map(str::trim), base) {
            (Some("full"), Some(_)) => {
                return Err(JobError::Invalid(
                    "\"incremental\": \"full\" and a \"base\" contradict each other".into(),
                ))
            }
            (None | Some("") | Some("base"), Some(b)) => return named(catalog, b),
            (Some("auto"), Some(_)) => {
                return Err(JobError::Invalid(
                    "give either a \"base\" or \"incremental\": \"auto\", not both".into(),
                ))
            }
            (Some("auto"), None) => true,
            (Some("full"), None) => false,
            (None | Some(""), None) => machine_disk,
            (Some(other), _) => {
                return Err(JobError::Invalid(format!(
                    "unknown \"incremental\" value {other:?}: use \"auto\" or \"full\""
                )))
            }
        };
        if !auto {
            return Ok(BasePlan::Full);
        }
        let found = auto_base(catalog, source.0, source.1, fit.0, fit.1)?;
        Ok(BasePlan::Auto(found.map(|r| base_capture(catalog, &r))))
    }

    /// The base to try first.
    pub fn first(&self) -> Option<&BaseCapture> {
        match self {
            BasePlan::Full | BasePlan::Auto(None) => None,
            BasePlan::Named(b) | BasePlan::Auto(Some(b)) => Some(b),
        }
    }

    /// What the job's parameters record: "full", "base" or "auto".
    pub fn name(&self) -> &'static str {
        match self {
            BasePlan::Full => "full",
            BasePlan::Named(_) => "base",
            BasePlan::Auto(_) => "auto",
        }
    }
}

fn base_capture(catalog: &Catalog, r: &CaptureRecord) -> BaseCapture {
    BaseCapture {
        file: catalog.capture_file(r),
        rel: r.path.clone(),
        name: r.name.clone(),
    }
}

fn named(catalog: &Catalog, base: &str) -> Result<BasePlan, JobError> {
    let base = base.trim();
    let all = catalog.captures()?;
    let rec = all
        .iter()
        .find(|c| c.name == base || c.path == base || c.id.to_string() == base)
        .ok_or_else(|| {
            JobError::NotFound(format!(
                "no capture {base:?} in the catalog to be the base (give its id or name)"
            ))
        })?;
    Ok(BasePlan::Named(base_capture(catalog, rec)))
}

/// The newest capture of `disk` on `machine` that an incremental capture in `mode` to
/// `format` can build on: it has a usable chunk map and a layout that fits.
pub fn auto_base(
    catalog: &Catalog,
    machine: &str,
    disk: &str,
    mode: Mode,
    format: ImageFormat,
) -> Result<Option<CaptureRecord>, JobError> {
    // The list is newest first.
    Ok(catalog.captures()?.into_iter().find(|c| {
        c.chunk_map
            && c.source_machine.as_deref() == Some(machine)
            && c.source_disk.as_deref() == Some(disk)
            && layout_fits(c.layout.as_deref(), mode, format)
    }))
}

/// Whether a base of `layout` can take an incremental capture in `mode` to `format`: a
/// whole-disk base an overlay (sectors or auto, qcow2), a partition-by-partition one a new
/// image of recreated filesystems (not sectors).
fn layout_fits(layout: Option<&str>, mode: Mode, format: ImageFormat) -> bool {
    match layout {
        Some("whole-disk") => {
            matches!(mode, Mode::Sectors | Mode::Auto) && format == ImageFormat::Qcow2
        }
        Some("partitions") => mode != Mode::Sectors,
        _ => false,
    }
}

/// Whether a capture failed because its base cannot be built on (rather than while reading
/// or writing): the errors an automatic base gives way on.
pub fn base_unusable(e: &CaptureJobError) -> bool {
    use IncrementalError as I;
    match e {
        CaptureJobError::OverlayOnly { .. } | CaptureJobError::PartitionsOnly { .. } => true,
        CaptureJobError::Incremental(i) => matches!(
            i,
            I::NoMap { .. }
                | I::Map(_)
                | I::BaseChanged { .. }
                | I::SizeDiffers { .. }
                | I::Base { .. }
                | I::BaseTable { .. }
        ),
        _ => false,
    }
}

/// Runs the capture on the plan's base, falling back to a full capture when an automatic
/// base is unusable; returns the outcome and, after a fallback, why the base was not used.
/// (The error is boxed: it is large and travels up through the job.)
pub fn capture_on_plan(
    source: Arc<dyn BlockDevice>,
    out: &Path,
    options: &CaptureOptions,
    plan: &BasePlan,
    progress: &dyn Progress,
) -> Result<(CaptureOutcome, Option<String>), Box<CaptureJobError>> {
    let mut options = options.clone();
    options.base = plan.first().map(|b| b.file.clone());
    match plan.first() {
        Some(b) => tracing::info!("incremental capture on {}", b.name),
        None if matches!(plan, BasePlan::Auto(None)) => tracing::info!(
            "no earlier capture of this disk has a usable chunk map for this mode and format: capturing in full"
        ),
        None => tracing::info!("full capture"),
    }
    match (
        plan,
        diskferry_imaging::capture(Arc::clone(&source), out, &options, progress),
    ) {
        (BasePlan::Auto(Some(b)), Err(e)) if base_unusable(&e) => {
            tracing::warn!(
                "{} cannot be the base ({e}): capturing in full instead",
                b.name
            );
            options.base = None;
            let outcome =
                diskferry_imaging::capture(source, out, &options, progress).map_err(Box::new)?;
            Ok((outcome, Some(e.to_string())))
        }
        (_, result) => Ok((result.map_err(Box::new)?, None)),
    }
}

/// What a capture job made, for its log, its result and the catalog.
#[derive(Debug, Clone)]
pub struct Made {
    /// The base it was made on and how it uses it.
    pub base: Option<(BaseCapture, Relation)>,
    pub stats: Option<IncrementalStats>,
    /// Bytes of unchanged files taken from a files-mode base.
    pub reused: u64,
    pub chunk_map: bool,
    pub fallback: Option<String>,
}

impl Made {
    pub fn of(outcome: &CaptureOutcome, plan: &BasePlan, fallback: Option<String>) -> Made {
        let reused = match &outcome.summary {
            CaptureSummary::Partitions(r) => r.partitions.iter().map(|p| p.reused).sum(),
            _ => 0,
        };
        let relation = match outcome.summary {
            CaptureSummary::Overlay => Relation::Overlay,
            _ => Relation::Files,
        };
        let used = outcome.incremental.as_ref().and(plan.first());
        Made {
            base: used.map(|b| (b.clone(), relation)),
            stats: outcome.incremental.as_ref().map(|(_, s)| s.clone()),
            reused,
            chunk_map: outcome.chunk_map.is_some(),
            fallback,
        }
    }

    /// The line the job's log ends with.
    pub fn line(&self) -> String {
        let Some(((b, relation), s)) = self.base.as_ref().zip(self.stats.as_ref()) else {
            let map = if self.chunk_map {
                "; chunk map written"
            } else {
                ""
            };
            return format!("full capture{map}");
        };
        let taken = match relation {
            Relation::Overlay => format!("an overlay on {}: unchanged chunks stay there", b.name),
            Relation::Files => format!(
                "{} of unchanged files taken from {}",
                human_bytes(self.reused),
                b.name
            ),
        };
        format!(
            "incremental on {}: {} of {} chunks changed ({}); {taken}",
            b.name,
            s.changed_chunks,
            s.chunks,
            human_bytes(s.changed_bytes)
        )
    }

    /// The statistics the catalog and the API show.
    pub fn stats_json(&self) -> Option<serde_json::Value> {
        self.stats.as_ref().map(|s| {
            serde_json::json!({
                "chunks": s.chunks,
                "changed_chunks": s.changed_chunks,
                "changed_bytes": s.changed_bytes,
                "reused_bytes": self.reused,
                "seconds": s.elapsed.as_secs_f64(),
            })
        })
    }

    /// The job's result.
    pub fn json(&self, output: &str) -> serde_json::Value {
        serde_json::json!({
            "output": output,
            "base": self.base.as_ref().map(|(b, _)| &b.name),
            "relation": self.base.as_ref().map(|(_, r)| r.name()),
            "incremental": self.stats_json(),
            "chunk_map": self.chunk_map,
            "fallback": self.fallback,
            "summary": self.line(),
        })
    }
}
