//! Machines in the catalog: identified by their MAC addresses, with the hardware they
//! announced (configurations shared by several machines stored once), their state and their
//! approval. The agent port fills this registry through enrollment (`enroll.rs`); the web UI
//! and `diskferry machines` read it.

use rusqlite::{OptionalExtension, Row};
use serde::Serialize;

use super::{Catalog, CatalogError};

/// One machine as the catalog knows it.
#[derive(Debug, Clone, Serialize)]
pub struct MachineRecord {
    pub id: i64,
    /// The registered name; `None` while unregistered.
    pub name: Option<String>,
    /// MAC addresses, lowercase colon form.
    pub macs: Vec<String>,
    /// The announced hardware (vendor, product, disks...), shared between machines alike.
    pub hardware: Option<serde_json::Value>,
    /// "unregistered", "dormant", "transitioning", "deployed" or "failed".
    pub state: String,
    pub last_seen: Option<i64>,
    pub created_at: i64,
    /// Everything the machine announced last time it was accepted (hostname, serial, UUID,
    /// disks...).
    pub identity: Option<MachineIdentity>,
    /// Whether an agent key is approved to act as this machine.
    pub approved: bool,
    /// The approved agent key's fingerprint.
    pub agent_key: Option<String>,
    /// An enrollment awaiting an administrator.
    pub pending: Option<super::PendingApproval>,
    /// Registered by an administrator before it first booted: its first enrollment through a
    /// PXE token is approved.
    pub preregistered: bool,
    /// The address it last connected from, or the one it was registered with.
    pub address: Option<String>,
    /// The groups it belongs to (a classroom, a rack), sorted.
    pub groups: Vec<String>,
}

/// The columns [`from_row`] reads, in order.
const COLUMNS: &str = "m.id, m.name, m.macs, h.info, m.state, m.last_seen, m.created_at,
    m.identity, m.approved_key, m.pending, m.admit_first, m.last_address,
    (SELECT json_group_array(name) FROM
        (SELECT name FROM machine_groups g WHERE g.machine_id = m.id ORDER BY name))";

fn from_row(row: &Row<'_>) -> rusqlite::Result<MachineRecord> {
    let macs: String = row.get(2)?;
    let hardware: Option<String> = row.get(3)?;
    Ok(MachineRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        macs: serde_json::from_str(&macs).unwrap_or_default(),
        hardware: hardware.and_then(|h| serde_json::from_str(&h).ok()),
        state: row.get(4)?,
        last_seen: row.get(5)?,
        created_at: row.get(6)?,
        identity: row
            .get::<_, Option<String>>(7)?
            .and_then(|i| serde_json::from_str(&i).ok()),
        approved: row.get::<_, Option<String>>(8)?.is_some(),
        agent_key: row
            .get::<_, Option<String>>(8)?
            .map(|k| k.chars().take(16).collect()),
        pending: row
            .get::<_, Option<String>>(9)?
            .and_then(|p| serde_json::from_str(&p).ok()),
        preregistered: row.get(10)?,
        address: row.get(11)?,
        groups: serde_json::from_str(&row.get::<_, String>(12)?).unwrap_or_default(),
    })
}

impl MachineRecord {
    /// How people and jobs name it: its name, else its first MAC address, else its id.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.macs.first().cloned())
            .unwrap_or_else(|| self.id.to_string())
    }
}

impl Catalog {
    /// Every machine, registered ones first by name, then the rest by when they were last seen.
    pub fn machines(&self) -> Result<Vec<MachineRecord>, CatalogError> {
        self.rows(
            &self.db(),
            &format!(
                "SELECT {COLUMNS} FROM machines m LEFT JOIN hardware h ON h.id = m.hardware_id
                 ORDER BY m.name IS NULL, m.name, m.last_seen DESC"
            ),
            [],
            from_row,
        )
    }

    /// One machine by id.
    pub fn machine(&self, id: i64) -> Result<Option<MachineRecord>, CatalogError> {
        self.db()
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM machines m LEFT JOIN hardware h ON h.id = m.hardware_id
                     WHERE m.id = ?1"
                ),
                [id],
                from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }
}

