//! Reconfiguration for new hardware (P2V, V2P): a Linux system moved onto another storage
//! controller and NIC must still find its root and bring its network up.
//! - **Drivers:** for each kernel with an initramfs, the target's storage and network
//!   modules (and everything `modules.dep` says they need) that the initramfs lacks are taken
//!   from the system's own `/lib/modules/VERSION` and added, with the system's module indexes
//!   (`modules.dep`, `.alias`, their `.bin` forms…) so `modprobe` and udev find them, and their
//!   names in `conf/modules` so the initramfs loads them; they are recorded in
//!   `/etc/initramfs-tools/modules` (or a dracut conf) so later rebuilds keep them.
//! - **Root by name:** `/dev/sdXN`-style devices in `/etc/fstab` and `root=` in GRUB's menu
//!   become `UUID=…` (a device name changes with the controller).
//! - **MAC-pinned network:** udev persistent-net rules go; networkd `MACAddress=` matches,
//!   netplan `macaddress:` matches and NetworkManager `mac-address=` lines are rewritten to
//!   match any Ethernet NIC, so the new NIC comes up as the old one did (DHCP stays DHCP).
//!
//! Every replaced file stays beside the new one as `*.diskferry-orig`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use diskferry_fs::overlay::{Attrs, TreeOverlay};
use diskferry_fs::{FileKind, Filesystem};

use crate::cpio::Entry;
use crate::edits::{files_in, put_text, read_text};
use crate::initramfs::Initramfs;
use crate::{CustomizeError, ORIG_SUFFIX};

/// Largest initramfs or module file read.
const MAX_FILE: u64 = 512 << 20;

/// What a system is moved onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetHardware {
    Virtio,
    Ahci,
    Nvme,
    Hyperv,
    Vmware,
}

impl std::str::FromStr for TargetHardware {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "virtio" => TargetHardware::Virtio,
            "ahci" => TargetHardware::Ahci,
            "nvme" => TargetHardware::Nvme,
            "hyperv" => TargetHardware::Hyperv,
            "vmware" => TargetHardware::Vmware,
            other => {
                return Err(format!(
                    "{other:?}: one of virtio, ahci, nvme, hyperv, vmware"
                ))
            }
        })
    }
}

impl TargetHardware {
    /// Every target, in the order the command line lists them.
    pub const ALL: [TargetHardware; 5] = [
        TargetHardware::Virtio,
        TargetHardware::Ahci,
        TargetHardware::Nvme,
        TargetHardware::Hyperv,
        TargetHardware::Vmware,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TargetHardware::Virtio => "virtio",
            TargetHardware::Ahci => "ahci",
            TargetHardware::Nvme => "nvme",
            TargetHardware::Hyperv => "hyperv",
            TargetHardware::Vmware => "vmware",
        }
    }

    /// The modules a system needs there: storage first, then network.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            TargetHardware::Virtio => &[
                "virtio_pci",
                "virtio_blk",
                "virtio_scsi",
                "sd_mod",
                "virtio_net",
            ],
            TargetHardware::Ahci => &["ahci", "sd_mod", "e1000e", "e1000"],
            TargetHardware::Nvme => &["nvme"],
            TargetHardware::Hyperv => &["hv_vmbus", "hv_storvsc", "sd_mod", "hv_netvsc"],
            TargetHardware::Vmware => {
                &["vmw_pvscsi", "mptspi", "ahci", "sd_mod", "vmxnet3", "e1000"]
            }
        }
    }
}

/// A module's name as modprobe knows it: the file name without `.ko[.xz|.zst|.gz]`, `-` as `_`.
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module path as `modules.dep` should have it: relative, inside the modules directory.
fn plain_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.split('/').any(|c| c == ".." || c.is_empty())
}

