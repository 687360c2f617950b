//! Dial-back agents: machines booted into the PXE environment connect to the server's agent
//! port, prove they talk to this server (Noise `XK`: they pin its public key), show their own
//! key and, when booted through `/boot.ipxe`, a one-time enrollment token; then they are asked
//! who they are (`Identify`). Enrollment (`Catalog::enroll`) maps the agent to one machine and
//! says whether its key is approved; the connection is kept here so jobs can open its disks and
//! ask it to reboot — jobs use only approved links. A machine has one live link: a second one
//! is refused while the first still answers, unless the first is unapproved and the second
//! approved. Handshakes are capped per address and overall, and so are links.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diskferry_protocol::admission::{Admission, Limits};
use diskferry_protocol::{PublicKey, SessionOptions};
use tokio::net::TcpListener;

use crate::catalog::{Catalog, Enrolled, MachineIdentity};
use crate::enrollment::Tokens;
use diskferry_remote::Connection;

/// How long a new connection may take to say who it is.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a machine's current link has to answer before a new one may replace it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections between accept and enrollment, per address and overall.
const WELCOMES: Limits = Limits {
    per_address: 8,
    total: 128,
};
/// Enrolled links at once, per address and overall (NAT can put many machines behind one).
const LINKS: Limits = Limits {
    per_address: 512,
    total: 2048,
};

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
    #[error(
        "machine {0} is connected already and its link answers; the second connection is refused"
    )]
    AlreadyConnected(i64),
    #[error("turned away: {0}")]
    Full(#[from] diskferry_protocol::admission::Refused),
    #[error("the server is stopping")]
    Stopped,
}

/// One connected machine.
#[derive(Clone)]
pub struct AgentLink {
    pub machine_id: i64,
    pub connection: Connection,
    pub identity: MachineIdentity,
    /// The agent's key, proven by the handshake.
    pub agent_key: PublicKey,
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
            .field("agent_key", &self.agent_key)
            .finish_non_exhaustive()
    }
}

/// The connected agents.
pub struct Agents {
    catalog: Arc<Catalog>,
    session: SessionOptions,
    tokens: Arc<Tokens>,
    links: Mutex<HashMap<i64, AgentLink>>,
    next_serial: std::sync::atomic::AtomicU64,
    welcomes: Arc<Admission>,
    enrolled: Arc<Admission>,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agents").finish_non_exhaustive()
    }
}

impl Agents {
    /// `session` is the server's side (its identity key); `tokens` the enrollment tokens the
    /// boot endpoint hands out.
    pub fn new(catalog: Arc<Catalog>, session: SessionOptions, tokens: Arc<Tokens>) -> Agents {
        Agents {
            catalog,
            session,
            tokens,
            links: Mutex::new(HashMap::new()),
            next_serial: Default::default(),
            welcomes: Admission::new(WELCOMES),
            enrolled: Admission::new(LINKS),
        }
    }

    /// A one-time enrollment token for the machine with `mac`, as the boot endpoint hands
    /// out: a live deploy gives it to the new system's agent, whose new key it vouches for.
    pub fn issue_token(&self, mac: &str) -> String {
        self.tokens.issue(mac)
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<i64, AgentLink>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live connection of a machine, approved or not.
    pub fn link(&self, machine_id: i64) -> Option<AgentLink> {
        self.links().get(&machine_id).cloned()
    }

    /// The live connection of a machine, if its agent's key is the approved one: the only
    /// links jobs may use.
    pub fn approved_link(&self, machine_id: i64) -> Option<AgentLink> {
        self.link(machine_id)
            .filter(|l| l.connection.closed_reason().is_none())
            .filter(|l| {
                self.catalog
                    .is_approved_key(machine_id, &l.agent_key.to_string())
                    .unwrap_or(false)
            })
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
            let ticket = match self.welcomes.admit(peer.ip()) {
                Ok(t) => t,
                Err(refused) => {
                    tracing::debug!(%peer, "agent port: {refused}");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = me.welcome(stream, peer, ticket).await {
                    tracing::warn!(%peer, "agent {peer}: {e}");
                }
            });
        }
    }

