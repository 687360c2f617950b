//! `/api/captures`: the catalog's captures as summaries (partitions, OS, sizes, their place in
//! a chain of incremental captures), filtered; deleting one (refused while overlays use it).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use diskferry_daemon::catalog::{chain_of, children_of, CaptureRecord, Relation};
use serde::Serialize;

use super::*;
use crate::error::Failure;
use crate::SharedState;

/// A capture as lists show it.
#[derive(Debug, Serialize)]
pub struct CaptureSummary {
    pub id: i64,
    pub name: String,
    pub path: String,
    pub format: String,
    pub virtual_size: u64,
    pub allocated_size: u64,
    pub modified: i64,
    pub source_machine: Option<String>,
    /// The operating system found, if any ("Debian GNU/Linux 12", "Windows 11 Pro").
    pub os: Option<String>,
    pub partitions: Vec<PartitionSummary>,
    pub analysis_error: Option<String>,
    /// The disk of the source machine it was read from.
    pub source_disk: Option<String>,
    /// The capture this one was made incrementally on.
    pub base: Option<ChainLink>,
    /// Captures made incrementally on this one.
    pub children: Vec<ChainLink>,
    /// The bases' names from this capture's own up to the root of its chain.
    pub chain: Vec<String>,
    /// How much of the source had changed since the base (chunks, changed_chunks,
    /// changed_bytes, reused_bytes, seconds).
    pub incremental: Option<serde_json::Value>,
    /// A usable chunk map lies beside it: captures of the same disk can build on it.
    pub chunk_map: bool,
    /// "whole-disk" or "partitions", as its chunk map records.
    pub layout: Option<String>,
}

/// A capture another one is chained to.
#[derive(Debug, Clone, Serialize)]
pub struct ChainLink {
    /// Its id; none when the base is no longer in the catalog.
    pub id: Option<i64>,
    pub name: String,
    /// How the later capture uses the earlier one: "overlay" (reads through it) or "files"
    /// (took unchanged files from it once).
    pub relation: Option<Relation>,
}

#[derive(Debug, Serialize)]
pub struct PartitionSummary {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub type_name: String,
    pub filesystem: String,
    pub label: Option<String>,
    pub used_bytes: Option<u64>,
    /// What reading it involved or why a capture copies it by blocks (a journal replayed in
    /// memory, a feature the rebuild cannot make), when anything.
    pub note: Option<String>,
}

impl CaptureSummary {
    /// The summary of `r`, its chain read off `all` (every capture in the catalog).
    pub fn of(r: &CaptureRecord, all: &[CaptureRecord]) -> CaptureSummary {
        let parts = r.analysis.as_ref().map_or(&[][..], |a| &a.partitions[..]);
        CaptureSummary {
            id: r.id,
            name: r.name.clone(),
            path: r.path.clone(),
            format: r.format.clone(),
            virtual_size: r.virtual_size,
            allocated_size: r.allocated_size,
            modified: r.modified,
            source_machine: r.source_machine.clone(),
            os: parts.iter().find_map(|p| {
                let os = p.os.as_ref()?;
                let name = os.pretty_name.clone().or_else(|| {
                    os.name
                        .as_ref()
                        .map(|n| format!("{n} {}", os.version.clone().unwrap_or_default()))
                })?;
                Some(name.trim().to_string())
            }),
            partitions: parts
                .iter()
                .map(|p| PartitionSummary {
                    number: p.number.max(1),
                    start: p.start,
                    size: p.size,
                    type_name: p.type_name.clone(),
                    filesystem: p.filesystem.clone(),
                    label: p.label.clone(),
                    used_bytes: p.used_bytes,
                    note: p.note.clone(),
                })
                .collect(),
            analysis_error: r.analysis_error.clone(),
            source_disk: r.source_disk.clone(),
            base: r.base.as_ref().map(|b| {
                let found = all.iter().find(|c| &c.path == b);
                ChainLink {
                    id: found.map(|c| c.id),
                    name: found.map_or_else(|| b.clone(), |c| c.name.clone()),
                    relation: r.relation,
                }
            }),
            children: children_of(all, r)
                .into_iter()
                .map(|c| ChainLink {
                    id: Some(c.id),
                    name: c.name.clone(),
                    relation: c.relation,
                })
                .collect(),
            chain: chain_of(all, r),
            incremental: r.incremental.clone(),
            chunk_map: r.chunk_map,
            layout: r.layout.clone(),
        }
    }
}

/// Filters of the capture list (all optional; all must hold).
#[derive(Debug, Default, serde::Deserialize)]
pub struct CaptureFilter {
    /// Text found in the name, path, OS, labels or source machine (case-insensitive).
    pub q: Option<String>,
    /// Text found in the OS name.
    pub os: Option<String>,
    /// A filesystem some partition holds ("ext4", "ntfs", "fat32"...).
    pub fs: Option<String>,
    /// Text found in the source machine.
    pub machine: Option<String>,
    /// Virtual size bounds, bytes.
    pub min_size: Option<u64>,
    pub max_size: Option<u64>,
    /// Modified at or after / before, seconds since the epoch.
    pub since: Option<i64>,
    pub until: Option<i64>,
}

