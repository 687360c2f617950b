//! Server-rendered HTML (maud): login, captures (list with filters, detail with the partition
//! layout, a file browser inside any partition, file view, comparison), jobs (start, watch,
//! cancel, history) and machines. Everything works without JavaScript; `static/app.js` adds
//! live job progress and keyboard navigation.

pub mod captures;
pub mod jobs;
pub mod layout;

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::html;

use crate::auth::Identity;
use crate::error::{Failure, PageFailure};
use crate::ratelimit::{self, ClientIp};
use crate::SharedState;
use diskferry_daemon::catalog::{CaptureRecord, Catalog};
use diskferry_daemon::jobs::{auto_base, JobError};
use diskferry_imaging::pipeline::Mode;
use diskferry_vdisk::ImageFormat;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/captures") }))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/static/style.css", get(style))
        .route("/static/app.js", get(script))
        .route("/machines", get(machines))
        .route("/machines/{id}/name", post(name_machine))
        .route("/machines/{id}/approve", post(approve_machine))
        .route("/machines/{id}/forget", post(forget_machine))
        .route("/machines/{id}/wake", post(wake_machine))
        .route("/machines/{id}/groups", post(groups_machine))
        .route("/machines/register", post(register_machine))
        .merge(captures::routes())
        .merge(jobs::routes())
        .fallback(|| async { PageFailure(Failure::not_found("no such page")) })
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../static/style.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../static/app.js"),
    )
}

/// Where to go after logging in: the `next` value when it is a path on this site, else the
/// captures.
fn safe_next(q: &HashMap<String, String>) -> String {
    match q.get("next") {
        Some(n) if is_local_path(n) => n.clone(),
        _ => "/captures".into(),
    }
}

/// A path on this site, as the browser will read it: printable ASCII, `/` first and not
/// `//` or `/\` (another host), and still so with percent-escapes decoded (a `%09` or `%2F`
/// does not sneak a tab or a second slash in), with no control or space character anywhere.
fn is_local_path(next: &str) -> bool {
    let mut text = next.to_string();
    // Decoded until nothing changes (bounded: each round shortens the text).
    for _ in 0..4 {
        if !looks_local(&text) {
            return false;
        }
        match percent_decode(&text) {
            Some(decoded) if decoded == text => return true,
            Some(decoded) => text = decoded,
            None => return false,
        }
    }
    false
}

fn looks_local(path: &str) -> bool {
    let b = path.as_bytes();
    b.first() == Some(&b'/')
        && !matches!(b.get(1), Some(b'/' | b'\\'))
        && !path.contains('\\')
        && !path.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// `%XX` escapes decoded; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn login_page(next: &str, failed: bool) -> Response {
    let body = html! {
        h1 { "Log in" }
        @if failed { p.error role="alert" { "Wrong password." } }
        form.login method="post" action="/login" {
            input type="hidden" name="next" value=(next);
            label for="password" { "Admin password" }
            input #password type="password" name="password" autocomplete="current-password" autofocus required;
            button type="submit" { "Log in" }
        }
        p.hint { "The server printed the password when it first started; DATA_DIR/admin-password keeps only its hash (write a new password there and restart to change it)." }
    };
    let status = if failed {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    (
        status,
        Html(layout::page("Log in", "", None, body).into_string()),
    )
        .into_response()
}

async fn login_form(Query(q): Query<HashMap<String, String>>) -> Response {
    login_page(&safe_next(&q), false)
}

/// A cross-site form cannot log a browser in to this server: the Origin, when sent, must be
/// this host.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest == host)
}

