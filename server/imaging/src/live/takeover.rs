//! A committed live system taking its disk over: afterwards the old system, its filesystem
//! and the pinned file holding the new one are gone, the new system boots through GRUB files
//! of its own, and the old partition's space around the new one is free.
//!
//! GRUB's core image (in the disk's boot track) was built to find its directory in a
//! partition *by number* — the old system's — so:
//! 1. the two entries swap ranges ([`diskferry_partition::nested::swap_ranges`]): that number
//!    now holds the new filesystem, which carries a copy of the old GRUB's modules and a menu
//!    of its own ([`super::loader`]); the old filesystem is still there, in the other slot;
//! 2. the machine reboots. If the new system comes up without the live token on its kernel
//!    command line, its own menu started it: the old entry is removed, and with it the old
//!    filesystem. If it comes up *with* the token, GRUB found the old filesystem by its UUID
//!    (a core image with an embedded `search`) and booted it through the old menu: the swap
//!    is undone, and the old system stays the boot host, as after a plain commit.
//!
//! A take-over cut short after the swap (the wait ran out) leaves the machine booting the new
//! system through its own menu; run again from there, it removes the old entry.

use std::time::Instant;

use diskferry_blockdev::BlockDevice;
use diskferry_partition::nested::{remove_entry, swap_ranges};
use diskferry_partition::{read_table, Partition, Scheme};
use diskferry_protocol::{PowerAction, Request, LIVE_COMMITTED, LIVE_STATE};
use diskferry_remote::Connection;

use super::flow::{wait_reboot, Redialer};
use super::{boot, loader, state, LiveDeployError, LiveState};

/// How a take-over ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// The new system is partition `partition`; `freed` bytes of the old one's are free.
    Done { partition: u32, freed: u64 },
    /// The partition table is as it was (swapped back, if it was swapped); why the old system
    /// stays the boot host.
    Kept(String),
}

/// The two entries of a take-over: the old system's and the live one inside it.
struct Plan {
    host: Partition,
    nested: Partition,
    uuid: String,
}

/// The nested live partition of `disk`, its host, and the new filesystem's UUID — when the
/// new system can take over; else why not.
fn plan(disk: &std::sync::Arc<dyn BlockDevice>) -> Result<Plan, String> {
    let table = read_table(&**disk).map_err(|e| format!("reading the partition table: {e}"))?;
    let pairs: Vec<(&Partition, &Partition)> = table
        .partitions
        .iter()
        .flat_map(|h| table.partitions.iter().map(move |n| (h, n)))
        .filter(|(h, n)| {
            h.number != n.number && h.start <= n.start && n.end() <= h.end() && h.size > n.size
        })
        .collect();
    let [(host, nested)] = pairs[..] else {
        return Err(match pairs.len() {
            0 => "no partition lies inside another: nothing to take over (taken over already?)"
                .into(),
            n => format!(
                "the disk has {n} partitions nested in others, not the one a live deploy adds"
            ),
        });
    };
    if table.scheme == Scheme::Mbr && (host.number > 4 || nested.number > 4) {
        return Err(format!(
            "partition {} is a logical one: only primary MBR entries are swapped",
            host.number.max(nested.number)
        ));
    }
    let fs = diskferry_partition::open_partition(std::sync::Arc::clone(disk), nested)
        .map_err(|e| e.to_string())
        .and_then(|slice| diskferry_fs::open(std::sync::Arc::new(slice)).map_err(|e| e.to_string()))
        .map_err(|e| format!("reading the live system's filesystem: {e}"))?;
    let starts = |path: &str, with: &str| {
        let mut head = vec![0u8; with.len()];
        fs.lookup(path)
            .and_then(|n| fs.read_at(n, 0, &mut head))
            .is_ok_and(|got| got == head.len() && head == with.as_bytes())
    };
    if !starts("/boot/grub/grub.cfg", loader::HEADER) {
        return Err(
            "the live system has no boot loader of its own (it was deployed without the old system's GRUB files)"
                .into(),
        );
    }
    if !starts(&format!("/{LIVE_STATE}"), LIVE_COMMITTED) {
        return Err("the live system is not committed: commit it first".into());
    }
    Ok(Plan {
        host: host.clone(),
        nested: nested.clone(),
        uuid: fs.info().uuid,
    })
}

