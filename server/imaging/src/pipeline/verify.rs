//! Verifying a capture (or any two disks): partitions are paired by number; where both sides
//! hold a filesystem we can read, every file, directory and link of the first is looked up in
//! the second and compared — kind, size, mode, owner, modification time, link target, extended
//! attributes and content; elsewhere the ranges the first side reports as data must hold the
//! same bytes on the second. The bytes outside partitions are compared too — boot code, the
//! boot loader's gap after the MBR, gaps between partitions and after the last one — each where
//! a copy puts it (moved with the partition it precedes). A disk without a partition table is one volume, compared the same way; a comparison
//! that compared nothing while the source holds data is a difference, never a pass.

use std::ops::Range;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, BlockError, SliceDevice};
use diskferry_fs::overlay::TreeTransform;
use diskferry_fs::{self as fs, FileKind, Filesystem};
use diskferry_partition as partition;

/// Gaps outside partitions up to this size are compared wherever either side holds data.
const WHOLE_GAP: u64 = 64 << 20;

/// At most this many differences are described; all are counted.
const MAX_LISTED: usize = 50;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub files_compared: u64,
    pub bytes_compared: u64,
    pub differences: u64,
    /// The first differences, described.
    pub listed: Vec<String>,
    /// What was not compared and why (data the smaller copy had no room for).
    pub notes: Vec<String>,
}

