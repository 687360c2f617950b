//! Machines in the catalog: identified by their MAC addresses, with the hardware they
//! announced (configurations shared by several machines stored once) and their state. The PXE
//! dial-back listener fills this registry; the web UI and `diskferry machines` read it.

use rusqlite::Row;
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
}

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
    })
}

impl Catalog {
    /// Every machine, registered ones first by name, then the rest by when they were last seen.
    pub fn machines(&self) -> Result<Vec<MachineRecord>, CatalogError> {
        let db = self.db();
        let mut stmt = db
            .prepare(
                "SELECT m.id, m.name, m.macs, h.info, m.state, m.last_seen, m.created_at
                 FROM machines m LEFT JOIN hardware h ON h.id = m.hardware_id
                 ORDER BY m.name IS NULL, m.name, m.last_seen DESC",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], from_row)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sql(e))?;
        Ok(rows)
    }
}
