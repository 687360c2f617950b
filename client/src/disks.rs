//! The disks this client serves: discovery (sysfs or `--disk` paths) and positional sector I/O.
//!
//! Nothing here understands a filesystem. The I/O itself is positional (see `diskferry_localdisk`),
//! so any number of requests can run on one open disk at once.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use diskferry_localdisk::{LocalDisk, Region};
use diskferry_protocol::chunks::{self, ChunkHash};
use diskferry_protocol::stream::{data_reply_buffer, DATA_HEADROOM};
use diskferry_protocol::{BlockState, DiskInfo, ErrorCode, Extent};

use crate::live::direct::DirectWriter;
use crate::live::{Live, TableWrite};

/// Most extents one BlockStatus reply carries; the requester asks again for the rest.
pub(crate) const MAX_STATUS_EXTENTS: usize = 4096;

/// A disk the client was told (or found) to serve.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// The name announced to the server: the path as given, or `/dev/NAME`.
    pub name: String,
}

/// The disks to serve: exactly the `--disk` paths, or every whole disk in /sys/block (not
/// loop, RAM, optical or floppy devices).
pub fn discover(explicit: &[PathBuf]) -> Vec<DiskSpec> {
    if !explicit.is_empty() {
        return explicit
            .iter()
            .map(|p| DiskSpec {
                path: p.clone(),
                name: p.display().to_string(),
            })
            .collect();
    }
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Not disks to image: loop and RAM devices, optical drives (sr), floppies (fd).
        if ["loop", "ram", "zram", "sr", "fd"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        // Empty drives (no medium, unconfigured nbd) report size 0: nothing to serve.
        if read_sys(&entry.path().join("size"))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            == 0
        {
            continue;
        }
        found.push(DiskSpec {
            path: PathBuf::from(format!("/dev/{name}")),
            name: format!("/dev/{name}"),
        });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

fn read_sys(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Describes a disk without opening it for I/O. `allow_write` is the client's own setting.
pub fn describe(spec: &DiskSpec, allow_write: bool) -> io::Result<DiskInfo> {
    let meta = std::fs::metadata(&spec.path)?;
    let mut info = DiskInfo {
        name: spec.name.clone(),
        logical_sector: 512,
        physical_sector: 512,
        read_only: !allow_write || meta.permissions().readonly(),
        ..DiskInfo::default()
    };
    if meta.file_type().is_block_device() {
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            rustix::fs::major(meta.rdev()),
            rustix::fs::minor(meta.rdev())
        ));
        let num = |rel: &str| read_sys(&sys.join(rel)).and_then(|s| s.parse::<u64>().ok());
        info.size = match num("size") {
            Some(sectors) => sectors * 512,
            None => LocalDisk::open(&spec.path, false)?.size(),
        };
        info.logical_sector = num("queue/logical_block_size").unwrap_or(512) as u32;
        info.physical_sector = num("queue/physical_block_size").unwrap_or(512) as u32;
        info.rotational = num("queue/rotational") == Some(1);
        info.read_only |= num("ro") == Some(1);
        info.model = read_sys(&sys.join("device/model")).unwrap_or_default();
        info.serial = read_sys(&sys.join("device/serial"))
            .or_else(|| read_sys(&sys.join("device/wwid")))
            .unwrap_or_default();
    } else if meta.file_type().is_file() {
        info.size = meta.len();
        info.model = "regular file".into();
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a block device nor a regular file",
        ));
    }
    Ok(info)
}

/// An opened disk, shared between concurrent requests.
#[derive(Debug)]
pub struct OpenDisk {
    disk: LocalDisk,
    pub size: u64,
    pub writable: bool,
    /// On a live agent: writes are checked against the pinned file and go direct.
    live: Option<LiveDisk>,
}

/// A disk written by a live agent: only inside its pinned file, with direct I/O.
#[derive(Debug)]
struct LiveDisk {
    live: Arc<Live>,
    /// The disk's device number (0 for a regular file: never holds the live file).
    devno: u64,
    direct: DirectWriter,
}

/// An error answered to the requester.
#[derive(Debug)]
pub struct DiskError {
    pub code: ErrorCode,
    pub message: String,
}

impl DiskError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        DiskError {
            code,
            message: message.into(),
        }
    }

    /// The one place where OS errors become wire error codes.
    fn io(op: &str, offset: u64, e: io::Error) -> Self {
        let code = match e.kind() {
            io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
            io::ErrorKind::Unsupported => ErrorCode::Unsupported,
            _ if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
                ErrorCode::Unsupported
            }
            _ => ErrorCode::Io,
        };
        DiskError::new(code, format!("{op} at offset {offset}: {e}"))
    }
}

