//! Per-machine customization of a captured Linux system: a [`Spec`] (TOML) says what a
//! deployed or copied system gets of its own — host name, machine-id, SSH host keys, users,
//! files, network settings in the system's own tool's format, first-boot commands — and a
//! [`Customization`] makes those edits, as a [`TreeTransform`], to the tree of each Linux root
//! partition while the pipeline recreates it. The capture is never written; originals that are
//! replaced stay beside the new files as `*.diskferry-orig`.
//!
//! Everything random (the machine-id, the SSH host keys) is made once, when the
//! customization is built, so applying it again (a deploy's verification does) makes the
//! same edits.

#![forbid(unsafe_code)]

mod analysis;
pub mod compat;
mod cpio;
mod edits;
mod hardware;
mod initramfs;
pub mod modalias;
mod network;
mod spec;
mod ssh;
mod users;

use std::sync::{Arc, Mutex};

use diskferry_fs::overlay::{TreeOverlay, TreeTransform};
use diskferry_fs::{Filesystem, FsError, Timestamp};

pub use analysis::{analyze, InitramfsReport, SystemReport};
pub use hardware::TargetHardware;
pub use spec::{MachineId, Network, Spec, SpecError, SshHostKeys, User};

/// Suffix of the originals of replaced files.
pub const ORIG_SUFFIX: &str = ".diskferry-orig";
/// Configuration files are read whole up to this size.
const MAX_CONFIG: u64 = 4 << 20;

/// Why a customization cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum CustomizeError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("generating SSH host keys: {0}")]
    Keys(String),
    #[error("{0}")]
    System(String),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// A rendered SPEC with its random material, ready to apply.
pub struct Customization {
    spec: Spec,
    time: Timestamp,
    machine_id: Option<String>,
    host_keys: Option<Vec<ssh::HostKey>>,
    /// Reconfiguration for new hardware, with the source disk's filesystem UUIDs by
    /// partition number.
    hardware: Option<(TargetHardware, std::collections::BTreeMap<u32, String>)>,
    /// Partitions it was applied to.
    applied: Mutex<Vec<u32>>,
    /// Initramfs files already rebuilt, by partition and path: a deploy applies the edits
    /// three times (its check, the write, the verification) and unpacking, adding and
    /// compressing again would be the same work each time.
    initrds: hardware::Rebuilt,
}

impl std::fmt::Debug for Customization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Customization {
    /// `spec` rendered for the machine named `machine` (`{name}`), with a new machine-id
    /// and new SSH host keys when it asks for them (RSA keys take a second or two).
    pub fn new(spec: &Spec, machine: Option<&str>) -> Result<Customization, CustomizeError> {
        let spec = spec.render(machine)?;
        let machine_id = match spec.machine_id {
            Some(MachineId::New) => Some(edits::random_machine_id()?),
            Some(MachineId::Empty) => Some(String::new()),
            None => None,
        };
        let host_keys = match spec.ssh_host_keys {
            Some(SshHostKeys::Regenerate) => Some(ssh::generate()?),
            _ => None,
        };
        Ok(Customization {
            spec,
            time: diskferry_fs::overlay::now(),
            machine_id,
            host_keys,
            hardware: None,
            applied: Mutex::new(Vec::new()),
            initrds: Default::default(),
        })
    }

    /// Also reconfigure the system for `hw` (drivers in the initramfs, root by UUID, network
    /// unpinned from MAC addresses); `uuids`: the source disk's filesystem UUIDs by partition
    /// number, for device names in fstab and GRUB's menu.
    pub fn with_target_hardware(
        mut self,
        hw: TargetHardware,
        uuids: std::collections::BTreeMap<u32, String>,
    ) -> Customization {
        self.hardware = Some((hw, uuids));
        self
    }

