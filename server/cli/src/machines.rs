//! `diskferry machines` and `diskferry machine approve|forget|register|rename|groups|reboot|poweroff|wake`:
//! the machine registry of a running `diskferry serve`, reached through its API (found with
//! `--data-dir`, or `--server URL` and `--token-file`). An https server is trusted by its
//! certificate's fingerprint: `--tls-fingerprint`, or `DATA_DIR/tls/cert.pem` with `--data-dir`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use diskferry_imaging::units::human_bytes;
use diskferry_web::client::{Endpoint, Response};
use diskferry_web::tls::Fingerprint;

/// How to reach the daemon.
#[derive(Args)]
pub struct DaemonArgs {
    /// The data directory of a server running on this machine
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "DISKFERRY_DATA_DIR",
        conflicts_with = "server"
    )]
    data_dir: Option<PathBuf>,
    /// The server's address (http://HOST:PORT or https://HOST:PORT), with --token-file
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// The API token file (DATA_DIR/api-token on the server)
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The https server's certificate fingerprint, as its log shows it at start (`tls
    /// certificate fingerprint SHA256:...`); only that certificate is accepted
    #[arg(long, global = true, value_name = "SHA256:...")]
    tls_fingerprint: Option<Fingerprint>,
}

/// How to trust an https server without a fingerprint: said whenever one is missing.
const HOW_TO_PIN: &str = "pin its certificate with --tls-fingerprint SHA256:... (the server's \
    log shows it at start: `tls certificate fingerprint SHA256:...`; on the server, `openssl \
    x509 -in DATA_DIR/tls/cert.pem -noout -fingerprint -sha256` shows it too), or run the \
    command on the server's machine with --data-dir DIR";

#[derive(Subcommand)]
pub enum MachineCommand {
    /// Approve a machine's enrollment: its agent (the key `diskferry machines` shows) may then
    /// act as the machine and jobs may use it
    ///
    /// New machines, changed identities (MACs, UUID, serial, disks) and agents with a new key
    /// and no enrollment token wait for this.
    Approve {
        /// The machine: its name, a MAC address or its id
        machine: String,
    },
    /// Forget a machine: its record, MAC addresses and approval (captures stay)
    Forget {
        /// The machine: its name, a MAC address or its id
        machine: String,
    },
    /// Register a machine under a name, also one that has never booted (by its MAC address)
    ///
    /// A machine registered before it ever boots is known: jobs can be queued for it (the
    /// server wakes it with a magic packet and the job waits for it to connect), and its first
    /// network boot through /boot.ipxe is approved. A registered machine with nothing to do
    /// boots its own disk when it starts from the network.
    Register {
        /// The machine: a MAC address (known or not) or its id
        machine: String,
        /// Its name: up to 63 letters, digits, '-', '_' or '.', not a number or a MAC address
        name: String,
        /// An address on its network, so Wake-on-LAN knows where to send before it first
        /// connects (afterwards the address it connects from is used)
        #[arg(long, value_name = "IP")]
        address: Option<std::net::IpAddr>,
    },
    /// Give a registered machine another name
    Rename {
        /// The machine: its name, a MAC address or its id
        machine: String,
        /// The new name: up to 63 letters, digits, '-', '_' or '.', not a number or a MAC address
        name: String,
    },
    /// Reboot a connected machine
    ///
    /// The agent obeys only when started with --allow-power, as the boot environment does.
    Reboot {
        /// The machine: its name, a MAC address or its id
        machine: String,
    },
    /// Wake a machine with a Wake-on-LAN magic packet
    ///
    /// Sent to UDP port 9 at the broadcast address of the network of its last address (every
    /// network of the server when none is known), or to `serve --wake-relay`. Jobs for a
    /// machine that is not connected send it by themselves.
    Wake {
        /// The machine: its name, a MAC address or its id
        machine: String,
    },
    /// Set the groups a machine belongs to (a classroom, a rack); none clears them
    Groups {
        /// The machine: its name, a MAC address or its id
        machine: String,
        /// Group names: up to 63 letters, digits, '-', '_' or '.' each; at most 16
        groups: Vec<String>,
    },
    /// Power a connected machine off
    ///
    /// The agent obeys only when started with --allow-power, as the boot environment does.
    Poweroff {
        /// The machine: its name, a MAC address or its id
        machine: String,
    },
}

