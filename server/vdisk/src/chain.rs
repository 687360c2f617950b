//! Consolidating qcow2 backing chains, as `qemu-img commit` and `qemu-img rebase` (safe mode)
//! do. [`prepare_commit`] then [`Commit::run`] write every cluster an overlay holds (data and
//! zero clusters) into its backing file, so the backing file alone reads as the chain did;
//! [`rebase`] copies into an overlay every cluster it does not hold where its old chain and a
//! new base read differently, then points it at the new base (or at none).
//!
//! Backing names come from the images and are hostile: they are resolved and followed only
//! as [`open_image`](crate::open_image) follows them (relative to the image's directory, at
//! most [`MAX_BACKING_DEPTH`] deep); a new name is the new base's absolute path, as
//! [`create_overlay`](crate::create_overlay) stores it, bounded by qcow2's 1023 bytes.
//! Files kept beside images (chunk maps) are the caller's: [`prepare_commit`] checks
//! everything — the base is writable, no other image in its directory is built on it — before
//! anything is written, so a caller can remove what the commit will make stale in between.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockError, FileDevice};

use crate::error::AtPath;
use crate::qcow2::{self, Qcow2};
use crate::{backing_path, detect, open_chain, Detected, ImageError, Mapping, MAX_BACKING_DEPTH};

/// Most bytes moved or compared at once.
const RUN: u64 = 4 << 20;

/// Why a chain cannot be committed or rebased.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path} is not a qcow2 overlay (it has no backing file)")]
    NotAnOverlay { path: PathBuf },
    #[error("{path} is a {format} image; a commit writes into raw and qcow2 (version 3) backing files only")]
    BaseNotWritable { path: PathBuf, format: &'static str },
    #[error("{overlay} ({overlay_size} bytes) is larger than its backing file {base} ({base_size} bytes), which a commit does not grow")]
    OverlayLarger {
        overlay: PathBuf,
        overlay_size: u64,
        base: PathBuf,
        base_size: u64,
    },
    #[error("{base} is also the backing file of {}: writing into it would change what they read (force the commit to do it anyway)", list(.dependents))]
    Dependents {
        base: PathBuf,
        dependents: Vec<PathBuf>,
    },
    #[error("{path} would become its own backing file")]
    Loop { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: BlockError },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: BlockError },
}

type Result<T> = std::result::Result<T, ChainError>;

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// What a commit wrote into the base.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Bytes of data clusters copied.
    pub data: u64,
    /// Bytes of zero clusters made to read as zeros.
    pub zeros: u64,
}

/// What a rebase did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseStats {
    /// Bytes the overlay does not hold, read from the old chain and the new base and compared.
    pub compared: u64,
    /// Bytes that read differently, copied from the old chain into the overlay.
    pub copied: u64,
}

/// A commit checked and ready: the overlay open for reading, its backing file open for
/// writing. Nothing has been written yet.
pub struct Commit {
    overlay: PathBuf,
    image: Qcow2,
    base: PathBuf,
    target: Arc<dyn BlockDevice>,
    dependents: Vec<PathBuf>,
    built_on_overlay: Vec<PathBuf>,
}

/// Checks that the overlay at `overlay` can be committed into its backing file: the base
/// opens writable (raw, or qcow2 version 3 this crate writes), is at least as large, and no
/// other image in the base's directory names it as its backing file — unless `force`, when
/// they are only listed ([`Commit::dependents`]).
pub fn prepare_commit(overlay: &Path, force: bool) -> Result<Commit> {
    let image = Qcow2::inspect(open_file(overlay, false)?, overlay)?;
    let name = image
        .backing_name()
        .ok_or_else(|| ChainError::NotAnOverlay {
            path: overlay.to_path_buf(),
        })?
        .to_string();
    let base = canonical(&backing_path(overlay, &name))?;
    if base == canonical(overlay)? {
        return Err(ChainError::Loop { path: base });
    }
    let target = open_writable(&base)?;
    if image.size() > target.size() {
        return Err(ChainError::OverlayLarger {
            overlay: overlay.to_path_buf(),
            overlay_size: image.size(),
            base,
            base_size: target.size(),
        });
    }
    let dependents = dependents_of(&base, overlay)?;
    if !dependents.is_empty() && !force {
        return Err(ChainError::Dependents { base, dependents });
    }
    let built_on_overlay = dependents_of(&canonical(overlay)?, &base)?;
    Ok(Commit {
        overlay: overlay.to_path_buf(),
        image,
        base,
        target,
        dependents,
        built_on_overlay,
    })
}

