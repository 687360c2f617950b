//! Network settings written in the format of the tool the system uses: netplan (a YAML under
//! `/etc/netplan`), NetworkManager (keyfiles), ifupdown (`/etc/network/interfaces.d`), or
//! systemd-networkd (`.network` units) — found in that order by the files the system holds;
//! networkd when none is found. One file of ours, named `…diskferry…`, holds every interface
//! the SPEC lists, so a later customization replaces it.

use diskferry_fs::overlay::{Attrs, TreeOverlay};
use diskferry_fs::Filesystem;

use crate::spec::{normalize_mac, Network};
use crate::CustomizeError;

/// The tools, as `inspect` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Netplan,
    NetworkManager,
    Ifupdown,
    Networkd,
}

/// The tool configuring the system's network.
pub fn tool_of(o: &TreeOverlay) -> Result<Tool, CustomizeError> {
    if !crate::edits::files_in(o, "/etc/netplan", ".yaml")?.is_empty() {
        return Ok(Tool::Netplan);
    }
    if o.resolve("/usr/sbin/NetworkManager").is_ok() {
        return Ok(Tool::NetworkManager);
    }
    if o.read_file("/etc/network/interfaces", 1 << 20)?
        .is_some_and(|t| {
            String::from_utf8_lossy(&t)
                .lines()
                .any(|l| l.trim_start().starts_with("iface ") && !l.contains(" lo "))
        })
    {
        return Ok(Tool::Ifupdown);
    }
    Ok(Tool::Networkd)
}

pub(crate) fn apply(o: &mut TreeOverlay, nets: &[Network]) -> Result<Vec<String>, CustomizeError> {
    let tool = tool_of(o)?;
    let (path, text, mode) = match tool {
        Tool::Netplan => (
            "/etc/netplan/90-diskferry.yaml".to_string(),
            netplan(nets),
            0o600,
        ),
        Tool::Ifupdown => (
            "/etc/network/interfaces.d/diskferry".to_string(),
            ifupdown(nets)?,
            0o644,
        ),
        Tool::Networkd => (
            "/etc/systemd/network/10-diskferry.network".to_string(),
            String::new(),
            0o644,
        ),
        Tool::NetworkManager => (
            "/etc/NetworkManager/system-connections".to_string(),
            String::new(),
            0o600,
        ),
    };
    match tool {
        Tool::Networkd => {
            o.create_dirs("/etc/systemd/network", Attrs::root(0o755))?;
            for (i, n) in nets.iter().enumerate() {
                let p = format!("/etc/systemd/network/10-diskferry-{i}.network");
                o.write_file(&p, networkd(n).into_bytes(), Attrs::root(mode))?;
            }
            enable_networkd(o)?;
        }
        Tool::NetworkManager => {
            o.create_dirs(&path, Attrs::root(0o755))?;
            for (i, n) in nets.iter().enumerate() {
                let p = format!("{path}/diskferry-{i}.nmconnection");
                o.write_file(&p, keyfile(i, n).into_bytes(), Attrs::root(mode))?;
            }
        }
        _ => {
            let parent = path.rsplit_once('/').map_or("/", |(p, _)| p).to_string();
            o.create_dirs(&parent, Attrs::root(0o755))?;
            o.write_file(&path, text.into_bytes(), Attrs::root(mode))?;
        }
    }
    Ok(vec![format!(
        "network: {} interface(s) for {tool:?} under {path}",
        nets.len()
    )])
}

/// How one entry matches: a MAC address, an interface name, or every Ethernet interface.
enum Match {
    Mac(String),
    Name(String),
    Any,
}

fn match_of(n: &Network) -> Match {
    match n.matches.as_deref() {
        Some(m) => normalize_mac(m).map_or_else(|| Match::Name(m.to_string()), Match::Mac),
        None => Match::Any,
    }
}

fn netplan(nets: &[Network]) -> String {
    let mut y = String::from(
        "# Written by diskferry (customization).\nnetwork:\n  version: 2\n  ethernets:\n",
    );
    for (i, n) in nets.iter().enumerate() {
        y.push_str(&format!("    diskferry{i}:\n"));
        match match_of(n) {
            Match::Mac(m) => y.push_str(&format!("      match:\n        macaddress: \"{m}\"\n")),
            Match::Name(name) => y.push_str(&format!("      match:\n        name: \"{name}\"\n")),
            Match::Any => y.push_str("      match:\n        name: \"e*\"\n"),
        }
        match &n.address {
            None => y.push_str("      dhcp4: true\n      dhcp6: true\n"),
            Some(a) => {
                y.push_str(&format!("      addresses: [\"{a}\"]\n"));
                if let Some(g) = &n.gateway {
                    y.push_str(&format!(
                        "      routes:\n        - to: default\n          via: \"{g}\"\n"
                    ));
                }
                if !n.dns.is_empty() {
                    let list: Vec<String> = n.dns.iter().map(|d| format!("\"{d}\"")).collect();
                    y.push_str(&format!(
                        "      nameservers:\n        addresses: [{}]\n",
                        list.join(", ")
                    ));
                }
            }
        }
    }
    y
}

