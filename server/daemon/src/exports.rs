//! The server's NBD exports, read-only, opened when a client names one: every capture in the
//! catalog under its path in the captures directory (`nbd://127.0.0.1:10809/web/monday.qcow2`;
//! an overlay through its backing chain, which must stay inside the captures directory), and
//! every disk of a connected, approved machine as `DISK@MACHINE` (`nbd://…/sda@web01`: the
//! live disk, read through the machine's agent link); and the VM that runs a capture from
//! there ([`vm_for`]).

use std::sync::Arc;

use diskferry_blockdev::CancelFlag;
use diskferry_imaging::vmconfig::{firmware_of, is_windows, normalize_mac, VmConfig, VmDisk};
use diskferry_nbd::{Export, ExportSource, ListenAddr};

use crate::catalog::{CaptureRecord, Catalog};
use crate::jobs::Jobs;

/// Captures, looked up in the catalog per client, then machines' disks.
pub struct ServerExports {
    catalog: Arc<Catalog>,
    jobs: Arc<Jobs>,
    rt: tokio::runtime::Handle,
}

impl ServerExports {
    /// `rt` runs the machines' agent links.
    pub fn new(catalog: Arc<Catalog>, jobs: Arc<Jobs>, rt: tokio::runtime::Handle) -> Self {
        ServerExports { catalog, jobs, rt }
    }

    fn capture(&self, name: &str) -> Option<Export> {
        let rec = self
            .catalog
            .captures()
            .ok()?
            .into_iter()
            .find(|c| c.path == name)?;
        let image = self.catalog.captures_dir().join(&rec.path);
        let device = match self.catalog.open_capture(&image) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(capture = %rec.path, "not exported: {e}");
                return None;
            }
        };
        Some(Export {
            name: rec.path.clone(),
            description: description(&rec),
            device,
            writable: false,
        })
    }

    fn machine_disk(&self, name: &str) -> Option<Export> {
        let (disk, device) =
            match self
                .jobs
                .open_machine_disk(name, &self.rt, &CancelFlag::default())
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::info!(export = name, "not exported: {e}");
                    return None;
                }
            };
        Some(Export {
            name: name.to_string(),
            description: format!("{}, live, read-only", disk.describe()),
            device,
            writable: false,
        })
    }
}

impl ExportSource for ServerExports {
    /// There is no default export: a client names the capture or the machine's disk.
    fn find(&self, name: &str) -> Option<Export> {
        if name.is_empty() {
            return None;
        }
        self.capture(name).or_else(|| self.machine_disk(name))
    }

    /// The captures a client can open (an overlay whose chain leaves the captures directory,
    /// or an unreadable image, is not listed: `nbdinfo --list` opens every one it is told of),
    /// then the disks of the machines connected now.
    fn list(&self) -> Vec<(String, String)> {
        let captures = self.catalog.captures().unwrap_or_default();
        let dir = self.catalog.captures_dir();
        let mut out: Vec<(String, String)> = captures
            .iter()
            .filter(|c| self.catalog.open_capture(&dir.join(&c.path)).is_ok())
            .map(|c| (c.path.clone(), description(c)))
            .collect();
        out.extend(
            self.jobs
                .machine_disks()
                .into_iter()
                .map(|d| (d.export, d.description)),
        );
        out
    }
}

fn description(rec: &CaptureRecord) -> String {
    match (&rec.source_machine, &rec.source_disk) {
        (Some(m), Some(d)) => format!("capture of {d} on {m}"),
        _ => format!("capture {}", rec.name),
    }
}

/// A VM that runs `rec` from the server's NBD port `nbd`: firmware and devices from its
/// analysis, NICs, memory and CPUs from the machine it was captured from (2 GiB and 2 CPUs
/// when that is unknown).
pub fn vm_for(catalog: &Catalog, rec: &CaptureRecord, nbd: &ListenAddr) -> VmConfig {
    let identity = rec
        .source_machine
        .as_deref()
        .and_then(|m| catalog.find_machine(m).ok().flatten())
        .and_then(|m| m.identity);
    let (macs, memory_mib, cpus) = match &identity {
        Some(id) => (
            id.macs.iter().filter_map(|m| normalize_mac(m)).collect(),
            (id.memory >> 20).clamp(512, 1 << 20),
            id.cpus.clamp(1, 64),
        ),
        None => (Vec::new(), 2048, 2),
    };
    let (firmware, windows) = match &rec.analysis {
        Some(report) => (firmware_of(report), is_windows(report)),
        None => (diskferry_imaging::vmconfig::Firmware::Bios, false),
    };
    let stem = rec
        .name
        .rsplit_once('.')
        .map_or(rec.name.as_str(), |(s, _)| s);
    VmConfig {
        name: stem.to_string(),
        firmware,
        emulated_devices: windows,
        memory_mib,
        cpus,
        macs,
        disk: match nbd {
            ListenAddr::Tcp(a) => VmDisk::Nbd {
                host: a.ip().to_string(),
                port: a.port(),
                export: rec.path.clone(),
            },
            ListenAddr::Unix(socket) => VmDisk::NbdUnix {
                socket: socket.clone(),
                export: rec.path.clone(),
            },
        },
    }
}
