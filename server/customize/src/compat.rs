//! Whether an image can start on a machine, decided before a deploy writes anything.
//!
//! Owns the facts on both sides and the rules between them:
//! - the machine's, as its agent reports them ([`MachineFacts`]: firmware, Secure Boot, PCI
//!   devices with their modaliases);
//! - the image's ([`ImageFacts`]: the firmware types it boots with — found by
//!   `diskferry_imaging`, which reads the disk — and, for each Linux root and kernel, the
//!   modules its initramfs carries, those built in, those in `/lib/modules/VERSION`, and the
//!   aliases that say which module drives which device: [`linux_drivers`]);
//! - [`check`]: a firmware the image cannot boot with, or a storage controller the kernel
//!   could not drive at boot (unless a [`TargetHardware`] reconfiguration adds its driver), is
//!   a [`Severity::Refuse`]; a network controller without a driver, Secure Boot without shim
//!   and what could not be checked are warnings. Every reason says what to do about it.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use diskferry_fs::overlay::TreeOverlay;
use diskferry_fs::Filesystem;

use crate::hardware::{kernel_initrds, module_name, modules_dir, parse_dep};
use crate::initramfs::{Initramfs, MAX_UNPACKED};
use crate::modalias::AliasTable;
use crate::TargetHardware;

/// Most PCI devices a machine's facts hold (the agent sends at most this many).
pub const MAX_PCI: usize = 256;
/// Longest module or driver name kept.
pub const MAX_NAME: usize = 64;
/// Longest modalias (real ones are about 60 bytes).
pub const MAX_MODALIAS: usize = 256;
/// Largest module index read (a Debian `modules.alias` is some 1.4 MiB).
const MAX_INDEX: u64 = 64 << 20;

/// One PCI device of a machine, as sysfs shows it (`class` `0x010802`, ids `0x1af4`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevice {
    /// The PCI address (`0000:00:04.0`).
    #[serde(default, deserialize_with = "text")]
    pub slot: String,
    #[serde(default, deserialize_with = "text")]
    pub class: String,
    #[serde(default, deserialize_with = "text")]
    pub vendor: String,
    #[serde(default, deserialize_with = "text")]
    pub device: String,
    #[serde(default, deserialize_with = "text")]
    pub subsystem_vendor: String,
    #[serde(default, deserialize_with = "text")]
    pub subsystem_device: String,
    /// The driver bound to it now, in the boot environment.
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    pub modalias: Option<String>,
}

/// A text field that may be `null` (an agent that could not read it): empty.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

