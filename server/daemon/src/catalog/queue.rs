//! Jobs that wait — for their machine to connect (woken by a magic packet) or for their time —
//! and the recurring schedules that queue them. A waiting job is an ordinary job row in state
//! `queued` that keeps the request as given, so it is checked again when it starts (the
//! machine's disks are known only once it connects); it survives restarts. A schedule is a
//! request with a recurrence (`every`) and the next time it is due.

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use super::jobs::{from_row as job_from_row, COLUMNS as JOB_COLUMNS};
use super::{unix_now, Catalog, CatalogError, JobRecord};

/// A job waiting for its machine or its time.
#[derive(Debug, Clone)]
pub struct WaitingJob {
    pub id: i64,
    pub kind: String,
    /// The request as given (JSON).
    pub request: String,
    pub machine_id: Option<i64>,
    pub not_before: i64,
    pub woken_at: Option<i64>,
}

/// What queuing a job records.
#[derive(Debug, Clone)]
pub struct QueuedJob<'a> {
    pub kind: &'a str,
    /// What the jobs page shows (as for any job).
    pub params: &'a serde_json::Value,
    /// The request, checked again when the job starts.
    pub request: &'a serde_json::Value,
    pub machine_id: Option<i64>,
    pub not_before: i64,
    pub schedule_id: Option<i64>,
}

/// A recurring schedule.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleRecord {
    pub id: i64,
    /// "capture" or "deploy".
    pub kind: String,
    /// The job request each occurrence queues.
    pub request: serde_json::Value,
    pub machine_id: Option<i64>,
    /// The recurrence, as given ("sun 02:00", "daily 23:30", ...).
    pub every: String,
    /// When it is next due (seconds since the epoch).
    pub next_at: i64,
    pub created_at: i64,
    /// The job its last occurrence queued.
    pub last_job: Option<i64>,
}

fn schedule_from_row(row: &Row<'_>) -> rusqlite::Result<ScheduleRecord> {
    let request: String = row.get(2)?;
    Ok(ScheduleRecord {
        id: row.get(0)?,
        kind: row.get(1)?,
        request: serde_json::from_str(&request).unwrap_or(serde_json::Value::Null),
        machine_id: row.get(3)?,
        every: row.get(4)?,
        next_at: row.get(5)?,
        created_at: row.get(6)?,
        last_job: row.get(7)?,
    })
}

const SCHEDULE_COLUMNS: &str =
    "id, kind, request, machine_id, every, next_at, created_at, last_job";

