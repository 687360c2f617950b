//! Capture jobs build chains (issue 16): a capture with `"incremental": "auto"` builds on the
//! newest earlier capture of the same disk that has a chunk map (none → in full), an
//! explicitly named base that changed since fails the job with the reason, and the same
//! base chosen automatically gives way to a full capture. Overlays are checked with qemu-img
//! (`check`, and `compare` against the source through the backing chain).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use diskferry_daemon::agents::Agents;
use diskferry_daemon::catalog::{Catalog, JobRecord, JobState, Relation};
use diskferry_daemon::jobs::{JobRequest, Jobs};
use diskferry_protocol::{SessionOptions, StaticKey};

mod common;
use common::{finished, start_agent};

const DISK: usize = 8 << 20;
/// Where the tests change the disk: one 4 KiB write per MiB (each in one chunk of the map).
const CHUNK: usize = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

/// Overwrites the start of chunk `n` of the source.
fn change_chunk(source: &Path, n: usize, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options().write(true).open(source).unwrap();
    f.write_all_at(&[byte; 4096], (n * CHUNK) as u64).unwrap();
}

/// Job logs are routed by job id, which each test's catalog counts from 1: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    _dir: tempfile::TempDir,
    key: StaticKey,
    source: std::path::PathBuf,
    spec: String,
    catalog: Arc<Catalog>,
    jobs: Arc<Jobs>,
}

/// Job logs as the server keeps them (the daemon's binary installs this layer).
fn job_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(diskferry_daemon::joblog::layer());
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    });
}

async fn setup() -> Setup {
    job_logs();
    let serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let pattern: Vec<u8> = (0..DISK).map(|i| (i * 13 % 251) as u8 + 1).collect();
    std::fs::write(&source, &pattern).unwrap();
    // One partition over everything past the first MiB (sfdisk writes the MBR), so the
    // capture can be deployed.
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread"])
        .arg(&source)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk is installed");
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"start=2048, type=83\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let key = StaticKey::generate();
    let addr = start_agent(&source, &key, false).await;
    let catalog = Arc::new(Catalog::open(&dir.path().join("data")).unwrap());
    let session = SessionOptions::controller(key.clone());
    let agents = Arc::new(Agents::new(
        Arc::clone(&catalog),
        session.clone(),
        Default::default(),
    ));
    let jobs = Arc::new(Jobs::new(Arc::clone(&catalog), session, agents));
    Setup {
        _serial: serial,
        spec: format!("{}@{addr}", source.display()),
        key,
        source,
        _dir: dir,
        catalog,
        jobs,
    }
}

impl Setup {
    fn request(&self, output: &str) -> JobRequest {
        JobRequest {
            kind: "capture".into(),
            source: Some(self.spec.clone()),
            output: Some(output.into()),
            mode: Some("sectors".into()),
            incremental: Some("auto".into()),
            ..JobRequest::default()
        }
    }

    async fn run(&self, req: JobRequest) -> JobRecord {
        let id = self.jobs.start(req).expect("the job starts");
        finished(&self.catalog, id).await
    }

