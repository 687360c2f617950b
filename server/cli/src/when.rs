//! `--at`, `--every` and `--no-wake` on `capture` and `deploy` of a machine through a server:
//! the job waits for its time (or recurs), and a machine that is not connected is woken with a
//! magic packet and waited for.

use anyhow::{Context, Result};
use clap::Args;

use crate::machines::Daemon;

/// When a job through the server runs.
#[derive(Args, Debug, Default)]
pub struct WhenArgs {
    /// Queue the job to start at TIME instead of now (machines through a server): now, +30m,
    /// HH:MM, "YYYY-MM-DD HH:MM" (the server's time zone) or RFC 3339; the command returns
    /// once the job is queued
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Repeat the job (machines through a server): "sun 02:00", "mon,thu 23:30", "daily
    /// 02:00", "weekdays 06:00", "hourly :15" (the server's time zone); the command returns
    /// once the schedule is recorded
    #[arg(long, value_name = "WHEN", conflicts_with = "at")]
    every: Option<String>,
    /// Do not wake the machine with a Wake-on-LAN magic packet when it is not connected (the
    /// job still waits for it)
    #[arg(long)]
    no_wake: bool,
}

impl WhenArgs {
    /// Whether any of these was given (they need a machine through a server).
    pub fn given(&self) -> bool {
        self.at.is_some() || self.every.is_some() || self.no_wake
    }

    /// Sends `request` as these options say: queued for later or recurring (then `true`: the
    /// command is done), or `false` for the caller to run it now and follow it.
    pub fn submit(&self, daemon: &Daemon, request: &mut serde_json::Value) -> Result<bool> {
        if self.no_wake {
            request["wake"] = false.into();
        }
        if let Some(every) = &self.every {
            let s = daemon.call(
                "POST",
                "/api/schedules",
                Some(serde_json::json!({"every": every, "job": request})),
            )?;
            let next = s["next_at"]
                .as_i64()
                .context("the server returned no schedule")?;
            println!(
                "schedule {} recorded: every {}, next at {}",
                s["id"],
                s["every"].as_str().unwrap_or(every),
                diskferry_daemon::jobs::show_time(next)
            );
            return Ok(true);
        }
        let Some(at) = &self.at else {
            return Ok(false);
        };
        request["at"] = at.clone().into();
        let started = daemon.call("POST", "/api/jobs", Some(request.clone()))?;
        let id = started["id"]
            .as_i64()
            .context("the server returned no job id")?;
        let j = daemon.call("GET", &format!("/api/jobs/{id}"), None)?;
        let why = j["log"]
            .as_str()
            .unwrap_or("")
            .lines()
            .last()
            .unwrap_or("queued");
        println!("job {id} queued: {why}");
        Ok(true)
    }
}

/// Refuses `--at`/`--every`/`--no-wake` where no server runs the job.
pub fn refuse_without_server(when: &WhenArgs) -> Result<()> {
    if when.given() {
        anyhow::bail!(
            "--at, --every and --no-wake are for machines through a server (--data-dir or --server)"
        );
    }
    Ok(())
}
