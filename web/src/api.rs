//! The JSON API under `/api` (described in `openapi.json`, served at `/api/openapi.json`):
//! captures and their analysis, directory listings and file bytes inside a capture's
//! partition, a directory as a tar stream, comparing two captures, jobs (start, follow with
//! server-sent events, cancel) and machines.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use diskferry_daemon::catalog::CaptureRecord;
use diskferry_fs::{FileKind, Filesystem, NodeId};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::browse;
use crate::error::Failure;
use crate::innerpath::InnerPath;
use crate::jobs::JobRequest;
use crate::SharedState;

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");
/// Bytes per chunk when streaming a file.
const CHUNK: usize = 1 << 20;
/// Entries compared per side at most.
const COMPARE_LIMIT: usize = 500_000;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/captures", get(list_captures))
        .route("/captures/{id}", get(get_capture))
        .route("/captures/{id}/partitions/{n}/dir", get(dir))
        .route("/captures/{id}/partitions/{n}/file", get(file))
        .route("/captures/{id}/partitions/{n}/tar", get(tar))
        .route("/compare", get(compare))
        .route("/jobs", get(list_jobs).post(start_job))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/events", get(job_events))
        .route("/machines", get(machines))
        .route("/machines/{key}/name", post(name_machine))
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
}

impl CaptureSummary {
    pub fn of(r: &CaptureRecord) -> CaptureSummary {
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
                })
                .collect(),
            analysis_error: r.analysis_error.clone(),
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
        .map(CaptureSummary::of)
        .filter(|c| filter.matches(c))
        .collect())
}

async fn list_captures(
    State(state): State<SharedState>,
    Query(filter): Query<CaptureFilter>,
) -> Result<Json<Vec<CaptureSummary>>, Failure> {
    Ok(Json(filtered_captures(&state, &filter).await?))
}

async fn get_capture(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let c = capture_by_id(&state, &id).await?;
    let mut body = serde_json::to_value(CaptureSummary::of(&c))
        .map_err(|e| Failure::internal(e.to_string()))?;
    body["analysis"] = serde_json::to_value(&c.analysis).unwrap_or_default();
    Ok(Json(body).into_response())
}

/// The `path` query parameter, checked.
pub fn path_param(q: &HashMap<String, String>) -> Result<InnerPath, Failure> {
    InnerPath::parse(q.get("path").map_or("/", String::as_str))
}

/// Opens partition `n` of capture `id` (blocking work on the pool).
pub async fn open_partition(
    state: &SharedState,
    id: &str,
    n: &str,
) -> Result<(CaptureRecord, Arc<dyn Filesystem>), Failure> {
    let c = capture_by_id(state, id).await?;
    let number: u32 = parse_number("partition number", n)?;
    if number == 0 {
        return Err(Failure::bad_request("partitions are numbered from 1"));
    }
    let st = Arc::clone(state);
    let rec = c.clone();
    let fs =
        tokio::task::spawn_blocking(move || st.volumes.open(&st.catalog, &rec, number)).await??;
    Ok((c, fs))
}

#[derive(Serialize)]
struct Listing {
    path: String,
    entries: Vec<browse::Entry>,
}

