//! The wire end to end: real `diskferry-client` processes serving generated disks on loopback,
//! the real `diskferry` binary capturing them.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_e2e::{
    allocated, assert_qcow2_clean_and_equal, assert_same_bytes, diskferry, make_disk, make_key,
    wait_for, Client,
};
use diskferry_protocol::{ErrorCode, SessionOptions, StaticKey};
use diskferry_remote::{Connection, RemoteOptions};

const MIB: u64 = 1 << 20;

fn capture(src: &str, out: &Path, key: &Path, extra: &[&str]) -> (bool, String) {
    let mut args: Vec<&OsStr> = vec![
        "capture".as_ref(),
        src.as_ref(),
        out.as_os_str(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let (ok, _, stderr) = diskferry(&args);
    (ok, stderr)
}

#[test]
fn encrypted_capture_of_a_sparse_disk_is_byte_identical_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    // 384 MiB with data at the start, in the middle, odd-sized, and in the very last sector.
    let layout = [
        (0, 3 * MIB),
        (100 * MIB, 150 * MIB + 4096 * 3),
        (300 * MIB + 512, 7 * 4096),
        (384 * MIB - 512, 512),
    ];
    make_disk(&disk, 384 * MIB, &layout).unwrap();
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();

    let out = dir.path().join("copy.raw");
    let (ok, stderr) = capture(&client.source(&disk), &out, &key, &[]);
    assert!(ok, "capture failed: {stderr}");
    assert_same_bytes(&disk, &out);
    let data: u64 = layout.iter().map(|l| l.1).sum();
    assert!(
        allocated(&out) <= data + 2 * MIB,
        "output should hold about the data only: {} allocated",
        allocated(&out)
    );
    assert!(
        stderr.contains("skipped as zero"),
        "the summary reports what was skipped: {stderr}"
    );
    assert!(!dir.path().join("copy.raw.partial").exists());
    client.stop();
}

#[test]
fn plaintext_capture_needs_both_sides_and_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 64 * MIB, &[(MIB, 40 * MIB)]).unwrap();
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap(), "--plaintext"]).unwrap();
    let out = dir.path().join("copy.raw");
    let (ok, stderr) = capture(&client.source(&disk), &out, &key, &["--plaintext"]);
    assert!(ok, "capture failed: {stderr}");
    assert_same_bytes(&disk, &out);
}

#[test]
fn wrong_key_is_a_clear_error_with_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let other = make_key(dir.path(), "other");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 8 * MIB, &[(0, MIB)]).unwrap();
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();

    let out = dir.path().join("copy.raw");
    let (ok, stderr) = capture(&client.source(&disk), &out, &other, &[]);
    assert!(!ok, "a capture with the wrong key must fail");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert!(
        stderr.contains("--key-file"),
        "the error says what to check: {stderr}"
    );
    assert!(
        !out.exists() && !dir.path().join("copy.raw.partial").exists(),
        "no output of any kind"
    );

    let (ok, stdout, stderr) = diskferry(&[
        "disks".as_ref(),
        client.addr.as_ref(),
        "--key-file".as_ref(),
        other.as_os_str(),
    ]);
    assert!(
        !ok && stdout.is_empty(),
        "the disk list is not revealed: {stdout}"
    );
    assert!(stderr.contains("authentication failed"), "{stderr}");
    let log = client.stop();
    assert!(
        log.contains("authentication failed"),
        "the client logs the refusal: {log}"
    );
}