/// `modules.dep`: each module's path (relative to its modules directory) → its dependencies.
/// Lines naming paths that leave the directory are left out (the file comes from the image).
pub(crate) fn parse_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let (path, deps) = l.split_once(':')?;
            let path = path.trim();
            let deps: Vec<String> = deps.split_whitespace().map(String::from).collect();
            (plain_path(path) && deps.iter().all(|d| plain_path(d)))
                .then(|| (module_name(path), (path.to_string(), deps)))
        })
        .collect()
}

/// The paths of `wanted` and everything they need, by `dep`; and the names found nowhere
/// (neither a module nor built in).
fn closure(
    wanted: &[&str],
    dep: &BTreeMap<String, (String, Vec<String>)>,
    builtin: &BTreeSet<String>,
) -> (BTreeSet<String>, Vec<String>) {
    let mut paths = BTreeSet::new();
    let mut missing = Vec::new();
    let mut todo: Vec<String> = wanted.iter().map(|w| w.to_string()).collect();
    while let Some(name) = todo.pop() {
        match dep.get(&name) {
            Some((path, deps)) => {
                if paths.insert(path.clone()) {
                    todo.extend(deps.iter().map(|d| module_name(d)));
                }
            }
            None if builtin.contains(&name) => {}
            None => missing.push(name),
        }
    }
    (paths, missing)
}

/// Index files copied from the system into the initramfs with the modules.
const INDEXES: &[&str] = &[
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.builtin.modinfo",
    "modules.order",
    "modules.devname",
];

/// A kernel of the system: its version, initramfs and modules directory.
struct Kernel {
    version: String,
    initrd: String,
    modules: String,
}

/// Each kernel in `/boot` with its initramfs (Debian's `initrd.img-V` or dracut's
/// `initramfs-V.img`): (version, initramfs path).
pub(crate) fn kernel_initrds(o: &TreeOverlay) -> Vec<(String, String)> {
    let Ok(boot) = o.lookup("/boot") else {
        return Vec::new();
    };
    let entries = o.read_dir(boot).unwrap_or_default();
    entries
        .iter()
        .filter_map(|e| e.name_lossy().strip_prefix("vmlinuz-").map(String::from))
        .filter_map(|version| {
            let initrd = [
                format!("/boot/initrd.img-{version}"),
                format!("/boot/initramfs-{version}.img"),
            ]
            .into_iter()
            .find(|p| matches!(o.stat(p), Ok(Some((_, FileKind::File)))))?;
            Some((version, initrd))
        })
        .collect()
}

/// Kernel `version`'s modules directory (`/lib/modules/V` or `/usr/lib/modules/V`).
pub(crate) fn modules_dir(o: &TreeOverlay, version: &str) -> Option<String> {
    [
        format!("/lib/modules/{version}"),
        format!("/usr/lib/modules/{version}"),
    ]
    .into_iter()
    .find(|p| o.resolve(p).is_ok())
}

fn kernels(o: &TreeOverlay) -> Vec<Kernel> {
    kernel_initrds(o)
        .into_iter()
        .filter_map(|(version, initrd)| {
            let modules = modules_dir(o, &version)?;
            Some(Kernel {
                version,
                initrd,
                modules,
            })
        })
        .collect()
}

fn read_system(o: &TreeOverlay, path: &str) -> Result<Vec<u8>, CustomizeError> {
    let node = o.resolve(path)?;
    Ok(o.read_all(node, MAX_FILE)?)
}

/// Where the initramfs keeps kernel `version`'s modules (`usr/lib/modules/V/` or
/// `lib/modules/V/`).
fn modules_prefix(ramfs: &Initramfs, version: &str) -> String {
    let tail = format!("modules/{version}/modules.dep");
    ramfs
        .entries
        .iter()
        .find_map(|e| {
            e.name
                .strip_suffix("modules.dep")
                .filter(|_| e.name.ends_with(&tail))
        })
        .map(String::from)
        .unwrap_or_else(|| {
            let usr = ramfs.find("usr/lib").is_some_and(Entry::is_dir);
            format!("{}lib/modules/{version}/", if usr { "usr/" } else { "" })
        })
}

