//! Enrollment: which agent may act as which machine. An agent proves a static key in the
//! handshake and announces an identity (MACs, DMI, disks). A machine's MAC addresses belong to
//! it alone (the `machine_macs` index), and only its approved agent key may act for it.
//!
//! The rules (`Catalog::enroll`):
//! - an identity that announces MACs of two machines is refused — sets are never merged;
//! - the approved key with an unchanged identity is that machine (a redial, a restart with
//!   `--agent-key`);
//! - an enrollment token issued for one of the machine's MACs (a PXE boot through
//!   `/boot.ipxe`) moves approval to the new key, if the machine was approved before and its
//!   identity is unchanged;
//! - a machine an administrator registered by MAC before it ever booted (`register_machine`)
//!   is approved on its first enrollment with a token issued for one of its MACs — the
//!   administrator vouched for the MAC, as FOG's manual host registration does — and its
//!   announced identity becomes its own;
//! - everything else — a new machine, a changed identity, an unknown key without a token —
//!   waits for an administrator (`pending`), and the approved key, if any, keeps working.

use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};

use super::machines::{hardware_json, normalize_mac, state, MachineIdentity};
use super::{unix_now, Catalog, CatalogError};

/// Most MAC addresses one identity may announce.
pub const MAX_MACS: usize = 16;
/// Most disks one identity may announce.
pub const MAX_DISKS: usize = 64;
/// Most PCI devices one identity may announce.
pub const MAX_PCI: usize = diskferry_customize::compat::MAX_PCI;
/// Longest text field (hostname, serial, model...) in an identity.
pub const MAX_TEXT: usize = 256;
/// Most machines awaiting approval at once: a registration flood stops here.
pub const MAX_PENDING: usize = 256;

/// The bounds an announced identity must keep (for documentation and error messages).
#[derive(Debug, Clone, Copy)]
pub struct IdentityLimits;

/// Why an agent was not enrolled at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it announced no MAC address")]
    NoMac,
    #[error("it announced {0} MAC addresses; at most {MAX_MACS} are accepted")]
    TooManyMacs(usize),
    #[error("it announced {0} disks; at most {MAX_DISKS} are accepted")]
    TooManyDisks(usize),
    #[error("it announced {0} PCI devices; at most {MAX_PCI} are accepted")]
    TooManyPci(usize),
    #[error("its {0} is longer than {MAX_TEXT} characters")]
    TooLong(&'static str),
    #[error("it announced MAC addresses of machines {0:?}; one agent is one machine, MAC sets are never merged")]
    SeveralMachines(Vec<i64>),
    #[error("its enrollment token was issued for {0}, which it does not announce")]
    TokenForAnotherMac(String),
    #[error("{MAX_PENDING} machines already await approval; approve or forget some first")]
    TooManyPending,
}

/// An enrollment awaiting an administrator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingApproval {
    /// Why approval is needed ("new machine", "identity changed: disks", ...).
    pub reason: String,
    /// The agent key that would be approved (64 hex digits).
    pub agent_key: String,
    /// The identity it announced.
    pub identity: MachineIdentity,
    pub since: i64,
}

/// What enrolling an agent decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub machine_id: i64,
    /// True when the agent's key is the machine's approved key: jobs may use it.
    pub approved: bool,
    /// Why it is not approved.
    pub waiting: Option<String>,
}

impl Catalog {
    /// Enrolls an agent with static key `agent_key` (hex) announcing `identity`;
    /// `booted_mac` is the MAC its redeemed enrollment token was issued for.
    pub fn enroll(
        &self,
        identity: &MachineIdentity,
        agent_key: &str,
        booted_mac: Option<&str>,
    ) -> Result<Enrolled, CatalogError> {
        let macs = checked_macs(identity, booted_mac)?;
        let db = self.db();
        let tx = db.unchecked_transaction().map_err(|e| self.sql(e))?;
        let owners = self.owners(&tx, &macs)?;
        let enrolled = match owners.as_slice() {
            [] => self.enroll_new(&tx, identity, &macs, agent_key)?,
            [id] => self.enroll_known(&tx, *id, identity, agent_key, booted_mac.is_some())?,
            several => return Err(Refusal::SeveralMachines(several.to_vec()).into()),
        };
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(enrolled)
    }

