//! What the daemon's job tests share: a real agent (the client library, in process) serving a
//! disk file, and waiting for a job to end.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use diskferry_client::disks::DiskSpec;
use diskferry_daemon::catalog::{Catalog, JobRecord};
use diskferry_protocol::{SessionOptions, StaticKey};

/// Starts a listening agent serving `disk` (writable when asked), trusting `server`; returns
/// its address.
pub async fn start_agent(disk: &Path, server: &StaticKey, allow_write: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = Arc::new(diskferry_client::Config {
        disks: vec![DiskSpec {
            path: disk.to_path_buf(),
            name: disk.display().to_string(),
        }],
        allow_write,
        session: SessionOptions::agent(StaticKey::generate(), server.public()),
        max_inflight: 64 << 20,
        quiet: true,
        allow_power: false,
        allow_firmware: false,
        live: None,
    });
    tokio::spawn(diskferry_client::accept_loop(listener, config, 4));
    addr
}

/// Waits for a job to end (a hang guard, not a speed check).
pub async fn finished(catalog: &Catalog, id: i64) -> JobRecord {
    for _ in 0..1200 {
        let job = catalog.job(id).unwrap().expect("job recorded");
        if job.state.is_final() {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} did not end within two minutes");
}
