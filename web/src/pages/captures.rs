//! Capture pages: the list (search and filters, each capture's chain relation), one capture
//! (its chain: base, children, what changed; partition layout and allocated vs virtual size
//! as proportional bars, partitions; delete), the file browser inside a partition, a
//! file's view (text inline), and the comparison of two captures.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use diskferry_daemon::catalog::Relation;
use diskferry_imaging::vmconfig::{Firmware, VmConfig};
use maud::{html, Markup};

use super::layout::{bar, date, encode_query, human_bytes, page};
use crate::api::{self, CaptureFilter, CaptureSummary, ChainLink};
use crate::auth::Identity;
use crate::browse;
use crate::error::PageFailure;
use crate::innerpath::InnerPath;
use crate::SharedState;

/// Bytes of a file shown inline at most.
const VIEW_LIMIT: usize = 256 << 10;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/captures", get(list))
        .route("/captures/{id}", get(detail))
        .route("/captures/{id}/delete", post(delete))
        .route("/captures/{id}/p/{n}/browse", get(browse_dir))
        .route("/captures/{id}/p/{n}/view", get(view))
        .route("/compare", get(compare))
}

type PageResult = Result<Html<String>, PageFailure>;

fn render(title: &str, who: &Identity, body: Markup) -> PageResult {
    Ok(Html(page(title, "Captures", Some(who), body).into_string()))
}

fn filesystems(c: &CaptureSummary) -> String {
    let mut v: Vec<&str> = c
        .partitions
        .iter()
        .map(|p| p.filesystem.as_str())
        .filter(|f| *f != "unknown")
        .collect();
    v.dedup();
    v.join(", ")
}

async fn list(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
    Query(raw): Query<HashMap<String, String>>,
) -> PageResult {
    // Form fields arrive as text (empty when unset); sizes are typed in GiB.
    let text = |k: &str| raw.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let gib = |k: &str| {
        text(k)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|g| (g * (1u64 << 30) as f64) as u64)
    };
    let day = |k: &str| text(k).and_then(|v| parse_day(&v));
    let filter = CaptureFilter {
        q: text("q"),
        os: text("os"),
        fs: text("fs"),
        machine: text("machine"),
        min_size: gib("min_gib"),
        max_size: gib("max_gib"),
        since: day("since"),
        until: day("until").map(|d| d + 86_400),
    };
    let all = api::filtered_captures(&state, &CaptureFilter::default()).await?;
    let shown: Vec<&CaptureSummary> = all.iter().filter(|c| filter.matches(c)).collect();
    let mut fs_names: Vec<&str> = all
        .iter()
        .flat_map(|c| c.partitions.iter().map(|p| p.filesystem.as_str()))
        .filter(|f| *f != "unknown")
        .collect();
    fs_names.sort();
    fs_names.dedup();
    let value = |k: &str| raw.get(k).cloned().unwrap_or_default();
    let body = html! {
        h1 { "Captures" }
        form.filters method="get" action="/captures" role="search" {
            input type="search" name="q" value=(value("q")) placeholder="Search names, OS, labels, machines" aria-label="Search";
            input name="os" value=(value("os")) placeholder="OS" aria-label="Operating system";
            select name="fs" aria-label="Filesystem" {
                option value="" { "any filesystem" }
                @for f in &fs_names {
                    option value=(f) selected[value("fs") == *f] { (f) }
                }
            }
            input name="machine" value=(value("machine")) placeholder="Source machine" aria-label="Source machine";
            input type="number" step="any" min="0" name="min_gib" value=(value("min_gib")) placeholder="min GiB" aria-label="Minimum size in GiB";
            input type="number" step="any" min="0" name="max_gib" value=(value("max_gib")) placeholder="max GiB" aria-label="Maximum size in GiB";
            input type="date" name="since" value=(value("since")) aria-label="Modified since";
            input type="date" name="until" value=(value("until")) aria-label="Modified until";
            button type="submit" { "Filter" }
        }
        @if all.is_empty() {
            p.empty { "No captures yet. Start one from " a href="/jobs" { "Jobs" } ", or put VHDX, VHD, VMDK, qcow2 or .img files in DATA_DIR/captures." }
        } @else if shown.is_empty() {
            p.empty { "No capture matches these filters." }
        } @else {
            div.scroll { table.list {
                thead { tr { th { "Name" } th { "OS" } th { "Filesystems" } th.num { "Size" } th.num { "On disk" } th { "Modified" } th { "Machine" } th { "Chain" } } }
                tbody {
                    @for c in &shown {
                        tr {
                            td { a href=(format!("/captures/{}", c.id)) { (c.name) } " " span.tag { (c.format) } }
                            td { (c.os.as_deref().unwrap_or("")) }
                            td { (filesystems(c)) }
                            td.num { (human_bytes(c.virtual_size)) }
                            td.num { (human_bytes(c.allocated_size)) }
                            td { (date(c.modified)) }
                            td { (c.source_machine.as_deref().unwrap_or("")) }
                            td { (chain_cell(c)) }
                        }
                    }
                }
            } }
        }
        @if all.len() >= 2 {
            h2 { "Compare two captures" }
            form.filters method="get" action="/compare" {
                @for (name, label) in [("a", "Before"), ("b", "After")] {
                    select name=(name) aria-label=(label) {
                        @for c in &all { option value=(c.id) { (c.name) } }
                    }
                }
                input type="number" name="partition" min="1" value="1" aria-label="Partition number";
                button type="submit" { "Compare" }
            }
        }
    };
    render("Captures", &who, body)
}

