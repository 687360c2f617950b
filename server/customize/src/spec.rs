//! The customization SPEC (TOML): what a deployed or copied system gets of its own. Parsed
//! strictly — an unknown key, a wrong type or an invalid value is an error naming the key,
//! before anything is written — and rendered per machine (`{name}` in values becomes the
//! machine's name).

use serde::Deserialize;

/// Everything a SPEC may say; every key optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The system's host name (`/etc/hostname`, `/etc/hosts`); `{name}` is the machine's.
    pub hostname: Option<String>,
    /// "new": a fresh random id; "empty": systemd makes one at first boot.
    pub machine_id: Option<MachineId>,
    /// "regenerate": new ed25519, rsa and ecdsa host keys; "keep": the capture's.
    pub ssh_host_keys: Option<SshHostKeys>,
    /// Network settings, per MAC address or interface name, in the system's own format.
    #[serde(default)]
    pub network: Vec<Network>,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub files: Vec<File>,
    /// Shell commands run once, in order, at the first boot (then the unit removes itself).
    #[serde(default)]
    pub first_boot: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MachineId {
    New,
    Empty,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SshHostKeys {
    Regenerate,
    Keep,
}

/// One interface's settings: DHCP, or a static address with gateway and DNS servers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// A MAC address (`52:54:00:12:34:56`) or an interface name (`eth0`); absent: every
    /// Ethernet interface.
    #[serde(rename = "match")]
    pub matches: Option<String>,
    /// DHCP (the default when no address is given).
    pub dhcp: Option<bool>,
    /// `ADDRESS/PREFIX`, IPv4 or IPv6.
    pub address: Option<String>,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

/// A user to add, or to update when the system has one of that name.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// A crypt(3) hash (`$6$…`, `$y$…`), as `/etc/shadow` holds; absent: the password is
    /// locked (keys only).
    pub password_hash: Option<String>,
    #[serde(default)]
    pub authorized_keys: Vec<String>,
    /// Existing groups to join (`sudo`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Login shell [default: /bin/bash when the system has it, else /bin/sh].
    pub shell: Option<String>,
    /// [default: the next free id from 1000]
    pub uid: Option<u32>,
}

/// A file to add or replace.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Absolute path in the system.
    pub path: String,
    pub content: String,
    /// Octal permissions [default: "0644"].
    pub mode: Option<String>,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

/// Why a SPEC is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("{key}: {why}")]
    Invalid { key: String, why: String },
}

fn invalid(key: impl Into<String>, why: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

impl Spec {
    /// Parses and checks a SPEC (values with `{name}` are checked once rendered).
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let spec: Spec = toml::from_str(text)?;
        spec.render(Some("machine"))?;
        Ok(spec)
    }

    /// The SPEC for one machine: `{name}` replaced by `name` everywhere, then checked; a SPEC
    /// that uses `{name}` without one is an error.
    pub fn render(&self, name: Option<&str>) -> Result<Spec, SpecError> {
        let fill = |key: &str, v: &str| -> Result<String, SpecError> {
            match (v.contains("{name}"), name) {
                (false, _) => Ok(v.to_string()),
                (true, Some(n)) => Ok(v.replace("{name}", n)),
                (true, None) => Err(invalid(
                    key,
                    "uses {name}, but this machine has none (register it with a name)",
                )),
            }
        };
        let mut out = self.clone();
        if let Some(h) = &self.hostname {
            let h = fill("hostname", h)?;
            check_hostname(&h)?;
            out.hostname = Some(h);
        }
        for (i, f) in out.files.iter_mut().enumerate() {
            let key = format!("files[{i}]");
            f.content = fill(&format!("{key}.content"), &f.content)?;
            check_path(&format!("{key}.path"), &f.path)?;
            mode_of(&format!("{key}.mode"), f.mode.as_deref())?;
        }
        for (i, c) in out.first_boot.iter_mut().enumerate() {
            *c = fill(&format!("first_boot[{i}]"), c)?;
        }
        for (i, u) in self.users.iter().enumerate() {
            check_user(&format!("users[{i}]"), u)?;
        }
        for (i, n) in self.network.iter().enumerate() {
            check_network(&format!("network[{i}]"), n)?;
        }
        Ok(out)
    }
}

/// RFC 1123 host names: dot-separated labels of letters, digits and hyphens.
fn check_hostname(h: &str) -> Result<(), SpecError> {
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if h.len() > 253 || !h.split('.').all(ok_label) {
        return Err(invalid(
            "hostname",
            format!("{h:?} is not a host name (letters, digits and hyphens, labels of 1 to 63)"),
        ));
    }
    Ok(())
}

fn check_path(key: &str, p: &str) -> Result<(), SpecError> {
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if !p.starts_with('/') || parts.is_empty() || parts.iter().any(|s| *s == "." || *s == "..") {
        return Err(invalid(
            key,
            format!("{p:?} must be an absolute path without . or .. components"),
        ));
    }
    Ok(())
}

/// Octal permission bits of a `mode` value (default 0644).
pub(crate) fn mode_of(key: &str, mode: Option<&str>) -> Result<u32, SpecError> {
    let Some(m) = mode else {
        return Ok(0o644);
    };
    u32::from_str_radix(m.trim_start_matches("0o"), 8)
        .ok()
        .filter(|v| *v <= 0o7777)
        .ok_or_else(|| invalid(key, format!("{m:?} is not an octal mode such as \"0644\"")))
}