/// One initramfs's reconfiguration: the new bytes (`None` when nothing was added) and the
/// line saying what was done.
pub(crate) type Drivers = (Option<Arc<[u8]>>, String);

/// Initramfs files rebuilt so far, by `partition:path`.
pub(crate) type Rebuilt = Mutex<HashMap<String, Drivers>>;

/// How to reconfigure one partition's tree.
pub(crate) struct How<'a> {
    pub hw: TargetHardware,
    /// The source disk's filesystem UUIDs by partition number.
    pub uuids: &'a BTreeMap<u32, String>,
    /// Dates what goes into initramfs archives.
    pub mtime: u32,
    pub partition: u32,
    pub rebuilt: &'a Rebuilt,
}

/// [`add_drivers`], or what an earlier application of the same edits to the same partition
/// made of this initramfs.
fn add_drivers_once(
    o: &mut TreeOverlay,
    k: &Kernel,
    how: &How<'_>,
) -> Result<String, CustomizeError> {
    let key = format!("{}:{}", how.partition, k.initrd);
    let cached = how.rebuilt.lock().ok().and_then(|m| m.get(&key).cloned());
    let (bytes, line) = match cached {
        Some(done) => done,
        None => {
            let done = add_drivers(o, k, how.hw, how.mtime)?;
            if let Ok(mut m) = how.rebuilt.lock() {
                m.insert(key, done.clone());
            }
            done
        }
    };
    if let Some(bytes) = bytes {
        o.replace_file(&k.initrd, bytes.to_vec(), ORIG_SUFFIX)?;
    }
    Ok(line)
}

/// What `hw` needs added to kernel `k`'s initramfs: the new initramfs (`None` when nothing
/// was missing), and a line saying what was added and which of the target's modules the
/// kernel does not have.
fn add_drivers(
    o: &TreeOverlay,
    k: &Kernel,
    hw: TargetHardware,
    mtime: u32,
) -> Result<Drivers, CustomizeError> {
    let dep = parse_dep(&String::from_utf8_lossy(&read_system(
        o,
        &format!("{}/modules.dep", k.modules),
    )?));
    let builtin: BTreeSet<String> = read_system(o, &format!("{}/modules.builtin", k.modules))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .map(module_name)
                .collect()
        })
        .unwrap_or_default();
    let (paths, missing) = closure(hw.modules(), &dep, &builtin);
    let mut ramfs = Initramfs::parse(&read_system(o, &k.initrd)?)?;
    let prefix = modules_prefix(&ramfs, &k.version);
    let mut added = Vec::new();
    let mut added_bytes = 0u64;
    for path in &paths {
        let name = format!("{prefix}{path}");
        if ramfs.find(&name).is_none() {
            let bytes = read_system(o, &format!("{}/{path}", k.modules))?;
            added_bytes += bytes.len() as u64;
            if added_bytes > crate::initramfs::MAX_UNPACKED {
                return Err(CustomizeError::System(format!(
                    "{}: the modules to add come to more than {} MiB",
                    k.initrd,
                    crate::initramfs::MAX_UNPACKED >> 20
                )));
            }
            ramfs.put(Entry::file(&name, 0o644, mtime, bytes));
            added.push(module_name(path));
        }
    }
    let lacking = if missing.is_empty() {
        String::new()
    } else {
        format!(
            " (kernel {} has no {}: not added)",
            k.version,
            missing.join(", ")
        )
    };
    if added.is_empty() {
        return Ok((
            None,
            format!("initramfs {}: nothing to add{lacking}", k.initrd),
        ));
    }
    for index in INDEXES {
        if let Ok(bytes) = read_system(o, &format!("{}/{index}", k.modules)) {
            ramfs.put(Entry::file(
                &format!("{prefix}{index}"),
                0o644,
                mtime,
                bytes,
            ));
        }
    }
    let mut conf = ramfs
        .find("conf/modules")
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .unwrap_or_default();
    for m in hw.modules().iter().filter(|m| dep.contains_key(**m)) {
        if !conf.lines().any(|l| l.trim() == *m) {
            conf.push_str(&format!("{m}\n"));
        }
    }
    ramfs.put(Entry::file("conf/modules", 0o644, mtime, conf.into_bytes()));
    added.sort();
    let line = format!(
        "initramfs {} ({}, written back gzip): added {}{lacking}",
        k.initrd,
        format!("{:?}", ramfs.compression).to_lowercase(),
        added.join(", ")
    );
    Ok((Some(ramfs.to_bytes()?.into()), line))
}

