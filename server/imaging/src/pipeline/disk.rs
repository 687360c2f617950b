//! Capture of a whole disk, partition by partition: the destination gets an equivalent
//! partition table (same identifiers; the last partition resized with `--size` when it is
//! recreated file by file), the bytes outside partitions that boot needs (boot code in sector 0,
//! the gap before the first partition where GRUB lives), and each partition by mode:
//!
//! - **files**: the same filesystem type recreated with the source's parameters and identity
//!   through our writers (ext2/3/4 → ext4 writer, FAT → FAT writer);
//! - **blocks**: the clusters the filesystem's allocation map marks used, at their offsets;
//! - **sectors**: every range the source does not report as zero;
//! - **auto**: files for ext4 and FAT, blocks for NTFS, sectors otherwise (BIOS boot,
//!   unknown, swap, ...).
//!
//! Verification ([`verify`]) compares each partition of the source and the output afterwards.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::capture::{copy_ranges, data_ranges, CaptureError, CopyError, OutputOptions};
use super::output::PartialOutput;
use crate::progress::Progress;
use diskferry_blockdev::{BlockDevice, BlockError, SliceDevice};
use diskferry_fs::{self as fs, FsKind};
use diskferry_partition::{self as partition, Partition, PartitionTable, Scheme};
use diskferry_vdisk::create_image;

/// How partitions are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Files,
    Blocks,
    Sectors,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Files => "files",
            Mode::Blocks => "blocks",
            Mode::Sectors => "sectors",
        }
    }
}

/// What happened to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReport {
    pub number: u32,
    pub filesystem: &'static str,
    pub mode: Mode,
    /// Bytes read from the source for it.
    pub read: u64,
    pub note: Option<String>,
}

impl std::fmt::Display for PartitionReport {
    /// `partition 2: ext4 by files, 1.6 MiB (1698216 bytes) read — note`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {}: {} by {}, {} ({} bytes) read",
            self.number,
            self.filesystem,
            self.mode.name(),
            crate::units::human_bytes(self.read),
            self.read
        )?;
        if let Some(n) = &self.note {
            write!(f, " — {n}")?;
        }
        Ok(())
    }
}

/// What a disk capture did.
#[derive(Debug, Clone, Default)]
pub struct DiskReport {
    pub source_size: u64,
    pub output_size: u64,
    pub scheme: &'static str,
    pub partitions: Vec<PartitionReport>,
    pub boot_bytes: u64,
    pub elapsed: Duration,
}

/// The mode a partition gets: what was asked, or for auto what its filesystem allows; files
/// falls back to blocks for NTFS (no writer) and to sectors for unreadable contents.
fn mode_for(asked: Mode, kind: FsKind, bios_boot: bool, boot_code: bool) -> (Mode, Option<String>) {
    // A boot loader in the volume's first sectors (extlinux, syslinux, GRUB, LILO) finds its
    // next stage by block numbers: recreating the filesystem would move those blocks.
    if boot_code && asked == Mode::Auto && kind != FsKind::Ntfs {
        return (
            Mode::Blocks,
            Some(format!(
                "{} holds a boot loader in its first sectors: copied its used blocks, in place",
                kind.name()
            )),
        );
    }
    if boot_code && asked == Mode::Files {
        let (m, note) = mode_for(asked, kind, bios_boot, false);
        let warn = "its boot loader points at fixed blocks and will not boot from the recreated copy (use --mode blocks)";
        return (
            m,
            Some(note.map_or(warn.to_string(), |n| format!("{n}; {warn}"))),
        );
    }
    let files_ok = matches!(
        kind,
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 | FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32
    );
    let blocks_ok = files_ok || kind == FsKind::Ntfs;
    match asked {
        _ if bios_boot => (Mode::Sectors, None),
        Mode::Sectors => (Mode::Sectors, None),
        Mode::Auto | Mode::Files if files_ok => (Mode::Files, None),
        Mode::Auto if blocks_ok => (Mode::Blocks, None),
        Mode::Files if blocks_ok => (
            Mode::Blocks,
            Some(format!(
                "{} has no writer yet: copied its used blocks",
                kind.name()
            )),
        ),
        Mode::Blocks if blocks_ok => (Mode::Blocks, None),
        Mode::Auto => (Mode::Sectors, None),
        _ => (
            Mode::Sectors,
            Some(format!(
                "{} cannot be read as a filesystem: copied every non-zero sector",
                kind.name()
            )),
        ),
    }
}