fn hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The virtio device type of a SCSI host (its disks need `sd_mod`; a virtio block device's
/// do not).
const VIRTIO_SCSI: u32 = 8;

impl PciDevice {
    /// Its text fields, named, for bounds checks.
    pub fn texts(&self) -> [(&'static str, Option<&str>); 8] {
        [
            ("PCI slot", Some(&self.slot)),
            ("PCI class", Some(&self.class)),
            ("PCI vendor", Some(&self.vendor)),
            ("PCI device", Some(&self.device)),
            ("PCI subsystem vendor", Some(&self.subsystem_vendor)),
            ("PCI subsystem device", Some(&self.subsystem_device)),
            ("PCI driver", self.driver.as_deref()),
            ("PCI modalias", self.modalias.as_deref()),
        ]
    }

    fn class_code(&self) -> Option<u32> {
        hex(&self.class)
    }

    pub fn is_storage(&self) -> bool {
        self.class_code().is_some_and(|c| c >> 16 == 0x01)
    }

    pub fn is_network(&self) -> bool {
        self.class_code().is_some_and(|c| c >> 16 == 0x02)
    }

    /// `1af4:1001 at 0000:00:04.0, driven by virtio-pci now`.
    pub fn describe(&self) -> String {
        let id = |s: &str| s.trim_start_matches("0x").to_string();
        let mut d = format!("{}:{}", id(&self.vendor), id(&self.device));
        if !self.slot.is_empty() {
            d.push_str(&format!(" at {}", self.slot));
        }
        match &self.driver {
            Some(drv) => d.push_str(&format!(", driven by {drv} now")),
            None => d.push_str(", no driver bound now"),
        }
        d
    }

    /// The PCI modalias: the one sysfs gave, or built from the ids as the kernel builds it.
    fn pci_modalias(&self) -> Option<String> {
        if let Some(m) = self.modalias.as_ref().filter(|m| m.starts_with("pci:")) {
            return Some(m.clone());
        }
        let class = self.class_code()?;
        Some(format!(
            "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}",
            hex(&self.vendor)?,
            hex(&self.device)?,
            hex(&self.subsystem_vendor)?,
            hex(&self.subsystem_device)?,
            class >> 16,
            (class >> 8) & 0xff,
            class & 0xff
        ))
    }

    /// For a virtio PCI function: its virtio device type (transitional devices 0x1000–0x103f
    /// carry it as subsystem id, modern ones as device id − 0x1040) and the virtio modalias.
    fn virtio(&self) -> Option<(u32, String)> {
        let (vendor, device) = (hex(&self.vendor)?, hex(&self.device)?);
        if vendor != 0x1af4 || !(0x1000..=0x107f).contains(&device) {
            return None;
        }
        let kind = if device >= 0x1040 {
            device - 0x1040
        } else {
            hex(&self.subsystem_device)?
        };
        let sub_vendor = hex(&self.subsystem_vendor).unwrap_or(vendor);
        Some((kind, format!("virtio:d{kind:08X}v{sub_vendor:08X}")))
    }

    /// What the kernel needs to reach the disks (or the network) behind this device: the
    /// PCI function's driver, the virtio device driver on a virtio function, and the SCSI
    /// disk driver behind SCSI, IDE, RAID, ATA, SATA and SAS controllers.
    fn needs(&self) -> Vec<Need> {
        let mut out = Vec::new();
        if let Some(m) = self.pci_modalias() {
            out.push(Need::Alias(m));
        }
        let virtio = self.virtio();
        if let Some((_, m)) = &virtio {
            out.push(Need::Alias(m.clone()));
        }
        let subclass = self.class_code().map(|c| (c >> 8) & 0xff);
        let disks_by_sd = match virtio {
            Some((kind, _)) => kind == VIRTIO_SCSI,
            None => self.is_storage() && matches!(subclass, Some(0 | 1 | 4 | 5 | 6 | 7)),
        };
        if disks_by_sd {
            out.push(Need::Module("sd_mod"));
        }
        out
    }
}

/// One thing a device needs: a module matching a modalias, or a named module.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Need {
    Alias(String),
    Module(&'static str),
}

/// What a machine's agent reports that a deploy depends on (fields of its identity
/// document; absent ones were not reported).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineFacts {
    /// "uefi" or "bios".
    #[serde(default)]
    pub firmware: Option<String>,
    #[serde(default)]
    pub secure_boot: Option<bool>,
    #[serde(default)]
    pub pci: Vec<PciDevice>,
    /// The disks the agent serves, with their controllers.
    #[serde(default)]
    pub disks: Vec<DiskFact>,
    /// The PCI address of the controller of the disk being written, when known: only that
    /// storage controller needs a boot driver ([`MachineFacts::writing`]).
    #[serde(skip)]
    pub target_controller: Option<String>,
}

/// A disk the agent serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFact {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: Option<String>,
}

impl MachineFacts {
    /// The facts for writing the disk named `disk`: its controller, when the agent said
    /// which, is the one storage controller the image must boot from.
    pub fn writing(mut self, disk: &str) -> MachineFacts {
        self.target_controller = self
            .disks
            .iter()
            .find(|d| d.name == disk)
            .and_then(|d| d.controller.clone());
        self
    }

    /// The PCI devices a deploy depends on: every network controller, and the storage
    /// controller of the disk being written when it is known and listed (else every one).
    fn devices(&self) -> Vec<PciDevice> {
        let listed = &self.pci[..self.pci.len().min(MAX_PCI)];
        let target = self
            .target_controller
            .as_deref()
            .filter(|slot| listed.iter().any(|d| d.is_storage() && d.slot == *slot));
        listed
            .iter()
            .filter(|d| match target {
                Some(slot) => !d.is_storage() || d.slot == slot,
                None => true,
            })
            .cloned()
            .collect()
    }
}

/// The firmware types an image boots with, and why we think so.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareReport {
    /// Boot code a BIOS would run.
    pub bios: bool,
    /// An EFI System Partition holding a loader.
    pub uefi: bool,
    /// A loader Secure Boot firmware accepts as shipped (shim, Windows Boot Manager).
    pub shim: bool,
    /// What was found, in words.
    pub evidence: Vec<String>,
}

