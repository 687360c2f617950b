//! The agent a live system is given, so it can say it came up: the diskferry-client binary
//! and a systemd unit that starts it at boot in live mode, listening where the old system's
//! agent listened and trusting the same server key; and the state file its commit rewrites
//! in place (`diskferry_protocol::LIVE_STATE`, made uncommitted). The new system's agent confirms the
//! live boot (its kernel carries the deploy's token), is told to commit, and stays, so the
//! machine can be live-deployed again.

use std::sync::Arc;

use diskferry_fs::overlay::{now, Attrs, TreeOverlay, TreeTransform};
use diskferry_fs::{Filesystem, Result};
use diskferry_protocol::{live_state, LIVE_STATE};

/// Where the binary goes in the new system.
pub const BINARY: &str = "/usr/local/sbin/diskferry-client";
/// The unit's name.
pub const UNIT: &str = "diskferry-live-agent.service";

/// Adds the agent to a live system's tree.
pub struct LiveAgent {
    binary: Arc<[u8]>,
    /// The unit file's text.
    unit: String,
}

impl LiveAgent {
    /// The agent `binary`, reached as the old system's agent is (`how` is `listen` or
    /// `connect`, `addr` its address) and trusting `server_key` (hex); a dialling agent
    /// presents `token` (a server's enrollment token, which vouches for its new key).
    pub fn new(
        binary: Vec<u8>,
        how: &str,
        addr: &str,
        server_key: &str,
        token: Option<&str>,
    ) -> LiveAgent {
        let token = token.map(|t| format!(" --token {t}")).unwrap_or_default();
        let unit = format!(
            "[Unit]\n\
             Description=diskferry agent (put here by a live deploy)\n\
             After=network.target\n\n\
             [Service]\n\
             ExecStart={BINARY} --{how} {addr} --server-key {server_key} --live --allow-power --agent-key /var/lib/diskferry/agent.key{token}\n\
             Restart=always\n\
             RestartSec=2\n\n\
             [Install]\n\
             WantedBy=multi-user.target\n"
        );
        LiveAgent {
            binary: binary.into(),
            unit,
        }
    }

    fn add(&self, o: &mut TreeOverlay) -> Result<()> {
        let dir = Attrs::root(0o755);
        o.create_dirs("/usr/local/sbin", dir)?;
        o.create_dirs("/var/lib/diskferry", Attrs::root(0o700))?;
        o.create_dirs("/etc/systemd/system/multi-user.target.wants", dir)?;
        o.write_file(BINARY, self.binary.to_vec(), Attrs::root(0o755))?;
        let unit = format!("/etc/systemd/system/{UNIT}");
        // Root-only: it may hold a one-time enrollment token.
        o.write_file(&unit, self.unit.clone().into_bytes(), Attrs::root(0o600))?;
        o.symlink(
            &format!("/etc/systemd/system/multi-user.target.wants/{UNIT}"),
            &unit,
        )?;
        o.create_dirs("/etc/diskferry", dir)?;
        o.write_file(
            &format!("/{LIVE_STATE}"),
            live_state(false),
            Attrs::root(0o644),
        )
    }
}

impl TreeTransform for LiveAgent {
    fn apply(
        &self,
        _partition: u32,
        base: Arc<dyn Filesystem>,
    ) -> Result<Option<(TreeOverlay, Vec<String>)>> {
        let mut o = TreeOverlay::new(base, now());
        self.add(&mut o)?;
        Ok(Some((
            o,
            vec![format!(
                "the diskferry agent added ({BINARY}, started by {UNIT})"
            )],
        )))
    }

    fn describe(&self) -> String {
        "the live system's agent".into()
    }
}