impl Catalog {
    /// Records a job that waits for its machine or its time; returns its id.
    pub fn queue_job(&self, job: &QueuedJob<'_>) -> Result<i64, CatalogError> {
        let db = self.db();
        db.execute(
            "INSERT INTO jobs (kind, state, params, created_at, request, machine_id, not_before,
                schedule_id)
             VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                job.kind,
                job.params.to_string(),
                unix_now(),
                job.request.to_string(),
                job.machine_id,
                job.not_before,
                job.schedule_id
            ],
        )
        .map_err(|e| self.sql(e))?;
        Ok(db.last_insert_rowid())
    }

    /// Jobs still waiting, the earliest due first.
    pub fn waiting_jobs(&self) -> Result<Vec<WaitingJob>, CatalogError> {
        self.rows(
            &self.db(),
            "SELECT id, kind, request, machine_id, not_before, woken_at FROM jobs
             WHERE state = 'queued' AND request IS NOT NULL ORDER BY not_before, id",
            [],
            |r| {
                Ok(WaitingJob {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    request: r.get(2)?,
                    machine_id: r.get(3)?,
                    not_before: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                    woken_at: r.get(5)?,
                })
            },
        )
    }

    /// The jobs waiting for one machine, the earliest due first.
    pub fn waiting_jobs_of(&self, machine_id: i64) -> Result<Vec<JobRecord>, CatalogError> {
        self.rows(
            &self.db(),
            &format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' AND request IS NOT NULL
                 AND machine_id = ?1 ORDER BY not_before, id"
            ),
            [machine_id],
            job_from_row,
        )
    }

    /// Whether a job for the machine is due now (so it must boot the imaging environment).
    pub fn machine_has_due_job(&self, machine_id: i64) -> Result<bool, CatalogError> {
        self.db()
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'queued' AND request IS NOT NULL
                    AND machine_id = ?1 AND not_before <= ?2)",
                params![machine_id, unix_now()],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))
    }

    /// Notes which machine a job is for.
    pub fn set_job_machine(&self, id: i64, machine_id: i64) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE jobs SET machine_id = ?2 WHERE id = ?1",
                params![id, machine_id],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// A machine's newest job that started (or ended without starting).
    pub fn last_job_of(&self, machine_id: i64) -> Result<Option<JobRecord>, CatalogError> {
        self.db()
            .query_row(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE machine_id = ?1 AND state != 'queued'
                     ORDER BY id DESC LIMIT 1"
                ),
                [machine_id],
                job_from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Notes that a magic packet went out for a waiting job.
    pub fn set_job_woken(&self, id: i64, at: i64) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE jobs SET woken_at = ?2 WHERE id = ?1",
                params![id, at],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Replaces what the jobs page shows of a job (a waiting job, once checked).
    pub fn set_job_params(&self, id: i64, params: &serde_json::Value) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE jobs SET params = ?2 WHERE id = ?1",
                params![id, params.to_string()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Ends a job that is still waiting (cancelled, or failed before it could start); false
    /// when it is not waiting any more.
    pub fn end_waiting_job(
        &self,
        id: i64,
        state: super::JobState,
        error: &str,
    ) -> Result<bool, CatalogError> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET state = ?2, error = ?3, finished_at = ?4
                 WHERE id = ?1 AND state = 'queued' AND request IS NOT NULL",
                params![id, state.name(), error, unix_now()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(n == 1)
    }

    /// Records a recurring schedule; returns its id.
    pub fn add_schedule(
        &self,
        kind: &str,
        request: &serde_json::Value,
        machine_id: Option<i64>,
        every: &str,
        next_at: i64,
    ) -> Result<i64, CatalogError> {
        let db = self.db();
        db.execute(
            "INSERT INTO schedules (kind, request, machine_id, every, next_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                kind,
                request.to_string(),
                machine_id,
                every,
                next_at,
                unix_now()
            ],
        )
        .map_err(|e| self.sql(e))?;
        Ok(db.last_insert_rowid())
    }

    /// Every schedule, the next due first.
    pub fn schedules(&self) -> Result<Vec<ScheduleRecord>, CatalogError> {
        self.rows(
            &self.db(),
            &format!("SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY next_at, id"),
            [],
            schedule_from_row,
        )
    }

    /// One schedule.
    pub fn schedule(&self, id: i64) -> Result<Option<ScheduleRecord>, CatalogError> {
        self.db()
            .query_row(
                &format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = ?1"),
                [id],
                schedule_from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// Notes that a schedule queued `job` and is next due at `next_at`.
    pub fn schedule_ran(&self, id: i64, job: i64, next_at: i64) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE schedules SET last_job = ?2, next_at = ?3 WHERE id = ?1",
                params![id, job, next_at],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Deletes a schedule (jobs it queued stay); false when there was none.
    pub fn delete_schedule(&self, id: i64) -> Result<bool, CatalogError> {
        let n = self
            .db()
            .execute("DELETE FROM schedules WHERE id = ?1", [id])
            .map_err(|e| self.sql(e))?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::JobState;

    fn queue(c: &Catalog, machine: Option<i64>, not_before: i64) -> i64 {
        let request = serde_json::json!({"kind": "capture", "source": "m", "output": "m.qcow2"});
        c.queue_job(&QueuedJob {
            kind: "capture",
            params: &serde_json::json!({"source": "m"}),
            request: &request,
            machine_id: machine,
            not_before,
            schedule_id: None,
        })
        .unwrap()
    }

    #[test]
    fn waiting_jobs_survive_a_restart_and_end_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let now = unix_now();
        let due = queue(&c, Some(7), now - 5);
        let later = queue(&c, Some(7), now + 3600);
        let immediate = c.create_job("deploy", &serde_json::json!({})).unwrap();
        let busy = c
            .register_machine("52:54:00:00:00:07", "busy", None)
            .unwrap();
        c.set_machine_state(busy, crate::catalog::state::TRANSITIONING)
            .unwrap();
        assert!(c.machine_has_due_job(7).unwrap());
        assert!(!c.machine_has_due_job(8).unwrap());
        drop(c);
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(c.interrupt_unfinished_jobs().unwrap(), 1);
        assert_eq!(
            c.job(immediate).unwrap().unwrap().state,
            JobState::Interrupted
        );
        assert_eq!(
            c.machine(busy).unwrap().unwrap().state,
            crate::catalog::state::FAILED,
            "a machine left mid-job is not busy for ever"
        );
        let ids: Vec<i64> = c.waiting_jobs().unwrap().iter().map(|j| j.id).collect();
        assert_eq!(ids, [due, later]);
        assert!(c.job(due).unwrap().unwrap().waiting);
        assert_eq!(c.waiting_jobs_of(7).unwrap().len(), 2);
        assert!(c
            .end_waiting_job(due, JobState::Cancelled, "cancelled")
            .unwrap());
        assert!(!c.end_waiting_job(due, JobState::Failed, "again").unwrap());
        assert!(
            !c.machine_has_due_job(7).unwrap(),
            "the later one is not due"
        );
        assert_eq!(c.job(due).unwrap().unwrap().state, JobState::Cancelled);
    }

    #[test]
    fn schedules_record_their_runs_and_go_with_their_machine() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let m = c
            .register_machine("52:54:00:00:00:01", "lab-01", None)
            .unwrap();
        let req = serde_json::json!({"kind": "capture", "source": "lab-01", "output": "x.qcow2"});
        let s = c
            .add_schedule("capture", &req, Some(m), "sun 02:00", 100)
            .unwrap();
        c.schedule_ran(s, 42, 200).unwrap();
        let rec = c.schedule(s).unwrap().unwrap();
        assert_eq!((rec.last_job, rec.next_at), (Some(42), 200));
        assert_eq!(rec.request["output"], "x.qcow2");
        c.forget_machine(m).unwrap();
        assert!(
            c.schedules().unwrap().is_empty(),
            "forgetting a machine drops its schedules"
        );
        assert!(!c.delete_schedule(s).unwrap());
    }
}
