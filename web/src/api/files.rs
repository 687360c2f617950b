//! Inside a capture: directory listings, file bytes, a directory as a tar stream, and the
//! comparison of two captures.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use diskferry_daemon::catalog::CaptureRecord;
use diskferry_fs::{tree, FileKind, Filesystem, Metadata, NodeId};
use serde::Serialize;
use tokio::sync::mpsc;

use super::*;
use crate::browse;
use crate::error::Failure;
use crate::innerpath::InnerPath;
use crate::SharedState;

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

pub(super) async fn dir(
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

pub(super) async fn file(
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
const TAR_LIMIT: u64 = 1_000_000;

/// Writes the tree under `dir` (named `prefix` in the archive) as tar entries, in one bounded
/// walk ([`tree::Walk`]) whose byte budget every file is charged against: a directory loop,
/// an unreadable directory or a limit fails the download.
fn tar_tree(
    fs: &dyn Filesystem,
    dir: NodeId,
    prefix: &str,
    out: &mut tar::Builder<ChannelWriter>,
) -> std::io::Result<()> {
    let io_err = |e: diskferry_fs::FsError| std::io::Error::other(e.to_string());
    append_entry(fs, &fs.metadata(dir).map_err(io_err)?, prefix, out)?;
    let limits = tree::Limits {
        entries: TAR_LIMIT,
        ..tree::Limits::for_volume(fs.info().total_bytes)
    };
    let mut walk = tree::Walk::new(fs, dir, limits);
    // Directories left out with a name no archive may hold, and so everything below them.
    let mut refused: HashSet<NodeId> = HashSet::new();
    while let Some(item) = walk.next() {
        let (path, e) = item.map_err(|e| io_err(e.into()))?;
        let unsafe_name = tree::check_name(&e.name).err();
        if let Some(why) = &unsafe_name {
            tracing::warn!("tar: {path}: {why}; left out with what it holds");
        }
        if unsafe_name.is_some() || refused.contains(&walk.parent()) {
            refused.insert(e.node);
            continue;
        }
        let meta = fs.metadata(e.node).map_err(io_err)?;
        if meta.kind == FileKind::File {
            walk.charge_bytes(meta.size).map_err(|e| io_err(e.into()))?;
        }
        append_entry(fs, &meta, &format!("{prefix}/{path}"), out)?;
    }
    Ok(())
}

/// One tar entry: a directory, file, link or device node (sockets cannot be archived).
fn append_entry(
    fs: &dyn Filesystem,
    meta: &Metadata,
    path: &str,
    out: &mut tar::Builder<ChannelWriter>,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(meta.mode);
    h.set_uid(meta.uid.into());
    h.set_gid(meta.gid.into());
    h.set_mtime(meta.mtime.map_or(0, |t| t.secs.max(0) as u64));
    h.set_size(0);
    match meta.kind {
        FileKind::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            out.append_data(&mut h, format!("{path}/"), std::io::empty())
        }
        FileKind::File => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.size);
            let reader = FileReader {
                fs,
                node: meta.node,
                at: 0,
                size: meta.size,
            };
            out.append_data(&mut h, path, reader)
        }
        FileKind::Symlink => {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = fs
                .read_link(meta.node)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            out.append_link(&mut h, path, String::from_utf8_lossy(&target).as_ref())
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
            out.append_data(&mut h, path, std::io::empty())
        }
        FileKind::Socket => Ok(()),
    }
}

pub(super) async fn tar(
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

pub(super) async fn compare(
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
