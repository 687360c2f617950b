//! `/api/jobs`: start a capture or deploy job (at once, at a time, or when its machine
//! connects), list and read jobs, follow one with server-sent events, cancel it; and
//! `/api/schedules`: recurring jobs.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::*;
use crate::error::Failure;
use crate::SharedState;

pub(super) async fn list_jobs(State(state): State<SharedState>) -> Result<Response, Failure> {
    let st = Arc::clone(&state);
    let jobs = tokio::task::spawn_blocking(move || st.catalog.jobs(200)).await??;
    Ok(Json(jobs).into_response())
}

pub(super) async fn start_job(
    State(state): State<SharedState>,
    body: Bytes,
) -> Result<Response, Failure> {
    let req: JobRequest = json_body(&body, "a job (see /api/openapi.json)")?;
    let id = state.jobs.start(req)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/jobs/{id}"))],
        Json(serde_json::json!({ "id": id })),
    )
        .into_response())
}

/// A recurring job: the request and when it recurs.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    every: String,
    job: JobRequest,
}

pub(super) async fn add_schedule(
    State(state): State<SharedState>,
    body: Bytes,
) -> Result<Response, Failure> {
    let req: ScheduleBody = json_body(
        &body,
        r#"{"every": "sun 02:00", "job": {a job, as POST /api/jobs takes}}"#,
    )?;
    let st = Arc::clone(&state);
    let id =
        tokio::task::spawn_blocking(move || st.jobs.add_schedule(&req.job, &req.every)).await??;
    let st = Arc::clone(&state);
    let rec = tokio::task::spawn_blocking(move || st.catalog.schedule(id)).await??;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/schedules/{id}"))],
        Json(rec),
    )
        .into_response())
}

pub(super) async fn list_schedules(State(state): State<SharedState>) -> Result<Response, Failure> {
    let st = Arc::clone(&state);
    let list = tokio::task::spawn_blocking(move || st.catalog.schedules()).await??;
    Ok(Json(list).into_response())
}

pub(super) async fn delete_schedule(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id: i64 = parse_number("schedule id", &id)?;
    let st = Arc::clone(&state);
    if tokio::task::spawn_blocking(move || st.catalog.delete_schedule(id)).await?? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(Failure::not_found(format!("no schedule with id {id}")))
    }
}

/// The job a URL segment names, or a 400 (not a number) or 404 (no such job).
async fn job_by_id(
    state: &SharedState,
    raw: &str,
) -> Result<(i64, diskferry_daemon::catalog::JobRecord), Failure> {
    let id: i64 = parse_number("job id", raw)?;
    let st = Arc::clone(state);
    let job = tokio::task::spawn_blocking(move || st.catalog.job(id))
        .await??
        .ok_or_else(|| Failure::not_found(format!("no job with id {id}")))?;
    Ok((id, job))
}

pub(super) async fn get_job(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let (_, job) = job_by_id(&state, &id).await?;
    Ok(Json(job).into_response())
}

pub(super) async fn cancel_job(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id: i64 = parse_number("job id", &id)?;
    if state.jobs.cancel(id) {
        Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"cancelling": id})),
        )
            .into_response())
    } else {
        Err(Failure::new(
            StatusCode::CONFLICT,
            format!("job {id} is neither running nor waiting"),
        ))
    }
}

/// Server-sent events: the job's current record, then each progress event as it happens,
/// ending with the final state.
pub(super) async fn job_events(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let (id, job) = job_by_id(&state, &id).await?;
    let first = serde_json::json!({
        "state": job.state.name(), "error": job.error, "progress": job.progress,
    });
    let rx = state.jobs.subscribe(id);
    let stream = futures_util::stream::unfold((Some(first), rx), |(first, mut rx)| async move {
        if let Some(f) = first {
            return Some((f, (None, rx)));
        }
        let r = rx.as_mut()?;
        r.changed().await.ok()?;
        let v = r.borrow_and_update().clone();
        Some((v, (None, rx)))
    });
    let events = futures_util::StreamExt::map(stream, |v| {
        Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string()))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