/// Whether a volume's first sectors hold a boot loader that addresses blocks directly: any
/// bytes in an ext2/3/4 volume's boot block (its first 1024 bytes, unused by the filesystem),
/// or a syslinux/extlinux/GRUB/LILO signature in a FAT boot sector.
fn has_boot_loader(dev: &dyn BlockDevice, kind: FsKind) -> Result<bool, BlockError> {
    if dev.size() < 1024 {
        return Ok(false);
    }
    let mut head = [0u8; 1024];
    dev.read_at(&mut head, 0)?;
    Ok(match kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => head.iter().any(|&b| b != 0),
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
            [&b"SYSLINUX"[..], b"EXTLINUX", b"GRUB", b"LILO"]
                .iter()
                .any(|sig| head[..512].windows(sig.len()).any(|w| w == *sig))
        }
        _ => false,
    })
}

fn err(partial: &Path) -> impl Fn(BlockError) -> CaptureError + '_ {
    move |source| CaptureError::Write {
        path: partial.to_path_buf(),
        source,
    }
}

/// The byte ranges outside partitions that boot needs: sector 0's boot code (the table itself
/// is rewritten) and the gap between the table and the first partition.
fn boot_ranges(table: &PartitionTable, disk_size: u64) -> Vec<Range<u64>> {
    let sector = u64::from(table.sector_size);
    let first = table
        .partitions
        .iter()
        .map(|p| p.start)
        .min()
        .unwrap_or(disk_size)
        .min(disk_size);
    let table_end = match table.scheme {
        Scheme::Gpt => {
            (2 + (u64::from(table.gpt_entries.max(128)) * 128).div_ceil(sector)) * sector
        }
        _ => sector,
    };
    let boot_code: Range<u64> = 0..440.min(disk_size);
    let mut out = Vec::from([boot_code]);
    if table_end < first {
        out.push(table_end..first);
    }
    out
}

/// One partition's part of a disk copy: the source partition, a device reading it, its
/// filesystem and the mode it gets (with a note when that is not what was asked).
pub(super) struct PartPlan {
    pub part: Partition,
    pub dev: Arc<dyn BlockDevice>,
    pub kind: FsKind,
    pub mode: Mode,
    pub note: Option<String>,
}

/// What a disk copy will do: the destination's table (resized to `out_size` where allowed)
/// and each partition's plan.
pub(super) struct DiskPlan {
    pub table: PartitionTable,
    pub parts: Vec<PartPlan>,
    pub out_size: u64,
}

