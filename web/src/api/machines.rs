//! `/api/machines`: the registry of machines, naming one, approving its enrollment, forgetting
//! it, and power requests through its agent.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::*;
use crate::error::Failure;
use crate::SharedState;

/// A machine's jobs: the last one that ran, those waiting for it and its schedules.
fn machine_jobs(
    catalog: &diskferry_daemon::catalog::Catalog,
    id: i64,
    schedules: &[diskferry_daemon::catalog::ScheduleRecord],
) -> Result<serde_json::Value, diskferry_daemon::catalog::CatalogError> {
    let last = catalog.last_job_of(id)?.map(|j| {
        serde_json::json!({"id": j.id, "kind": j.kind, "state": j.state, "finished_at": j.finished_at})
    });
    let waiting: Vec<serde_json::Value> = catalog
        .waiting_jobs_of(id)?
        .into_iter()
        .map(|j| serde_json::json!({"id": j.id, "kind": j.kind, "not_before": j.not_before, "woken_at": j.woken_at}))
        .collect();
    let scheduled: Vec<serde_json::Value> = schedules
        .iter()
        .filter(|s| s.machine_id == Some(id))
        .map(|s| serde_json::json!({"id": s.id, "kind": s.kind, "every": s.every, "next_at": s.next_at}))
        .collect();
    Ok(serde_json::json!({"last_job": last, "waiting_jobs": waiting, "schedules": scheduled}))
}

/// Machines with whether each is connected now and their jobs.
pub async fn machine_list(state: &SharedState) -> Result<Vec<serde_json::Value>, Failure> {
    let st = Arc::clone(state);
    let (list, jobs) = tokio::task::spawn_blocking(move || {
        let list = st.catalog.machines()?;
        let schedules = st.catalog.schedules()?;
        let jobs = list
            .iter()
            .map(|m| machine_jobs(&st.catalog, m.id, &schedules))
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, diskferry_daemon::catalog::CatalogError>((list, jobs))
    })
    .await??;
    let online = state.agents.online();
    let exports = match state.nbd.get() {
        Some(nbd) => state
            .jobs
            .machine_disks()
            .into_iter()
            .map(|d| {
                let url = nbd.url(&d.export);
                (
                    d.machine_id,
                    serde_json::json!({"disk": d.disk, "url": url}),
                )
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(list
        .into_iter()
        .zip(jobs)
        .map(|(m, jobs)| {
            let mut v = serde_json::to_value(&m).unwrap_or_default();
            for k in ["last_job", "waiting_jobs", "schedules"] {
                v[k] = jobs[k].clone();
            }
            v["online"] = online.contains(&m.id).into();
            // Its disks over NBD while it is connected and approved.
            v["nbd"] = exports
                .iter()
                .filter(|(id, _)| *id == m.id)
                .map(|(_, e)| e.clone())
                .collect::<Vec<_>>()
                .into();
            v
        })
        .collect())
}

pub(super) async fn machines(State(state): State<SharedState>) -> Result<Response, Failure> {
    Ok(Json(machine_list(&state).await?).into_response())
}

/// One machine, as the list shows it.
pub(super) async fn machine(
    State(state): State<SharedState>,
    Path(key): Path<String>,
) -> Result<Response, Failure> {
    let rec = machine_by_key(&state, &key).await?;
    let found = machine_list(&state)
        .await?
        .into_iter()
        .find(|m| m["id"] == rec.id)
        .ok_or_else(|| Failure::not_found(format!("machine {key:?} was just forgotten")))?;
    Ok(Json(found).into_response())
}

/// The machine a URL names (registered name, MAC address or id), or a 404.
pub async fn machine_by_key(
    state: &SharedState,
    key: &str,
) -> Result<diskferry_daemon::catalog::MachineRecord, Failure> {
    let st = Arc::clone(state);
    let k = key.to_string();
    tokio::task::spawn_blocking(move || st.catalog.find_machine(&k))
        .await??
        .ok_or_else(|| {
            Failure::not_found(format!(
                "no machine {key:?} (give its name, a MAC address or its id)"
            ))
        })
}

/// Names (registers) a machine; shared by the API and the page.
pub async fn set_machine_name(state: &SharedState, key: &str, name: &str) -> Result<i64, Failure> {
    let m = machine_by_key(state, key).await?;
    let st = Arc::clone(state);
    let name = name.to_string();
    tokio::task::spawn_blocking(move || st.catalog.name_machine(m.id, &name)).await??;
    Ok(m.id)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

pub(super) async fn name_machine(
    State(state): State<SharedState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let req: NameBody = json_body(&body, r#"{"name": "..."}"#)?;
    let id = set_machine_name(&state, &key, &req.name).await?;
    let m = machine_by_key(&state, &id.to_string()).await?;
    Ok(Json(m).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerBody {
    action: String,
}

pub(super) async fn power_machine(
    State(state): State<SharedState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let req: PowerBody = json_body(&body, r#"{"action": "reboot" or "poweroff"}"#)?;
    let action = match req.action.as_str() {
        "reboot" => diskferry_protocol::PowerAction::Reboot,
        "poweroff" => diskferry_protocol::PowerAction::Poweroff,
        other => {
            return Err(Failure::bad_request(format!(
                "unknown action {other:?}: use reboot or poweroff"
            )))
        }
    };
    let m = machine_by_key(&state, &key).await?;
    let link = state.agents.approved_link(m.id).ok_or_else(|| {
        Failure::new(
            StatusCode::CONFLICT,
            "that machine is not connected with an approved agent",
        )
    })?;
    link.connection
        .power(action)
        .await
        .map_err(|e| Failure::new(StatusCode::BAD_GATEWAY, format!("the machine refused: {e}")))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"done": req.action})),
    )
        .into_response())
}

/// What registering a machine before it boots takes.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub mac: String,
    pub name: String,
    /// An address on its network, for Wake-on-LAN until it connects.
    #[serde(default)]
    pub address: Option<String>,
}

/// Registers a machine by MAC and name (a new one is known, and approved on its first PXE
/// boot); shared by the API and the page.
pub async fn register(state: &SharedState, body: RegisterBody) -> Result<i64, Failure> {
    let address = match body
        .address
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        Some(a) => Some(
            a.parse::<std::net::IpAddr>()
                .map_err(|_| Failure::bad_request(format!("address {a:?} is not an IP address")))?,
        ),
        None => None,
    };
    let st = Arc::clone(state);
    let id = tokio::task::spawn_blocking(move || {
        st.catalog.register_machine(&body.mac, &body.name, address)
    })
    .await??;
    tracing::info!(machine = id, "machine {id} registered by an administrator");
    Ok(id)
}

pub(super) async fn register_machine(
    State(state): State<SharedState>,
    body: Bytes,
) -> Result<Response, Failure> {
    let req: RegisterBody = json_body(
        &body,
        r#"{"mac": "52:54:00:12:34:56", "name": "lab-01", "address": "10.0.0.21" (optional)}"#,
    )?;
    let id = register(&state, req).await?;
    let m = machine_by_key(&state, &id.to_string()).await?;
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, format!("/api/machines/{id}"))],
        Json(m),
    )
        .into_response())
}

