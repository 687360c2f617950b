//! The attack suite (issue 14): each test performs one attack found against a loopback install
//! — with the real `diskferry serve` and `diskferry-client` binaries and a small adversarial
//! agent written for these tests ([`rogue`]) — and asserts that it now fails to get in.
//!
//! - the boot script's secrets (public server key, enrollment token) open no listening client
//!   and register no machine without approval;
//! - another machine's MACs get no job and no bytes, online or offline, with or without a
//!   token; a MAC set spanning two machines is refused;
//! - an `Opened` with a logical sector of 0 fails the job and frees the machine;
//! - a stalled peer does not hang a job: cancel ends it within 5 s;
//! - hundreds of idle connections to the agent port or a listening client leave both serving.
//!
//! The other findings' attacks live beside the code they exercise: a capture directory that
//! contains itself (`fs_loops.rs`), half-sent HTTP requests, password guessing, open redirects
//! and missing headers (`web_security.rs`), TFTP floods, spoofed sources and huge files
//! (`server/daemon/src/tftp.rs`), unread replies filling the agent
//! (`client/tests/reply_budget.rs`), two captures to one name
//! (`server/daemon/tests/capture_names.rs`), a peer that never answers
//! (`server/remote/tests/stalled_peer.rs`), a tampered handshake (`protocol/tests/session.rs`
//! and the `handshake_tamper` fuzz target).

mod rogue;

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use diskferry_e2e::http::Server;
use diskferry_e2e::{diskferry, make_key, public_key, wait_for, Client};
use diskferry_protocol::PublicKey;

use rogue::{Rogue, Script};

const MIB: u64 = 1 << 20;
const MAC_A: &str = "52:54:00:a7:7a:01";
const MAC_B: &str = "52:54:00:a7:7a:02";

/// A server whose boot endpoint works (dummy boot files) and its public key.
fn server(data: &Path) -> (Server, PublicKey) {
    std::fs::create_dir_all(data.join("boot")).unwrap();
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::write(data.join("boot").join(f), b"not really a kernel").unwrap();
    }
    let s = Server::start(data).unwrap();
    let key = PublicKey::from_hex(&public_key(&data.join("server.key"))).unwrap();
    (s, key)
}

