//! The edits a deploy makes to the trees it recreates: the caller's transform
//! (customization), then the EFI fallback loader ([`FallbackLoader`]) unless it was turned
//! off — chained, and scoped to the partitions the plan recreates file by file, so the
//! check before writing, the write and the verification afterwards all see the same edits,
//! and a volume copied by blocks or sectors is never expected to hold edits it cannot get.
//! Where the fallback would be missing on such a volume, a note says so: the fallback never
//! makes a deploy fail.

use std::sync::Arc;

use super::disk::Mode;
use super::plan::DiskPlan;
use diskferry_blockdev::BlockDevice;
use diskferry_fs::esp::{lacks_fallback, FallbackLoader, FALLBACK};
use diskferry_fs::overlay::{Chain, TreeOverlay, TreeTransform};
use diskferry_fs::{self as fs, Filesystem};

/// A transform applied to some partitions only.
struct Only {
    inner: Arc<dyn TreeTransform>,
    partitions: Vec<u32>,
}

impl TreeTransform for Only {
    fn apply(
        &self,
        partition: u32,
        base: Arc<dyn Filesystem>,
    ) -> fs::Result<Option<(TreeOverlay, Vec<String>)>> {
        if !self.partitions.contains(&partition) {
            return Ok(None);
        }
        self.inner.apply(partition, base)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The edits for a deploy planned as `plan`: `user`'s, then the fallback loader's when
/// `fallback` — on the partitions recreated file by file. Returns them and a note for each
/// EFI system partition lacking the fallback that a copy by blocks or sectors leaves so.
pub(super) fn deploy_edits(
    plan: &DiskPlan,
    user: Option<Arc<dyn TreeTransform>>,
    fallback: bool,
) -> (Option<Arc<dyn TreeTransform>>, Vec<String>) {
    let loader = fallback.then(|| Arc::new(FallbackLoader::new()) as Arc<dyn TreeTransform>);
    let mut notes = Vec::new();
    if fallback {
        for pp in plan.parts.iter().filter(|pp| pp.mode != Mode::Files) {
            if let Some(note) = skipped(&pp.dev, pp.mode) {
                notes.push(format!("partition {}: {note}", pp.part.number));
            }
        }
    }
    let partitions = plan
        .parts
        .iter()
        .filter(|pp| pp.mode == Mode::Files)
        .map(|pp| pp.part.number)
        .collect();
    let edits = Chain::of(user, loader)
        .map(|inner| Arc::new(Only { inner, partitions }) as Arc<dyn TreeTransform>);
    (edits, notes)
}

/// The note for a volume copied by `mode` that is an EFI system partition lacking the
/// fallback loader, if it is one.
pub(super) fn skipped(dev: &Arc<dyn BlockDevice>, mode: Mode) -> Option<String> {
    let tree = fs::open(Arc::clone(dev)).ok()?;
    lacks_fallback(&*tree).then(|| {
        format!(
            "the EFI system partition is copied by {}: no fallback loader (\\EFI\\BOOT\\{FALLBACK}) added",
            mode.name()
        )
    })
}
