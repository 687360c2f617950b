//! Wire compression as the server sees it: a connection to an agent that offers LZ4 reads a
//! real ext4 image (made by mke2fs) and writes it back byte-identical, one to an agent without
//! compression works raw, and a hostile agent answering a read with a decompression bomb gets
//! the connection closed with the reason instead of a huge allocation.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_protocol::compress::Codec;
use diskferry_protocol::handshake::respond;
use diskferry_protocol::stream::{data_reply_buffer, split, DataReply, DATA_HEADROOM};
use diskferry_protocol::{FrameCodec, Message, Reply, Request, SessionOptions, StaticKey};
use diskferry_remote::{Connection, RemoteOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

/// A real ext4 image: mke2fs fills 8 MiB with the system's license texts.
fn ext4_image() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let ok = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d", "/usr/share/common-licenses"])
        .arg(&img)
        .arg("8M")
        .stdout(Stdio::null())
        .status()
        .expect("mke2fs (e2fsprogs) is installed");
    assert!(ok.success());
    std::fs::read(img).unwrap()
}

fn opened(cookie: u64, size: u64) -> Message {
    let reply = Reply::Opened {
        handle: 1,
        size,
        logical_sector: 512,
        physical_sector: 512,
        read_only: false,
    };
    Message::Reply { cookie, reply }
}

/// A listening agent serving `disk` from memory (reads compressed through the session's
/// compressor, as diskferry-client does); `compression` is what it offers.
async fn memory_agent(server: &StaticKey, disk: Arc<Mutex<Vec<u8>>>, compression: u8) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut opts = SessionOptions::agent(StaticKey::generate(), server.public());
    opts.compression = compression;
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let session = respond(&mut stream, &opts).await.unwrap();
        let (r, w) = tokio::io::split(stream);
        let (mut reader, mut writer) = split(session, r, w);
        while let Ok(Some(Message::Request { cookie, request })) = reader.next().await {
            match request {
                Request::Open { .. } => {
                    let size = disk.lock().unwrap().len() as u64;
                    writer.queue(&opened(cookie, size)).unwrap();
                }
                Request::Read { offset, len, .. } => {
                    let mut buf = data_reply_buffer(len as usize);
                    let at = offset as usize;
                    buf[DATA_HEADROOM..]
                        .copy_from_slice(&disk.lock().unwrap()[at..at + len as usize]);
                    let reply = DataReply::compressed(buf, writer.compressor().as_deref());
                    writer.queue_data(cookie, reply).unwrap();
                }
                Request::Write { offset, data, .. } => {
                    let at = offset as usize;
                    disk.lock().unwrap()[at..at + data.len()].copy_from_slice(&data);
                    let done = Message::Reply {
                        cookie,
                        reply: Reply::Done,
                    };
                    writer.queue(&done).unwrap();
                }
                _ => {
                    let done = Message::Reply {
                        cookie,
                        reply: Reply::Done,
                    };
                    writer.queue(&done).unwrap();
                }
            }
            writer.flush().await.unwrap();
        }
    });
    addr
}

async fn round_trip(offered: u8) -> Option<Codec> {
    let server = StaticKey::generate();
    let image = ext4_image();
    let disk = Arc::new(Mutex::new(image.clone()));
    let addr = memory_agent(&server, Arc::clone(&disk), offered).await;
    let conn = Connection::connect(&addr, &SessionOptions::controller(server))
        .await
        .unwrap();
    let remote = conn
        .open("mem", true, RemoteOptions::default())
        .await
        .unwrap();
    let want = image.clone();
    tokio::task::spawn_blocking(move || {
        let mut got = vec![0u8; want.len()];
        remote.read_at(&mut got, 0).unwrap();
        assert!(got == want, "the image reads back byte-identical");
        // Write the image shifted by one MiB: the agent's copy must hold exactly that.
        remote
            .write_at(&want[..want.len() - (1 << 20)], 1 << 20)
            .unwrap();
        remote.flush().unwrap();
    })
    .await
    .unwrap();
    let mut expected = image.clone();
    expected.copy_within(..image.len() - (1 << 20), 1 << 20);
    assert!(
        *disk.lock().unwrap() == expected,
        "writes arrive byte-identical"
    );
    conn.compression()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_offering_lz4_gets_compressed_reads_and_writes() {
    assert_eq!(
        round_trip(diskferry_protocol::compress::SUPPORTED).await,
        Some(Codec::Lz4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_compression_works_raw() {
    assert_eq!(round_trip(0).await, None);
}

/// An agent that answers `Open`, then every read with a compressed frame claiming `claim`
/// bytes: a few KiB of LZ4 that would inflate far beyond the negotiated limit.
async fn bomb_agent(server: &StaticKey, claim: u32) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let opts = SessionOptions::agent(StaticKey::generate(), server.public());
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let session = respond(&mut stream, &opts).await.unwrap();
        let max_payload = session.max_payload;
        let (mut sealer, mut opener) = session.into_record_halves().expect("encrypted");
        let mut codec = FrameCodec::new(max_payload);
        let mut zeros = BytesMut::new();
        assert!(Codec::Lz4.compress_into(&vec![0u8; 64 << 20], &mut zeros));
        let (mut raw, mut plain) = (BytesMut::new(), BytesMut::new());
        loop {
            while let Some(record) = opener.open(&mut raw).unwrap() {
                plain.extend_from_slice(&record);
            }
            while let Some(Message::Request { cookie, request }) = codec.decode(&mut plain).unwrap()
            {
                let mut out = BytesMut::new();
                let start = sealer.begin(&mut out);
                match request {
                    Request::Open { .. } => {
                        let mut enc = FrameCodec::new(max_payload);
                        tokio_util::codec::Encoder::encode(
                            &mut enc,
                            &opened(cookie, 64 << 20),
                            &mut out,
                        )
                        .unwrap();
                    }
                    _ => {
                        out.put_u32((1 + 8 + 1 + 4 + zeros.len()) as u32);
                        out.put_u8(0x87); // DATA_Z
                        out.put_u64(cookie);
                        out.put_u8(Codec::Lz4.id());
                        out.put_u32(claim);
                        out.put_slice(&zeros);
                    }
                }
                sealer.seal(&mut out, start).unwrap();
                stream.write_all(&out).await.unwrap();
            }
            if stream.read_buf(&mut raw).await.unwrap_or(0) == 0 {
                return;
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decompression_bomb_closes_the_connection_with_the_reason() {
    let server = StaticKey::generate();
    let addr = bomb_agent(&server, 64 << 20).await;
    let conn = Connection::connect(&addr, &SessionOptions::controller(server))
        .await
        .unwrap();
    assert_eq!(conn.compression(), Some(Codec::Lz4));
    let remote = conn
        .open("mem", false, RemoteOptions::default())
        .await
        .unwrap();
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 1 << 20];
        remote.read_at(&mut buf, 0)
    });
    let got = tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the read ends: hang guard")
        .unwrap();
    assert!(
        matches!(&got, Err(BlockError::Disconnected(why)) if why.contains("decompression bomb")),
        "{got:?}"
    );
    let reason = conn.closed_reason().expect("the connection is closed");
    assert!(reason.contains("67108864"), "{reason}");
}
