//! A running `diskferry export` for tests: started on a free loopback port, its NBD URL read
//! from its first line, stopped the way a user stops it (SIGINT, so writes are flushed).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{bin, first_stdout_line};

pub struct Exported {
    child: Child,
    /// `nbd://127.0.0.1:PORT/NAME`.
    pub url: String,
}

impl Exported {
    /// `diskferry export SOURCE --listen 127.0.0.1:0 EXTRA...`, once it serves.
    pub fn start(source: &str, extra: &[&str]) -> Result<Exported> {
        let mut args = vec![source];
        args.extend(extra);
        Exported::start_with(&args)
    }

    /// `diskferry export ARGS... --listen 127.0.0.1:0`, once it serves.
    pub fn start_with(args: &[&str]) -> Result<Exported> {
        let mut child = Command::new(bin("diskferry"))
            .arg("export")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn diskferry export")?;
        let line = first_stdout_line(&mut child, Duration::from_secs(30)).unwrap_or_default();
        let Some(url) = line.split_whitespace().find(|w| w.starts_with("nbd://")) else {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("diskferry export did not start: {line:?} {err}");
        };
        Ok(Exported {
            url: url.trim_end_matches(',').to_string(),
            child,
        })
    }

    /// Stops it with SIGINT, as Ctrl-C does; returns whether it exited cleanly, and its log.
    pub fn stop(mut self) -> (bool, String) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let mut ok = false;
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                ok = status.success();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut log = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        (ok, log)
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