fn check_user(key: &str, u: &User) -> Result<(), SpecError> {
    let name_ok = !u.name.is_empty()
        && u.name.len() <= 32
        && u.name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b == b'_' || (i > 0 && (b.is_ascii_digit() || b == b'-'))
        });
    if !name_ok {
        return Err(invalid(
            format!("{key}.name"),
            format!(
                "{:?} is not a user name (lowercase letters, digits, _ and -)",
                u.name
            ),
        ));
    }
    if let Some(h) = &u.password_hash {
        if !h.starts_with('$') || h.contains(':') || h.contains('\n') {
            return Err(invalid(
                format!("{key}.password_hash"),
                "must be a crypt(3) hash such as $6$… or $y$… (`mkpasswd -m yescrypt`)",
            ));
        }
    }
    for (j, k) in u.authorized_keys.iter().enumerate() {
        if k.contains('\n') || k.split_whitespace().count() < 2 {
            return Err(invalid(
                format!("{key}.authorized_keys[{j}]"),
                "one public key line: TYPE BASE64 [COMMENT]",
            ));
        }
    }
    let field_ok = |s: &str| !s.is_empty() && !s.contains(':') && !s.contains('\n');
    if let Some(bad) = u.groups.iter().find(|g| !field_ok(g)) {
        return Err(invalid(
            format!("{key}.groups"),
            format!("{bad:?} is not a group name"),
        ));
    }
    if u.shell
        .as_deref()
        .is_some_and(|s| !s.starts_with('/') || !field_ok(s))
    {
        return Err(invalid(format!("{key}.shell"), "an absolute path"));
    }
    Ok(())
}

fn check_network(key: &str, n: &Network) -> Result<(), SpecError> {
    if let Some(m) = &n.matches {
        let name_ok = !m.is_empty()
            && m.len() <= 15
            && m.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if normalize_mac(m).is_none() && !name_ok {
            return Err(invalid(
                format!("{key}.match"),
                format!("{m:?} is neither a MAC address nor an interface name"),
            ));
        }
    }
    let ip = |s: &str| s.parse::<std::net::IpAddr>().is_ok();
    match (&n.address, n.dhcp) {
        (Some(_), Some(true)) => {
            return Err(invalid(key, "give dhcp = true or an address, not both"))
        }
        (Some(a), _) => {
            let ok = a.split_once('/').is_some_and(|(addr, prefix)| {
                ip(addr) && prefix.parse::<u8>().is_ok_and(|p| p <= 128)
            });
            if !ok {
                return Err(invalid(
                    format!("{key}.address"),
                    format!("{a:?} is not ADDRESS/PREFIX (192.168.1.10/24)"),
                ));
            }
        }
        (None, Some(false)) => {
            return Err(invalid(key, "dhcp = false needs an address"));
        }
        (None, _) => {}
    }
    if let Some(g) = n.gateway.as_deref().filter(|g| !ip(g)) {
        return Err(invalid(
            format!("{key}.gateway"),
            format!("{g:?} is not an IP address"),
        ));
    }
    if let Some(d) = n.dns.iter().find(|d| !ip(d)) {
        return Err(invalid(
            format!("{key}.dns"),
            format!("{d:?} is not an IP address"),
        ));
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff` (lowercase) from a MAC address written with `:` or `-`.
pub(crate) fn normalize_mac(m: &str) -> Option<String> {
    let parts: Vec<&str> = m.split([':', '-']).collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| parts.join(":").to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        Spec::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_full_spec_parses_and_renders_per_machine() {
        let spec = Spec::parse(
            r#"
            hostname = "{name}"
            machine_id = "new"
            ssh_host_keys = "regenerate"
            first_boot = ["echo {name} > /etc/motd"]
            [[network]]
            match = "52:54:00:12:34:56"
            address = "192.168.1.10/24"
            gateway = "192.168.1.1"
            dns = ["192.168.1.1"]
            [[users]]
            name = "alice"
            password_hash = "$6$salt$hash"
            authorized_keys = ["ssh-ed25519 AAAAC3 alice@laptop"]
            groups = ["sudo"]
            [[files]]
            path = "/etc/motd"
            content = "hello {name}\n"
            mode = "0640"
            "#,
        )
        .unwrap();
        let web = spec.render(Some("web-07")).unwrap();
        assert_eq!(web.hostname.as_deref(), Some("web-07"));
        assert_eq!(web.files[0].content, "hello web-07\n");
        assert_eq!(web.first_boot[0], "echo web-07 > /etc/motd");
        let err = spec.render(None).unwrap_err().to_string();
        assert!(err.starts_with("hostname: uses {name}"), "{err}");
    }

    #[test]
    fn bad_specs_name_the_key() {
        assert!(refused("hostnme = \"x\"").contains("unknown field `hostnme`"));
        assert!(refused("machine_id = \"fresh\"").contains("machine_id"));
        assert!(refused("hostname = \"bad_name!\"").starts_with("hostname:"));
        assert!(refused("[[files]]\npath = \"etc/x\"\ncontent = \"\"").starts_with("files[0].path"));
        assert!(
            refused("[[files]]\npath = \"/a/../b\"\ncontent = \"\"").starts_with("files[0].path")
        );
        assert!(
            refused("[[files]]\npath = \"/a\"\ncontent = \"\"\nmode = \"999\"")
                .starts_with("files[0].mode")
        );
        assert!(refused("[[users]]\nname = \"Root:x\"").starts_with("users[0].name"));
        assert!(
            refused("[[users]]\nname = \"bob\"\npassword_hash = \"plain\"")
                .starts_with("users[0].password_hash")
        );
        assert!(refused("[[network]]\naddress = \"10.0.0.1\"").starts_with("network[0].address"));
        assert!(
            refused("[[network]]\nmatch = \"not a name or mac\"").starts_with("network[0].match")
        );
        assert!(
            refused("[[network]]\ndhcp = true\naddress = \"10.0.0.1/8\"")
                .starts_with("network[0]:")
        );
        assert!(refused("[[network]]\ndns = [\"x\"]").starts_with("network[0].dns"));
    }
}
