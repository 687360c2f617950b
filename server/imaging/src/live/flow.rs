//! A live deploy from end to end, for every front end: written and switched ([`deploy`]),
//! then — once the machine reboots — finished ([`finish`]): committed when the new system's
//! agent answers with the deploy's token, rolled back when the old system's answers instead;
//! and then, unless asked not to, the new system takes the disk over ([`super::takeover`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::BlockDevice;
use diskferry_protocol::Request;
use diskferry_remote::Connection;

use super::{
    boot, pinned_map, state, write, LiveDeployError, LiveOptions, LiveState, LiveTarget,
    LiveWritten,
};
use crate::progress::Progress;

/// A live system written and booted once at the next boot.
pub struct Deployed {
    pub written: LiveWritten,
    /// The new partition's number.
    pub partition: u32,
    /// What the new system's kernel is booted with, so its agent can show it came up.
    pub token: String,
}

/// Writes `image`'s root into the agent's running system and switches its boot to it once
/// (`title` names the GRUB entry). On failure the running system is as it was.
pub fn deploy(
    image: &Arc<dyn BlockDevice>,
    target: &LiveTarget<'_>,
    opts: &LiveOptions,
    title: &str,
    progress: &dyn Progress,
) -> Result<Deployed, LiveDeployError> {
    let written = write(image, target, opts, progress)?;
    let token = boot::new_token();
    let menu = boot::menu(&written.kernel, &written.uuid, &token, title);
    match boot::switch(target.conn, &written.disk, &written.window, &menu) {
        Ok(partition) => Ok(Deployed {
            written,
            partition,
            token,
        }),
        Err(e) => {
            let _ = target.conn.call_blocking(Request::LiveRemove);
            Err(e)
        }
    }
}

/// How a live deploy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new system came up and is the default from now on.
    Committed,
    /// The old system came back; what was undone.
    RolledBack(Vec<String>),
}

/// How to reach the machine again, and its disk, after it rebooted.
pub trait Redialer {
    /// A new connection to the machine's agent, when one answers now.
    fn connect(&self) -> Option<Connection>;
    /// `disk` opened writable on `conn`.
    fn open_disk(
        &self,
        conn: &Connection,
        disk: &str,
    ) -> Result<Arc<dyn BlockDevice>, LiveDeployError>;
}

/// A listening agent, dialled again at its address (with a session of `session`).
pub struct Listening<'a> {
    pub rt: &'a tokio::runtime::Handle,
    pub addr: &'a str,
    pub session: &'a diskferry_protocol::SessionOptions,
}

impl Listening<'_> {
    /// How a disk opened on it reconnects.
    pub fn redial(&self) -> Arc<dyn diskferry_remote::Redial> {
        Arc::new(diskferry_remote::DialAddr {
            addr: self.addr.to_string(),
            session: self.session.clone(),
        })
    }
}

impl Redialer for Listening<'_> {
    fn connect(&self) -> Option<Connection> {
        self.rt
            .block_on(Connection::connect(self.addr, self.session))
            .ok()
    }

    fn open_disk(
        &self,
        conn: &Connection,
        disk: &str,
    ) -> Result<Arc<dyn BlockDevice>, LiveDeployError> {
        Ok(crate::source::open_on_connection(
            self.rt,
            conn,
            disk,
            true,
            self.redial(),
            Duration::from_secs(30),
        )?)
    }
}

/// How often the machine is asked while waiting.
const POLL: Duration = Duration::from_secs(2);

/// Waits until `deadline` for the machine to go away (its reboot) and come back: the new
/// system (its agent shows `token`) is committed, the old one rolled back. `phase` hears
/// where the wait is.
pub fn finish(
    old: Connection,
    again: &dyn Redialer,
    token: &str,
    deadline: Instant,
    phase: &dyn Fn(&str),
) -> Result<Outcome, LiveDeployError> {
    let not_rebooted = "the machine did not reboot; the live system stays ready for its next boot";
    // The boot the deploy ran in: an agent answering from it again lost its connection (a
    // network blip, a restarted agent) but the machine did not reboot.
    let booted = state(&old).ok().and_then(|s| s.boot);
    let (conn, now) = wait_reboot(old, again, booted, deadline, not_rebooted, phase)?;
    if now.token.as_deref() == Some(token) {
        phase("the new system is up: committing");
        boot::commit(&conn)?;
        return Ok(Outcome::Committed);
    }
    phase("the old system came back: rolling back");
    roll_back(&conn, again).map(Outcome::RolledBack)
}

/// Waits until `deadline` for the machine `old` reaches to reboot (`not_rebooted` says what
/// it means when it does not) and for its agent to answer again from a boot other than
/// `booted` (the boot id read before the reboot was asked for); that connection, and what the
/// agent says.
pub fn wait_reboot(
    old: Connection,
    again: &dyn Redialer,
    booted: Option<String>,
    deadline: Instant,
    not_rebooted: &'static str,
    phase: &dyn Fn(&str),
) -> Result<(Connection, LiveState), LiveDeployError> {
    phase("waiting for the machine to reboot");
    while state(&old).is_ok() {
        if Instant::now() > deadline {
            return Err(LiveDeployError::Timeout(not_rebooted));
        }
        std::thread::sleep(POLL);
    }
    drop(old);
    phase("waiting for the machine to come back");
    loop {
        if Instant::now() > deadline {
            return Err(LiveDeployError::Timeout(
                "no agent answered after the reboot",
            ));
        }
        let Some(conn) = again.connect() else {
            std::thread::sleep(POLL);
            continue;
        };
        match state(&conn) {
            // Still the boot it was in: wait for the reboot.
            Ok(now) if booted.is_some() && now.boot == booted => std::thread::sleep(POLL),
            Ok(now) => return Ok((conn, now)),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Removes the live system from the old one (its partition entry, GRUB menu and file);
/// returns what was done.
pub fn roll_back(conn: &Connection, again: &dyn Redialer) -> Result<Vec<String>, LiveDeployError> {
    let Some(map) = pinned_map(conn)? else {
        return Ok(vec!["nothing was pinned".into()]);
    };
    let disk = again.open_disk(conn, &map.disk)?;
    boot::undo(conn, &disk)
}