/// Reads the source's table and decides each partition's mode; with a destination size
/// different from the source's, the last partition follows it when it is recreated file by
/// file, and anything else must fit as it is.
pub(super) fn plan_disk(
    src: &Arc<dyn BlockDevice>,
    mode: Mode,
    out_size: u64,
    source_err: &dyn Fn(BlockError) -> CaptureError,
) -> Result<DiskPlan, CaptureError> {
    let mut table = partition::read_table(&**src)
        .map_err(|e| CaptureError::Options(format!("reading the source's partition table: {e}")))?;
    // Decide every partition's mode first: resizing depends on them.
    let mut parts = Vec::new();
    for p in &table.partitions {
        let dev: Arc<dyn BlockDevice> =
            Arc::new(SliceDevice::new(Arc::clone(src), p.start, p.size).map_err(source_err)?);
        let kind = fs::detect(&*dev).map_err(source_err)?;
        let boot_code = has_boot_loader(&*dev, kind).map_err(source_err)?;
        let (m, note) = mode_for(mode, kind, partition::is_bios_boot(&p.kind), boot_code);
        parts.push(PartPlan {
            part: p.clone(),
            dev,
            kind,
            mode: m,
            note,
        });
    }
    if table.scheme == Scheme::None {
        return Err(CaptureError::Options(
            "the source has no partition table: capture it with --mode sectors".into(),
        ));
    }
    if out_size != src.size() {
        let last = table
            .partitions
            .iter()
            .max_by_key(|p| p.end())
            .map(|p| p.number);
        let last_files = parts
            .iter()
            .any(|pp| Some(pp.part.number) == last && pp.mode == Mode::Files);
        let (_, usable_end) = table.usable_range(out_size);
        let fits = table.partitions.iter().all(|p| p.end() <= usable_end);
        if last_files {
            table.resize_last(usable_end).map_err(|e| {
                CaptureError::Options(format!("cannot fit a disk of {out_size} bytes: {e}"))
            })?;
        } else if !fits {
            return Err(CaptureError::Options(format!(
                "a disk of {out_size} bytes cuts into a partition that is not recreated file by file (the last one must be ext4 or FAT in files or auto mode to shrink)"
            )));
        }
    }
    Ok(DiskPlan {
        table,
        parts,
        out_size,
    })
}

/// Where [`write_disk`] writes: a new sparse image (reads as zeros where nothing is written),
/// or a disk that may hold anything (deploys), whose ranges are zeroed before they are
/// written and whose filesystems are built in a local staging file first, so the many small
/// writes of the filesystem writers never cross the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Destination {
    FreshImage,
    UsedDisk,
}

/// Zeroes a range of `dst` in pieces of at most 1 GiB (the client zeroes on its side).
fn zero(dst: &dyn BlockDevice, range: Range<u64>) -> Result<(), BlockError> {
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(1 << 30);
        dst.write_zeroes(at, n)?;
        at += n;
    }
    Ok(())
}

/// Writes the plan onto `dst`: boot bytes, the table, every partition; then flushes.
pub(super) fn write_disk(
    src: &Arc<dyn BlockDevice>,
    dst: &Arc<dyn BlockDevice>,
    plan: DiskPlan,
    destination: Destination,
    progress: &dyn Progress,
    source_err: &dyn Fn(BlockError) -> CaptureError,
    werr: &dyn Fn(BlockError) -> CaptureError,
) -> Result<(Vec<PartitionReport>, u64), CaptureError> {
    let DiskPlan { table, parts, .. } = plan;
    let used_disk = destination == Destination::UsedDisk;
    // Boot bytes, then the table (which keeps sector 0's boot code).
    let boot = boot_ranges(&table, src.size());
    let boot_bytes: u64 = boot.iter().map(|r| r.end - r.start).sum();
    if used_disk {
        for r in &boot {
            zero(&**dst, r.clone()).map_err(werr)?;
        }
    }
    copy_ranges(&**src, dst, &boot, progress).map_err(|e| match e {
        CopyError::Read(e) => source_err(e),
        CopyError::Write(e) => werr(e),
    })?;
    partition::write_table(&**dst, &table)
        .map_err(|e| CaptureError::Options(format!("writing the partition table: {e}")))?;

    // The whole job's expected bytes, so progress can show an overall figure.
    let part_err = |e: PartError, number: u32| match e {
        PartError::Read(e) => source_err(e),
        PartError::Write(e) => werr(e),
        PartError::Fs(e) => CaptureError::Options(format!("partition {number}: {e}")),
    };
    let mut copies = Vec::with_capacity(parts.len());
    for pp in &parts {
        copies.push(copy_plan(&pp.dev, pp.mode).map_err(|e| part_err(e, pp.part.number))?);
    }
    let grand_total: u64 = copies.iter().map(|c| c.1).sum();
    let progress = &Overall::new(progress, grand_total);
    let mut reports = Vec::new();
    for (pp, (ranges, _)) in parts.into_iter().zip(copies) {
        let p = &pp.part;
        let target = table
            .partitions
            .iter()
            .find(|t| t.number == p.number)
            .cloned()
            .unwrap_or(p.clone());
        let ddev: Arc<dyn BlockDevice> =
            Arc::new(SliceDevice::new(Arc::clone(dst), target.start, target.size).map_err(werr)?);
        if used_disk {
            zero(&*ddev, 0..ddev.size()).map_err(werr)?;
        }
        let read = if used_disk && ranges.is_none() {
            // Built locally, then sent as large writes of the data it holds.
            let stage = staging_device(ddev.size()).map_err(werr)?;
            let read = capture_partition(p, &pp.dev, &stage, pp.kind, None, progress)
                .map_err(|e| part_err(e, p.number))?;
            let written = data_ranges(&*stage).map_err(werr)?;
            copy_ranges(&*stage, &ddev, &written, &crate::progress::Silent).map_err(
                |e| match e {
                    CopyError::Read(e) | CopyError::Write(e) => werr(e),
                },
            )?;
            read
        } else {
            capture_partition(p, &pp.dev, &ddev, pp.kind, ranges, progress)
                .map_err(|e| part_err(e, p.number))?
        };
        reports.push(PartitionReport {
            number: p.number,
            filesystem: pp.kind.name(),
            mode: pp.mode,
            read,
            note: pp.note,
        });
    }
    dst.flush().map_err(werr)?;
    Ok((reports, boot_bytes))
}

