//! Job pages: start a capture from a listening client, the history, and one job with its
//! progress (live through server-sent events when scripts run, a refreshing page otherwise),
//! log and a cancel button.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::html;

use super::layout::{date, human_bytes, page};
use crate::api::parse_number;
use crate::auth::Identity;
use crate::error::{Failure, PageFailure};
use crate::SharedState;
use diskferry_daemon::jobs::JobRequest;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/jobs", get(list).post(start))
        .route("/jobs/{id}", get(detail))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/schedules/{id}/delete", post(delete_schedule))
}

/// The form of a multicast deploy: one capture onto many machines at once.
fn multicast_form(
    who: &Identity,
    captures: &[diskferry_daemon::catalog::CaptureRecord],
    groups: &[String],
) -> maud::Markup {
    html! {
        h2 #multicast { "Deploy to many machines at once (multicast)" }
        form.job method="post" action="/jobs" {
            (deploy_head(who, "multicast", "mc-image", captures))
            label for="mc-group" { "Group" }
            select #mc-group name="group" {
                option value="" selected { "— the machines listed below —" }
                @for g in groups { option value=(g) { (g) } }
            }
            label for="mc-targets" { "Or machines (names or MACs, comma-separated)" }
            input #mc-targets name="targets" placeholder="lab-01, lab-02, /dev/nvme0n1@lab-03";
            (deploy_mode("mc-mode"))
            label for="mc-rate" { "Most megabits a second (optional)" }
            input #mc-rate name="max_rate_mbit" inputmode="numeric" placeholder="1000";
            (boot_checkboxes())
            label.check { input type="checkbox" name="reboot" value="1"; " Reboot each machine when done" }
            label.check { input type="checkbox" name="force" value="1"; " Deploy even if the compatibility check refuses" }
            (when_fields())
            button type="submit" { "Deploy to all" }
            p.hint { "The capture is built once on the server and sent once over UDP multicast to every machine (their agents join the session over their encrypted connections; every datagram carries the session's MAC). Machines that miss data ask for it again; a machine the session leaves behind gets the image by unicast. Every machine is verified by hashes afterwards. The job waits until all machines are connected (waking them); after 15 minutes it starts with those that came. A customization with {name} cannot be multicast." }
        }
    }
}

/// The form of a live deploy: a capture's Linux root into a running Linux system.
fn live_form(
    who: &Identity,
    captures: &[diskferry_daemon::catalog::CaptureRecord],
) -> maud::Markup {
    html! {
        h2 #live { "Deploy into a running Linux system (live)" }
        form.job method="post" action="/jobs" {
            (deploy_head(who, "live", "live-image", captures))
            label for="live-target" { "Disk of a live agent" }
            input #live-target name="target" required placeholder="/dev/sda@192.0.2.10:7700";
            label for="live-size" { "Live file size in MiB (optional)" }
            input #live-size name="live_size_mib" inputmode="numeric" placeholder="one and a half times what the root needs";
            label for="live-wait" { "Minutes to wait for the reboot (0: do not wait)" }
            input #live-wait name="live_wait_minutes" inputmode="numeric" value="30";
            label.check { input type="checkbox" name="reboot" value="1" checked; " Reboot the machine into the new system" }
            label.check { input type="checkbox" name="live_keep_old" value="1"; " Once committed, keep the old system (no take-over)" }
            button type="submit" { "Deploy live" }
            p.hint { "The machine's agent runs inside its system (diskferry-client --listen … --live). It pins a file of the running system, the capture's Linux root is written into the disk sectors under it, and GRUB starts the new system once at the next boot. When the new system's agent answers, the deploy is committed (GRUB's default from then on); when the old system comes back instead, it is rolled back and left exactly as it was. Once committed, the new system takes the disk over: it reboots once more through GRUB files of its own, and the old system's partition is removed, its space freed (unless you keep the old system). The job shows where it stands: writing, switched, rebooting, committed, taking over, taken over or rolled back." }
        }
    }
}

