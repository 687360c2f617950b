//! Live mode (`--live`): the agent runs inside the machine's own running system, and a new
//! system is written into one file of it while it keeps running.
//!
//! [`Live::prepare`] creates that file (`--live-file`, `/diskferry-live` by default) at the
//! size the server asks for, allocated in full and pinned (immutable), and answers its
//! file-to-sector map: the disk holding it and, in file order, the disk runs holding its
//! bytes. From then on writes to that disk are allowed inside the map and nowhere else
//! ([`Live::guarded`], which holds the pin while the write runs); they go to the disk with
//! direct I/O ([`direct`]), so the running system's page cache is neither filled nor
//! consulted. The old filesystem never reads the
//! file (its extents stay unwritten to it) and cannot move or free it, so what is written
//! there survives until [`Live::remove`] gives the space back.
//!
//! The agent still knows no filesystem: it asks the kernel (`statfs`, `FIEMAP`, sysfs) and
//! refuses when the answer cannot be trusted to be disk sectors — btrfs, device-mapper
//! (LUKS, LVM), RAID, encrypted or inline data, a disk this agent does not serve, a file in
//! more than [`diskferry_protocol::MAX_LIVE_EXTENTS`] pieces — leaving nothing behind.

pub mod device;
pub mod direct;
pub mod grub;
mod pin;
pub mod table;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use diskferry_protocol::{DiskRun, ErrorCode, LiveMap};

use crate::disks::{DiskError, DiskSpec};

/// Where the live file goes when `--live-file` does not say.
pub const DEFAULT_FILE: &str = "/diskferry-live";

/// Why a live file cannot be made, mapped or removed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("this agent was not started with --live: it writes no live file")]
    NotLive,
    #[error("{path} cannot hold a live system: {why}")]
    Unstable { path: String, why: String },
    #[error("the live file would be on {device}, a {what}: its offsets are not disk sectors")]
    Layered { device: String, what: String },
    #[error("device {device} is not a block device in sysfs")]
    NotABlockDevice { device: String },
    #[error("cannot read {path} in sysfs")]
    Sysfs { path: String },
    #[error("the live file would be on disk {disk}, which this agent does not serve (give it with --disk)")]
    NotServed { disk: String },
    #[error("not enough free space for a live file of {size} bytes ({free} bytes free)")]
    NoSpace { size: u64, free: u64 },
    #[error("the free space is too fragmented: a live file of {size} bytes needs more than {most} pieces")]
    Fragmented { size: u64, most: usize },
    #[error("no live file is pinned here")]
    NothingPinned,
    #[error("a live file size must be a positive multiple of 4096 bytes, not {0}")]
    BadSize(u64),
    #[error("a live file of {pinned} bytes is already pinned at {path}: a live system is switched to, committed or being written; roll it back first (diskferry live HOST:PORT --rollback)")]
    AlreadyPinned { path: String, pinned: u64 },
    #[error("cannot switch GRUB: {why}")]
    Grub { why: String },
    #[error("a GRUB menu of {0} bytes is larger than {max}", max = grub::MAX_MENU)]
    MenuTooLarge(usize),
    #[error("{path} moved on the disk while it was being pinned")]
    Moved { path: String },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl From<LiveError> for DiskError {
    fn from(e: LiveError) -> DiskError {
        let code = match &e {
            LiveError::NotLive => ErrorCode::PermissionDenied,
            LiveError::Io { .. } => ErrorCode::Io,
            LiveError::NotABlockDevice { .. }
            | LiveError::NotServed { .. }
            | LiveError::NothingPinned => ErrorCode::NotFound,
            _ => ErrorCode::Unsupported,
        };
        DiskError {
            code,
            message: e.to_string(),
        }
    }
}

/// The pinned file: its map, and the device number of the disk holding it.
#[derive(Debug, Clone)]
struct Pinned {
    map: LiveMap,
    disk: u64,
    /// The map's runs in disk order, merged where they touch.
    sorted: Vec<DiskRun>,
}

/// A live agent's file and what it allows.
#[derive(Debug)]
pub struct Live {
    path: PathBuf,
    /// The running system's root, where its GRUB and kernel command line are (`/`; another
    /// directory in tests).
    root: PathBuf,
    /// `/sys`, or a fake one in tests.
    sysfs: PathBuf,
    /// Writes hold it for reading while they run; pinning and removing take it for writing.
    pinned: RwLock<Option<Pinned>>,
    /// How this agent is reached: `("listen", address bound)` or `("connect", server)`; the
    /// live system's agent is started the same way.
    endpoint: Mutex<Option<(&'static str, String)>>,
}

impl Live {
    /// Live mode with the file at `path`. A file left pinned there by an earlier run is taken
    /// up again; a half-made one (its temporary name) is removed.
    /// The running system's root is `/`, or `DISKFERRY_LIVE_ROOT` (a test seam, as
    /// `DISKFERRY_SYSFS` is for sysfs).
    pub fn new(path: PathBuf, served: &[DiskSpec]) -> Live {
        let root = std::env::var_os("DISKFERRY_LIVE_ROOT")
            .map_or_else(|| PathBuf::from("/"), PathBuf::from);
        Live::with_system(path, root, crate::identity::sysfs(), served)
    }