impl Commit {
    /// The backing file the commit writes into (its canonical path).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Other images built on the base (only when forced: otherwise the commit is refused).
    pub fn dependents(&self) -> &[PathBuf] {
        &self.dependents
    }

    /// Images in the overlay's directory built on the overlay: they read the same after the
    /// commit only while the overlay stays (emptied, or as it is).
    pub fn built_on_overlay(&self) -> &[PathBuf] {
        &self.built_on_overlay
    }

    /// The overlay's virtual size: what `progress` counts up to.
    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// Writes every cluster the overlay holds into the base and syncs it; `progress` gets the
    /// bytes examined so far and the total. The overlay is left as it was.
    pub fn run(self, progress: &mut dyn FnMut(u64, u64)) -> Result<CommitStats> {
        let size = self.image.size();
        let mut stats = CommitStats::default();
        let mut buf = Vec::new();
        let mut pos = 0;
        while pos < size {
            let (held, len) = held_run(&self.image, &self.overlay, pos, size)?;
            let werr = |source| ChainError::Write {
                path: self.base.clone(),
                source,
            };
            match held {
                Held::Data => {
                    buf.resize(len as usize, 0);
                    self.image
                        .read_at(&mut buf, pos)
                        .map_err(|source| ChainError::Read {
                            path: self.overlay.clone(),
                            source,
                        })?;
                    self.target.write_at(&buf, pos).map_err(werr)?;
                    stats.data += len;
                }
                Held::Zero => {
                    self.target.write_zeroes(pos, len).map_err(werr)?;
                    stats.zeros += len;
                }
                Held::Nothing => {}
            }
            pos += len;
            progress(pos, size);
        }
        self.target.flush().map_err(|source| ChainError::Write {
            path: self.base.clone(),
            source,
        })?;
        tracing::debug!(overlay = %self.overlay.display(), base = %self.base.display(),
            data = stats.data, zeros = stats.zeros, "committed");
        Ok(stats)
    }
}

