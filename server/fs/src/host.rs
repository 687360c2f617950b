//! A directory of this machine seen through the [`Filesystem`] trait, so the filesystem
//! writers take a host tree (`diskferry mkfs --from DIR`) exactly as they take a captured
//! filesystem. Nodes are inode numbers (hard links share one), metadata comes from `lstat`
//! (nanosecond times, birth time where the kernel reports it; inode flags from
//! `FS_IOC_GETFLAGS`), extended attributes from
//! `llistxattr`/`lgetxattr` (POSIX ACLs arrive in the VFS form), and a file's data ranges from
//! `SEEK_DATA`/`SEEK_HOLE`, so holes stay holes. The tree must live on one filesystem: a mount
//! point inside it is reported as an error for that entry, not crossed.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{
    AllocationMap, DirEntry, FileExtent, FileKind, Filesystem, FsError, FsKind, Metadata, NodeId,
    Result, Timestamp, VolumeInfo,
};

/// Largest single extended attribute value read (the Linux VFS limit is 64 KiB).
const MAX_XATTR: usize = 64 << 10;

pub struct HostFs {
    root: PathBuf,
    root_node: NodeId,
    dev: u64,
    paths: Mutex<HashMap<NodeId, PathBuf>>,
}

fn io_err(path: &Path, e: std::io::Error) -> FsError {
    FsError::Io(diskferry_blockdev::BlockError::Io {
        op: "read",
        offset: None,
        device: path.display().to_string(),
        source: e,
    })
}

/// The file's inode flags (`FS_IOC_GETFLAGS`); 0 where the filesystem has none.
fn inode_flags(path: &Path) -> u32 {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .ok()
        .and_then(|f| rustix::fs::ioctl_getflags(&f).ok())
        .map_or(0, |f| f.bits())
}

fn kind_of(ft: std::fs::FileType) -> FileKind {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_char_device() {
        FileKind::CharDevice
    } else if ft.is_block_device() {
        FileKind::BlockDevice
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else {
        FileKind::File
    }
}

impl HostFs {
    pub fn open(root: &Path) -> Result<HostFs> {
        let meta = std::fs::symlink_metadata(root).map_err(|e| io_err(root, e))?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(root.display().to_string()));
        }
        let mut paths = HashMap::new();
        paths.insert(meta.ino(), root.to_path_buf());
        Ok(HostFs {
            root: root.to_path_buf(),
            root_node: meta.ino(),
            dev: meta.dev(),
            paths: Mutex::new(paths),
        })
    }

    fn path(&self, node: NodeId) -> Result<PathBuf> {
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .cloned()
            .ok_or_else(|| FsError::NotFound(format!("inode {node} under {}", self.root.display())))
    }
}

impl Filesystem for HostFs {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            kind: FsKind::Unknown,
            label: String::new(),
            uuid: String::new(),
            block_size: 4096,
            total_bytes: 0,
            used_bytes: 0,
        }
    }

    fn root(&self) -> NodeId {
        self.root_node
    }

    fn flags_are_linux_inode_flags(&self) -> bool {
        true
    }

    fn metadata(&self, node: NodeId) -> Result<Metadata> {
        let path = self.path(node)?;
        let m = std::fs::symlink_metadata(&path).map_err(|e| io_err(&path, e))?;
        let kind = kind_of(m.file_type());
        let ts = |secs: i64, nanos: i64| {
            Some(Timestamp {
                secs,
                nanos: nanos.clamp(0, 999_999_999) as u32,
            })
        };
        let crtime = m.created().ok().and_then(|t| {
            let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
            Some(Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            })
        });
        let rdev = m.rdev();
        let device = matches!(kind, FileKind::CharDevice | FileKind::BlockDevice).then(|| {
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
            (major as u32, minor as u32)
        });
        Ok(Metadata {
            node,
            kind,
            size: if kind == FileKind::Dir { 0 } else { m.size() },
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            links: m.nlink() as u32,
            atime: ts(m.atime(), m.atime_nsec()),
            mtime: ts(m.mtime(), m.mtime_nsec()),
            ctime: ts(m.ctime(), m.ctime_nsec()),
            crtime,
            device,
            flags: if matches!(kind, FileKind::File | FileKind::Dir) {
                inode_flags(&path)
            } else {
                0
            },
            allocated: m.blocks() * 512,
        })
    }

    fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let path = self.path(dir)?;
        let mut out = Vec::new();
        let mut found = Vec::new();
        for e in std::fs::read_dir(&path).map_err(|e| io_err(&path, e))? {
            let e = e.map_err(|e| io_err(&path, e))?;
            let child = e.path();
            let m = std::fs::symlink_metadata(&child).map_err(|e| io_err(&child, e))?;
            if m.dev() != self.dev {
                return Err(FsError::Unsupported(format!(
                    "{} is another filesystem mounted inside the tree",
                    child.display()
                )));
            }
            use std::os::unix::ffi::OsStrExt;
            out.push(DirEntry {
                name: e.file_name().as_bytes().to_vec(),
                node: m.ino(),
                kind: kind_of(m.file_type()),
            });
            found.push((m.ino(), child));
        }
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        for (ino, p) in found {
            paths.entry(ino).or_insert(p);
        }
        Ok(out)
    }

    fn read_at(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let path = self.path(node)?;
        let f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
        let mut done = 0;
        while done < buf.len() {
            let n = f
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(|e| io_err(&path, e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn read_link(&self, node: NodeId) -> Result<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let path = self.path(node)?;
        let target = std::fs::read_link(&path).map_err(|e| io_err(&path, e))?;
        Ok(target.as_os_str().as_bytes().to_vec())
    }

    fn xattrs(&self, node: NodeId) -> Result<Vec<(String, Vec<u8>)>> {
        let path = self.path(node)?;
        let err = |e: rustix::io::Errno| io_err(&path, std::io::Error::from(e));
        let mut names = vec![0u8; 64 << 10];
        let n = match rustix::fs::llistxattr(&path, &mut names) {
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let mut out = Vec::new();
        for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            let mut value = vec![0u8; MAX_XATTR];
            let len = rustix::fs::lgetxattr(&path, name.as_str(), &mut value).map_err(err)?;
            value.truncate(len);
            out.push((name, value));
        }
        out.sort();
        Ok(out)
    }

    /// The file's data ranges (`SEEK_DATA`/`SEEK_HOLE`); `disk_offset` is the file offset, as
    /// a host file has no disk of ours.
    fn extents(&self, node: NodeId) -> Result<Vec<FileExtent>> {
        let path = self.path(node)?;
        let f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
        let size = f.metadata().map_err(|e| io_err(&path, e))?.len();
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(pos as i64)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(io_err(&path, e.into())),
            };
            let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(data as i64))
                .map_err(|e| io_err(&path, e.into()))?;
            out.push(FileExtent {
                file_offset: data,
                disk_offset: data,
                len: hole.min(size) - data,
                unwritten: false,
            });
            pos = hole;
        }
        Ok(out)
    }

    fn allocation_map(&self) -> Result<AllocationMap> {
        Err(FsError::Unsupported(
            "a host directory has no allocation map".into(),
        ))
    }
}