/// The chain relation in a list row: "overlay on X" / "files from X" and how many captures
/// build on this one.
fn chain_cell(c: &CaptureSummary) -> Markup {
    html! {
        @if let Some(b) = &c.base {
            span.hint title=(format!("depth {}", c.chain.len())) {
                @if b.relation == Some(Relation::Overlay) { "↳ overlay on " } @else { "↳ files from " }
            }
            (chain_link(b))
        }
        @if !c.children.is_empty() {
            @if c.base.is_some() { br; }
            span.hint { "base of " (c.children.len()) }
        }
    }
}

async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, PageFailure> {
    api::delete_by_id(&state, &id).await?;
    Ok(Redirect::to("/captures").into_response())
}

/// Days since the epoch × 86400 for `YYYY-MM-DD`.
fn parse_day(s: &str) -> Option<i64> {
    let mut it = s.trim().splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(diskferry_fs::Timestamp::from_civil(y, m, d, 0, 0).secs)
}

async fn detail(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
    Path(id): Path<String>,
) -> PageResult {
    let (c, s) = api::capture_summary(&state, &id).await?;
    let vm = match state.nbd.get().cloned() {
        Some(nbd) => {
            let (st, rec) = (std::sync::Arc::clone(&state), c.clone());
            let vm = tokio::task::spawn_blocking(move || {
                diskferry_daemon::exports::vm_for(&st.catalog, &rec, &nbd)
            });
            Some(
                vm.await
                    .map_err(|e| crate::error::Failure::internal(e.to_string()))?,
            )
        }
        None => None,
    };
    let size = s.virtual_size.max(1) as f64;
    // The layout: partitions in disk order, unpartitioned gaps between them.
    let mut parts: Vec<_> = s.partitions.iter().collect();
    parts.sort_by_key(|p| p.start);
    let mut segments = Vec::new();
    let mut at = 0u64;
    for p in &parts {
        if p.start > at {
            segments.push((
                (p.start - at) as f64 / size,
                "free",
                format!("free {}", human_bytes(p.start - at)),
            ));
        }
        segments.push((
            p.size as f64 / size,
            fs_class(&p.filesystem),
            format!("{} {} {}", p.number, p.filesystem, human_bytes(p.size)),
        ));
        at = at.max(p.start + p.size);
    }
    if s.virtual_size > at {
        segments.push((
            (s.virtual_size - at) as f64 / size,
            "free",
            format!("free {}", human_bytes(s.virtual_size - at)),
        ));
    }
    let alloc = [(
        s.allocated_size as f64 / size,
        "used",
        format!("allocated {}", human_bytes(s.allocated_size)),
    )];
    let body = html! {
        p.crumbs { a href="/captures" { "Captures" } " / " (s.name) }
        h1 { (s.name) }
        dl.facts {
            dt { "Format" } dd { (s.format) }
            dt { "Virtual size" } dd { (human_bytes(s.virtual_size)) }
            dt { "On the server's disk" } dd { (human_bytes(s.allocated_size)) " (" (format!("{:.1}", 100.0 * s.allocated_size as f64 / size)) " % of the virtual size)" }
            dt { "Modified" } dd { (date(s.modified)) }
            @if let Some(os) = &s.os { dt { "Operating system" } dd { (os) } }
            @if let Some(m) = &s.source_machine { dt { "Captured from" } dd { (m) } }
            @if let Some(a) = &c.analysis { dt { "Partition table" } dd { (a.table) } }
        }
        @if let Some(e) = &s.analysis_error { p.error { "This image could not be analysed: " (e) } }
        (chain_section(&s, &who))
        (run_section(vm.as_ref(), s.id))
        @if let Some(a) = &c.analysis { (hardware_section(a)) }
        h2 { "Layout" }
        (bar(&segments))
        h2 { "Allocated vs virtual size" }
        (bar(&alloc))
        h2 { "Partitions" }
        div.scroll { table.list {
            thead { tr { th { "#" } th { "Type" } th { "Filesystem" } th { "Label" } th.num { "Size" } th.num { "Used" } th {} } }
            tbody {
                @for p in &s.partitions {
                    tr {
                        td { (p.number) }
                        td { (p.type_name) }
                        td { span class=(format!("swatch {}", fs_class(&p.filesystem))) {} (p.filesystem) }
                        td { (p.label.as_deref().unwrap_or("")) }
                        td.num { (human_bytes(p.size)) }
                        td.num { (p.used_bytes.map(human_bytes).unwrap_or_default()) }
                        td {
                            @if browsable(&p.filesystem) {
                                a href=(format!("/captures/{}/p/{}/browse?path=/", s.id, p.number)) { "Browse files" }
                            }
                            @if let Some(note) = &p.note { " " span.hint { (note) } }
                        }
                    }
                }
            }
        } }
    };
    render(&s.name, &who, body)
}

