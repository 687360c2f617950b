//! The catalog: what the server knows between restarts — captures (images under
//! `DATA_DIR/captures` and their cached analysis), jobs (captures and deploys with their progress
//! and log) and machines — in one embedded SQLite database, `DATA_DIR/catalog.sqlite`.
//!
//! One connection behind a mutex: every statement is short, and slow work (analysing an image)
//! runs without holding it. The schema is versioned with `PRAGMA user_version`.

mod captures;
mod chains;
mod enroll;
mod jobs;
mod machines;
mod queue;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

pub use captures::{CaptureRecord, CaptureRecording, RefreshReport};
pub use chains::{chain_of, children_of, Relation};
pub use enroll::{Enrolled, IdentityLimits, PendingApproval, Refusal};
pub use jobs::{JobRecord, JobState};
pub use machines::{normalize_mac, state, IdentityDisk, MachineIdentity, MachineRecord};
pub use queue::{QueuedJob, ScheduleRecord, WaitingJob};

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database {path}: {source}")]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("enrollment refused: {0}")]
    Refused(#[from] Refusal),
    #[error("cannot open the capture {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: Box<diskferry_vdisk::ImageError>,
    },
    /// A capture other captures' overlays read through (their backing file).
    #[error("{capture} is the backing file of {}: delete those first (a files-mode incremental capture does not depend on its base once written; only overlays do)", .dependents.join(", "))]
    HasDependents {
        capture: String,
        dependents: Vec<String>,
    },
    #[error("catalog database {path} has schema version {found}, newer than this diskferry knows ({known}); use a newer diskferry")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

/// The catalog of one data directory.
pub struct Catalog {
    db: Mutex<Connection>,
    db_path: PathBuf,
    data_dir: PathBuf,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("db_path", &self.db_path)
            .finish()
    }
}

/// Schema migrations, in order; `user_version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: captures, jobs, machines and the hardware they share.
    "CREATE TABLE captures (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        format TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        allocated_size INTEGER NOT NULL,
        file_size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        analysis TEXT,
        analysis_error TEXT,
        source_machine TEXT,
        added_at INTEGER NOT NULL
     );
     CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        params TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        progress TEXT,
        log TEXT NOT NULL DEFAULT '',
        error TEXT
     );
     CREATE TABLE hardware (
        id INTEGER PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        info TEXT NOT NULL
     );
     CREATE TABLE machines (
        id INTEGER PRIMARY KEY,
        name TEXT UNIQUE,
        macs TEXT NOT NULL,
        hardware_id INTEGER REFERENCES hardware(id),
        state TEXT NOT NULL,
        last_seen INTEGER,
        created_at INTEGER NOT NULL
     );",
    // 2: the last identity document a machine announced.
    "ALTER TABLE machines ADD COLUMN identity TEXT",
    // 3: enrollment. Each MAC belongs to one machine (indexed); `approved_key` is the agent key
    // allowed to act as the machine; `pending` an enrollment awaiting an administrator. Machines
    // registered before protocol 2 must be approved again (their agents had no keys).
    "ALTER TABLE machines ADD COLUMN approved_key TEXT;
     ALTER TABLE machines ADD COLUMN pending TEXT;
     CREATE TABLE machine_macs (
        mac TEXT PRIMARY KEY,
        machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE
     );
     INSERT OR IGNORE INTO machine_macs (mac, machine_id)
        SELECT j.value, m.id FROM machines m, json_each(m.macs) j",
    // 4: capture chains. The disk a capture was read from; its base (a path under captures)
    // and how it uses it ("overlay": a qcow2 backing file, "files": unchanged files copied
    // from it); whether a usable chunk map lies beside it, the layout the map records and the
    // map file's mtime (to notice a new map); an incremental capture's statistics; and what a
    // job produced.
    "ALTER TABLE captures ADD COLUMN source_disk TEXT;
     ALTER TABLE captures ADD COLUMN base_path TEXT;
     ALTER TABLE captures ADD COLUMN base_relation TEXT;
     ALTER TABLE captures ADD COLUMN chunk_map INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE captures ADD COLUMN layout TEXT;
     ALTER TABLE captures ADD COLUMN map_mtime_ns INTEGER;
     ALTER TABLE captures ADD COLUMN incremental TEXT;
     ALTER TABLE jobs ADD COLUMN result TEXT",
    // 5: fleet imaging. Machines an administrator registered before they ever booted
    // (`admit_first`: their first enrollment through a PXE token is approved) and the address
    // a machine last connected from (Wake-on-LAN finds its network by it). Jobs waiting for
    // their machine or their time: the request as given (checked again when it starts), the
    // machine, when it may start, when the last magic packet went out and the schedule that
    // made it. Recurring schedules. Groups of machines (a classroom, a rack).
    "ALTER TABLE machines ADD COLUMN admit_first INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE machines ADD COLUMN last_address TEXT;
     ALTER TABLE jobs ADD COLUMN request TEXT;
     ALTER TABLE jobs ADD COLUMN machine_id INTEGER;
     ALTER TABLE jobs ADD COLUMN not_before INTEGER;
     ALTER TABLE jobs ADD COLUMN woken_at INTEGER;
     ALTER TABLE jobs ADD COLUMN schedule_id INTEGER;
     CREATE INDEX jobs_waiting ON jobs (state, machine_id);
     CREATE TABLE machine_groups (
        machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        PRIMARY KEY (machine_id, name)
     );
     CREATE INDEX machine_groups_name ON machine_groups (name);
     CREATE TABLE schedules (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        request TEXT NOT NULL,
        machine_id INTEGER REFERENCES machines(id) ON DELETE CASCADE,
        every TEXT NOT NULL,
        next_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        last_job INTEGER
     )",
];

