//! Helpers for end-to-end scenarios: build and locate the real binaries, start a
//! `diskferry-client` on a free loopback port, generate disk fixtures with data and holes.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod debian;
pub mod fixtures;
pub mod hive;
pub mod http;
pub mod live_vm;
pub mod nbd;
pub mod netns;
pub mod p2v;
pub mod pxe;
pub mod sysfs;
pub mod trees;
pub mod uefi;
pub mod webdriver;

/// The directory holding this build's binaries (target/debug or target/release).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // This test runs from <target>/<profile>/deps/<test>-<hash>.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        build_binaries(profile_dir);
        profile_dir.to_path_buf()
    })
}

/// Builds the binaries under test so a plain `cargo nextest run` never tests stale ones.
fn build_binaries(profile_dir: &Path) {
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "--quiet",
        "--bins",
        "-p",
        "diskferry-cli",
        "-p",
        "diskferry-client",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    cmd.env("CARGO_TARGET_DIR", target_dir);
    let status = cmd
        .status()
        .expect("cannot run cargo to build the binaries under test");
    assert!(
        status.success(),
        "building diskferry and diskferry-client failed"
    );
}

/// Path of one of the project's binaries.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A running `diskferry-client`, killed when dropped.
///
/// It reads an empty directory as sysfs (`DISKFERRY_SYSFS`), so it reports no firmware and
/// no PCI devices: the disks it serves are files, and the host's own firmware and controllers
/// must not decide whether a deploy onto them is refused. [`Client::start_as`] gives it a
/// machine to be ([`sysfs::FakeMachine`]).
pub struct Client {
    pub child: Child,
    pub addr: String,
    stderr: Option<std::process::ChildStderr>,
    _sysfs: tempfile::TempDir,
}

impl Client {
    /// Starts the client on 127.0.0.1:0 with the given extra arguments and waits for its
    /// `listening on` line.
    pub fn start(key: &Path, extra: &[&str]) -> Result<Client> {
        Client::start_at("127.0.0.1:0", key, extra)
    }

    /// Starts the client listening on `listen` (e.g. the address of one that was stopped),
    /// serving the holder of the server key file `key`.
    pub fn start_at(listen: &str, key: &Path, extra: &[&str]) -> Result<Client> {
        Client::spawn(listen, key, extra, None, &Where::default())
    }

    /// Starts the client in network namespace `netns`, listening on `listen`, with extra
    /// environment variables (test seams).
    pub fn start_in(
        netns: &str,
        listen: &str,
        key: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Client> {
        let at = Where {
            netns: Some(netns.to_owned()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Client::spawn(listen, key, extra, None, &at)
    }

    /// Starts the client on 127.0.0.1:0 with extra environment variables (test seams; they
    /// may replace the client's own `DISKFERRY_SYSFS`).
    pub fn start_with(key: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<Client> {
        let at = Where {
            netns: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Client::spawn("127.0.0.1:0", key, extra, None, &at)
    }

    /// Starts the client on 127.0.0.1:0 reporting `machine` as its firmware and devices.
    pub fn start_as(key: &Path, extra: &[&str], machine: &sysfs::FakeMachine) -> Result<Client> {
        Client::spawn("127.0.0.1:0", key, extra, Some(machine), &Where::default())
    }

    fn spawn(
        listen: &str,
        key: &Path,
        extra: &[&str],
        machine: Option<&sysfs::FakeMachine>,
        at: &Where,
    ) -> Result<Client> {
        let sysfs = tempfile::tempdir()?;
        if let Some(m) = machine {
            m.write(sysfs.path())?;
        }
        let mut command = match &at.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("diskferry-client"));
                c
            }
            None => Command::new(bin("diskferry-client")),
        };
        let mut child = command
            .env("DISKFERRY_SYSFS", sysfs.path())
            .envs(at.env.iter().map(|(k, v)| (k, v)))
            .args(["--listen", listen, "--server-key", &public_key(key)])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn diskferry-client")?;
        let line = first_stdout_line(&mut child, Duration::from_secs(20))
            .context("client did not report its address")?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("unexpected first line from the client: {line:?}");
        };
        let stderr = child.stderr.take();
        Ok(Client {
            addr: addr.to_string(),
            child,
            stderr,
            _sysfs: sysfs,
        })
    }

    /// `DISK@ADDR` for a disk served by this client.
    pub fn source(&self, disk: &Path) -> String {
        format!("{}@{}", disk.display(), self.addr)
    }

    /// Stops the client and returns what it logged.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut log = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        log
    }
}

/// Where a client runs: a network namespace, extra environment.
#[derive(Debug, Default)]
struct Where {
    netns: Option<String>,
    env: Vec<(String, String)>,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first line a child prints on stdout, waiting at most `timeout`; the rest of its
/// stdout is read and dropped, so it never blocks on a full pipe.
pub fn first_stdout_line(child: &mut Child, timeout: Duration) -> Result<String> {
    let stdout = child.stdout.take().context("no stdout to read")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    Ok(rx.recv_timeout(timeout)?)
}

/// The public key of a server key file, as `diskferry keygen --public` prints it.
pub fn public_key(key: &Path) -> String {
    let out = Command::new(bin("diskferry"))
        .args(["keygen", "--public"])
        .arg(key)
        .output()
        .expect("keygen --public");
    assert!(
        out.status.success(),
        "keygen --public {}: {}",
        key.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Writes a fresh server key file.
pub fn make_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new(bin("diskferry"))
        .arg("keygen")
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .expect("keygen");
    assert!(status.success());
    path
}

/// Fills `buf` with deterministic, incompressible-looking bytes derived from `seed`.
pub fn pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Creates a sparse disk image of `size` bytes with pattern data at each `(offset, len)`.
pub fn make_disk(path: &Path, size: u64, data: &[(u64, u64)]) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut buf = vec![0u8; 4 << 20];
    for (i, &(offset, len)) in data.iter().enumerate() {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            pattern(&mut buf[..n], (i as u64) << 32 | done);
            f.write_all_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Compares two files byte for byte, reporting the first difference.
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    assert_same_stream(
        &a.display().to_string(),
        fa,
        &b.display().to_string(),
        fb,
        la,
    );
}

/// Reads `len` bytes from both readers and reports the first difference.
fn assert_same_stream(name_a: &str, mut a: impl Read, name_b: &str, mut b: impl Read, len: u64) {
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ba.len() as u64) as usize;
        a.read_exact(&mut ba[..n])
            .unwrap_or_else(|e| panic!("{name_a} at byte {off}: {e}"));
        b.read_exact(&mut bb[..n])
            .unwrap_or_else(|e| panic!("{name_b} at byte {off}: {e}"));
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            panic!("{name_a} and {name_b} differ at byte {}", off + i as u64);
        }
        off += n as u64;
    }
}