impl FirmwareReport {
    /// "BIOS and UEFI", "BIOS only", "UEFI only" or "neither".
    pub fn summary(&self) -> &'static str {
        match (self.bios, self.uefi) {
            (true, true) => "BIOS and UEFI",
            (true, false) => "BIOS only",
            (false, true) => "UEFI only",
            (false, false) => "neither BIOS nor UEFI (no boot loader found)",
        }
    }
}

/// The modules one kernel of an image can use.
#[derive(Debug, Clone, Default)]
pub struct KernelDrivers {
    pub version: String,
    /// Its initramfs.
    pub initramfs: String,
    /// Modules the initramfs carries.
    pub in_initramfs: BTreeSet<String>,
    /// Modules built into the kernel (`modules.builtin`).
    pub builtin: BTreeSet<String>,
    /// Modules in `/lib/modules/VERSION` (`modules.dep`).
    pub modules: BTreeSet<String>,
    /// `modules.alias` and `modules.builtin.modalias`.
    pub aliases: AliasTable,
    /// Why its drivers could not be read, when they could not.
    pub error: Option<String>,
}

/// A Linux root of an image and its kernels.
#[derive(Debug, Clone, Default)]
pub struct LinuxSystem {
    pub partition: u32,
    pub kernels: Vec<KernelDrivers>,
}

/// What the check needs to know about an image.
#[derive(Debug, Clone, Default)]
pub struct ImageFacts {
    pub firmware: FirmwareReport,
    pub linux: Vec<LinuxSystem>,
    /// Other systems (partition, name), whose drivers are not checked.
    pub other: Vec<(u32, String)>,
}

/// Refused unless forced, or only worth knowing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Refuse,
    Warn,
}

/// One reason an image may not start on a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    pub reason: String,
}

impl Finding {
    pub fn refuse(reason: String) -> Finding {
        Finding {
            severity: Severity::Refuse,
            reason,
        }
    }

    pub fn warn(reason: String) -> Finding {
        Finding {
            severity: Severity::Warn,
            reason,
        }
    }

    pub fn refuses(&self) -> bool {
        self.severity == Severity::Refuse
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.severity {
            Severity::Refuse => write!(f, "refused: {}", self.reason),
            Severity::Warn => write!(f, "warning: {}", self.reason),
        }
    }
}

/// Module names of the lines of `text` (`modules.builtin`: one path per line).
fn names_of_lines(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .filter(|n| n.len() <= MAX_NAME)
        .collect()
}

