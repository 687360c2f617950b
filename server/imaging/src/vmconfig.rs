//! A virtual machine for a capture, so it runs at once: the firmware its disk needs (an EFI
//! System Partition → UEFI, otherwise BIOS), the disk bus and NIC model its OS has drivers for
//! (virtio for Linux and unknown systems, AHCI and e1000e for Windows, whose installs rarely
//! carry virtio drivers), one NIC per MAC of the machine it came from, and that machine's
//! memory and CPUs — written as a libvirt domain XML and as a `qemu-system-x86_64` command line.
//!
//! Everything that comes from a machine (MACs, names) is validated or escaped here: a MAC that
//! does not parse is dropped, names are escaped for XML and quoted for the shell.

use std::path::PathBuf;

use crate::inspect::DiskReport;

/// Where the firmware the VM boots lives on Debian (package `ovmf`).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

/// The disk the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmDisk {
    /// An image file, opened copy-on-write by qemu's `-snapshot` (never changed).
    File { path: PathBuf, format: String },
    /// An NBD export (`diskferry export`, or the server's NBD port).
    Nbd {
        host: String,
        port: u16,
        export: String,
    },
    /// An NBD export on a Unix socket (the server's `--nbd-listen unix:PATH`).
    NbdUnix { socket: PathBuf, export: String },
}

impl VmDisk {
    /// The disk's NBD URL, when it is an export.
    pub fn nbd_url(&self) -> Option<String> {
        match self {
            VmDisk::File { .. } => None,
            VmDisk::Nbd { host, port, export } => Some(format!("nbd://{host}:{port}/{export}")),
            VmDisk::NbdUnix { socket, export } => {
                Some(format!("nbd+unix:///{export}?socket={}", socket.display()))
            }
        }
    }
}

/// Everything a VM definition needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub firmware: Firmware,
    /// The OS needs no paravirtual drivers (Windows): AHCI disk, e1000e NICs.
    pub emulated_devices: bool,
    pub memory_mib: u64,
    pub cpus: u32,
    /// Lowercase, colon-separated, unicast.
    pub macs: Vec<String>,
    pub disk: VmDisk,
}

/// What a capture's report says about the VM it needs.
pub fn firmware_of(report: &DiskReport) -> Firmware {
    let esp = report.partitions.iter().any(|p| {
        p.type_id
            .eq_ignore_ascii_case(diskferry_partition::gpt_types::EFI_SYSTEM)
            || p.type_id == "0xef"
    });
    if esp {
        Firmware::Uefi
    } else {
        Firmware::Bios
    }
}

/// Whether the report shows a Windows installation.
pub fn is_windows(report: &DiskReport) -> bool {
    report
        .partitions
        .iter()
        .filter_map(|p| p.os.as_ref())
        .any(|os| os.family.eq_ignore_ascii_case("windows"))
}