/// Checks the password: a session and a redirect to `next`, or the form again. An address
/// with too many recent failures gets 429 before its password is looked at.
async fn login(
    State(state): State<SharedState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !same_origin(&headers) {
        return PageFailure(Failure::new(
            StatusCode::FORBIDDEN,
            "login from another site refused",
        ))
        .into_response();
    }
    if let Err(wait) = state.auth.failures.check(ip) {
        return ratelimit::too_many(wait);
    }
    let next = safe_next(&form);
    let password = form.get("password").map_or("", String::as_str);
    match state.auth.login(password).await {
        Some(id) => (
            [(header::SET_COOKIE, state.auth.cookie_for(&id))],
            Redirect::to(&next),
        )
            .into_response(),
        None => {
            state.auth.failures.fail(ip);
            tracing::warn!("failed login from {ip}");
            login_page(&next, true)
        }
    }
}

async fn logout(State(state): State<SharedState>, Extension(who): Extension<Identity>) -> Response {
    if let Identity::Browser { session_id, .. } = &who {
        state.auth.logout(session_id);
    }
    (
        [(header::SET_COOKIE, state.auth.cookie_for(""))],
        Redirect::to("/login"),
    )
        .into_response()
}

async fn machines(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
) -> Result<Html<String>, PageFailure> {
    let list = crate::api::machine_list(&state).await?;
    let st = std::sync::Arc::clone(&state);
    let captures = tokio::task::spawn_blocking(move || st.catalog.captures()).await??;
    let st = std::sync::Arc::clone(&state);
    let listed = list.clone();
    let bases = tokio::task::spawn_blocking(move || capture_bases(&st.catalog, &listed)).await??;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let body = html! {
        h1 { "Machines" }
        @if list.is_empty() {
            p.empty { "No machine has dialed in yet. Machines appear here when they boot the diskferry PXE environment and connect back to this server; a new machine waits for your approval before any job may use it." }
        } @else {
            p.hint { "Deploy replaces everything on the machine's disk (its only disk; for a machine with several, name the disk as DISK@MACHINE on the Jobs page). A capture is incremental on the disk's latest capture when it has one with a chunk map (a whole-disk base takes a .qcow2 overlay); a base found unusable gives way to a full capture." }
            div.scroll { table.list {
                thead { tr { th { "Name" } th { "MAC addresses" } th { "Hardware" } th { "Disks" } th { "State" } th { "Jobs" } th { "Last seen" } th {} } }
                tbody {
                    @for m in &list {
                        @let id = m["id"].as_i64().unwrap_or(0);
                        @let hw = &m["identity"];
                        tr {
                            td {
                                (m["name"].as_str().unwrap_or("(unregistered)"))
                                @for g in m["groups"].as_array().into_iter().flatten() { " " span.hint { "[" (text(g)) "]" } }
                            }
                            td.mono { (m["macs"].as_array().map(|a| a.iter().map(text).collect::<Vec<_>>().join(" ")).unwrap_or_default()) }
                            td { (text(&hw["vendor"])) " " (text(&hw["product"])) }
                            td.mono {
                                @for d in hw["disks"].as_array().into_iter().flatten() {
                                    (text(&d["name"])) " " (layout::human_bytes(d["size"].as_u64().unwrap_or(0))) br;
                                }
                                @for e in m["nbd"].as_array().into_iter().flatten() {
                                    span.hint title="The live disk, read-only, for qemu, nbdcopy or nbdinfo while the machine is connected" { "NBD " (text(&e["url"])) } br;
                                }
                            }
                            td {
                                (text(&m["state"])) @if m["online"] == true { " · " span.state.succeeded { "online" } }
                                @if m["preregistered"] == true { br; span.hint { "added by hand: its first network boot is approved" } }
                                @else if m["approved"] != true && m["pending"].is_null() { br; span.state.failed { "not approved" } }
                                @if let Some(reason) = m["pending"]["reason"].as_str() {
                                    br; span.state.failed { "awaits approval" } ": " (reason)
                                    br; span.mono { "agent key " (text(&m["pending"]["agent_key"]).chars().take(16).collect::<String>()) }
                                }
                            }
                            td { (machine_jobs(m)) }
                            td { (m["last_seen"].as_i64().map(layout::date).unwrap_or_default()) }
                            td {
                                @if m["online"] != true {
                                    form.inline method="post" action=(format!("/machines/{id}/wake")) {
                                        input type="hidden" name="csrf" value=(who.csrf());
                                        button type="submit" title="Send the Wake-on-LAN magic packet" { "Wake" }
                                    }
                                }
                                @if !m["pending"].is_null() {
                                    form.inline method="post" action=(format!("/machines/{id}/approve")) {
                                        input type="hidden" name="csrf" value=(who.csrf());
                                        button type="submit" { "Approve" }
                                    }
                                }
                                form.inline method="post" action=(format!("/machines/{id}/forget")) {
                                    input type="hidden" name="csrf" value=(who.csrf());
                                    button type="submit" { "Forget" }
                                }
                                form.inline method="post" action=(format!("/machines/{id}/groups")) {
                                    input type="hidden" name="csrf" value=(who.csrf());
                                    input name="groups" placeholder="groups, comma separated" aria-label="Groups" value=(m["groups"].as_array().map(|a| a.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default());
                                    button type="submit" { "Set groups" }
                                }
                                form.inline method="post" action=(format!("/machines/{id}/name")) {
                                    input type="hidden" name="csrf" value=(who.csrf());
                                    input name="name" required placeholder=(if m["name"].is_null() { "name to register" } else { "new name" }) aria-label="Machine name";
                                    button type="submit" { @if m["name"].is_null() { "Register" } @else { "Rename" } }
                                }
                                @for (source, base) in bases.iter().filter(|b| b.0 == id).map(|b| (&b.1, &b.2)) {
                                    (capture_form(&who, source, base.as_ref()))
                                }
                                @if (m["approved"] == true || m["preregistered"] == true) && m["pending"].is_null() && !captures.is_empty() {
                                    // Deploy: the machine's only disk, or name one on the jobs page; a
                                    // machine that is not connected is woken and the job waits for it.
                                    form.inline method="post" action="/jobs" {
                                        input type="hidden" name="csrf" value=(who.csrf());
                                        input type="hidden" name="kind" value="deploy";
                                        input type="hidden" name="target" value=(m["name"].as_str().map_or_else(|| text(&m["macs"][0]), str::to_string));
                                        select name="image" aria-label="Capture to deploy" {
                                            @for c in &captures { option value=(c.id) { (c.name) } }
                                        }
                                        button type="submit" { "Deploy" }
                                    }
                                }
                            }
                        }
                    }
                }
            } }
        }
        h2 { "Add a machine" }
        form.job #register method="post" action="/machines/register" {
            input type="hidden" name="csrf" value=(who.csrf());
            label for="reg-mac" { "MAC address" }
            input #reg-mac name="mac" required placeholder="52:54:00:12:34:56";
            label for="reg-name" { "Name" }
            input #reg-name name="name" required placeholder="lab-01";
            label for="reg-address" { "Address (optional, for Wake-on-LAN)" }
            input #reg-address name="address" placeholder="10.0.0.21";
            button type="submit" { "Add" }
            p.hint { "A machine added here is known before it boots: jobs can be queued for it (it is woken by a magic packet), and its first network boot is approved. A known machine with nothing to do boots its own disk when it starts from the network." }
        }
    };
    Ok(Html(
        layout::page("Machines", "Machines", Some(&who), body).into_string(),
    ))
}

