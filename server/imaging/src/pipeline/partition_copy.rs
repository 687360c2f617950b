//! Copying one partition: file by file through our filesystem writers (with progress driven
//! by the bytes read from the source and the files done), or by the byte ranges its plan
//! listed (a files-mode incremental capture reads unchanged files from the previous capture:
//! `reuse`); and the helpers a disk copy needs around that (overall progress, zeroing a used
//! disk, a local staging file).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::capture::{copy_ranges, data_ranges, CopyError};
use super::disk::Mode;
use super::reuse::{PreviousPartition, ReusingFs};
use crate::progress::Progress;
use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_fs::overlay::TreeTransform;
use diskferry_fs::{self as fs, FsKind};
use diskferry_partition::Partition;

/// Zeroes a range of `dst` in pieces of at most 1 GiB (the client zeroes on its side).
pub(crate) fn zero(dst: &dyn BlockDevice, range: Range<u64>) -> Result<(), BlockError> {
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(1 << 30);
        dst.write_zeroes(at, n)?;
        at += n;
    }
    Ok(())
}

/// Bytes of a staged partition kept in memory before the rest spills to a temporary file.
const STAGE_RAM: u64 = 512 << 20;

/// A staging device of `size` bytes: the hybrid RAM-first volume, spilling past
/// [`STAGE_RAM`] to a new file in the temporary directory (removed when dropped).
pub(super) fn staging_device(size: u64) -> Result<Arc<dyn BlockDevice>, BlockError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let spill = std::env::temp_dir().join(format!(
        "diskferry-stage-{}-{n}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let options = diskferry_blockdev::HybridOptions {
        ram_limit: STAGE_RAM,
        spill: Some(spill),
    };
    let volume = diskferry_blockdev::HybridVolume::new(size, options)
        .map_err(|e| BlockError::Format(Box::new(e)))?;
    Ok(Arc::new(volume))
}

/// Ranges to copy (`None`: file by file) and the bytes expected to be read.
pub(super) type CopyPlan = (Option<Vec<Range<u64>>>, u64);

/// What a partition's copy will read: for blocks and sectors the byte ranges (the allocated
/// blocks, or the ranges holding data), for files the filesystem's used bytes as an estimate.
/// Worked out once, before the copy, so the job knows its overall size.
pub(super) fn copy_plan(dev: &Arc<dyn BlockDevice>, m: Mode) -> Result<CopyPlan, PartError> {
    let ranges = match m {
        Mode::Files => {
            let used = fs::open(Arc::clone(dev)).map_or(0, |f| f.info().used_bytes);
            return Ok((None, used));
        }
        Mode::Blocks => {
            let fs = fs::open(Arc::clone(dev)).map_err(PartError::Fs)?;
            let map = fs.allocation_map().map_err(PartError::Fs)?;
            map.byte_ranges(0, dev.size())
        }
        Mode::Sectors | Mode::Auto => data_ranges(&**dev).map_err(PartError::Read)?,
    };
    let total = ranges.iter().map(|r: &Range<u64>| r.end - r.start).sum();
    Ok((Some(ranges), total))
}

/// Forwards to a [`Progress`] and adds the job's overall bytes done and total.
pub(super) struct Overall<'a> {
    inner: &'a dyn Progress,
    total: u64,
    finished_phases: std::sync::atomic::AtomicU64,
    in_phase: std::sync::atomic::AtomicU64,
}

impl<'a> Overall<'a> {
    pub(super) fn new(inner: &'a dyn Progress, total: u64) -> Overall<'a> {
        Overall {
            inner,
            total,
            finished_phases: Default::default(),
            in_phase: Default::default(),
        }
    }
}

impl Progress for Overall<'_> {
    fn start(&self, phase: &str, total: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let before = self.in_phase.swap(0, Relaxed);
        self.finished_phases.fetch_add(before, Relaxed);
        self.inner.start(phase, total);
    }
    fn advance(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.in_phase.fetch_add(bytes, Relaxed) + bytes;
        self.inner
            .overall(self.finished_phases.load(Relaxed) + now, self.total);
        self.inner.advance(bytes);
    }
    fn finish(&self) {
        self.inner.finish();
    }
    fn files(&self, done: u64, total: u64) {
        self.inner.files(done, total);
    }
}

pub(super) enum PartError {
    Read(BlockError),
    Write(BlockError),
    Fs(fs::FsError),
}