/// The hardware part of an identity, as stored once for machines alike (vendor, product,
/// CPUs, memory, disk models and sizes).
pub(super) fn hardware_json(id: &MachineIdentity) -> String {
    serde_json::json!({
        "vendor": id.vendor, "product": id.product, "cpus": id.cpus, "memory": id.memory,
        "disks": id.disks.iter().map(|d| serde_json::json!({"model": d.model, "size": d.size})).collect::<Vec<_>>(),
    })
    .to_string()
}

/// What a dial-back agent announces about its machine (the client's identity document).
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize, PartialEq)]
pub struct MachineIdentity {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub macs: Vec<String>,
    #[serde(default)]
    pub vendor: Option<String>,
    #[serde(default)]
    pub product: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory: u64,
    #[serde(default)]
    pub disks: Vec<IdentityDisk>,
    /// "uefi" or "bios" (deploy compatibility; not part of who the machine is).
    #[serde(default)]
    pub firmware: Option<String>,
    #[serde(default)]
    pub secure_boot: Option<bool>,
    /// PCI devices, storage and network controllers first (at most `enroll::MAX_PCI`).
    #[serde(default)]
    pub pci: Vec<diskferry_customize::compat::PciDevice>,
}

/// A disk in a machine's identity.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize, PartialEq)]
pub struct IdentityDisk {
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub read_only: bool,
    /// The PCI address of its controller (deploys check that controller's driver).
    #[serde(default)]
    pub controller: Option<String>,
}

