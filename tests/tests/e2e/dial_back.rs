//! Dial-back agents against a real `diskferry serve`: a `diskferry-client --connect` enrolls
//! its machine by MAC address with the hardware it announces and waits for approval (jobs are
//! refused until then); the CLI lists, approves and names it; a capture job reads its disk by
//! the machine's name and a deploy job writes another of its disks; power requests are refused
//! unless the agent allows them; the agent comes back on its own after it restarts (its key
//! kept in a file) and after the server restarts; a changed identity waits for approval again.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diskferry_e2e::fixtures::SampleDisk;
use diskferry_e2e::http::Server;
use diskferry_e2e::{bin, diskferry, public_key, run_ok, wait_for};

/// A dial-back client, killed when dropped.
struct Agent {
    child: Child,
    _sysfs: tempfile::TempDir,
}

impl Agent {
    /// An agent of the server whose data directory is `data`, keeping its own key there. It
    /// announces this host's MACs but no firmware or PCI devices (its sysfs holds only
    /// `class`), so a deploy's compatibility check has nothing to refuse on: the images here
    /// are not made for this host's firmware.
    fn start(server: &str, data: &std::path::Path, disks: &[&std::path::Path]) -> Agent {
        let sysfs = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/sys/class", sysfs.path().join("class")).unwrap();
        let mut cmd = Command::new(bin("diskferry-client"));
        cmd.env("DISKFERRY_SYSFS", sysfs.path());
        cmd.args(["--connect", server, "--allow-write", "--server-key"])
            .arg(public_key(&data.join("server.key")))
            .arg("--agent-key")
            .arg(data.join("test-agent.key"));
        for d in disks {
            cmd.arg("--disk").arg(d);
        }
        Agent {
            child: cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
            _sysfs: sysfs,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This host's MAC addresses as the client reports them.
fn host_macs() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| std::fs::read_to_string(e.path().join("address")).ok())
        .map(|m| m.trim().to_ascii_lowercase())
        .filter(|m| m.len() == 17 && m != "00:00:00:00:00:00")
        .collect();
    out.sort();
    out.dedup();
    out
}

fn machines(s: &Server) -> Vec<serde_json::Value> {
    s.get("/api/machines").json().as_array().unwrap().clone()
}

fn online(s: &Server) -> bool {
    machines(s).first().is_some_and(|m| m["online"] == true)
}

/// Approves the first machine through the CLI, as an administrator would.
fn approve(data: &std::path::Path, machine: &str) {
    let dd = ["--data-dir".as_ref(), data.as_os_str()];
    let (ok, out, err) = diskferry(
        &[
            &["machine".as_ref(), "approve".as_ref(), machine.as_ref()][..],
            &dd,
        ]
        .concat(),
    );
    assert!(ok && out.contains("approved"), "{out} {err}");
}

#[test]
fn a_dialling_agent_registers_is_captured_by_name_and_comes_back() {
    let macs = host_macs();
    assert!(
        !macs.is_empty(),
        "this test needs a network interface with a MAC address"
    );
    let disk = SampleDisk::build();
    let data = tempfile::tempdir().unwrap();
    // A fixed agent port, so the agent finds the server again after it restarts.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent_listen = format!("127.0.0.1:{port}");
    let mut s = Server::start_with_agent_port(data.path(), &agent_listen).unwrap();
    assert_eq!(s.agent_addr, agent_listen);
    let agent = Agent::start(&s.agent_addr, data.path(), &[&disk.gpt]);
    assert!(
        wait_for(Duration::from_secs(20), || online(&s)),
        "the agent registered"
    );

    let m = &machines(&s)[0];
    assert_eq!(m["state"], "unregistered");
    assert_eq!(m["approved"], false);
    assert_eq!(m["pending"]["reason"], "new machine", "{m}");
    // Until an administrator approves it, no job may use it.
    let job = serde_json::json!({"kind": "capture", "source": macs[0], "output": "early.vhdx"});
    let r = s.api("POST", "/api/jobs", job.to_string().as_bytes());
    assert!(
        r.status == 409 && r.text().contains("awaits approval"),
        "{} {}",
        r.status,
        r.text()
    );
    assert_eq!(m["macs"], serde_json::json!(macs));
    let d = &m["identity"]["disks"][0];
    assert_eq!(d["name"], disk.gpt.to_str().unwrap());
    assert_eq!(d["size"], std::fs::metadata(&disk.gpt).unwrap().len());
    assert!(m["identity"]["cpus"].as_u64().unwrap() >= 1);
    assert!(m["identity"]["memory"].as_u64().unwrap() > 0);

    // The CLI, through the running server.
    let dd = ["--data-dir".as_ref(), data.path().as_os_str()];
    let (ok, out, err) = diskferry(&[&["machines".as_ref()][..], &dd].concat());
    assert!(ok, "{err}");
    assert!(
        out.contains(&macs[0])
            && out.contains("unregistered (online), awaits approval: new machine"),
        "{out}"
    );
    approve(data.path(), &macs[0]);
    let (ok, _, err) = diskferry(
        &[
            &[
                "machine".as_ref(),
                "register".as_ref(),
                macs[0].to_uppercase().as_ref(),
                "web-01".as_ref(),
            ][..],
            &dd,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let (ok, out, _) = diskferry(&[&["machines".as_ref()][..], &dd].concat());
    assert!(
        ok && out.contains("web-01") && out.contains("dormant"),
        "{out}"
    );
    let (ok, _, err) = diskferry(
        &[
            &["machine".as_ref(), "reboot".as_ref(), "web-01".as_ref()][..],
            &dd,
        ]
        .concat(),
    );
    assert!(
        !ok && err.contains("--allow-power"),
        "power is refused: {err}"
    );
    let (ok, _, err) = diskferry(
        &[
            &[
                "machine".as_ref(),
                "rename".as_ref(),
                "nobody".as_ref(),
                "x".as_ref(),
            ][..],
            &dd,
        ]
        .concat(),
    );
    assert!(!ok && err.contains("no machine"), "{err}");

    // Capture it by name (its only disk).
    let job = serde_json::json!({
        "kind": "capture", "source": "web-01", "output": "web-01.vhdx", "verify": true,
    });
    let r = s.api("POST", "/api/jobs", job.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let events = s.get(&format!("/api/jobs/{id}/events")).text();
    let j = s.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(j["state"], "succeeded", "{j} {events}");
    assert!(
        j["log"].as_str().unwrap().contains("on machine web-01"),
        "{j}"
    );
    assert!(j["log"].as_str().unwrap().contains("no differences"), "{j}");
    run_ok(
        "qemu-img",
        &[
            "check",
            data.path().join("captures/web-01.vhdx").to_str().unwrap(),
        ],
    );
    let caps = s.get("/api/captures").json();
    assert_eq!(caps[0]["source_machine"], "web-01");
    assert_eq!(
        machines(&s)[0]["state"],
        "dormant",
        "back from transitioning"
    );
    // The machines page offers it a deploy of the captures.
    let page = s.get("/machines").text();
    assert!(
        page.contains("web-01")
            && page.contains(r#"value="deploy""#)
            && page.contains("web-01.vhdx"),
        "{page}"
    );
    // The CLI does the same through the server.
    let (ok, _, err) = diskferry(
        &[
            &["capture".as_ref(), "web-01".as_ref(), "cli.qcow2".as_ref()][..],
            &dd,
        ]
        .concat(),
    );
    assert!(
        ok && err.contains("into the server's captures as cli.qcow2"),
        "{err}"
    );
    assert!(data.path().join("captures/cli.qcow2").exists());
    // A disk it does not have, and an unknown machine, are clear errors.
    let bad =
        serde_json::json!({"kind": "capture", "source": "/dev/nope@web-01", "output": "x.vhdx"});
    let r = s.api("POST", "/api/jobs", bad.to_string().as_bytes());
    assert!(
        r.status == 400 && r.text().contains(disk.gpt.to_str().unwrap()),
        "{}",
        r.text()
    );

    // The agent restarts: same machine, online again.
    drop(agent);
    assert!(
        wait_for(Duration::from_secs(10), || !online(&s)),
        "went offline"
    );
    // It comes back with a second, blank disk (the same size) to deploy onto.
    let blank = disk.dir.join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(std::fs::metadata(&disk.gpt).unwrap().len())
        .unwrap();
    let _agent = Agent::start(&s.agent_addr, data.path(), &[&disk.gpt, &blank]);
    assert!(wait_for(Duration::from_secs(20), || online(&s)));
    assert_eq!(machines(&s).len(), 1, "matched by MAC, not added twice");
    // A new disk is a changed identity: approval again.
    let m = &machines(&s)[0];
    assert_eq!(m["pending"]["reason"], "identity changed: disks", "{m}");
    approve(data.path(), "web-01");

    // Two disks now: a bare machine name is ambiguous; deploy names the disk.
    let r = s.api(
        "POST",
        "/api/jobs",
        br#"{"kind":"capture","source":"web-01","output":"again.vhdx"}"#,
    );
    assert!(
        r.status == 400 && r.text().contains("2 disks"),
        "{}",
        r.text()
    );
    let job = serde_json::json!({
        "kind": "deploy", "image": "web-01.vhdx",
        "target": format!("{}@web-01", blank.display()),
    });
    let j = s.run_job(&job);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["log"].as_str().unwrap().contains("no differences"), "{j}");
    assert_eq!(machines(&s)[0]["state"], "deployed");
    let (ok, _, err) = diskferry(&["verify".as_ref(), disk.gpt.as_os_str(), blank.as_os_str()]);
    assert!(ok, "the deployed disk matches the source: {err}");

    // The server restarts: the registry persists and the agent dials back by itself.
    s.kill();
    let s = Server::start_with_agent_port(data.path(), &agent_listen).unwrap();
    assert!(
        wait_for(Duration::from_secs(40), || online(&s)),
        "the agent came back"
    );
    let m = &machines(&s)[0];
    assert_eq!(
        (m["name"].as_str(), m["state"].as_str()),
        (Some("web-01"), Some("deployed"))
    );
}

#[test]
fn a_capture_from_a_machine_survives_its_agent_restarting() {
    assert!(
        !host_macs().is_empty(),
        "this test needs a network interface with a MAC address"
    );
    let data = tempfile::tempdir().unwrap();
    let disk = data.path().join("disk.img");
    // 1.5 GiB of data so the capture is still running when the agent goes.
    diskferry_e2e::make_disk(&disk, 2 << 30, &[(0, 1536 << 20)]).unwrap();
    let s = Server::start(data.path()).unwrap();
    let agent = Agent::start(&s.agent_addr, data.path(), &[&disk]);
    assert!(wait_for(Duration::from_secs(20), || online(&s)));
    let mac = machines(&s)[0]["macs"][0].as_str().unwrap().to_string();
    approve(data.path(), &mac);
    let job = serde_json::json!({
        "kind": "capture", "source": mac, "output": "big.qcow2", "mode": "sectors", "verify": true,
    });
    let r = s.api("POST", "/api/jobs", job.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let now = s.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(
        now["state"], "running",
        "the agent goes while the capture runs: {now}"
    );
    drop(agent);
    std::thread::sleep(Duration::from_millis(700));
    let _again = Agent::start(&s.agent_addr, data.path(), &[&disk]);
    let _ = s.get(&format!("/api/jobs/{id}/events"));
    let j = s.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(j["state"], "succeeded", "{j}");
    let log = j["log"].as_str().unwrap();
    assert!(log.contains("no differences"), "{j}");
    // The job's own log tells of the lost link and the reconnection (events of its span).
    assert!(
        log.contains("warning: lost ") && log.contains("reconnected to"),
        "the job's log records the reconnect: {log}"
    );
    let (ok, _, err) = diskferry(&[
        "verify".as_ref(),
        disk.as_os_str(),
        data.path().join("captures/big.qcow2").as_os_str(),
    ]);
    assert!(ok, "{err}");
}

#[test]
fn a_connected_machines_disk_is_exported_read_only_over_nbd() {
    assert!(
        !host_macs().is_empty(),
        "this test needs a network interface with a MAC address"
    );
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (data.path().join("a.img"), data.path().join("b.img"));
    diskferry_e2e::make_disk(&a, 64 << 20, &[(0, 3 << 20), (40 << 20, 1 << 20)]).unwrap();
    diskferry_e2e::make_disk(&b, 32 << 20, &[(1 << 20, 2 << 20)]).unwrap();
    let s = Server::start(data.path()).unwrap();
    let nbd = s.nbd_addr.clone().expect("the server exports over NBD");
    let _agent = Agent::start(&s.agent_addr, data.path(), &[&a, &b]);
    assert!(wait_for(Duration::from_secs(20), || online(&s)));
    let mac = machines(&s)[0]["macs"][0].as_str().unwrap().to_string();
    let export = format!("{}@{mac}", a.display());
    let url = format!("nbd://{nbd}/{export}");
    // Not approved yet: nothing is listed or served.
    assert_eq!(machines(&s)[0]["nbd"], serde_json::json!([]));
    let refused = Command::new("nbdinfo").arg(&url).output().unwrap();
    assert!(
        !refused.status.success(),
        "an unapproved machine's disk is not served"
    );

    approve(data.path(), &mac);
    let m = s.get(&format!("/api/machines/{mac}")).json();
    assert_eq!(m["nbd"][0]["url"], url.as_str(), "{m}");
    assert_eq!(m["nbd"][1]["disk"], b.to_str().unwrap(), "{m}");
    let listed = run_ok("nbdinfo", &["--list", &format!("nbd://{nbd}")]);
    assert!(listed.contains(&export), "{listed}");
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &url,
            a.to_str().unwrap(),
        ],
    );
    let before = std::fs::read(&a).unwrap();
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4096", &url])
        .output()
        .unwrap();
    assert!(!write.status.success(), "the live disk is read-only");
    assert_eq!(std::fs::read(&a).unwrap(), before);

    // The CLI says where: the URL of the named disk; a machine of two disks needs the name.
    let dd = ["--data-dir".as_ref(), data.path().as_os_str()];
    let (ok, out, err) = diskferry(&[&["export".as_ref(), export.as_ref()][..], &dd].concat());
    assert!(ok && out.trim() == url, "{out} {err}");
    let (ok, _, err) = diskferry(&[&["export".as_ref(), mac.as_ref()][..], &dd].concat());
    assert!(!ok && err.contains("has 2 disks"), "{err}");

    // A name that is not a machine must not make the server dial out, even to a listening
    // client that would serve it.
    let key = data.path().join("server.key");
    let client = diskferry_e2e::Client::start(&key, &["--disk", a.to_str().unwrap()]).unwrap();
    let dial = format!("nbd://{nbd}/{}", client.source(&a));
    let refused = Command::new("nbdinfo").arg(&dial).output().unwrap();
    assert!(!refused.status.success(), "{dial} was served");
}

#[test]
fn deploy_and_capture_jobs_customize_with_the_machines_own_name() {
    assert!(
        !host_macs().is_empty(),
        "this test needs a network interface with a MAC address"
    );
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let golden = crate::customize::linux_disk(d);
    let caps = d.join("captures");
    std::fs::create_dir_all(&caps).unwrap();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            golden.to_str().unwrap(),
            caps.join("golden.qcow2").to_str().unwrap(),
        ],
    );
    let target = d.join("target.raw");
    std::fs::write(&target, vec![0u8; 72 << 20]).unwrap();
    let s = Server::start(d).unwrap();
    let _agent = Agent::start(&s.agent_addr, d, &[&target]);
    assert!(wait_for(Duration::from_secs(20), || online(&s)));
    let mac = machines(&s)[0]["macs"][0].as_str().unwrap().to_string();
    approve(d, &mac);
    let dd = ["--data-dir".as_ref(), d.as_os_str()];
    let register = [
        &[
            "machine".as_ref(),
            "register".as_ref(),
            mac.as_ref(),
            "web-09".as_ref(),
        ][..],
        &dd,
    ]
    .concat();
    let (ok, _, err) = diskferry(&register);
    assert!(ok, "{err}");

    // A bad SPEC is refused before the job starts, naming the key.
    let bad = serde_json::json!({
        "kind": "deploy", "image": "golden.qcow2", "target": "web-09", "customize": "hostnme = 1",
    });
    let r = s.api("POST", "/api/jobs", bad.to_string().as_bytes());
    assert!(
        r.status == 400 && r.text().contains("hostnme"),
        "{} {}",
        r.status,
        r.text()
    );

    let bad = serde_json::json!({
        "kind": "deploy", "image": "golden.qcow2", "target": "web-09", "target_hardware": "sparc",
    });
    let r = s.api("POST", "/api/jobs", bad.to_string().as_bytes());
    assert!(
        r.status == 400 && r.text().contains("target_hardware"),
        "{}",
        r.text()
    );

    let spec = "hostname = \"{name}\"\nmachine_id = \"new\"\n";
    let job = serde_json::json!({
        "kind": "deploy", "image": "golden.qcow2", "target": "web-09", "customize": spec,
        "target_hardware": "virtio",
    });
    let j = s.run_job(&job);
    assert_eq!(j["state"], "succeeded", "{j}");
    let log = j["log"].as_str().unwrap();
    assert!(
        log.contains("hostname: fixture-host → web-09") && log.contains("no differences"),
        "{log}"
    );
    // Reconfiguration ran too: this tree has no kernel to give drivers to, and says so.
    assert!(
        log.contains("no kernel with an initramfs under /boot"),
        "{log}"
    );
    let root = crate::customize::root_of(&target, d, "web-09");
    assert_eq!(crate::customize::cat(&root, "/etc/hostname"), "web-09\n");

    // A capture job customizes too: the machine's disk is read as it is, the capture holds
    // the edits.
    let job = serde_json::json!({
        "kind": "capture", "source": "web-09", "output": "copy.qcow2",
        "customize": "hostname = \"{name}-copy\"\n", "verify": true,
    });
    let j = s.run_job(&job);
    assert_eq!(j["state"], "succeeded", "{j}");
    let raw = d.join("copy.raw");
    let copy = caps.join("copy.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            copy.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let root = crate::customize::root_of(&raw, d, "copy");
    assert_eq!(
        crate::customize::cat(&root, "/etc/hostname"),
        "web-09-copy\n"
    );
    assert_eq!(
        crate::customize::cat(
            &crate::customize::root_of(&target, d, "again"),
            "/etc/hostname"
        ),
        "web-09\n"
    );
}