/// A connection to the daemon's API.
pub(crate) struct Daemon {
    endpoint: Endpoint,
    token: String,
}

impl DaemonArgs {
    /// Whether a server was named at all.
    pub(crate) fn given(&self) -> bool {
        self.data_dir.is_some() || self.server.is_some()
    }

    /// The server's captures directory, when it runs on this machine.
    pub(crate) fn captures_dir(&self) -> Option<PathBuf> {
        self.data_dir.as_ref().map(|d| d.join("captures"))
    }
}

impl Daemon {
    pub(crate) fn find(args: &DaemonArgs) -> Result<Daemon> {
        let (url, token_file, cert_file) = match (&args.data_dir, &args.server) {
            (Some(dir), _) => {
                let url = std::fs::read_to_string(dir.join("serve.addr")).with_context(|| {
                    format!("no server has run with --data-dir {} (no serve.addr)", dir.display())
                })?;
                let (cert, _) = diskferry_web::tls::self_signed_files(dir);
                (url.trim().to_string(), dir.join("api-token"), Some(cert))
            }
            (None, Some(url)) => {
                let Some(f) = &args.token_file else {
                    bail!("--server needs --token-file FILE (a copy of DATA_DIR/api-token)")
                };
                (url.clone(), f.clone(), None)
            }
            (None, None) => bail!(
                "say which server: --data-dir DIR (on the server's machine) or --server URL --token-file FILE"
            ),
        };
        let endpoint = endpoint(&url, args.tls_fingerprint, cert_file.as_deref())?;
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("cannot read the API token {}", token_file.display()))?
            .trim()
            .to_string();
        Ok(Daemon { endpoint, token })
    }

    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let auth = format!("Bearer {}", self.token);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![("Authorization", auth.as_str())];
        if !body.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        let r: Response = self
            .endpoint
            .request(method, path, &headers, body.as_bytes())
            .with_context(|| {
                format!(
                    "cannot talk to `diskferry serve` at {}",
                    self.endpoint.url()
                )
            })?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        if r.status >= 400 {
            bail!(
                "{}",
                v["error"].as_str().map_or_else(|| r.text(), str::to_string)
            );
        }
        Ok(v)
    }
}