    /// [`Live::new`], the running system's root at `root` and sysfs at `sysfs`.
    pub fn with_system(path: PathBuf, root: PathBuf, sysfs: PathBuf, served: &[DiskSpec]) -> Live {
        let _ = std::fs::remove_file(pin::partial(&path));
        let live = Live {
            path,
            root,
            sysfs,
            pinned: RwLock::new(None),
            endpoint: Mutex::new(None),
        };
        if let Ok(Some(p)) = live.adopt(served) {
            *live.pinned_mut() = Some(p);
        }
        live
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records how this agent is reached (`"listen"` or `"connect"`, and the address).
    pub fn set_endpoint(&self, how: &'static str, addr: String) {
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some((how, addr));
    }

    /// How this agent is reached, once known.
    pub fn endpoint(&self) -> Option<(&'static str, String)> {
        self.endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The size of the pinned file, if one is.
    pub fn pinned_size(&self) -> Option<u64> {
        self.pinned().as_ref().map(|p| p.map.size())
    }

    fn pinned(&self) -> std::sync::RwLockReadGuard<'_, Option<Pinned>> {
        self.pinned.read().unwrap_or_else(|e| e.into_inner())
    }

    fn pinned_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<Pinned>> {
        self.pinned.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The map of the file pinned at the path by an earlier run, if there is one.
    fn adopt(&self, served: &[DiskSpec]) -> Result<Option<Pinned>, LiveError> {
        let Ok(file) = std::fs::File::open(&self.path) else {
            return Ok(None);
        };
        if !pin::is_pinned(&file) {
            return Ok(None);
        }
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (holder, disk_name, block_size) = self.place(served)?;
        let runs = pin::map(&file, &self.path, size, &holder)?;
        Ok(Some(self.pinned_map(
            holder.disk,
            disk_name,
            block_size,
            runs,
        )))
    }

    /// The disk the file's directory is on (refused unless served here), its served name,
    /// and the filesystem's block size.
    fn place(&self, served: &[DiskSpec]) -> Result<(device::Holder, String, u32), LiveError> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let block_size = pin::check_filesystem(dir)?;
        let holder = self.disk_under(dir)?;
        let name = served_name(served, holder.disk).ok_or_else(|| LiveError::NotServed {
            disk: format!("/dev/{}", holder.disk_name),
        })?;
        Ok((holder, name, block_size))
    }

    fn pinned_map(&self, disk: u64, name: String, block_size: u32, runs: Vec<DiskRun>) -> Pinned {
        let mut sorted = runs.clone();
        sorted.sort_by_key(|r| r.offset);
        let mut merged: Vec<DiskRun> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match merged.last_mut() {
                Some(m) if m.offset + m.len == r.offset => m.len += r.len,
                _ => merged.push(r),
            }
        }
        Pinned {
            map: LiveMap {
                disk: name,
                path: self.path.display().to_string(),
                block_size,
                runs,
            },
            disk,
            sorted: merged,
        }
    }

    /// Creates and pins a file of `size` bytes; `size` 0 answers the map of the file pinned.
    /// A pinned file is never handed out again to be written: it holds a live system
    /// switched to, committed, or being written by another deploy.
    pub fn prepare(&self, size: u64, served: &[DiskSpec]) -> Result<LiveMap, LiveError> {
        let mut pinned = self.pinned_mut();
        match (pinned.as_ref(), size) {
            (Some(p), 0) => return Ok(p.map.clone()),
            (None, 0) => return Err(LiveError::NothingPinned),
            (Some(p), _) => {
                return Err(LiveError::AlreadyPinned {
                    path: self.path.display().to_string(),
                    pinned: p.map.size(),
                })
            }
            (None, _) => {}
        }
        if !size.is_multiple_of(4096) {
            return Err(LiveError::BadSize(size));
        }
        let (holder, name, block_size) = self.place(served)?;
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let free = pin::free_bytes(dir)?;
        if free < size {
            return Err(LiveError::NoSpace { size, free });
        }
        let runs = pin::create(&self.path, size, &holder)?;
        let p = self.pinned_map(holder.disk, name, block_size, runs);
        let map = p.map.clone();
        *pinned = Some(p);
        Ok(map)
    }

    /// Unpins and deletes the file; true when there was one. Writes in flight finish first,
    /// and none is allowed from the moment the file starts going.
    pub fn remove(&self) -> Result<bool, LiveError> {
        let mut pinned = self.pinned_mut();
        *pinned = None;
        pin::remove(&self.path)
    }

