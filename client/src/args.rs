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
    #[error("--key-file FILE (or DISKFERRY_KEY_FILE) is required")]
    NoKeyFile,
}

/// The smallest `--max-inflight`: one largest request must fit.
const MIN_INFLIGHT: u32 = 1 << 20;

pub fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Command, ArgsError> {
    let mut listen = None;
    let mut connect = None;
    let mut allow_power = false;
    let mut key_file = std::env::var_os("DISKFERRY_KEY_FILE").map(PathBuf::from);
    let mut disks = Vec::new();
    let mut allow_write = false;
    let mut plaintext = false;
    let mut max_inflight: u32 = 64 << 20;
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
            "--key-file" => key_file = Some(PathBuf::from(value("--key-file")?)),
            "--disk" => disks.push(PathBuf::from(value("--disk")?)),
            "--allow-write" => allow_write = true,
            "--plaintext" => plaintext = true,
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
    let key_file = key_file.ok_or(ArgsError::NoKeyFile)?;
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
            error(&["--listen", "a:1", "--connect", "b:2", "--key-file", "k"]),
            "give --listen or --connect, not both"
        );
        assert_eq!(
            error(&["--key-file", "k"]),
            "--listen ADDR:PORT or --connect HOST:PORT is required"
        );
        assert_eq!(
            error(&["--listen", "a:1", "--max-inflight=4096", "--key-file", "k"]),
            "--max-inflight must be a number of bytes of at least 1048576, got \"4096\""
        );
    }

    #[test]
    fn a_listen_command_parses() {
        let Command::Run(a) = parse(
            [
                "--listen=127.0.0.1:0",
                "--key-file",
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
        assert_eq!(a.key_file, PathBuf::from("k"));
        assert_eq!(a.disks, [PathBuf::from("d")]);
        assert!(a.allow_write && !a.plaintext && !a.allow_power);
        assert_eq!(a.max_inflight, 64 << 20);
    }
}
