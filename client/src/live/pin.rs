//! The live file itself: created beside nothing else under a temporary name, allocated in
//! full (`fallocate`), mapped with `FIEMAP`, renamed into place and made immutable, so the
//! running system can neither move, grow, shrink, write nor delete it; and unpinned and
//! deleted again. Every refusal leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fiemap::{Fiemap, FiemapExtentFlags, FiemapFlags};
use rustix::fs::{FallocateFlags, IFlags};

use diskferry_protocol::{DiskRun, MAX_LIVE_EXTENTS};

use super::device::Holder;
use super::LiveError;

/// Filesystems whose `FIEMAP` offsets are byte offsets on their block device and whose
/// immutable files' blocks never move: ext2/3/4 (one magic) and XFS.
const STABLE: [(i64, &str); 2] = [(0xEF53, "ext4"), (0x5846_5342, "XFS")];
const BTRFS: i64 = 0x9123_683E;

/// Extent flags that mean the bytes are not plainly at `fe_physical` on the device, or are
/// shared with another file.
const UNPLAIN: FiemapExtentFlags = FiemapExtentFlags::UNKNOWN
    .union(FiemapExtentFlags::DELALLOC)
    .union(FiemapExtentFlags::ENCODED)
    .union(FiemapExtentFlags::DATA_ENCRYPTED)
    .union(FiemapExtentFlags::NOT_ALIGNED)
    .union(FiemapExtentFlags::DATA_INLINE)
    .union(FiemapExtentFlags::DATA_TAIL)
    .union(FiemapExtentFlags::SHARED);

/// The filesystem holding `dir` if it gives stable extents, with its block size; a refusal
/// naming it otherwise.
pub fn check_filesystem(dir: &Path) -> Result<u32, LiveError> {
    let fs =
        rustix::fs::statfs(dir).map_err(|e| io_error("read the filesystem of", dir, e.into()))?;
    let kind = fs.f_type as i64;
    if kind == BTRFS {
        return Err(LiveError::Unstable {
            path: dir.display().to_string(),
            why: "it is btrfs, which copies on write and maps files to its own logical \
                  addresses, not disk sectors"
                .into(),
        });
    }
    if !STABLE.iter().any(|(magic, _)| *magic == kind) {
        return Err(LiveError::Unstable {
            path: dir.display().to_string(),
            why: format!("its filesystem (type {kind:#x}) is not ext4 or XFS"),
        });
    }
    u32::try_from(fs.f_bsize)
        .ok()
        .filter(|b| b.is_power_of_two() && *b >= 512)
        .ok_or_else(|| LiveError::Unstable {
            path: dir.display().to_string(),
            why: format!("its block size {} is unusable", fs.f_bsize),
        })
}

/// Bytes free on the filesystem holding `dir` for ordinary users: the blocks reserved for
/// root stay for the running system, which must go on working while the file is pinned.
pub fn free_bytes(dir: &Path) -> Result<u64, LiveError> {
    let vfs =
        rustix::fs::statvfs(dir).map_err(|e| io_error("read the free space of", dir, e.into()))?;
    Ok(vfs.f_bavail.saturating_mul(vfs.f_frsize))
}