/// The start every deploy form shares: its token and kind, and the capture to deploy (a
/// select with id `id`).
fn deploy_head(
    who: &Identity,
    kind: &str,
    id: &str,
    captures: &[diskferry_daemon::catalog::CaptureRecord],
) -> maud::Markup {
    html! {
        input type="hidden" name="csrf" value=(who.csrf());
        input type="hidden" name="kind" value=(kind);
        label for=(id) { "Capture" }
        select id=(id) name="image" {
            @for c in captures { option value=(c.id) { (c.name) } }
        }
    }
}

/// The mode select both deploy forms share.
fn deploy_mode(id: &str) -> maud::Markup {
    html! {
        label for=(id) { "Mode" }
        select id=(id) name="mode" {
            option value="auto" selected { "auto" }
            option value="files" { "files" }
            option value="blocks" { "blocks" }
            option value="sectors" { "sectors" }
        }
    }
}

/// The boot checkboxes both deploy forms share: the EFI fallback loader and the boot entry.
fn boot_checkboxes() -> maud::Markup {
    html! {
        label.check { input type="checkbox" name="fallback_loader" value="1" checked; " Add the EFI fallback loader (\\EFI\\BOOT\\BOOTX64.EFI) where it is missing" }
        label.check { input type="checkbox" name="boot_entry" value="1" checked; " Register a UEFI boot entry for the deployed system (agents started with --allow-firmware)" }
    }
}

/// The "when" fields both job forms share: a start time and a recurrence.
fn when_fields() -> maud::Markup {
    html! {
        label for="at" { "Start (optional)" }
        input #at name="at" placeholder="now, +30m, 02:00, 2026-12-06 02:00";
        label for="every" { "Repeat (optional)" }
        input #every name="every" placeholder="sun 02:00, daily 23:30, weekdays 06:00";
        p.hint { "A job for a machine that is not connected waits for it and wakes it with a magic packet (Wake-on-LAN); it fails if the machine has not connected after 15 minutes. Times are the server's." }
    }
}

