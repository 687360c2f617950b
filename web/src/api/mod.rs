//! The JSON API under `/api` (described in `openapi.json`, served at `/api/openapi.json`):
//! captures, their analysis and chains (deleting one no overlay needs), directory listings and file bytes inside a capture's
//! partition, a directory as a tar stream, comparing two captures, jobs (start, follow with
//! server-sent events, cancel) and machines.

use std::sync::Arc;
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};

mod captures;
mod files;
mod jobs;
mod machines;

pub use captures::*;
pub use files::*;
use jobs::*;
pub use machines::*;

use axum::Router;
use diskferry_daemon::catalog::CaptureRecord;

use crate::error::Failure;
use crate::SharedState;
use diskferry_daemon::jobs::JobRequest;

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");
/// Bytes per chunk when streaming a file.
const CHUNK: usize = 1 << 20;
/// Entries compared per side at most.
const COMPARE_LIMIT: usize = 500_000;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/captures", get(list_captures))
        .route("/captures/{id}", get(get_capture).delete(delete_capture))
        .route("/captures/{id}/vm", get(captures::get_vm))
        .route("/captures/{id}/partitions/{n}/dir", get(dir))
        .route("/captures/{id}/partitions/{n}/file", get(file))
        .route("/captures/{id}/partitions/{n}/tar", get(tar))
        .route("/compare", get(compare))
        .route("/jobs", get(list_jobs).post(start_job))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/events", get(job_events))
        .route("/machines", get(machines).post(register_machine))
        .route("/machines/{key}/wake", post(wake_machine))
        .route("/machines/{key}/groups", axum::routing::put(put_groups))
        .route("/schedules", get(list_schedules).post(add_schedule))
        .route("/schedules/{id}", axum::routing::delete(delete_schedule))
        .route("/machines/{key}", get(machine).delete(forget_machine))
        .route("/machines/{key}/name", post(name_machine))
        .route("/machines/{key}/approve", post(approve_machine))
        .route("/machines/{key}/power", post(power_machine))
        .fallback(|| async { Failure::not_found("no such API endpoint; see /api/openapi.json") })
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// A number from a URL segment, or a 400 naming it.
pub fn parse_number<T: std::str::FromStr>(what: &str, raw: &str) -> Result<T, Failure> {
    raw.parse()
        .map_err(|_| Failure::bad_request(format!("{what} must be a number, not {raw:?}")))
}

/// The capture with this id, or a 404.
pub async fn capture_by_id(state: &SharedState, raw_id: &str) -> Result<CaptureRecord, Failure> {
    let id: i64 = parse_number("capture id", raw_id)?;
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || st.catalog.capture(id))
        .await??
        .ok_or_else(|| Failure::not_found(format!("no capture with id {id}")))
}

/// Registers new and changed captures, at most once every two seconds.
pub async fn refresh(state: &SharedState) -> Result<(), Failure> {
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let mut last = st.refreshed.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
            return Ok(());
        }
        st.catalog.refresh_captures()?;
        *last = Some(std::time::Instant::now());
        Ok::<_, Failure>(())
    })
    .await?
}

/// A JSON request body, or a 400 saying what was expected.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::bad_request(format!("the body must be {expected}: {e}")))
}
