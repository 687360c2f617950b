//! Rebooting or powering off the machine when the server asks (dial-back agents started with
//! `--allow-power`, i.e. the PXE boot environment, which has nothing to lose): filesystems are
//! synced first, then the kernel is told directly.

use diskferry_protocol::PowerAction;

/// Syncs and reboots or powers off; returns only if the kernel refused (not root, or inside
/// a container), after saying so.
pub fn act(action: PowerAction) {
    rustix::fs::sync();
    let cmd = match action {
        PowerAction::Reboot => rustix::system::RebootCommand::Restart,
        PowerAction::Poweroff => rustix::system::RebootCommand::PowerOff,
    };
    if let Err(e) = rustix::system::reboot(cmd) {
        tracing::error!("{action:?} failed: {e}");
    }
}