fn ifupdown(nets: &[Network]) -> Result<String, CustomizeError> {
    let mut t = String::from("# Written by diskferry (customization).\n");
    for n in nets {
        let name = match match_of(n) {
            Match::Name(name) => name,
            _ => {
                return Err(CustomizeError::System(
                    "this system's network is configured with ifupdown, which names interfaces: give network.match as an interface name (eth0, enp1s0)".into(),
                ))
            }
        };
        t.push_str(&format!("\nallow-hotplug {name}\n"));
        match &n.address {
            None => t.push_str(&format!("iface {name} inet dhcp\n")),
            Some(a) => {
                let family = if a.contains(':') { "inet6" } else { "inet" };
                t.push_str(&format!("iface {name} {family} static\n    address {a}\n"));
                if let Some(g) = &n.gateway {
                    t.push_str(&format!("    gateway {g}\n"));
                }
                if !n.dns.is_empty() {
                    t.push_str(&format!("    dns-nameservers {}\n", n.dns.join(" ")));
                }
            }
        }
    }
    Ok(t)
}

fn networkd(n: &Network) -> String {
    let mut t = String::from("# Written by diskferry (customization).\n[Match]\n");
    match match_of(n) {
        Match::Mac(m) => t.push_str(&format!("MACAddress={m}\n")),
        Match::Name(name) => t.push_str(&format!("Name={name}\n")),
        Match::Any => t.push_str("Type=ether\n"),
    }
    t.push_str("\n[Network]\n");
    match &n.address {
        None => t.push_str("DHCP=yes\n"),
        Some(a) => {
            t.push_str(&format!("Address={a}\n"));
            if let Some(g) = &n.gateway {
                t.push_str(&format!("Gateway={g}\n"));
            }
            for d in &n.dns {
                t.push_str(&format!("DNS={d}\n"));
            }
        }
    }
    t
}

/// systemd-networkd enabled as `systemctl enable` does (its wants links), so the settings
/// take effect on a system that did not use it.
fn enable_networkd(o: &mut TreeOverlay) -> Result<(), CustomizeError> {
    let unit = [
        "/lib/systemd/system/systemd-networkd.service",
        "/usr/lib/systemd/system/systemd-networkd.service",
    ]
    .into_iter()
    .find(|p| o.resolve(p).is_ok());
    let Some(unit) = unit else {
        return Ok(());
    };
    let wants = "/etc/systemd/system/multi-user.target.wants";
    o.create_dirs(wants, Attrs::root(0o755))?;
    let link = format!("{wants}/systemd-networkd.service");
    if o.stat(&link)?.is_none() {
        o.symlink(&link, unit)?;
    }
    Ok(())
}

fn keyfile(i: usize, n: &Network) -> String {
    let mut t = format!(
        "# Written by diskferry (customization).\n[connection]\nid=diskferry-{i}\ntype=ethernet\n"
    );
    match match_of(n) {
        Match::Name(name) => t.push_str(&format!("interface-name={name}\n")),
        Match::Mac(m) => t.push_str(&format!(
            "\n[ethernet]\nmac-address={}\n",
            m.to_ascii_uppercase()
        )),
        Match::Any => {}
    }
    match &n.address {
        None => t.push_str("\n[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n"),
        Some(a) => {
            let (v4, v6) = if a.contains(':') {
                ("disabled", "manual")
            } else {
                ("manual", "auto")
            };
            let section = if a.contains(':') { "ipv6" } else { "ipv4" };
            let gw = n
                .gateway
                .as_deref()
                .map(|g| format!(",{g}"))
                .unwrap_or_default();
            let dns: String = n.dns.iter().map(|d| format!("{d};")).collect();
            t.push_str(&format!("\n[ipv4]\nmethod={v4}\n"));
            if section == "ipv4" {
                t.push_str(&format!("address1={a}{gw}\n"));
                if !dns.is_empty() {
                    t.push_str(&format!("dns={dns}\n"));
                }
            }
            t.push_str(&format!("\n[ipv6]\nmethod={v6}\n"));
            if section == "ipv6" {
                t.push_str(&format!("address1={a}{gw}\n"));
                if !dns.is_empty() {
                    t.push_str(&format!("dns={dns}\n"));
                }
            }
        }
    }
    t
}
