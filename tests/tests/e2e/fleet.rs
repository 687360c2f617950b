//! Fleet imaging: what a machine booting from the network is sent to by its state, machines
//! registered before they boot, jobs that wait for their machine (woken by a magic packet) or
//! their time, and schedules — through the API, the CLI, a listener in its own network
//! namespace and a VM under TCG whose first boot device is the network.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diskferry_e2e::http::Server;
use diskferry_e2e::pxe::{bootable_disk, bootenv, server_for_vms, Vm, MARKER};
use diskferry_e2e::{diskferry, run_ok, sh, wait_for};

/// `/boot.ipxe?mac=MAC`, as iPXE asks it.
fn boot_script(s: &Server, mac: &str) -> String {
    let r = s.get(&format!("/boot.ipxe?mac={mac}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

fn boots_environment(script: &str) -> bool {
    script.contains("kernel http://") && script.contains("diskferry.token=")
}

fn boots_local_disk(script: &str) -> bool {
    !script.contains("kernel") && script.contains("booting from its local disk")
}

/// A data directory with boot files (their content does not matter to the scripts) and an
/// empty 16 MiB capture to deploy.
fn data_dir(w: &Path) -> std::path::PathBuf {
    let data = w.join("data");
    std::fs::create_dir_all(data.join("boot")).unwrap();
    std::fs::create_dir_all(data.join("captures")).unwrap();
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::write(data.join("boot").join(f), b"not a kernel").unwrap();
    }
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            data.join("captures/os.qcow2").to_str().unwrap(),
            "16M",
        ],
    );
    data
}

fn post(s: &Server, path: &str, body: serde_json::Value) -> diskferry_e2e::http::Response {
    s.api("POST", path, body.to_string().as_bytes())
}

use diskferry_e2e::cli_with_data as cli;