impl From<CopyError> for PartError {
    fn from(e: CopyError) -> Self {
        match e {
            CopyError::Read(e) => PartError::Read(e),
            CopyError::Write(e) => PartError::Write(e),
        }
    }
}

/// What copying one partition took.
#[derive(Debug, Clone, Default)]
pub(super) struct Copied {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes of files taken from the previous capture instead (files-mode incremental).
    pub reused: u64,
    /// Bytes sent to a used disk (deploys).
    pub sent: Option<u64>,
    /// What a tree transform changed in the files (customization), a line each.
    pub changes: Vec<String>,
}

/// How a rebuilt filesystem is laid out.
pub(super) enum LayoutFrom {
    /// Afresh, compact (captures).
    Fresh,
    /// Each file where the source keeps it, where it can (deploys of a capture).
    Source,
    /// Unchanged files read from the previous capture, and every file placed where it put
    /// them (files-mode incremental captures).
    Previous(PreviousPartition),
}

/// How a partition recreated file by file is written: its layout, and the edits made to its
/// tree on the way.
pub(super) struct RebuildHow<'a> {
    pub layout: LayoutFrom,
    pub transform: Option<&'a dyn TreeTransform>,
}

/// Copies one partition onto its place `p` in the destination — file by file when it has no
/// `ranges`, as `how` says, else those ranges.
pub(super) fn capture_partition(
    p: &Partition,
    src: &Arc<dyn BlockDevice>,
    dst: &Arc<dyn BlockDevice>,
    kind: FsKind,
    ranges: Option<Vec<Range<u64>>>,
    how: RebuildHow<'_>,
    progress: &dyn Progress,
) -> Result<Copied, PartError> {
    let phase = format!("part {}", p.number);
    let Some(ranges) = ranges else {
        let rebuild = Rebuild {
            kind,
            number: p.number,
            start_sector: p.start / 512,
            phase: &phase,
            transform: how.transform,
        };
        return rebuild_with_progress(src, dst, &rebuild, how.layout, progress);
    };
    // Blocks and sectors: the ranges were worked out in the plan.
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    progress.start(&phase, total);
    copy_ranges(&**src, dst, &ranges, progress)?;
    progress.finish();
    Ok(Copied {
        read: total,
        ..Copied::default()
    })
}

/// What a file-by-file rebuild recreates: the filesystem family, the partition's number and
/// first 512-byte sector (a FAT boot sector's hidden sectors), the progress phase's name and
/// the edits to make to its tree.
struct Rebuild<'a> {
    kind: FsKind,
    number: u32,
    start_sector: u64,
    phase: &'a str,
    transform: Option<&'a dyn TreeTransform>,
}

/// Recreates the filesystem file by file while a watcher reports progress: the bytes read from
/// the source drive it, the filesystem's used bytes are the (upper-bound) total, and the files
/// done out of those planned are shown too.
fn rebuild_with_progress(
    src: &Arc<dyn BlockDevice>,
    dst: &Arc<dyn BlockDevice>,
    what: &Rebuild<'_>,
    layout: LayoutFrom,
    progress: &dyn Progress,
) -> Result<Copied, PartError> {
    let counting = Arc::new(CountingDevice::new(Arc::clone(src)));
    let counters = Arc::new(fs::WriteCounters::default());
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| watch_progress(&counting, &counters, &done, progress));
        let source: Arc<dyn BlockDevice> = counting.clone();
        let r = rebuild(source, dst, what, layout, &counters, progress);
        done.store(true, Ordering::Release);
        r
    });
    progress.finish();
    result.map(|(reused, changes)| Copied {
        read: counting.read(),
        reused,
        sent: None,
        changes,
    })
}

