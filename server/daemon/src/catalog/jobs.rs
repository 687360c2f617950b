//! Jobs in the catalog: captures and deploys, their parameters, state, last progress event,
//! log and error — so history survives restarts. A job that was running when the server
//! stopped is marked `interrupted` on the next start; jobs waiting for their machine or time
//! (`queue.rs`) keep waiting.

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use super::{unix_now, Catalog, CatalogError};

/// A job's log keeps at most this many bytes (the newest).
const MAX_LOG: usize = 64 << 10;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// The server stopped while it ran.
    Interrupted,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Interrupted => "interrupted",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "cancelled" => JobState::Cancelled,
            "interrupted" => JobState::Interrupted,
            _ => JobState::Failed,
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// One job as the catalog knows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: i64,
    /// "capture" or "deploy".
    pub kind: String,
    pub state: JobState,
    pub params: serde_json::Value,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The last progress event (the `--progress json` object).
    pub progress: Option<serde_json::Value>,
    pub log: String,
    pub error: Option<String>,
    /// What a finished job made (a capture: its output, base and incremental statistics).
    pub result: Option<serde_json::Value>,
    /// The machine a waiting job is for.
    pub machine_id: Option<i64>,
    /// A waiting job starts no earlier than this (seconds since the epoch).
    pub not_before: Option<i64>,
    /// When the last magic packet was sent to wake its machine.
    pub woken_at: Option<i64>,
    /// The schedule that made it.
    pub schedule_id: Option<i64>,
    /// Whether it waits for its machine or its time (queued with its request kept).
    pub waiting: bool,
}

pub(super) const COLUMNS: &str =
    "id, kind, state, params, created_at, started_at, finished_at, progress, log,
    error, result, machine_id, not_before, woken_at, schedule_id,
    request IS NOT NULL AND state = 'queued'";

pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let params: String = row.get(3)?;
    let progress: Option<String> = row.get(7)?;
    Ok(JobRecord {
        id: row.get(0)?,
        kind: row.get(1)?,
        state: JobState::parse(&row.get::<_, String>(2)?),
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        created_at: row.get(4)?,
        started_at: row.get(5)?,
        finished_at: row.get(6)?,
        progress: progress.and_then(|p| serde_json::from_str(&p).ok()),
        log: row.get(8)?,
        error: row.get(9)?,
        result: row
            .get::<_, Option<String>>(10)?
            .and_then(|r| serde_json::from_str(&r).ok()),
        machine_id: row.get(11)?,
        not_before: row.get(12)?,
        woken_at: row.get(13)?,
        schedule_id: row.get(14)?,
        waiting: row.get(15)?,
    })
}

impl Catalog {
    /// Records a new queued job; returns its id.
    pub fn create_job(&self, kind: &str, params: &serde_json::Value) -> Result<i64, CatalogError> {
        let db = self.db();
        db.execute(
            "INSERT INTO jobs (kind, state, params, created_at) VALUES (?1, 'queued', ?2, ?3)",
            params![kind, params.to_string(), unix_now()],
        )
        .map_err(|e| self.sql(e))?;
        Ok(db.last_insert_rowid())
    }

    /// Marks a job running.
    pub fn start_job(&self, id: i64) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE jobs SET state = 'running', started_at = ?2 WHERE id = ?1",
                params![id, unix_now()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Stores a job's latest progress event.
    pub fn set_job_progress(
        &self,
        id: i64,
        progress: &serde_json::Value,
    ) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE jobs SET progress = ?2 WHERE id = ?1",
                params![id, progress.to_string()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Stores what a job made.
    pub fn set_job_result(&self, id: i64, result: &serde_json::Value) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE jobs SET result = ?2 WHERE id = ?1",
                params![id, result.to_string()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Appends a line to a job's log (the oldest lines go once it passes 64 KiB).
    pub fn append_job_log(&self, id: i64, line: &str) -> Result<(), CatalogError> {
        let db = self.db();
        let log: Option<String> = db
            .query_row("SELECT log FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))?;
        let Some(mut log) = log else { return Ok(()) };
        log.push_str(line.trim_end());
        log.push('\n');
        if log.len() > MAX_LOG {
            let mut cut = log.len() - MAX_LOG;
            while !log.is_char_boundary(cut) {
                cut += 1;
            }
            let cut = log[cut..].find('\n').map_or(cut, |n| cut + n + 1);
            log.drain(..cut);
        }
        db.execute("UPDATE jobs SET log = ?2 WHERE id = ?1", params![id, log])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Ends a job.
    pub fn finish_job(
        &self,
        id: i64,
        state: JobState,
        error: Option<&str>,
    ) -> Result<(), CatalogError> {
        self.db()
            .execute(
                "UPDATE jobs SET state = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, state.name(), error, unix_now()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// One job by id.
    pub fn job(&self, id: i64) -> Result<Option<JobRecord>, CatalogError> {
        self.db()
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    /// The newest `limit` jobs, newest first.
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, CatalogError> {
        self.rows(
            &self.db(),
            &format!("SELECT {COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?1"),
            [limit as i64],
            from_row,
        )
    }

    /// Marks every job that was running, or queued to start at once, as interrupted (call once
    /// at start: no job of an earlier server process is still running), and the machines they
    /// were running on as failed. Jobs waiting for their machine or their time keep waiting.
    /// Returns how many were interrupted.
    pub fn interrupt_unfinished_jobs(&self) -> Result<usize, CatalogError> {
        let db = self.db();
        // Their machines were in the middle of them: what is on their disks is unknown.
        db.execute(
            "UPDATE machines SET state = 'failed' WHERE state = 'transitioning'",
            [],
        )
        .map_err(|e| self.sql(e))?;
        db.execute(
            "UPDATE jobs SET state = 'interrupted', finished_at = ?1,
                    error = 'the server stopped while this job ran'
                 WHERE state = 'running' OR (state = 'queued' AND request IS NULL)",
            [unix_now()],
        )
        .map_err(|e| self.sql(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_life_and_bounded_log() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        let id = c
            .create_job("capture", &serde_json::json!({"source": "x"}))
            .unwrap();
        c.start_job(id).unwrap();
        for i in 0..5000 {
            c.append_job_log(id, &format!("line {i:05} of the log"))
                .unwrap();
        }
        c.set_job_progress(id, &serde_json::json!({"overall_done": 5}))
            .unwrap();
        let j = c.job(id).unwrap().unwrap();
        assert_eq!(j.state, JobState::Running);
        assert!(j.log.len() <= MAX_LOG);
        assert!(j.log.starts_with("line "), "log cut at a line start");
        assert!(j.log.ends_with("line 04999 of the log\n"));
        assert_eq!(j.progress.unwrap()["overall_done"], 5);
        drop(c);
        // A restart interrupts it; history survives.
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(c.interrupt_unfinished_jobs().unwrap(), 1);
        let j = c.job(id).unwrap().unwrap();
        assert_eq!(j.state, JobState::Interrupted);
        assert!(j.finished_at.is_some());
        assert_eq!(c.jobs(10).unwrap().len(), 1);
        assert!(c.job(id + 1).unwrap().is_none());
    }
}
