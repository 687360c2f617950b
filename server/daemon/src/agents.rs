//! Dial-back agents: machines booted into the PXE environment connect to the server's agent
//! port, authenticate with the key, and are asked who they are (`Identify`). Each becomes (or
//! is matched to) a machine in the catalog's registry, and its connection is kept here so jobs
//! can open its disks and ask it to reboot. When a connection ends, the machine is offline
//! until it dials again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diskferry_protocol::SessionOptions;
use tokio::net::TcpListener;

use crate::catalog::{Catalog, MachineIdentity};
use diskferry_remote::Connection;

/// How long a new connection may take to say who it is.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why an agent that connected was not registered.
#[derive(Debug, thiserror::Error)]
enum WelcomeError {
    #[error(transparent)]
    Handshake(#[from] diskferry_remote::ConnectError),
    #[error("did not say who it is in time")]
    IdentifyTimeout,
    #[error("identify: {0}")]
    Identify(#[source] diskferry_blockdev::BlockError),
    #[error("unreadable identity: {0}")]
    Identity(#[from] serde_json::Error),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("the server is stopping")]
    Stopped,
}

/// One connected machine.
#[derive(Clone)]
pub struct AgentLink {
    pub machine_id: i64,
    pub connection: Connection,
    pub identity: MachineIdentity,
    /// The address it connected from.
    pub peer: String,
    /// Tells this link apart from a newer one of the same machine.
    serial: u64,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink")
            .field("machine_id", &self.machine_id)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The connected agents.
pub struct Agents {
    catalog: Arc<Catalog>,
    session: SessionOptions,
    links: Mutex<HashMap<i64, AgentLink>>,
    next_serial: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agents").finish_non_exhaustive()
    }
}

impl Agents {
    /// `session` is the controller side's options (the key the agents hold).
    pub fn new(catalog: Arc<Catalog>, session: SessionOptions) -> Agents {
        Agents {
            catalog,
            session,
            links: Mutex::new(HashMap::new()),
            next_serial: Default::default(),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<i64, AgentLink>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection of a machine, if it is connected.
    pub fn link(&self, machine_id: i64) -> Option<AgentLink> {
        self.links().get(&machine_id).cloned()
    }

    /// Ids of the machines connected now.
    pub fn online(&self) -> Vec<i64> {
        self.links().keys().copied().collect()
    }

    /// Accepts agents forever.
    pub async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("agent port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = me.welcome(stream, peer.to_string()).await {
                    tracing::warn!(%peer, "agent {peer}: {e}");
                }
            });
        }
    }

    /// Authenticates one agent, registers its machine and keeps its connection until it ends.
    async fn welcome(
        &self,
        stream: tokio::net::TcpStream,
        peer: String,
    ) -> Result<(), WelcomeError> {
        let conn = Connection::accept(stream, &self.session, peer.clone()).await?;
        let doc = tokio::time::timeout(IDENTIFY_TIMEOUT, conn.identify())
            .await
            .map_err(|_| WelcomeError::IdentifyTimeout)?
            .map_err(WelcomeError::Identify)?;
        let identity: MachineIdentity = serde_json::from_str(&doc)?;
        let catalog = Arc::clone(&self.catalog);
        let id2 = identity.clone();
        let machine_id = tokio::task::spawn_blocking(move || catalog.machine_seen(&id2))
            .await
            .map_err(|_| WelcomeError::Stopped)??;
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            machine = machine_id,
            %peer,
            "machine {machine_id} ({}) connected from {peer}",
            identity.macs.join(" ")
        );
        self.links().insert(
            machine_id,
            AgentLink {
                machine_id,
                connection: conn.clone(),
                identity,
                peer: peer.clone(),
                serial,
            },
        );
        conn.closed().await;
        let mut links = self.links();
        if links.get(&machine_id).is_some_and(|l| l.serial == serial) {
            links.remove(&machine_id);
        }
        drop(links);
        tracing::info!(machine = machine_id, %peer, "machine {machine_id} ({peer}) disconnected");
        Ok(())
    }
}

/// Waiting for a dial-back machine to call in again, for a [`ReconnectingDisk`]: a machine
/// whose connection dropped (agent restarted, network blip) is back once it has re-registered.
///
/// [`ReconnectingDisk`]: diskferry_remote::ReconnectingDisk
pub struct AgentRedial {
    pub agents: Arc<Agents>,
    pub machine_id: i64,
    pub label: String,
}

impl diskferry_remote::Redial for AgentRedial {
    fn describe(&self) -> String {
        format!("machine {}", self.label)
    }

    fn redial(
        &self,
        _rt: &tokio::runtime::Handle,
    ) -> Result<Connection, diskferry_remote::RedialError> {
        self.agents
            .link(self.machine_id)
            .map(|l| l.connection)
            .filter(|c| c.closed_reason().is_none())
            .ok_or_else(|| {
                diskferry_remote::RedialError::NotBack(format!("machine {}", self.label))
            })
    }
}
