//! The compatibility check of a deploy job: the machine's facts from its stored identity
//! (what its agent last announced), judged against the image by
//! `diskferry_imaging::compat::check_deploy`, before the job writes anything.

use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_customize::compat::{Finding, MachineFacts};
use diskferry_customize::TargetHardware;

use crate::catalog::MachineIdentity;

/// What the check needs of a machine's identity.
pub fn machine_facts(identity: &MachineIdentity) -> MachineFacts {
    MachineFacts {
        firmware: identity.firmware.clone(),
        secure_boot: identity.secure_boot,
        pci: identity.pci.clone(),
    }
}

/// Everything wrong (`Severity::Refuse`: the job should fail unless forced) or worth
/// logging (`Severity::Warn`) about deploying `image` onto the machine `identity` describes,
/// reconfigured for `hw` when the job asks for it. Reads the image (its table, ESPs and
/// Linux roots' module indexes and initramfs); blocking.
pub fn check_deploy(
    image: Arc<dyn BlockDevice>,
    identity: &MachineIdentity,
    hw: Option<TargetHardware>,
) -> Vec<Finding> {
    diskferry_imaging::compat::check_deploy(&image, &machine_facts(identity), hw)
}