/// For each disk of each machine a job may use: the machine's id, the disk as a capture
/// source (`DISK@MACHINE`) and the capture an incremental capture of it would build on
/// (the daemon's own choice for a .qcow2 output in auto mode).
fn capture_bases(
    catalog: &Catalog,
    machines: &[serde_json::Value],
) -> Result<Vec<(i64, String, Option<CaptureRecord>)>, JobError> {
    let mut out = Vec::new();
    for m in machines {
        // A machine that is not connected gets the form too: its job waits for it.
        let usable = m["approved"] == true && m["pending"].is_null();
        let macs: Vec<&str> = m["macs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        let (Some(id), true, Some(first_mac)) = (m["id"].as_i64(), usable, macs.first()) else {
            continue;
        };
        // How jobs name the machine (its origin in the catalog) and how the form names it.
        let label = m["name"]
            .as_str()
            .map_or_else(|| macs.join(","), str::to_string);
        let who = m["name"].as_str().unwrap_or(first_mac);
        for d in m["identity"]["disks"].as_array().into_iter().flatten() {
            let Some(disk) = d["name"].as_str() else {
                continue;
            };
            let base = auto_base(catalog, &label, disk, Mode::Auto, ImageFormat::Qcow2)?;
            out.push((id, format!("{disk}@{who}"), base));
        }
    }
    Ok(out)
}