    /// Authenticates one agent, enrolls it and keeps its connection until it ends.
    async fn welcome(
        &self,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        ticket: diskferry_protocol::admission::Ticket,
    ) -> Result<(), WelcomeError> {
        let local = stream.local_addr().ok();
        let (conn, credential) =
            Connection::accept(stream, &self.session, peer.to_string(), local).await?;
        let doc = tokio::time::timeout(IDENTIFY_TIMEOUT, conn.identify())
            .await
            .map_err(|_| WelcomeError::IdentifyTimeout)?
            .map_err(WelcomeError::Identify)?;
        let identity: MachineIdentity = serde_json::from_str(&doc)?;
        let booted_mac = (!credential.is_empty())
            .then(|| self.tokens.redeem(&credential))
            .flatten();
        if !credential.is_empty() && booted_mac.is_none() {
            tracing::warn!(%peer, "agent {peer} brought an unknown, used or expired enrollment token");
        }
        let enrolled = self
            .enroll(&identity, conn.peer_key(), booted_mac, peer)
            .await?;
        let _link_ticket = self.enrolled.admit(peer.ip())?;
        drop(ticket);
        self.log_enrolled(&enrolled, &identity, &conn, peer);
        let serial = self.attach(&enrolled, conn.clone(), identity, peer).await?;
        conn.closed().await;
        let machine_id = enrolled.machine_id;
        let mut links = self.links();
        if links.get(&machine_id).is_some_and(|l| l.serial == serial) {
            links.remove(&machine_id);
        }
        drop(links);
        tracing::info!(machine = machine_id, %peer, "machine {machine_id} ({peer}) disconnected");
        Ok(())
    }

    async fn enroll(
        &self,
        identity: &MachineIdentity,
        key: PublicKey,
        booted_mac: Option<String>,
        peer: SocketAddr,
    ) -> Result<Enrolled, WelcomeError> {
        let catalog = Arc::clone(&self.catalog);
        let identity = identity.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let e = catalog.enroll(&identity, &key.to_string(), booted_mac.as_deref())?;
            if e.approved {
                // Wake-on-LAN finds the machine's network by it.
                catalog.set_machine_address(e.machine_id, &peer.ip().to_string())?;
            }
            Ok::<_, crate::catalog::CatalogError>(e)
        })
        .await
        .map_err(|_| WelcomeError::Stopped)??)
    }

    fn log_enrolled(
        &self,
        e: &Enrolled,
        identity: &MachineIdentity,
        conn: &Connection,
        peer: SocketAddr,
    ) {
        let id = e.machine_id;
        let first = identity.macs.first().map_or("", String::as_str);
        let macs = identity.macs.len();
        let key = conn.peer_key().fingerprint();
        match &e.waiting {
            None => {
                tracing::info!(machine = id, %peer, "machine {id} ({first}, {macs} MACs, agent key {key}) connected from {peer}")
            }
            Some(why) => {
                tracing::warn!(machine = id, %peer, "machine {id} ({first}, {macs} MACs, agent key {key}) connected from {peer} and awaits approval: {why}")
            }
        }
    }

    /// Makes `conn` the machine's link, unless its current link is alive and may stay.
    async fn attach(
        &self,
        e: &Enrolled,
        connection: Connection,
        identity: MachineIdentity,
        peer: SocketAddr,
    ) -> Result<u64, WelcomeError> {
        let id = e.machine_id;
        if let Some(old) = self.link(id) {
            let old_approved = self.approved_link(id).is_some();
            let replaceable = e.approved && !old_approved;
            if !replaceable && answers(&old.connection).await {
                return Err(WelcomeError::AlreadyConnected(id));
            }
        }
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let link = AgentLink {
            machine_id: id,
            agent_key: connection.peer_key(),
            connection,
            identity,
            peer: peer.to_string(),
            serial,
        };
        self.links().insert(id, link);
        Ok(serial)
    }
}

/// Whether a link still answers a request (a machine that was power-cycled leaves a
/// half-open connection behind that only a request finds out about).
async fn answers(conn: &Connection) -> bool {
    conn.closed_reason().is_none()
        && matches!(
            tokio::time::timeout(PROBE_TIMEOUT, conn.identify()).await,
            Ok(Ok(_))
        )
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
        // Only the approved agent: a redial proves identity by key, not by disk size.
        self.agents
            .approved_link(self.machine_id)
            .map(|l| l.connection)
            .ok_or_else(|| {
                diskferry_remote::RedialError::NotBack(format!("machine {}", self.label))
            })
    }
}