impl VerifyReport {
    fn differ(&mut self, what: String) {
        self.differences += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push(what);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading {side}: {source}")]
    Read {
        side: &'static str,
        source: BlockError,
    },
    #[error("reading the {side} disk's partition table: {source}")]
    Table {
        side: &'static str,
        source: partition::PartitionError,
    },
    #[error("making the customization's edits to compare against: {0}")]
    Edits(String),
}

/// Compares disk `b` against disk `a`.
pub fn verify_disks(
    a: &Arc<dyn BlockDevice>,
    b: &Arc<dyn BlockDevice>,
) -> Result<VerifyReport, VerifyError> {
    verify_disks_with(a, b, None)
}

/// [`verify_disks`], `a`'s trees seen with `transform`'s edits: what a copy made with them
/// must hold (partitions whose filesystem a copy cannot recreate file by file are compared as
/// they are).
pub fn verify_disks_with(
    a: &Arc<dyn BlockDevice>,
    b: &Arc<dyn BlockDevice>,
    transform: Option<&dyn TreeTransform>,
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    let ta = partition::read_table(&**a).map_err(|source| VerifyError::Table {
        side: "first",
        source,
    })?;
    let tb = partition::read_table(&**b).map_err(|source| VerifyError::Table {
        side: "second",
        source,
    })?;
    if ta.scheme != tb.scheme
        || ta.disk_guid != tb.disk_guid
        || ta.mbr_signature != tb.mbr_signature
    {
        report.differ("the partition tables differ in scheme or disk identifier".into());
    }
    if !ta.partitions.is_empty() {
        compare_outside(a, &ta, b, &tb, &mut report)?;
    }
    for pa in &ta.partitions {
        let Some(pb) = tb.partitions.iter().find(|p| p.number == pa.number) else {
            report.differ(format!("partition {} is missing", pa.number));
            continue;
        };
        if pa.kind != pb.kind || pa.guid != pb.guid || pa.name != pb.name {
            report.differ(format!(
                "partition {}: type, GUID or name differs",
                pa.number
            ));
        }
        let da: Arc<dyn BlockDevice> = Arc::new(
            SliceDevice::new(Arc::clone(a), pa.start, pa.size).map_err(|source| {
                VerifyError::Read {
                    side: "the first disk",
                    source,
                }
            })?,
        );
        let db: Arc<dyn BlockDevice> = Arc::new(
            SliceDevice::new(Arc::clone(b), pb.start, pb.size).map_err(|source| {
                VerifyError::Read {
                    side: "the second disk",
                    source,
                }
            })?,
        );
        let edits = transform.map(|t| (t, pa.number));
        compare_volume(
            &da,
            &db,
            &format!("partition {}", pa.number),
            edits,
            &mut report,
        )?;
    }
    if ta.partitions.is_empty() {
        if !tb.partitions.is_empty() {
            report.differ("the copy has a partition table, the source none".into());
        }
        // A bare filesystem, or sectors with no table: the whole disk is the volume.
        compare_volume(a, b, "the whole disk", None, &mut report)?;
    }
    if report.files_compared == 0 && report.bytes_compared == 0 && report.differences == 0 {
        let has_data = !super::capture::data_ranges(&**a)
            .map_err(|source| VerifyError::Read {
                side: "the first disk",
                source,
            })?
            .is_empty();
        if has_data {
            report.differ("nothing was compared, though the source holds data".into());
        }
    }
    Ok(report)
}

/// The bytes outside partitions — boot code, the boot loader's gap, gaps between and after
/// partitions — each against where a copy puts it (moved with the partition it precedes):
/// wherever either side holds data. A gap with data that has no place on `b` (a smaller
/// disk) is a note, not a difference: the copy was asked to be smaller.
fn compare_outside(
    a: &Arc<dyn BlockDevice>,
    ta: &partition::PartitionTable,
    b: &Arc<dyn BlockDevice>,
    tb: &partition::PartitionTable,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    let (copies, left_out) = super::plan::outside_copies(ta, a.size(), tb, b.size());
    let side_a = |source| VerifyError::Read {
        side: "the first disk",
        source,
    };
    let side_b = |source| VerifyError::Read {
        side: "the second disk",
        source,
    };
    for c in copies.iter().filter(|c| c.from.start < c.from.end) {
        let len = c.from.end - c.from.start;
        let sa = SliceDevice::new(Arc::clone(a), c.from.start, len).map_err(side_a)?;
        let sb = SliceDevice::new(Arc::clone(b), c.to, len).map_err(side_b)?;
        let mut ranges = super::capture::data_ranges_or_whole(&sa);
        // Small gaps are checked for stray data on the copy too; a large one (the rest of a
        // big target disk) only where the source has data, or verify would read it all.
        if len <= WHOLE_GAP {
            ranges.extend(super::capture::data_ranges_or_whole(&sb));
        }
        let label = if c.from.start == 0 {
            "boot code".to_string()
        } else {
            format!("bytes outside partitions at {}", c.from.start)
        };
        compare_ranges(&sa, &sb, &crate::ranges::normalize(ranges), &label, report)?;
    }
    for r in left_out {
        let data = super::capture::data_bytes_in(a, &r).map_err(side_a)?;
        if data > 0 {
            report.notes.push(format!(
                "{data} bytes of data outside partitions at {}..{} have no place on the smaller copy: not compared",
                r.start, r.end
            ));
        }
    }
    Ok(())
}

/// One volume: file by file where both sides hold a filesystem we read, else the first
/// side's data ranges byte for byte.
fn compare_volume(
    da: &Arc<dyn BlockDevice>,
    db: &Arc<dyn BlockDevice>,
    label: &str,
    edits: Option<(&dyn TreeTransform, u32)>,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    match (fs::open(Arc::clone(da)), fs::open(Arc::clone(db))) {
        (Ok(fa), Ok(fb)) => {
            let fa: Arc<dyn fs::Filesystem> = Arc::from(fa);
            let edited = match edits {
                Some((t, number)) if fa.rebuild_obstacle().is_none() => t
                    .apply(number, Arc::clone(&fa))
                    .map_err(|e| VerifyError::Edits(e.to_string()))?,
                _ => None,
            };
            match edited {
                Some((overlay, _)) => compare_trees(&overlay, &*fb, label, report),
                None => compare_trees(&*fa, &*fb, label, report),
            }
        }
        (Ok(_), Err(e)) => report.differ(format!(
            "{label}: the copy's filesystem cannot be read: {e}"
        )),
        _ => {
            let ranges: Vec<Range<u64>> = super::capture::data_ranges(&**da)
                .map_err(|source| VerifyError::Read {
                    side: "the first disk",
                    source,
                })?
                .into_iter()
                .filter(|r| r.end <= db.size())
                .collect();
            compare_ranges(&**da, &**db, &ranges, label, report)?;
        }
    }
    Ok(())
}

fn compare_ranges(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    ranges: &[Range<u64>],
    label: &str,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for r in ranges {
        let mut pos = r.start;
        while pos < r.end {
            let n = ((r.end - pos) as usize).min(ba.len());
            a.read_at(&mut ba[..n], pos)
                .map_err(|source| VerifyError::Read {
                    side: "the first disk",
                    source,
                })?;
            b.read_at(&mut bb[..n], pos)
                .map_err(|source| VerifyError::Read {
                    side: "the second disk",
                    source,
                })?;
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                report.differ(format!(
                    "{label}: bytes differ at offset {}",
                    pos + i as u64
                ));
                break;
            }
            report.bytes_compared += n as u64;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Every entry of `a` looked up in `b` and compared.
pub(crate) fn compare_trees(
    a: &dyn Filesystem,
    b: &dyn Filesystem,
    label: &str,
    report: &mut VerifyReport,
) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let walked = fs::tree::walk(
        a,
        a.root(),
        &mut |path, e| {
            found.push((path.to_string(), e.node));
            Ok(())
        },
        &mut |path, e| problems.push(format!("{path}: {e}")),
    );
    for p in problems {
        report.differ(format!("{label}: {p}"));
    }
    if let Err(e) = walked {
        report.differ(format!("{label}: walking the source failed: {e}"));
    }
    for (path, node) in found {
        if let Err(what) = compare_entry(a, b, &path, node, report) {
            report.differ(format!("{label}: /{path}: {what}"));
        }
        report.files_compared += 1;
    }
}

/// How one entry of the copy differs from the source's (the sides are "source" and "copy").
#[derive(Debug, thiserror::Error)]
enum Difference {
    #[error("unreadable in the {0}: {1}")]
    Unreadable(&'static str, fs::FsError),
    #[error("missing in the copy")]
    Missing,
    #[error("{0} in the source, {1} in the copy")]
    Kind(&'static str, &'static str),
    #[error("{0} bytes in the source, {1} in the copy")]
    Size(u64, u64),
    #[error("mode/owner {:o} {}:{} in the source, {:o} {}:{} in the copy", .0.0, .0.1, .0.2, .1.0, .1.1, .1.2)]
    Owner((u32, u32, u32), (u32, u32, u32)),
    #[error("modification time {0} in the source, {1} in the copy")]
    Mtime(String, String),
    #[error("link targets differ")]
    LinkTarget,
    #[error("extended attributes differ")]
    Xattrs,
    #[error("reading the {0}: {1}")]
    Read(&'static str, fs::FsError),
    #[error("content differs near offset {0}")]
    Content(u64),
}

fn compare_entry(
    a: &dyn Filesystem,
    b: &dyn Filesystem,
    path: &str,
    node: u64,
    report: &mut VerifyReport,
) -> Result<(), Difference> {
    let ma = a
        .metadata(node)
        .map_err(|e| Difference::Unreadable("source", e))?;
    let nb = b.lookup(path).map_err(|_| Difference::Missing)?;
    let mb = b
        .metadata(nb)
        .map_err(|e| Difference::Unreadable("copy", e))?;
    if ma.kind != mb.kind {
        return Err(Difference::Kind(ma.kind.name(), mb.kind.name()));
    }
    if ma.kind == FileKind::File && ma.size != mb.size {
        return Err(Difference::Size(ma.size, mb.size));
    }
    let (oa, ob) = ((ma.mode, ma.uid, ma.gid), (mb.mode, mb.uid, mb.gid));
    if oa != ob {
        return Err(Difference::Owner(oa, ob));
    }
    if ma.kind != FileKind::Dir && ma.mtime != mb.mtime {
        return Err(Difference::Mtime(
            format!("{:?}", ma.mtime),
            format!("{:?}", mb.mtime),
        ));
    }
    if ma.kind == FileKind::Symlink && a.read_link(node).ok() != b.read_link(nb).ok() {
        return Err(Difference::LinkTarget);
    }
    let (xa, xb) = (
        a.xattrs(node).unwrap_or_default(),
        b.xattrs(nb).unwrap_or_default(),
    );
    let (mut xa, mut xb) = (xa, xb);
    xa.sort();
    xb.sort();
    if xa != xb {
        return Err(Difference::Xattrs);
    }
    if ma.kind == FileKind::File {
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut pos = 0;
        while pos < ma.size {
            let na = a
                .read_at(node, pos, &mut ba)
                .map_err(|e| Difference::Read("source", e))?;
            let nb2 = b
                .read_at(nb, pos, &mut bb[..na.max(1)])
                .map_err(|e| Difference::Read("copy", e))?;
            if na == 0 {
                break;
            }
            if na != nb2 || ba[..na] != bb[..na] {
                return Err(Difference::Content(pos));
            }
            report.bytes_compared += na as u64;
            pos += na as u64;
        }
    }
    Ok(())
}
