//! Who this machine is, for dial-back registration and for the server's compatibility check
//! before a deploy: MAC addresses of its network interfaces, DMI vendor/product/serial/UUID,
//! CPU count, memory, hostname, the disks served, the firmware type (UEFI when
//! `/sys/firmware/efi` exists), Secure Boot (efivarfs), and its PCI devices (class, ids,
//! bound driver, modalias; at most [`MAX_PCI`], storage and network controllers first) — read
//! from /sys and /proc, sent as one small JSON document (written by hand: the agent stays
//! small). Every value read from sysfs is bounded ([`MAX_FIELD`]) and escaped.
//!
//! `DISKFERRY_SYSFS` (a test seam, not a user option) names another directory to read as
//! /sys, so end-to-end tests can present a UEFI machine with a virtio disk controller.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::disks;
use crate::Config;

/// Most PCI devices described.
pub const MAX_PCI: usize = 256;
/// Most entries of /sys/bus/pci/devices looked at.
const MAX_PCI_SCAN: usize = 4096;
/// Longest value read from one sysfs attribute.
pub const MAX_FIELD: usize = 128;
/// Most bytes the PCI list takes in the document: half of what an identity may be, so the
/// rest (MACs, DMI, disks) always fits.
const PCI_BUDGET: usize = diskferry_protocol::MAX_IDENTITY / 2;
/// The EFI variable holding the Secure Boot state: 4 attribute bytes, then 1 (on) or 0.
const SECURE_BOOT: &str = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Where sysfs is read: `/sys`, or `DISKFERRY_SYSFS` (tests).
pub(crate) fn sysfs() -> PathBuf {
    std::env::var_os("DISKFERRY_SYSFS").map_or_else(|| PathBuf::from("/sys"), PathBuf::from)
}

/// The identity document.
pub fn collect(config: &Config) -> String {
    collect_at(config, &sysfs())
}