    /// Parses the SPEC file at `path` and builds the customization for `machine`.
    pub fn from_file(
        path: &std::path::Path,
        machine: Option<&str>,
    ) -> Result<Customization, CustomizeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CustomizeError::System(format!("reading {}: {e}", path.display())))?;
        Customization::new(&Spec::parse(&text)?, machine)
    }

    /// The partitions it was applied to so far (those holding a Linux system's root).
    pub fn applied(&self) -> Vec<u32> {
        self.applied.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// All the edits, onto `o` (the tree of `partition`); a line per change.
    fn edit(&self, o: &mut TreeOverlay, partition: u32) -> Result<Vec<String>, CustomizeError> {
        let mut changes = Vec::new();
        if let Some((hw, uuids)) = &self.hardware {
            let how = hardware::How {
                hw: *hw,
                uuids,
                mtime: u32::try_from(self.time.secs).unwrap_or(0),
                partition,
                rebuilt: &self.initrds,
            };
            changes.extend(hardware::reconfigure(o, &how)?);
        }
        if let Some(h) = &self.spec.hostname {
            changes.extend(edits::hostname(o, h)?);
        }
        if let Some(id) = &self.machine_id {
            changes.extend(edits::machine_id(o, id)?);
        }
        if let Some(keys) = &self.host_keys {
            changes.extend(ssh::install(o, keys)?);
        }
        for u in &self.spec.users {
            changes.extend(users::apply(o, u, self.time)?);
        }
        for f in &self.spec.files {
            changes.extend(edits::file(o, f)?);
        }
        if !self.spec.network.is_empty() {
            changes.extend(network::apply(o, &self.spec.network)?);
        }
        if !self.spec.first_boot.is_empty() {
            changes.extend(edits::first_boot(o, &self.spec.first_boot)?);
        }
        Ok(changes)
    }
}

pub use diskferry_fs::is_linux_root;

impl TreeTransform for Customization {
    fn apply(
        &self,
        partition: u32,
        base: Arc<dyn Filesystem>,
    ) -> diskferry_fs::Result<Option<(TreeOverlay, Vec<String>)>> {
        if !is_linux_root(&*base) {
            return Ok(None);
        }
        let mut o = TreeOverlay::new(base, self.time);
        let changes = self.edit(&mut o, partition).map_err(|e| match e {
            CustomizeError::Fs(e) => e,
            other => FsError::Unsupported(format!("customizing partition {partition}: {other}")),
        })?;
        if let Ok(mut a) = self.applied.lock() {
            if !a.contains(&partition) {
                a.push(partition);
            }
        }
        Ok(Some((o, changes)))
    }