#[test]
fn disks_lists_what_the_client_serves() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    make_disk(&a, 10 * MIB, &[]).unwrap();
    make_disk(&b, 3 * MIB + 512, &[]).unwrap();
    let client = Client::start(
        &key,
        &["--disk", a.to_str().unwrap(), "--disk", b.to_str().unwrap()],
    )
    .unwrap();
    let (ok, stdout, stderr) = diskferry(&[
        "disks".as_ref(),
        client.addr.as_ref(),
        "--key-file".as_ref(),
        key.as_os_str(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(a.to_str().unwrap()) && stdout.contains("10.0 MiB"),
        "{stdout}"
    );
    assert!(
        stdout.contains(b.to_str().unwrap()) && stdout.contains("3.0 MiB"),
        "{stdout}"
    );
    assert!(
        stdout.lines().skip(1).all(|l| l.ends_with("ro")),
        "a client without --allow-write is read-only: {stdout}"
    );
}

fn session(key: &Path) -> SessionOptions {
    SessionOptions::controller(StaticKey::from_file(key).unwrap())
}

#[test]
fn read_only_client_refuses_writes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 4 * MIB, &[(0, 4 * MIB)]).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt
        .block_on(Connection::connect(&client.addr, &session(&key)))
        .unwrap();
    let name = disk.to_str().unwrap();
    match rt.block_on(conn.open(name, true, RemoteOptions::default())) {
        Err(BlockError::Remote {
            code: ErrorCode::ReadOnly,
            message,
            ..
        }) => assert!(message.contains("--allow-write"), "{message}"),
        other => panic!("opening for write must be refused, got {other:?}"),
    }
    let ro = rt
        .block_on(conn.open(name, false, RemoteOptions::default()))
        .unwrap();
    assert!(ro.is_read_only());
    assert!(matches!(
        ro.write_at(&[1u8; 4096], 0),
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(ro.discard(0, 4096), Err(BlockError::ReadOnly)));
    drop(ro);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "the disk is unchanged"
    );
}

#[test]
fn writable_client_applies_writes_and_discards() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 16 * MIB, &[(0, 16 * MIB)]).unwrap();
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap(), "--allow-write"]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt
        .block_on(Connection::connect(&client.addr, &session(&key)))
        .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(
        rt.block_on(conn.open(disk.to_str().unwrap(), true, RemoteOptions::default()))
            .unwrap(),
    );

    // Read through the cache first, so the write must invalidate it.
    let mut buf = vec![0u8; 8192];
    dev.read_at(&mut buf, 5 * MIB).unwrap();
    let payload: Vec<u8> = (0..(5 * MIB) as usize).map(|i| (i % 249) as u8).collect();
    dev.write_at(&payload, 3 * MIB + 7).unwrap();
    dev.discard(12 * MIB, MIB).unwrap();
    dev.flush().unwrap();
    let mut back = vec![0u8; payload.len()];
    dev.read_at(&mut back, 3 * MIB + 7).unwrap();
    assert!(back == payload, "reads after a write see the write");
    let on_disk = std::fs::read(&disk).unwrap();
    assert!(on_disk[(3 * MIB + 7) as usize..][..payload.len()] == payload[..]);
    assert!(
        on_disk[(12 * MIB) as usize..(13 * MIB) as usize]
            .iter()
            .all(|&b| b == 0),
        "discarded range reads as zeros"
    );
    assert!(matches!(
        dev.read_at(&mut buf, 16 * MIB - 100),
        Err(BlockError::OutOfRange { .. })
    ));
}

/// A client that dies and stays away: after the reconnect window (2 s here) the capture fails
/// with the cause and leaves only `OUT.partial`.
#[test]
fn killed_client_mid_capture_is_a_clear_error_and_leaves_no_complete_output() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 1024 * MIB, &[(0, 1024 * MIB)]).unwrap();
    let mut client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let out = dir.path().join("copy.raw");
    let partial = dir.path().join("copy.raw.partial");

    let capture = std::process::Command::new(diskferry_e2e::bin("diskferry"))
        .args(["capture", &client.source(&disk)])
        .arg(&out)
        .arg("--key-file")
        .arg(&key)
        .args(["--reconnect-for", "2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || partial.exists()
            && allocated(&partial) > 0),
        "capture never started writing"
    );
    client.child.kill().unwrap();
    let output = capture.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the capture must fail when the client dies"
    );
    assert!(
        stderr.contains("connection")
            && stderr.contains("gave up reconnecting after 2 s")
            && stderr.contains(".partial"),
        "the error names the cause and the leftover: {stderr}"
    );
    assert!(!out.exists(), "nothing may look complete");
}

