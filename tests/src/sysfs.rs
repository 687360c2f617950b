//! A machine for a test agent to be: a directory laid out as the kernel's sysfs shows
//! firmware and PCI devices (`firmware/efi`, the `SecureBoot-…` EFI variable,
//! `bus/pci/devices/SLOT/{class,vendor,device,subsystem_*,modalias}` and the `driver` link),
//! read by `diskferry-client` through `DISKFERRY_SYSFS`.

use std::path::Path;

use anyhow::Result;

/// One PCI function as sysfs shows it.
#[derive(Debug, Clone)]
pub struct FakePci {
    pub slot: &'static str,
    pub class: &'static str,
    pub vendor: &'static str,
    pub device: &'static str,
    pub subsystem_vendor: &'static str,
    pub subsystem_device: &'static str,
    pub driver: &'static str,
}

impl FakePci {
    /// The modalias the kernel would show for it.
    pub fn modalias(&self) -> String {
        let h = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        let class = h(self.class);
        format!(
            "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}",
            h(self.vendor),
            h(self.device),
            h(self.subsystem_vendor),
            h(self.subsystem_device),
            class >> 16,
            (class >> 8) & 0xff,
            class & 0xff
        )
    }
}

/// A legacy virtio block controller, as qemu's `virtio-blk-pci` shows it.
pub const VIRTIO_BLK: FakePci = FakePci {
    slot: "0000:00:04.0",
    class: "0x010000",
    vendor: "0x1af4",
    device: "0x1001",
    subsystem_vendor: "0x1af4",
    subsystem_device: "0x0002",
    driver: "virtio-pci",
};

/// qemu's e1000 NIC.
pub const E1000: FakePci = FakePci {
    slot: "0000:00:03.0",
    class: "0x020000",
    vendor: "0x8086",
    device: "0x100e",
    subsystem_vendor: "0x1af4",
    subsystem_device: "0x1100",
    driver: "e1000",
};

/// Firmware and devices.
#[derive(Debug, Clone)]
pub struct FakeMachine {
    pub uefi: bool,
    pub secure_boot: Option<bool>,
    pub pci: Vec<FakePci>,
}

impl FakeMachine {
    /// Lays the machine out under `root` as sysfs.
    pub fn write(&self, root: &Path) -> Result<()> {
        let firmware = root.join("firmware");
        std::fs::create_dir_all(firmware.join("acpi"))?;
        if self.uefi {
            let vars = firmware.join("efi/efivars");
            std::fs::create_dir_all(&vars)?;
            if let Some(on) = self.secure_boot {
                std::fs::write(
                    vars.join("SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"),
                    [6, 0, 0, 0, u8::from(on)],
                )?;
            }
        }
        for d in &self.pci {
            let dir = root.join("bus/pci/devices").join(d.slot);
            std::fs::create_dir_all(&dir)?;
            for (name, value) in [
                ("class", d.class.to_string()),
                ("vendor", d.vendor.to_string()),
                ("device", d.device.to_string()),
                ("subsystem_vendor", d.subsystem_vendor.to_string()),
                ("subsystem_device", d.subsystem_device.to_string()),
                ("modalias", d.modalias()),
            ] {
                std::fs::write(dir.join(name), format!("{value}\n"))?;
            }
            let driver = root.join("bus/pci/drivers").join(d.driver);
            std::fs::create_dir_all(&driver)?;
            std::os::unix::fs::symlink(&driver, dir.join("driver"))?;
        }
        Ok(())
    }
}
