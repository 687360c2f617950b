//! The image side of the compatibility check a deploy runs before writing: the facts
//! [`diskferry_customize::compat::check`] needs, read from the image — the firmware types
//! it boots with (`inspect::firmware`), the drivers of each Linux root's kernels, the other
//! systems it holds — and [`check_deploy`], which reads them and judges them against a
//! machine's facts.

use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_customize::compat::{
    check, linux_drivers, Finding, ImageFacts, LinuxSystem, MachineFacts,
};
use diskferry_customize::TargetHardware;
use diskferry_fs::{self as fs, Filesystem};
use diskferry_partition::PartitionError;

use crate::inspect;

/// What the compatibility check needs to know about the disk `image`.
pub fn image_facts(image: &Arc<dyn BlockDevice>) -> Result<ImageFacts, PartitionError> {
    let (table, volumes) = inspect::volumes(image)?;
    let mut facts = ImageFacts {
        firmware: inspect::firmware::firmware(image, &table, &volumes),
        ..Default::default()
    };
    for (p, dev) in volumes {
        let Ok(f) = fs::open(dev) else {
            continue;
        };
        let f: Arc<dyn Filesystem> = Arc::from(f);
        if fs::is_linux_root(&*f) {
            facts.linux.push(LinuxSystem {
                partition: p.number,
                kernels: linux_drivers(f),
            });
        } else if let Some(os) = inspect::os::detect(&*f).filter(|o| o.family == "windows") {
            let name = os
                .name
                .or(os.pretty_name)
                .unwrap_or_else(|| "Windows".into());
            facts.other.push((p.number, name));
        }
    }
    Ok(facts)
}

/// Everything wrong or worth knowing about deploying `image` onto the machine `machine`
/// describes, reconfigured for `hw` if given; an image whose table cannot be read gets a
/// warning (the deploy itself will say more).
pub fn check_deploy(
    image: &Arc<dyn BlockDevice>,
    machine: &MachineFacts,
    hw: Option<TargetHardware>,
) -> Vec<Finding> {
    match image_facts(image) {
        Ok(facts) => check(&facts, machine, hw),
        Err(e) => vec![Finding::warn(format!(
            "the image's partition table could not be read ({e}): compatibility not checked"
        ))],
    }
}