/// A second, independent reader — the `qcow` crate for `.qcow2`, the `vhdx` crate for `.vhdx`
/// (chosen by extension) — reads `image` the same as the raw `reference`, over the
/// reference's whole length. Images with a backing file are left to qemu-img: the `qcow`
/// crate reads unallocated clusters of an overlay as zeros instead of from the backing file.
pub fn assert_crate_reads_equal(image: &Path, reference: &Path) {
    let len = std::fs::metadata(reference).unwrap().len();
    let raw = std::io::BufReader::new(std::fs::File::open(reference).unwrap());
    let name = image.display().to_string();
    let what = format!("{} (raw reference)", reference.display());
    match image.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => {
            let qcow =
                qcow::open(image).unwrap_or_else(|e| panic!("qcow crate cannot open {name}: {e}"));
            if qcow.backing_file().is_some() {
                return;
            }
            let qcow = qcow.unwrap_qcow2();
            let mut file = std::io::BufReader::new(std::fs::File::open(image).unwrap());
            let reader = qcow.reader(&mut file);
            assert_same_stream(&format!("{name} (qcow crate)"), reader, &what, raw, len);
        }
        Some("vhdx") => {
            let mut disk = vhdx::Vhdx::load(image);
            let reader = disk.reader();
            assert_same_stream(&format!("{name} (vhdx crate)"), reader, &what, raw, len);
        }
        other => panic!("no second reader for {other:?} images"),
    }
}

/// Bytes actually allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `diskferry ARGS`: whether it succeeded, and what it printed (stdout, then stderr).
pub fn cli(args: &[&str]) -> (bool, String) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let (ok, out, err) = diskferry(&args);
    (ok, out + &err)
}

/// Runs `diskferry` with arguments; returns (success, stdout, stderr).
pub fn diskferry(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(bin("diskferry"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run diskferry");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `diskferry ARGS --data-dir DATA` (a command of the server on `data`), which must succeed;
/// returns its standard output.
pub fn cli_with_data(data: &Path, args: &[&str]) -> String {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    all.extend(["--data-dir".as_ref(), data.as_os_str()]);
    let (ok, out, err) = diskferry(&all);
    assert!(ok, "diskferry {args:?}: {err}");
    out
}

/// Waits until `cond` holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Runs a checker tool (qemu-img, qemu-io, ...) that must succeed; returns stdout and stderr.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (install qemu-utils)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

/// qemu-img finds no errors and no leaks in `image`, and it reads the same as the raw `reference`.
pub fn assert_qcow2_clean_and_equal(image: &Path, reference: &Path) {
    let check = run_ok(
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().unwrap()],
    );
    assert!(
        check.contains("No errors were found") && !check.contains("leaked"),
        "qemu-img check:\n{check}"
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
    assert_crate_reads_equal(image, reference);
}

/// Writes `dir/name`: a copy of `original` with `edit` applied (for damaged-image tests).
pub fn damaged_copy(
    dir: &Path,
    name: &str,
    original: &[u8],
    edit: impl FnOnce(&mut Vec<u8>),
) -> PathBuf {
    let mut bytes = original.to_vec();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `qemu-img convert [extra] -f raw -O format src dst`, which must succeed.
pub fn qemu_img_convert(src: &Path, dst: &Path, format: &str, extra: &[&str]) {
    let mut args = vec!["convert"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "-f",
        "raw",
        "-O",
        format,
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    run_ok("qemu-img", &args);
}

/// `qemu-img convert -O raw image raw` (the image's format detected by qemu-img), which must
/// succeed: the independent reader's view of an image as a plain disk.
pub fn qemu_img_to_raw(image: &Path, raw: &Path) {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

/// Runs a shell script (`sh -e`) that must succeed; its output is shown if it does not.
pub fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-ec", script])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of `original` with 1 to `max_flips` random bytes (seeded) changed within its first
/// `region` bytes — where filesystems keep their metadata.
pub fn flip_bytes(original: &[u8], seed: u64, max_flips: usize, region: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = original.to_vec();
    let region = region.min(bytes.len());
    for _ in 0..rng.gen_range(1..max_flips) {
        let at = rng.gen_range(0..region);
        bytes[at] = rng.gen();
    }
    bytes
}

/// Runs `work` on its own thread: it must finish within a minute and must not panic.
pub fn assert_finishes_without_panic(what: &str, work: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        work();
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(60)).is_ok() || worker.is_finished(),
        "{what} did not finish within a minute"
    );
    assert!(worker.join().is_ok(), "{what} panicked");
}