    fn image(&self, name: &str) -> String {
        self.catalog
            .captures_dir()
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    fn same_as_source(&self, name: &str) {
        let image = self.image(name);
        qemu_img(&["check", &image]);
        let src = self.source.to_string_lossy().into_owned();
        let same = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &src, &image]);
        assert!(same.contains("Images are identical"), "{same}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_builds_on_the_newest_capture_with_a_map() {
    let s = setup().await;
    // No map: never a base.
    let mut first = s.request("a.qcow2");
    first.chunk_map = Some(false);
    let job = s.run(first).await;
    assert_eq!(job.state, JobState::Succeeded, "{}", job.log);
    assert!(job.log.contains("no earlier capture"), "{}", job.log);
    // Nothing with a map yet: in full, with a map.
    let job = s.run(s.request("b.qcow2")).await;
    assert_eq!(job.state, JobState::Succeeded, "{}", job.log);
    let result = job.result.expect("a result");
    assert_eq!(result["base"], serde_json::Value::Null, "{result}");
    assert_eq!(result["chunk_map"], true);

    change_chunk(&s.source, 2, 0xAA);
    change_chunk(&s.source, 5, 0xBB);
    let job = s.run(s.request("c.qcow2")).await;
    assert_eq!(job.state, JobState::Succeeded, "{}", job.log);
    let result = job.result.expect("a result");
    assert_eq!(result["base"], "b.qcow2", "{result}");
    assert_eq!(result["relation"], "overlay");
    assert_eq!(result["incremental"]["changed_chunks"], 2, "{result}");
    let chunks = DISK / diskferry_imaging::chunkmap::DEFAULT_CHUNK as usize;
    assert_eq!(result["incremental"]["chunks"], chunks as u64);
    assert!(
        job.log.contains(&format!(
            "incremental on b.qcow2: 2 of {chunks} chunks changed"
        )),
        "{}",
        job.log
    );
    s.same_as_source("c.qcow2");
    let info = qemu_img(&["info", "--backing-chain", &s.image("c.qcow2")]);
    assert!(info.contains("b.qcow2"), "{info}");

    let all = s.catalog.captures().unwrap();
    let c = all.iter().find(|r| r.name == "c.qcow2").unwrap();
    assert_eq!(c.base.as_deref(), Some("b.qcow2"));
    assert_eq!(c.relation, Some(Relation::Overlay));
    assert!(c.chunk_map, "an incremental capture is a base in turn");
    assert_eq!(c.source_disk.as_deref(), Some(s.source.to_str().unwrap()));
    assert_eq!(c.incremental.as_ref().unwrap()["changed_chunks"], 2);

    // The next one builds on the newest: c.
    change_chunk(&s.source, 7, 0xCC);
    let job = s.run(s.request("d.qcow2")).await;
    let result = job.result.expect("a result");
    assert_eq!(result["base"], "c.qcow2", "{result}");
    assert_eq!(result["incremental"]["changed_chunks"], 1, "{result}");
    s.same_as_source("d.qcow2");
    let all = s.catalog.captures().unwrap();
    let d = all.iter().find(|r| r.name == "d.qcow2").unwrap();
    assert_eq!(
        diskferry_daemon::catalog::chain_of(&all, d),
        ["c.qcow2", "b.qcow2"]
    );

    // The top of the chain deploys (read through its backing files) onto a blank disk that
    // then holds what the source holds.
    let target = s._dir.path().join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(DISK as u64)
        .unwrap();
    let addr = start_agent(&target, &s.key, true).await;
    let job = s
        .run(JobRequest {
            kind: "deploy".into(),
            image: Some("d.qcow2".into()),
            target: Some(format!("{}@{addr}", target.display())),
            mode: Some("sectors".into()),
            ..JobRequest::default()
        })
        .await;
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "{:?}: {}",
        job.error,
        job.log
    );
    // The partition (everything the deploy writes besides the table), byte for byte.
    let cmp = Command::new("cmp")
        .args(["-i", "1048576"])
        .arg(&s.source)
        .arg(&target)
        .output()
        .unwrap();
    assert!(cmp.status.success(), "{cmp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_base_fails_when_named_and_gives_way_when_automatic() {
    let s = setup().await;
    let job = s.run(s.request("base.qcow2")).await;
    assert_eq!(job.state, JobState::Succeeded, "{}", job.log);
    // The base image changes after its map was written (its modification time moves).
    let base = std::fs::File::options()
        .write(true)
        .open(s.image("base.qcow2"))
        .unwrap();
    base.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(base);

    let mut named = s.request("named.qcow2");
    named.incremental = None;
    named.base = Some("base.qcow2".into());
    let job = s.run(named).await;
    assert_eq!(job.state, JobState::Failed, "{}", job.log);
    let error = job.error.unwrap_or_default();
    assert!(error.contains("changed since it was captured"), "{error}");
    assert!(!Path::new(&s.image("named.qcow2")).exists());

    // Automatic: the catalog (not refreshed since) still offers it, the capture finds it
    // changed and captures in full, saying why.
    let job = s.run(s.request("auto.qcow2")).await;
    assert_eq!(job.state, JobState::Succeeded, "{}", job.log);
    assert!(job.log.contains("capturing in full instead"), "{}", job.log);
    let result = job.result.unwrap();
    assert_eq!(result["base"], serde_json::Value::Null);
    let why = result["fallback"].as_str().unwrap_or("");
    assert!(why.contains("changed since it was captured"), "{result}");
    s.same_as_source("auto.qcow2");
    // Refreshed, the catalog no longer counts the changed base's map.
    let all = s.catalog.captures().unwrap();
    assert!(
        !all.iter()
            .find(|r| r.name == "base.qcow2")
            .unwrap()
            .chunk_map
    );

    // An unknown base is refused before anything starts.
    let mut unknown = s.request("x.qcow2");
    unknown.incremental = None;
    unknown.base = Some("nope.qcow2".into());
    assert!(s.jobs.start(unknown).is_err());
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the tool is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

/// Writes the filesystem image `fs` into `disk` at 1 MiB (its partition 1).
fn place(disk: &Path, fs: &Path) {
    run(Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc", "status=none"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_mode_capture_takes_unchanged_files_from_its_base() {
    let s = setup().await;
    // The source becomes a GPT disk (sgdisk) whose partition 1 is an ext4 (mke2fs -d).
    let tree = s._dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..12u32 {
        let data: Vec<u8> = (0..(256 << 10)).map(|j: u32| (j * 7 + i) as u8).collect();
        std::fs::write(tree.join(format!("f{i}")), data).unwrap();
    }
    std::fs::File::options()
        .write(true)
        .open(&s.source)
        .unwrap()
        .set_len(0)
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&s.source)
        .unwrap()
        .set_len(DISK as u64)
        .unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:14335"])
        .arg(&s.source));
    let fs = s._dir.path().join("fs.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&fs)
        .arg("6M"));
    place(&s.source, &fs);
    let files = |out: &str| {
        let mut r = s.request(out);
        r.mode = Some("files".into());
        r
    };
    let job = s.run(files("base.qcow2")).await;
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "{:?}: {}",
        job.error,
        job.log
    );

