//! What a machine that boots from the network should boot, by what the server knows of it:
//! an unknown machine, one awaiting approval, one a job waits for, one in the middle of a job
//! and one whose deploy failed get the imaging environment; any other known machine boots its
//! own disk — so a machine whose first boot device is the network comes back up in its
//! deployed system after a deploy with reboot.

use crate::catalog::{normalize_mac, state, Catalog, CatalogError};

/// What a booting machine is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootChoice {
    /// The imaging environment (the agent dials back).
    Environment { reason: String },
    /// Its local disk.
    LocalDisk { machine: String, reason: String },
}

/// How a BIOS machine leaves iPXE for its disk (UEFI machines always `exit` back to the
/// firmware's boot order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalBoot {
    /// Return to the firmware, which tries the next boot device.
    #[default]
    Exit,
    /// Boot the first hard disk from iPXE (`sanboot --drive 0x80`), for firmware that stops
    /// after a network boot returns.
    Sanboot,
}

impl std::str::FromStr for LocalBoot {
    type Err = String;
    fn from_str(s: &str) -> Result<LocalBoot, String> {
        match s {
            "exit" => Ok(LocalBoot::Exit),
            "sanboot" => Ok(LocalBoot::Sanboot),
            other => Err(format!("unknown local boot {other:?}: use exit or sanboot")),
        }
    }
}

/// Decides for the machine booting with `mac`.
pub fn choose(catalog: &Catalog, mac: &str) -> Result<BootChoice, CatalogError> {
    let env = |reason: &str| {
        Ok(BootChoice::Environment {
            reason: reason.to_string(),
        })
    };
    let Some(m) = normalize_mac(mac)
        .map(|m| catalog.find_machine(&m))
        .transpose()?
        .flatten()
    else {
        return env("unknown machine: it registers and waits for approval");
    };
    let label = m.name.clone().unwrap_or_else(|| mac.to_string());
    if m.pending.is_some() || (!m.approved && !m.preregistered) {
        return env("its enrollment awaits approval");
    }
    if catalog.machine_has_due_job(m.id)? {
        return env("a job waits for it");
    }
    match m.state.as_str() {
        state::TRANSITIONING => env("a job is running on it"),
        state::FAILED => env("its last deploy failed"),
        _ => Ok(BootChoice::LocalDisk {
            machine: label,
            reason: "nothing to do".into(),
        }),
    }
}

/// The iPXE script that boots the local disk.
pub fn local_disk_script(machine: &str, reason: &str, how: LocalBoot) -> String {
    let bios = match how {
        LocalBoot::Exit => "exit",
        LocalBoot::Sanboot => "sanboot --no-describe --drive 0x80 || exit",
    };
    format!(
        "#!ipxe\n\
         echo diskferry: {machine}: {reason} - booting from its local disk\n\
         iseq ${{platform}} efi && exit ||\n\
         {bios}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{MachineIdentity, QueuedJob};

    #[test]
    fn machines_boot_their_disk_unless_something_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let is_env = |mac: &str| matches!(choose(&c, mac).unwrap(), BootChoice::Environment { .. });
        assert!(is_env("52:54:00:00:00:01"), "unknown");
        let m = c
            .register_machine("52:54:00:00:00:02", "lab-02", None)
            .unwrap();
        assert!(!is_env("52-54-00-00-00-02"), "registered, nothing to do");
        let request = serde_json::json!({"kind": "capture"});
        let job = c
            .queue_job(&QueuedJob {
                kind: "capture",
                params: &request,
                request: &request,
                machine_id: Some(m),
                not_before: 0,
                schedule_id: None,
            })
            .unwrap();
        assert!(is_env("52:54:00:00:00:02"), "a job waits");
        c.end_waiting_job(job, crate::catalog::JobState::Cancelled, "x")
            .unwrap();
        c.set_machine_state(m, state::FAILED).unwrap();
        assert!(is_env("52:54:00:00:00:02"), "failed deploy");
        c.set_machine_state(m, state::DEPLOYED).unwrap();
        assert!(!is_env("52:54:00:00:00:02"), "deployed");
        // A machine that enrolled and awaits approval.
        let id = MachineIdentity {
            macs: vec!["52:54:00:00:00:03".into()],
            ..Default::default()
        };
        c.enroll(&id, "k", None).unwrap();
        assert!(is_env("52:54:00:00:00:03"));
    }

    #[test]
    fn the_local_script_exits_on_uefi_and_may_sanboot_on_bios() {
        let s = local_disk_script("lab-02", "nothing to do", LocalBoot::Sanboot);
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("iseq ${platform} efi && exit ||"));
        assert!(s.contains("sanboot --no-describe --drive 0x80 || exit"));
        assert!(local_disk_script("x", "y", LocalBoot::Exit).ends_with("\nexit\n"));
    }
}