    /// Approves a machine's pending enrollment: its key becomes the approved one and its
    /// announced identity (MACs included) the machine's.
    pub fn approve_machine(&self, id: i64) -> Result<(), CatalogError> {
        let db = self.db();
        let tx = db.unchecked_transaction().map_err(|e| self.sql(e))?;
        let pending: Option<String> = tx
            .query_row("SELECT pending FROM machines WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.sql(e))?
            .ok_or_else(|| CatalogError::Invalid(format!("no machine with id {id}")))?;
        let pending: PendingApproval = pending
            .and_then(|p| serde_json::from_str(&p).ok())
            .ok_or_else(|| {
                CatalogError::Invalid(format!("machine {id} has nothing awaiting approval"))
            })?;
        let macs = checked_macs(&pending.identity, None)?;
        let others: Vec<i64> = self
            .owners(&tx, &macs)?
            .into_iter()
            .filter(|o| *o != id)
            .collect();
        if !others.is_empty() {
            return Err(Refusal::SeveralMachines(others).into());
        }
        self.store_identity(&tx, id, &pending.identity, &macs)?;
        tx.execute(
            "UPDATE machines SET approved_key = ?2, pending = NULL,
                state = CASE WHEN name IS NULL THEN 'unregistered' ELSE state END
             WHERE id = ?1",
            rusqlite::params![id, pending.agent_key],
        )
        .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Forgets a machine: its record, MACs and approval (its captures stay).
    pub fn forget_machine(&self, id: i64) -> Result<(), CatalogError> {
        let db = self.db();
        db.execute("DELETE FROM machine_macs WHERE machine_id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        let n = db
            .execute("DELETE FROM machines WHERE id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(CatalogError::Invalid(format!("no machine with id {id}")));
        }
        Ok(())
    }

    /// Whether `agent_key` (hex) is the key approved to act as machine `id`.
    pub fn is_approved_key(&self, id: i64, agent_key: &str) -> Result<bool, CatalogError> {
        let approved: Option<Option<String>> = self
            .db()
            .query_row(
                "SELECT approved_key FROM machines WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        Ok(approved.flatten().as_deref() == Some(agent_key))
    }

    /// The machines owning any of `macs` (indexed lookups).
    fn owners(&self, db: &rusqlite::Connection, macs: &[String]) -> Result<Vec<i64>, CatalogError> {
        let mut stmt = db
            .prepare_cached("SELECT machine_id FROM machine_macs WHERE mac = ?1")
            .map_err(|e| self.sql(e))?;
        let mut owners = Vec::new();
        for mac in macs {
            let owner: Option<i64> = stmt
                .query_row([mac], |r| r.get(0))
                .optional()
                .map_err(|e| self.sql(e))?;
            owners.extend(owner);
        }
        owners.sort_unstable();
        owners.dedup();
        Ok(owners)
    }

    fn enroll_new(
        &self,
        db: &rusqlite::Connection,
        identity: &MachineIdentity,
        macs: &[String],
        agent_key: &str,
    ) -> Result<Enrolled, CatalogError> {
        let waiting: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM machines WHERE approved_key IS NULL AND pending IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        if waiting as usize >= MAX_PENDING {
            return Err(Refusal::TooManyPending.into());
        }
        let now = unix_now();
        db.execute(
            "INSERT INTO machines (macs, state, created_at) VALUES ('[]', ?1, ?2)",
            rusqlite::params![state::UNREGISTERED, now],
        )
        .map_err(|e| self.sql(e))?;
        let id = db.last_insert_rowid();
        self.store_identity(db, id, identity, macs)?;
        let reason = "new machine".to_string();
        self.set_pending(db, id, &reason, agent_key, identity)?;
        Ok(Enrolled {
            machine_id: id,
            approved: false,
            waiting: Some(reason),
        })
    }

    fn enroll_known(
        &self,
        db: &rusqlite::Connection,
        id: i64,
        identity: &MachineIdentity,
        agent_key: &str,
        vouched: bool,
    ) -> Result<Enrolled, CatalogError> {
        let (known, approved_key, admit_first): (Option<String>, Option<String>, bool) = db
            .query_row(
                "SELECT identity, approved_key, admit_first FROM machines WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(|e| self.sql(e))?;
        if admit_first && approved_key.is_none() && vouched {
            return self.admit_registered(db, id, identity, agent_key);
        }
        let known: MachineIdentity = known
            .and_then(|k| serde_json::from_str(&k).ok())
            .unwrap_or_default();
        let changed = differences(&known, identity);
        let reason = match (&approved_key, changed.is_empty()) {
            (None, _) => "never approved".to_string(),
            (Some(_), false) => format!("identity changed: {}", changed.join(", ")),
            (Some(k), true) if k == agent_key => String::new(),
            (Some(_), true) if vouched => String::new(),
            (Some(_), true) => "a new agent key without an enrollment token".to_string(),
        };
        db.execute(
            "UPDATE machines SET last_seen = ?2 WHERE id = ?1",
            rusqlite::params![id, unix_now()],
        )
        .map_err(|e| self.sql(e))?;
        if reason.is_empty() {
            db.execute(
                "UPDATE machines SET approved_key = ?2, identity = ?3 WHERE id = ?1",
                rusqlite::params![id, agent_key, to_json(identity)],
            )
            .map_err(|e| self.sql(e))?;
            return Ok(Enrolled {
                machine_id: id,
                approved: true,
                waiting: None,
            });
        }
        self.set_pending(db, id, &reason, agent_key, identity)?;
        Ok(Enrolled {
            machine_id: id,
            approved: false,
            waiting: Some(reason),
        })
    }

    /// Approves the first enrollment of a machine registered before it booted: its identity
    /// (all its MACs) becomes the machine's.
    fn admit_registered(
        &self,
        db: &rusqlite::Connection,
        id: i64,
        identity: &MachineIdentity,
        agent_key: &str,
    ) -> Result<Enrolled, CatalogError> {
        let macs = checked_macs(identity, None)?;
        self.store_identity(db, id, identity, &macs)?;
        db.execute(
            "UPDATE machines SET approved_key = ?2, pending = NULL, admit_first = 0 WHERE id = ?1",
            rusqlite::params![id, agent_key],
        )
        .map_err(|e| self.sql(e))?;
        Ok(Enrolled {
            machine_id: id,
            approved: true,
            waiting: None,
        })
    }

    fn set_pending(
        &self,
        db: &rusqlite::Connection,
        id: i64,
        reason: &str,
        agent_key: &str,
        identity: &MachineIdentity,
    ) -> Result<(), CatalogError> {
        let pending = PendingApproval {
            reason: reason.to_string(),
            agent_key: agent_key.to_string(),
            identity: identity.clone(),
            since: unix_now(),
        };
        db.execute(
            "UPDATE machines SET pending = ?2 WHERE id = ?1",
            rusqlite::params![id, to_json(&pending)],
        )
        .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Makes `identity` the machine's: its MACs (index included), hardware and document.
    fn store_identity(
        &self,
        db: &rusqlite::Connection,
        id: i64,
        identity: &MachineIdentity,
        macs: &[String],
    ) -> Result<(), CatalogError> {
        let hardware = hardware_json(identity);
        db.execute(
            "INSERT OR IGNORE INTO hardware (fingerprint, info) VALUES (?1, ?1)",
            [&hardware],
        )
        .map_err(|e| self.sql(e))?;
        db.execute("DELETE FROM machine_macs WHERE machine_id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        for mac in macs {
            db.execute(
                "INSERT INTO machine_macs (mac, machine_id) VALUES (?1, ?2)",
                rusqlite::params![mac, id],
            )
            .map_err(|e| self.sql(e))?;
        }
        db.execute(
            "UPDATE machines SET macs = ?2, identity = ?3, last_seen = ?4,
                hardware_id = (SELECT id FROM hardware WHERE fingerprint = ?5)
             WHERE id = ?1",
            rusqlite::params![id, to_json(&macs), to_json(identity), unix_now(), hardware],
        )
        .map_err(|e| self.sql(e))?;
        Ok(())
    }
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The identity's MACs, normalized, sorted and deduplicated, after checking its bounds.
fn checked_macs(
    identity: &MachineIdentity,
    booted_mac: Option<&str>,
) -> Result<Vec<String>, Refusal> {
    if identity.macs.len() > MAX_MACS {
        return Err(Refusal::TooManyMacs(identity.macs.len()));
    }
    if identity.disks.len() > MAX_DISKS {
        return Err(Refusal::TooManyDisks(identity.disks.len()));
    }
    if identity.pci.len() > MAX_PCI {
        return Err(Refusal::TooManyPci(identity.pci.len()));
    }
    check_text(identity)?;
    let mut macs: Vec<String> = identity
        .macs
        .iter()
        .filter_map(|m| normalize_mac(m))
        .collect();
    macs.sort();
    macs.dedup();
    if macs.is_empty() {
        return Err(Refusal::NoMac);
    }
    if let Some(booted) = booted_mac {
        if !macs.iter().any(|m| m == booted) {
            return Err(Refusal::TokenForAnotherMac(booted.to_string()));
        }
    }
    Ok(macs)
}

fn check_text(id: &MachineIdentity) -> Result<(), Refusal> {
    let fields = [
        ("hostname", id.hostname.as_deref()),
        ("vendor", id.vendor.as_deref()),
        ("product", id.product.as_deref()),
        ("serial number", id.serial.as_deref()),
        ("UUID", id.uuid.as_deref()),
        ("firmware", id.firmware.as_deref()),
    ];
    let disks = id.disks.iter().flat_map(|d| {
        [
            ("disk name", Some(d.name.as_str())),
            ("disk model", Some(d.model.as_str())),
            ("disk serial", Some(d.serial.as_str())),
        ]
    });
    let macs = id.macs.iter().map(|m| ("MAC address", Some(m.as_str())));
    let pci = id.pci.iter().flat_map(|d| d.texts());
    match fields
        .into_iter()
        .chain(disks)
        .chain(macs)
        .chain(pci)
        .find(|(_, v)| v.is_some_and(|v| v.len() > MAX_TEXT))
    {
        Some((what, _)) => Err(Refusal::TooLong(what)),
        None => Ok(()),
    }
}

/// What differs between two identities, in words (hostname, CPUs, memory, firmware, Secure
/// Boot and PCI devices may change freely: they describe what a deploy must fit, not who the
/// machine is).
fn differences(old: &MachineIdentity, new: &MachineIdentity) -> Vec<&'static str> {
    let macs = |i: &MachineIdentity| {
        let mut m: Vec<String> = i.macs.iter().filter_map(|m| normalize_mac(m)).collect();
        m.sort();
        m.dedup();
        m
    };
    let disks = |i: &MachineIdentity| {
        let mut d: Vec<(String, u64, String)> = i
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.size, d.serial.clone()))
            .collect();
        d.sort();
        d
    };
    let mut out = Vec::new();
    if macs(old) != macs(new) {
        out.push("MAC addresses");
    }
    if old.uuid != new.uuid {
        out.push("system UUID");
    }
    if old.serial != new.serial {
        out.push("serial number");
    }
    if (&old.vendor, &old.product) != (&new.vendor, &new.product) {
        out.push("vendor or product");
    }
    if disks(old) != disks(new) {
        out.push("disks");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::machines::tests::ident;
    use super::*;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        (dir, c)
    }

    #[test]
    fn a_new_machine_waits_for_approval_then_its_key_is_the_machine() {
        let (_d, c) = catalog();
        let id = ident(&["52:54:00:aa:00:01"], "PC");
        let e = c.enroll(&id, "key-a", None).unwrap();
        assert!(!e.approved);
        assert_eq!(e.waiting.as_deref(), Some("new machine"));
        let m = c.machine(e.machine_id).unwrap().unwrap();
        assert!(!m.approved && m.pending.is_some());
        c.approve_machine(e.machine_id).unwrap();
        assert!(c.is_approved_key(e.machine_id, "key-a").unwrap());
        let again = c.enroll(&id, "key-a", None).unwrap();
        assert_eq!((again.machine_id, again.approved), (e.machine_id, true));
        assert!(c.approve_machine(e.machine_id).is_err(), "nothing pending");
    }

    #[test]
    fn another_key_claiming_the_mac_gets_nothing_without_approval() {
        let (_d, c) = catalog();
        let id = ident(&["52:54:00:aa:00:01"], "PC");
        let m = c.enroll(&id, "real", None).unwrap().machine_id;
        c.approve_machine(m).unwrap();
        // Same MAC, same identity, another key and no token: waits.
        let rogue = c.enroll(&id, "rogue", None).unwrap();
        assert_eq!(rogue.machine_id, m);
        assert!(!rogue.approved);
        assert!(
            c.is_approved_key(m, "real").unwrap(),
            "the real key still works"
        );
        assert!(!c.is_approved_key(m, "rogue").unwrap());
        // With a token but another identity: still waits.
        let mut other = id.clone();
        other.serial = Some("ROGUE".into());
        let rogue = c
            .enroll(&other, "rogue", Some("52:54:00:aa:00:01"))
            .unwrap();
        assert!(!rogue.approved);
        assert!(rogue.waiting.unwrap().contains("serial number"));
        // A token for the machine's MAC and an unchanged identity: a PXE reboot.
        let reboot = c.enroll(&id, "fresh", Some("52:54:00:aa:00:01")).unwrap();
        assert!(reboot.approved);
        assert!(!c.is_approved_key(m, "real").unwrap(), "approval moved");
    }

    #[test]
    fn a_machine_registered_before_it_boots_is_approved_on_its_first_pxe_enrollment() {
        let (_d, c) = catalog();
        let m = c
            .register_machine("52:54:00:aa:00:01", "lab-01", None)
            .unwrap();
        let id = ident(&["52:54:00:aa:00:01", "52:54:00:aa:00:02"], "PC");
        // Without a token (not booted through /boot.ipxe) it waits like any other.
        let e = c.enroll(&id, "k1", None).unwrap();
        assert!(!e.approved && e.machine_id == m);
        let e = c.enroll(&id, "k1", Some("52:54:00:aa:00:01")).unwrap();
        assert!(e.approved, "{e:?}");
        let rec = c.machine(m).unwrap().unwrap();
        assert!(!rec.preregistered && rec.pending.is_none());
        assert_eq!(rec.macs, ["52:54:00:aa:00:01", "52:54:00:aa:00:02"]);
        assert_eq!(c.find_machine("52:54:00:aa:00:02").unwrap().unwrap().id, m);
        // Only the first: another key later needs what any approved machine needs.
        let e = c.enroll(&id, "k2", None).unwrap();
        assert!(!e.approved);
    }

    #[test]
    fn mac_sets_of_two_machines_are_never_merged() {
        let (_d, c) = catalog();
        let a = c
            .enroll(&ident(&["52:54:00:aa:00:01"], "PC"), "a", None)
            .unwrap()
            .machine_id;
        let b = c
            .enroll(&ident(&["52:54:00:aa:00:02"], "PC"), "b", None)
            .unwrap()
            .machine_id;
        let both = ident(&["52:54:00:aa:00:01", "52:54:00:aa:00:02"], "PC");
        let err = c.enroll(&both, "x", None).unwrap_err();
        assert!(
            matches!(err, CatalogError::Refused(Refusal::SeveralMachines(ref v)) if v == &[a, b]),
            "{err}"
        );
        assert_eq!(c.machine(a).unwrap().unwrap().macs, ["52:54:00:aa:00:01"]);
    }

    #[test]
    fn a_token_must_match_an_announced_mac_and_identities_are_bounded() {
        let (_d, c) = catalog();
        let id = ident(&["52:54:00:aa:00:01"], "PC");
        assert!(matches!(
            c.enroll(&id, "k", Some("52:54:00:aa:00:09")),
            Err(CatalogError::Refused(Refusal::TokenForAnotherMac(_)))
        ));
        let many: Vec<String> = (0..17).map(|i| format!("52:54:00:00:00:{i:02x}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            c.enroll(&ident(&many, "PC"), "k", None),
            Err(CatalogError::Refused(Refusal::TooManyMacs(17)))
        ));
        let mut long = id.clone();
        long.hostname = Some("h".repeat(MAX_TEXT + 1));
        assert!(matches!(
            c.enroll(&long, "k", None),
            Err(CatalogError::Refused(Refusal::TooLong("hostname")))
        ));
        assert!(matches!(
            c.enroll(&ident(&["nonsense"], "PC"), "k", None),
            Err(CatalogError::Refused(Refusal::NoMac))
        ));
    }

    #[test]
    fn pci_devices_are_bounded() {
        let (_d, c) = catalog();
        let dev = diskferry_customize::compat::PciDevice {
            class: "0x010000".into(),
            ..Default::default()
        };
        let mut id = ident(&["52:54:00:aa:00:01"], "PC");
        id.pci = vec![dev.clone(); MAX_PCI + 1];
        assert!(matches!(
            c.enroll(&id, "k", None),
            Err(CatalogError::Refused(Refusal::TooManyPci(n))) if n == MAX_PCI + 1
        ));
        id.pci = vec![dev.clone(); MAX_PCI];
        id.pci[7].modalias = Some("p".repeat(MAX_TEXT + 1));
        assert!(matches!(
            c.enroll(&id, "k", None),
            Err(CatalogError::Refused(Refusal::TooLong("PCI modalias")))
        ));
        id.pci[7].modalias = None;
        id.pci[3].driver = Some("d".repeat(MAX_TEXT + 1));
        assert!(matches!(
            c.enroll(&id, "k", None),
            Err(CatalogError::Refused(Refusal::TooLong("PCI driver")))
        ));
        id.pci[3].driver = None;
        id.firmware = Some("f".repeat(MAX_TEXT + 1));
        assert!(matches!(
            c.enroll(&id, "k", None),
            Err(CatalogError::Refused(Refusal::TooLong("firmware")))
        ));
        id.firmware = Some("uefi".into());
        assert!(c.enroll(&id, "k", None).is_ok());
    }

    #[test]
    fn firmware_and_pci_changes_need_no_new_approval() {
        let (_d, c) = catalog();
        let mut id = ident(&["52:54:00:aa:00:01"], "PC");
        id.firmware = Some("bios".into());
        let m = c.enroll(&id, "key", None).unwrap().machine_id;
        c.approve_machine(m).unwrap();
        // The firmware switched to UEFI with Secure Boot, a controller was added.
        id.firmware = Some("uefi".into());
        id.secure_boot = Some(true);
        id.pci.push(diskferry_customize::compat::PciDevice {
            class: "0x010802".into(),
            vendor: "0x144d".into(),
            device: "0xa808".into(),
            driver: Some("nvme".into()),
            ..Default::default()
        });
        let again = c.enroll(&id, "key", None).unwrap();
        assert!(again.approved && again.waiting.is_none(), "{again:?}");
        let stored = c.machine(m).unwrap().unwrap().identity.unwrap();
        assert_eq!(stored.firmware.as_deref(), Some("uefi"));
        assert_eq!(
            stored.pci.len(),
            1,
            "the new facts are kept for the next deploy"
        );
    }

    #[test]
    fn a_registration_flood_stops_at_the_pending_cap() {
        let (_d, c) = catalog();
        for i in 0..MAX_PENDING {
            let mac = format!("52:54:00:01:{:02x}:{:02x}", i / 256, i % 256);
            c.enroll(&ident(&[&mac], "PC"), "k", None).unwrap();
        }
        let err = c
            .enroll(&ident(&["52:54:00:ff:ff:ff"], "PC"), "k", None)
            .unwrap_err();
        assert!(matches!(
            err,
            CatalogError::Refused(Refusal::TooManyPending)
        ));
        let first = c.find_machine("52:54:00:01:00:00").unwrap().unwrap();
        c.forget_machine(first.id).unwrap();
        c.enroll(&ident(&["52:54:00:ff:ff:ff"], "PC"), "k", None)
            .unwrap();
    }
}