/// `52-54-00-AB-cd-EF` or `5254.00ab.cdef` → `52:54:00:ab:cd:ef`; `None` if not a MAC.
pub fn normalize_mac(s: &str) -> Option<String> {
    let hex: String = s
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(
        hex.as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Machine states.
pub mod state {
    pub const UNREGISTERED: &str = "unregistered";
    pub const DORMANT: &str = "dormant";
    pub const TRANSITIONING: &str = "transitioning";
    pub const DEPLOYED: &str = "deployed";
    pub const FAILED: &str = "failed";
}

impl Catalog {
    /// Finds a machine by registered name, MAC address (any form) or id.
    pub fn find_machine(&self, key: &str) -> Result<Option<MachineRecord>, CatalogError> {
        let id: Option<i64> = {
            let db = self.db();
            let by_name = db
                .query_row("SELECT id FROM machines WHERE name = ?1", [key], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| self.sql(e))?;
            let by_mac = match (by_name, normalize_mac(key)) {
                (None, Some(mac)) => db
                    .query_row(
                        "SELECT machine_id FROM machine_macs WHERE mac = ?1",
                        [mac],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(|e| self.sql(e))?,
                _ => None,
            };
            by_name.or(by_mac).or_else(|| key.parse().ok())
        };
        match id {
            Some(id) => self.machine(id),
            None => Ok(None),
        }
    }

    /// Registers a machine under `name` (unregistered machines become dormant) or renames it.
    pub fn name_machine(&self, id: i64, name: &str) -> Result<(), CatalogError> {
        let name = checked_name(name)?;
        let db = self.db();
        let taken: Option<i64> = db
            .query_row(
                "SELECT id FROM machines WHERE name = ?1 AND id != ?2",
                rusqlite::params![name, id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        if taken.is_some() {
            return Err(CatalogError::Invalid(format!(
                "another machine is already named {name}"
            )));
        }
        let n = db
            .execute(
                "UPDATE machines SET name = ?2,
                    state = CASE state WHEN 'unregistered' THEN 'dormant' ELSE state END
                 WHERE id = ?1",
                rusqlite::params![id, name],
            )
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(CatalogError::Invalid(format!("no machine with id {id}")));
        }
        Ok(())
    }

    /// Registers the machine with MAC address `mac` under `name` before it ever boots (as an
    /// administrator adds a host by hand): a new machine is created, dormant and
    /// `preregistered` — its first enrollment through a PXE token for that MAC is approved —
    /// and a known one is named. `address` is where Wake-on-LAN finds its network until it
    /// connects. Returns the machine's id.
    pub fn register_machine(
        &self,
        mac: &str,
        name: &str,
        address: Option<std::net::IpAddr>,
    ) -> Result<i64, CatalogError> {
        let mac = normalize_mac(mac).ok_or_else(|| {
            CatalogError::Invalid(format!(
                "{mac:?} is not a MAC address (such as 52:54:00:12:34:56)"
            ))
        })?;
        let id = match self.find_machine(&mac)? {
            Some(m) => m.id,
            None => {
                checked_name(name)?;
                let db = self.db();
                let tx = db.unchecked_transaction().map_err(|e| self.sql(e))?;
                tx.execute(
                    "INSERT INTO machines (macs, state, created_at, admit_first)
                     VALUES (?1, ?2, ?3, 1)",
                    rusqlite::params![
                        serde_json::json!([mac]).to_string(),
                        state::DORMANT,
                        super::unix_now()
                    ],
                )
                .map_err(|e| self.sql(e))?;
                let id = tx.last_insert_rowid();
                tx.execute(
                    "INSERT INTO machine_macs (mac, machine_id) VALUES (?1, ?2)",
                    rusqlite::params![mac, id],
                )
                .map_err(|e| self.sql(e))?;
                tx.commit().map_err(|e| self.sql(e))?;
                id
            }
        };
        if let Err(e) = self.name_machine(id, name) {
            // A machine created just now must not stay behind nameless.
            if self
                .machine(id)?
                .is_some_and(|m| m.name.is_none() && m.preregistered)
            {
                let _ = self.forget_machine(id);
            }
            return Err(e);
        }
        if let Some(addr) = address {
            self.set_machine_address(id, &addr.to_string())?;
        }
        Ok(id)
    }

    /// Sets the groups a machine belongs to (none: it leaves every group).
    pub fn set_machine_groups(&self, id: i64, groups: &[String]) -> Result<(), CatalogError> {
        if groups.len() > MAX_GROUPS {
            return Err(CatalogError::Invalid(format!(
                "a machine belongs to at most {MAX_GROUPS} groups"
            )));
        }
        let names = groups
            .iter()
            .map(|g| checked_name(g).map(str::to_string))
            .collect::<Result<Vec<_>, _>>()?;
        let db = self.db();
        let tx = db.unchecked_transaction().map_err(|e| self.sql(e))?;
        tx.execute("DELETE FROM machine_groups WHERE machine_id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        for name in names {
            tx.execute(
                "INSERT OR IGNORE INTO machine_groups (machine_id, name) VALUES (?1, ?2)",
                rusqlite::params![id, name],
            )
            .map_err(|e| self.sql(e))?;
        }
        tx.commit().map_err(|e| self.sql(e))
    }

    /// Every group that has a machine, sorted.
    pub fn group_names(&self) -> Result<Vec<String>, CatalogError> {
        let db = self.db();
        let mut stmt = db
            .prepare("SELECT DISTINCT name FROM machine_groups ORDER BY name")
            .map_err(|e| self.sql(e))?;
        let names = stmt
            .query_map([], |r| r.get(0))
            .and_then(Iterator::collect)
            .map_err(|e| self.sql(e));
        names
    }

    /// The machines of a group, by name.
    pub fn group_members(&self, group: &str) -> Result<Vec<MachineRecord>, CatalogError> {
        self.rows(
            &self.db(),
            &format!(
                "SELECT {COLUMNS} FROM machines m LEFT JOIN hardware h ON h.id = m.hardware_id
                 WHERE m.id IN (SELECT machine_id FROM machine_groups WHERE name = ?1)
                 ORDER BY m.name IS NULL, m.name, m.id"
            ),
            [group],
            from_row,
        )
    }

    /// Notes the address a machine connected from.
    pub fn set_machine_address(&self, id: i64, address: &str) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE machines SET last_address = ?2 WHERE id = ?1",
                rusqlite::params![id, address],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Sets a machine's state (see [`state`]).
    pub fn set_machine_state(&self, id: i64, new_state: &str) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE machines SET state = ?2 WHERE id = ?1",
                rusqlite::params![id, new_state],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }
}

/// Most groups one machine belongs to.
pub const MAX_GROUPS: usize = 16;

/// `name` trimmed, if it can name a machine (or a group).
fn checked_name(name: &str) -> Result<&str, CatalogError> {
    let name = name.trim();
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && normalize_mac(name).is_none()
        && name.parse::<i64>().is_err();
    if valid {
        Ok(name)
    } else {
        Err(CatalogError::Invalid(format!(
            "{name:?} is not a usable machine name: use up to 63 letters, digits, '-', '_' or '.', not a number or a MAC address"
        )))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::catalog) fn ident(macs: &[&str], product: &str) -> MachineIdentity {
        MachineIdentity {
            macs: macs.iter().map(|s| s.to_string()).collect(),
            product: Some(product.into()),
            cpus: 2,
            memory: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn machines_share_hardware_and_are_found_by_name_mac_or_id() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let a = c
            .enroll(&ident(&["52:54:00:AA:00:01"], "Standard PC"), "k1", None)
            .unwrap()
            .machine_id;
        let b = c
            .enroll(&ident(&["52-54-00-aa-00-02"], "Standard PC"), "k2", None)
            .unwrap()
            .machine_id;
        assert_ne!(a, b);
        let all = c.machines().unwrap();
        assert_eq!(all.len(), 2);
        let ma = all.iter().find(|m| m.id == a).unwrap();
        assert_eq!(ma.macs, ["52:54:00:aa:00:01"]);
        assert_eq!(ma.state, state::UNREGISTERED);
        let hw: i64 = c
            .db()
            .query_row("SELECT COUNT(*) FROM hardware", [], |r| r.get(0))
            .unwrap();
        assert_eq!(hw, 1, "two machines alike share one hardware row");

        c.name_machine(a, "web-01").unwrap();
        assert_eq!(
            c.find_machine("web-01").unwrap().unwrap().state,
            state::DORMANT
        );
        assert_eq!(c.find_machine("52:54:00:AA:00:01").unwrap().unwrap().id, a);
        assert_eq!(c.find_machine(&b.to_string()).unwrap().unwrap().id, b);
        assert!(c.name_machine(b, "web-01").is_err(), "names are unique");
        assert!(c.name_machine(b, "52:54:00:aa:00:02").is_err());
        assert!(c.name_machine(b, "bad name").is_err());
        c.name_machine(a, "web-02").unwrap();
        assert!(c.find_machine("web-01").unwrap().is_none());
    }

    #[test]
    fn machines_registered_before_they_boot_are_known_by_mac() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let addr = "10.1.2.3".parse().ok();
        let id = c
            .register_machine("52-54-00-AA-00-09", "lab-09", addr)
            .unwrap();
        let m = c.find_machine("52:54:00:aa:00:09").unwrap().unwrap();
        assert_eq!(m.id, id);
        assert_eq!(m.name.as_deref(), Some("lab-09"));
        assert_eq!(m.state, state::DORMANT);
        assert!(m.preregistered && !m.approved);
        assert_eq!(m.address.as_deref(), Some("10.1.2.3"));
        // Registering a known MAC names that machine.
        assert_eq!(
            c.register_machine("52:54:00:aa:00:09", "lab-9", None)
                .unwrap(),
            id
        );
        assert!(c
            .register_machine("52:54:00:aa:00:0a", "lab-9", None)
            .is_err());
        assert!(c.register_machine("not-a-mac", "x", None).is_err());
        assert!(c
            .register_machine("52:54:00:aa:00:0b", "bad name", None)
            .is_err());
        assert_eq!(
            c.machines().unwrap().len(),
            1,
            "refused registrations leave nothing"
        );
    }

    #[test]
    fn machines_belong_to_groups() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let a = c
            .register_machine("52:54:00:aa:00:01", "pc-01", None)
            .unwrap();
        let b = c
            .register_machine("52:54:00:aa:00:02", "pc-02", None)
            .unwrap();
        c.set_machine_groups(a, &["room-4".into(), "all".into()])
            .unwrap();
        c.set_machine_groups(b, &["room-4".into()]).unwrap();
        assert_eq!(c.group_names().unwrap(), ["all", "room-4"]);
        assert_eq!(c.machine(a).unwrap().unwrap().groups, ["all", "room-4"]);
        let room: Vec<i64> = c
            .group_members("room-4")
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(room, [a, b]);
        c.set_machine_groups(a, &[]).unwrap();
        assert!(c.machine(a).unwrap().unwrap().groups.is_empty());
        assert!(c.set_machine_groups(a, &["bad name".into()]).is_err());
        assert!(c
            .set_machine_groups(a, &vec!["g".to_string(); MAX_GROUPS + 1])
            .is_err());
        c.forget_machine(b).unwrap();
        assert!(c.group_members("room-4").unwrap().is_empty());
    }
}
