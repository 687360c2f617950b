//! Filesystems on block devices: detection by on-disk signature ([`detect`]), and one
//! [`Filesystem`] trait over the readers (ext2/3/4 and FAT of our own, NTFS through the `ntfs` crate) that the capture,
//! browse and inspect code uses without knowing which filesystem it walks.
//!
//! Everything a filesystem says is hostile input: a corrupt record is an error for that entry
//! (the walk goes on), lengths are bounded before allocation, walks are bounded.

pub mod detect;
pub mod esp;
pub mod ext4;
pub mod fat;
pub mod fat_write;
pub mod host;
pub mod ntfs;
pub mod overlay;
pub mod swap;
pub mod tree;

use std::sync::Arc;

pub use detect::{detect, FsKind};
use diskferry_blockdev::{BlockDevice, BlockError};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Io(#[from] BlockError),
    #[error("{0}: corrupt filesystem: {1}")]
    Corrupt(String, String),
    /// A malformed ext4 structure, and where it was found.
    #[error("{place}: corrupt filesystem: {source}")]
    Ext4 {
        place: ext4::Place,
        #[source]
        source: ext4::Corruption,
    },
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}: leads outside the volume")]
    Escapes(String),
    /// A tree walk skipped a directory or hit a limit.
    #[error(transparent)]
    Walk(#[from] tree::WalkError),
}

pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// A filesystem's own identifier for a file (ext4 inode number, NTFS MFT record number).
pub type NodeId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileKind {
    /// The letter `ls -l` shows.
    pub fn letter(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::CharDevice => "char-device",
            FileKind::BlockDevice => "block-device",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
        }
    }
}

/// A point in time at the filesystem's precision: seconds since the Unix epoch and
/// nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// `YYYY-MM-DD HH:MM:SS` in UTC.
    pub fn utc_string(self) -> String {
        let (year, month, day, secs) = self.to_civil();
        format!(
            "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        )
    }

    /// The UTC calendar date and the seconds into that day: (year, month, day, seconds).
    pub fn to_civil(self) -> (i64, i64, i64, i64) {
        // Howard Hinnant's days-to-civil algorithm.
        let days = self.secs.div_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        (year, month, day, self.secs.rem_euclid(86_400))
    }

    /// The instant of a UTC calendar date (month 1–12) plus `secs` into the day.
    pub fn from_civil(year: i64, month: i64, day: i64, secs: i64, nanos: u32) -> Timestamp {
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Timestamp {
            secs: days * 86_400 + secs,
            nanos,
        }
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub node: NodeId,
    pub kind: FileKind,
}

impl DirEntry {
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// What a filesystem records about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub node: NodeId,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (including setuid/setgid/sticky), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub links: u32,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
    pub ctime: Option<Timestamp>,
    pub crtime: Option<Timestamp>,
    /// Character and block devices: (major, minor).
    pub device: Option<(u32, u32)>,
    /// ext4 inode flags (immutable, append-only, ...), NTFS/FAT file attributes.
    pub flags: u32,
    /// Bytes the file occupies on disk.
    pub allocated: u64,
}

/// A run of a file's bytes on the disk: file offset, disk offset (relative to the
/// filesystem's start) and length, in bytes. Holes have no extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub file_offset: u64,
    pub disk_offset: u64,
    pub len: u64,
    /// Allocated but reads as zeros (ext4 unwritten extents).
    pub unwritten: bool,
}

/// Where a piece of a file's data lies in a filesystem written with `map_file_data` (ext4 or
/// FAT): bytes `fs_offset..fs_offset+len` of the volume hold the file's bytes from
/// `file_offset` on (past the file's end they read as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedData {
    pub fs_offset: u64,
    pub len: u64,
    pub node: NodeId,
    pub file_offset: u64,
}

/// Whether `fs` holds the root of a Linux system (`/etc` and an os-release file).
pub fn is_linux_root(fs: &dyn Filesystem) -> bool {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .any(|p| fs.lookup(p).is_ok())
        && fs.lookup("/etc").is_ok()
}

/// Volume-level facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub kind: FsKind,
    pub label: String,
    /// UUID or volume serial, as the filesystem's own tools print it.
    pub uuid: String,
    pub block_size: u32,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

/// Which blocks (clusters) of the volume are in use: `runs` of (first block, count), sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationMap {
    pub block_size: u32,
    pub runs: Vec<(u64, u64)>,
}

