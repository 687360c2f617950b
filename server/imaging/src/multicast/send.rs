//! The session of a multicast deploy: bound and run on a thread of its own (its own
//! runtime), the credentials handed to each machine's agent over its connection, the agents
//! followed through their status while it runs.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use diskferry_multicast::{
    default_group, MulticastError, Outcome, Plan, Session, SessionConfig, SessionKeys,
    SessionReport,
};
use diskferry_protocol::multicast::Credentials;
use diskferry_protocol::MulticastState;

use super::fleet::Fleet;
use super::{MulticastHow, Phase, SessionSummary};

/// How often the agents are asked how far they are.
const POLL: Duration = Duration::from_millis(500);

/// Runs the session for every live machine. Returns its figures and each machine's outcome
/// (`None`: it was not in the session, or the session failed — it then gets unicast).
pub(super) fn multicast(
    fleet: &Fleet<'_>,
    how: &MulticastHow,
    bind: Ipv4Addr,
) -> (Option<SessionSummary>, Vec<Option<Outcome>>) {
    let mut outcomes = vec![None; fleet.targets.len()];
    let live = fleet.live();
    if live.is_empty() {
        return (None, outcomes);
    }
    match run(fleet, how, bind, &live) {
        Ok((report, group)) => {
            for (r, &i) in live.iter().enumerate() {
                outcomes[i] = report.receivers.get(r).map(|x| x.outcome.clone());
            }
            (Some(summary(&report, group)), outcomes)
        }
        Err(e) => {
            tracing::warn!("the multicast session failed ({e}): every machine gets unicast");
            (None, outcomes)
        }
    }
}

fn summary(report: &SessionReport, group: SocketAddrV4) -> SessionSummary {
    SessionSummary {
        group: group.to_string(),
        elapsed_s: report.elapsed.as_secs_f64(),
        multicast_repair_bytes: report.multicast_repair_bytes,
        unicast_repair_bytes: report.receivers.iter().map(|r| r.unicast_bytes).sum(),
        rejected: report.rejected,
    }
}

fn run(
    fleet: &Fleet<'_>,
    how: &MulticastHow,
    bind: Ipv4Addr,
    live: &[usize],
) -> Result<(SessionReport, SocketAddrV4), MulticastError> {
    let staged = fleet.staged;
    let extents: Vec<(u64, u64)> = staged
        .data
        .iter()
        .map(|r| (r.start, r.end - r.start))
        .collect();
    let plan = Arc::new(Plan::new(&extents, staged.device.size())?);
    let id = session_id()?;
    let group = SocketAddrV4::new(
        how.group.unwrap_or_else(|| default_group(id)),
        how.port.unwrap_or(49152 + (id % 16384) as u16),
    );
    let receivers =
        u16::try_from(live.len()).map_err(|_| MulticastError::Config("too many".into()))?;
    let mut config = SessionConfig::new(id, group, SocketAddrV4::new(bind, 0), receivers);
    config.receiver_timeout = how.receiver_timeout;
    if let Some(max) = how.max_rate {
        config.rate.max = max.max(1);
        config.rate.min = config.rate.min.min(config.rate.max);
    }
    let sender = Sender::start(config, Arc::clone(&staged.device), Arc::clone(&plan))?;
    for (r, &i) in live.iter().enumerate() {
        let t = &fleet.targets[i];
        fleet.set(i, |s| s.phase = Phase::Receiving);
        if let Err(e) = t.disk.multicast_join(&sender.creds[r]) {
            tracing::warn!(machine = %t.name, "could not join the session: {e}");
        }
    }
    let _ = sender.go.send(());
    while !sender.handle.is_finished() {
        std::thread::sleep(POLL);
        follow(fleet, live);
    }
    let report = sender
        .handle
        .join()
        .map_err(|_| MulticastError::Config("the session's thread panicked".into()))??;
    Ok((report, group))
}

/// Asks each agent how far it is, then tells the watcher once.
fn follow(fleet: &Fleet<'_>, live: &[usize]) {
    let mut received = vec![None; fleet.targets.len()];
    for &i in live {
        received[i] = fleet.targets[i]
            .disk
            .multicast_status()
            .ok()
            .filter(|s| s.state != MulticastState::Idle && s.total > 0)
            .map(|s| (s.received, s.total));
    }
    fleet.set_all(|i, s| {
        if let Some((got, of)) = received[i] {
            s.done = (u128::from(s.total) * u128::from(got) / u128::from(of)) as u64;
        }
    });
}

fn session_id() -> Result<u64, MulticastError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| MulticastError::Keys(e.to_string()))?;
    Ok(u64::from_be_bytes(b))
}

/// The sending side, bound, waiting for `go`.
struct Sender {
    creds: Vec<Credentials>,
    go: tokio::sync::oneshot::Sender<()>,
    handle: JoinHandle<Result<SessionReport, MulticastError>>,
}

impl Sender {
    /// Binds the session on a thread of its own and returns once its credentials exist.
    fn start(
        config: SessionConfig,
        device: Arc<dyn diskferry_blockdev::BlockDevice>,
        plan: Arc<Plan>,
    ) -> Result<Sender, MulticastError> {
        let (creds_tx, creds_rx) = std::sync::mpsc::channel();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("multicast-send".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| MulticastError::Socket {
                        op: "start a runtime",
                        source,
                    })?;
                rt.block_on(async move {
                    let receivers = config.receivers;
                    let session =
                        match SessionKeys::generate().and_then(|k| Session::bind(config, k)) {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = creds_tx.send(None);
                                return Err(e);
                            }
                        };
                    let creds: Vec<Credentials> = (0..receivers)
                        .map(|r| session.credentials(r, &plan))
                        .collect();
                    let _ = creds_tx.send(Some(creds));
                    go_rx.await.map_err(|_| {
                        MulticastError::Config("cancelled before it started".into())
                    })?;
                    session.run(device, plan).await
                })
            })
            .map_err(|source| MulticastError::Socket {
                op: "start the sender",
                source,
            })?;
        match creds_rx.recv() {
            Ok(Some(creds)) => Ok(Sender { creds, go, handle }),
            _ => Err(handle
                .join()
                .map_err(|_| MulticastError::Config("the session's thread panicked".into()))?
                .err()
                .unwrap_or_else(|| MulticastError::Config("the session did not start".into()))),
        }
    }
}
