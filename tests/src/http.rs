//! [`Server`], a running `diskferry serve`, and the HTTP client the web tests use (raw request
//! lines, so paths reach the server exactly as written, `..` and all).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

pub use diskferry_web::client::{request, Endpoint, Response};
pub use diskferry_web::tls::Fingerprint;

/// A running `diskferry serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    /// Where dial-back agents connect.
    pub agent_addr: String,
    /// The TFTP server's address, when it runs.
    pub tftp_addr: Option<String>,
    /// The boot endpoints' own listener (`--boot-listen`), when it runs.
    pub boot_addr: Option<String>,
    /// The UI's certificate fingerprint, when it speaks TLS.
    pub fingerprint: Option<Fingerprint>,
    /// Where the captures are exported over NBD (`HOST:PORT`), when they are.
    pub nbd_addr: Option<String>,
    pub data_dir: PathBuf,
    pub token: String,
    /// The admin password ([`TEST_PASSWORD`] unless the data directory had one before).
    pub password: String,
}

/// The admin password the tests put in a new data directory, in clear, before the first start
/// (the server replaces it with its hash).
pub const TEST_PASSWORD: &str = "e2e-admin-password-7f3a";

impl Server {
    /// Starts the server on a free localhost port with `data_dir` and waits until it listens.
    pub fn start(data_dir: &Path) -> Result<Server> {
        Server::start_with_agent_port(data_dir, "127.0.0.1:0")
    }

    /// Same, with the agent port at `agent_listen`.
    pub fn start_with_agent_port(data_dir: &Path, agent_listen: &str) -> Result<Server> {
        Server::start_with(data_dir, &["--agent-listen", agent_listen])
    }

    /// Same, with more `diskferry serve` arguments (the agent port is free and TFTP off unless
    /// they say otherwise).
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Result<Server> {
        std::fs::create_dir_all(data_dir)?;
        let password_file = data_dir.join("admin-password");
        if !password_file.exists() {
            std::fs::write(&password_file, format!("{TEST_PASSWORD}\n"))?;
        }
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        if !extra.contains(&"--agent-listen") {
            args.extend(["--agent-listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--tftp-listen") {
            args.extend(["--tftp-listen", "off"]);
        }
        if !extra.contains(&"--nbd-listen") {
            args.extend(["--nbd-listen", "127.0.0.1:0"]);
        }
        let mut child = Command::new(crate::bin("diskferry"))
            .args(&args)
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(child.stderr.take().context("stderr")?);
        let mut seen = String::new();
        let mut agent_addr = String::new();
        let (mut tftp_addr, mut boot_addr, mut fingerprint) = (None, None, None);
        let mut nbd_addr = None;
        let addr = loop {
            let mut line = String::new();
            if err.read_line(&mut line)? == 0 {
                bail!("diskferry serve ended before listening: {seen}");
            }
            seen.push_str(&line);
            if let Some(a) = logged_after(&line, "agents dial back to ") {
                agent_addr = a;
            }
            if let Some(a) = logged_after(&line, "tftp on ") {
                tftp_addr = Some(a);
            }
            if let Some(a) = logged_after(&line, "boot listener on http://") {
                boot_addr = Some(a);
            }
            if let Some(a) = logged_after(&line, "captures exported over NBD on nbd://") {
                nbd_addr = Some(a.trim_end_matches('/').to_string());
            }
            if let Some(f) = logged_after(&line, "tls certificate fingerprint ") {
                fingerprint = Some(f.parse()?);
            }
            let url = logged_after(&line, "listening on http://")
                .or_else(|| logged_after(&line, "listening on https://"));
            if let Some(a) = url {
                break a;
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let token = std::fs::read_to_string(data_dir.join("api-token"))?
            .trim()
            .to_string();
        Ok(Server {
            child,
            addr,
            agent_addr,
            tftp_addr,
            boot_addr,
            fingerprint,
            nbd_addr,
            data_dir: data_dir.to_path_buf(),
            token,
            password: TEST_PASSWORD.to_string(),
        })
    }

    /// The UI and API: plain HTTP, or TLS pinned to the logged fingerprint.
    pub fn endpoint(&self) -> Endpoint {
        match self.fingerprint {
            Some(pin) => Endpoint::tls(&self.addr, pin),
            None => Endpoint::plain(&self.addr),
        }
    }

    /// A request with the API token.
    pub fn api(&self, method: &str, target: &str, body: &[u8]) -> Response {
        let auth = format!("Bearer {}", self.token);
        let mut h = vec![("Authorization", auth.as_str())];
        if !body.is_empty() {
            h.push(("Content-Type", "application/json"));
        }
        let r = self.endpoint().request(method, target, &h, body);
        r.expect("request")
    }

    /// The server's process id (to read its memory use in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server (as a crash would: no goodbye to anyone).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn get(&self, target: &str) -> Response {
        self.api("GET", target, b"")
    }

    /// Starts a job (`POST /api/jobs`, which must answer 201), follows its events to the end
    /// and returns its record, whatever state it ended in.
    pub fn run_job(&self, body: &serde_json::Value) -> serde_json::Value {
        let r = self.api("POST", "/api/jobs", body.to_string().as_bytes());
        assert_eq!(r.status, 201, "{}", r.text());
        let id = r.json()["id"].as_i64().unwrap();
        let _ = self.get(&format!("/api/jobs/{id}/events")).text();
        self.get(&format!("/api/jobs/{id}")).json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The word after `marker` in a daemon log line (timestamped text, or JSON with the message as
/// a string), if the line has it.
fn logged_after(line: &str, marker: &str) -> Option<String> {
    let (_, rest) = line.split_once(marker)?;
    let word: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    (!word.is_empty()).then_some(word)
}
