//! Two capture jobs to one output name (issue 14, finding 8): the daemon accepted both, the
//! second truncated the first's `NAME.partial`, and one "succeeded" with a corrupt image. Now
//! the second is refused while the first runs, and the first's image is intact — checked by
//! qemu-img, not by our reader.

use std::process::Command;
use std::sync::Arc;

use diskferry_daemon::agents::Agents;
use diskferry_daemon::catalog::{Catalog, JobState};
use diskferry_daemon::jobs::{JobError, JobRequest, Jobs};
use diskferry_protocol::{SessionOptions, StaticKey};

mod common;

/// A source disk with data everywhere (nothing to skip, so the capture takes a moment).
const DISK: usize = 64 << 20;

/// A server key (the one place that knows the key model).
fn server_key() -> StaticKey {
    StaticKey::generate()
}

/// Waits for a job to end, which must be without an error.
async fn wait_for(catalog: &Catalog, id: i64) -> JobState {
    let job = common::finished(catalog, id).await;
    assert_eq!(job.error, None, "job {id}: {}", job.log);
    job.state
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_capture_to_a_running_captures_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let pattern: Vec<u8> = (0..DISK).map(|i| (i * 7 % 251) as u8 + 1).collect();
    std::fs::write(&source, &pattern).unwrap();
    let key = server_key();
    let addr = common::start_agent(&source, &key, false).await;

    let catalog = Arc::new(Catalog::open(&dir.path().join("data")).unwrap());
    let session = SessionOptions::controller(key);
    let agents = Arc::new(Agents::new(
        Arc::clone(&catalog),
        session.clone(),
        Default::default(),
    ));
    let jobs = Arc::new(Jobs::new(Arc::clone(&catalog), session, agents));
    let request = JobRequest {
        kind: "capture".into(),
        source: Some(format!("{}@{addr}", source.display())),
        output: Some("dup.qcow2".into()),
        mode: Some("sectors".into()),
        ..JobRequest::default()
    };

    let first = jobs.start(request.clone()).expect("first capture starts");
    match jobs.start(request.clone()) {
        Err(JobError::Conflict(m)) => assert!(m.contains("dup.qcow2"), "{m}"),
        other => panic!("a second capture to dup.qcow2 was not refused: {other:?}"),
    }
    assert_eq!(wait_for(&catalog, first).await, JobState::Succeeded);

    let image = catalog.captures_dir().join("dup.qcow2");
    assert!(!catalog.captures_dir().join("dup.qcow2.partial").exists());
    qemu_img(&["check", image.to_str().unwrap()]);
    let same = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        source.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert!(same.contains("Images are identical"), "{same}");
    // The finished capture keeps its name: a third request is refused too.
    assert!(matches!(jobs.start(request), Err(JobError::Conflict(_))));
}