impl AllocationMap {
    pub fn used_blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// The runs as byte ranges of a volume of `size` bytes starting at byte `start` of its
    /// disk (clipped to the volume's end; runs wholly past it are left out).
    pub fn byte_ranges(&self, start: u64, size: u64) -> Vec<std::ops::Range<u64>> {
        let bs = u64::from(self.block_size);
        self.runs
            .iter()
            .map(|&(first, count)| (first * bs).min(size)..((first + count) * bs).min(size))
            .filter(|r| r.start < r.end)
            .map(|r| start + r.start..start + r.end)
            .collect()
    }
}

/// Counters a filesystem writer keeps up to date while it works, for progress displays:
/// entries it plans to write (it may still discover more) and entries written.
#[derive(Debug, Default)]
pub struct WriteCounters {
    pub planned: std::sync::atomic::AtomicU64,
    pub written: std::sync::atomic::AtomicU64,
}

impl WriteCounters {
    pub fn plan(&self, n: u64) {
        self.planned
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn wrote(&self, n: u64) {
        self.written
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    /// (written, planned).
    pub fn get(&self) -> (u64, u64) {
        (
            self.written.load(std::sync::atomic::Ordering::Relaxed),
            self.planned.load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// A filesystem opened for reading.
pub trait Filesystem: Send + Sync {
    fn info(&self) -> VolumeInfo;

    fn root(&self) -> NodeId;

    fn metadata(&self, node: NodeId) -> Result<Metadata>;

    /// The entries of a directory, without `.` and `..`.
    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>>;

    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at the end).
    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize>;

    /// A symbolic link's target, as stored.
    fn read_link(&self, node: NodeId) -> Result<Vec<u8>>;

    /// Extended attributes (ext4: every namespace, full names such as `user.x`; NTFS: alternate
    /// data streams are reported elsewhere).
    fn xattrs(&self, node: NodeId) -> Result<Vec<(String, Vec<u8>)>>;

    /// The file's Windows security descriptor (NTFS), when the filesystem keeps one for it.
    fn security_descriptor(&self, _node: NodeId) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Where the file's bytes are on disk, in file order.
    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>>;

    /// Whether `Metadata::flags` are Linux inode flags (`FS_IOC_GETFLAGS`: immutable,
    /// append-only, noatime, ...), as ext2/3/4 and host trees give them; FAT and NTFS put their
    /// file attributes there instead.
    fn flags_are_linux_inode_flags(&self) -> bool {
        false
    }

    /// The byte ranges of the file that hold data, sorted; the rest reads as zeros (holes,
    /// unwritten extents). By default, the written extents.
    fn data_ranges(&self, node: NodeId) -> Result<Vec<(u64, u64)>> {
        Ok(written_ranges(self.extents(node)?))
    }

    /// The blocks in use.
    fn allocation_map(&self) -> Result<AllocationMap>;

    /// Why a file-by-file rebuild of this volume would not hold what it holds (a feature the
    /// writer cannot represent, a journal that cannot be replayed), or `None` when it would.
    /// Auto mode then copies the volume's blocks instead, with this as the note.
    fn rebuild_obstacle(&self) -> Option<String> {
        None
    }

    /// What the reader did to present a consistent view of the volume (an ext4 journal
    /// replayed in memory, or one that could not be), for people; empty when nothing.
    fn view_notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// The device the filesystem lives on, which [`FileExtent::disk_offset`]s address — for
    /// bulk, disk-ordered reads of file data. `None` for sources without one (host trees).
    fn device(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    /// Where an earlier copy of this volume keeps the file's data (extents whose
    /// `disk_offset`s address that copy's device), when the source knows one: a writer laying
    /// out a volume of the same geometry puts the file there again where it can, so
    /// successive copies of a changing volume differ only where files changed (incremental
    /// captures, delta deploys). `None` by default: the writer lays out afresh.
    fn placement_hint(&self, _node: NodeId) -> Option<Vec<FileExtent>> {
        None
    }

    /// How many [`overlay::TreeOverlay`]s this view is made of (0: none): an overlay on
    /// another marks the nodes it adds with a bit of its own.
    fn overlay_depth(&self) -> u32 {
        0
    }

    /// Finds `path` (`/`-separated, from the root; symlinks are not followed).
    fn lookup(&self, path: &str) -> Result<NodeId> {
        let mut node = self.root();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            let meta = self.metadata(node)?;
            if meta.kind != FileKind::Dir {
                return Err(FsError::NotADirectory(path.to_string()));
            }
            node = self
                .read_dir(node)?
                .into_iter()
                .find(|e| e.name == part.as_bytes())
                .map(|e| e.node)
                .ok_or_else(|| FsError::NotFound(path.to_string()))?;
        }
        Ok(node)
    }

    /// Finds `path` following symbolic links in every component, as opening a file would
    /// (absolute targets start again from this filesystem's root; at most 40 links; `..` at
    /// the root stays at the root).
    fn resolve(&self, path: &str) -> Result<NodeId> {
        resolve_path(self, path, false)
    }

    /// Like [`Filesystem::resolve`], but a `..` — in `path` or in a link's target — that would
    /// climb above the root is an [`FsError::Escapes`] instead of staying at the root: for
    /// callers (the web UI) that must tell a path leaving the volume apart from one inside it.
    fn resolve_within(&self, path: &str) -> Result<NodeId> {
        resolve_path(self, path, true)
    }

    /// The whole content of a (small) file, refusing more than `limit` bytes.
    fn read_all(&self, node: NodeId, limit: u64) -> Result<Vec<u8>> {
        let size = self.metadata(node)?.size;
        if size > limit {
            return Err(FsError::Unsupported(format!(
                "file of {size} bytes is larger than the {limit} bytes asked for"
            )));
        }
        let mut out = vec![0u8; size as usize];
        let done = read_full(self, node, 0, &mut out)?;
        out.truncate(done);
        Ok(out)
    }
}

/// The byte ranges (file offset, length) of the extents that are written.
pub fn written_ranges(extents: Vec<FileExtent>) -> Vec<(u64, u64)> {
    extents
        .into_iter()
        .filter(|e| !e.unwritten)
        .map(|e| (e.file_offset, e.len))
        .collect()
}

/// Reads up to `buf.len()` bytes of a file at `offset`, going on after short reads; returns
/// how many there were (fewer only at the end of the file).
pub fn read_full<F: Filesystem + ?Sized>(
    fs: &F,
    node: NodeId,
    offset: u64,
    buf: &mut [u8],
) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = fs.read_at(node, offset + done as u64, &mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Path resolution shared by `resolve` and `resolve_within`.
fn resolve_path<F: Filesystem + ?Sized>(fs: &F, path: &str, strict: bool) -> Result<NodeId> {
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut stack: Vec<NodeId> = vec![fs.root()];
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        let dir = *stack.last().expect("the root is never popped");
        if part == ".." {
            if stack.len() > 1 {
                stack.pop();
            } else if strict {
                return Err(FsError::Escapes(path.to_string()));
            }
            continue;
        }
        if fs.metadata(dir)?.kind != FileKind::Dir {
            return Err(FsError::NotADirectory(path.to_string()));
        }
        let entry = fs
            .read_dir(dir)?
            .into_iter()
            .find(|e| e.name == part.as_bytes())
            .ok_or_else(|| FsError::NotFound(path.to_string()))?;
        if entry.kind == FileKind::Symlink {
            hops += 1;
            if hops > 40 {
                return Err(FsError::Corrupt(
                    path.to_string(),
                    "too many levels of symbolic links".into(),
                ));
            }
            let target = String::from_utf8_lossy(&fs.read_link(entry.node)?).into_owned();
            if target.starts_with('/') {
                stack.truncate(1);
            }
            pending.extend(components(&target).into_iter().rev());
            continue;
        }
        stack.push(entry.node);
    }
    Ok(*stack.last().expect("the root is never popped"))
}

/// `rwxr-xr-x` for permission bits, with setuid/setgid/sticky shown as `ls` does.
pub fn mode_string(mode: u32) -> String {
    let mut s: Vec<char> = "rwxrwxrwx"
        .chars()
        .enumerate()
        .map(|(i, c)| if mode & (0o400 >> i) != 0 { c } else { '-' })
        .collect();
    for (bit, at, set, unset) in [
        (0o4000, 2, 's', 'S'),
        (0o2000, 5, 's', 'S'),
        (0o1000, 8, 't', 'T'),
    ] {
        if mode & bit != 0 {
            s[at] = if s[at] == '-' { unset } else { set };
        }
    }
    s.into_iter().collect()
}

/// The non-empty, non-`.` components of a `/`-separated path.
fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(String::from)
        .collect()
}

/// Opens the filesystem on `dev` if we have a reader for it. Panics inside readers are caught
/// here and become errors.
pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Box<dyn Filesystem>> {
    let kind = detect(&*dev)?;
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => {
            ext4::Ext4::open(dev).map(|fs| Box::new(fs) as Box<dyn Filesystem>)
        }
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
            fat::Fat::open(dev).map(|fs| Box::new(fs) as Box<dyn Filesystem>)
        }
        FsKind::Ntfs => ntfs::NtfsFs::open(dev).map(|fs| Box::new(fs) as Box<dyn Filesystem>),
        other => Err(FsError::Unsupported(format!(
            "{} filesystems cannot be read yet",
            other.name()
        ))),
    }));
    opened.unwrap_or_else(|_| {
        Err(FsError::Corrupt(
            "filesystem".into(),
            "the reader failed on malformed structures".into(),
        ))
    })
}