#[test]
fn boot_scripts_follow_each_machines_state_and_jobs_wait_for_theirs() {
    let work = tempfile::tempdir().unwrap();
    let data = data_dir(work.path());
    let s = Server::start(&data).unwrap();
    let mac = "52:54:00:d1:5c:31";

    assert!(
        boots_environment(&boot_script(&s, mac)),
        "an unknown machine gets the boot environment"
    );
    let out = cli(
        &data,
        &[
            "machine",
            "register",
            mac,
            "lab-31",
            "--address",
            "192.0.2.31",
        ],
    );
    assert!(out.contains("first network boot is approved"), "{out}");
    let out = cli(&data, &["machine", "groups", "lab-31", "room-4", "all"]);
    assert!(out.contains("lab-31 belongs to all, room-4"), "{out}");
    let r = s.api(
        "PUT",
        "/api/machines/lab-31/groups",
        br#"{"groups": ["bad name"]}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let m = s.get("/api/machines/lab-31").json();
    assert_eq!(m["groups"], serde_json::json!(["all", "room-4"]));
    assert_eq!(m["preregistered"], true);
    assert_eq!(m["address"], "192.0.2.31");
    assert!(
        boots_local_disk(&boot_script(&s, "52-54-00-D1-5C-31")),
        "a known machine with nothing to do boots its disk"
    );

    // A deploy for it waits (it is not connected) and sends the machine to the environment.
    let r = post(
        &s,
        "/api/jobs",
        serde_json::json!({"kind": "deploy", "image": "os.qcow2", "target": "lab-31"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let job = s.get(&format!("/api/jobs/{id}")).json();
    assert_eq!(
        (job["state"].as_str(), job["waiting"].as_bool()),
        (Some("queued"), Some(true))
    );
    assert!(job["log"]
        .as_str()
        .unwrap()
        .contains("waiting for machine lab-31 to connect"));
    assert!(
        wait_for(Duration::from_secs(10), || !s
            .get(&format!("/api/jobs/{id}"))
            .json()["woken_at"]
            .is_null()),
        "the dispatcher tries to wake the machine"
    );
    assert!(
        boots_environment(&boot_script(&s, mac)),
        "a job waits for it"
    );
    let m = s.get("/api/machines/lab-31").json();
    assert_eq!(m["waiting_jobs"][0]["id"], id);
    assert!(s.get("/machines").text().contains(&format!("/jobs/{id}")));
    // Cancelling ends the wait; the machine boots its disk again.
    assert_eq!(
        s.api("POST", &format!("/api/jobs/{id}/cancel"), b"").status,
        202
    );
    assert_eq!(
        s.get(&format!("/api/jobs/{id}")).json()["state"],
        "cancelled"
    );
    assert!(boots_local_disk(&boot_script(&s, mac)));

    // A job for later waits without sending the machine anywhere yet.
    let r = post(
        &s,
        "/api/jobs",
        serde_json::json!({"kind": "capture", "source": "lab-31", "output": "later.qcow2", "at": "+2h"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let later = s.get(&format!("/api/jobs/{}", r.json()["id"])).json();
    let ahead = later["not_before"].as_i64().unwrap() - later["created_at"].as_i64().unwrap();
    assert!((7190..=7210).contains(&ahead), "{later}");
    assert!(boots_local_disk(&boot_script(&s, mac)));
    // Requests are checked before they wait.
    for (bad, says) in [
        (
            serde_json::json!({"kind": "deploy", "image": "nope.qcow2", "target": "lab-31"}),
            "no capture",
        ),
        (
            serde_json::json!({"kind": "capture", "source": "lab-31", "output": "x.txt"}),
            "output name",
        ),
        (
            serde_json::json!({"kind": "capture", "source": "lab-31", "output": "x.qcow2", "at": "soon"}),
            "cannot read the time",
        ),
        (
            serde_json::json!({"kind": "capture", "source": "lab-31", "output": "x.qcow2", "wait_minutes": 0}),
            "wait_minutes",
        ),
    ] {
        let r = post(&s, "/api/jobs", bad);
        assert!(r.status == 400 || r.status == 404, "{}", r.text());
        assert!(r.text().contains(says), "{}", r.text());
    }

    // Schedules: recorded with their next time, listed, refused when unreadable, deleted.
    let r = post(
        &s,
        "/api/schedules",
        serde_json::json!({"every": "Sunday 02:00", "job": {"kind": "capture", "source": "lab-31", "output": "weekly.qcow2"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let sc = r.json();
    assert_eq!(sc["every"], "sun 02:00");
    let until = sc["next_at"].as_i64().unwrap() - sc["created_at"].as_i64().unwrap();
    assert!((0..=7 * 86400).contains(&until), "{sc}");
    assert_eq!(s.get("/api/schedules").json().as_array().unwrap().len(), 1);
    assert!(s.get("/jobs").text().contains("sun 02:00"));
    assert_eq!(
        s.get("/api/machines/lab-31").json()["schedules"][0]["every"],
        "sun 02:00"
    );
    let r = post(
        &s,
        "/api/schedules",
        serde_json::json!({"every": "now and then", "job": {"kind": "capture", "source": "lab-31", "output": "w.qcow2"}}),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("sun 02:00"),
        "the error shows the format: {}",
        r.text()
    );
    let out = cli(
        &data,
        &[
            "capture",
            "lab-31",
            "nightly.qcow2",
            "--every",
            "daily 03:00",
        ],
    );
    assert!(out.contains("every daily 03:00, next at"), "{out}");
    for sc in s.get("/api/schedules").json().as_array().unwrap() {
        assert_eq!(
            s.api("DELETE", &format!("/api/schedules/{}", sc["id"]), b"")
                .status,
            204
        );
    }
    assert!(s
        .get("/api/schedules")
        .json()
        .as_array()
        .unwrap()
        .is_empty());
}

/// A network namespace joined to this one by a veth pair, removed when dropped.
struct Namespace {
    name: String,
    host_if: String,
    listener: Option<Child>,
}

impl Namespace {
    /// `10.213.N.1/24` here, `10.213.N.2/24` inside.
    fn new(n: u32) -> Namespace {
        let name = format!("dfwol{}", std::process::id());
        let host_if = format!("dfw{n}h");
        sh(&format!(
            "ip netns add {name}
             ip link add {host_if} type veth peer name dfw{n}m
             ip link set dfw{n}m netns {name}
             ip addr add 10.213.{n}.1/24 dev {host_if}
             ip link set {host_if} up
             ip netns exec {name} ip addr add 10.213.{n}.2/24 dev dfw{n}m
             ip netns exec {name} ip link set dfw{n}m up
             ip netns exec {name} ip link set lo up"
        ));
        Namespace {
            name,
            host_if,
            listener: None,
        }
    }

    /// Writes every datagram that reaches UDP port 9 inside to `out`.
    fn listen(&mut self, out: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "socat", "-u", "UDP4-RECV:9"])
            .arg(format!("CREATE:{}", out.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("socat");
        self.listener = Some(child);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Some(mut c) = self.listener.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_job_for_a_sleeping_machine_sends_the_magic_packet_to_its_network() {
    let work = tempfile::tempdir().unwrap();
    let data = data_dir(work.path());
    let n = 100 + std::process::id() % 150;
    let mut ns = Namespace::new(n);
    let received = work.path().join("received");
    ns.listen(&received);
    std::thread::sleep(Duration::from_millis(300));
    let s = Server::start(&data).unwrap();
    let mac = "52:54:00:d1:5c:41";
    // The machine's last known address is inside the namespace.
    cli(
        &data,
        &[
            "machine",
            "register",
            mac,
            "lab-41",
            "--address",
            &format!("10.213.{n}.2"),
        ],
    );
    let r = post(
        &s,
        "/api/jobs",
        serde_json::json!({"kind": "capture", "source": "lab-41", "output": "lab-41.qcow2"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let packet = |bytes: &[u8]| {
        bytes.len() >= 102
            && bytes[..6] == [0xff; 6]
            && bytes[6..102]
                .chunks(6)
                .all(|c| c == [0x52, 0x54, 0x00, 0xd1, 0x5c, 0x41])
    };
    assert!(
        wait_for(Duration::from_secs(15), || packet(
            &std::fs::read(&received).unwrap_or_default()
        )),
        "the listener in the machine's network got no magic packet: {:?}",
        std::fs::read(&received).unwrap_or_default()
    );
    // The job's log says so once the packet is out: it may be read a moment before.
    let job = || s.get(&format!("/api/jobs/{id}")).json();
    let said = |job: &serde_json::Value| {
        let log = job["log"].as_str().unwrap_or_default();
        log.contains(&format!("sent to 10.213.{n}.255:9")) && log.contains(&ns.host_if)
    };
    assert!(
        wait_for(Duration::from_secs(10), || said(&job())),
        "{:#}",
        job()
    );
    let job = job();
    assert_eq!(job["state"], "queued", "it still waits for the machine");
    // By hand, too (the listener appends each datagram).
    let before = std::fs::read(&received).unwrap().len();
    let out = cli(&data, &["machine", "wake", "lab-41"]);
    assert!(out.contains(&format!("10.213.{n}.255:9")), "{out}");
    assert!(wait_for(Duration::from_secs(10), || {
        let now = std::fs::read(&received).unwrap_or_default();
        now.len() > before && packet(&now[before..])
    }));
}

#[test]
fn a_machine_that_boots_from_the_network_first_comes_back_up_in_its_deployed_system() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let boot = bootenv();
    let data = w.join("data");
    std::fs::create_dir_all(data.join("boot")).unwrap();
    std::fs::create_dir_all(data.join("captures")).unwrap();
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::copy(boot.join(f), data.join("boot").join(f)).unwrap();
    }
    // The "system" to deploy: an extlinux disk that boots with the marker on its command line.
    let system = w.join("system.img");
    bootable_disk(&system, &boot, w);
    let (ok, _, err) = diskferry(&[
        "capture".as_ref(),
        system.as_os_str(),
        data.join("captures/system.qcow2").as_os_str(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
    let (s, http) = server_for_vms(&data);

    // Known before it ever boots, with a deploy queued while it is off.
    let mac = "52:54:00:d1:5c:51";
    cli(&data, &["machine", "register", mac, "lab-51"]);
    let r = post(
        &s,
        "/api/jobs",
        serde_json::json!({"kind": "deploy", "image": "system.qcow2", "target": "lab-51", "reboot": true, "wait_minutes": 10}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();

    // Powered on (as the magic packet would), network first, then its disk.
    let disk = w.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let mut args = vec!["-boot".to_string(), "order=nc".into()];
    args.extend(Vm::network_args(&http, mac, &[&disk]));
    let started = Instant::now();
    let vm = Vm::start_rebooting(&w.join("vm.log"), &args);
    let job = |s: &Server| s.get(&format!("/api/jobs/{id}")).json();
    assert!(
        wait_for(Duration::from_secs(420), || job(&s)["state"]
            .as_str()
            .is_some_and(|st| st != "queued" && st != "running")),
        "the deploy did not end: {}\n{}",
        job(&s),
        vm.console()
    );
    let j = job(&s);
    assert_eq!(j["state"], "succeeded", "{j}");
    eprintln!(
        "registered machine: PXE boot, enrollment and deploy {:.1} s (TCG)",
        started.elapsed().as_secs_f64()
    );
    let m = s.get("/api/machines/lab-51").json();
    assert_eq!(
        m["approved"], true,
        "its first PXE enrollment was approved: {m}"
    );
    assert_eq!(m["state"], "deployed");
    // It reboots, asks the network first, is told to boot its disk, and comes up deployed.
    assert!(
        wait_for(Duration::from_secs(240), || {
            let c = vm.console();
            c.contains("booting from its local disk") && c.contains(MARKER)
        }),
        "it did not come back up in its deployed system: {}",
        vm.console()
    );
    let console = vm.console();
    let after = &console[console.find("booting from its local disk").unwrap()..];
    assert!(
        after.contains(MARKER),
        "the marker comes from the disk boot"
    );
    assert!(
        !after.contains("diskferry.token="),
        "the second boot did not load the boot environment"
    );
    eprintln!(
        "and back up in its deployed system: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