/// A sparse temporary file of `size` bytes (removed when dropped), as a device.
fn staging_device(size: u64) -> Result<Arc<dyn BlockDevice>, BlockError> {
    let io = |source| BlockError::Io {
        op: "create a staging file",
        offset: None,
        device: std::env::temp_dir().display().to_string(),
        source,
    };
    let file = tempfile::tempfile().map_err(io)?;
    file.set_len(size).map_err(io)?;
    let path = std::env::temp_dir().join("diskferry-staging");
    Ok(Arc::new(diskferry_blockdev::FileDevice::from_file(
        file, &path, true,
    )?))
}

/// Captures `src` into a new image at `out`, partition by partition.
pub fn capture_disk(
    src: Arc<dyn BlockDevice>,
    out: &Path,
    output: OutputOptions,
    mode: Mode,
    size: Option<u64>,
    progress: &dyn Progress,
) -> Result<DiskReport, CaptureError> {
    let started = Instant::now();
    let source_err = |source| CaptureError::Source {
        source,
        partial: out.with_extension("partial"),
    };
    let plan = plan_disk(&src, mode, size.unwrap_or(src.size()), &source_err)?;
    let out_size = plan.out_size;
    let scheme = plan.table.scheme.name();

    let output_file = PartialOutput::create(out, output.overwrite)?;
    let partial = output_file.partial_path().to_path_buf();
    let werr = err(&partial);
    let file = output_file.file().try_clone().map_err(|source| {
        werr(BlockError::Io {
            op: "reopen",
            offset: None,
            device: partial.display().to_string(),
            source,
        })
    })?;
    let dst = create_image(
        output.format,
        file,
        &partial,
        out_size,
        output.compress,
        src.logical_sector_size(),
    )
    .map_err(|e| werr(e.into()))?;
    let (partitions, boot_bytes) = write_disk(
        &src,
        &dst,
        plan,
        Destination::FreshImage,
        progress,
        &source_err,
        &werr,
    )?;
    drop(dst);
    output_file.commit()?;
    Ok(DiskReport {
        source_size: src.size(),
        output_size: out_size,
        scheme,
        partitions,
        boot_bytes,
        elapsed: started.elapsed(),
    })
}

/// Ranges to copy (`None`: file by file) and the bytes expected to be read.
type CopyPlan = (Option<Vec<Range<u64>>>, u64);

