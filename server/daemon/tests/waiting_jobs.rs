//! Jobs that wait, driven by the dispatcher at chosen times (no sleeping): a job for a machine
//! that never connects fails after its wait with a reason that says what to check, and a due
//! schedule queues its job and moves to its next time.

use std::sync::Arc;

use diskferry_daemon::agents::Agents;
use diskferry_daemon::catalog::{unix_now, Catalog, JobState};
use diskferry_daemon::jobs::{JobRequest, Jobs};
use diskferry_protocol::{SessionOptions, StaticKey};

fn jobs(dir: &std::path::Path) -> (Arc<Catalog>, Arc<Jobs>) {
    let catalog = Arc::new(Catalog::open(dir).unwrap());
    let session = SessionOptions::controller(StaticKey::generate());
    let agents = Arc::new(Agents::new(
        Arc::clone(&catalog),
        session.clone(),
        Default::default(),
    ));
    let jobs = Arc::new(Jobs::new(Arc::clone(&catalog), session, agents));
    // Magic packets go to a local socket nobody reads, not to this machine's networks.
    jobs.set_wake_config(diskferry_daemon::wake::WakeConfig {
        relays: vec!["127.0.0.1:9".parse().unwrap()],
    });
    (catalog, jobs)
}

fn capture(output: &str) -> JobRequest {
    JobRequest {
        kind: "capture".into(),
        source: Some("lab-01".into()),
        output: Some(output.into()),
        ..JobRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_never_connects_fails_its_job_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, jobs) = jobs(dir.path());
    catalog
        .register_machine("52:54:00:00:01:01", "lab-01", None)
        .unwrap();
    let id = jobs
        .start(JobRequest {
            wait_minutes: Some(5),
            ..capture("a.qcow2")
        })
        .unwrap();
    let now = unix_now();
    let j2 = Arc::clone(&jobs);
    tokio::task::spawn_blocking(move || j2.dispatch(now))
        .await
        .unwrap();
    let job = catalog.job(id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert!(job.woken_at.is_some(), "a magic packet went out");
    assert!(
        job.log
            .contains("magic packet for lab-01 (52:54:00:00:01:01) sent to 127.0.0.1:9"),
        "{}",
        job.log
    );
    // Four minutes on it still waits; six minutes on it has failed.
    let j2 = Arc::clone(&jobs);
    tokio::task::spawn_blocking(move || j2.dispatch(now + 4 * 60))
        .await
        .unwrap();
    assert_eq!(catalog.job(id).unwrap().unwrap().state, JobState::Queued);
    let j2 = Arc::clone(&jobs);
    tokio::task::spawn_blocking(move || j2.dispatch(now + 6 * 60))
        .await
        .unwrap();
    let job = catalog.job(id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap();
    assert!(
        error.contains("did not connect within 5 minutes after a magic packet"),
        "{error}"
    );
    // A machine forgotten while its job waits fails that job.
    let id = jobs.start(capture("b.qcow2")).unwrap();
    let m = catalog.find_machine("lab-01").unwrap().unwrap();
    catalog.forget_machine(m.id).unwrap();
    let j2 = Arc::clone(&jobs);
    tokio::task::spawn_blocking(move || j2.dispatch(unix_now()))
        .await
        .unwrap();
    let job = catalog.job(id).unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.error.unwrap().contains("forgotten"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_schedule_queues_its_job_and_moves_to_its_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, jobs) = jobs(dir.path());
    catalog
        .register_machine("52:54:00:00:01:02", "lab-01", None)
        .unwrap();
    let sid = jobs
        .add_schedule(&capture("weekly.qcow2"), "sun 02:00")
        .unwrap();
    let first = catalog.schedule(sid).unwrap().unwrap().next_at;
    assert!(first > unix_now() && first <= unix_now() + 7 * 86400);
    // Not due: nothing happens.
    let j2 = Arc::clone(&jobs);
    tokio::task::spawn_blocking(move || j2.dispatch(first - 1))
        .await
        .unwrap();
    assert!(catalog.waiting_jobs().unwrap().is_empty());
    // Due: one job, for the machine, from that time; the schedule moves a week on.
    let j2 = Arc::clone(&jobs);
    tokio::task::spawn_blocking(move || j2.dispatch(first))
        .await
        .unwrap();
    let waiting = catalog.waiting_jobs().unwrap();
    assert_eq!(waiting.len(), 1);
    let job = catalog.job(waiting[0].id).unwrap().unwrap();
    assert_eq!(job.schedule_id, Some(sid));
    assert_eq!(job.not_before, Some(first));
    let s = catalog.schedule(sid).unwrap().unwrap();
    assert_eq!(s.last_job, Some(job.id));
    assert_eq!(s.next_at, first + 7 * 86400);
    // Schedules are checked as jobs are.
    assert!(jobs.add_schedule(&capture("x.txt"), "daily 01:00").is_err());
    assert!(jobs.add_schedule(&capture("x.qcow2"), "someday").is_err());
}