/// Sets the groups a machine belongs to; shared by the API and the page.
pub async fn set_groups(
    state: &SharedState,
    key: &str,
    groups: Vec<String>,
) -> Result<i64, Failure> {
    let m = machine_by_key(state, key).await?;
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || st.catalog.set_machine_groups(m.id, &groups)).await??;
    Ok(m.id)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupsBody {
    groups: Vec<String>,
}

pub(super) async fn put_groups(
    State(state): State<SharedState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, Failure> {
    let req: GroupsBody = json_body(&body, r#"{"groups": ["room-4", "all"]}"#)?;
    let id = set_groups(&state, &key, req.groups).await?;
    let m = machine_by_key(&state, &id.to_string()).await?;
    Ok(Json(m).into_response())
}

/// Sends a machine the Wake-on-LAN magic packet; shared by the API and the page.
pub async fn wake(state: &SharedState, key: &str) -> Result<String, Failure> {
    let st = Arc::clone(state);
    let key = key.to_string();
    Ok(tokio::task::spawn_blocking(move || st.jobs.wake_machine(&key)).await??)
}

pub(super) async fn wake_machine(
    State(state): State<SharedState>,
    Path(key): Path<String>,
) -> Result<Response, Failure> {
    let sent = wake(&state, &key).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"sent": sent})),
    )
        .into_response())
}

/// Approves a machine's pending enrollment; shared by the API and the page.
pub async fn approve(state: &SharedState, key: &str) -> Result<i64, Failure> {
    let m = machine_by_key(state, key).await?;
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || st.catalog.approve_machine(m.id)).await??;
    tracing::info!(machine = m.id, "machine {} approved", m.id);
    Ok(m.id)
}

/// Forgets a machine (not while it runs a job); shared by the API and the page.
pub async fn forget(state: &SharedState, key: &str) -> Result<(), Failure> {
    let m = machine_by_key(state, key).await?;
    if m.state == diskferry_daemon::catalog::state::TRANSITIONING {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "that machine is in a job; cancel it first",
        ));
    }
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || st.catalog.forget_machine(m.id)).await??;
    tracing::info!(machine = m.id, "machine {} forgotten", m.id);
    Ok(())
}

pub(super) async fn approve_machine(
    State(state): State<SharedState>,
    Path(key): Path<String>,
) -> Result<Response, Failure> {
    let id = approve(&state, &key).await?;
    let m = machine_by_key(&state, &id.to_string()).await?;
    Ok(Json(m).into_response())
}

pub(super) async fn forget_machine(
    State(state): State<SharedState>,
    Path(key): Path<String>,
) -> Result<Response, Failure> {
    forget(&state, &key).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