async fn list(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
) -> Result<Html<String>, PageFailure> {
    let st = Arc::clone(&state);
    let (jobs, captures, schedules, groups) = tokio::task::spawn_blocking(move || {
        Ok::<_, diskferry_daemon::catalog::CatalogError>((
            st.catalog.jobs(200)?,
            st.catalog.captures()?,
            st.catalog.schedules()?,
            st.catalog.group_names()?,
        ))
    })
    .await??;
    let body = html! {
        h1 { "Jobs" }
        h2 { "Capture a disk" }
        form.job method="post" action="/jobs" {
            input type="hidden" name="csrf" value=(who.csrf());
            label for="source" { "Source disk" }
            input #source name="source" required placeholder="/dev/sda@192.0.2.10:7700";
            label for="output" { "Save as" }
            input #output name="output" required placeholder="web-01.vhdx";
            label for="mode" { "Mode" }
            select #mode name="mode" {
                option value="auto" selected { "auto — files for ext4/FAT, blocks for NTFS" }
                option value="files" { "files — recreate each filesystem" }
                option value="blocks" { "blocks — used clusters only" }
                option value="sectors" { "sectors — every non-zero sector" }
            }
            label for="incremental" { "Chain" }
            select #incremental name="incremental" {
                option value="full" selected { "full capture" }
                option value="auto" { "incremental on the latest capture of this disk with a chunk map" }
            }
            label.check { input type="checkbox" name="verify" value="1" checked; " Verify afterwards" }
            (when_fields())
            button type="submit" { "Start capture" }
            p.hint { "The client must hold the key in DATA_DIR/agent.key. The output's extension (.vhdx, .vhd, .vmdk, .qcow2, .img) sets the format." }
        }
        h2 { "Deploy a capture" }
        @if captures.is_empty() {
            p.empty { "No captures to deploy yet." }
        } @else {
            form.job method="post" action="/jobs" {
                (deploy_head(&who, "deploy", "image", &captures))
                label for="target" { "Target disk" }
                input #target name="target" required placeholder="web-01, /dev/sda@web-01 or /dev/sda@192.0.2.10:7700";
                (deploy_mode("deploy-mode"))
                (boot_checkboxes())
                label.check { input type="checkbox" name="reboot" value="1"; " Reboot the machine when done" }
                label.check { input type="checkbox" name="force" value="1"; " Deploy even if the compatibility check refuses (firmware, storage drivers)" }
                label for="target-hardware" { "Target hardware" }
                select #target-hardware name="target_hardware" {
                    option value="" selected { "as captured" }
                    option value="virtio" { "virtio (KVM, QEMU, Proxmox)" }
                    option value="ahci" { "AHCI (SATA)" }
                    option value="nvme" { "NVMe" }
                    option value="hyperv" { "Hyper-V" }
                    option value="vmware" { "VMware" }
                }
                label for="customize" { "Customization (optional TOML SPEC)" }
                textarea #customize name="customize" rows="6" spellcheck="false" placeholder="hostname = \"{name}\"\nmachine_id = \"new\"\nssh_host_keys = \"regenerate\"" {}
                (when_fields())
                button type="submit" { "Deploy" }
                p.hint { "Everything on the target disk is replaced. The partition table is scaled to the target; a disk too small is refused before anything is written. The result is verified by reading it back. A customization gives the deployed Linux system its own host name ({name} is the machine's registered name), machine-id, SSH host keys, users, files, network and first-boot commands (README \"Customization\"); a bad SPEC is refused before anything is written." }
            }
        }
        @if !captures.is_empty() { (multicast_form(&who, &captures, &groups)) }
        @if !captures.is_empty() { (live_form(&who, &captures)) }
        h2 #schedules { "Schedules" }
        @if schedules.is_empty() { p.empty { "No recurring jobs." } } @else {
            div.scroll { table.list {
                thead { tr { th { "#" } th { "Kind" } th { "What" } th { "Every" } th { "Next" } th { "Last job" } th {} } }
                tbody {
                    @for sc in &schedules {
                        tr {
                            td { (sc.id) }
                            td { (sc.kind) }
                            td { (schedule_what(&sc.request)) }
                            td { (sc.every) }
                            td.schedule-next { (diskferry_daemon::jobs::show_time(sc.next_at)) }
                            td { @if let Some(j) = sc.last_job.filter(|j| *j > 0) { a href=(format!("/jobs/{j}")) { (j) } } }
                            td { form method="post" action=(format!("/schedules/{}/delete", sc.id)) {
                                input type="hidden" name="csrf" value=(who.csrf());
                                button.danger type="submit" { "Delete" }
                            } }
                        }
                    }
                }
            } }
        }
        h2 { "History" }
        @if jobs.is_empty() { p.empty { "No jobs yet." } } @else {
            div.scroll { table.list {
                thead { tr { th { "#" } th { "Kind" } th { "What" } th { "State" } th { "Started" } } }
                tbody {
                    @for j in &jobs {
                        tr {
                            td { a href=(format!("/jobs/{}", j.id)) { (j.id) } }
                            td { (j.kind) }
                            td { (j.params["source"].as_str().unwrap_or("")) " → " (j.params["output"].as_str().unwrap_or("")) }
                            td {
                                span class=(format!("state {}", j.state.name())) { (j.state.name()) }
                                @if let Some(live) = j.params["live"].as_str() { " " span.live { "live: " (live) } }
                                @if j.waiting { " " span.hint { (waiting_note(j)) } }
                            }
                            td { (date(j.created_at)) }
                        }
                    }
                }
            } }
        }
    };
    Ok(Html(page("Jobs", "Jobs", Some(&who), body).into_string()))
}

