//! Chunk hashes computed by the agent (issue 16): a real agent (the client library, in
//! process) hashes its disk in fixed chunks; the hashes equal what the server computes from
//! the bytes themselves, across requests that span several of the agent's request limits and
//! through a partition slice; requests outside the protocol's limits are refused; a peer that
//! answers the wrong number of hashes is an error, never a short list taken as complete.

use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockError, FileDevice, SliceDevice};
use diskferry_client::disks::DiskSpec;
use diskferry_protocol::{Reply, Request, SessionOptions, StaticKey};
use diskferry_remote::{Connection, RemoteOptions};

mod common;

const MIB: u64 = 1 << 20;

/// A real agent serving `disk` read-only; its address.
async fn start_agent(disk: &Path, server: &StaticKey) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = Arc::new(diskferry_client::Config {
        disks: vec![DiskSpec {
            path: disk.to_path_buf(),
            name: "disk".into(),
        }],
        allow_write: false,
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

/// A 600 MiB sparse disk with data scattered through it and a tail that is not a whole chunk.
fn disk(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.join("disk.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(600 * MIB + 12_345).unwrap();
    for (i, at) in [0, 3 * MIB + 17, 255 * MIB, 256 * MIB - 1, 599 * MIB + 9000]
        .iter()
        .enumerate()
    {
        file.write_all_at(&[i as u8 + 1; 5000], *at).unwrap();
    }
    path
}

async fn open_remote(path: &Path) -> Arc<dyn BlockDevice> {
    let server = StaticKey::generate();
    let addr = start_agent(path, &server).await;
    let conn = Connection::connect(&addr, &SessionOptions::controller(server))
        .await
        .unwrap();
    Arc::new(
        conn.open("disk", false, RemoteOptions::default())
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_hashes_equal_the_servers_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let remote = open_remote(&path).await;
    let local: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&path, false).unwrap());
    let size = local.size();
    let (r, l) = (Arc::clone(&remote), Arc::clone(&local));
    tokio::task::spawn_blocking(move || {
        // Three requests of the agent's 256 MiB span, the last chunk short.
        let theirs = r.chunk_hashes(0, size, 1 << 20).unwrap();
        let ours = l.chunk_hashes(0, size, 1 << 20).unwrap();
        assert_eq!(theirs.len(), 601);
        assert_eq!(theirs, ours);
        // Chunks that differ are the ones holding data (all-zero chunks hash alike).
        assert_ne!(theirs[0], theirs[1]);
        assert_eq!(theirs[1], theirs[2]);
        // Through a partition slice: offsets shift, hashes follow.
        let rs = SliceDevice::new(Arc::clone(&r), 3 * MIB, 64 * MIB).unwrap();
        let ls = SliceDevice::new(Arc::clone(&l), 3 * MIB, 64 * MIB).unwrap();
        assert_eq!(
            rs.chunk_hashes(0, 64 * MIB, 64 << 10).unwrap(),
            ls.chunk_hashes(0, 64 * MIB, 64 << 10).unwrap()
        );
        // Chunks larger than the agent's read block (1 MiB), and a range ending mid-chunk.
        assert_eq!(
            r.chunk_hashes(0, size, 4 << 20).unwrap(),
            l.chunk_hashes(0, size, 4 << 20).unwrap()
        );
        assert_eq!(
            r.chunk_hashes(MIB, 7 * MIB + 4096, 4096).unwrap(),
            l.chunk_hashes(MIB, 7 * MIB + 4096, 4096).unwrap()
        );
        // Outside the limits: too many chunks, a chunk not a power of two, past the end.
        for (offset, len, chunk) in [
            (0, 40 * MIB, 4096u32),
            (0, MIB, 3000),
            (size - 10, 20, 4096),
        ] {
            let err = r.chunk_hashes(offset, len, chunk).unwrap_err();
            assert!(
                matches!(err, BlockError::Protocol(_) | BlockError::OutOfRange { .. }),
                "{offset} {len} {chunk}: {err}"
            );
        }
    })
    .await
    .unwrap();
}

/// An agent that answers every HashChunks with one hash too few.
async fn short_counting_agent(server: &StaticKey) -> String {
    common::scripted_agent(server, |request| {
        Some(match request {
            Request::Open { .. } => common::opened(8 * MIB),
            Request::HashChunks { len, chunk, .. } => {
                let n = len.div_ceil(u64::from(chunk)) as usize;
                Reply::Hashes(vec![[7; 32]; n - 1])
            }
            _ => Reply::Done,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_hash_list_is_an_error() {
    let server = StaticKey::generate();
    let addr = short_counting_agent(&server).await;
    let conn = Connection::connect(&addr, &SessionOptions::controller(server))
        .await
        .unwrap();
    let remote = conn
        .open("disk", false, RemoteOptions::default())
        .await
        .unwrap();
    let err = tokio::task::spawn_blocking(move || remote.chunk_hashes(0, 8 * MIB, 1 << 20))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, BlockError::Protocol(why) if why.contains("got 7")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_disk_is_hashed_in_as_many_requests_as_it_takes() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path());
    let remote = open_remote(&path).await;
    let local = FileDevice::open(&path, false).unwrap();
    let theirs = tokio::task::spawn_blocking(move || {
        // 64 KiB chunks: 9,601 of them, three requests of at most 4,096.
        diskferry_blockdev::hash_device(&*remote, 64 << 10).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(theirs.len(), 9601);
    assert_eq!(
        theirs,
        diskferry_blockdev::hash_device(&local, 64 << 10).unwrap()
    );
}