    fn describe(&self) -> String {
        let s = &self.spec;
        let mut parts = Vec::new();
        if let Some((hw, _)) = &self.hardware {
            parts.push(format!("reconfigured for {} hardware", hw.name()));
        }
        if let Some(h) = &s.hostname {
            parts.push(format!("hostname {h}"));
        }
        if let Some(m) = s.machine_id {
            parts.push(format!("machine-id {m:?}").to_lowercase());
        }
        if self.host_keys.is_some() {
            parts.push("new SSH host keys".into());
        }
        for (what, n) in [
            ("network", s.network.len()),
            ("user", s.users.len()),
            ("file", s.files.len()),
            ("first-boot command", s.first_boot.len()),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}(s)"));
            }
        }
        format!("customization: {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_fs::host::HostFs;

    /// A small Debian-like root: os-release, hostname, hosts, accounts, an SSH host key, a
    /// netplan file and bash.
    fn root() -> (tempfile::TempDir, Arc<dyn Filesystem>) {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["etc/ssh", "etc/netplan", "usr/bin", "home"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let files = [
            ("etc/os-release", "ID=debian\n"),
            ("etc/hostname", "golden\n"),
            ("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n"),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/group", "root:x:0:\nshadow:x:42:\nsudo:x:27:\n"),
            ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
            ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
            ("etc/ssh/ssh_host_ed25519_key", "old key"),
            ("etc/ssh/ssh_host_ed25519_key.pub", "old pub"),
            ("etc/netplan/01-netcfg.yaml", "network: {}\n"),
            ("usr/bin/bash", ""),
        ];
        for (p, t) in files {
            std::fs::write(r.join(p), t).unwrap();
        }
        // Merged /usr, as Debian 12 has it: edits never cross these links, lookups may.
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        let fs: Arc<dyn Filesystem> = Arc::new(HostFs::open(r).unwrap());
        (dir, fs)
    }

    fn text(o: &TreeOverlay, p: &str) -> String {
        String::from_utf8(o.read_file(p, 1 << 20).unwrap().unwrap()).unwrap()
    }

    #[test]
    fn a_customization_edits_a_linux_root_and_keeps_the_originals() {
        let (_dir, fs) = root();
        let spec = Spec::parse(
            r#"
            hostname = "{name}"
            machine_id = "new"
            ssh_host_keys = "regenerate"
            first_boot = ["touch /first-boot-ran"]
            [[network]]
            match = "52:54:00:AA:BB:CC"
            [[users]]
            name = "alice"
            password_hash = "$6$s$h"
            authorized_keys = ["ssh-ed25519 AAAAC3Nza alice@laptop"]
            groups = ["sudo"]
            [[files]]
            path = "/etc/motd"
            content = "welcome to {name}\n"
            "#,
        )
        .unwrap();
        let c = Customization::new(&spec, Some("web-07")).unwrap();
        let (o, changes) = c.apply(2, Arc::clone(&fs)).unwrap().unwrap();
        assert_eq!(c.applied(), [2]);
        assert!(changes.len() >= 8, "{changes:#?}");
        assert_eq!(text(&o, "/etc/hostname"), "web-07\n");
        assert_eq!(text(&o, "/etc/hostname.diskferry-orig"), "golden\n");
        assert!(text(&o, "/etc/hosts").contains("127.0.1.1\tweb-07\n"));
        let id = text(&o, "/etc/machine-id");
        assert!(
            id.len() == 33 && id != "0123456789abcdef0123456789abcdef\n",
            "{id}"
        );
        let key = text(&o, "/etc/ssh/ssh_host_ed25519_key");
        assert!(
            key.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
            "{key}"
        );
        assert!(text(&o, "/etc/ssh/ssh_host_rsa_key.pub").starts_with("ssh-rsa "));
        assert!(text(&o, "/etc/ssh/ssh_host_ecdsa_key.pub").starts_with("ecdsa-sha2-nistp256 "));
        let m = o
            .metadata(o.lookup("/etc/ssh/ssh_host_rsa_key").unwrap())
            .unwrap();
        assert_eq!((m.mode, m.uid), (0o600, 0));
        assert!(text(&o, "/etc/passwd").contains("alice:x:1000:1000::/home/alice:/bin/bash\n"));
        assert!(text(&o, "/etc/group").contains("sudo:x:27:alice\n"));
        assert!(text(&o, "/etc/shadow").contains("alice:$6$s$h:"));
        let keys = o.lookup("/home/alice/.ssh/authorized_keys").unwrap();
        let m = o.metadata(keys).unwrap();
        assert_eq!((m.mode, m.uid, m.gid), (0o600, 1000, 1000));
        assert_eq!(text(&o, "/etc/motd"), "welcome to web-07\n");
        assert!(text(&o, "/etc/netplan/90-diskferry.yaml")
            .contains("macaddress: \"52:54:00:aa:bb:cc\""));
        assert!(text(&o, "/usr/local/sbin/diskferry-first-boot").contains("touch /first-boot-ran"));
        assert!(o
            .lookup("/etc/systemd/system/multi-user.target.wants/diskferry-first-boot.service")
            .is_ok());
        // Applied again (as a verification does): the very same edits.
        let (again, _) = c.apply(2, fs).unwrap().unwrap();
        for p in [
            "/etc/machine-id",
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/passwd",
        ] {
            assert_eq!(text(&again, p), text(&o, p));
            let (a, b) = (again.lookup(p).unwrap(), o.lookup(p).unwrap());
            assert_eq!(
                again.metadata(a).unwrap().mtime,
                o.metadata(b).unwrap().mtime
            );
        }
    }

    #[test]
    fn a_tree_without_a_linux_system_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.bin"), "x").unwrap();
        let fs: Arc<dyn Filesystem> = Arc::new(HostFs::open(dir.path()).unwrap());
        let spec = Spec::parse("hostname = \"x\"").unwrap();
        let c = Customization::new(&spec, None).unwrap();
        assert!(c.apply(1, fs).unwrap().is_none());
        assert!(c.applied().is_empty());
    }
}