impl Catalog {
    /// Opens (creating on first use) the catalog of `data_dir`, and its `captures` directory.
    pub fn open(data_dir: &Path) -> Result<Catalog, CatalogError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CatalogError::Io { path, source }
        };
        std::fs::create_dir_all(data_dir.join("captures"))
            .map_err(io(&data_dir.join("captures")))?;
        // Captures hold whole disks (password hashes, keys, data): only the server's user may
        // read them. An existing directory is tightened too.
        for dir in [data_dir.to_path_buf(), data_dir.join("captures")] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(&dir))?;
        }
        let db_path = data_dir.join("catalog.sqlite");
        let sql = |source| CatalogError::Sql {
            path: db_path.clone(),
            source,
        };
        let conn = Connection::open(&db_path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(sql)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(CatalogError::TooNew {
                path: db_path,
                found: version,
                known,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            conn.execute_batch(&format!(
                "BEGIN; {m}; PRAGMA user_version = {}; COMMIT;",
                i + 1
            ))
            .map_err(sql)?;
        }
        Ok(Catalog {
            db: Mutex::new(conn),
            db_path,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where captures live: every image under it is in the catalog.
    pub fn captures_dir(&self) -> PathBuf {
        self.data_dir.join("captures")
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (statements are
        // atomic), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every row `sql` returns, mapped, on a connection the caller holds.
    fn rows<T>(
        &self,
        db: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, CatalogError> {
        let mut stmt = db.prepare(sql).map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params, map)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.sql(e))?;
        Ok(rows)
    }

    fn sql(&self, source: rusqlite::Error) -> CatalogError {
        CatalogError::Sql {
            path: self.db_path.clone(),
            source,
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_twice_and_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        Catalog::open(dir.path()).unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        assert!(c.captures_dir().is_dir());
        for dir in [dir.path().to_path_buf(), c.captures_dir()] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode,
                0o700,
                "{} is for the server's user only",
                dir.display()
            );
        }
        c.db().pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Catalog::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("newer diskferry"), "{err}");
    }
}