/// What moving each Linux system of the capture to other hardware depends on: the drivers
/// its initramfs holds, its network tool and MAC pins, how it names its root.
fn hardware_section(a: &diskferry_imaging::inspect::DiskReport) -> Markup {
    let systems: Vec<_> = a
        .partitions
        .iter()
        .filter_map(|p| Some((p.number, p.os.as_ref()?.system.as_ref()?)))
        .collect();
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    };
    html! {
        @if !systems.is_empty() {
            h2 { "Hardware it depends on" }
            @for (number, sys) in systems {
                dl.facts {
                    @for r in &sys.initramfs {
                        dt { "Initramfs " (r.kernel) } dd {
                            @match &r.error {
                                Some(e) => { "unreadable: " (e) }
                                None => { (r.builder) ", " (r.compression) ". Storage drivers: " (list(&r.storage_drivers)) ". Network drivers: " (list(&r.network_drivers)) "." }
                            }
                        }
                    }
                    dt { "Network (partition " (number) ")" } dd {
                        (sys.network_tool) @if sys.mac_pinned.is_empty() { ", not pinned to MAC addresses" } @else { ", pinned to MAC addresses in " (sys.mac_pinned.join(", ")) }
                    }
                    dt { "Root named by" } dd { "fstab: " (sys.root_in_fstab.as_deref().unwrap_or("-")) ", boot menu: " (sys.root_in_boot_menu.as_deref().unwrap_or("-")) }
                }
            }
            p.hint { "To run it on other hardware, deploy, export or customize it with --target-hardware virtio|ahci|nvme|hyperv|vmware: missing drivers are added to the initramfs, device-name roots become UUIDs and MAC pins are lifted (README \"Moving a system to other hardware\")." }
        }
    }
}

/// "Run it": the capture's NBD URL on this server, a qemu command line and a libvirt domain,
/// so it boots without being restored (the VM's writes stay in qemu's temporary overlay).
fn run_section(vm: Option<&VmConfig>, id: i64) -> Markup {
    html! {
        h2 { "Run it" }
        @match vm {
            None => p.hint { "This server exports no captures over NBD (it runs with --nbd-listen off)." },
            Some(vm) => {
                @if let Some(url) = vm.disk.nbd_url() {
                    dl.facts {
                        dt { "NBD" } dd.mono { (url) }
                        dt { "Firmware" } dd { (match vm.firmware { Firmware::Uefi => "UEFI (the disk has an EFI System Partition)", Firmware::Bios => "BIOS" }) }
                    }
                }
                p.hint { "On this server (the export listens on loopback; elsewhere, tunnel the port with ssh -L). qemu's -snapshot keeps the VM's writes out of the capture." }
                pre.mono.run { (vm.qemu_command()) }
                details {
                    summary { "libvirt domain XML (virsh define)" }
                    pre.mono.run { (vm.libvirt_xml()) }
                }
                p { a href=(format!("/api/captures/{id}/vm")) { "As JSON" } }
            }
        }
    }
}

/// A link to a capture in a chain (plain text when it left the catalog).
fn chain_link(l: &ChainLink) -> Markup {
    html! {
        @match l.id {
            Some(id) => a href=(format!("/captures/{id}")) { (l.name) },
            None => span.mono { (l.name) " (no longer in the catalog)" },
        }
    }
}