/// A machine disk's capture form: incremental on its latest capture (chosen) when it has
/// one with a chunk map, else a full capture.
pub fn capture_form(who: &Identity, source: &str, base: Option<&CaptureRecord>) -> maud::Markup {
    html! {
        form.inline method="post" action="/jobs" {
            input type="hidden" name="csrf" value=(who.csrf());
            input type="hidden" name="kind" value="capture";
            input type="hidden" name="source" value=(source);
            input name="output" required placeholder="name.qcow2" aria-label=(format!("Capture {source} as"));
            select name="incremental" aria-label="Full or incremental" {
                @if let Some(b) = base {
                    option value="auto" selected { "Incremental on " (b.name) }
                }
                option value="full" selected[base.is_none()] { "Full capture" }
            }
            button type="submit" { "Capture " (source) }
        }
    }
}

/// The machine's last job, the jobs waiting for it and its schedules.
fn machine_jobs(m: &serde_json::Value) -> maud::Markup {
    let show = |t: &serde_json::Value| {
        t.as_i64()
            .map(diskferry_daemon::jobs::show_time)
            .unwrap_or_default()
    };
    html! {
        @if let Some(j) = m["last_job"]["id"].as_i64() {
            "last: " a href=(format!("/jobs/{j}")) { (m["last_job"]["kind"].as_str().unwrap_or("")) " #" (j) }
            " " span class=(format!("state {}", m["last_job"]["state"].as_str().unwrap_or(""))) { (m["last_job"]["state"].as_str().unwrap_or("")) }
            br;
        }
        @for j in m["waiting_jobs"].as_array().into_iter().flatten() {
            "waiting: " a href=(format!("/jobs/{}", j["id"])) { (j["kind"].as_str().unwrap_or("")) " #" (j["id"]) }
            " from " (show(&j["not_before"]))
            @if !j["woken_at"].is_null() { " (woken)" }
            br;
        }
        @for s in m["schedules"].as_array().into_iter().flatten() {
            "every " (s["every"].as_str().unwrap_or("")) ": " (s["kind"].as_str().unwrap_or("")) ", next " (show(&s["next_at"]))
            br;
        }
    }
}

