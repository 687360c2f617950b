//! Command-line parsing, by hand: the client must stay small, and its options are few.

use std::ffi::OsString;
use std::path::PathBuf;

pub const HELP: &str = "\
diskferry-client: serve this machine's raw disk sectors to a diskferry server

USAGE:
    diskferry-client --listen ADDR:PORT --server-key KEY [--disk PATH]... [--allow-write]
    diskferry-client --connect HOST:PORT --server-key KEY [--token TOKEN] [--allow-write]

OPTIONS:
    --listen ADDR:PORT     Address to accept server connections on (port 0 picks a free one;
                           the chosen address is printed as 'listening on ADDR:PORT')
    --connect HOST:PORT    Dial-back mode: connect to the server's agent port instead, tell it
                           who this machine is (MACs, DMI, CPUs, memory, disks) and serve it;
                           reconnect with backoff whenever the connection is lost
    --allow-power          Obey the server's reboot and power-off requests (the PXE boot
                           environment sets this)
    --allow-firmware       Write the UEFI boot entry the server asks for after a deploy
                           (efivarfs; the PXE boot environment sets this)
    --server-key KEY       The server's public key: 64 hex digits, or a file holding them
                           (`diskferry keygen --public` prints it; also taken from the
                           DISKFERRY_SERVER_KEY environment variable). Only the holder of
                           the matching private key can use this client
    --agent-key FILE       This agent's own key, created there if missing, so the server
                           recognises it after a restart. Without it a new key is made in
                           memory at every start (the server then asks for approval again
                           unless the agent brings an enrollment token)
    --token TOKEN          One-time enrollment token (the server's /boot.ipxe hands one to
                           each booting machine; also DISKFERRY_TOKEN): it binds this
                           connection to the machine with the MAC address it was issued for
    --max-connections N    Connections served at once; more wait in the kernel's backlog
                           [default: 8]
    --disk PATH            Serve exactly this block device or regular file (repeatable).
                           Without it: every whole disk in /sys/block except loop, RAM,
                           optical (sr) and floppy (fd) devices
    --allow-write          Permit writes (deploys). Without it every write is refused
    --live                 Live mode, for an agent running inside the machine's own system:
                           the server may deploy a new system into one pinned file of the
                           running system (see --live-file) and switch to it at the next
                           boot. Writes are allowed inside that file and nowhere else, even
                           without --allow-write. The file's filesystem must be ext4 or XFS
                           directly on a disk this agent serves (not btrfs, LVM or LUKS)
    --live-file PATH       Where the live file goes [default: /diskferry-live]
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
    pub allow_firmware: bool,
    /// The server's public key: hex digits or a file.
    pub server_key: String,
    pub agent_key: Option<PathBuf>,
    pub token: Option<String>,
    pub max_connections: usize,
    pub disks: Vec<PathBuf>,
    pub allow_write: bool,
    pub plaintext: bool,
    pub max_inflight: u32,
    /// Live mode: the live file's path.
    pub live: Option<PathBuf>,
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

/// Why the command line cannot be used; `main` prints it with a pointer to `--help`.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("argument {0:?} is not UTF-8")]
    NotUtf8(OsString),
    /// The flag named here came last, with no value after it.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("--max-inflight must be a number of bytes of at least {MIN_INFLIGHT}, got {0:?}")]
    MaxInflight(OsString),
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("give --listen or --connect, not both")]
    BothEndpoints,
    #[error("--listen ADDR:PORT or --connect HOST:PORT is required")]
    NoEndpoint,
    #[error("--server-key KEY (or DISKFERRY_SERVER_KEY) is required: the server's public key, printed by `diskferry keygen --public` on the server")]
    NoServerKey,
    #[error("--key-file is gone: agents no longer hold a shared secret. Give the server's public key with --server-key (see `diskferry keygen --public`)")]
    KeyFileGone,
    #[error("--live-file is for live mode: add --live")]
    LiveFileWithoutLive,
    #[error("--max-connections must be a number from 1 to 1024, got {0:?}")]
    MaxConnections(OsString),
}

/// The smallest `--max-inflight`: one largest request must fit.
const MIN_INFLIGHT: u32 = 1 << 20;