/// "overlay on X" or "files taken from X", for how a capture uses its base.
fn relation_words(r: Option<Relation>) -> &'static str {
    match r {
        Some(Relation::Overlay) => "overlay on ",
        _ => "files taken from ",
    }
}

/// The capture's chain: its base and how it uses it, the chain to the root, what changed,
/// the captures built on it, and the delete button (refused while overlays need it).
fn chain_section(s: &CaptureSummary, who: &Identity) -> Markup {
    html! {
        h2 { "Chain" }
        dl.facts {
            dt { "Base" }
            dd {
                @match &s.base {
                    Some(b) => { (relation_words(b.relation)) (chain_link(b)) }
                    None => "none: a full capture",
                }
            }
            @if s.chain.len() > 1 {
                dt { "Chain to the root" } dd { (s.name) @for n in &s.chain { " → " (n) } }
            }
            @if let Some(i) = &s.incremental {
                dt { "Changed since the base" }
                dd {
                    (i["changed_chunks"].as_u64().unwrap_or(0)) " of " (i["chunks"].as_u64().unwrap_or(0)) " chunks ("
                    (human_bytes(i["changed_bytes"].as_u64().unwrap_or(0))) ")"
                    @if let Some(r) = i["reused_bytes"].as_u64().filter(|r| *r > 0) {
                        "; " (human_bytes(r)) " of unchanged files taken from the base"
                    }
                }
            }
            dt { "Chunk map" }
            dd {
                @if s.chunk_map {
                    "yes (" (s.layout.as_deref().unwrap_or("")) "): the next capture of this disk can be incremental on this one"
                } @else { "none: the next capture of this disk is a full one" }
            }
            dt { "Built on this one" }
            dd {
                @if s.children.is_empty() { "nothing" }
                @for (i, c) in s.children.iter().enumerate() {
                    @if i > 0 { ", " }
                    (chain_link(c)) " (" (relation_words(c.relation).trim_end()) " this)"
                }
            }
        }
        @let overlays: Vec<&ChainLink> = s.children.iter().filter(|c| c.relation == Some(Relation::Overlay)).collect();
        @if overlays.is_empty() {
            form.inline method="post" action=(format!("/captures/{}/delete", s.id)) {
                input type="hidden" name="csrf" value=(who.csrf());
                button.danger type="submit" { "Delete this capture" }
            }
        } @else {
            p.hint { "This capture cannot be deleted while overlays read through it (delete those first). Captures that took files from it do not need it." }
        }
    }
}

fn browsable(fs: &str) -> bool {
    matches!(
        fs,
        "ext2" | "ext3" | "ext4" | "fat12" | "fat16" | "fat32" | "ntfs"
    )
}

fn fs_class(fs: &str) -> &'static str {
    match fs {
        "ext2" | "ext3" | "ext4" => "fs-ext",
        "fat12" | "fat16" | "fat32" | "exfat" => "fs-fat",
        "ntfs" => "fs-ntfs",
        "swap" => "fs-swap",
        _ => "fs-other",
    }
}

/// `Captures / name / p2 / etc / ssh` with each level a link.
fn crumbs(c: &CaptureSummary, n: &str, path: &InnerPath) -> Markup {
    let base = format!("/captures/{}/p/{n}/browse?path=", c.id);
    html! {
        nav.crumbs aria-label="Location" {
            a href="/captures" { "Captures" } " / "
            a href=(format!("/captures/{}", c.id)) { (c.name) } " / "
            a href=(format!("{base}/")) { "partition " (n) }
            @for (i, part) in path.components().iter().enumerate() {
                " / "
                @let sub = format!("/{}", path.components()[..=i].join("/"));
                a href=(format!("{base}{}", encode_query(&sub))) { (part) }
            }
        }
    }
}