    // One file changes (a new inode, as an editor's save makes).
    let new = s._dir.path().join("new");
    std::fs::write(&new, b"changed\n").unwrap();
    run(Command::new("debugfs")
        .args(["-w", "-R", &format!("write {} f99", new.display())])
        .arg(&fs));
    place(&s.source, &fs);
    let job = s.run(files("next.qcow2")).await;
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "{:?}: {}",
        job.error,
        job.log
    );
    let result = job.result.expect("a result");
    assert_eq!(result["base"], "base.qcow2", "{result}");
    assert_eq!(result["relation"], "files", "{result}");
    let reused = result["incremental"]["reused_bytes"].as_u64().unwrap_or(0);
    assert!(reused >= 2 << 20, "{result}");
    assert!(
        job.log.contains("of unchanged files taken from base.qcow2"),
        "{}",
        job.log
    );

    // A files child stands alone: its filesystem checks clean on its own, with the new file.
    let raw = s._dir.path().join("next.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        &s.image("next.qcow2"),
        raw.to_str().unwrap(),
    ]);
    let part = s._dir.path().join("part.img");
    run(Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", part.display()))
        .args(["bs=1M", "skip=1", "count=6", "status=none"]));
    run(Command::new("e2fsck").arg("-fn").arg(&part));
    let listing = run(Command::new("debugfs").args(["-R", "ls -l /"]).arg(&part));
    assert!(
        listing.contains("f99") && listing.contains("f11"),
        "{listing}"
    );
    let all = s.catalog.captures().unwrap();
    let base = all.iter().find(|r| r.name == "base.qcow2").unwrap();
    assert!(s.catalog.delete_capture(base.id).unwrap().is_some());
}