/// The target's modules named where the system's initramfs builder reads them, so later
/// rebuilds keep them.
fn record_modules(o: &mut TreeOverlay, hw: TargetHardware) -> Result<String, CustomizeError> {
    if o.stat("/etc/dracut.conf.d")?.is_some() || o.stat("/etc/dracut.conf")?.is_some() {
        let conf = format!(
            "# Written by diskferry: drivers of the {} target hardware.\nadd_drivers+=\" {} \"\n",
            hw.name(),
            hw.modules().join(" ")
        );
        o.create_dirs("/etc/dracut.conf.d", Attrs::root(0o755))?;
        o.write_file(
            "/etc/dracut.conf.d/90-diskferry.conf",
            conf.into_bytes(),
            Attrs::root(0o644),
        )?;
        return Ok("drivers recorded in /etc/dracut.conf.d/90-diskferry.conf".into());
    }
    let path = "/etc/initramfs-tools/modules";
    let mut text = read_text(o, path)?.unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let missing: Vec<&str> = hw
        .modules()
        .iter()
        .copied()
        .filter(|m| !text.lines().any(|l| l.trim() == *m))
        .collect();
    if missing.is_empty() {
        return Ok(format!("drivers already listed in {path}"));
    }
    text.push_str(&format!(
        "# Added by diskferry: drivers of the {} target hardware.\n",
        hw.name()
    ));
    for m in &missing {
        text.push_str(&format!("{m}\n"));
    }
    o.create_dirs("/etc/initramfs-tools", Attrs::root(0o755))?;
    put_text(o, path, text, Attrs::root(0o644))?;
    Ok(format!("drivers recorded in {path}"))
}

/// The partition number a kernel device name of the source disk names (`/dev/sda2`,
/// `/dev/vdb1`, `/dev/nvme0n1p3`, `/dev/mmcblk0p1`, `/dev/xvda1`).
fn partition_of(dev: &str) -> Option<u32> {
    let name = dev.strip_prefix("/dev/")?;
    let digits_at = name.rfind(|c: char| !c.is_ascii_digit())? + 1;
    let (stem, number) = name.split_at(digits_at);
    let number: u32 = number.parse().ok()?;
    let disk_like = ["sd", "hd", "vd", "xvd"].iter().any(|p| {
        stem.strip_prefix(p)
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_lowercase()))
    }) || ((stem.starts_with("nvme") || stem.starts_with("mmcblk"))
        && stem.ends_with('p'));
    disk_like.then_some(number)
}

/// `text` with every device name of a partition in `uuids` replaced by `UUID=…` where
/// `in_line` finds it; the number of replacements.
fn rename_devices(text: &str, uuids: &BTreeMap<u32, String>, fstab: bool) -> (String, usize) {
    let mut n = 0;
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let mut l = line.to_string();
        let words: Vec<&str> = line.split_whitespace().collect();
        let candidates: Vec<&str> = if fstab {
            words
                .first()
                .filter(|w| !w.starts_with('#'))
                .into_iter()
                .copied()
                .collect()
        } else {
            words
                .iter()
                .filter_map(|w| w.strip_prefix("root="))
                .collect()
        };
        for dev in candidates {
            if let Some(uuid) = partition_of(dev).and_then(|p| uuids.get(&p)) {
                l = l.replacen(dev, &format!("UUID={uuid}"), 1);
                n += 1;
            }
        }
        out.push_str(&l);
    }
    (out, n)
}