/// What `/boot.ipxe?mac=` hands a booting machine: (server key text, token).
fn boot_secrets(s: &Server, mac: &str) -> (String, String) {
    let r = s.get(&format!("/boot.ipxe?mac={mac}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let script = r.text();
    let arg = |name: &str| {
        script
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {script}"))
            .to_string()
    };
    (arg("diskferry.serverkey="), arg("diskferry.token="))
}

fn machine(s: &Server, mac: &str) -> serde_json::Value {
    s.get("/api/machines")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["macs"].as_array().unwrap().iter().any(|x| x == mac))
        .cloned()
        .unwrap_or_default()
}

fn online(s: &Server, mac: &str) -> bool {
    machine(s, mac)["online"] == true
}

fn approve(s: &Server, mac: &str) {
    let r = s.api("POST", &format!("/api/machines/{mac}/approve"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A small raw capture, to deploy: an MBR disk of 2 MiB with one 1 MiB partition of patterned
/// bytes, put in the data directory before the server starts (which registers it).
fn capture(data: &Path) -> &'static str {
    std::fs::create_dir_all(data.join("captures")).unwrap();
    let path = data.join("captures/secret.img");
    let mut bytes = vec![0u8; 2 * MIB as usize];
    for (i, b) in bytes[MIB as usize..].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(&path, bytes).unwrap();
    diskferry_e2e::sh(&format!(
        "printf 'label: dos\\nstart=2048, size=2048, type=83\\n' | sfdisk --quiet {}",
        path.display()
    ));
    "secret.img"
}

fn start_job(s: &Server, job: serde_json::Value) -> diskferry_web::client::Response {
    s.api("POST", "/api/jobs", job.to_string().as_bytes())
}

/// Runs a job to its end; returns its record.
fn run_job(s: &Server, job: serde_json::Value) -> serde_json::Value {
    s.run_job(&job)
}

/// An approved machine played by an honest agent.
fn approved_machine(s: &Server, key: PublicKey, mac: &str, serial: &str) -> (Rogue, Script) {
    let script = Script::machine(&[mac], serial, 4 * MIB);
    let agent = Rogue::start(&s.agent_addr, key, script.clone());
    assert!(wait_for(Duration::from_secs(20), || online(s, mac)));
    assert_eq!(machine(s, mac)["pending"]["reason"], "new machine");
    approve(s, mac);
    (agent, script)
}

#[test]
fn the_boot_scripts_secrets_open_no_listening_client() {
    let data = tempfile::tempdir().unwrap();
    let (s, _) = server(data.path());
    let (server_key, _token) = boot_secrets(&s, MAC_A);
    // A listening client that trusts this server.
    let disk = data.path().join("victim.img");
    std::fs::write(&disk, vec![0x5au8; MIB as usize]).unwrap();
    let victim = Client::start(
        &data.path().join("server.key"),
        &["--allow-write", "--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    // The attacker has everything the boot network sees: the public key as a "key file", a
    // key of their own. Neither lists, reads or writes anything.
    let dir = tempfile::tempdir().unwrap();
    let as_key = dir.path().join("public-as-key");
    std::fs::write(&as_key, format!("{server_key}\n")).unwrap();
    let own = make_key(dir.path(), "own.key");
    for key in [&as_key, &own] {
        let (ok, out, err) = diskferry(&[
            "disks".as_ref(),
            victim.addr.as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
        ]);
        assert!(!ok && !out.contains("victim"), "{out}");
        assert!(err.contains("handshake"), "{err}");
        let (ok, _, _) = diskferry(&[
            "deploy".as_ref(),
            disk.as_os_str(),
            victim.source(&disk).as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
        ]);
        assert!(!ok);
    }
    assert_eq!(std::fs::read(&disk).unwrap(), vec![0x5au8; MIB as usize]);
    // The real server key still works: the client was not broken by the attempts.
    let (ok, out, err) = diskferry(&[
        "disks".as_ref(),
        victim.addr.as_ref(),
        "--key-file".as_ref(),
        data.path().join("server.key").as_os_str(),
    ]);
    assert!(ok && out.contains("victim.img"), "{out} {err}");
}

#[test]
fn a_boot_token_registers_no_machine_without_approval() {
    let data = tempfile::tempdir().unwrap();
    let image = capture(data.path());
    let (s, key) = server(data.path());
    let (_, token) = boot_secrets(&s, MAC_A);
    let mut script = Script::machine(&[MAC_A], "S-A", 4 * MIB);
    script.token = Some(token);
    let rogue = Rogue::start(&s.agent_addr, key, script);
    assert!(wait_for(Duration::from_secs(20), || online(&s, MAC_A)));
    let m = machine(&s, MAC_A);
    assert_eq!(m["approved"], false, "{m}");
    assert_eq!(m["pending"]["reason"], "new machine", "{m}");
    for job in [
        serde_json::json!({"kind": "capture", "source": MAC_A, "output": "stolen.qcow2"}),
        serde_json::json!({"kind": "deploy", "image": image, "target": MAC_A}),
    ] {
        let r = start_job(&s, job);
        assert!(
            r.status == 409 && r.text().contains("awaits approval"),
            "{} {}",
            r.status,
            r.text()
        );
    }
    let seen = rogue.seen();
    assert_eq!(
        (seen.opens, seen.reads, seen.written),
        (0, 0, 0),
        "{seen:?}"
    );
}

#[test]
fn another_machines_macs_get_no_job_and_no_bytes() {
    let data = tempfile::tempdir().unwrap();
    let image = capture(data.path());
    let (s, key) = server(data.path());
    let (real, real_disk) = approved_machine(&s, key, MAC_A, "S-A");

    // While A is online, an impostor announcing A's MAC is turned away.
    let impostor = Rogue::start(
        &s.agent_addr,
        key,
        Script::machine(&[MAC_A], "S-A", 4 * MIB),
    );
    let seen = impostor.wait_ended(Duration::from_secs(30));
    assert!(
        seen.ended.is_some(),
        "the second link was refused: {seen:?}"
    );
    // The deploy goes to A, not to the impostor.
    let job =
        serde_json::json!({"kind": "deploy", "image": image, "target": MAC_A, "mode": "sectors"});
    let j = run_job(&s, job.clone());
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(real.seen().written >= MIB, "{:?}", real.seen());
    assert_eq!(impostor.seen().written, 0);
    let sent = std::fs::read(data.path().join("captures").join(image)).unwrap();
    assert_eq!(
        &real_disk.bytes.lock().unwrap()[MIB as usize..2 * MIB as usize],
        &sent[MIB as usize..],
        "the partition's bytes reached the real machine"
    );

    // A goes offline. An impostor with A's exact identity but no token, and one with a
    // token for A's MAC but other hardware, both wait for approval and get nothing.
    drop(real);
    assert!(wait_for(Duration::from_secs(20), || !online(&s, MAC_A)));
    // A job waiting for A sends A's network boot to the environment, with a token: what an
    // impostor would race for. (A known machine with nothing to do gets no token: it is sent to
    // its own disk, fleet.rs.)
    let waiting = start_job(
        &s,
        serde_json::json!({"kind": "capture", "source": MAC_A, "output": "later.qcow2", "wake": false}),
    );
    assert_eq!(waiting.status, 201, "{}", waiting.text());
    let (_, token) = boot_secrets(&s, MAC_A);
    let mut forged = Script::machine(&[MAC_A], "OTHER", 4 * MIB);
    forged.token = Some(token);
    for (script, why) in [
        (
            Script::machine(&[MAC_A], "S-A", 4 * MIB),
            "a new agent key without an enrollment token",
        ),
        (forged, "identity changed: system UUID, serial number"),
    ] {
        let rogue = Rogue::start(&s.agent_addr, key, script);
        assert!(wait_for(Duration::from_secs(20), || online(&s, MAC_A)));
        let m = machine(&s, MAC_A);
        assert!(
            m["pending"]["reason"].as_str().unwrap().starts_with(why),
            "{m}"
        );
        let r = start_job(&s, job.clone());
        assert_eq!(r.status, 409, "{}", r.text());
        let seen = rogue.seen();
        assert_eq!((seen.opens, seen.written), (0, 0), "{seen:?}");
        drop(rogue);
        assert!(wait_for(Duration::from_secs(20), || !online(&s, MAC_A)));
    }
}

#[test]
fn a_mac_set_spanning_two_machines_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let (s, key) = server(data.path());
    let (_a, _) = approved_machine(&s, key, MAC_A, "S-A");
    let (_b, _) = approved_machine(&s, key, MAC_B, "S-B");
    let both = Rogue::start(
        &s.agent_addr,
        key,
        Script::machine(&[MAC_A, MAC_B], "S-A", 4 * MIB),
    );
    let seen = both.wait_ended(Duration::from_secs(30));
    assert!(seen.ended.is_some(), "{seen:?}");
    assert_eq!(machine(&s, MAC_A)["macs"], serde_json::json!([MAC_A]));
    assert_eq!(machine(&s, MAC_B)["macs"], serde_json::json!([MAC_B]));
    assert_eq!(s.get("/api/machines").json().as_array().unwrap().len(), 2);
}

#[test]
fn a_sector_size_of_zero_fails_the_job_and_frees_the_machine() {
    let data = tempfile::tempdir().unwrap();
    let (s, key) = server(data.path());
    let mut script = Script::machine(&[MAC_A], "S-A", 4 * MIB);
    script.logical_sector = 0;
    let _agent = Rogue::start(&s.agent_addr, key, script);
    assert!(wait_for(Duration::from_secs(20), || online(&s, MAC_A)));
    approve(&s, MAC_A);
    let before = machine(&s, MAC_A)["state"].clone();
    let j = run_job(
        &s,
        serde_json::json!({"kind": "capture", "source": MAC_A, "output": "zero.qcow2"}),
    );
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("logical sector"),
        "{j}"
    );
    assert_eq!(
        machine(&s, MAC_A)["state"],
        before,
        "the machine is free again"
    );
    assert!(!data.path().join("captures/zero.qcow2").exists());
}

#[test]
fn cancel_ends_a_job_stalled_by_its_peer_within_5_s() {
    let data = tempfile::tempdir().unwrap();
    let (s, key) = server(data.path());
    let mut script = Script::machine(&[MAC_A], "S-A", 64 * MIB);
    script.stall_reads = true;
    let agent = Rogue::start(&s.agent_addr, key, script);
    assert!(wait_for(Duration::from_secs(20), || online(&s, MAC_A)));
    approve(&s, MAC_A);
    let r = start_job(
        &s,
        serde_json::json!({"kind": "capture", "source": MAC_A, "output": "stalled.qcow2", "mode": "sectors"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    assert!(wait_for(Duration::from_secs(20), || agent.seen().reads > 0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.get(&format!("/api/jobs/{id}")).json()["state"], "running");
    let asked = Instant::now();
    let r = s.api("POST", &format!("/api/jobs/{id}/cancel"), b"");
    assert!(r.status < 300, "{}", r.text());
    let ended = wait_for(Duration::from_secs(5), || {
        s.get(&format!("/api/jobs/{id}")).json()["state"] == "cancelled"
    });
    assert!(
        ended,
        "still {} after {:?}",
        s.get(&format!("/api/jobs/{id}")).json(),
        asked.elapsed()
    );
    eprintln!("cancelled {:?} after asking", asked.elapsed());
    assert_ne!(machine(&s, MAC_A)["state"], "transitioning");
}

/// How many file descriptors a process has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn hundreds_of_idle_connections_leave_the_agent_port_and_the_client_serving() {
    let data = tempfile::tempdir().unwrap();
    let (s, key) = server(data.path());
    let disk = data.path().join("d.img");
    std::fs::write(&disk, vec![1u8; MIB as usize]).unwrap();
    let client = Client::start(
        &data.path().join("server.key"),
        &["--disk", disk.to_str().unwrap()],
    )
    .unwrap();
    let idle: Vec<TcpStream> = (0..500)
        .flat_map(|i| {
            let to = if i % 2 == 0 {
                &s.agent_addr
            } else {
                &client.addr
            };
            TcpStream::connect(to).ok()
        })
        .collect();
    eprintln!("{} idle connections open", idle.len());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.get("/login").status, 200, "the UI answers");
    let fds = open_fds(client.child.id());
    eprintln!("client holds {fds} descriptors with 250 strangers knocking");
    assert!(fds < 100, "the client turned the strangers away: {fds} fds");
    drop(idle);
    // Both still serve the real parties.
    let honest = Rogue::start(
        &s.agent_addr,
        key,
        Script::machine(&[MAC_A], "S-A", 4 * MIB),
    );
    assert!(wait_for(Duration::from_secs(30), || online(&s, MAC_A)));
    assert!(honest.seen().authenticated);
    let (ok, out, err) = diskferry(&[
        "disks".as_ref(),
        client.addr.as_ref(),
        "--key-file".as_ref(),
        data.path().join("server.key").as_os_str(),
    ]);
    assert!(ok && out.contains("d.img"), "{out} {err}");
}