/// A module index of directory `dir`, at most [`MAX_INDEX`] bytes; `None` when missing or
/// unreadable.
pub(crate) fn read_index(o: &TreeOverlay, dir: &str, name: &str) -> Option<String> {
    let node = o.resolve(&format!("{dir}/{name}")).ok()?;
    let bytes = o.read_all(node, MAX_INDEX).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The modules kernel `version` of the root in `o` can use; `initrd` is its initramfs.
fn kernel_drivers(o: &TreeOverlay, version: String, initrd: String) -> KernelDrivers {
    let mut k = KernelDrivers {
        version,
        initramfs: initrd,
        ..Default::default()
    };
    let ramfs = o
        .read_file(&k.initramfs, MAX_UNPACKED)
        .map_err(crate::CustomizeError::from)
        .and_then(|b| Initramfs::parse(&b.unwrap_or_default()));
    match ramfs {
        Ok(r) => {
            k.in_initramfs = r
                .entries
                .iter()
                .filter(|e| e.name.contains(".ko"))
                .map(|e| module_name(&e.name))
                .collect();
        }
        Err(e) => k.error = Some(format!("{}: {e}", k.initramfs)),
    }
    let Some(dir) = modules_dir(o, &k.version) else {
        k.error
            .get_or_insert_with(|| format!("no /lib/modules/{}", k.version));
        return k;
    };
    k.modules = read_index(o, &dir, "modules.dep")
        .map(|t| parse_dep(&t).into_keys().collect())
        .unwrap_or_default();
    k.builtin = read_index(o, &dir, "modules.builtin")
        .map(|t| names_of_lines(&t))
        .unwrap_or_default();
    for index in ["modules.alias", "modules.builtin.modalias"] {
        if let Some(t) = read_index(o, &dir, index) {
            k.aliases.add(&t);
        }
    }
    if k.aliases.is_empty() {
        k.error
            .get_or_insert_with(|| format!("{dir}/modules.alias is missing or empty"));
    }
    k
}

/// The modules each kernel (with an initramfs) of the Linux root `fs` can use.
pub fn linux_drivers(fs: Arc<dyn Filesystem>) -> Vec<KernelDrivers> {
    let o = TreeOverlay::new(fs, diskferry_fs::overlay::now());
    kernel_initrds(&o)
        .into_iter()
        .map(|(version, initrd)| kernel_drivers(&o, version, initrd))
        .collect()
}

/// Everything [`check`] finds wrong or worth knowing about deploying `image` onto `machine`,
/// with `hw` the reconfiguration the deploy makes, if any.
pub fn check(
    image: &ImageFacts,
    machine: &MachineFacts,
    hw: Option<TargetHardware>,
) -> Vec<Finding> {
    let mut out = firmware(&image.firmware, machine);
    let has_systems = !image.linux.is_empty() || !image.other.is_empty();
    if has_systems && machine.pci.is_empty() {
        out.push(Finding::warn(
            "the machine reported no PCI devices (an older agent?): drivers not checked".into(),
        ));
    }
    let devices = &machine.devices();
    for system in &image.linux {
        if system.kernels.is_empty() {
            out.push(Finding::warn(format!(
                "partition {}: no kernel with an initramfs under /boot (is /boot a partition of its own?): drivers not checked",
                system.partition
            )));
        }
        for k in &system.kernels {
            out.extend(kernel_findings(system.partition, k, devices, hw));
        }
    }
    for (partition, name) in &image.other {
        out.push(Finding::warn(format!(
            "partition {partition} holds {name}: only the firmware was checked, not its drivers"
        )));
    }
    out
}

fn firmware(image: &FirmwareReport, machine: &MachineFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    let evidence = if image.evidence.is_empty() {
        String::new()
    } else {
        format!(" ({})", image.evidence.join("; "))
    };
    match machine.firmware.as_deref() {
        Some("uefi") if !image.uefi && image.bios => out.push(Finding::refuse(format!(
            "the image boots with BIOS only{evidence} and this machine starts with UEFI: switch its firmware to legacy (CSM) boot if it has one, deploy an image with an EFI System Partition, or --force to write it anyway"
        ))),
        Some("bios") if !image.bios && image.uefi => out.push(Finding::refuse(format!(
            "the image boots with UEFI only{evidence} and this machine starts with BIOS: deploy an image with BIOS boot code, or --force to write it anyway"
        ))),
        Some("uefi" | "bios") => {}
        Some(other) => out.push(Finding::warn(format!(
            "the machine reported an unknown firmware {other:?}: firmware not checked"
        ))),
        None => out.push(Finding::warn(
            "the machine did not report its firmware (an older agent?): firmware not checked"
                .into(),
        )),
    }
    if !image.bios && !image.uefi {
        out.push(Finding::warn(format!(
            "the image holds no boot loader a firmware would start{evidence}: the machine will not boot from this disk"
        )));
    }
    if machine.secure_boot == Some(true) && image.uefi && !image.shim {
        out.push(Finding::warn(
            "Secure Boot is on and the image's EFI System Partition has no shim or Windows Boot Manager: the firmware will likely refuse its loader; turn Secure Boot off or install shim".into(),
        ));
    }
    out
}

/// The modules that satisfy `need` in kernel `k` (empty: the kernel has none).
fn candidates(need: &Need, k: &KernelDrivers) -> BTreeSet<String> {
    match need {
        Need::Alias(m) => k.aliases.modules_for(m),
        Need::Module(name) => BTreeSet::from([name.to_string()]),
    }
}

fn kernel_findings(
    partition: u32,
    k: &KernelDrivers,
    devices: &[PciDevice],
    hw: Option<TargetHardware>,
) -> Vec<Finding> {
    let at = format!("partition {partition}, kernel {}", k.version);
    if let Some(e) = &k.error {
        return vec![Finding::warn(format!("{at}: drivers not checked: {e}"))];
    }
    let mut out = Vec::new();
    for d in devices.iter().filter(|d| d.is_storage()) {
        for need in d.needs() {
            if let Some(why) = storage_gap(&need, k, hw) {
                out.push(Finding::refuse(format!(
                    "{at}: the storage controller {} {why}",
                    d.describe()
                )));
            }
        }
    }
    for d in devices.iter().filter(|d| d.is_network()) {
        for need in d.needs() {
            let c = candidates(&need, k);
            if !c
                .iter()
                .any(|m| k.modules.contains(m) || k.builtin.contains(m))
            {
                out.push(Finding::warn(format!(
                    "{at}: the network controller {} has no driver in this kernel{}: the system will start without it",
                    d.describe(),
                    wanted(&c)
                )));
            }
        }
    }
    out
}

/// ` (needs a, b)`, or nothing.
fn wanted(c: &BTreeSet<String>) -> String {
    if c.is_empty() {
        String::new()
    } else {
        format!(
            " (needs {})",
            c.iter().cloned().collect::<Vec<_>>().join(" or ")
        )
    }
}

/// Why `need` leaves a storage controller unusable at boot, and what to do; `None` when
/// the initramfs or the kernel has it, or `hw` adds it.
fn storage_gap(need: &Need, k: &KernelDrivers, hw: Option<TargetHardware>) -> Option<String> {
    let c = candidates(need, k);
    if c.is_empty() {
        let Need::Alias(m) = need else {
            return None;
        };
        return Some(format!(
            "has no driver in this kernel (no module claims {m}): the system could not find its disks; deploy another image, or --force to write it anyway"
        ));
    }
    if c.iter()
        .any(|m| k.in_initramfs.contains(m) || k.builtin.contains(m))
    {
        return None;
    }
    let adds = |h: TargetHardware| {
        h.modules()
            .iter()
            .any(|m| c.contains(*m) && k.modules.contains(*m))
    };
    if hw.is_some_and(adds) {
        return None;
    }
    let missing = c.iter().cloned().collect::<Vec<_>>().join(" or ");
    let fix = match TargetHardware::ALL.into_iter().find(|h| adds(*h)) {
        Some(h) => format!("deploy with --target-hardware {} to add it", h.name()),
        None => "no --target-hardware adds it".into(),
    };
    let given = hw
        .map(|h| format!(" (--target-hardware {} does not add it)", h.name()))
        .unwrap_or_default();
    Some(format!(
        "needs {missing}, which {} lacks and the kernel does not build in{given}: the system would not find its root disk; {fix}, or --force to write it anyway",
        k.initramfs
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pci(class: &str, vendor: &str, device: &str, sub: (&str, &str), driver: &str) -> PciDevice {
        PciDevice {
            slot: "0000:00:04.0".into(),
            class: class.into(),
            vendor: vendor.into(),
            device: device.into(),
            subsystem_vendor: sub.0.into(),
            subsystem_device: sub.1.into(),
            driver: Some(driver.into()),
            modalias: None,
        }
    }

    fn virtio_blk() -> PciDevice {
        pci(
            "0x010000",
            "0x1af4",
            "0x1001",
            ("0x1af4", "0x0002"),
            "virtio-pci",
        )
    }

    fn ahci() -> PciDevice {
        pci("0x010601", "0x8086", "0x2922", ("0x1af4", "0x1100"), "ahci")
    }

    fn e1000e() -> PciDevice {
        pci(
            "0x020000",
            "0x8086",
            "0x10d3",
            ("0x8086", "0x0000"),
            "e1000e",
        )
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A Debian-like kernel whose initramfs has AHCI but no virtio disk driver.
    fn kernel() -> KernelDrivers {
        let mut aliases = AliasTable::default();
        aliases.add(
            "alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n\
             alias virtio:d00000002v* virtio_blk\n\
             alias virtio:d00000008v* virtio_scsi\n\
             alias virtio:d00000001v* virtio_net\n\
             alias pci:v*d*sv*sd*bc01sc06i01* ahci\n\
             alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n",
        );
        KernelDrivers {
            version: "6.1.0-18-amd64".into(),
            initramfs: "/boot/initrd.img-6.1.0-18-amd64".into(),
            in_initramfs: set(&["virtio_pci", "ahci", "libahci", "sd_mod"]),
            builtin: BTreeSet::new(),
            modules: set(&[
                "virtio_pci",
                "virtio_blk",
                "virtio_scsi",
                "virtio_net",
                "ahci",
                "sd_mod",
                "e1000e",
            ]),
            aliases,
            error: None,
        }
    }

    fn image(bios: bool, uefi: bool) -> ImageFacts {
        ImageFacts {
            firmware: FirmwareReport {
                bios,
                uefi,
                ..Default::default()
            },
            linux: vec![LinuxSystem {
                partition: 1,
                kernels: vec![kernel()],
            }],
            other: Vec::new(),
        }
    }

    fn machine(firmware: &str, pci: Vec<PciDevice>) -> MachineFacts {
        MachineFacts {
            firmware: Some(firmware.into()),
            secure_boot: Some(false),
            pci,
            ..MachineFacts::default()
        }
    }

    fn refusals(f: &[Finding]) -> Vec<&str> {
        f.iter()
            .filter(|f| f.refuses())
            .map(|f| f.reason.as_str())
            .collect()
    }

    #[test]
    fn an_identity_document_gives_the_machine_facts() {
        let doc = r#"{"hostname":"h","macs":["52:54:00:12:34:56"],"disks":[],
            "firmware":"uefi","secure_boot":null,"pci":[{"slot":"0000:00:04.0","class":"0x010000",
            "vendor":"0x1af4","device":"0x1001","subsystem_vendor":null,"subsystem_device":null,
            "driver":null,"modalias":"pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"}]}"#;
        let m: MachineFacts = serde_json::from_str(doc).unwrap();
        assert_eq!(m.firmware.as_deref(), Some("uefi"));
        assert_eq!(m.secure_boot, None);
        assert_eq!(m.pci[0].subsystem_vendor, "");
        assert!(m.pci[0].is_storage() && m.pci[0].driver.is_none());
        let old: MachineFacts = serde_json::from_str(r#"{"macs":[]}"#).unwrap();
        assert_eq!(
            old,
            MachineFacts::default(),
            "an older agent's identity: no facts"
        );
    }

    #[test]
    fn firmware_mismatches_are_refused_both_ways() {
        let m = machine("uefi", vec![ahci()]);
        let f = check(&image(true, false), &m, None);
        let r = refusals(&f);
        assert!(
            r.len() == 1 && r[0].contains("BIOS only") && r[0].contains("--force"),
            "{f:?}"
        );
        assert!(refusals(&check(&image(true, true), &m, None)).is_empty());
        assert!(refusals(&check(&image(false, true), &m, None)).is_empty());
        let bios = machine("bios", vec![ahci()]);
        let r = check(&image(false, true), &bios, None);
        assert!(refusals(&r)[0].contains("UEFI only"), "{r:?}");
        assert!(refusals(&check(&image(true, false), &bios, None)).is_empty());
        // Nothing reported: a warning, never a refusal.
        let unknown = MachineFacts {
            pci: vec![ahci()],
            ..Default::default()
        };
        let f = check(&image(true, false), &unknown, None);
        assert!(
            refusals(&f).is_empty() && f.iter().any(|f| f.reason.contains("firmware not checked"))
        );
    }

    #[test]
    fn a_storage_controller_without_a_boot_driver_is_refused_unless_reconfigured() {
        let m = machine("bios", vec![virtio_blk()]);
        let f = check(&image(true, false), &m, None);
        let r = refusals(&f);
        assert_eq!(r.len(), 1, "{f:?}");
        for part in [
            "1af4:1001 at 0000:00:04.0, driven by virtio-pci now",
            "needs virtio_blk",
            "/boot/initrd.img-6.1.0-18-amd64 lacks",
            "--target-hardware virtio",
            "--force",
        ] {
            assert!(r[0].contains(part), "{part} in {}", r[0]);
        }
        assert!(refusals(&check(
            &image(true, false),
            &m,
            Some(TargetHardware::Virtio)
        ))
        .is_empty());
        let r = check(&image(true, false), &m, Some(TargetHardware::Nvme));
        assert!(
            refusals(&r)[0].contains("--target-hardware nvme does not add it"),
            "{r:?}"
        );
        // Another storage controller the image lacks a driver for does not matter when the
        // disk written hangs off the virtio one.
        let mut two = machine("bios", vec![virtio_blk(), ahci()]);
        two.pci[1].slot = "0000:00:1f.2".into();
        two.disks = vec![DiskFact {
            name: "/dev/sda".into(),
            controller: Some("0000:00:1f.2".into()),
        }];
        assert_eq!(refusals(&check(&image(true, false), &two, None)).len(), 1);
        let on_ahci = two.clone().writing("/dev/sda");
        assert!(refusals(&check(&image(true, false), &on_ahci, None)).is_empty());
        let unknown = two.writing("/dev/nvme0n1");
        assert_eq!(
            refusals(&check(&image(true, false), &unknown, None)).len(),
            1
        );
        // Built into the kernel: fine.
        let mut img = image(true, false);
        img.linux[0].kernels[0].builtin.insert("virtio_blk".into());
        assert!(refusals(&check(&img, &m, None)).is_empty());
        // The controller the initramfs has a driver for: fine.
        assert!(refusals(&check(
            &image(true, false),
            &machine("bios", vec![ahci()]),
            None
        ))
        .is_empty());
    }

    #[test]
    fn virtio_scsi_needs_the_disk_driver_and_modern_ids_are_understood() {
        // Modern virtio-scsi (0x1048): virtio_scsi and sd_mod.
        let scsi = pci(
            "0x010000",
            "0x1af4",
            "0x1048",
            ("0x1af4", "0x1100"),
            "virtio-pci",
        );
        let needs = scsi.needs();
        assert!(needs.contains(&Need::Alias("virtio:d00000008v00001AF4".into())));
        assert!(needs.contains(&Need::Module("sd_mod")));
        let r = check(&image(true, true), &machine("uefi", vec![scsi]), None);
        assert!(refusals(&r)[0].contains("needs virtio_scsi"), "{r:?}");
        // Modern virtio-blk (0x1042) takes no sd_mod.
        let blk = pci(
            "0x018000",
            "0x1af4",
            "0x1042",
            ("0x1af4", "0x1100"),
            "virtio-pci",
        );
        assert!(!blk.needs().contains(&Need::Module("sd_mod")));
        assert_eq!(
            blk.pci_modalias().unwrap(),
            "pci:v00001AF4d00001042sv00001AF4sd00001100bc01sc80i00"
        );
    }

    #[test]
    fn unknown_controllers_are_refused_and_network_gaps_warned() {
        let odd = pci(
            "0x010400",
            "0x1000",
            "0x0079",
            ("0x1000", "0x9261"),
            "megaraid_sas",
        );
        let r = check(&image(true, false), &machine("bios", vec![odd]), None);
        assert!(
            refusals(&r)
                .iter()
                .any(|r| r.contains("no module claims pci:v00001000d00000079")),
            "{r:?}"
        );
        let mut img = image(true, false);
        img.linux[0].kernels[0].modules.remove("e1000e");
        let f = check(&img, &machine("bios", vec![ahci(), e1000e()]), None);
        assert!(refusals(&f).is_empty(), "{f:?}");
        assert!(
            f.iter().any(|f| f.severity == Severity::Warn
                && f.reason.contains("network controller 8086:10d3")
                && f.reason.contains("needs e1000e")),
            "{f:?}"
        );
        assert!(!check(
            &image(true, false),
            &machine("bios", vec![ahci(), e1000e()]),
            None
        )
        .iter()
        .any(|f| f.reason.contains("network")));
    }

    #[test]
    fn secure_boot_windows_and_unreadable_kernels_are_warnings() {
        let mut img = image(false, true);
        img.linux.clear();
        img.other.push((3, "Windows 11 Pro".into()));
        let mut m = machine("uefi", vec![virtio_blk()]);
        m.secure_boot = Some(true);
        let f = check(&img, &m, None);
        assert!(refusals(&f).is_empty(), "{f:?}");
        assert!(f.iter().any(|f| f.reason.contains("no shim")), "{f:?}");
        assert!(
            f.iter()
                .any(|f| f.reason.contains("Windows 11 Pro: only the firmware")),
            "{f:?}"
        );
        img.firmware.shim = true;
        assert!(!check(&img, &m, None)
            .iter()
            .any(|f| f.reason.contains("shim")));
        let mut img = image(true, true);
        img.linux[0].kernels[0].error = Some("no /lib/modules/6.1".into());
        let f = check(&img, &m, None);
        assert!(
            refusals(&f).is_empty() && f.iter().any(|f| f.reason.contains("drivers not checked")),
            "{f:?}"
        );
    }
}