async fn browse_dir(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
    Path((id, n)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let path = api::path_param(&q)?;
    let (c, fs) = api::open_partition(&state, &id, &n).await?;
    let p = path.clone();
    let entries = tokio::task::spawn_blocking(move || browse::list(&*fs, &p)).await??;
    let s = CaptureSummary::of(&c, &[]);
    let link = |e: &browse::Entry| {
        let sub = encode_query(&path.join(&e.name).as_string());
        match e.kind {
            "dir" => Some(format!("/captures/{}/p/{n}/browse?path={sub}", c.id)),
            "file" | "symlink" => Some(format!("/captures/{}/p/{n}/view?path={sub}", c.id)),
            _ => None,
        }
    };
    let tar = format!(
        "/api/captures/{}/partitions/{n}/tar?path={}",
        c.id,
        encode_query(&path.as_string())
    );
    let body = html! {
        (crumbs(&s, &n, &path))
        h1 { (path.as_string()) }
        p.actions { a href=(tar) download { "Download this directory (.tar)" } " · " (entries.len()) " entries" }
        div.scroll { table.files data-keynav {
            thead { tr { th { "Name" } th.num { "Size" } th { "Modified" } th { "Permissions" } th { "Owner" } } }
            tbody {
                @if !path.is_root() {
                    tr { td colspan="5" { a.up href=(format!("/captures/{}/p/{n}/browse?path={}", c.id, encode_query(&path.parent().as_string()))) { "⬑ .." } } }
                }
                @for e in &entries {
                    tr class=(format!("k-{}", e.kind)) {
                        td.name {
                            @match link(e) {
                                Some(href) => a href=(href) { (e.name) @if e.kind == "dir" { "/" } },
                                None => span { (e.name) },
                            }
                            @if let Some(t) = &e.target { span.target { " → " (t) } }
                        }
                        td.num { @if e.kind != "dir" { (human_bytes(e.size)) } }
                        td { (e.mtime.map(date).unwrap_or_default()) }
                        td.mono { (kind_letter(e.kind)) (e.permissions) }
                        td.mono { (e.uid) ":" (e.gid) }
                    }
                }
            }
        } }
    };
    render(&format!("{} — {}", path.as_string(), s.name), &who, body)
}

fn kind_letter(kind: &str) -> char {
    match kind {
        "dir" => 'd',
        "symlink" => 'l',
        "char-device" => 'c',
        "block-device" => 'b',
        "fifo" => 'p',
        "socket" => 's',
        _ => '-',
    }
}

async fn view(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
    Path((id, n)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let path = api::path_param(&q)?;
    let (c, fs) = api::open_partition(&state, &id, &n).await?;
    let p = path.clone();
    let (size, head) = tokio::task::spawn_blocking(move || {
        let (node, size) = browse::file(&*fs, &p)?;
        let mut head = vec![0u8; VIEW_LIMIT.min(size as usize)];
        let got = browse::read_full(&*fs, node, 0, &mut head)?;
        head.truncate(got);
        Ok::<_, crate::error::Failure>((size, head))
    })
    .await??;
    let s = CaptureSummary::of(&c, &[]);
    let download = format!(
        "/api/captures/{}/partitions/{n}/file?path={}",
        c.id,
        encode_query(&path.as_string())
    );
    let text = browse::looks_like_text(&head).then(|| String::from_utf8_lossy(&head).into_owned());
    let body = html! {
        (crumbs(&s, &n, &path))
        h1 { (path.file_name()) }
        p.actions { (human_bytes(size)) " · " a href=(download) download { "Download" } }
        @match text {
            Some(t) => {
                pre.file { (t) }
                @if (size as usize) > head.len() { p.hint { "Showing the first " (human_bytes(head.len() as u64)) "." } }
            },
            None => p.hint { "Binary file: download it to look inside." },
        }
    };
    render(&format!("{} — {}", path.file_name(), s.name), &who, body)
}

async fn compare(
    State(state): State<SharedState>,
    Extension(who): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
) -> PageResult {
    let result = api::compare_captures(&state, &q).await?;
    let name = |k: &str| q.get(k).cloned().unwrap_or_default();
    let a = api::capture_by_id(&state, &name("a")).await?;
    let b = api::capture_by_id(&state, &name("b")).await?;
    let section = |title: &str, class: &str, items: &[String]| {
        html! {
            h2 { (title) " (" (items.len()) ")" }
            @if items.is_empty() { p.empty { "None." } } @else {
                ul class=(format!("paths {class}")) { @for i in items.iter().take(5000) { li.mono { (i) } } }
            }
        }
    };
    let body = html! {
        p.crumbs { a href="/captures" { "Captures" } " / compare" }
        h1 { (a.name) " → " (b.name) ", partition " (q.get("partition").map_or("1", String::as_str)) }
        @if result.truncated { p.hint { "The trees are very large: only part of them was compared." } }
        (section("Added", "added", &result.added))
        (section("Removed", "removed", &result.removed))
        (section("Changed", "changed", &result.changed))
    };
    render("Compare", &who, body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn days_parse() {
        assert_eq!(super::parse_day("1970-01-02"), Some(86_400));
        assert_eq!(super::parse_day("2026-13-01"), None);
        assert_eq!(super::parse_day("x"), None);
    }
}
