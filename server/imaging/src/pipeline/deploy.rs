//! Deploy: the capture pipeline run backwards. An image (any disk we can read) is written onto
//! a target disk — a machine's disk over the wire, or any writable block device: the image's
//! partition table scaled to the target (the last partition follows the target's size when it
//! is recreated file by file), the boot bytes outside partitions, each partition by mode; then
//! a flush and a verification through the filesystem readers: partitions the agent confirmed
//! equal to their local stage by hashes (`delta`) are read from the stage, everything else
//! is read back from the target.
//!
//! Every deploy also gives EFI system partitions recreated file by file the firmware's
//! fallback loader where it is missing (`deploy_edits`), unless turned off.
//!
//! A target too small for the data is refused before anything is written, with the numbers.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::capture::CaptureError;
use super::capture::CopyError;
use super::delta::{write_delta, Confirmed, ConfirmedView};
use super::deploy_edits::{deploy_edits, skipped};
use super::disk::{write_disk, CopyEnds, Destination, DiskReport, Mode, PartitionReport};
use super::plan::{plan_disk, DiskPlan};
use super::verify::{verify_disks_with, VerifyError, VerifyReport};
use crate::progress::Progress;
use crate::units::human_bytes;
use diskferry_blockdev::{BlockDevice, SliceDevice};
use diskferry_fs as fs;
use diskferry_fs::overlay::TreeTransform;

/// How a deploy goes: each partition by `mode`, with `transform`'s edits (customization) made
/// to the trees of partitions recreated file by file, and — with `fallback_loader` — the EFI
/// fallback loader added to EFI system partitions lacking it.
#[derive(Debug, Clone)]
pub struct DeployHow {
    pub mode: Mode,
    pub transform: Option<Arc<dyn TreeTransform>>,
    /// Add `\EFI\BOOT\BOOTX64.EFI` (a copy of the system's own loader) where it is missing,
    /// so firmware with blank boot variables finds a loader. On by default.
    pub fallback_loader: bool,
}

impl Default for DeployHow {
    /// Auto mode, nothing customized, the fallback loader added.
    fn default() -> DeployHow {
        DeployHow {
            mode: Mode::Auto,
            transform: None,
            fallback_loader: true,
        }
    }
}

impl DeployHow {
    /// Each partition by `mode`, nothing customized (the fallback loader added).
    pub fn mode(mode: Mode) -> DeployHow {
        DeployHow {
            mode,
            ..DeployHow::default()
        }
    }
}

/// What a deploy did.
#[derive(Debug)]
pub struct DeployReport {
    pub disk: DiskReport,
    pub verify: VerifyReport,
}

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Nothing was written: the target is read-only.
    #[error("{target} is read-only: the client must run with --allow-write")]
    ReadOnly { target: String },
    /// Nothing was written: the image's layout cannot be planned onto the target.
    #[error("{target} ({}) cannot take this image ({}): {source}", human_bytes(*target_size), human_bytes(*image_size))]
    CannotPlan {
        target: String,
        target_size: u64,
        image_size: u64,
        source: Box<CaptureError>,
    },
    /// Nothing was written: a partition recreated file by file would not hold its data.
    #[error("{target} is too small: partition {partition} holds {} ({used} bytes) and would get {} ({room} bytes) on a disk of {}", human_bytes(*used), human_bytes(*room), human_bytes(*disk))]
    TooSmall {
        target: String,
        partition: u32,
        used: u64,
        room: u64,
        disk: u64,
    },
    /// Writing started and failed: the target holds a partial copy.
    #[error("{0} (the target disk now holds an incomplete copy)")]
    Failed(Box<CaptureError>),
    #[error("verifying the target after writing: {0}")]
    Verify(#[source] VerifyError),
    #[error("verification after writing found {count} difference(s); first: {first}")]
    Differs { count: u64, first: String },
    /// Nothing was written: edits need partitions recreated file by file.
    #[error("{0}")]
    CannotCustomize(String),
    /// Nothing was written to any machine: the server could not make the disk a multicast
    /// deploy sends (its staging file).
    #[error("building the disk to send on the server: {0}")]
    Stage(String),
}

impl DeployError {
    /// True when the target was left untouched.
    pub fn nothing_written(&self) -> bool {
        matches!(
            self,
            DeployError::ReadOnly { .. }
                | DeployError::CannotPlan { .. }
                | DeployError::TooSmall { .. }
                | DeployError::CannotCustomize(_)
                | DeployError::Stage(_)
        )
    }
}

