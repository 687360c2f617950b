//! Network namespaces for tests that need a real network: a hub namespace holding a bridge
//! and member namespaces joined to it by veth pairs, each link capped with `tbf` (netem is
//! not available here), multicast routed onto the veth. Everything is deleted on drop.

use std::process::Command;

/// Namespaces deleted on drop, whatever happened.
pub struct Bridge {
    names: Vec<String>,
    /// The members' namespaces, in the order asked.
    pub members: Vec<String>,
    /// The members' IPv4 addresses, in the same order.
    pub addrs: Vec<String>,
    /// This namespace's own address on the bridge, once [`Bridge::join_host`] made one.
    pub host_addr: Option<String>,
    net: u32,
    prefix: String,
}

impl Bridge {
    /// `members` namespaces on one bridge, every link capped at `rate` (tc syntax: `1gbit`).
    /// Addresses are 10.X.0.(10+i)/24 with X picked from the process id, so tests running
    /// at once do not collide.
    pub fn new(members: usize, rate: &str) -> Bridge {
        let prefix = format!("dfbr{}", std::process::id() % 100_000);
        let net = 100 + std::process::id() % 100;
        let mut b = Bridge {
            names: Vec::new(),
            members: Vec::new(),
            addrs: Vec::new(),
            host_addr: None,
            net,
            prefix: prefix.clone(),
        };
        let hub = b.add(&format!("{prefix}-hub"));
        ip(&[
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
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..members {
            let name = b.add(&format!("{prefix}-m{i}"));
            let addr = format!("10.{net}.0.{}", 10 + i);
            let (inner, outer) = (format!("vm{i}"), format!("hm{i}"));
            ip(&[
                "link", "add", &inner, "netns", &name, "type", "veth", "peer", "name", &outer,
                "netns", &hub,
            ]);
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"]);
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            ip(&["-n", &name, "link", "set", &inner, "up"]);
            ip(&["-n", &name, "route", "add", "224.0.0.0/4", "dev", &inner]);
            for (ns, dev) in [(&name, &inner), (&hub, &outer)] {
                run(&[
                    "tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", "1mb", "limit", "8mb",
                ]);
            }
            b.members.push(name);
            b.addrs.push(addr);
        }
        b
    }

    /// Joins the test's own namespace to the bridge (10.X.0.1, capped at `rate`), so a
    /// server started the ordinary way reaches the members; returns that address. The link
    /// goes away with the hub.
    pub fn join_host(&mut self, rate: &str) -> String {
        let hub = format!("{}-hub", self.prefix);
        let (inner, outer) = (
            format!("dfh{}", std::process::id() % 100_000),
            "hhost".to_string(),
        );
        let _ = Command::new("ip").args(["link", "del", &inner]).output();
        ip(&[
            "link", "add", &inner, "type", "veth", "peer", "name", &outer, "netns", &hub,
        ]);
        ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"]);
        let addr = format!("10.{}.0.1", self.net);
        ip(&["addr", "add", &format!("{addr}/24"), "dev", &inner]);
        ip(&["link", "set", &inner, "up"]);
        for (ns, dev) in [(None, &inner), (Some(&hub), &outer)] {
            let mut args = vec!["tc"];
            if let Some(n) = ns {
                args.extend(["-n", n]);
            }
            args.extend([
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mb",
                "limit", "8mb",
            ]);
            run(&args);
        }
        self.host_addr = Some(addr.clone());
        addr
    }

    fn add(&mut self, name: &str) -> String {
        // A namespace left by a killed run of the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        self.names.push(name.to_owned());
        name.to_owned()
    }

    /// A command run inside member `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.members[i]]).arg(program);
        c
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    run(&all);
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
