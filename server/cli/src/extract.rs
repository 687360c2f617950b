//! Writing files out of an image (`get`) without letting the image choose where they land.
//! Names from a filesystem are data: a name that is empty, `.` or `..`, or holds `/` or NUL is
//! refused (with its whole subtree). Everything is created relative to directory handles this
//! module opened itself, with no-follow semantics, and never over an existing entry: a symlink
//! extracted a moment ago is never followed, and a later entry with the same name fails
//! instead of writing through it. A file whose read fails is removed, not left empty. Run as
//! root, owners are restored.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};
use diskferry_fs::{Filesystem, Metadata, Timestamp};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps, CWD};

/// A name an image gives that may become a file name here, or why not.
fn check_name(name: &[u8]) -> Result<&OsStr> {
    Ok(diskferry_fs::tree::check_name(name)?)
}

/// A directory this module created (or the destination), as an open handle.
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// The destination directory, created if missing (the user chose it: it may be anywhere).
    pub fn destination(path: &Path) -> Result<Dir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Dir { fd })
    }

    /// A new subdirectory `name` (never an existing one: an image cannot make us enter a
    /// directory or link that is already there); returns its checked name.
    pub fn make_dir(&self, name: &[u8]) -> Result<OsString> {
        let name = check_name(name)?;
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o700))
            .with_context(|| format!("cannot create directory {name:?}"))?;
        Ok(name.to_os_string())
    }

    /// A directory below this one that this module made, reached name by name without
    /// following any link.
    pub fn open_below(&self, names: &[OsString]) -> Result<Dir> {
        let mut fd = rustix::fs::openat(&self.fd, ".", DIR_FLAGS, Mode::empty())?;
        for name in names {
            fd = rustix::fs::openat(&fd, name.as_os_str(), DIR_FLAGS, Mode::empty())
                .with_context(|| format!("cannot open directory {name:?}"))?;
        }
        Ok(Dir { fd })
    }

    /// Writes a regular file `name` with the bytes of `meta.node`; removed again if reading
    /// fails.
    pub fn write_file(&self, name: &[u8], fs: &dyn Filesystem, meta: &Metadata) -> Result<()> {
        let name = check_name(name)?;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("cannot create {name:?}"))?;
        let mut file = std::fs::File::from(fd);
        if let Err(e) = crate::browse::copy_out(fs, meta.node, meta.size, &mut file) {
            drop(file);
            let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
            return Err(e.context(format!("{name:?} not written")));
        }
        restore(file.as_fd(), meta)
    }

    /// A symbolic link `name` holding `target` as it is (never followed here).
    pub fn write_symlink(&self, name: &[u8], target: &[u8], meta: &Metadata) -> Result<()> {
        let name = check_name(name)?;
        use std::os::unix::ffi::OsStrExt;
        rustix::fs::symlinkat(OsStr::from_bytes(target), &self.fd, name)
            .with_context(|| format!("cannot create symlink {name:?}"))?;
        if rustix::process::geteuid().is_root() {
            // The link itself, reached through our directory's handle, never followed.
            use std::os::fd::AsRawFd;
            let path = Path::new("/proc/self/fd")
                .join(self.fd.as_raw_fd().to_string())
                .join(name);
            std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                .with_context(|| format!("cannot restore the owner of {name:?}"))?;
        }
        Ok(())
    }

    /// Gives the directory its mode, owner and times (last, once nothing more is written).
    pub fn finish(&self, meta: &Metadata) -> Result<()> {
        restore(self.fd.as_fd(), meta)
    }
}

/// How directories are opened: never through a link.
const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC);

/// Mode, times and (as root) owner of an entry we created, through its handle.
fn restore(fd: BorrowedFd<'_>, meta: &Metadata) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::fchown(fd, Some(meta.uid), Some(meta.gid))
            .context("cannot restore the owner")?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777))
        .context("cannot set the mode")?;
    let at = |t: Option<Timestamp>| match t {
        Some(t) => Timespec {
            tv_sec: t.secs,
            tv_nsec: i64::from(t.nanos),
        },
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
    };
    let times = Timestamps {
        last_access: at(meta.atime),
        last_modification: at(meta.mtime),
    };
    rustix::fs::futimens(fd, &times).context("cannot set the times")
}