/// Reports the bytes read and files written every 200 ms until `done`, then once more.
fn watch_progress(
    counting: &CountingDevice,
    counters: &fs::WriteCounters,
    done: &AtomicBool,
    progress: &dyn Progress,
) {
    let mut reported = 0;
    loop {
        let stop = done.load(Ordering::Acquire);
        let now = counting.read();
        progress.advance(now.saturating_sub(reported));
        reported = now;
        let (files, planned) = counters.get();
        if planned > 0 {
            progress.files(files, planned);
        }
        if stop {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The source's filesystem written anew onto `dst` with the source's parameters and identity
/// (a FAT boot sector's hidden sectors: the partition's first 512-byte sector), laid out as
/// `layout` says (the FAT writer always lays out afresh), with the transform's edits. Returns
/// the bytes of unchanged files taken from a previous capture and the edits made.
fn rebuild(
    source: Arc<dyn BlockDevice>,
    dst: &Arc<dyn BlockDevice>,
    what: &Rebuild<'_>,
    layout: LayoutFrom,
    counters: &Arc<fs::WriteCounters>,
    progress: &dyn Progress,
) -> Result<(u64, Vec<String>), PartError> {
    match what.kind {
        FsKind::Swap => {
            progress.start(what.phase, fs::swap::PAGE);
            fs::swap::recreate(&*source, &**dst).map_err(PartError::Fs)?;
            Ok((0, Vec::new()))
        }
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
            let fat = fs::fat::Fat::open(source).map_err(PartError::Fs)?;
            progress.start(what.phase, fs::Filesystem::info(&fat).used_bytes);
            let mut opts = fat.format_options();
            opts.counters = Some(Arc::clone(counters));
            opts.hidden_sectors = u32::try_from(what.start_sector).ok();
            with_previous(Box::new(fat), layout, what, |src| {
                fs::fat_write::write_fat(Arc::clone(dst), src, &opts).map(drop)
            })
        }
        _ => {
            let ext = fs::ext4::Ext4::open(source).map_err(PartError::Fs)?;
            progress.start(what.phase, fs::Filesystem::info(&ext).used_bytes);
            let mut opts = ext.format_options();
            opts.counters = Some(Arc::clone(counters));
            opts.keep_source_layout = matches!(layout, LayoutFrom::Source);
            with_previous(Box::new(ext), layout, what, |src| {
                fs::ext4::write::write_ext4(Arc::clone(dst), src, &opts).map(drop)
            })
        }
    }
}

/// Runs `write` on the source filesystem, wrapped so unchanged files come from the previous
/// capture when `layout` names one, with the transform's edits on top; returns the bytes
/// taken from the previous capture and the edits made.
fn with_previous(
    source: Box<dyn fs::Filesystem>,
    layout: LayoutFrom,
    what: &Rebuild<'_>,
    write: impl FnOnce(&dyn fs::Filesystem) -> fs::Result<()>,
) -> Result<(u64, Vec<String>), PartError> {
    let (reusing, tree): (_, Arc<dyn fs::Filesystem>) = match layout {
        LayoutFrom::Previous(previous) => {
            let r = Arc::new(ReusingFs::new(source, previous));
            (Some(Arc::clone(&r)), r)
        }
        _ => (None, Arc::from(source)),
    };
    let edited = match what.transform {
        Some(t) => t
            .apply(what.number, Arc::clone(&tree))
            .map_err(PartError::Fs)?,
        None => None,
    };
    let changes = match edited {
        Some((overlay, changes)) => {
            write(&overlay).map_err(PartError::Fs)?;
            changes
        }
        None => {
            write(&*tree).map_err(PartError::Fs)?;
            Vec::new()
        }
    };
    let Some(reusing) = reusing else {
        return Ok((0, changes));
    };
    let (files, bytes) = reusing.reused();
    tracing::info!(
        "{files} unchanged files ({}) taken from the previous capture",
        crate::units::human_bytes(bytes)
    );
    Ok((bytes, changes))
}

/// A device that counts the bytes read through it.
struct CountingDevice {
    inner: Arc<dyn BlockDevice>,
    read: std::sync::atomic::AtomicU64,
}

impl CountingDevice {
    fn new(inner: Arc<dyn BlockDevice>) -> CountingDevice {
        CountingDevice {
            inner,
            read: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn read(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl BlockDevice for CountingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskferry_blockdev::Result<()> {
        self.read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> diskferry_blockdev::Result<Vec<diskferry_blockdev::Extent>> {
        self.inner.block_status(offset, len)
    }

    /// Forwarded: the inner device may hash without reading here (a remote agent).
    fn chunk_hashes(
        &self,
        offset: u64,
        len: u64,
        chunk: u32,
    ) -> diskferry_blockdev::Result<Vec<[u8; 32]>> {
        self.inner.chunk_hashes(offset, len, chunk)
    }

    /// Forwarded, so bulk reads keep the inner device's pipelining.
    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, bytes::Bytes) -> diskferry_blockdev::Result<()>,
    ) -> diskferry_blockdev::Result<()> {
        self.inner.read_ranges(ranges, &mut |off, data| {
            self.read
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            sink(off, data)
        })
    }
}
