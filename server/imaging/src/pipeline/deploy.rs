//! Deploy: the capture pipeline run backwards. An image (any disk we can read) is written onto
//! a target disk — a machine's disk over the wire, or any writable block device: the image's
//! partition table scaled to the target (the last partition follows the target's size when it
//! is recreated file by file), the boot bytes outside partitions, each partition by mode; then
//! a flush and a verification that reads the target back through the filesystem readers.
//!
//! A target too small for the data is refused before anything is written, with the numbers.

use std::sync::Arc;
use std::time::Instant;

use super::capture::CaptureError;
use super::disk::{plan_disk, write_disk, Destination, DiskPlan, DiskReport, Mode};
use super::verify::{verify_disks, VerifyReport};
use crate::progress::Progress;
use crate::units::human_bytes;
use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_fs as fs;

/// What a deploy did.
#[derive(Debug)]
pub struct DeployReport {
    pub disk: DiskReport,
    pub verify: VerifyReport,
}

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Nothing was written.
    #[error("{0}")]
    Refused(String),
    /// Writing started and failed: the target holds a partial copy.
    #[error("{0} (the target disk now holds an incomplete copy)")]
    Failed(CaptureError),
    #[error("verification after writing found {count} difference(s); first: {first}")]
    Differs { count: u64, first: String },
}

/// Writes `image` onto `target` (named `target_name` in messages) and verifies it.
pub fn deploy_disk(
    image: Arc<dyn BlockDevice>,
    target: Arc<dyn BlockDevice>,
    target_name: &str,
    mode: Mode,
    progress: &dyn Progress,
) -> Result<DeployReport, DeployError> {
    let started = Instant::now();
    if target.is_read_only() {
        return Err(DeployError::Refused(format!(
            "{target_name} is read-only: the client must run with --allow-write"
        )));
    }
    let source_err = |source| CaptureError::Source {
        source,
        partial: target_name.into(),
    };
    let plan = plan_disk(&image, mode, target.size(), &source_err).map_err(|e| match e {
        CaptureError::Options(m) => DeployError::Refused(format!(
            "{target_name} ({}) cannot take this image ({}): {m}",
            human_bytes(target.size()),
            human_bytes(image.size())
        )),
        e => DeployError::Refused(e.to_string()),
    })?;
    check_fits(&plan, target_name)?;
    let scheme = plan.table.scheme.name();
    let werr = |source: BlockError| CaptureError::Write {
        path: target_name.into(),
        source,
    };
    let (partitions, boot_bytes) = write_disk(
        &image,
        &target,
        plan,
        Destination::UsedDisk,
        progress,
        &source_err,
        &werr,
    )
    .map_err(DeployError::Failed)?;
    let verify = verify_disks(&image, &target)
        .map_err(|e| DeployError::Failed(CaptureError::Options(format!("verifying: {e}"))))?;
    if verify.differences > 0 {
        return Err(DeployError::Differs {
            count: verify.differences,
            first: verify.listed.first().cloned().unwrap_or_default(),
        });
    }
    Ok(DeployReport {
        disk: DiskReport {
            source_size: image.size(),
            output_size: target.size(),
            scheme,
            partitions,
            boot_bytes,
            elapsed: started.elapsed(),
        },
        verify,
    })
}

/// Every partition recreated file by file must have room for the source's used bytes in its
/// new size (copied blocks and sectors keep their size: `plan_disk` checked they fit).
fn check_fits(plan: &DiskPlan, target_name: &str) -> Result<(), DeployError> {
    for pp in plan.parts.iter().filter(|pp| pp.mode == Mode::Files) {
        let used = fs::open(Arc::clone(&pp.dev)).map_or(0, |f| f.info().used_bytes);
        let room = plan
            .table
            .partitions
            .iter()
            .find(|t| t.number == pp.part.number)
            .map_or(0, |t| t.size);
        if used > room {
            return Err(DeployError::Refused(format!(
                "{target_name} is too small: partition {} holds {} ({used} bytes) and would get {} ({room} bytes) on a disk of {}",
                pp.part.number,
                human_bytes(used),
                human_bytes(room),
                human_bytes(plan.out_size)
            )));
        }
    }
    Ok(())
}
