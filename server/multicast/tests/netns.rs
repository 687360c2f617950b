//! The multicast data path over real sockets: a sender and four receivers, each in its own
//! network namespace on one bridge (links capped with `tbf`), one receiver dropping 2 % of the
//! data packets (the receiver's test-only knob: netem is not available), one killed mid-session,
//! forged datagrams thrown at the group and at the sender. The survivors' disks must equal the
//! image byte for byte (`cmp`), the killed one must be reported dropped without stalling the
//! rest. Runs the `mcast` example (built with the tests) in each namespace. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RECEIVERS: usize = 4;
const GROUP: &str = "239.255.77.1:5577";
const SENDER_IP: &str = "10.79.0.1";

/// Network namespaces deleted on drop, whatever happened.
struct Namespaces {
    prefix: String,
    names: Vec<String>,
}

impl Namespaces {
    fn new() -> Namespaces {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Namespaces {
            prefix: format!("dfmc{}x{}", std::process::id(), nanos % 100_000),
            names: Vec::new(),
        }
    }

    fn add(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        run(&["ip", "netns", "add", &full]);
        self.names.push(full.clone());
        full
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Children killed on drop (a failed assertion must not leave receivers running).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A hub namespace with a bridge; the sender and each receiver in a namespace of their own,
/// joined to it by a veth pair, multicast routed onto the veth, both ends capped at 1 Gbit/s.
fn network(ns: &mut Namespaces) -> (String, Vec<String>) {
    let hub = ns.add("hub");
    run(&[
        "ip",
        "-n",
        &hub,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ]);
    run(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
    let mut join = |name: &str, ip: &str| {
        let full = ns.add(name);
        let (inner, outer) = (format!("v{name}"), format!("h{name}"));
        run(&[
            "ip", "link", "add", &inner, "netns", &full, "type", "veth", "peer", "name", &outer,
            "netns", &hub,
        ]);
        run(&[
            "ip", "-n", &hub, "link", "set", &outer, "master", "br0", "up",
        ]);
        run(&[
            "ip",
            "-n",
            &full,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &inner,
        ]);
        run(&["ip", "-n", &full, "link", "set", "lo", "up"]);
        run(&["ip", "-n", &full, "link", "set", &inner, "up"]);
        run(&[
            "ip",
            "-n",
            &full,
            "route",
            "add",
            "224.0.0.0/4",
            "dev",
            &inner,
        ]);
        for (n, dev) in [(&full, &inner), (&hub, &outer)] {
            run(&[
                "tc", "-n", n, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", "1gbit",
                "burst", "1mb", "limit", "8mb",
            ]);
        }
        full
    };
    let sender = join("s", SENDER_IP);
    let receivers = (0..RECEIVERS)
        .map(|i| join(&format!("r{i}"), &format!("10.79.0.{}", 10 + i)))
        .collect();
    (sender, receivers)
}

/// The `mcast` example beside this test binary (cargo builds examples with the tests).
fn driver() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/mcast");
    assert!(
        path.exists(),
        "{} is missing: cargo build -p diskferry-multicast --example mcast",
        path.display()
    );
    path
}

fn in_ns(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// 48 MiB of random data, a 16 MiB hole, 8 MiB of random data.
fn image(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("image.raw");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 1 << 20];
    let mut fill = |f: &mut std::fs::File, mib: usize| {
        for _ in 0..mib {
            for b in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.copy_from_slice(&state.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
    };
    fill(&mut f, 48);
    f.set_len(64 << 20).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(64 << 20)).unwrap();
    fill(&mut f, 8);
    path
}

fn wait_with_deadline(child: &mut Child, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "a process ran past the deadline");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn output_of(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

#[test]
fn four_receivers_one_lossy_one_killed_survivors_match_the_image() {
    assert!(
        rustix_is_root(),
        "this test needs root (network namespaces, veth, tbf)"
    );
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    let mcast = driver();
    let mut ns = Namespaces::new();
    let (sender_ns, receiver_ns) = network(&mut ns);
    let mut children = Children(Vec::new());

    // 20 MB/s keeps the session a few seconds long, so the kill lands mid-session.
    let sender = in_ns(&sender_ns, &mcast)
        .args(["send", "--image"])
        .arg(&image)
        .args(["--group", GROUP, "--bind", SENDER_IP, "--receivers", "4"])
        .args(["--max-rate", "20000000", "--receiver-timeout-ms", "1500"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    children.0.push(sender);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.path().join("ready").exists() {
        assert!(Instant::now() < deadline, "the sender never got ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, rns) in receiver_ns.iter().enumerate() {
        let disk = dir.path().join(format!("disk{i}"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(72 << 20)
            .unwrap();
        let drop = if i == 1 { "2" } else { "0" };
        let child = in_ns(rns, &mcast)
            .args(["recv", "--creds"])
            .arg(dir.path().join(format!("r{i}.cred")))
            .arg("--disk")
            .arg(&disk)
            .args(["--test-drop-percent", drop])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.0.push(child);
    }
    // Forged datagrams at the group and at every likely report port, from a receiver's
    // namespace: random bytes, and a header-shaped datagram without the right MAC.
    let sender_port = sender_port(dir.path());
    for target in [GROUP.to_owned(), format!("{SENDER_IP}:{sender_port}")] {
        for payload in [
            "head -c 1400 /dev/urandom",
            "printf 'DFMC\\001\\001\\000\\000%01400d' 0",
        ] {
            run(&[
                "ip",
                "netns",
                "exec",
                &receiver_ns[2],
                "sh",
                "-c",
                &format!(
                    "for i in 1 2 3 4 5; do {payload} | socat -u - UDP4-DATAGRAM:{target}; done"
                ),
            ]);
        }
    }
    // Kill receiver 3 once the session is well under way.
    std::thread::sleep(Duration::from_millis(1200));
    let killed = &mut children.0[4];
    assert!(
        killed.try_wait().unwrap().is_none(),
        "receiver 3 ended before the kill"
    );
    killed.kill().unwrap();
    let _ = killed.wait();

    let started = Instant::now();
    let status = wait_with_deadline(&mut children.0[0], deadline);
    let elapsed = started.elapsed();
    let mut all = std::mem::take(&mut children.0).into_iter();
    let sender = output_of(all.next().unwrap());
    let report = String::from_utf8_lossy(&sender.stdout).into_owned();
    eprintln!("{report}{}", String::from_utf8_lossy(&sender.stderr));
    assert_eq!(status.code(), Some(3), "one receiver dropped: exit 3");
    assert!(report.contains("receiver 3: Dropped"), "{report}");
    for i in 0..3 {
        assert!(report.contains(&format!("receiver {i}: Done")), "{report}");
    }
    assert!(
        !report.contains("rejected 0,"),
        "the forged reports were not counted: {report}"
    );
    // The lossy receiver was repaired (by unicast or multicast).
    assert!(!report.contains("receiver 1: Done, unicast repairs 0 bytes, NACKed 0"));
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");

    for (i, child) in all.enumerate() {
        let out = output_of(child);
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "receiver {i}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i == 3 {
            continue;
        }
        assert!(out.status.success(), "receiver {i} failed");
        if i == 1 {
            assert!(!text.contains(" 0 test-dropped"), "{text}");
        }
        if i == 0 {
            assert!(
                !text.contains(" 0 rejected"),
                "forged data not counted: {text}"
            );
        }
        let disk = dir.path().join(format!("disk{i}"));
        let cmp = Command::new("cmp").arg(&image).arg(&disk).output().unwrap();
        assert!(
            cmp.status.success(),
            "receiver {i}'s disk differs: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
}

/// The sender's report port, from the receivers' credentials (bytes 16..22 hold its address).
fn sender_port(dir: &Path) -> u16 {
    let hex = std::fs::read_to_string(dir.join("r0.cred")).unwrap();
    let byte = |i: usize| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    u16::from_be_bytes([byte(20), byte(21)])
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
