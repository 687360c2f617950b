//! The compatibility check of a deploy job: the machine's facts from its stored identity
//! (what its agent last announced), judged against the image by
//! `diskferry_imaging::compat::check_deploy`, before the job writes anything.

use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_customize::compat::{DiskFact, Finding, MachineFacts};
use diskferry_customize::TargetHardware;

use crate::catalog::MachineIdentity;

/// What the check needs of a machine's identity.
pub fn machine_facts(identity: &MachineIdentity) -> MachineFacts {
    MachineFacts {
        firmware: identity.firmware.clone(),
        secure_boot: identity.secure_boot,
        pci: identity.pci.clone(),
        disks: identity
            .disks
            .iter()
            .map(|d| DiskFact {
                name: d.name.clone(),
                controller: d.controller.clone(),
            })
            .collect(),
        target_controller: None,
    }
}

/// Everything wrong (`Severity::Refuse`: the job should fail unless forced) or worth
/// logging (`Severity::Warn`) about deploying `image` onto `disk` of the machine `identity`
/// describes, reconfigured for `hw` when the job asks for it. Reads the image (its table,
/// ESPs and Linux roots' module indexes and initramfs); blocking.
pub fn check_deploy(
    image: Arc<dyn BlockDevice>,
    identity: &MachineIdentity,
    disk: &str,
    hw: Option<TargetHardware>,
) -> Vec<Finding> {
    let facts = machine_facts(identity).writing(disk);
    diskferry_imaging::compat::check_deploy(&image, &facts, hw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_identity_document_gives_the_facts_of_the_check() {
        let doc = r#"{"hostname":"web-07","macs":["52:54:00:12:34:56"],"vendor":"QEMU",
            "product":null,"serial":null,"uuid":null,"cpus":2,"memory":1073741824,"disks":[],
            "firmware":"uefi","secure_boot":true,"pci":[{"slot":"0000:00:04.0",
            "class":"0x010000","vendor":"0x1af4","device":"0x1001","subsystem_vendor":"0x1af4",
            "subsystem_device":"0x0002","driver":"virtio-pci",
            "modalias":"pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"}]}"#;
        let identity: MachineIdentity = serde_json::from_str(doc).unwrap();
        let facts = machine_facts(&identity);
        assert_eq!(facts.firmware.as_deref(), Some("uefi"));
        assert_eq!(facts.secure_boot, Some(true));
        assert_eq!(facts.pci.len(), 1);
        assert!(facts.pci[0].is_storage());
        assert_eq!(facts.pci[0].driver.as_deref(), Some("virtio-pci"));
    }
}