async fn dir(
    State(state): State<SharedState>,
    Path((id, n)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let path = path_param(&q)?;
    let (capture, fs) = open_partition(&state, &id, &n).await?;
    // A capture does not change while its size and modification time stay the same, so its
    // listings are kept (rendered) and served again.
    let key = browse::ListingKey {
        capture: capture.id,
        file_size: capture.file_size,
        modified: capture.modified,
        partition: n.clone(),
        path: path.as_string(),
    };
    let body = match state.listings.get(&key) {
        Some(body) => body,
        None => {
            let p = path.clone();
            let entries = tokio::task::spawn_blocking(move || browse::list(&*fs, &p)).await??;
            let body = Bytes::from(
                serde_json::to_vec(&Listing {
                    path: path.as_string(),
                    entries,
                })
                .map_err(|e| Failure::internal(e.to_string()))?,
            );
            state.listings.put(key, body.clone());
            body
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `attachment; filename=…` for a name that may hold anything.
fn content_disposition(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded = crate::pages::layout::encode_query(name);
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// A body fed by a blocking producer through a small channel.
fn channel_body() -> (mpsc::Sender<std::io::Result<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, Body::from_stream(stream))
}

async fn file(
    State(state): State<SharedState>,
    Path((id, n)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let path = path_param(&q)?;
    let (_, fs) = open_partition(&state, &id, &n).await?;
    let p = path.clone();
    let fs2 = Arc::clone(&fs);
    let (node, size) = tokio::task::spawn_blocking(move || browse::file(&*fs2, &p)).await??;
    let (tx, body) = channel_body();
    tokio::task::spawn_blocking(move || {
        let mut at = 0u64;
        while at < size {
            let mut buf = vec![0u8; CHUNK.min((size - at) as usize)];
            let item = browse::read_full(&*fs, node, at, &mut buf)
                .map_err(|e| std::io::Error::other(e.message));
            let stop = match &item {
                Ok(0) | Err(_) => true,
                Ok(n) => {
                    buf.truncate(*n);
                    at += *n as u64;
                    false
                }
            };
            if tx.blocking_send(item.map(|_| Bytes::from(buf))).is_err() || stop {
                break;
            }
        }
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(size)),
            (
                header::CONTENT_DISPOSITION,
                content_disposition(path.file_name()),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response())
}

/// Sends what the tar builder writes into the response, 256 KiB at a time.
struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 256 << 10 {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// A file's bytes as `Read`, for the tar builder.
struct FileReader<'a> {
    fs: &'a dyn Filesystem,
    node: NodeId,
    at: u64,
    size: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.size - self.at).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = browse::read_full(self.fs, self.node, self.at, &mut buf[..want])
            .map_err(|e| std::io::Error::other(e.message))?;
        if n == 0 {
            return Err(std::io::Error::other("file ended before its recorded size"));
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// Most entries a tar download holds.
const TAR_LIMIT: usize = 1_000_000;

/// Writes the tree under `dir` (named `prefix` in the archive) as tar entries.
fn tar_tree(
    fs: &dyn Filesystem,
    dir: NodeId,
    prefix: &str,
    out: &mut tar::Builder<ChannelWriter>,
) -> std::io::Result<()> {
    let fs_err = |e: diskferry_fs::FsError| std::io::Error::other(e.to_string());
    let mut stack = vec![(prefix.to_string(), dir, 0usize)];
    let mut count = 0;
    while let Some((path, node, depth)) = stack.pop() {
        let meta = fs.metadata(node).map_err(fs_err)?;
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode);
        h.set_uid(meta.uid.into());
        h.set_gid(meta.gid.into());
        h.set_mtime(meta.mtime.map_or(0, |t| t.secs.max(0) as u64));
        h.set_size(0);
        count += 1;
        if count > TAR_LIMIT {
            return Err(std::io::Error::other("too many entries for one archive"));
        }
        match meta.kind {
            FileKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                out.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                if depth < 256 {
                    let mut entries = fs.read_dir(node).map_err(fs_err)?;
                    entries.sort_by(|a, b| b.name.cmp(&a.name));
                    for e in entries {
                        stack.push((format!("{path}/{}", e.name_lossy()), e.node, depth + 1));
                    }
                }
            }
            FileKind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.size);
                let reader = FileReader {
                    fs,
                    node,
                    at: 0,
                    size: meta.size,
                };
                out.append_data(&mut h, &path, reader)?;
            }
            FileKind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                let target = fs.read_link(node).map_err(fs_err)?;
                out.append_link(&mut h, &path, String::from_utf8_lossy(&target).as_ref())?;
            }
            FileKind::CharDevice | FileKind::BlockDevice | FileKind::Fifo => {
                h.set_entry_type(match meta.kind {
                    FileKind::CharDevice => tar::EntryType::Char,
                    FileKind::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                if let Some((major, minor)) = meta.device {
                    h.set_device_major(major)?;
                    h.set_device_minor(minor)?;
                }
                out.append_data(&mut h, &path, std::io::empty())?;
            }
            // Sockets cannot be archived.
            FileKind::Socket => {}
        }
    }
    Ok(())
}

async fn tar(
    State(state): State<SharedState>,
    Path((id, n)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Failure> {
    let path = path_param(&q)?;
    let (capture, fs) = open_partition(&state, &id, &n).await?;
    let p = path.clone();
    let fs2 = Arc::clone(&fs);
    let node = tokio::task::spawn_blocking(move || {
        let node = fs2.resolve_within(&p.as_string())?;
        if fs2.metadata(node)?.kind != FileKind::Dir {
            return Err(Failure::bad_request(format!(
                "{} is not a directory",
                p.as_string()
            )));
        }
        Ok(node)
    })
    .await??;
    let base = if path.is_root() {
        format!(
            "{}-p{n}",
            capture.name.split('.').next().unwrap_or("capture")
        )
    } else {
        path.file_name().to_string()
    };
    let (tx, body) = channel_body();
    let prefix = base.clone();
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let mut builder = tar::Builder::new(ChannelWriter {
            tx,
            buf: Vec::new(),
        });
        builder.mode(tar::HeaderMode::Complete);
        let result = tar_tree(&*fs, node, &prefix, &mut builder)
            .and_then(|()| builder.into_inner())
            .and_then(|mut w| w.flush());
        if let Err(e) = result {
            // The client sees the download fail instead of a short archive that looks whole.
            let _ = err_tx.blocking_send(Err(e));
        }
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-tar"),
            ),
            (
                header::CONTENT_DISPOSITION,
                content_disposition(&format!("{base}.tar")),
            ),
        ],
        body,
    )
        .into_response())
}

async fn compare(
    State(state): State<SharedState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<browse::Comparison>, Failure> {
    Ok(Json(compare_captures(&state, &q).await?))
}

/// Compares partition `partition` of captures `a` and `b` (query parameters).
pub async fn compare_captures(
    state: &SharedState,
    q: &HashMap<String, String>,
) -> Result<browse::Comparison, Failure> {
    let need = |k: &str| {
        q.get(k)
            .map(String::as_str)
            .ok_or_else(|| Failure::bad_request(format!("query parameter {k} is required")))
    };
    let n = q.get("partition").map_or("1", String::as_str);
    let (_, a) = open_partition(state, need("a")?, n).await?;
    let (_, b) = open_partition(state, need("b")?, n).await?;
    tokio::task::spawn_blocking(move || browse::compare(&*a, &*b, COMPARE_LIMIT)).await?
}

async fn list_jobs(State(state): State<SharedState>) -> Result<Response, Failure> {
    let st = Arc::clone(&state);
    let jobs = tokio::task::spawn_blocking(move || st.catalog.jobs(200)).await??;
    Ok(Json(jobs).into_response())
}

async fn start_job(State(state): State<SharedState>, body: Bytes) -> Result<Response, Failure> {
    let req: JobRequest = json_body(&body, "a job (see /api/openapi.json)")?;
    let id = state.jobs.start(req)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/jobs/{id}"))],
        Json(serde_json::json!({ "id": id })),
    )
        .into_response())
}

async fn get_job(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id: i64 = parse_number("job id", &id)?;
    let st = Arc::clone(&state);
    let job = tokio::task::spawn_blocking(move || st.catalog.job(id))
        .await??
        .ok_or_else(|| Failure::not_found(format!("no job with id {id}")))?;
    Ok(Json(job).into_response())
}

async fn cancel_job(
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
            format!("job {id} is not running"),
        ))
    }
}