/// Rebases the overlay at `overlay` onto `new_base` (or makes it standalone with `None`):
/// every cluster it does not hold where its current chain and the new base (zeros for none)
/// read differently is copied in from the current chain, the overlay is synced, and then its
/// header names the new base by its absolute path. What the overlay reads does not change.
pub fn rebase(
    overlay: &Path,
    new_base: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RebaseStats> {
    let file = open_file(overlay, true)?;
    let name =
        qcow2::backing_name_of(&*file, overlay)?.ok_or_else(|| ChainError::NotAnOverlay {
            path: overlay.to_path_buf(),
        })?;
    let old_path = backing_path(overlay, &name);
    let (_, old) = open_chain(&old_path, true, MAX_BACKING_DEPTH - 1)?;
    let new = new_base.map(|p| NewBase::open(overlay, p)).transpose()?;
    let backing = new.as_ref().map(|n| (n.name.as_str(), n.format));
    qcow2::check_backing_file(&*file, overlay, backing)?;
    let image = Qcow2::open_writable(Arc::clone(&file), overlay, Some(Arc::clone(&old)))?;
    let stats = copy_differing(
        &image,
        overlay,
        (&*old, &old_path),
        new.as_ref().map(|n| (&*n.device, Path::new(&n.name))),
        progress,
    )?;
    image.flush().map_err(|source| ChainError::Write {
        path: overlay.to_path_buf(),
        source,
    })?;
    drop(image);
    qcow2::set_backing_file(&*file, overlay, backing)?;
    tracing::debug!(overlay = %overlay.display(), backing = ?backing.map(|b| b.0),
        compared = stats.compared, copied = stats.copied, "rebased");
    Ok(stats)
}

/// The base an overlay is rebased onto: its absolute name, qemu format name and contents.
struct NewBase {
    name: String,
    format: &'static str,
    device: Arc<dyn BlockDevice>,
}

impl NewBase {
    /// Opens `path` through its own chain, refusing a chain that contains `overlay`.
    fn open(overlay: &Path, path: &Path) -> Result<NewBase> {
        let absolute = canonical(path)?;
        let me = canonical(overlay)?;
        if chain_paths(&absolute)?.contains(&me) {
            return Err(ChainError::Loop { path: me });
        }
        let name = absolute
            .to_str()
            .ok_or(crate::CreateError::BackingPathNotUtf8)
            .at(overlay)?
            .to_string();
        if name.len() > qcow2::MAX_BACKING_NAME as usize {
            return Err(crate::CreateError::BackingNameLength { len: name.len() }).at(overlay)?;
        }
        let (detected, device) = crate::open_image(&absolute, true)?;
        Ok(NewBase {
            name,
            format: detected.qemu_name(),
            device,
        })
    }
}

/// The canonical paths of the image at `path` and of its backing files, as far as they
/// resolve (at most [`MAX_BACKING_DEPTH`] levels).
fn chain_paths(path: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![canonical(path)?];
    while out.len() <= MAX_BACKING_DEPTH as usize {
        let current = &out[out.len() - 1];
        let Some(name) = qcow2_backing(current)? else {
            break;
        };
        match std::fs::canonicalize(backing_path(current, &name)) {
            Ok(next) => out.push(next),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The backing name of the image at `path` if it is a qcow2 overlay.
fn qcow2_backing(path: &Path) -> std::result::Result<Option<String>, ImageError> {
    let file = FileDevice::open(path, false).at(path)?;
    if detect(&file).at(path)? != Detected::Qcow2 {
        return Ok(None);
    }
    qcow2::backing_name_of(&file, path)
}

/// The images in `base`'s directory, other than `except`, whose backing file is `base`
/// (canonical). Files that are not images, or that cannot be read, name nothing.
fn dependents_of(base: &Path, except: &Path) -> Result<Vec<PathBuf>> {
    let dir = base.parent().unwrap_or(Path::new("/"));
    let overlay = canonical(except)?;
    let entries = std::fs::read_dir(dir).map_err(|source| ChainError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(me) = std::fs::canonicalize(&path) else {
            continue;
        };
        if me == overlay || me == base || !me.is_file() {
            continue;
        }
        match qcow2_backing(&path) {
            Ok(Some(name)) => {
                if std::fs::canonicalize(backing_path(&path, &name)).is_ok_and(|b| b == base) {
                    out.push(path);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("{}: not checked as a dependent: {e}", path.display()),
        }
    }
    out.sort();
    Ok(out)
}

/// The base at `path` (canonical) opened for writing: raw, or a qcow2 image (through its own
/// backing chain when it is an overlay itself).
fn open_writable(path: &Path) -> Result<Arc<dyn BlockDevice>> {
    let file = open_file(path, true)?;
    match detect(&*file).at(path)? {
        Detected::Raw => Ok(file),
        Detected::Qcow2 => {
            let backing = match qcow2::backing_name_of(&*file, path)? {
                Some(name) => {
                    Some(open_chain(&backing_path(path, &name), true, MAX_BACKING_DEPTH - 2)?.1)
                }
                None => None,
            };
            Ok(Arc::new(Qcow2::open_writable(file, path, backing)?))
        }
        other => Err(ChainError::BaseNotWritable {
            path: path.to_path_buf(),
            format: other.name(),
        }),
    }
}

/// What an overlay holds in a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Data (stored or compressed).
    Data,
    /// Zero clusters.
    Zero,
    /// Nothing: the range reads from the backing file.
    Nothing,
}

/// The longest run from `pos` (at most [`RUN`] bytes, before `size`) the image holds the same
/// way, cluster by cluster.
fn held_run(image: &Qcow2, path: &Path, pos: u64, size: u64) -> Result<(Held, u64)> {
    let class = |m: Mapping| match m {
        Mapping::Data { .. } | Mapping::Compressed { .. } => Held::Data,
        Mapping::Zero { .. } => Held::Zero,
        Mapping::Unallocated { .. } => Held::Nothing,
    };
    let first = image.map(pos, size - pos)?;
    let held = class(first);
    let mut len = first.len();
    while len < RUN && pos + len < size {
        let next = image.map(pos + len, size - pos - len)?;
        if class(next) != held || next.is_empty() {
            break;
        }
        len += next.len();
    }
    if len == 0 {
        return Err(ImageError::Invalid {
            path: path.to_path_buf(),
            problem: crate::FormatError::EmptyMapping { offset: pos },
        }
        .into());
    }
    Ok((held, len))
}

/// Copies into `image` (an overlay open for writing on `old`) every cluster it does not hold
/// where `old` and `new` (zeros when `None`) read differently.
fn copy_differing(
    image: &Qcow2,
    path: &Path,
    old: (&dyn BlockDevice, &Path),
    new: Option<(&dyn BlockDevice, &Path)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RebaseStats> {
    let size = image.size();
    let cluster = image.header().cluster_size() as usize;
    let mut stats = RebaseStats::default();
    let (mut was, mut now) = (Vec::new(), Vec::new());
    let mut pos = 0;
    while pos < size {
        let (held, len) = held_run(image, path, pos, size)?;
        if held == Held::Nothing {
            was.resize(len as usize, 0);
            now.resize(len as usize, 0);
            read_padded(old.0, old.1, pos, &mut was)?;
            match new {
                Some((new, name)) => read_padded(new, name, pos, &mut now)?,
                None => now.fill(0),
            }
            stats.compared += len;
            for (start, end) in differing_spans(&was, &now, cluster) {
                image
                    .write_at(&was[start..end], pos + start as u64)
                    .map_err(|source| ChainError::Write {
                        path: path.to_path_buf(),
                        source,
                    })?;
                stats.copied += (end - start) as u64;
            }
        }
        pos += len;
        progress(pos, size);
    }
    Ok(stats)
}

/// The spans of whole `unit`s (the last may be shorter) where `a` and `b` differ, joined
/// where they touch.
fn differing_spans(a: &[u8], b: &[u8], unit: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, (x, y)) in a.chunks(unit).zip(b.chunks(unit)).enumerate() {
        if x == y {
            continue;
        }
        let (start, end) = (i * unit, i * unit + x.len());
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// Reads `buf.len()` bytes at `pos` of `device` (the image at `path`), zeros past its end (a
/// smaller base).
fn read_padded(device: &dyn BlockDevice, path: &Path, pos: u64, buf: &mut [u8]) -> Result<()> {
    let available = device.size().saturating_sub(pos).min(buf.len() as u64) as usize;
    buf[available..].fill(0);
    if available == 0 {
        return Ok(());
    }
    device
        .read_at(&mut buf[..available], pos)
        .map_err(|source| ChainError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn open_file(path: &Path, writable: bool) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(FileDevice::open(path, writable).at(path)?))
}

fn canonical(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|source| ChainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::differing_spans;

    #[test]
    fn differing_units_join_into_spans() {
        let a = [0u8; 10];
        let mut b = [0u8; 10];
        b[0] = 1;
        b[3] = 1;
        b[9] = 1;
        assert_eq!(differing_spans(&a, &b, 3), [(0, 6), (9, 10)]);
        assert!(differing_spans(&a, &a, 4).is_empty());
    }
}