pub fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Command, ArgsError> {
    let mut listen = None;
    let mut connect = None;
    let mut allow_power = false;
    let mut allow_firmware = false;
    let mut server_key = std::env::var("DISKFERRY_SERVER_KEY").ok();
    let mut agent_key = None;
    let mut token = std::env::var("DISKFERRY_TOKEN").ok();
    let mut max_connections = 8;
    let mut disks = Vec::new();
    let mut allow_write = false;
    let mut plaintext = false;
    let mut max_inflight: u32 = 64 << 20;
    let mut live = false;
    let mut live_file = None;
    while let Some(arg) = it.next() {
        let arg = arg.into_string().map_err(ArgsError::NotUtf8)?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(OsString::from(v))),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or(ArgsError::MissingValue(name))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" => listen = Some(value("--listen")?.to_string_lossy().into_owned()),
            "--connect" => connect = Some(value("--connect")?.to_string_lossy().into_owned()),
            "--allow-power" => allow_power = true,
            "--allow-firmware" => allow_firmware = true,
            "--key-file" => return Err(ArgsError::KeyFileGone),
            "--server-key" => {
                server_key = Some(value("--server-key")?.to_string_lossy().into_owned())
            }
            "--agent-key" => agent_key = Some(PathBuf::from(value("--agent-key")?)),
            "--token" => token = Some(value("--token")?.to_string_lossy().into_owned()),
            "--max-connections" => {
                let v = value("--max-connections")?;
                max_connections = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or(ArgsError::MaxConnections(v))?;
            }
            "--disk" => disks.push(PathBuf::from(value("--disk")?)),
            "--allow-write" => allow_write = true,
            "--plaintext" => plaintext = true,
            "--live" => live = true,
            "--live-file" => live_file = Some(PathBuf::from(value("--live-file")?)),
            "--max-inflight" => {
                let v = value("--max-inflight")?;
                max_inflight = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|n| *n >= MIN_INFLIGHT)
                    .ok_or(ArgsError::MaxInflight(v))?;
            }
            other => return Err(ArgsError::Unknown(other.to_string())),
        }
    }
    let endpoint = match (listen, connect) {
        (Some(l), None) => Endpoint::Listen(l),
        (None, Some(c)) => Endpoint::Connect(c),
        (Some(_), Some(_)) => return Err(ArgsError::BothEndpoints),
        (None, None) => return Err(ArgsError::NoEndpoint),
    };
    let server_key = server_key.ok_or(ArgsError::NoServerKey)?;
    Ok(Command::Run(Args {
        endpoint,
        allow_power,
        allow_firmware,
        server_key,
        agent_key,
        token: token.filter(|t| !t.is_empty()),
        max_connections,
        disks,
        allow_write,
        plaintext,
        max_inflight,
        live: match (live, live_file) {
            (true, file) => {
                Some(file.unwrap_or_else(|| PathBuf::from(diskferry_client::live::DEFAULT_FILE)))
            }
            (false, Some(_)) => return Err(ArgsError::LiveFileWithoutLive),
            (false, None) => None,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(args: &[&str]) -> String {
        parse(args.iter().map(OsString::from))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(error(&["--listen"]), "--listen needs a value");
        assert_eq!(error(&["--bogus"]), "unknown argument \"--bogus\"");
        assert_eq!(
            error(&["--listen", "a:1", "--connect", "b:2", "--server-key", "k"]),
            "give --listen or --connect, not both"
        );
        assert_eq!(
            error(&["--server-key", "k"]),
            "--listen ADDR:PORT or --connect HOST:PORT is required"
        );
        assert_eq!(
            error(&[
                "--listen",
                "a:1",
                "--max-inflight=4096",
                "--server-key",
                "k"
            ]),
            "--max-inflight must be a number of bytes of at least 1048576, got \"4096\""
        );
        assert!(error(&["--listen", "a:1", "--key-file", "k"]).contains("--server-key"));
    }

    #[test]
    fn a_listen_command_parses() {
        let Command::Run(a) = parse(
            [
                "--listen=127.0.0.1:0",
                "--server-key",
                "k",
                "--disk",
                "d",
                "--allow-write",
            ]
            .into_iter()
            .map(OsString::from),
        )
        .unwrap() else {
            panic!("not a run command");
        };
        assert!(matches!(a.endpoint, Endpoint::Listen(ref l) if l == "127.0.0.1:0"));
        assert_eq!(a.server_key, "k");
        assert_eq!(a.max_connections, 8);
        assert_eq!(a.disks, [PathBuf::from("d")]);
        assert!(a.allow_write && !a.plaintext && !a.allow_power);
        assert_eq!(a.max_inflight, 64 << 20);
    }
}