/// Writes `image` onto `target` (named `target_name` in messages) as `how` says and verifies
/// it.
pub fn deploy_disk(
    image: Arc<dyn BlockDevice>,
    target: Arc<dyn BlockDevice>,
    target_name: &str,
    how: &DeployHow,
    progress: &dyn Progress,
) -> Result<DeployReport, DeployError> {
    let mode = how.mode;
    let started = Instant::now();
    if target.is_read_only() {
        return Err(DeployError::ReadOnly {
            target: target_name.to_string(),
        });
    }
    let name = Path::new(target_name);
    let unpartitioned = diskferry_partition::read_table(&*image)
        .is_ok_and(|t| t.scheme == diskferry_partition::Scheme::None);
    if how.transform.is_some() && (unpartitioned || matches!(mode, Mode::Blocks | Mode::Sectors)) {
        return Err(DeployError::CannotCustomize(format!(
            "customizing needs the partitions recreated file by file (--mode auto or files), not {}",
            if unpartitioned { "an image without a partition table" } else { mode.name() }
        )));
    }
    if unpartitioned {
        let skipped = how
            .fallback_loader
            .then(|| skipped(&image, Mode::Sectors))
            .flatten();
        return deploy_whole_disk(&image, &target, target_name, started, skipped);
    }
    let plan =
        plan_disk(&image, mode, target.size(), name).map_err(|source| DeployError::CannotPlan {
            target: target_name.to_string(),
            target_size: target.size(),
            image_size: image.size(),
            source: Box::new(source),
        })?;
    check_fits(&plan, target_name)?;
    let (edits, skipped) = deploy_edits(&plan, how.transform.clone(), how.fallback_loader);
    let transform = edits.as_deref();
    if let Some(t) = transform {
        check_edits(&plan, t)?;
    }
    let scheme = plan.table.scheme.name();
    let confirmed = Confirmed::default();
    let ends = CopyEnds {
        src: &image,
        dst: &target,
        dst_name: name,
        destination: Destination::UsedDisk,
        previous: None,
        confirmed: Some(&confirmed),
        transform,
    };
    let (partitions, boot_bytes, mut notes) =
        write_disk(&ends, plan, progress).map_err(|e| DeployError::Failed(Box::new(e)))?;
    notes.extend(skipped);
    let verify = verify_confirmed(&image, Arc::clone(&target), confirmed, transform)?;
    Ok(DeployReport {
        disk: DiskReport {
            source_size: image.size(),
            output_size: target.size(),
            scheme,
            partitions,
            boot_bytes,
            notes,
            elapsed: started.elapsed(),
        },
        verify,
    })
}

/// An image without a partition table (a whole-disk capture of such a disk) onto the target's
/// first bytes, as a delta: only chunks that differ are written and hashed again
/// afterwards, and the comparison reads the image where the hashes proved the target equal.
fn deploy_whole_disk(
    image: &Arc<dyn BlockDevice>,
    target: &Arc<dyn BlockDevice>,
    target_name: &str,
    started: Instant,
    skipped: Option<String>,
) -> Result<DeployReport, DeployError> {
    let size = image.size();
    if target.size() < size {
        return Err(DeployError::CannotPlan {
            target: target_name.to_string(),
            target_size: target.size(),
            image_size: size,
            source: Box::new(CaptureError::ResizeNeedsTable),
        });
    }
    tracing::info!("the image has no partition table: writing it whole, as a delta");
    let failed = |e: CaptureError| DeployError::Failed(Box::new(e));
    let write_err = |source| {
        failed(CaptureError::Write {
            path: Path::new(target_name).to_path_buf(),
            source,
        })
    };
    let region: Arc<dyn BlockDevice> =
        Arc::new(SliceDevice::new(Arc::clone(target), 0, size).map_err(write_err)?);
    let delta = write_delta(image, &region).map_err(|e| match e {
        CopyError::Read(source) => failed(CaptureError::Source {
            source,
            partial: Path::new(target_name).to_path_buf(),
        }),
        CopyError::Write(e) => write_err(e),
    })?;
    tracing::info!(
        "sent {} of the {} the image holds (the rest was already on the disk)",
        human_bytes(delta.sent_bytes),
        human_bytes(delta.data_bytes)
    );
    let confirmed = Confirmed::default();
    if delta.confirmed {
        confirmed
            .lock()
            .expect("confirmed")
            .push((0..size, Arc::clone(image)));
    }
    let verify = verify_confirmed(image, region, confirmed, None)?;
    Ok(DeployReport {
        disk: DiskReport {
            source_size: size,
            output_size: target.size(),
            scheme: "none",
            partitions: vec![PartitionReport {
                number: 0,
                filesystem: "whole disk",
                mode: Mode::Sectors,
                read: delta.data_bytes,
                reused: 0,
                sent: Some(delta.sent_bytes),
                note: Some("no partition table: the image's data chunks, as a delta".into()),
                changes: Vec::new(),
            }],
            boot_bytes: 0,
            notes: skipped.into_iter().collect(),
            elapsed: started.elapsed(),
        },
        verify,
    })
}

/// Compares `image` with `target` after writing: ranges the agent confirmed by hash are read
/// from their stage, the rest of the target (every partition of a target that cannot hash,
/// boot code, gaps) is read back; the image's trees with `transform`'s edits. A difference is
/// an error.
fn verify_confirmed(
    image: &Arc<dyn BlockDevice>,
    target: Arc<dyn BlockDevice>,
    confirmed: Confirmed,
    transform: Option<&dyn TreeTransform>,
) -> Result<VerifyReport, DeployError> {
    let view: Arc<dyn BlockDevice> = Arc::new(ConfirmedView::new(target, confirmed));
    let verify = verify_disks_with(image, &view, transform).map_err(DeployError::Verify)?;
    if verify.differences > 0 {
        return Err(DeployError::Differs {
            count: verify.differences,
            first: verify.listed.first().cloned().unwrap_or_default(),
        });
    }
    Ok(verify)
}

/// The edits applied once to every partition recreated file by file, before anything is
/// written: an edit the image's system cannot take (a group it lacks, a path through a link)
/// is refused while the target is still untouched.
fn check_edits(plan: &DiskPlan, transform: &dyn TreeTransform) -> Result<(), DeployError> {
    for pp in plan.parts.iter().filter(|pp| pp.mode == Mode::Files) {
        let Ok(tree) = fs::open(Arc::clone(&pp.dev)) else {
            continue;
        };
        transform
            .apply(pp.part.number, Arc::from(tree))
            .map_err(|e| {
                DeployError::CannotCustomize(format!("partition {}: {e}", pp.part.number))
            })?;
    }
    Ok(())
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
            return Err(DeployError::TooSmall {
                target: target_name.to_string(),
                partition: pp.part.number,
                used,
                room,
                disk: plan.out_size,
            });
        }
    }
    Ok(())
}
