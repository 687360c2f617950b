//! Where a job reads (captures) or writes (deploys) a disk: a machine connected over the agent
//! port (`MACHINE` or `DISK@MACHINE`: its name, MAC address or id) or a listening client
//! (`DISK@HOST:PORT`). Resolving checks the request; opening goes through the imaging crate's
//! one path for remote disks, so every job's disk survives its client going away.

use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_blockdev::CancelFlag;
use diskferry_imaging::source::{
    open_on_connection, open_source, open_target, Patience, SourceError, SourceSpec,
    DEFAULT_RECONNECT,
};
use diskferry_protocol::SessionOptions;

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
    #[error("machine {0} disconnected, or its agent is not the approved one")]
    Disconnected(String),
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

    /// The disk's name on its machine or client.
    pub fn disk(&self) -> &str {
        match self {
            JobDisk::Listening { disk, .. } | JobDisk::Machine { disk, .. } => disk,
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
            let link = approved_link(&m, &label, agents)?;
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

    /// Opens the disk, for reading (captures) or writing (deploys); every wait on it (a reply,
    /// a reconnection) ends when `cancel` is raised.
    pub fn open(
        &self,
        rt: &tokio::runtime::Handle,
        agents: &Arc<Agents>,
        session: &SessionOptions,
        writable: bool,
        cancel: &CancelFlag,
    ) -> Result<Arc<dyn BlockDevice>, OpenError> {
        let patience = Patience {
            reconnect: DEFAULT_RECONNECT,
            cancel: Some(cancel.clone()),
        };
        match self {
            JobDisk::Listening { disk, addr } => {
                let session = Some(session);
                let spec = SourceSpec::Remote {
                    disk: disk.clone(),
                    addr: addr.clone(),
                };
                Ok(if writable {
                    open_target(&spec, rt, session, patience)?
                } else {
                    open_source(&spec, rt, session, false, patience)?
                })
            }
            JobDisk::Machine { id, label, disk } => {
                let link = agents
                    .approved_link(*id)
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
                    patience,
                )?)
            }
        }
    }
}

/// The machine's link, if it is connected and its agent is approved.
fn approved_link(
    m: &crate::catalog::MachineRecord,
    label: &str,
    agents: &Agents,
) -> Result<crate::agents::AgentLink, JobError> {
    if let Some(link) = agents.approved_link(m.id) {
        return Ok(link);
    }
    Err(JobError::Conflict(match (&m.pending, agents.link(m.id)) {
        (Some(p), Some(_)) => format!(
            "machine {label} is connected but awaits approval ({}): approve it with `diskferry machines approve {}` or on its page",
            p.reason, m.id
        ),
        (_, Some(_)) => format!("machine {label} is connected, but not with its approved agent key"),
        (_, None) => format!(
            "machine {label} is not connected: boot it into the diskferry PXE environment first"
        ),
    }))
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