impl CaptureFilter {
    pub fn matches(&self, c: &CaptureSummary) -> bool {
        let has = |hay: Option<&str>, needle: &Option<String>| match needle {
            None => true,
            Some(n) if n.trim().is_empty() => true,
            Some(n) => hay.is_some_and(|h| h.to_lowercase().contains(&n.trim().to_lowercase())),
        };
        let labels: Vec<&str> = c
            .partitions
            .iter()
            .filter_map(|p| p.label.as_deref())
            .collect();
        let text = format!(
            "{} {} {} {} {}",
            c.name,
            c.path,
            c.os.as_deref().unwrap_or(""),
            labels.join(" "),
            c.source_machine.as_deref().unwrap_or("")
        );
        has(Some(&text), &self.q)
            && has(c.os.as_deref(), &self.os)
            && has(c.source_machine.as_deref(), &self.machine)
            && self.fs.as_ref().is_none_or(|f| {
                f.trim().is_empty()
                    || c.partitions
                        .iter()
                        .any(|p| p.filesystem.eq_ignore_ascii_case(f.trim()))
            })
            && self.min_size.is_none_or(|m| c.virtual_size >= m)
            && self.max_size.is_none_or(|m| c.virtual_size <= m)
            && self.since.is_none_or(|s| c.modified >= s)
            && self.until.is_none_or(|u| c.modified < u)
    }
}

/// The filtered capture list (shared by the API and the page).
pub async fn filtered_captures(
    state: &SharedState,
    filter: &CaptureFilter,
) -> Result<Vec<CaptureSummary>, Failure> {
    refresh(state).await?;
    let st = Arc::clone(state);
    let all = tokio::task::spawn_blocking(move || st.catalog.captures()).await??;
    Ok(all
        .iter()
        .map(|c| CaptureSummary::of(c, &all))
        .filter(|c| filter.matches(c))
        .collect())
}

pub(super) async fn list_captures(
    State(state): State<SharedState>,
    Query(filter): Query<CaptureFilter>,
) -> Result<Json<Vec<CaptureSummary>>, Failure> {
    Ok(Json(filtered_captures(&state, &filter).await?))
}

pub(super) async fn get_capture(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let (c, s) = capture_summary(&state, &id).await?;
    let mut body = serde_json::to_value(s).map_err(|e| Failure::internal(e.to_string()))?;
    body["analysis"] = serde_json::to_value(&c.analysis).unwrap_or_default();
    Ok(Json(body).into_response())
}

/// How to run a capture at once: its NBD URL on the server's export port, a qemu command
/// line and a libvirt domain XML (firmware, devices, NICs, memory and CPUs from the capture
/// and the machine it came from). 409 when the server exports nothing (`--nbd-listen off`).
pub(super) async fn get_vm(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let c = capture_by_id(&state, &id).await?;
    let Some(nbd) = state.nbd.get().cloned() else {
        return Err(Failure::new(
            axum::http::StatusCode::CONFLICT,
            "this server exports no captures over NBD (it runs with --nbd-listen off)",
        ));
    };
    let st = Arc::clone(&state);
    let vm = tokio::task::spawn_blocking(move || {
        diskferry_daemon::exports::vm_for(&st.catalog, &c, &nbd)
    })
    .await?;
    let Some(url) = vm.disk.nbd_url() else {
        return Err(Failure::internal("a capture's VM boots from NBD"));
    };
    Ok(Json(serde_json::json!({
        "nbd_url": url,
        "firmware": vm.firmware,
        "qemu": vm.qemu_command(),
        "libvirt_xml": vm.libvirt_xml(),
    }))
    .into_response())
}

/// The capture with this id and its summary with its chain, or a 404.
pub async fn capture_summary(
    state: &SharedState,
    raw_id: &str,
) -> Result<(CaptureRecord, CaptureSummary), Failure> {
    let c = capture_by_id(state, raw_id).await?;
    let st = Arc::clone(state);
    let all = tokio::task::spawn_blocking(move || st.catalog.captures()).await??;
    let s = CaptureSummary::of(&c, &all);
    Ok((c, s))
}

/// Deletes a capture's image and chunk map; 409 while overlays use it as backing file.
pub async fn delete_by_id(state: &SharedState, raw_id: &str) -> Result<CaptureRecord, Failure> {
    let id: i64 = parse_number("capture id", raw_id)?;
    let st = Arc::clone(state);
    let gone = tokio::task::spawn_blocking(move || st.catalog.delete_capture(id)).await??;
    let gone = gone.ok_or_else(|| Failure::not_found(format!("no capture with id {id}")))?;
    tracing::info!("deleted capture {}", gone.path);
    Ok(gone)
}

pub(super) async fn delete_capture(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let gone = delete_by_id(&state, &id).await?;
    Ok(Json(serde_json::json!({"deleted": gone.id, "name": gone.name})).into_response())
}
