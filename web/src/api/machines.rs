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

/// Machines with whether each is connected now.
pub async fn machine_list(state: &SharedState) -> Result<Vec<serde_json::Value>, Failure> {
    let st = Arc::clone(state);
    let list = tokio::task::spawn_blocking(move || st.catalog.machines()).await??;
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
        .map(|m| {
            let mut v = serde_json::to_value(&m).unwrap_or_default();
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
