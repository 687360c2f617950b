//! Rebooting or powering off the machine when the server asks (agents started with
//! `--allow-power`). The PXE boot environment has nothing to lose: filesystems are synced,
//! then the kernel is told directly. A live agent runs inside a full system: its init system
//! is asked (`systemctl reboot`, else `reboot`), so every filesystem is unmounted cleanly and
//! what GRUB must read next boot is written back in place.

use std::process::Command;

use diskferry_protocol::PowerAction;

/// Reboots or powers off — through the init system when `graceful` — and returns only if
/// that could not be done, after saying so.
pub fn act(action: PowerAction, graceful: bool) {
    let verb = match action {
        PowerAction::Reboot => "reboot",
        PowerAction::Poweroff => "poweroff",
    };
    if graceful {
        for (program, args) in [("systemctl", &[verb][..]), (verb, &[][..])] {
            match Command::new(program).args(args).status() {
                Ok(s) if s.success() => return,
                Ok(s) => tracing::warn!("{verb}: {s}"),
                Err(e) => tracing::warn!("{verb}: {e}"),
            }
        }
        tracing::warn!("the init system did not {verb}: telling the kernel");
    }
    rustix::fs::sync();
    let cmd = match action {
        PowerAction::Reboot => rustix::system::RebootCommand::Restart,
        PowerAction::Poweroff => rustix::system::RebootCommand::PowerOff,
    };
    if let Err(e) = rustix::system::reboot(cmd) {
        tracing::error!("{action:?} failed: {e}");
    }
}