/// What a partition's copy will read: for blocks and sectors the byte ranges (the allocated
/// blocks, or the ranges holding data), for files the filesystem's used bytes as an estimate.
/// Worked out once, before the copy, so the job knows its overall size.
fn copy_plan(dev: &Arc<dyn BlockDevice>, m: Mode) -> Result<CopyPlan, PartError> {
    let ranges = match m {
        Mode::Files => {
            let used = fs::open(Arc::clone(dev)).map_or(0, |f| f.info().used_bytes);
            return Ok((None, used));
        }
        Mode::Blocks => {
            let fs = fs::open(Arc::clone(dev)).map_err(PartError::Fs)?;
            let map = fs.allocation_map().map_err(PartError::Fs)?;
            let bs = u64::from(map.block_size);
            map.runs
                .iter()
                .map(|&(b, n)| b * bs..((b + n) * bs).min(dev.size()))
                .filter(|r| r.start < r.end)
                .collect()
        }
        Mode::Sectors | Mode::Auto => data_ranges(&**dev).map_err(PartError::Read)?,
    };
    let total = ranges.iter().map(|r: &Range<u64>| r.end - r.start).sum();
    Ok((Some(ranges), total))
}

/// Forwards to a [`Progress`] and adds the job's overall bytes done and total.
struct Overall<'a> {
    inner: &'a dyn Progress,
    total: u64,
    finished_phases: std::sync::atomic::AtomicU64,
    in_phase: std::sync::atomic::AtomicU64,
}

impl<'a> Overall<'a> {
    fn new(inner: &'a dyn Progress, total: u64) -> Overall<'a> {
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

enum PartError {
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

/// Copies one partition — file by file when it has no `ranges`, else those ranges — and
/// returns the bytes read from the source.
fn capture_partition(
    p: &Partition,
    src: &Arc<dyn BlockDevice>,
    dst: &Arc<dyn BlockDevice>,
    kind: FsKind,
    ranges: Option<Vec<Range<u64>>>,
    progress: &dyn Progress,
) -> Result<u64, PartError> {
    let phase = format!("part {}", p.number);
    match ranges {
        None => {
            let counting = Arc::new(CountingDevice::new(Arc::clone(src)));
            let source: Arc<dyn BlockDevice> = counting.clone();
            // The bytes read from the source drive the progress; the filesystem's used bytes
            // are the (upper-bound) total.
            let counters = Arc::new(fs::WriteCounters::default());
            let write = || -> Result<(), PartError> {
                match kind {
                    FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => {
                        let fat = fs::fat::Fat::open(source).map_err(PartError::Fs)?;
                        progress.start(&phase, fs::Filesystem::info(&fat).used_bytes);
                        let mut opts = fat.format_options();
                        opts.counters = Some(Arc::clone(&counters));
                        fs::fat_write::write_fat(Arc::clone(dst), &fat, &opts)
                            .map_err(PartError::Fs)?;
                    }
                    _ => {
                        let ext = fs::ext4::Ext4::open(source).map_err(PartError::Fs)?;
                        progress.start(&phase, fs::Filesystem::info(&ext).used_bytes);
                        let mut opts = ext.format_options();
                        // A smaller destination gets as many inodes as fit.
                        opts.min_inodes = opts.min_inodes.min(dst.size() / 16384);
                        opts.counters = Some(Arc::clone(&counters));
                        fs::ext4::write::write_ext4(Arc::clone(dst), &ext, &opts)
                            .map_err(PartError::Fs)?;
                    }
                }
                Ok(())
            };
            let done = std::sync::atomic::AtomicBool::new(false);
            let result = std::thread::scope(|s| {
                s.spawn(|| {
                    let mut reported = 0;
                    loop {
                        let stop = done.load(std::sync::atomic::Ordering::Acquire);
                        let now = counting.read();
                        progress.advance(now.saturating_sub(reported));
                        reported = now;
                        let (done, planned) = counters.get();
                        if planned > 0 {
                            progress.files(done, planned);
                        }
                        if stop {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                });
                let r = write();
                done.store(true, std::sync::atomic::Ordering::Release);
                r
            });
            progress.finish();
            result.map(|()| counting.read())
        }
        // Blocks and sectors: the ranges were worked out in the plan.
        Some(ranges) => {
            let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            progress.start(&phase, total);
            copy_ranges(&**src, dst, &ranges, progress)?;
            progress.finish();
            Ok(total)
        }
    }
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