#[test]
fn one_client_serves_several_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 96 * MIB, &[(0, 90 * MIB)]).unwrap();
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let src = client.source(&disk);
    let outs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("copy{i}.raw")))
        .collect();
    std::thread::scope(|s| {
        for out in &outs {
            let (src, key) = (&src, &key);
            s.spawn(move || {
                let (ok, stderr) = capture(src, out, key, &[]);
                assert!(ok, "{stderr}");
            });
        }
    });
    for out in &outs {
        assert_same_bytes(&disk, out);
    }
}

#[test]
fn client_exits_cleanly_on_sigterm_and_explains_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let mut client = Client::start(&key, &["--disk", "/nonexistent-disk"]).unwrap();
    let pid = client.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = client.child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the client cleanly: {status:?}"
    );

    let out = std::process::Command::new(diskferry_e2e::bin("diskferry-client"))
        .arg("--listen")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen needs a value"));
}

#[test]
fn the_keys_can_come_from_the_environment_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    make_disk(&disk, 4 * MIB, &[]).unwrap();
    let mut child = std::process::Command::new(diskferry_e2e::bin("diskferry-client"))
        .args(["--listen", "127.0.0.1:0", "--disk", disk.to_str().unwrap()])
        .env("DISKFERRY_SERVER_KEY", diskferry_e2e::public_key(&key))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    let out = std::process::Command::new(diskferry_e2e::bin("diskferry"))
        .args(["disks", &addr])
        .env("DISKFERRY_KEY_FILE", &key)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(disk.to_str().unwrap()));
}

#[test]
fn capture_into_qcow2_passes_qemu_img_check_and_compares_equal() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("disk.img");
    let layout = [(0, MIB), (40 * MIB + 512, 30 * MIB), (127 * MIB, MIB)];
    make_disk(&disk, 128 * MIB, &layout).unwrap();
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();
    let out = dir.path().join("copy.qcow2");
    let (ok, stderr) = capture(&client.source(&disk), &out, &key, &[]);
    assert!(ok, "capture failed: {stderr}");
    assert!(
        stderr.contains("(qcow2)"),
        "the format follows the extension: {stderr}"
    );

    assert_qcow2_clean_and_equal(&out, &disk);
    // Compact: about the data plus the format's metadata.
    let data: u64 = layout.iter().map(|l| l.1).sum();
    let size = std::fs::metadata(&out).unwrap().len();
    assert!(
        size <= data + data / 20 + 2 * MIB,
        "qcow2 of {size} bytes for {data} bytes of data"
    );
}

#[test]
fn capture_of_an_ext4_disk_negotiates_lz4_and_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "key");
    let disk = dir.path().join("ext4.img");
    let made = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d", "/usr/share/common-licenses"])
        .arg(&disk)
        .arg("48M")
        .output()
        .unwrap();
    assert!(made.status.success(), "mke2fs: {made:?}");
    let client = Client::start(&key, &["--disk", disk.to_str().unwrap()]).unwrap();

    // The real client and the server's connection settle on LZ4.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt
        .block_on(Connection::connect(&client.addr, &session(&key)))
        .unwrap();
    assert_eq!(
        conn.compression(),
        Some(diskferry_protocol::compress::Codec::Lz4)
    );
    drop(conn);

    let out = dir.path().join("copy.raw");
    let (ok, stderr) = capture(&client.source(&disk), &out, &key, &[]);
    assert!(ok, "capture failed: {stderr}");
    assert_same_bytes(&disk, &out);
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&out)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck -fn on the copy: {fsck:?}");
    client.stop();
}