fn root_by_uuid(
    o: &mut TreeOverlay,
    uuids: &BTreeMap<u32, String>,
) -> Result<Vec<String>, CustomizeError> {
    let mut changes = Vec::new();
    for (path, fstab) in [
        ("/etc/fstab", true),
        ("/boot/grub/grub.cfg", false),
        ("/boot/grub2/grub.cfg", false),
    ] {
        let Some(text) = read_text(o, path)? else {
            continue;
        };
        let (new, n) = rename_devices(&text, uuids, fstab);
        if n > 0 {
            put_text(o, path, new, Attrs::root(0o644))?;
            changes.push(format!("{path}: {n} device name(s) now UUID=…"));
        }
    }
    Ok(changes)
}

/// `text` with each line `pinned` says is a MAC pin replaced by what `rewrite` makes of it
/// (`None` drops it); whether anything changed.
fn unpin(
    text: &str,
    pinned: impl Fn(&str) -> bool,
    rewrite: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let mut changed = false;
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        if pinned(line.trim()) {
            changed = true;
            if let Some(r) = rewrite(line) {
                out.push_str(&r);
            }
        } else {
            out.push_str(line);
        }
    }
    changed.then_some(out)
}

fn indent(line: &str) -> &str {
    &line[..line.len() - line.trim_start().len()]
}

/// A file that ties network interfaces to MAC addresses.
enum Pin {
    /// udev's persistent-net rules: set aside.
    UdevRules(String),
    /// A config file and its text without the pins.
    Config(String, String),
}

/// The system's MAC pins.
fn pins(o: &TreeOverlay) -> Result<Vec<Pin>, CustomizeError> {
    let mut out = Vec::new();
    let rules = "/etc/udev/rules.d/70-persistent-net.rules";
    if let Some((_, FileKind::File)) = o.stat(rules)? {
        out.push(Pin::UdevRules(rules.to_string()));
    }
    let text = |path: &str| read_text(o, path).map(Option::unwrap_or_default);
    for path in files_in(o, "/etc/systemd/network", ".network")? {
        let new = unpin(
            &text(&path)?,
            |l| l.starts_with("MACAddress=") || l.starts_with("PermanentMACAddress="),
            |_| Some("Type=ether\n".into()),
        );
        out.extend(new.map(|n| Pin::Config(path, n)));
    }
    for path in files_in(o, "/etc/netplan", ".yaml")? {
        let new = unpin(
            &text(&path)?,
            |l| l.starts_with("macaddress:") || l.starts_with("set-name:"),
            |l| {
                l.trim()
                    .starts_with("macaddress:")
                    .then(|| format!("{}name: \"e*\"\n", indent(l)))
            },
        );
        out.extend(new.map(|n| Pin::Config(path, n)));
    }
    for path in files_in(o, "/etc/NetworkManager/system-connections", ".nmconnection")? {
        let new = unpin(&text(&path)?, |l| l.starts_with("mac-address="), |_| None);
        out.extend(new.map(|n| Pin::Config(path, n)));
    }
    Ok(out)
}

/// The files that tie interfaces to MAC addresses.
pub(crate) fn mac_pinned_files(o: &TreeOverlay) -> Result<Vec<String>, CustomizeError> {
    Ok(pins(o)?
        .into_iter()
        .map(|p| match p {
            Pin::UdevRules(path) | Pin::Config(path, _) => path,
        })
        .collect())
}

