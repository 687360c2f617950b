//! What a Linux root says about moving it to other hardware, read from its files alone:
//! each initramfs (builder, compression, the storage and network drivers it holds), the
//! network tool and which of its files pin interfaces to MAC addresses, and how fstab and the
//! boot menu name the root. `inspect` shows it; reconfiguration acts on the same facts.

use serde::{Deserialize, Serialize};

use diskferry_fs::overlay::TreeOverlay;
use diskferry_fs::Filesystem;

use crate::initramfs::Initramfs;

/// One initramfs of the system.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitramfsReport {
    pub path: String,
    pub kernel: String,
    /// "initramfs-tools", "dracut" or "unknown".
    pub builder: String,
    /// "gzip", "zstd", "none"; empty when it could not be read.
    pub compression: String,
    /// Modules under drivers/{ata,scsi,block,nvme,mmc,hv}, drivers/virtio and usb storage.
    pub storage_drivers: Vec<String>,
    /// Modules under drivers/net.
    pub network_drivers: Vec<String>,
    /// Storage drivers built into the kernel (`modules.builtin`): usable without the
    /// initramfs carrying them.
    #[serde(default)]
    pub builtin_storage: Vec<String>,
    /// Network modules the system has in `/lib/modules/VERSION` (loaded after the root is
    /// mounted) and built in.
    #[serde(default)]
    pub network_modules: Vec<String>,
    /// Why it could not be read, when it could not.
    pub error: Option<String>,
}

/// The system's hardware-dependent configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemReport {
    pub initramfs: Vec<InitramfsReport>,
    /// "netplan", "networkmanager", "ifupdown" or "networkd".
    pub network_tool: String,
    /// Files that tie interfaces to MAC addresses.
    pub mac_pinned: Vec<String>,
    /// How fstab names the root: "UUID", "LABEL", "PARTUUID", "device /dev/sda1", ….
    pub root_in_fstab: Option<String>,
    /// How GRUB's menu passes the root (`root=` of its first `linux` line).
    pub root_in_boot_menu: Option<String>,
}

/// `UUID=x` → "UUID"; `/dev/sda1` → "device /dev/sda1".
fn naming(spec: &str) -> String {
    match spec.split_once('=') {
        Some((kind, _)) if !spec.starts_with('/') => kind.to_string(),
        _ => format!("device {spec}"),
    }
}

fn classify(path: &str) -> Option<bool> {
    const STORAGE: &[&str] = &[
        "/drivers/ata/",
        "/drivers/scsi/",
        "/drivers/block/",
        "/drivers/nvme/",
        "/drivers/mmc/",
        "/drivers/virtio/",
        "/drivers/usb/storage/",
    ];
    if !path.contains(".ko") {
        return None;
    }
    if STORAGE.iter().any(|s| path.contains(s)) {
        return Some(true);
    }
    path.contains("/drivers/net/").then_some(false)
}

fn initramfs_report(o: &TreeOverlay, path: &str, kernel: &str, builder: &str) -> InitramfsReport {
    let mut r = InitramfsReport {
        path: path.to_string(),
        kernel: kernel.to_string(),
        builder: builder.to_string(),
        ..Default::default()
    };
    let parsed = o
        .read_file(path, crate::initramfs::MAX_UNPACKED)
        .map_err(crate::CustomizeError::from)
        .and_then(|b| Initramfs::parse(&b.unwrap_or_default()));
    match parsed {
        Ok(ramfs) => {
            r.compression = format!("{:?}", ramfs.compression).to_lowercase();
            for e in &ramfs.entries {
                let name = crate::hardware::module_name(&e.name);
                match classify(&e.name) {
                    Some(true) => r.storage_drivers.push(name),
                    Some(false) => r.network_drivers.push(name),
                    None => {}
                }
            }
            r.storage_drivers.sort();
            r.network_drivers.sort();
        }
        Err(e) => r.error = Some(e.to_string()),
    }
    kernel_modules(o, kernel, &mut r);
    r
}

/// The kernel's own storage drivers built in, and its network modules, from its indexes.
fn kernel_modules(o: &TreeOverlay, kernel: &str, r: &mut InitramfsReport) {
    let Some(dir) = crate::hardware::modules_dir(o, kernel) else {
        return;
    };
    let paths = |index: &str| -> Vec<String> {
        crate::compat::read_index(o, &dir, index)
            .map(|t| {
                t.lines()
                    .filter_map(|l| l.split(':').next())
                    .map(|p| p.trim().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let builtin = paths("modules.builtin");
    let named = |p: &String, storage| {
        let p = format!("/{p}");
        (classify(&p) == Some(storage)).then(|| crate::hardware::module_name(&p))
    };
    r.builtin_storage = builtin.iter().filter_map(|p| named(p, true)).collect();
    r.network_modules = paths("modules.dep")
        .iter()
        .chain(&builtin)
        .filter_map(|p| named(p, false))
        .collect();
    r.builtin_storage.sort();
    r.builtin_storage.dedup();
    r.network_modules.sort();
    r.network_modules.dedup();
}

/// The report for the Linux root `fs` (its files only; nothing is written).
pub fn analyze(fs: std::sync::Arc<dyn Filesystem>) -> SystemReport {
    let o = TreeOverlay::new(fs, diskferry_fs::overlay::now());
    let builder = if o.lookup("/etc/dracut.conf").is_ok() || o.lookup("/usr/lib/dracut").is_ok() {
        "dracut"
    } else if o.lookup("/etc/initramfs-tools").is_ok() {
        "initramfs-tools"
    } else {
        "unknown"
    };
    let mut report = SystemReport {
        initramfs: crate::hardware::kernel_initrds(&o)
            .into_iter()
            .map(|(kernel, path)| initramfs_report(&o, &path, &kernel, builder))
            .collect(),
        network_tool: crate::network::tool_of(&o)
            .map(|t| format!("{t:?}").to_lowercase())
            .unwrap_or_default(),
        mac_pinned: crate::hardware::mac_pinned_files(&o).unwrap_or_default(),
        ..Default::default()
    };
    let text = |p: &str| {
        crate::edits::read_text(&o, p)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    report.root_in_fstab = text("/etc/fstab")
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() > 1 && w[1] == "/" && !w[0].starts_with('#'))
        .map(|w| naming(w[0]));
    report.root_in_boot_menu = ["/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"]
        .iter()
        .map(|p| text(p))
        .find_map(|t| {
            t.split_whitespace()
                .find_map(|w| w.strip_prefix("root=").map(naming))
        });
    report
}
