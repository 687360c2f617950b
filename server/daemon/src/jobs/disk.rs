//! Where a job reads (captures) or writes (deploys) a disk: a machine connected over the agent
//! port (`MACHINE` or `DISK@MACHINE`: its name, MAC address or id) or a listening client
//! (`DISK@HOST:PORT`). Resolving checks the request; opening goes through the imaging crate's
//! one path for remote disks, so every job's disk survives its client going away.

use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_imaging::source::{
    open_on_connection, open_source, open_target, SourceError, SourceSpec, DEFAULT_RECONNECT,
};
use diskferry_protocol::{Psk, Role, SessionOptions};

use super::JobError;
use crate::agents::{AgentRedial, Agents};
use crate::catalog::Catalog;

/// A job's disk.
#[derive(Debug, Clone)]
pub enum JobDisk {
    /// A disk of a listening client, `DISK@HOST:PORT`.
    Listening { disk: String, addr: String },
    /// A disk of a machine connected over the agent port.
    Machine {
        id: i64,
        label: String,
        disk: String,
    },
}

/// Why a job's disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("machine {0} disconnected")]
    Disconnected(String),
    #[error(transparent)]
    Key(#[from] diskferry_protocol::key::KeyError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl JobDisk {
    pub fn describe(&self) -> String {
        match self {
            JobDisk::Listening { disk, addr } => format!("{disk} on {addr}"),
            JobDisk::Machine { label, disk, .. } => format!("{disk} on machine {label}"),
        }
    }

    /// What the catalog records as the capture's source machine.
    pub fn origin(&self) -> String {
        match self {
            JobDisk::Listening { addr, .. } => addr.clone(),
            JobDisk::Machine { label, .. } => label.clone(),
        }
    }

    pub fn machine(&self) -> Option<i64> {
        match self {
            JobDisk::Machine { id, .. } => Some(*id),
            JobDisk::Listening { .. } => None,
        }
    }

    /// `MACHINE` or `DISK@MACHINE` (a registered name, MAC address or id of a connected
    /// machine; without DISK, its only disk), else `DISK@HOST:PORT` of a listening client.
    pub fn resolve(raw: &str, catalog: &Catalog, agents: &Agents) -> Result<JobDisk, JobError> {
        let (disk, who) = match raw.rsplit_once('@') {
            Some((d, w)) => (Some(d), w),
            None => (None, raw),
        };
        if let Some(m) = catalog.find_machine(who)? {
            let label = m.name.clone().unwrap_or_else(|| m.macs.join(","));
            let link = agents.link(m.id).ok_or_else(|| {
                JobError::Conflict(format!(
                    "machine {label} is not connected: boot it into the diskferry PXE environment first"
                ))
            })?;
            let names: Vec<&str> = link
                .identity
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            let disk = pick_disk(disk, &names, &label, who)?;
            return Ok(JobDisk::Machine {
                id: m.id,
                label,
                disk,
            });
        }
        match (disk, SourceSpec::parse(raw)) {
            (Some(_), SourceSpec::Remote { disk, addr }) => Ok(JobDisk::Listening { disk, addr }),
            _ => Err(JobError::Invalid(format!(
                "{raw:?} is neither a known machine (name or MAC address) nor DISK@HOST:PORT of a listening diskferry-client"
            ))),
        }
    }

    /// Opens the disk, for reading (captures) or writing (deploys).
    pub fn open(
        &self,
        rt: &tokio::runtime::Handle,
        agents: &Arc<Agents>,
        key_file: &Path,
        writable: bool,
    ) -> Result<Arc<dyn BlockDevice>, OpenError> {
        match self {
            JobDisk::Listening { disk, addr } => {
                let psk = Psk::from_file(key_file)?;
                let session = SessionOptions::new(Role::Controller, psk);
                let spec = SourceSpec::Remote {
                    disk: disk.clone(),
                    addr: addr.clone(),
                };
                Ok(if writable {
                    open_target(&spec, rt, Some(&session), DEFAULT_RECONNECT)?
                } else {
                    open_source(&spec, rt, Some(&session), false, DEFAULT_RECONNECT)?
                })
            }
            JobDisk::Machine { id, label, disk } => {
                let link = agents
                    .link(*id)
                    .ok_or_else(|| OpenError::Disconnected(label.clone()))?;
                // If the machine drops off mid-job (agent restarted, network blip), wait for it
                // to dial back and carry on.
                let redial = Arc::new(AgentRedial {
                    agents: Arc::clone(agents),
                    machine_id: *id,
                    label: label.clone(),
                });
                Ok(open_on_connection(
                    rt,
                    &link.connection,
                    disk,
                    writable,
                    redial,
                    DEFAULT_RECONNECT,
                )?)
            }
        }
    }
}

/// The disk a request names on a machine, or its only disk.
fn pick_disk(
    asked: Option<&str>,
    names: &[&str],
    label: &str,
    who: &str,
) -> Result<String, JobError> {
    match asked {
        Some(d) if names.contains(&d) => Ok(d.to_string()),
        Some(d) => Err(JobError::Invalid(format!(
            "machine {label} has no disk {d}; its disks: {}",
            names.join(", ")
        ))),
        None if names.len() == 1 => Ok(names[0].to_string()),
        None => Err(JobError::Invalid(format!(
            "machine {label} has {} disks; name one as DISK@{who}: {}",
            names.len(),
            names.join(", ")
        ))),
    }
}