fn unpin_network(o: &mut TreeOverlay) -> Result<Vec<String>, CustomizeError> {
    let mut changes = Vec::new();
    for pin in pins(o)? {
        match pin {
            Pin::UdevRules(rules) => {
                o.rename(&rules, &format!("{rules}{ORIG_SUFFIX}"))?;
                changes.push(format!(
                    "network: {rules} set aside (it pinned names to MAC addresses)"
                ));
            }
            Pin::Config(path, text) => {
                put_text(o, &path, text, Attrs::root(0o600))?;
                changes.push(format!("network: {path} no longer pinned to a MAC address"));
            }
        }
    }
    Ok(changes)
}

/// Reconfigures the Linux root in `o` for `hw`; `uuids` are the source disk's partitions'
/// filesystem UUIDs by partition number; `mtime` dates what goes into initramfs archives.
pub(crate) fn reconfigure(
    o: &mut TreeOverlay,
    how: &How<'_>,
) -> Result<Vec<String>, CustomizeError> {
    let mut changes = Vec::new();
    let ks = kernels(o);
    if ks.is_empty() {
        changes.push("drivers: no kernel with an initramfs under /boot (is /boot a partition of its own? not reconfigured)".into());
    }
    for k in &ks {
        changes.push(add_drivers_once(o, k, how)?);
    }
    if !ks.is_empty() {
        changes.push(record_modules(o, how.hw)?);
    }
    changes.extend(root_by_uuid(o, how.uuids)?);
    changes.extend(unpin_network(o)?);
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_become_uuids_in_fstab_and_grub() {
        assert_eq!(partition_of("/dev/sda2"), Some(2));
        assert_eq!(partition_of("/dev/nvme0n1p3"), Some(3));
        assert_eq!(partition_of("/dev/mmcblk0p1"), Some(1));
        assert_eq!(partition_of("/dev/xvda1"), Some(1));
        assert_eq!(partition_of("/dev/sda"), None);
        assert_eq!(partition_of("/dev/loop0"), None);
        assert_eq!(partition_of("UUID=x"), None);
        let uuids = BTreeMap::from([(1, "aaaa".to_string()), (5, "bbbb".to_string())]);
        let fstab = "# /dev/sda1 was root\n/dev/sda1 / ext4 defaults 0 1\n/dev/sda5 none swap sw 0 0\nUUID=cc /home ext4 defaults 0 2\n";
        let (new, n) = rename_devices(fstab, &uuids, true);
        assert_eq!(n, 2);
        assert_eq!(new, "# /dev/sda1 was root\nUUID=aaaa / ext4 defaults 0 1\nUUID=bbbb none swap sw 0 0\nUUID=cc /home ext4 defaults 0 2\n");
        let (grub, n) = rename_devices("  linux /vmlinuz root=/dev/sda1 ro quiet\n", &uuids, false);
        assert_eq!(
            (grub.as_str(), n),
            ("  linux /vmlinuz root=UUID=aaaa ro quiet\n", 1)
        );
    }

    #[test]
    fn the_module_closure_follows_modules_dep() {
        let dep = parse_dep(
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/virtio.ko:\nkernel/drivers/virtio/virtio_ring.ko:\nkernel/drivers/virtio/virtio_pci_modern_dev.ko:\n",
        );
        let hostile = parse_dep("../../etc/shadow.ko:\nkernel/a.ko: /etc/passwd\nkernel//b.ko:\n");
        assert!(hostile.is_empty(), "{hostile:?}");
        let builtin = BTreeSet::from(["sd_mod".to_string()]);
        let (paths, missing) = closure(
            &["virtio_blk", "virtio_pci", "sd_mod", "virtio_scsi"],
            &dep,
            &builtin,
        );
        assert_eq!(paths.len(), 5);
        assert!(paths.contains("kernel/drivers/virtio/virtio_pci_modern_dev.ko"));
        assert_eq!(missing, ["virtio_scsi"]);
        assert_eq!(
            module_name("kernel/drivers/net/hv-netvsc.ko.xz"),
            "hv_netvsc"
        );
    }
}
