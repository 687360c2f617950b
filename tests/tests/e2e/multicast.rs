//! Multicast deploy through the real binaries: `diskferry deploy IMAGE --multicast …` in one
//! network namespace, four `diskferry-client`s in four others, all on one bridge with every
//! link capped at 1 Gbit/s by `tbf`. One client drops 2 % of the data packets it gets (its
//! test seam: netem is missing), one is frozen (SIGSTOP) mid-session past the receiver
//! timeout and thawed — the session goes on without it and its disk is then written by
//! unicast —, one is killed (SIGKILL), and forged datagrams are thrown at the group. The
//! three survivors' disks are judged by sgdisk -v, e2fsck -fn, fsck.fat -n and the kernel's
//! loop mount against the source tree; the killed machine is reported failed, and so is the
//! run (non-zero exit), without having stalled the others. Needs root.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use diskferry_e2e::fixtures::{esp_root_disk, extract, gpt_partition_range, linux_tree};
use diskferry_e2e::netns::Bridge;
use diskferry_e2e::{bin, cli_with_data as cli, diskferry, make_key, run_ok, sh, Client};

const MIB: u64 = 1 << 20;
const GROUP: &str = "239.255.61.1";
const PORT: &str = "5561";

/// A GPT disk with a FAT32 ESP and an ext4 root holding the Linux tree and 40 MiB of random
/// bytes (so the session lasts a few seconds at the test's rate), captured to VHDX.
fn golden(d: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let tree = linux_tree(d);
    sh(&format!(
        "head -c {} /dev/urandom > {}/srv/big.bin",
        40 * MIB,
        tree.display()
    ));
    let src = d.join("src.img");
    esp_root_disk(&src, &tree, 140);
    let image = d.join("golden.vhdx");
    let (ok, _, err) = diskferry(&["capture".as_ref(), src.as_os_str(), image.as_os_str()]);
    assert!(ok, "{err}");
    (image, tree)
}