fn collect_at(config: &Config, sys: &Path) -> String {
    let dmi = |f: &str| read_trimmed(&sys.join("class/dmi/id").join(f));
    let mut out = String::from("{");
    field(
        &mut out,
        "hostname",
        read_trimmed(Path::new("/proc/sys/kernel/hostname")),
    );
    out.push_str("\"macs\":[");
    for (i, mac) in macs(sys).iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(&mut out, mac);
    }
    out.push_str("],");
    field(&mut out, "vendor", dmi("sys_vendor"));
    field(&mut out, "product", dmi("product_name"));
    field(&mut out, "serial", dmi("product_serial"));
    field(&mut out, "uuid", dmi("product_uuid"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = write!(out, "\"cpus\":{cpus},\"memory\":{},", memory_bytes());
    out.push_str("\"disks\":[");
    let mut first = true;
    for d in &config.disks {
        let Ok(info) = disks::describe(d, config.allow_write) else {
            continue;
        };
        if !first {
            out.push(',');
        }
        first = false;
        out.push('{');
        field(&mut out, "name", Some(info.name));
        let _ = write!(out, "\"size\":{},", info.size);
        field(&mut out, "model", Some(info.model));
        field(&mut out, "serial", Some(info.serial));
        field(&mut out, "controller", controller(&d.path, sys));
        let _ = write!(out, "\"read_only\":{}", info.read_only);
        out.push('}');
    }
    out.push_str("],");
    if let Some(live) = &config.live {
        out.push_str("\"live\":{");
        field(&mut out, "token", live.token());
        field(&mut out, "root", live.booted_root());
        field(&mut out, "boot", live.boot_id());
        field(&mut out, "file", Some(live.path().display().to_string()));
        let endpoint = live.endpoint();
        for how in ["listen", "connect"] {
            let addr = endpoint
                .as_ref()
                .filter(|e| e.0 == how)
                .map(|e| e.1.clone());
            field(&mut out, how, addr);
        }
        let _ = write!(
            out,
            "\"pinned\":{}}},",
            live.pinned_size()
                .map_or_else(|| "null".into(), |s| s.to_string())
        );
    }
    hardware(&mut out, sys);
    out.push('}');
    out
}

/// The PCI address of the controller behind the block device at `path` (`0000:00:04.0`):
/// the last PCI function on the way from `block/NAME/device` to the root of sysfs's device
/// tree; `None` for a file, or a device not on PCI.
fn controller(path: &Path, sys: &Path) -> Option<String> {
    let dev = std::fs::canonicalize(path).ok()?;
    let name = dev.strip_prefix("/dev").ok()?.to_str()?;
    let real = std::fs::canonicalize(sys.join("block").join(name).join("device")).ok()?;
    real.components()
        .rev()
        .filter_map(|c| c.as_os_str().to_str())
        .find(|c| is_pci_slot(c))
        .map(bounded_text)
}

/// `dddd:bb:dd.f` in hex.
fn is_pci_slot(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b':',
            10 => c == b'.',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `"firmware":…,"secure_boot":…,"pci":[…]`: what a deploy's compatibility check asks.
fn hardware(out: &mut String, sys: &Path) {
    firmware(out, sys);
    out.push_str("\"pci\":[");
    let mut listed = String::new();
    for dev in pci_devices(sys) {
        let mut one = String::new();
        dev.push_json(&mut one);
        // Escaped control bytes take six bytes each: the list is bounded as written.
        if listed.len() + one.len() + 1 > PCI_BUDGET {
            break;
        }
        if !listed.is_empty() {
            listed.push(',');
        }
        listed.push_str(&one);
    }
    out.push_str(&listed);
    out.push(']');
}

/// `"firmware":"uefi"|"bios"|null,"secure_boot":true|false|null,`: UEFI when the kernel
/// shows `firmware/efi`, BIOS when it shows `firmware` without it, unknown when sysfs has no
/// `firmware` at all (not a kernel's sysfs).
fn firmware(out: &mut String, sys: &Path) {
    let efi = sys.join("firmware/efi");
    let uefi = efi.is_dir();
    let kind = match (uefi, sys.join("firmware").is_dir()) {
        (true, _) => Some("uefi".to_string()),
        (false, true) => Some("bios".to_string()),
        (false, false) => None,
    };
    field(out, "firmware", kind);
    let secure = uefi
        .then(|| read_bounded(&efi.join("efivars").join(SECURE_BOOT)))
        .flatten()
        .and_then(|v| v.get(4).map(|&b| b == 1));
    let _ = write!(
        out,
        "\"secure_boot\":{},",
        secure.map_or("null".to_string(), |b| b.to_string())
    );
}

/// One PCI function.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pci {
    slot: String,
    class: Option<String>,
    vendor: Option<String>,
    device: Option<String>,
    subsystem_vendor: Option<String>,
    subsystem_device: Option<String>,
    driver: Option<String>,
    modalias: Option<String>,
}

impl Pci {
    fn read(dir: &Path, slot: String) -> Pci {
        let attr = |name: &str| read_trimmed(&dir.join(name));
        Pci {
            class: attr("class"),
            vendor: attr("vendor"),
            device: attr("device"),
            subsystem_vendor: attr("subsystem_vendor"),
            subsystem_device: attr("subsystem_device"),
            driver: std::fs::read_link(dir.join("driver"))
                .ok()
                .and_then(|l| l.file_name().map(|n| bounded_text(&n.to_string_lossy()))),
            modalias: attr("modalias"),
            slot,
        }
    }

    /// Storage (class 0x01) and network (0x02) controllers sort first.
    fn rank(&self) -> u8 {
        match self.class.as_deref().map(|c| c.trim_start_matches("0x")) {
            Some(c) if c.starts_with("01") || c.starts_with("02") => 0,
            _ => 1,
        }
    }

    fn push_json(&self, out: &mut String) {
        out.push('{');
        field(out, "slot", Some(self.slot.clone()));
        field(out, "class", self.class.clone());
        field(out, "vendor", self.vendor.clone());
        field(out, "device", self.device.clone());
        field(out, "subsystem_vendor", self.subsystem_vendor.clone());
        field(out, "subsystem_device", self.subsystem_device.clone());
        field(out, "driver", self.driver.clone());
        field(out, "modalias", self.modalias.clone());
        out.pop(); // the last comma
        out.push('}');
    }
}

/// The PCI functions under `sys`/bus/pci/devices: storage and network controllers first,
/// then by address; at most [`MAX_PCI`].
fn pci_devices(sys: &Path) -> Vec<Pci> {
    let Ok(dir) = std::fs::read_dir(sys.join("bus/pci/devices")) else {
        return Vec::new();
    };
    let mut out: Vec<Pci> = dir
        .flatten()
        .take(MAX_PCI_SCAN)
        .map(|e| {
            let slot = bounded_text(&e.file_name().to_string_lossy());
            Pci::read(&e.path(), slot)
        })
        .collect();
    out.sort_by(|a, b| (a.rank(), &a.slot).cmp(&(b.rank(), &b.slot)));
    out.truncate(MAX_PCI);
    out
}

/// MAC addresses (lowercase, colon form) of interfaces that have one, loopback and all-zero
/// addresses left out; sorted.
pub fn macs(sys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(sys.join("class/net")) {
        for entry in dir.flatten() {
            if entry.file_name() == "lo" {
                continue;
            }
            if let Some(mac) = read_trimmed(&entry.path().join("address")) {
                let mac = mac.to_ascii_lowercase();
                if mac.len() == 17 && mac != "00:00:00:00:00:00" {
                    out.push(mac);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The first [`MAX_FIELD`] bytes of a file.
fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_FIELD as u64)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// `s` cut to at most [`MAX_FIELD`] bytes, at a character boundary.
fn bounded_text(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// A sysfs attribute as text, trimmed; at most [`MAX_FIELD`] bytes read.
pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    let bytes = read_bounded(path)?;
    let s = String::from_utf8_lossy(&bytes);
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// `"key":"value",` (or `null`).
fn field(out: &mut String, key: &str, value: Option<String>) {
    push_str(out, key);
    out.push(':');
    match value {
        Some(v) => push_str(out, &v),
        None => out.push_str("null"),
    }
    out.push(',');
}

/// A JSON string literal.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: UEFI with Secure Boot on, a virtio disk, an e1000e NIC, a host bridge,
    /// and a device whose values are hostile (quotes, control bytes, very long).
    fn fake_sysfs(root: &Path, secure: u8) {
        let efivars = root.join("firmware/efi/efivars");
        std::fs::create_dir_all(&efivars).unwrap();
        std::fs::write(efivars.join(SECURE_BOOT), [6, 0, 0, 0, secure]).unwrap();
        let drivers = root.join("bus/pci/drivers");
        let devices = root.join("bus/pci/devices");
        let long = "x".repeat(10_000);
        let hostile_alias = format!("pci:\"\\\n\u{1}{long}");
        let devs = [
            (
                "0000:00:00.0",
                "0x060000",
                "0x8086",
                "0x29c0",
                None,
                "pci:v00008086d000029C0sv00001AF4sd00001100bc06sc00i00",
            ),
            (
                "0000:00:04.0",
                "0x010000",
                "0x1af4",
                "0x1001",
                Some("virtio-pci"),
                "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",
            ),
            (
                "0000:00:03.0",
                "0x020000",
                "0x8086",
                "0x10d3",
                Some("e1000e"),
                "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00",
            ),
            (
                "0000:00:05.0",
                "0x0c0330",
                "0x1b36",
                "0x000d",
                Some("bad\"name"),
                hostile_alias.as_str(),
            ),
        ];
        for (slot, class, vendor, device, driver, alias) in devs {
            let d = devices.join(slot);
            std::fs::create_dir_all(&d).unwrap();
            for (f, v) in [
                ("class", class),
                ("vendor", vendor),
                ("device", device),
                ("subsystem_vendor", "0x1af4"),
                ("subsystem_device", "0x0002"),
                ("modalias", alias),
            ] {
                std::fs::write(d.join(f), format!("{v}\n")).unwrap();
            }
            if let Some(drv) = driver {
                std::fs::create_dir_all(drivers.join(drv)).unwrap();
                std::os::unix::fs::symlink(drivers.join(drv), d.join("driver")).unwrap();
            }
        }
    }

    #[test]
    fn a_disk_names_the_pci_controller_it_hangs_off() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        let dev = sys.join("devices/pci0000:00/0000:00:04.0/virtio1/block/vda");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(sys.join("block/null0")).unwrap();
        std::os::unix::fs::symlink(
            sys.join("devices/pci0000:00/0000:00:04.0/virtio1"),
            sys.join("block/null0/device"),
        )
        .unwrap();
        // /dev/null stands for the block device: its name is looked up under block/.
        assert_eq!(
            controller(Path::new("/dev/null"), sys).unwrap_or_default(),
            ""
        );
        std::fs::rename(sys.join("block/null0"), sys.join("block/null")).unwrap();
        assert_eq!(
            controller(Path::new("/dev/null"), sys).as_deref(),
            Some("0000:00:04.0")
        );
        assert_eq!(controller(&dev, sys), None, "not under /dev");
        assert!(
            is_pci_slot("0000:00:1f.2")
                && !is_pci_slot("pci0000:00")
                && !is_pci_slot("0000:00:1g.2")
        );
    }

    fn hardware_doc(root: &Path) -> serde_json::Value {
        let mut s = String::from("{");
        hardware(&mut s, root);
        s.push('}');
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))
    }

    #[test]
    fn firmware_secure_boot_and_pci_devices_come_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path(), 1);
        let doc = hardware_doc(dir.path());
        assert_eq!(doc["firmware"], "uefi");
        assert_eq!(doc["secure_boot"], true);
        let pci = doc["pci"].as_array().unwrap();
        assert_eq!(pci.len(), 4);
        // Storage and network first, then by address.
        let slots: Vec<&str> = pci.iter().map(|d| d["slot"].as_str().unwrap()).collect();
        assert_eq!(
            slots,
            [
                "0000:00:03.0",
                "0000:00:04.0",
                "0000:00:00.0",
                "0000:00:05.0"
            ]
        );
        let blk = &pci[1];
        assert_eq!(
            (
                blk["class"].as_str(),
                blk["vendor"].as_str(),
                blk["device"].as_str()
            ),
            (Some("0x010000"), Some("0x1af4"), Some("0x1001"))
        );
        assert_eq!(blk["driver"], "virtio-pci");
        assert_eq!(
            blk["modalias"],
            "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"
        );
        assert!(pci[2]["driver"].is_null());
        let odd = &pci[3];
        assert_eq!(odd["driver"], "bad\"name");
        let alias = odd["modalias"].as_str().unwrap();
        assert!(
            alias.len() <= MAX_FIELD && alias.starts_with("pci:\"\\\n\u{1}x"),
            "{alias:?}"
        );

        std::fs::write(
            dir.path().join("firmware/efi/efivars").join(SECURE_BOOT),
            [6, 0, 0, 0, 0],
        )
        .unwrap();
        assert_eq!(hardware_doc(dir.path())["secure_boot"], false);
        std::fs::remove_file(dir.path().join("firmware/efi/efivars").join(SECURE_BOOT)).unwrap();
        assert!(hardware_doc(dir.path())["secure_boot"].is_null());
        std::fs::remove_dir_all(dir.path().join("firmware/efi")).unwrap();
        let doc = hardware_doc(dir.path());
        assert_eq!(
            (doc["firmware"].as_str(), doc["secure_boot"].is_null()),
            (Some("bios"), true)
        );
        std::fs::remove_dir_all(dir.path().join("firmware")).unwrap();
        assert!(
            hardware_doc(dir.path())["firmware"].is_null(),
            "not a kernel's sysfs: unknown"
        );
    }

    #[test]
    fn at_most_max_pci_devices_are_described() {
        let dir = tempfile::tempdir().unwrap();
        let devices = dir.path().join("bus/pci/devices");
        for i in 0..MAX_PCI + 40 {
            let d = devices.join(format!("0000:{:02x}:{:02x}.0", i / 32, i % 32));
            std::fs::create_dir_all(&d).unwrap();
            // The last few are storage controllers: they are kept.
            let class = if i >= MAX_PCI + 30 {
                "0x010802"
            } else {
                "0x060400"
            };
            std::fs::write(d.join("class"), class).unwrap();
        }
        let doc = hardware_doc(dir.path());
        let pci = doc["pci"].as_array().unwrap();
        assert_eq!(pci.len(), MAX_PCI);
        assert_eq!(pci.iter().filter(|d| d["class"] == "0x010802").count(), 10);
    }

    #[test]
    fn hostile_values_keep_the_pci_list_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let devices = dir.path().join("bus/pci/devices");
        // Control bytes escape to six bytes each: 256 devices × 8 such values would be 1.5 MB.
        let nasty = "\u{1}".repeat(4096);
        for i in 0..MAX_PCI {
            let d = devices.join(format!("0000:{:02x}:{:02x}.0", i / 32, i % 32));
            std::fs::create_dir_all(&d).unwrap();
            for f in [
                "class",
                "vendor",
                "device",
                "subsystem_vendor",
                "subsystem_device",
                "modalias",
            ] {
                std::fs::write(d.join(f), &nasty).unwrap();
            }
        }
        let mut s = String::from("{");
        hardware(&mut s, dir.path());
        s.push('}');
        assert!(s.len() <= PCI_BUDGET + 64, "{} bytes", s.len());
        let doc: serde_json::Value = serde_json::from_str(&s).unwrap();
        let n = doc["pci"].as_array().unwrap().len();
        assert!(n > 10 && n < MAX_PCI, "{n} devices");
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_str(&mut s, "a\"b\\c\n");
        assert_eq!(s, r#""a\"b\\c\u000a""#);
    }
}