/// `mac` as `aa:bb:cc:dd:ee:ff` when it is a unicast MAC address (any of `:`/`-` separators,
/// any case), else `None`.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let hex: String = mac.chars().filter(|c| !matches!(c, ':' | '-')).collect();
    if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Vec<u8> = (0..6)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digits"))
        .collect();
    if bytes[0] & 1 != 0 || bytes.iter().all(|&b| b == 0) {
        return None;
    }
    Some(
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

impl VmConfig {
    /// The libvirt domain XML (`virsh define FILE`; `virt-xml-validate` accepts it).
    pub fn libvirt_xml(&self) -> String {
        let mut x = String::new();
        x += "<domain type='kvm'>\n";
        x += &format!("  <name>{}</name>\n", xml(&self.name));
        x += &format!("  <memory unit='MiB'>{}</memory>\n", self.memory_mib);
        x += &format!("  <vcpu>{}</vcpu>\n", self.cpus);
        let firmware = match self.firmware {
            Firmware::Uefi => " firmware='efi'",
            Firmware::Bios => "",
        };
        x += &format!("  <os{firmware}>\n    <type arch='x86_64' machine='q35'>hvm</type>\n");
        x += "    <boot dev='hd'/>\n  </os>\n";
        x += "  <features>\n    <acpi/>\n    <apic/>\n  </features>\n";
        x += "  <cpu mode='host-passthrough'/>\n";
        x += "  <devices>\n";
        x += &self.disk_xml();
        let model = if self.emulated_devices {
            "e1000e"
        } else {
            "virtio"
        };
        for mac in &self.macs {
            x += &format!(
                "    <interface type='network'>\n      <mac address='{mac}'/>\n      <source network='default'/>\n      <model type='{model}'/>\n    </interface>\n"
            );
        }
        x += "    <serial type='pty'/>\n    <console type='pty'/>\n";
        x += "    <graphics type='vnc' port='-1' autoport='yes'/>\n";
        x += "  </devices>\n</domain>\n";
        x
    }

    fn disk_xml(&self) -> String {
        let bus = if self.emulated_devices {
            "sata"
        } else {
            "virtio"
        };
        let dev = if self.emulated_devices { "sda" } else { "vda" };
        let target = format!("      <target dev='{dev}' bus='{bus}'/>\n");
        match &self.disk {
            VmDisk::File { path, format } => format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      <source file='{}'/>\n{target}      <readonly/>\n    </disk>\n",
                xml(format),
                xml(&path.to_string_lossy())
            ),
            VmDisk::Nbd { host, port, export } => network_disk(
                export,
                &format!("<host name='{}' port='{port}'/>", xml(host)),
                &target,
            ),
            VmDisk::NbdUnix { socket, export } => network_disk(
                export,
                &format!("<host transport='unix' socket='{}'/>", xml(&socket.to_string_lossy())),
                &target,
            ),
        }
    }

    /// The `qemu-system-x86_64` arguments (KVM when the host has it, else TCG).
    pub fn qemu_args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["qemu-system-x86_64", "-machine", "q35,accel=kvm:tcg"]
            .map(String::from)
            .into();
        a.extend([
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
        ]);
        if self.firmware == Firmware::Uefi {
            a.extend(["-bios".into(), OVMF.into()]);
        }
        let drive = match &self.disk {
            VmDisk::File { path, format } => format!("file={},format={format}", path.display()),
            nbd => format!("file={},format=raw", nbd.nbd_url().expect("an export")),
        };
        if self.emulated_devices {
            a.extend(["-drive".into(), format!("{drive},if=none,id=disk0")]);
            a.extend(["-device".into(), "ide-hd,drive=disk0,bus=ide.0".into()]);
        } else {
            a.extend(["-drive".into(), format!("{drive},if=virtio")]);
        }
        // Writes go to a temporary overlay: the capture never changes.
        a.push("-snapshot".into());
        let model = if self.emulated_devices {
            "e1000e"
        } else {
            "virtio-net-pci"
        };
        for mac in &self.macs {
            a.extend(["-nic".into(), format!("user,model={model},mac={mac}")]);
        }
        if self.macs.is_empty() {
            a.extend(["-nic".into(), format!("user,model={model}")]);
        }
        a
    }

    /// [`VmConfig::qemu_args`] as one shell command line.
    pub fn qemu_command(&self) -> String {
        self.qemu_args()
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A libvirt network disk of NBD export `export` reached through `host` (an XML element).
fn network_disk(export: &str, host: &str, target: &str) -> String {
    let source = format!("<source protocol='nbd' name='{}'>", xml(export));
    format!(
        "    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw'/>\n      {source}\n        {host}\n      </source>\n{target}    </disk>\n"
    )
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            name: "web<1> & 'db'".into(),
            firmware: Firmware::Uefi,
            emulated_devices: false,
            memory_mib: 4096,
            cpus: 4,
            macs: vec!["52:54:00:12:34:56".into()],
            disk: VmDisk::Nbd {
                host: "127.0.0.1".into(),
                port: 10809,
                export: "web.qcow2".into(),
            },
        }
    }

    #[test]
    fn macs_are_normalized_and_bad_or_multicast_ones_dropped() {
        assert_eq!(
            normalize_mac("52-54-00-AB-cd-EF").as_deref(),
            Some("52:54:00:ab:cd:ef")
        );
        assert_eq!(normalize_mac("01:00:5e:00:00:01"), None, "multicast");
        assert_eq!(normalize_mac("00:00:00:00:00:00"), None);
        assert_eq!(normalize_mac("52:54:00:12:34"), None);
        assert_eq!(normalize_mac("52:54:00:12:34:5g"), None);
        assert_eq!(normalize_mac("'/><evil/>"), None);
    }

    #[test]
    fn names_are_escaped_in_xml_and_quoted_for_the_shell() {
        let c = config();
        let x = c.libvirt_xml();
        assert!(
            x.contains("<name>web&lt;1&gt; &amp; &apos;db&apos;</name>"),
            "{x}"
        );
        assert!(x.contains("<os firmware='efi'>"), "{x}");
        let cmd = VmConfig {
            disk: VmDisk::File {
                path: "/srv/my disk's.qcow2".into(),
                format: "qcow2".into(),
            },
            ..c
        }
        .qemu_command();
        assert!(
            cmd.contains("'file=/srv/my disk'\\''s.qcow2,format=qcow2,if=virtio'"),
            "{cmd}"
        );
        assert!(cmd.contains("-bios /usr/share/ovmf/OVMF.fd"), "{cmd}");
    }
}