async fn groups_machine(
    State(state): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageFailure> {
    let groups = form
        .get("groups")
        .map_or("", String::as_str)
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    crate::api::set_groups(&state, &id, groups).await?;
    Ok(Redirect::to("/machines").into_response())
}

async fn wake_machine(
    State(state): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, PageFailure> {
    crate::api::wake(&state, &id).await?;
    Ok(Redirect::to("/machines").into_response())
}

async fn register_machine(
    State(state): State<SharedState>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageFailure> {
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    crate::api::register(
        &state,
        crate::api::RegisterBody {
            mac: field("mac"),
            name: field("name"),
            address: Some(field("address")),
        },
    )
    .await?;
    Ok(Redirect::to("/machines").into_response())
}

async fn approve_machine(
    State(state): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, PageFailure> {
    crate::api::approve(&state, &id).await?;
    Ok(Redirect::to("/machines").into_response())
}

async fn forget_machine(
    State(state): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, PageFailure> {
    crate::api::forget(&state, &id).await?;
    Ok(Redirect::to("/machines").into_response())
}

async fn name_machine(
    State(state): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageFailure> {
    let name = form.get("name").map_or("", String::as_str);
    crate::api::set_machine_name(&state, &id, name).await?;
    Ok(Redirect::to("/machines").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_disk_is_offered_its_latest_capture_with_a_map() {
        use diskferry_daemon::catalog::CaptureRecording;
        use diskferry_imaging::chunkmap::{ChunkMap, Layout};
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        for (name, secs) in [("old.img", 1_000), ("new.img", 2_000), ("nomap.img", 3_000)] {
            let image = catalog.captures_dir().join(name);
            std::fs::write(&image, vec![1u8; 1 << 20]).unwrap();
            // Newest last: modification times set apart, before the map records them.
            let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let f = std::fs::File::options().write(true).open(&image).unwrap();
            f.set_modified(when).unwrap();
            if name != "nomap.img" {
                let source: std::sync::Arc<dyn diskferry_blockdev::BlockDevice> =
                    std::sync::Arc::new(diskferry_blockdev::MemoryDevice::read_only(vec![
                        1u8;
                        1 << 20
                    ]));
                let map = ChunkMap::of_source(&source, &image, Layout::WholeDisk).unwrap();
                map.save(&image).unwrap();
            }
        }
        catalog.refresh_captures().unwrap();
        for name in ["old.img", "new.img", "nomap.img"] {
            let rec = CaptureRecording {
                machine: "web-01".into(),
                disk: "sda".into(),
                ..CaptureRecording::default()
            };
            catalog.record_capture(name, &rec).unwrap();
        }
        let machine = |approved: bool| {
            serde_json::json!({"id": 4, "name": "web-01", "macs": ["52:54:00:00:00:01"],
                "online": false, "approved": approved, "pending": null,
                "identity": {"disks": [{"name": "sda"}, {"name": "sdb"}]}})
        };
        // Offline, too: its capture waits for it and wakes it.
        let bases = capture_bases(&catalog, &[machine(true)]).unwrap();
        let names: Vec<(&str, Option<&str>)> = bases
            .iter()
            .map(|(_, s, b)| (s.as_str(), b.as_ref().map(|b| b.name.as_str())))
            .collect();
        assert_eq!(
            names,
            [("sda@web-01", Some("new.img")), ("sdb@web-01", None)]
        );
        assert!(capture_bases(&catalog, &[machine(false)])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_capture_form_offers_incremental_on_the_latest_capture_first() {
        let who = Identity::Token;
        let latest = CaptureRecord {
            id: 7,
            name: "web<01>-monday.qcow2".into(),
            ..CaptureRecord::default()
        };
        let html = capture_form(&who, "sda@web-01", Some(&latest)).into_string();
        assert!(
            html.contains(r#"<option value="auto" selected>Incremental on web&lt;01&gt;-monday.qcow2</option>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"<option value="full">Full capture</option>"#),
            "{html}"
        );
        let html = capture_form(&who, "sda@web-01", None).into_string();
        assert!(!html.contains("Incremental"), "{html}");
        assert!(
            html.contains(r#"<option value="full" selected>Full capture</option>"#),
            "{html}"
        );
        assert!(
            html.contains(r#"name="source" value="sda@web-01""#),
            "{html}"
        );
    }

    #[test]
    fn next_is_only_a_path_on_this_site() {
        for good in ["/captures", "/captures/3?x=%2Fetc", "/compare?a=1&b=2", "/"] {
            assert!(is_local_path(good), "{good}");
        }
        for bad in [
            "/%09/evil.example",
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "/%2F/evil.example",
            "/%5Cevil.example",
            "/%252F/evil.example",
            "/\t/evil.example",
            "/ /evil.example",
            "/%0d%0aSet-Cookie:x",
            "/%zz",
            "evil.example",
            "",
        ] {
            assert!(!is_local_path(bad), "{bad:?}");
            let q = HashMap::from([("next".to_string(), bad.to_string())]);
            assert_eq!(safe_next(&q), "/captures", "{bad:?}");
        }
    }
}