/// The temporary name a live file is built under.
pub fn partial(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Creates the file at `path` (through its temporary name), allocates `size` bytes, maps it
/// on `holder`'s disk and pins it. On any failure nothing is left behind.
pub fn create(path: &Path, size: u64, holder: &Holder) -> Result<Vec<DiskRun>, LiveError> {
    let tmp = partial(path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_error("create", &tmp, e))?;
    let made = allocate_and_map(&file, &tmp, path, size, holder);
    if made.is_err() {
        let _ = unpin(&file);
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(path);
    }
    made
}

fn allocate_and_map(
    file: &File,
    tmp: &Path,
    path: &Path,
    size: u64,
    holder: &Holder,
) -> Result<Vec<DiskRun>, LiveError> {
    rustix::fs::fallocate(file, FallocateFlags::empty(), 0, size).map_err(|e| {
        if e == rustix::io::Errno::NOSPC {
            LiveError::NoSpace {
                size,
                free: free_bytes(tmp).unwrap_or(0),
            }
        } else {
            io_error("allocate", tmp, e.into())
        }
    })?;
    file.sync_all().map_err(|e| io_error("sync", tmp, e))?;
    let runs = map(file, tmp, size, holder)?;
    std::fs::rename(tmp, path).map_err(|e| io_error("rename", tmp, e))?;
    sync_dir(path)?;
    pin(file, path)?;
    // Pinned: the map must not have changed on the way.
    if map(file, path, size, holder)? != runs {
        return Err(LiveError::Moved {
            path: path.display().to_string(),
        });
    }
    Ok(runs)
}

/// The disk runs holding `file` (on `holder`'s disk), merged where they touch, in file
/// order; refused when any byte of the file is not plainly on the disk.
pub fn map(
    file: &File,
    path: &Path,
    size: u64,
    holder: &Holder,
) -> Result<Vec<DiskRun>, LiveError> {
    let mut runs: Vec<DiskRun> = Vec::new();
    let mut covered = 0u64;
    for extent in Fiemap::with_flags(file, FiemapFlags::SYNC) {
        let e = extent.map_err(|e| io_error("map (FIEMAP)", path, e))?;
        let unplain = e.fe_flags.intersection(UNPLAIN);
        if !unplain.is_empty() {
            return Err(LiveError::Unstable {
                path: path.display().to_string(),
                why: format!("its data is not plainly on the disk ({unplain:?})"),
            });
        }
        if e.fe_logical != covered || e.fe_length == 0 {
            return Err(LiveError::Unstable {
                path: path.display().to_string(),
                why: format!("bytes {covered}..{} are not allocated", e.fe_logical),
            });
        }
        covered += e.fe_length;
        let offset = holder.start + e.fe_physical;
        match runs.last_mut() {
            Some(last) if last.offset + last.len == offset => last.len += e.fe_length,
            _ => runs.push(DiskRun {
                offset,
                len: e.fe_length,
            }),
        }
        if runs.len() > MAX_LIVE_EXTENTS {
            return Err(LiveError::Fragmented {
                size,
                most: MAX_LIVE_EXTENTS,
            });
        }
    }
    if covered < size {
        return Err(LiveError::Unstable {
            path: path.display().to_string(),
            why: format!("only {covered} of its {size} bytes are allocated"),
        });
    }
    // Extents may run past the end by a partial block; the map ends with the file.
    let mut over = covered - size;
    while over > 0 {
        let last = runs.last_mut().expect("covered > 0");
        let cut = over.min(last.len);
        last.len -= cut;
        over -= cut;
        if last.len == 0 {
            runs.pop();
        }
    }
    Ok(runs)
}

/// Makes the file immutable (no write, truncation, rename, link or deletion; defragmenters
/// leave it alone).
fn pin(file: &File, path: &Path) -> Result<(), LiveError> {
    let flags =
        rustix::fs::ioctl_getflags(file).map_err(|e| io_error("read flags of", path, e.into()))?;
    rustix::fs::ioctl_setflags(file, flags | IFlags::IMMUTABLE)
        .map_err(|e| io_error("make immutable", path, e.into()))
}

/// Clears the immutable flag.
fn unpin(file: &File) -> io::Result<()> {
    let flags = rustix::fs::ioctl_getflags(file)?;
    rustix::fs::ioctl_setflags(file, flags - IFlags::IMMUTABLE)?;
    Ok(())
}

/// Whether the file at `path` is pinned (immutable).
pub fn is_pinned(file: &File) -> bool {
    rustix::fs::ioctl_getflags(file).is_ok_and(|f| f.contains(IFlags::IMMUTABLE))
}

/// Unpins and deletes the file at `path`, if there is one; its space returns to the
/// filesystem.
pub fn remove(path: &Path) -> Result<bool, LiveError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error("open", path, e)),
    };
    unpin(&file).map_err(|e| io_error("unpin", path, e))?;
    std::fs::remove_file(path).map_err(|e| io_error("delete", path, e))?;
    sync_dir(path)?;
    Ok(true)
}

/// The device number of the filesystem holding `path` (its `st_dev`).
pub fn device_of(path: &Path) -> Result<u64, LiveError> {
    std::fs::metadata(path)
        .map(|m| m.dev())
        .map_err(|e| io_error("stat", path, e))
}

fn sync_dir(path: &Path) -> Result<(), LiveError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync", dir, e))
}

fn io_error(what: &str, path: &Path, source: io::Error) -> LiveError {
    LiveError::Io {
        what: format!("{what} {}", path.display()),
        source,
    }
}