/// sgdisk, fsck.fat, e2fsck and a loop mount compared with `tree`.
fn check_disk(disk: &Path, tree: &Path, d: &Path, tag: &str) {
    let v = run_ok("sgdisk", &["-v", disk.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{tag}: {v}");
    let (o1, l1) = gpt_partition_range(disk, 1);
    let (o2, l2) = gpt_partition_range(disk, 2);
    let esp = extract(disk, o1, l1, &d.join(format!("{tag}-esp")));
    run_ok("fsck.fat", &["-n", esp.to_str().unwrap()]);
    let root = extract(disk, o2, l2, &d.join(format!("{tag}-root")));
    run_ok("e2fsck", &["-fn", root.to_str().unwrap()]);
    let mnt = d.join(format!("{tag}-mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "mount -o loop,ro {r} {m}; trap 'umount {m}' EXIT; \
         out=$(rsync -n -aHAXc --delete --exclude=/lost+found --out-format='%n' {t}/ {m}/); \
         [ -z \"$out\" ] || {{ echo \"{tag} differs: $out\" >&2; exit 1; }}",
        r = root.display(),
        m = mnt.display(),
        t = tree.display()
    ));
}

fn signal(client: &Client, sig: &str) {
    run_ok("kill", &[sig, &client.child.id().to_string()]);
}

#[test]
fn four_machines_one_lossy_one_frozen_one_killed_the_others_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (image, tree) = golden(d);
    let key = make_key(d, "key");
    let net = Bridge::new(5, "1gbit");

    // Member 0 is the server; 1..=4 are machines. Machine 3 has a larger disk.
    let mut clients = Vec::new();
    let mut disks = Vec::new();
    for m in 1..=4 {
        let disk = d.join(format!("disk{m}.img"));
        let size = if m == 3 { 200 } else { 160 };
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(size * MIB)
            .unwrap();
        let drop = if m == 2 { "2" } else { "0" };
        let listen = format!("{}:7000", net.addrs[m]);
        let client = Client::start_in(
            &net.members[m],
            &listen,
            &key,
            &["--allow-write", "--disk", disk.to_str().unwrap()],
            &[("DISKFERRY_TEST_MULTICAST_DROP", drop)],
        )
        .unwrap();
        disks.push(disk);
        clients.push(client);
    }
    let targets: Vec<String> = clients
        .iter()
        .zip(&disks)
        .map(|(c, disk)| c.source(disk))
        .collect();

    // 100 Mbit/s keeps the session a few seconds long, so the freeze and the kill land in it.
    let mut deploy = net
        .command(0, &bin("diskferry"))
        .arg("deploy")
        .arg(&image)
        .args(["--multicast", &targets.join(",")])
        .args(["--multicast-group", GROUP, "--multicast-port", PORT])
        .args(["--max-rate", "100", "--receiver-timeout", "2"])
        .arg("--key-file")
        .arg(&key)
        .args(["--progress", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = deploy.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let last_join = format!("{}: receiving", targets[3]);
    while !log.iter().any(|l: &String| l.starts_with(&last_join)) {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no session started:\n{}", log.join("\n")));
        log.push(line);
    }
    std::thread::sleep(Duration::from_millis(800));
    // Forged datagrams at the group: random bytes, and a header without the right MAC.
    for payload in [
        "head -c 1400 /dev/urandom",
        "printf 'DFMC\\001\\001\\000\\000%01400d' 0",
    ] {
        let mut c = net.command(1, Path::new("/bin/sh"));
        c.args([
            "-c",
            &format!(
                "for i in 1 2 3 4 5; do {payload} | socat -u - UDP4-DATAGRAM:{GROUP}:{PORT}; done"
            ),
        ]);
        assert!(c.status().unwrap().success());
    }
    signal(&clients[2], "-STOP");
    signal(&clients[3], "-KILL");
    std::thread::sleep(Duration::from_secs(4));
    signal(&clients[2], "-CONT");

    let status = loop {
        if let Some(s) = deploy.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the deploy ran past its deadline"
        );
        while let Ok(line) = rx.try_recv() {
            log.push(line);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(line) = rx.try_recv() {
        log.push(line);
    }
    let log = log.join("\n");
    eprintln!("{log}");
    assert!(
        !status.success(),
        "one machine was killed: the run must fail\n{log}"
    );
    for (m, how) in [
        (0, "verified (multicast)"),
        (1, "verified (multicast)"),
        (2, "verified (unicast"),
    ] {
        assert!(
            log.contains(&format!("  {}: {how}", targets[m])),
            "machine {m} should be {how}:\n{log}"
        );
    }
    assert!(log.contains(&format!("  {}: FAILED", targets[3])), "{log}");
    assert!(log.contains("deployed to 3 of 4 machines"), "{log}");

    for (m, disk) in disks.iter().take(3).enumerate() {
        check_disk(disk, &tree, d, &format!("m{m}"));
    }
    // Machines 1 and 2 started equal and got the same bytes; machine 3's larger disk has its
    // GPT backup at its own end (sgdisk -v above).
    let cmp = std::process::Command::new("cmp")
        .arg(&disks[0])
        .arg(&disks[1])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

/// A dial-back agent in a namespace of the bridge, killed when dropped. It announces no
/// firmware or PCI devices (its sysfs holds only `class`): the test image is not made for
/// this host, and the compatibility check must have nothing to refuse.
struct Agent {
    child: std::process::Child,
    _sysfs: tempfile::TempDir,
}

impl Agent {
    fn start(
        net: &Bridge,
        member: usize,
        server: &str,
        data: &Path,
        disk: &Path,
        drop: &str,
    ) -> Agent {
        let sysfs = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/sys/class", sysfs.path().join("class")).unwrap();
        let child = net
            .command(member, &bin("diskferry-client"))
            .env("DISKFERRY_SYSFS", sysfs.path())
            .env("DISKFERRY_TEST_MULTICAST_DROP", drop)
            .args(["--connect", server, "--allow-write", "--server-key"])
            .arg(diskferry_e2e::public_key(&data.join("server.key")))
            .arg("--agent-key")
            .arg(data.join(format!("agent-{member}.key")))
            .arg("--disk")
            .arg(disk)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Agent {
            child,
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

/// The MAC address of member `i`'s link.
fn member_mac(net: &Bridge, i: usize) -> String {
    let out = run_ok(
        "ip",
        &["-n", &net.members[i], "link", "show", &format!("vm{i}")],
    );
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_string()
}

fn machines(s: &diskferry_e2e::http::Server) -> Vec<serde_json::Value> {
    s.get("/api/machines").json().as_array().unwrap().clone()
}

#[test]
fn a_group_is_deployed_by_one_multicast_job_that_waits_for_its_last_machine() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (image, tree) = golden(d);
    let mut net = Bridge::new(3, "1gbit");
    let host = net.join_host("1gbit");
    let data = d.join("data");
    std::fs::create_dir_all(data.join("captures")).unwrap();
    std::fs::copy(&image, data.join("captures/golden.vhdx")).unwrap();
    let s =
        diskferry_e2e::http::Server::start_with(&data, &["--agent-listen", &format!("{host}:0")])
            .unwrap();
    let disks: Vec<_> = (0..3)
        .map(|i| {
            let disk = d.join(format!("machine{i}.img"));
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(160 * MIB)
                .unwrap();
            disk
        })
        .collect();

    // Two machines are up and approved; the third is only registered, and asleep.
    let mut agents = vec![
        Agent::start(&net, 0, &s.agent_addr, &data, &disks[0], "0"),
        Agent::start(&net, 1, &s.agent_addr, &data, &disks[1], "0"),
    ];
    assert!(diskferry_e2e::wait_for(Duration::from_secs(60), || {
        let m = machines(&s);
        m.len() == 2 && m.iter().all(|m| m["online"] == true)
    }));
    for (i, m) in machines(&s).iter().enumerate() {
        let id = m["id"].to_string();
        cli(&data, &["machine", "approve", &id]);
        cli(&data, &["machine", "rename", &id, &format!("lab-{i}")]);
        cli(&data, &["machine", "groups", &id, "lab"]);
    }
    let mac = member_mac(&net, 2);
    cli(&data, &["machine", "register", &mac, "lab-2"]);
    cli(&data, &["machine", "groups", "lab-2", "lab"]);

    // One job for the group: it waits for lab-2 (waking it), then runs.
    let mut deploy = std::process::Command::new(bin("diskferry"))
        .args([
            "deploy",
            "golden.vhdx",
            "--group",
            "lab",
            "--progress",
            "none",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let job = |s: &diskferry_e2e::http::Server| {
        let id = s.get("/api/jobs").json().as_array()?.first()?["id"].as_i64()?;
        Some(s.get(&format!("/api/jobs/{id}")).json())
    };
    assert!(
        diskferry_e2e::wait_for(Duration::from_secs(30), || {
            job(&s).is_some_and(|j| {
                let log = j["log"].as_str().unwrap_or("");
                j["waiting"] == true
                    && log.contains("waiting for machines lab-2")
                    && log.contains("magic packet for lab-2")
            })
        }),
        "the job should wait for lab-2 and wake it: {:?}",
        job(&s)
    );
    agents.push(Agent::start(&net, 2, &s.agent_addr, &data, &disks[2], "2"));
    assert!(diskferry_e2e::wait_for(Duration::from_secs(60), || {
        machines(&s)
            .iter()
            .any(|m| m["name"] == "lab-2" && m["online"] == true)
    }));
    cli(&data, &["machine", "approve", "lab-2"]);

    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = deploy.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the multicast job ran past its deadline"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = deploy.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let j = job(&s).unwrap();
    assert!(status.success(), "{text}\n{j:#}");
    assert_eq!(j["kind"], "multicast");
    assert_eq!(j["state"], "succeeded", "{j:#}");
    let ms = j["result"]["machines"].as_array().unwrap();
    assert_eq!(ms.len(), 3, "{j:#}");
    for m in ms {
        assert_eq!(m["phase"], "done", "{m}");
        assert_eq!(m["delivery"], "multicast", "{m}");
    }
    assert_eq!(j["waiting"], false, "{j:#}");
    for m in machines(&s) {
        assert_eq!(m["state"], "deployed", "{m}");
    }
    // The job's page lists every machine with its phase and how its data came.
    let page = s.get(&format!("/jobs/{}", j["id"])).text();
    assert!(page.contains("id=\"job-machines\""), "{page}");
    for name in ["lab-0", "lab-1", "lab-2"] {
        assert!(page.contains(&format!("data-machine=\"{name}\"")), "{page}");
    }
    assert!(!page.contains("class=\"state failed\""), "{page}");
    for (i, disk) in disks.iter().enumerate() {
        check_disk(disk, &tree, d, &format!("lab{i}"));
    }
}
