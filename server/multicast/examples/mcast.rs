//! A driver for the multicast data path alone, for its own test (`tests/netns.rs`) and the
//! data-path rows of `bench/multicast.sh` (deploys go through `diskferry deploy --multicast`).
//! It plays both roles, one per process (each in its own network namespace):
//!
//! ```text
//! mcast send --image IMG --group 239.1.1.1:5500 --bind 10.0.0.1 --receivers 4 --dir DIR
//!            [--max-rate BYTES_PER_S] [--receiver-timeout-ms MS] [--join-timeout-ms MS]
//! mcast recv --creds DIR/r0.cred --disk FILE [--test-drop-percent N] [--expect-b3 HEX]
//! mcast hash --file IMG                     (the BLAKE3 `--expect-b3` wants)
//! ```
//!
//! `send` plans the image's data extents (holes are skipped: the receivers' disks are zeroed
//! there), writes each receiver's credentials to `DIR/rN.cred` (hex; the real path hands them
//! over the Noise connection), then `DIR/ready`, runs the session and prints its report;
//! exit status 0 when every receiver is done, 3 when some were dropped. `recv` receives into
//! FILE and, with `--expect-b3`, reads it back and compares its BLAKE3 with the image's (b3sum
//! of the image, computed once by the caller; the read-back is what a deploy's verification
//! costs), exit status 0 only when they match.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diskferry_blockdev::{BlockDevice, FileDevice, Region};
use diskferry_client::multicast::{receive, Control, Network, Options};
use diskferry_localdisk::LocalDisk;
use diskferry_multicast::{Outcome, Plan, Session, SessionConfig, SessionKeys};
use diskferry_protocol::multicast::Credentials;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let role = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let flags = parse_flags(&rest)?;
    match role.as_str() {
        "send" => send(&flags),
        "recv" => recv(&flags),
        "hash" => {
            println!("{}", file_hash(Path::new(flag(&flags, "file")?))?.to_hex());
            Ok(())
        }
        _ => bail!("usage: mcast send|recv --flag value …"),
    }
}

type Flags = HashMap<String, String>;

fn parse_flags(args: &[String]) -> Result<Flags> {
    let mut flags = HashMap::new();
    for pair in args.chunks(2) {
        let [k, v] = pair else {
            bail!("flag {} has no value", pair[0])
        };
        let k = k
            .strip_prefix("--")
            .with_context(|| format!("not a flag: {k}"))?;
        flags.insert(k.to_owned(), v.clone());
    }
    Ok(flags)
}

fn flag<'a>(flags: &'a Flags, name: &str) -> Result<&'a str> {
    flags
        .get(name)
        .map(String::as_str)
        .with_context(|| format!("--{name} is required"))
}

fn number<T: std::str::FromStr>(flags: &Flags, name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    flags.get(name).map_or(Ok(default), |v| {
        v.parse().map_err(|e| anyhow::anyhow!("--{name} {v}: {e}"))
    })
}

/// The image's allocated ranges (SEEK_DATA/SEEK_HOLE), as a deploy skips unallocated ones.
fn data_extents(image: &FileDevice) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in image.block_status(0, image.size())? {
        if e.region == Region::Zero {
            continue;
        }
        match out.last_mut() {
            Some((o, l)) if *o + *l == e.offset => *l += e.len,
            _ => out.push((e.offset, e.len)),
        }
    }
    Ok(out)
}

fn send(flags: &Flags) -> Result<()> {
    let image = FileDevice::open(Path::new(flag(flags, "image")?), false)?;
    let dir = PathBuf::from(flag(flags, "dir")?);
    let mut config = SessionConfig::new(
        number(flags, "session", std::process::id() as u64)?,
        flag(flags, "group")?.parse()?,
        format!("{}:0", flag(flags, "bind")?).parse()?,
        number(flags, "receivers", 1)?,
    );
    config.rate.max = number(flags, "max-rate", config.rate.max)?;
    config.receiver_timeout = Duration::from_millis(number(flags, "receiver-timeout-ms", 5000)?);
    config.join_timeout = Duration::from_millis(number(flags, "join-timeout-ms", 5000)?);
    let receivers = config.receivers;
    let plan = Arc::new(Plan::new(&data_extents(&image)?, image.size())?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let session = Session::bind(config, SessionKeys::generate()?)?;
        for r in 0..receivers {
            let hex = hex(&session.credentials(r, &plan).encode());
            fs::write(dir.join(format!("r{r}.cred")), hex)?;
        }
        fs::write(dir.join("ready"), "")?;
        eprintln!(
            "session: {} packets, {} bytes, sender {}",
            plan.total_packets(),
            plan.bytes(),
            session.sender_addr()
        );
        anyhow::Ok(session.run(Arc::new(image), plan).await?)
    })?;
    println!(
        "elapsed {:.3} s, {} bytes, multicast repairs {} bytes, rejected {}, repair overflow {}",
        report.elapsed.as_secs_f64(),
        report.bytes,
        report.multicast_repair_bytes,
        report.rejected,
        report.repair_overflow
    );
    for r in &report.receivers {
        println!(
            "receiver {}: {:?}, unicast repairs {} bytes, NACKed {} packets, last loss {:?} ppm",
            r.id, r.outcome, r.unicast_bytes, r.nacked_packets, r.last_loss_ppm
        );
    }
    let rates: Vec<String> = report
        .rate_history
        .iter()
        .map(|p| format!("{:.2}s:{}MB/s", p.at.as_secs_f64(), p.rate / 1_000_000))
        .collect();
    println!("rate history ({}): {}", rates.len(), rates.join(" "));
    if report.receivers.iter().any(|r| r.outcome != Outcome::Done) {
        std::process::exit(3);
    }
    Ok(())
}

fn recv(flags: &Flags) -> Result<()> {
    let raw = fs::read_to_string(flag(flags, "creds")?)?;
    let creds = Credentials::decode(&unhex(raw.trim())?)
        .map_err(|e| anyhow::anyhow!("credentials: {e}"))?;
    let disk_path = PathBuf::from(flag(flags, "disk")?);
    let disk = LocalDisk::open(&disk_path, true)?;
    let options = Options {
        test_drop_percent: number(flags, "test-drop-percent", 0)?,
        ..Options::default()
    };
    let started = Instant::now();
    let report = receive(
        &creds,
        &disk,
        &Network::default(),
        options,
        &Control::default(),
    )?;
    let s = &report.stats;
    println!(
        "received in {:.3} s: {} data packets, {} duplicates, {} test-dropped, {} rejected, \
         {} NACKs for {} packets, {} bytes written, receive buffer {}",
        report.elapsed.as_secs_f64(),
        s.data_packets,
        s.duplicates,
        s.test_dropped,
        s.rejected,
        s.nacks,
        s.nacked_packets,
        s.bytes_written,
        report.recv_buffer
    );
    if let Some(expected) = flags.get("expect-b3") {
        let mine = file_hash(&disk_path)?;
        if mine.to_hex().as_str() != expected {
            bail!(
                "verify: {} hashes to {}, not {expected}",
                disk_path.display(),
                mine.to_hex()
            );
        }
        println!(
            "verified: BLAKE3 {} ({:.3} s after the start)",
            mine.to_hex(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn file_hash(path: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(fs::File::open(path)?)?;
    Ok(hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd hex length");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("not hex"))
        .collect()
}