/// Server-sent events: the job's current record, then each progress event as it happens,
/// ending with the final state.
async fn job_events(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    let id: i64 = parse_number("job id", &id)?;
    let st = Arc::clone(&state);
    let job = tokio::task::spawn_blocking(move || st.catalog.job(id))
        .await??
        .ok_or_else(|| Failure::not_found(format!("no job with id {id}")))?;
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

/// Machines with whether each is connected now.
pub async fn machine_list(state: &SharedState) -> Result<Vec<serde_json::Value>, Failure> {
    let st = Arc::clone(state);
    let list = tokio::task::spawn_blocking(move || st.catalog.machines()).await??;
    let online = state.agents.online();
    Ok(list
        .into_iter()
        .map(|m| {
            let mut v = serde_json::to_value(&m).unwrap_or_default();
            v["online"] = online.contains(&m.id).into();
            v
        })
        .collect())
}

async fn machines(State(state): State<SharedState>) -> Result<Response, Failure> {
    Ok(Json(machine_list(&state).await?).into_response())
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

/// A JSON request body, or a 400 saying what was expected.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::bad_request(format!("the body must be {expected}: {e}")))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

async fn name_machine(
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

async fn power_machine(
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
    let link = state
        .agents
        .link(m.id)
        .ok_or_else(|| Failure::new(StatusCode::CONFLICT, "that machine is not connected"))?;
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