    /// Installs the live system's GRUB `menu` and boots it once; an empty menu undoes it.
    pub fn boot_once(&self, menu: &str) -> Result<(), LiveError> {
        if menu.len() > grub::MAX_MENU {
            return Err(LiveError::MenuTooLarge(menu.len()));
        }
        if !menu.is_empty() {
            self.check_grub_env()?;
        }
        grub::switch(&self.root, menu)
    }

    /// GRUB clears a one-time boot by rewriting its environment block where it lies: only on
    /// a plain filesystem (ext2/3/4, XFS) of a plain disk partition. On btrfs, LVM, RAID or an
    /// encrypted `/boot` it cannot, and a new system that fails would be booted again and
    /// again instead of the old one: refused.
    fn check_grub_env(&self) -> Result<(), LiveError> {
        let dir = grub::grub_dir(&self.root)?;
        let refuse = |e: LiveError| LiveError::Grub {
            why: format!(
                "GRUB could not clear a one-time boot in {}: {e}",
                dir.display()
            ),
        };
        pin::check_filesystem(&dir).map_err(refuse)?;
        self.disk_under(&dir).map_err(refuse)?;
        Ok(())
    }

    /// The disk under the filesystem holding `path` (refused when layered: dm, md).
    fn disk_under(&self, path: &Path) -> Result<device::Holder, LiveError> {
        device::holder(pin::device_of(path)?, &self.sysfs)
    }

    /// Marks the running system committed (its GRUB entry becomes the default), or not.
    pub fn commit(&self, committed: bool) -> Result<(), LiveError> {
        grub::commit(&self.root, committed)
    }

    /// The running kernel's boot id.
    pub fn boot_id(&self) -> Option<String> {
        grub::boot_id(&self.root)
    }

    /// The live deploy token the running kernel was booted with, if any.
    pub fn token(&self) -> Option<String> {
        grub::token(&self.root)
    }

    /// The root the running kernel was booted with (`root=` of its command line).
    pub fn booted_root(&self) -> Option<String> {
        grub::booted_root(&self.root)
    }

    /// Runs `io`, a write of `len` bytes at `offset` of disk `disk`, if it lies inside the
    /// pinned file — or is a partition-table write (`table`: its bytes, the disk's sector 0
    /// now, the disk's size and sector size) on the pinned file's disk, or — none pinned — on
    /// the disk of a committed live system's root (taking its disk over); the file cannot be
    /// removed while `io` runs. The error says why not.
    pub fn guarded<T>(
        &self,
        disk: u64,
        offset: u64,
        len: u64,
        table: Option<TableWrite<'_>>,
        io: impl FnOnce() -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let pinned = self.pinned();
        let refused = |why: String| DiskError {
            code: ErrorCode::PermissionDenied,
            message: format!("live mode: {why}"),
        };
        let end = offset
            .checked_add(len)
            .ok_or_else(|| refused("range overflows".into()))?;
        let a_table = || {
            table.is_some_and(|t| {
                (t.sector0)().is_some_and(|s0| {
                    table::is_table_write(offset, t.data, &s0, t.disk_size, t.sector)
                })
            })
        };
        let Some(p) = pinned.as_ref() else {
            // A committed live system taking its disk over rewrites that disk's table, and
            // nothing else.
            if self.may_take_over(disk) && a_table() {
                return io();
            }
            return Err(refused(
                "no live file is pinned: nothing may be written (but, from a committed live system, its own disk's partition table)".into(),
            ));
        };
        if p.disk != disk {
            return Err(refused(format!(
                "the live file is on {}, not this disk",
                p.map.disk
            )));
        }
        // The run holding `offset` (runs are sorted, disjoint and merged).
        let i = p.sorted.partition_point(|r| r.offset + r.len <= offset);
        let inside = p
            .sorted
            .get(i)
            .is_some_and(|r| r.offset <= offset && end <= r.offset + r.len);
        if !inside && !a_table() {
            return Err(refused(format!(
                "bytes {offset}..{end} are not all inside the live file: only its sectors may be written"
            )));
        }
        io()
    }
}

impl Live {
    /// Whether this is a committed live system whose root is on disk `disk`: the one case a
    /// live agent with nothing pinned writes (its partition table).
    fn may_take_over(&self, disk: u64) -> bool {
        grub::is_committed(&self.root) && self.disk_under(&self.root).is_ok_and(|h| h.disk == disk)
    }
}

/// A write that may be a partition-table write ([`Live::guarded`]).
#[derive(Clone, Copy)]
pub struct TableWrite<'a> {
    pub data: &'a [u8],
    /// Reads the disk's sector 0 now (only for a write outside the file).
    pub sector0: &'a dyn Fn() -> Option<Vec<u8>>,
    pub disk_size: u64,
    pub sector: u64,
}

/// The served name of the disk with device number `disk`.
fn served_name(served: &[DiskSpec], disk: u64) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    served.iter().find_map(|d| {
        let m = std::fs::metadata(&d.path).ok()?;
        (m.file_type().is_block_device() && m.rdev() == disk).then(|| d.name.clone())
    })
}

#[cfg(test)]
mod tests;