async fn start(
    State(state): State<SharedState>,
    Form(form): Form<std::collections::HashMap<String, String>>,
) -> Result<Response, PageFailure> {
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    let nonempty = |k: &str| Some(field(k).trim().to_string()).filter(|v| !v.is_empty());
    let kind = nonempty("kind").unwrap_or_else(|| "capture".into());
    // The deploy forms carry the two boot checkboxes (unchecked ones are not sent).
    let writes = kind == "deploy" || kind == "multicast";
    let live = kind == "live";
    let req = JobRequest {
        kind,
        source: nonempty("source"),
        output: nonempty("output"),
        image: nonempty("image"),
        target: nonempty("target"),
        mode: nonempty("mode"),
        verify: form.contains_key("verify"),
        reboot: form.contains_key("reboot"),
        force: form.contains_key("force"),
        base: nonempty("base"),
        incremental: nonempty("incremental"),
        chunk_map: None,
        customize: nonempty("customize"),
        target_hardware: nonempty("target_hardware"),
        at: nonempty("at"),
        wake: None,
        wait_minutes: None,
        targets: nonempty("targets").map(|t| {
            t.split([',', ' ', '\n'])
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        }),
        group: nonempty("group"),
        max_rate_mbit: nonempty("max_rate_mbit")
            .map(|r| parse_number("max rate", &r))
            .transpose()?,
        fallback_loader: writes.then(|| form.contains_key("fallback_loader")),
        boot_entry: writes.then(|| form.contains_key("boot_entry")),
        live_size_mib: nonempty("live_size_mib")
            .map(|m| parse_number("live file size", &m))
            .transpose()?,
        live_wait_minutes: nonempty("live_wait_minutes")
            .map(|m| parse_number("minutes to wait", &m))
            .transpose()?,
        live_keep_old: live.then(|| form.contains_key("live_keep_old")),
    };
    if let Some(every) = nonempty("every") {
        state.jobs.add_schedule(&req, &every)?;
        return Ok(Redirect::to("/jobs#schedules").into_response());
    }
    let id = state.jobs.start(req)?;
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

async fn delete_schedule(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, PageFailure> {
    let id: i64 = parse_number("schedule id", &id)?;
    let st = Arc::clone(&state);
    tokio::task::spawn_blocking(move || st.catalog.delete_schedule(id)).await??;
    Ok(Redirect::to("/jobs#schedules").into_response())
}

/// What a scheduled request reads or writes.
fn schedule_what(req: &serde_json::Value) -> String {
    let s = |k: &str| req[k].as_str().unwrap_or("").to_string();
    match req["kind"].as_str() {
        Some("deploy") => format!("{} → {}", s("image"), s("target")),
        Some("live") => format!("{} → {} (live)", s("image"), s("target")),
        Some("multicast") => match req["group"].as_str() {
            Some(g) => format!("{} → group {g} (multicast)", s("image")),
            None => format!(
                "{} → {} (multicast)",
                s("image"),
                req["targets"]
                    .as_array()
                    .map(|t| t
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            ),
        },
        _ => format!("{} → {}", s("source"), s("output")),
    }
}

/// Why a waiting job waits, in a few words.
fn waiting_note(j: &diskferry_daemon::catalog::JobRecord) -> String {
    let now = diskferry_daemon::catalog::unix_now();
    match (j.not_before, j.params["waiting_for"].as_str()) {
        (Some(t), _) if t > now => format!("until {}", diskferry_daemon::jobs::show_time(t)),
        (_, Some(m)) => match j.woken_at {
            Some(_) => format!("for {m} (woken)"),
            None => format!("for {m}"),
        },
        _ => "to start".into(),
    }
}

async fn detail(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
) -> Result<Html<String>, PageFailure> {
    let id: i64 = parse_number("job id", &id)?;
    let st = Arc::clone(&state);
    let job = tokio::task::spawn_blocking(move || st.catalog.job(id))
        .await??
        .ok_or_else(|| Failure::not_found(format!("no job with id {id}")))?;
    let p = job.progress.clone().unwrap_or_default();
    let (done, total) = match (p["overall_done"].as_u64(), p["overall_total"].as_u64()) {
        (Some(d), Some(t)) => (d, t),
        _ => (
            p["done"].as_u64().unwrap_or(0),
            p["total"].as_u64().unwrap_or(0),
        ),
    };
    let pct = if job.state.name() == "succeeded" {
        100.0
    } else if total > 0 {
        100.0 * done as f64 / total as f64
    } else {
        0.0
    };
    let running = !job.state.is_final();
    let body = html! {
        @if running { noscript { meta http-equiv="refresh" content="2"; } }
        p.crumbs { a href="/jobs" { "Jobs" } " / " (job.id) }
        h1 { "Job " (job.id) ": " (job.kind) }
        dl.facts {
            dt { "Source" } dd.mono { (job.params["source"].as_str().unwrap_or("")) }
            dt { "Output" } dd.mono { (job.params["output"].as_str().unwrap_or("")) }
            dt { "Mode" } dd { (job.params["mode"].as_str().unwrap_or("")) }
            dt { "State" } dd { span #job-state class=(format!("state {}", job.state.name())) { (job.state.name()) } }
            @if let Some(live) = job.params["live"].as_str() {
                dt { "Live deploy" } dd #job-live { (live) }
            }
            @if let Some(r) = &job.result {
                dt { "Result" } dd { (r["summary"].as_str().unwrap_or("")) }
                @if let Some(why) = r["fallback"].as_str() {
                    dt { "Base not used" } dd { (why) }
                }
            }
        }
        div #job data-job=(job.id) data-running=(running) {
            progress #job-progress max="100" value=(format!("{pct:.1}")) { (format!("{pct:.0}")) "%" }
            p #job-figures {
                span #job-percent { (format!("{pct:.1}")) " %" } " · "
                span #job-phase { (p["phase"].as_str().unwrap_or("")) } " · "
                span #job-rate { (human_bytes(p["rate"].as_f64().unwrap_or(0.0) as u64)) "/s" } " · ETA "
                span #job-eta { (p["eta_s"].as_f64().map(|s| format!("{s:.0} s")).unwrap_or_else(|| "—".into())) }
                @if let (Some(fd), Some(ft)) = (p["files_done"].as_u64(), p["files_total"].as_u64()) {
                    " · " span #job-files { (fd) "/" (ft) " files" }
                }
            }
        }
        @if let Some(ms) = machines_of(&job) { (machines_table(ms)) }
        @if let Some(e) = &job.error { p.error #job-error { (e) } }
        @if running {
            form #job-cancel method="post" action=(format!("/jobs/{}/cancel", job.id)) {
                input type="hidden" name="csrf" value=(who.csrf());
                button.danger type="submit" { "Cancel" }
            }
        }
        h2 { "Log" }
        pre #job-log .log data-lines=(job.log.lines().count()) { (job.log) }
        @if job.state.name() == "succeeded" {
            p { a href="/captures" { "See it among the captures" } }
        }
    };
    Ok(Html(
        page(&format!("Job {}", job.id), "Jobs", Some(&who), body).into_string(),
    ))
}

async fn cancel(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, PageFailure> {
    let id: i64 = parse_number("job id", &id)?;
    state.jobs.cancel(id);
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

/// A multicast job's machines: from its result once it ended, else its latest progress.
fn machines_of(job: &diskferry_daemon::catalog::JobRecord) -> Option<&Vec<serde_json::Value>> {
    job.result
        .as_ref()
        .and_then(|r| r["machines"].as_array())
        .or_else(|| job.progress.as_ref().and_then(|p| p["machines"].as_array()))
}

/// One row per machine of a multicast job: its phase, progress, how its data came, errors.
/// `app.js` updates it from the live events.
fn machines_table(machines: &[serde_json::Value]) -> maud::Markup {
    html! {
        h2 { "Machines" }
        div.scroll { table.list #job-machines {
            thead { tr { th { "Machine" } th { "Phase" } th { "Progress" } th { "Delivery" } th { "Error" } } }
            tbody {
                @for m in machines {
                    @let (done, total) = (m["done"].as_u64().unwrap_or(0), m["total"].as_u64().unwrap_or(0));
                    @let pct = if total > 0 { 100.0 * done as f64 / total as f64 } else { 0.0 };
                    tr data-machine=(m["name"].as_str().unwrap_or("")) {
                        td.mono { (m["name"].as_str().unwrap_or("")) }
                        td.phase { span class=(format!("state {}", m["phase"].as_str().unwrap_or(""))) { (m["phase"].as_str().unwrap_or("")) } }
                        td { progress max="100" value=(format!("{pct:.1}")) { (format!("{pct:.0}")) "%" } }
                        td.delivery { (m["delivery"].as_str().unwrap_or("")) }
                        td.error { (m["error"].as_str().unwrap_or("")) }
                    }
                }
            }
        } }
    }
}