/// Whether the agent's kernel was booted with root `uuid`.
fn booted_from(s: &LiveState, uuid: &str) -> bool {
    s.root
        .as_deref()
        .and_then(|r| r.strip_prefix("UUID="))
        .is_some_and(|r| r.eq_ignore_ascii_case(uuid))
}

/// Takes `disk` over for the committed live system `conn` reaches (rebooting the machine
/// once, waiting until `deadline`); `phase` hears where it is. Run again after one that was
/// cut short (the machine then runs the new system through its own menu), it finishes it.
pub fn take_over(
    conn: Connection,
    again: &dyn Redialer,
    disk: &str,
    deadline: Instant,
    phase: &dyn Fn(&str),
) -> Result<TakeOver, LiveDeployError> {
    let dev = again.open_disk(&conn, disk)?;
    let plan = match plan(&dev) {
        Ok(p) => p,
        Err(why) => return Ok(TakeOver::Kept(why)),
    };
    let now = state(&conn)?;
    if !booted_from(&now, &plan.uuid) {
        return Ok(TakeOver::Kept(format!(
            "the running system is not the live one (root UUID {}): take over from it",
            plan.uuid
        )));
    }
    let (h, n) = (plan.host.number, plan.nested.number);
    if now.token.is_none() {
        // Its own menu started it: the entries were swapped by a take-over cut short, and
        // `h` holds the old system now.
        return finish(&dev, &plan, h, n, phase);
    }
    if let Err(e) = swap_ranges(&*dev, h, n) {
        return Ok(TakeOver::Kept(format!(
            "swapping entries {h} and {n}: {e}; the table is as it was"
        )));
    }
    drop(dev);
    phase(&format!(
        "partition {h} now holds the new system, {n} the old one: rebooting through the new system's own GRUB files"
    ));
    let swapped = |what: String| {
        LiveDeployError::Boot(format!(
            "{what}; partition entries {h} and {n} are swapped: the next boot starts the new system through its own GRUB files — once it is up, run the take-over again (diskferry live HOST:PORT --take-over {disk}) to finish it; do not roll back"
        ))
    };
    let swap_back = |conn: &Connection| -> Result<(), LiveDeployError> {
        let dev = again.open_disk(conn, disk)?;
        swap_ranges(&*dev, h, n).map_err(|e| swapped(format!("swapping them back: {e}")))
    };
    if let Err(e) = boot::call(
        &conn,
        Request::Power {
            action: PowerAction::Reboot,
        },
    ) {
        swap_back(&conn)?;
        return Ok(TakeOver::Kept(format!(
            "cannot reboot the machine ({e}); the entries are swapped back, as they were"
        )));
    }
    let not_rebooted = "the machine did not reboot to take its disk over";
    let (conn, now) = wait_reboot(conn, again, now.boot, deadline, not_rebooted, phase)
        .map_err(|e| swapped(e.to_string()))?;
    if now.token.is_none() && booted_from(&now, &plan.uuid) {
        let dev = again.open_disk(&conn, disk)?;
        return finish(&dev, &plan, n, h, phase);
    }
    swap_back(&conn)?;
    Ok(TakeOver::Kept(
        "GRUB did not start the new system from its own files (its core image finds the old filesystem by UUID, not by partition number): the entries are swapped back, as they were, and the old system stays the boot host"
            .into(),
    ))
}

/// Removes the old system's entry `old` (the new system is `new`): the take-over's end.
fn finish(
    dev: &std::sync::Arc<dyn BlockDevice>,
    plan: &Plan,
    old: u32,
    new: u32,
    phase: &dyn Fn(&str),
) -> Result<TakeOver, LiveDeployError> {
    remove_entry(&**dev, old).map_err(|e| {
        LiveDeployError::Boot(format!("removing the old system's entry {old}: {e}"))
    })?;
    phase("the new system booted through its own GRUB: the old system's partition is gone");
    Ok(TakeOver::Done {
        partition: new,
        freed: plan.host.size - plan.nested.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_booted_root_names_the_new_filesystem_by_uuid() {
        let s = |root: &str| LiveState {
            root: Some(root.into()),
            ..LiveState::default()
        };
        assert!(booted_from(&s("UUID=AB-cd"), "ab-CD"));
        assert!(!booted_from(&s("UUID=ab-ce"), "ab-cd"));
        assert!(!booted_from(&s("/dev/sda3"), "ab-cd"));
        assert!(!booted_from(&LiveState::default(), "ab-cd"));
    }
}
