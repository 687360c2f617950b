//! Command-line parsing, by hand: the client must stay small, and its options are few.

use std::ffi::OsString;
use std::path::PathBuf;

pub const HELP: &str = "\
diskferry-client: serve this machine's raw disk sectors to a diskferry server

USAGE:
    diskferry-client --listen ADDR:PORT --key-file FILE [--disk PATH]... [--allow-write]
    diskferry-client --connect HOST:PORT --key-file FILE [--allow-write] [--allow-power]

OPTIONS:
    --listen ADDR:PORT     Address to accept server connections on (port 0 picks a free one;
                           the chosen address is printed as 'listening on ADDR:PORT')
    --connect HOST:PORT    Dial-back mode: connect to the server's agent port instead, tell it
                           who this machine is (MACs, DMI, CPUs, memory, disks) and serve it;
                           reconnect with backoff whenever the connection is lost
    --allow-power          Obey the server's reboot and power-off requests (the PXE boot
                           environment sets this)
    --key-file FILE        Pre-shared key, the same file the server uses (also taken from
                           the DISKFERRY_KEY_FILE environment variable)
    --disk PATH            Serve exactly this block device or regular file (repeatable).
                           Without it: every whole disk in /sys/block except loop, RAM,
                           optical (sr) and floppy (fd) devices
    --allow-write          Permit writes (deploys). Without it every write is refused
    --plaintext            Accept an unencrypted transport if the server asks for it too
                           (authentication with the key still happens)
    --max-inflight BYTES   Cap on request payload bytes in flight per connection
                           [default: 67108864]
    -h, --help             Print this help
    -V, --version          Print the version

The client never reads a filesystem: it only reads and writes sectors. It logs to stderr and
exits cleanly on SIGINT or SIGTERM.
";

#[derive(Debug)]
pub struct Args {
    pub endpoint: Endpoint,
    pub allow_power: bool,
    pub key_file: PathBuf,
    pub disks: Vec<PathBuf>,
    pub allow_write: bool,
    pub plaintext: bool,
    pub max_inflight: u32,
}

/// Where connections come from.
#[derive(Debug)]
pub enum Endpoint {
    Listen(String),
    Connect(String),
}

#[derive(Debug)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

pub fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Command, String> {
    let mut listen = None;
    let mut connect = None;
    let mut allow_power = false;
    let mut key_file = std::env::var_os("DISKFERRY_KEY_FILE").map(PathBuf::from);
    let mut disks = Vec::new();
    let mut allow_write = false;
    let mut plaintext = false;
    let mut max_inflight: u32 = 64 << 20;
    while let Some(arg) = it.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(OsString::from(v))),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" => listen = Some(value("--listen")?.to_string_lossy().into_owned()),
            "--connect" => connect = Some(value("--connect")?.to_string_lossy().into_owned()),
            "--allow-power" => allow_power = true,
            "--key-file" => key_file = Some(PathBuf::from(value("--key-file")?)),
            "--disk" => disks.push(PathBuf::from(value("--disk")?)),
            "--allow-write" => allow_write = true,
            "--plaintext" => plaintext = true,
            "--max-inflight" => {
                let v = value("--max-inflight")?;
                max_inflight = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|n| *n >= 1 << 20)
                    .ok_or_else(|| format!("--max-inflight must be a number of bytes of at least 1048576, got {v:?}"))?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let endpoint = match (listen, connect) {
        (Some(l), None) => Endpoint::Listen(l),
        (None, Some(c)) => Endpoint::Connect(c),
        (Some(_), Some(_)) => return Err("give --listen or --connect, not both".into()),
        (None, None) => return Err("--listen ADDR:PORT or --connect HOST:PORT is required".into()),
    };
    let key_file = key_file.ok_or("--key-file FILE (or DISKFERRY_KEY_FILE) is required")?;
    Ok(Command::Run(Args {
        endpoint,
        allow_power,
        key_file,
        disks,
        allow_write,
        plaintext,
        max_inflight,
    }))
}