impl Daemon {
    /// Starts a job on the server and follows it to its end, printing its log and progress;
    /// fails if the job does.
    pub(crate) fn run_job(&self, body: serde_json::Value) -> Result<serde_json::Value> {
        let started = self.call("POST", "/api/jobs", Some(body))?;
        let id = started["id"]
            .as_i64()
            .context("the server returned no job id")?;
        eprintln!("job {id} started on the server");
        let mut shown_lines = 0;
        loop {
            let j = self.call("GET", &format!("/api/jobs/{id}"), None)?;
            let log: Vec<&str> = j["log"].as_str().unwrap_or("").lines().collect();
            for l in log.iter().skip(shown_lines) {
                eprintln!("  {l}");
            }
            shown_lines = log.len();
            match j["state"].as_str().unwrap_or("") {
                "succeeded" => return Ok(j),
                "failed" | "cancelled" | "interrupted" => bail!(
                    "job {id} {}: {}",
                    j["state"].as_str().unwrap_or(""),
                    j["error"].as_str().unwrap_or("")
                ),
                _ => {}
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

/// The NBD URL at which the server serves a connected machine's disk (`MACHINE`, its only
/// disk, or `DISK@MACHINE`), read-only.
pub(crate) fn machine_export_url(args: &DaemonArgs, raw: &str) -> Result<String> {
    let (disk, who) = match raw.rsplit_once('@') {
        Some((d, w)) => (Some(d), w),
        None => (None, raw),
    };
    let d = Daemon::find(args)?;
    let m = d.call("GET", &format!("/api/machines/{}", segment(who)), None)?;
    let exports: Vec<(&str, &str)> = m["nbd"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["disk"].as_str()?, e["url"].as_str()?)))
        .collect();
    let disks = || exports.iter().map(|e| e.0).collect::<Vec<_>>().join(", ");
    match (disk, exports.as_slice()) {
        (_, []) => bail!(
            "the server exports no disk of machine {who}: it must be connected with its \
             approved agent (see `diskferry machines`), and the server must export over NBD \
             (not --nbd-listen off)"
        ),
        (Some(disk), _) => exports
            .iter()
            .find(|e| e.0 == disk)
            .map(|e| e.1.to_string())
            .with_context(|| format!("machine {who} has no disk {disk}; its disks: {}", disks())),
        (None, [only]) => Ok(only.1.to_string()),
        (None, _) => bail!(
            "machine {who} has {} disks; name one as DISK@{who}: {}",
            exports.len(),
            disks()
        ),
    }
}

/// The server at `url` (`http://HOST:PORT`, `https://HOST:PORT`, or a bare `HOST:PORT` as
/// older servers wrote in serve.addr); an https one pinned to `pin`, or else to the
/// certificate in `cert_file` (the server's own, with --data-dir).
fn endpoint(url: &str, pin: Option<Fingerprint>, cert_file: Option<&Path>) -> Result<Endpoint> {
    let (https, addr) = match url.split_once("://") {
        None => (false, url),
        Some(("http", addr)) => (false, addr),
        Some(("https", addr)) => (true, addr),
        Some((scheme, _)) => {
            bail!("{url}: a server is http://HOST:PORT or https://HOST:PORT, not {scheme}")
        }
    };
    let addr = addr.trim_end_matches('/');
    if addr.is_empty() || addr.contains('/') {
        bail!("{url}: a server is http://HOST:PORT or https://HOST:PORT");
    }
    if !https {
        if pin.is_some() {
            bail!("--tls-fingerprint is for https servers; {url} is plain http");
        }
        return Ok(Endpoint::plain(addr));
    }
    let pin = match (pin, cert_file) {
        (Some(pin), _) => pin,
        (None, Some(cert)) => diskferry_web::tls::fingerprint_of_file(cert).with_context(|| {
            format!(
                "the server at {url} speaks TLS but its certificate is unreadable; {HOW_TO_PIN}"
            )
        })?,
        (None, None) => bail!("the server at {url} speaks TLS: {HOW_TO_PIN}"),
    };
    Ok(Endpoint::tls(addr, pin))
}

/// Percent-encodes a path segment.
fn segment(s: &str) -> String {
    diskferry_web::client::percent_encode(s, b"")
}

pub fn list(args: &DaemonArgs) -> Result<()> {
    let d = Daemon::find(args)?;
    let list = d.call("GET", "/api/machines", None)?;
    let list = list.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no machines yet: boot one into the diskferry PXE environment");
        return Ok(());
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let mut rows = vec![[
        "NAME".to_string(),
        "MACS".into(),
        "VENDOR/MODEL".into(),
        "DISKS".into(),
        "STATE".into(),
        "LAST SEEN".into(),
    ]];
    for m in &list {
        let id = &m["identity"];
        let disks: Vec<String> = id["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                format!(
                    "{} {}",
                    s(&d["name"]),
                    human_bytes(d["size"].as_u64().unwrap_or(0))
                )
            })
            .collect();
        let mut state = s(&m["state"]);
        if m["online"] == true {
            state.push_str(" (online)");
        }
        if let Some(why) = m["pending"]["reason"].as_str() {
            let key: String = s(&m["pending"]["agent_key"]).chars().take(16).collect();
            state.push_str(&format!(", awaits approval: {why}, agent key {key}"));
        } else if m["approved"] != true && m["preregistered"] != true {
            state.push_str(", not approved");
        }
        let waiting = m["waiting_jobs"].as_array().map_or(0, Vec::len);
        if waiting > 0 {
            state.push_str(&format!(", {waiting} job(s) waiting"));
        }
        rows.push([
            {
                let name = m["name"]
                    .as_str()
                    .map_or_else(|| format!("#{}", m["id"]), str::to_string);
                let groups: Vec<String> = m["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                if groups.is_empty() {
                    name
                } else {
                    format!("{name} [{}]", groups.join(","))
                }
            },
            m["macs"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default(),
            format!("{} {}", s(&id["vendor"]), s(&id["product"]))
                .trim()
                .to_string(),
            disks.join(", "),
            state,
            m["last_seen"].as_i64().map_or_else(String::new, |t| {
                diskferry_fs::Timestamp { secs: t, nanos: 0 }.utc_string()
            }),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

pub fn machine(args: &DaemonArgs, cmd: &MachineCommand) -> Result<()> {
    let d = Daemon::find(args)?;
    match cmd {
        MachineCommand::Approve { machine } => {
            let m = d.call(
                "POST",
                &format!("/api/machines/{}/approve", segment(machine)),
                None,
            )?;
            println!(
                "machine {machine} approved (agent key {})",
                m["agent_key"].as_str().unwrap_or("")
            );
        }
        MachineCommand::Forget { machine } => {
            d.call(
                "DELETE",
                &format!("/api/machines/{}", segment(machine)),
                None,
            )?;
            println!("machine {machine} forgotten");
        }
        MachineCommand::Register {
            machine,
            name,
            address,
        } if diskferry_daemon::catalog::normalize_mac(machine).is_some() => {
            let m = d.call(
                "POST",
                "/api/machines",
                Some(serde_json::json!({ "mac": machine, "name": name, "address": address })),
            )?;
            println!(
                "machine {} is {name} ({}{})",
                m["macs"][0].as_str().unwrap_or(machine),
                m["state"].as_str().unwrap_or(""),
                if m["preregistered"] == true {
                    "; its first network boot is approved"
                } else {
                    ""
                }
            );
        }
        MachineCommand::Groups { machine, groups } => {
            let m = d.call(
                "PUT",
                &format!("/api/machines/{}/groups", segment(machine)),
                Some(serde_json::json!({ "groups": groups })),
            )?;
            let now: Vec<&str> = m["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g.as_str())
                .collect();
            match now.as_slice() {
                [] => println!("{machine} belongs to no group"),
                g => println!("{machine} belongs to {}", g.join(", ")),
            }
        }
        MachineCommand::Wake { machine } => {
            let r = d.call(
                "POST",
                &format!("/api/machines/{}/wake", segment(machine)),
                None,
            )?;
            println!("{}", r["sent"].as_str().unwrap_or("magic packet sent"));
        }
        MachineCommand::Register { machine, name, .. }
        | MachineCommand::Rename { machine, name } => {
            let m = d.call(
                "POST",
                &format!("/api/machines/{}/name", segment(machine)),
                Some(serde_json::json!({ "name": name })),
            )?;
            println!(
                "machine {} is {} ({})",
                m["macs"][0].as_str().unwrap_or(machine),
                name,
                m["state"].as_str().unwrap_or("")
            );
        }
        MachineCommand::Reboot { machine } | MachineCommand::Poweroff { machine } => {
            let action = if matches!(cmd, MachineCommand::Reboot { .. }) {
                "reboot"
            } else {
                "poweroff"
            };
            d.call(
                "POST",
                &format!("/api/machines/{}/power", segment(machine)),
                Some(serde_json::json!({ "action": action })),
            )?;
            println!("{machine}: {action} requested");
        }
    }
    Ok(())
}