impl OpenDisk {
    /// Opens the disk; `live` (a live agent's) restricts writes to its pinned file.
    pub fn open(
        spec: &DiskSpec,
        writable: bool,
        live: Option<Arc<Live>>,
    ) -> Result<OpenDisk, DiskError> {
        let disk =
            LocalDisk::open(&spec.path, writable).map_err(|e| DiskError::io("open", 0, e))?;
        let live = match live.filter(|_| writable) {
            Some(live) => {
                let meta =
                    std::fs::metadata(&spec.path).map_err(|e| DiskError::io("open", 0, e))?;
                let devno = if meta.file_type().is_block_device() {
                    meta.rdev()
                } else {
                    0
                };
                let sector = describe(spec, true).map_or(512, |i| i.logical_sector);
                let direct = DirectWriter::open(&spec.path, sector)
                    .map_err(|e| DiskError::io("open for direct I/O", 0, e))?;
                Some(LiveDisk {
                    live,
                    devno,
                    direct,
                })
            }
            None => None,
        };
        Ok(OpenDisk {
            size: disk.size(),
            writable,
            disk,
            live,
        })
    }

    /// Runs `io` (a write, zeroing or discard of `len` bytes at `offset`), on a live agent
    /// only inside its pinned file — or, with `data` given, as a partition-table write — and
    /// with the file kept while it runs.
    fn guarded(
        &self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        io: impl FnOnce() -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let Some(l) = &self.live else {
            return io();
        };
        // Sector 0 is read only for a write outside the file (a table write, or a refusal).
        let sector0 = || {
            let mut s = vec![0u8; 512];
            self.disk.read_exact_at(&mut s, 0).ok().map(|()| s)
        };
        let table = data.map(|data| TableWrite {
            data,
            sector0: &sector0,
            disk_size: self.size,
            sector: l.direct.sector(),
        });
        l.live.guarded(l.devno, offset, len, table, io)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::new(
                ErrorCode::OutOfRange,
                format!(
                    "range {offset}+{len} is beyond the end of the disk ({} bytes)",
                    self.size
                ),
            )),
        }
    }

    fn check_writable(&self) -> Result<(), DiskError> {
        if self.writable {
            Ok(())
        } else {
            Err(DiskError::new(
                ErrorCode::ReadOnly,
                "disk is open read-only",
            ))
        }
    }

    /// Validates a read before the caller allocates its buffer.
    pub fn check_read(&self, offset: u64, len: u32) -> Result<(), DiskError> {
        self.check_range(offset, len.into())
    }

    /// Reads straight into a data-reply buffer, so the payload is never copied again.
    pub fn read_reply(&self, offset: u64, len: u32) -> Result<BytesMut, DiskError> {
        self.check_read(offset, len)?;
        let mut buf = data_reply_buffer(len as usize);
        self.disk
            .read_exact_at(&mut buf[DATA_HEADROOM..], offset)
            .map_err(|e| DiskError::io("read", offset, e))?;
        Ok(buf)
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        self.guarded(offset, data.len() as u64, Some(data), || {
            match &self.live {
                Some(l) => l.direct.write_at(data, offset),
                None => self.disk.write_all_at(data, offset),
            }
            .map_err(|e| DiskError::io("write", offset, e))
        })
    }

    pub fn flush(&self) -> Result<(), DiskError> {
        if !self.writable {
            return Ok(());
        }
        if let Some(l) = &self.live {
            l.direct.sync().map_err(|e| DiskError::io("flush", 0, e))?;
        }
        self.disk.sync().map_err(|e| DiskError::io("flush", 0, e))
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.guarded(offset, len, None, || {
            self.disk
                .punch_hole(offset, len)
                .map_err(|e| DiskError::io("discard", offset, e))
        })
    }

    /// Makes the range read as zeros, here on the client (nothing crosses the wire).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.guarded(offset, len, None, || {
            self.disk
                .zero_range(offset, len)
                .map_err(|e| DiskError::io("write zeroes", offset, e))
        })
    }

    /// BLAKE3 of each `chunk`-byte piece of `offset..offset+len` (the last one shorter), as
    /// `chunks::hash_range` reads and hashes them.
    pub fn hash_chunks(
        &self,
        offset: u64,
        len: u64,
        chunk: u32,
    ) -> Result<Vec<ChunkHash>, DiskError> {
        chunks::hash_count(len, chunk).map_err(|why| DiskError::new(ErrorCode::TooLarge, why))?;
        self.check_range(offset, len)?;
        chunks::hash_range(offset, len, chunk, |buf, at| {
            self.disk
                .read_exact_at(buf, at)
                .map_err(|e| DiskError::io("read", at, e))
        })
    }

    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        if offset >= self.size {
            return Err(DiskError::new(
                ErrorCode::OutOfRange,
                format!("offset {offset} is at or beyond the end of the disk"),
            ));
        }
        let regions = self
            .disk
            .regions(offset, len, MAX_STATUS_EXTENTS)
            .map_err(|e| DiskError::io("seek", offset, e))?;
        Ok(regions
            .into_iter()
            .map(|(len, r)| Extent {
                len,
                state: match r {
                    Region::Data => BlockState::Data,
                    Region::Zero => BlockState::Zero,
                    Region::Unknown => BlockState::Unknown,
                },
            })
            .collect())
    }
}
