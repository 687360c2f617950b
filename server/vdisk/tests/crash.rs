//! Crash tests for the qcow2, VHDX, VHD (dynamic) and VMDK (monolithicSparse) writers, in the
//! style of openvmm's VHDX crash tests.
//!
//! Each test creates an image on a [`RecordingDevice`], runs a seeded random workload through
//! the writer (writes of many sizes and patterns, overwrites, zero writes, discards, flushes,
//! a final flush and close), then replays prefixes of the recorded device operations into a
//! file — "the machine stopped here" — at every flush boundary and at random points between,
//! and checks each one:
//!
//! - **(a) it opens.** Rule: once the format's header is in the file, the file must open with
//!   our reader ([`open_image`]) as that format; before, it may fail to, cleanly (or read as
//!   the raw file it still is). The header is what tells a reader "this is an image" and where
//!   everything else lies, so writers make it the commit point of creation: a qcow2's header
//!   cluster (from the magic on) and a VHDX's headers (a valid one at 64 or 128 KiB; its
//!   identifier may come earlier) are written after every structure they point to is synced.
//!   Once creation has returned (its flush completed) the header must be there. A crash
//!   before that leaves at worst a file that is no image — nobody was told it exists.
//! - **(b) qemu-img agrees.** `qemu-img check` exits 0, or for a qcow2 3 ("leaks only":
//!   clusters with a refcount and no reference, which a crash between refcount and table
//!   updates leaves by design), never 2 (corruption). Exit 1 (the check could not run: qemu
//!   cannot open the file) is allowed only where (a) allows our reader to fail. When creation
//!   or a flush of the image has just completed, the check must be clean (0), and a qcow2's
//!   dirty bit clear and the image reopenable for writing.
//! - **(c) flushed data survives.** Every byte reads as it stood after the last flush of the
//!   image that completed before the cut, unless a write begun after that flush covers it —
//!   then it may read as before or as any such write left it, nothing else. Checked through
//!   our reader at every cut — every extent it reports as holding data is read (of a VHDX
//!   block, the parts the file stores), so stray data anywhere on the disk is caught — and
//!   through `qemu-img convert -O raw` at every flush boundary.
//!
//! Besides prefixes, some crash states are built with **reordering**: at a flush boundary,
//! each write, discard and zeroing before the next flush is kept or dropped at random (the
//! device may persist unflushed writes in any order). That is what fsyncs between a writer's
//! phases are for; prefixes alone cannot tell whether one is missing.
//!
//! Scale: virtual disks are sparse, past 4 GiB where the format has a boundary there, and the
//! data small. The seed is fixed (`DISKFERRY_CRASH_SEED=N` or `=random` picks another) and is printed; every
//! failure names it.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Instant;

use diskferry_blockdev::{map_device, BlockDevice, FileDevice, Op, RecordingDevice, Region};
use diskferry_vdisk::qcow2::Qcow2;
use diskferry_vdisk::vhd::Vhd;
use diskferry_vdisk::vhdx::Vhdx;
use diskferry_vdisk::vmdk::Vmdk;
use diskferry_vdisk::{open_image, Detected, Mapping, QCOW2_CLUSTER_BITS, VHDX_BLOCK_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Granularity of the content model.
const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// Formats

#[derive(Debug, Clone, Copy)]
enum Format {
    /// `compress`: whole new clusters are stored deflated where that saves space.
    Qcow2 {
        cluster_bits: u32,
        compress: bool,
    },
    Vhdx {
        block_size: u64,
        sector: u32,
    },
    /// Dynamic VHD, 2 MiB blocks.
    Vhd,
    /// monolithicSparse VMDK, 64 KiB grains.
    VmdkSparse,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Qcow2 { .. } => "qcow2",
            Format::Vhdx { .. } => "vhdx",
            Format::Vhd => "vpc",
            Format::VmdkSparse => "vmdk",
        }
    }

    fn magic(self) -> &'static [u8] {
        match self {
            Format::Qcow2 { .. } => diskferry_vdisk::qcow2::MAGIC,
            Format::Vhdx { .. } => diskferry_vdisk::vhdx::MAGIC,
            Format::Vhd => diskferry_vdisk::vhd::MAGIC,
            Format::VmdkSparse => diskferry_vdisk::vmdk::MAGIC,
        }
    }

    fn detected(self) -> Detected {
        match self {
            Format::Qcow2 { .. } => Detected::Qcow2,
            Format::Vhdx { .. } => Detected::Vhdx,
            Format::Vhd => Detected::Vhd,
            Format::VmdkSparse => Detected::Vmdk,
        }
    }

    /// The allocation unit: a cluster or a block.
    fn unit(self) -> u64 {
        match self {
            Format::Qcow2 { cluster_bits, .. } => 1 << cluster_bits,
            Format::Vhdx { block_size, .. } => block_size,
            Format::Vhd => 2 * MIB,
            Format::VmdkSparse => 64 * KIB,
        }
    }

    fn create(self, file: Arc<dyn BlockDevice>, size: u64) -> Box<dyn BlockDevice> {
        let path = Path::new("crash-test-image");
        match self {
            Format::Qcow2 {
                cluster_bits,
                compress,
            } => {
                let image = Qcow2::create(file, path, size, cluster_bits).unwrap();
                image.set_compress(compress).unwrap();
                Box::new(image)
            }
            Format::Vhdx { block_size, sector } => {
                Box::new(Vhdx::create(file, path, size, block_size, sector).unwrap())
            }
            Format::Vhd => Box::new(Vhd::create(file, path, size, false).unwrap()),
            Format::VmdkSparse => Box::new(Vmdk::create_sparse(file, path, size).unwrap()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workload and content model

#[derive(Debug, Clone)]
enum Action {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// `write_at` with a buffer of zeros.
    Zero {
        offset: u64,
        len: u64,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl Action {
    fn range(&self) -> Option<Range<u64>> {
        match self {
            Action::Write { offset, data } => Some(*offset..*offset + data.len() as u64),
            Action::Zero { offset, len } | Action::Discard { offset, len } => {
                Some(*offset..*offset + *len)
            }
            Action::Flush => None,
        }
    }

    /// What this action leaves at `pos` (inside its range).
    fn byte_at(&self, pos: u64) -> u8 {
        match self {
            Action::Write { offset, data } => data[(pos - offset) as usize],
            _ => 0,
        }
    }

    fn describe(&self) -> String {
        match self {
            Action::Write { offset, data } => format!("write {}+{}", offset, data.len()),
            Action::Zero { offset, len } => format!("zero-write {offset}+{len}"),
            Action::Discard { offset, len } => format!("discard {offset}+{len}"),
            Action::Flush => "flush".into(),
        }
    }
}

/// The virtual disk's contents: pages not all zero, by page index.
#[derive(Default)]
struct Model {
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    fn apply(&mut self, action: &Action) {
        let Some(range) = action.range() else { return };
        if let Action::Write { offset, data } = action {
            for page in range.start / PAGE..range.end.div_ceil(PAGE) {
                let base = page * PAGE;
                let from = range.start.max(base);
                let to = range.end.min(base + PAGE);
                let src = &data[(from - offset) as usize..(to - offset) as usize];
                let p = self
                    .pages
                    .entry(page)
                    .or_insert_with(|| vec![0; PAGE as usize]);
                p[(from - base) as usize..(to - base) as usize].copy_from_slice(src);
                if p.iter().all(|&b| b == 0) {
                    self.pages.remove(&page);
                }
            }
            return;
        }
        let touched: Vec<u64> = self
            .pages
            .range(range.start / PAGE..range.end.div_ceil(PAGE))
            .map(|(k, _)| *k)
            .collect();
        for page in touched {
            let base = page * PAGE;
            let from = range.start.max(base);
            let to = range.end.min(base + PAGE);
            let p = self.pages.get_mut(&page).expect("listed above");
            p[(from - base) as usize..(to - base) as usize].fill(0);
            if p.iter().all(|&b| b == 0) {
                self.pages.remove(&page);
            }
        }
    }
}

/// Random actions inside `windows` (virtual byte ranges), a flush with probability `flush`.
fn mixed_workload(
    rng: &mut StdRng,
    windows: &[Range<u64>],
    unit: u64,
    count: usize,
    flush: f64,
) -> Vec<Action> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        if rng.gen_bool(flush) {
            out.push(Action::Flush);
            continue;
        }
        let w = &windows[rng.gen_range(0..windows.len())];
        let span = w.end - w.start;
        // Offsets: any byte, a 512-byte sector, or an allocation unit (when units are small).
        let offset = match rng.gen_range(0..10) {
            0..=1 => w.start + rng.gen_range(0..span),
            2..=6 => w.start + rng.gen_range(0..span / 512) * 512,
            _ if unit <= 64 * KIB => (w.start + rng.gen_range(0..span)) / unit * unit,
            _ => w.start + rng.gen_range(0..span / 4096) * 4096,
        }
        .max(w.start);
        let len = match rng.gen_range(0..10) {
            0..=1 => rng.gen_range(1..600),
            2..=6 => rng.gen_range(1..=256) * 512,
            _ if unit <= 64 * KIB => rng.gen_range(1..=3) * unit,
            _ => rng.gen_range(1..=64) * 4096,
        };
        let len = len.min(w.end - offset).max(1);
        let action = match rng.gen_range(0..100) {
            0..=59 => Action::Write {
                offset,
                data: pattern(rng, len as usize),
            },
            60..=77 => Action::Zero { offset, len },
            _ => Action::Discard { offset, len },
        };
        out.push(action);
    }
    out
}

/// Bytes to write: random, a repeated byte, zeros with data in places, or data with zero
/// stretches (so writers see buffers that are partly zero).
fn pattern(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    match rng.gen_range(0..4) {
        0 => rng.fill(&mut data[..]),
        1 => data.fill(rng.gen_range(1..=255)),
        2 => {
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..len);
                data[at] = rng.gen_range(1..=255);
            }
        }
        _ => {
            rng.fill(&mut data[..]);
            let from = rng.gen_range(0..len);
            let to = rng.gen_range(from..=len);
            data[from..to].fill(0);
        }
    }
    data
}

// ---------------------------------------------------------------------------------------------
// Recording

struct Step {
    action: Action,
    /// The device operations the action issued.
    ops: Range<usize>,
}

struct Recorded {
    rec: Arc<RecordingDevice>,
    /// Operations of the image's creation (it returned after this many).
    created: usize,
    steps: Vec<Step>,
}

fn record(format: Format, size: u64, actions: Vec<Action>) -> Recorded {
    let rec = Arc::new(RecordingDevice::empty());
    let image = format.create(rec.clone(), size);
    let created = rec.len();
    let mut steps = Vec::with_capacity(actions.len() + 2);
    let mut zeros: Vec<u8> = Vec::new();
    for action in actions.into_iter().chain([Action::Flush]) {
        let start = rec.len();
        match &action {
            Action::Write { offset, data } => image.write_at(data, *offset).unwrap(),
            Action::Zero { offset, len } => {
                zeros.resize(*len as usize, 0);
                image.write_at(&zeros[..*len as usize], *offset).unwrap();
            }
            Action::Discard { offset, len } => image.discard(*offset, *len).unwrap(),
            Action::Flush => image.flush().unwrap(),
        }
        steps.push(Step {
            action,
            ops: start..rec.len(),
        });
    }
    // Closing may write or flush again: the last step.
    let start = rec.len();
    drop(image);
    steps.push(Step {
        action: Action::Flush,
        ops: start..rec.len(),
    });
    Recorded {
        rec,
        created,
        steps,
    }
}

// ---------------------------------------------------------------------------------------------
// Checking one crash state

/// What the image must read as at a cut: the state after the last completed flush, and the
/// actions that may or may not have reached the disk.
struct Expect<'a> {
    durable: &'a Model,
    maybe: Vec<&'a Action>,
    /// The whole workload, to say in a failure which steps wrote a byte.
    steps: &'a [Step],
}

impl Expect<'_> {
    /// Where `got` (what was read at `pos`) may differ from the durable model: the first
    /// offending byte, if any.
    fn check_page(&self, pos: u64, got: &[u8]) -> Result<(), String> {
        let page = pos / PAGE;
        let zeros = [0u8; PAGE as usize];
        let want = self.durable.pages.get(&page).map_or(&zeros[..], |p| &p[..]);
        if got == want {
            return Ok(());
        }
        let here: Vec<&Action> = self
            .maybe
            .iter()
            .copied()
            .filter(|a| {
                a.range()
                    .is_some_and(|r| r.start < pos + PAGE && pos < r.end)
            })
            .collect();
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if g == w {
                continue;
            }
            let at = pos + i as u64;
            let explained = here.iter().any(|a| {
                a.range()
                    .is_some_and(|r| r.contains(&at) && a.byte_at(at) == g)
            });
            if !explained {
                let writers: Vec<String> = self
                    .maybe
                    .iter()
                    .filter(|a| a.range().is_some_and(|r| r.contains(&at)))
                    .map(|a| a.describe())
                    .collect();
                let history: Vec<String> = self
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.action.range().is_some_and(|r| r.contains(&at)))
                    .map(|(i, s)| {
                        format!("step {i} (operations {:?}): {}", s.ops, s.action.describe())
                    })
                    .collect();
                return Err(format!(
                    "virtual byte {at} reads {g:#04x}; flushed state has {w:#04x}, and no write \
                     since the last completed flush put {g:#04x} there (writes since covering it: \
                     {writers:?}; all steps covering it: {history:?})"
                ));
            }
        }
        Ok(())
    }

    /// Reads the `stored` ranges of `dev` (everything that may hold data, so stray data
    /// anywhere is seen) and every page the model or a maybe-write has data in, and checks
    /// them.
    fn check_device(&self, dev: &dyn BlockDevice, stored: Vec<Range<u64>>) -> Result<(), String> {
        let last_page = dev.size().div_ceil(PAGE);
        let mut interest: BTreeSet<u64> = self.durable.pages.keys().copied().collect();
        for a in &self.maybe {
            if let Some(r) = a.range() {
                interest.extend(r.start / PAGE..r.end.div_ceil(PAGE));
            }
        }
        // Runs of pages to read: the data extents, and the pages of interest outside them.
        let mut runs: Vec<Range<u64>> = Vec::new();
        runs.extend(stored.iter().map(|r| r.start / PAGE..r.end.div_ceil(PAGE)));
        runs.extend(interest.iter().map(|&p| p..p + 1));
        runs.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in runs {
            match merged.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let mut buf = Vec::new();
        for run in merged {
            let mut page = run.start;
            let end = run.end.min(last_page);
            while page < end {
                let n = (end - page).min(1024);
                let (from, to) = (page * PAGE, ((page + n) * PAGE).min(dev.size()));
                buf.resize((to - from) as usize, 0);
                dev.read_at(&mut buf, from)
                    .map_err(|e| format!("reading {from}..{to}: {e}"))?;
                let quiet = interest.range(page..page + n).next().is_none();
                if !(quiet && buf.chunks(PAGE as usize).all(zero_page)) {
                    for (k, chunk) in buf.chunks(PAGE as usize).enumerate() {
                        let p = page + k as u64;
                        if !interest.contains(&p) && zero_page(chunk) {
                            continue;
                        }
                        let mut full = chunk.to_vec();
                        full.resize(PAGE as usize, 0);
                        self.check_page(p * PAGE, &full)?;
                    }
                }
                page += n;
            }
        }
        Ok(())
    }
}

/// The ranges `dev` does not report as zeros.
fn data_extents(dev: &dyn BlockDevice) -> Result<Vec<Range<u64>>, String> {
    Ok(map_device(dev)
        .map_err(|e| format!("mapping: {e}"))?
        .into_iter()
        .filter(|e| e.region != Region::Zero)
        .map(|e| e.offset..e.end())
        .collect())
}

/// The virtual ranges of a VHDX, VHD or VMDK whose data the file holds: its data extents
/// without what are holes in the file (a block or grain is allocated whole, written in places;
/// the rest reads as zeros through the same mapping, so reading it proves nothing).
fn stored(file: &Path, format: Format) -> Result<Vec<Range<u64>>, String> {
    let dev = Arc::new(FileDevice::open(file, false).map_err(|e| e.to_string())?);
    let text = |e: diskferry_vdisk::ImageError| e.to_string();
    match format {
        Format::Vhdx { .. } => {
            let image = Vhdx::open(dev.clone(), file).map_err(text)?;
            stored_in(&dev, &image, &|p, m| image.map(p, m))
        }
        Format::Vhd => {
            let image = Vhd::open(dev.clone(), file).map_err(text)?;
            stored_in(&dev, &image, &|p, m| image.map(p, m))
        }
        Format::VmdkSparse => {
            let image = Vmdk::open(dev.clone(), file).map_err(text)?;
            stored_in(&dev, &image, &|p, m| image.map(p, m))
        }
        Format::Qcow2 { .. } => Err("qcow2 data extents are exact: use data_extents".into()),
    }
}

type MapFn<'a> = dyn Fn(u64, u64) -> Result<Mapping, diskferry_vdisk::ImageError> + 'a;

/// [`stored`] for an open `image` in `dev` with its `map`.
fn stored_in(
    dev: &FileDevice,
    image: &dyn BlockDevice,
    map: &MapFn<'_>,
) -> Result<Vec<Range<u64>>, String> {
    let mut out = Vec::new();
    for e in data_extents(image)? {
        let mut pos = e.start;
        while pos < e.end {
            let m = map(pos, e.end - pos).map_err(|e| e.to_string())?;
            if let Mapping::Data { host, len } = m {
                let mut at = host;
                while at < host + len {
                    let found = dev
                        .block_status(at, host + len - at)
                        .map_err(|e| e.to_string())?;
                    let Some(last) = found.last() else { break };
                    at = last.end();
                    out.extend(
                        found
                            .iter()
                            .filter(|f| f.region != Region::Zero)
                            .map(|f| pos + (f.offset - host)..pos + (f.end() - host)),
                    );
                }
            }
            pos += m.len();
        }
    }
    Ok(out)
}

/// True when `chunk` (at most a page) is all zeros; a comparison the standard library does
/// fast even in unoptimised test builds.
fn zero_page(chunk: &[u8]) -> bool {
    static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
    chunk == &ZEROS[..chunk.len()]
}

fn output(out: Output) -> (i32, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// How a crash state came about, for the checks and the messages.
struct State<'a> {
    /// Operations that may have reached the disk: the prefix length, or for a reordered
    /// state the end of the unflushed run some of which was kept.
    cut: usize,
    label: String,
    format: Format,
    created: usize,
    expect: Expect<'a>,
    /// The end of a completed flush of the image: everything must be clean.
    clean: bool,
    /// Also compare through `qemu-img convert`.
    convert: bool,
}

/// Where the time goes (seconds): our reader, waiting for `qemu-img check` after it, waiting
/// for `qemu-img convert` and reading its output, replaying and copying files.
#[derive(Default)]
struct Timings {
    reader: std::cell::Cell<f64>,
    check: std::cell::Cell<f64>,
    convert: std::cell::Cell<f64>,
    replay: std::cell::Cell<f64>,
}

impl Timings {
    fn add(cell: &std::cell::Cell<f64>, since: Instant) {
        cell.set(cell.get() + since.elapsed().as_secs_f64());
    }
}

fn check_state(
    state: &State<'_>,
    file: &Path,
    scratch: &Path,
    time: &Timings,
) -> Result<(), String> {
    let reader_started = Instant::now();
    let fmt = state.format.name();
    let path = file.to_str().unwrap();
    // qemu-img runs while our reader reads the same (unchanging) file.
    let qemu = |args: &[&str]| {
        Command::new("qemu-img")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-img: {e} (the crash tests need qemu-utils)"))
    };
    let check = qemu(&["check", "-f", fmt, path]);
    let convert = state.convert.then(|| {
        let _ = std::fs::remove_file(scratch);
        qemu(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            path,
            scratch.to_str().unwrap(),
        ])
    });
    let ours = check_with_our_reader(state, file);
    Timings::add(&time.reader, reader_started);

    let check_started = Instant::now();
    let (code, text) = output(check.wait_with_output().expect("qemu-img check"));
    Timings::add(&time.check, check_started);
    let convert_started = Instant::now();
    let converted = convert.map(|c| output(c.wait_with_output().expect("qemu-img convert")));
    let has_header = ours?;
    match code {
        0 => {}
        3 if !state.clean && matches!(state.format, Format::Qcow2 { .. }) => {}
        // qemu cannot check VHDs ("does not support checks"): its convert still reads them.
        63 if matches!(state.format, Format::Vhd) => {}
        1 if !has_header => {}
        _ => return Err(format!("qemu-img check exited {code}:\n{text}")),
    }
    // Where qemu cannot open the image (allowed above), there is nothing to compare.
    if let Some((converted, text)) = converted.filter(|_| code != 1) {
        if converted != 0 {
            return Err(format!("qemu-img convert exited {converted}:\n{text}"));
        }
        let raw = FileDevice::open(scratch, false).map_err(|e| e.to_string())?;
        data_extents(&raw)
            .and_then(|stored| state.expect.check_device(&raw, stored))
            .map_err(|e| format!("through qemu-img convert: {e}"))?;
    }
    let _ = std::fs::remove_file(scratch);
    Timings::add(&time.convert, convert_started);
    Ok(())
}

/// Rule (a) and (c) through our reader; for a completed flush of a qcow2, a clear dirty bit
/// and a reopening for writing. Returns whether the file has the format's header.
fn check_with_our_reader(state: &State<'_>, file: &Path) -> Result<bool, String> {
    let fmt = state.format.name();
    let has_magic = read_head(file, 8).starts_with(state.format.magic());
    let has_header = match state.format {
        Format::Qcow2 { .. } | Format::Vhd | Format::VmdkSparse => has_magic,
        Format::Vhdx { .. } => has_magic && vhdx_has_header(file),
    };
    if state.cut >= state.created && !has_header {
        return Err(format!(
            "creation had returned, but the file has no {fmt} header"
        ));
    }
    let opened = open_image(file, false);
    let dev = match opened {
        Ok((detected, dev)) if detected == state.format.detected() => Some(dev),
        Ok((detected, _)) if has_magic => {
            return Err(format!(
                "has the {fmt} magic but was detected as {}",
                detected.name()
            ))
        }
        Ok(_) => None,
        Err(e) if has_header => return Err(format!("our reader cannot open it: {e}")),
        Err(_) => None,
    };
    if let Some(dev) = dev {
        let stored = match state.format {
            Format::Qcow2 { .. } => data_extents(&*dev),
            _ => stored(file, state.format),
        };
        stored
            .and_then(|stored| state.expect.check_device(&*dev, stored))
            .map_err(|e| format!("our reader: {e}"))?;
    }
    if let (true, Format::Qcow2 { .. }) = (state.clean, state.format) {
        let head = read_head(file, 80);
        let incompatible = u64::from_be_bytes(head[72..80].try_into().unwrap());
        if incompatible & 1 != 0 {
            return Err("the dirty bit is set after a completed flush".into());
        }
        let dev = Arc::new(FileDevice::open(file, false).map_err(|e| e.to_string())?);
        Qcow2::open_writable(dev, file, None)
            .map_err(|e| format!("cannot be reopened for writing: {e}"))?;
    }
    Ok(has_header)
}

/// Whether a VHDX header (signature and CRC32C) is at 64 or 128 KiB.
fn vhdx_has_header(file: &Path) -> bool {
    let head = read_head(file, 192 * KIB as usize);
    [64 * KIB as usize, 128 * KIB as usize].iter().any(|&at| {
        head.get(at..at + 4096).is_some_and(|h| {
            let mut zeroed = h.to_vec();
            zeroed[4..8].fill(0);
            &h[..4] == b"head"
                && crc32c::crc32c(&zeroed) == u32::from_le_bytes(h[4..8].try_into().unwrap())
        })
    })
}

/// The first `n` bytes of `file` (fewer if it is shorter).
fn read_head(file: &Path, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut head = Vec::with_capacity(n);
    std::fs::File::open(file)
        .unwrap()
        .take(n as u64)
        .read_to_end(&mut head)
        .unwrap();
    head
}

/// A sparse copy of `src` (only its data regions are copied).
fn sparse_copy(src: &Path, dst: &Path) {
    let from = FileDevice::open(src, false).unwrap();
    let _ = std::fs::remove_file(dst);
    std::fs::File::create(dst)
        .unwrap()
        .set_len(from.size())
        .unwrap();
    let to = FileDevice::open(dst, true).unwrap();
    let mut buf = Vec::new();
    for e in map_device(&from).unwrap() {
        if e.region == Region::Zero {
            continue;
        }
        let mut at = e.offset;
        while at < e.end() {
            let n = (e.end() - at).min(4 * MIB);
            buf.resize(n as usize, 0);
            from.read_at(&mut buf, at).unwrap();
            to.write_at(&buf, at).unwrap();
            at += n;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver

struct Scenario {
    name: &'static str,
    format: Format,
    size: u64,
    actions: Vec<Action>,
}

/// Prefix cuts each scenario checks, at least (every flush boundary is one, the rest random).
const MIN_CUTS: usize = 220;
/// Reordered crash states each scenario checks.
const REORDERS: usize = 60;

fn describe_ops(rec: &RecordingDevice, upto: usize) -> String {
    let from = upto.saturating_sub(4);
    (from..upto)
        .filter_map(|i| rec.op(i).map(|op| (i, op)))
        .map(|(i, op)| match op {
            Op::Write { offset, data } => format!("#{i} write {offset}+{}", data.len()),
            other => format!("#{i} {other:?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn run(scenario: Scenario, seed: u64) {
    let started = Instant::now();
    let Scenario {
        name,
        format,
        size,
        actions,
    } = scenario;
    let (min_cuts, reorders) = (MIN_CUTS, REORDERS);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let Recorded {
        rec,
        created,
        steps,
    } = record(format, size, actions);
    let total = rec.len();
    let flushes = rec.flush_boundaries();

    // Prefix cuts: the empty file, creation, every flush boundary, the end, random ones.
    let mut cuts: BTreeSet<usize> = [0, created, total].into_iter().collect();
    cuts.extend(flushes.iter().copied());
    while cuts.len() < min_cuts.min(total + 1) {
        cuts.insert(rng.gen_range(0..=total));
    }
    // Reordered states: at a random flush boundary with unflushed operations after it.
    let windows: Vec<(usize, usize)> = flushes
        .iter()
        .zip(flushes.iter().skip(1))
        .map(|(&f, &g)| (f, g - 1))
        .filter(|&(f, g)| f >= created && g > f + 1)
        .collect();
    let mut reorder_at: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for _ in 0..reorders {
        if windows.is_empty() {
            break;
        }
        let (f, g) = windows[rng.gen_range(0..windows.len())];
        reorder_at.entry(f).or_default().push(g);
    }
    // Every point where the working file stops: cuts and reorder bases.
    let stops: BTreeSet<usize> = cuts.iter().chain(reorder_at.keys()).copied().collect();
    let image_flush_ends: BTreeSet<usize> = steps
        .iter()
        .filter(|s| matches!(s.action, Action::Flush))
        .map(|s| s.ops.end)
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join(format!("work.{}", format.name()));
    let copy = dir.path().join(format!("reordered.{}", format.name()));
    let scratch: PathBuf = dir.path().join("converted.raw");
    std::fs::File::create(&work).unwrap();
    let work_dev = FileDevice::open(&work, true).unwrap();

    let time = Timings::default();
    let mut durable = Model::default();
    let mut applied_steps = 0; // steps folded into `durable`
    let mut at = 0; // operations replayed into `work`
    let (mut checked_cuts, mut checked_reorders) = (0usize, 0usize);
    let fail = |label: &str, upto: usize, why: String| -> ! {
        panic!(
            "{name}: seed {seed} (DISKFERRY_CRASH_SEED={seed} repeats it), {label} of {total} \
             operations (creation ends at {created}); last operations: [{}]\n{why}",
            describe_ops(&rec, upto)
        )
    };
    for &stop in &stops {
        let replay_started = Instant::now();
        rec.replay_onto(&work_dev, at..stop).unwrap();
        at = stop;
        Timings::add(&time.replay, replay_started);
        if cuts.contains(&stop) {
            let expect = expect_at(&steps, stop, &mut durable, &mut applied_steps);
            let state = State {
                cut: stop,
                label: format!("cut after {stop}"),
                format,
                created,
                expect,
                clean: image_flush_ends.contains(&stop) || stop == created,
                convert: flushes.contains(&stop) || stop == total,
            };
            if let Err(why) = check_state(&state, &work, &scratch, &time) {
                fail(&state.label, stop, why);
            }
            checked_cuts += 1;
        }
        for &end in reorder_at.get(&stop).into_iter().flatten() {
            // Keep each unflushed operation before `end` with probability 1/2 (resizes always:
            // the file's length is not what is being tested).
            let replay_started = Instant::now();
            sparse_copy(&work, &copy);
            let copy_dev = FileDevice::open(&copy, true).unwrap();
            let mut kept = Vec::new();
            for i in stop..end {
                let op = rec.op(i).unwrap();
                if matches!(op, Op::Resize(_)) || rng.gen_bool(0.5) {
                    op.apply(&copy_dev).unwrap();
                    kept.push(i);
                }
            }
            drop(copy_dev);
            Timings::add(&time.replay, replay_started);
            let expect = expect_at(&steps, end, &mut durable, &mut applied_steps);
            let state = State {
                cut: end,
                label: format!(
                    "reordered state: operations {stop}..{end} after a flush, of which {} kept",
                    kept.len()
                ),
                format,
                created,
                expect,
                clean: false,
                convert: false,
            };
            if let Err(why) = check_state(&state, &copy, &scratch, &time) {
                fail(&state.label, end, format!("kept {kept:?}\n{why}"));
            }
            checked_reorders += 1;
        }
    }
    assert!(
        checked_cuts >= min_cuts.min(total + 1),
        "{name}: only {checked_cuts} cuts"
    );
    println!(
        "{name}: seed {seed}: {total} operations, {} flush boundaries, {checked_cuts} prefix cuts \
         and {checked_reorders} reordered states checked in {:.1} s (our reader {:.1} s, \
         qemu-img check {:.1} s more, qemu-img convert {:.1} s, replay {:.1} s)",
        flushes.len(),
        started.elapsed().as_secs_f64(),
        time.reader.get(),
        time.check.get(),
        time.convert.get(),
        time.replay.get(),
    );
}

/// The expectation at `cut`, folding newly durable steps into `durable` (cuts come in
/// ascending order of their last completed flush).
fn expect_at<'a>(
    steps: &'a [Step],
    cut: usize,
    durable: &'a mut Model,
    applied: &mut usize,
) -> Expect<'a> {
    let last_flush = steps
        .iter()
        .rposition(|s| matches!(s.action, Action::Flush) && s.ops.end <= cut);
    let durable_upto = last_flush.map_or(0, |k| k + 1);
    assert!(
        durable_upto >= *applied,
        "cuts must not go back past a flush"
    );
    for s in &steps[*applied..durable_upto] {
        durable.apply(&s.action);
    }
    *applied = durable_upto;
    let maybe = steps[durable_upto..]
        .iter()
        // Issued before the cut; an action that issued no operation yet still changed tables
        // in memory, which later operations write.
        .filter(|s| s.action.range().is_some() && s.ops.start < cut)
        .map(|s| &s.action)
        .collect();
    Expect {
        durable,
        maybe,
        steps,
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

/// qcow2 as we create it (64 KiB clusters), 6 GiB virtual: windows at the start, across the
/// first L2 table's end (512 MiB), across 4 GiB and at the end of the disk.
#[test]
fn qcow2_survives_a_crash_at_any_point() {
    let seed = diskferry_blockdev::crash_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let format = Format::Qcow2 {
        cluster_bits: QCOW2_CLUSTER_BITS,
        compress: false,
    };
    let size = 6 * GIB;
    let windows = [
        0..MIB,
        512 * MIB - 256 * KIB..512 * MIB + 256 * KIB,
        4 * GIB - 384 * KIB..4 * GIB + 384 * KIB,
        size - 512 * KIB..size,
    ];
    let actions = mixed_workload(&mut rng, &windows, format.unit(), 260, 0.08);
    run(
        Scenario {
            name: "qcow2",
            format,
            size,
            actions,
        },
        seed,
    );
}

/// qcow2 with 512-byte clusters, where metadata grows fast: an L2 table maps 32 KiB and a
/// refcount block counts 128 KiB of file. After a mixed workload, one long run of scattered
/// writes with no flush dirties more L2 tables than the writer keeps (it writes metadata
/// mid-run) and makes the file outgrow refcount blocks (new ones join the refcount table) —
/// what a 64 KiB-cluster image does past every 2 GiB of file, at a size a test can afford.
#[test]
fn qcow2_with_growing_metadata_survives_a_crash_at_any_point() {
    let seed = diskferry_blockdev::crash_seed();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
    let format = Format::Qcow2 {
        cluster_bits: 9,
        compress: false,
    };
    let size = 64 * MIB;
    let windows = [0..256 * KIB, 8 * MIB - 64 * KIB..8 * MIB + 64 * KIB];
    let mut actions = mixed_workload(&mut rng, &windows, format.unit(), 100, 0.08);
    actions.push(Action::Flush);
    let table_span = 32 * KIB; // virtual bytes one L2 table maps
    for i in 0..1100u64 {
        let len = rng.gen_range(1..=2 * KIB);
        let offset = 12 * MIB + i * table_span + rng.gen_range(0..table_span - len);
        actions.push(Action::Write {
            offset,
            data: pattern(&mut rng, len as usize),
        });
    }
    actions.extend(mixed_workload(&mut rng, &windows, format.unit(), 60, 0.08));
    run(
        Scenario {
            name: "qcow2 512-byte clusters",
            format,
            size,
            actions,
        },
        seed,
    );
}

/// A compressed qcow2 (as `--compress` makes them, 64 KiB clusters): whole clusters of
/// compressible data are stored deflated, a few to a host cluster; partial overwrites then
/// copy them out to plain clusters and drop their references — a host cluster nobody
/// references any more is punched out of the file.
#[test]
fn compressed_qcow2_survives_a_crash_at_any_point() {
    let seed = diskferry_blockdev::crash_seed();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(3));
    let format = Format::Qcow2 {
        cluster_bits: QCOW2_CLUSTER_BITS,
        compress: true,
    };
    let unit = format.unit();
    let size = GIB;
    let windows = [0..2 * MIB, size - MIB..size];
    let mut actions = Vec::new();
    for round in 0..3 {
        // Whole clusters that deflate to a third or half of a cluster (or to almost nothing).
        for _ in 0..16 {
            let w = &windows[rng.gen_range(0..windows.len())];
            let offset = w.start + rng.gen_range(0..(w.end - w.start) / unit) * unit;
            let mut data = vec![0u8; unit as usize];
            let random = rng.gen_range(0..unit as usize / 2);
            rng.fill(&mut data[..random]);
            data[random..].fill(if round == 1 { 0 } else { 0x5a });
            actions.push(Action::Write { offset, data });
        }
        actions.push(Action::Flush);
        actions.extend(mixed_workload(&mut rng, &windows, unit, 70, 0.08));
    }
    run(
        Scenario {
            name: "compressed qcow2",
            format,
            size,
            actions,
        },
        seed,
    );
}

/// VHDX as we create it (32 MiB blocks, 512-byte sectors), 4 GiB + 64 MiB virtual: with
/// 512-byte sectors a sector-bitmap entry follows every 128 payload entries of the BAT, so
/// the window across 4 GiB (and the block boundary there) crosses it, and the last block lies
/// past it; another window sits at the start. Whole blocks are zeroed and discarded too (they
/// change state and are punched out). Few blocks, few flushes and no more virtual size than
/// that, because `qemu-img convert` reads a VHDX whole (zeros included) at every flush
/// boundary.
#[test]
fn vhdx_survives_a_crash_at_any_point() {
    let seed = diskferry_blockdev::crash_seed();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(2));
    let format = Format::Vhdx {
        block_size: VHDX_BLOCK_SIZE,
        sector: 512,
    };
    let size = 4 * GIB + 2 * VHDX_BLOCK_SIZE;
    let block = VHDX_BLOCK_SIZE;
    let windows = [
        0..512 * KIB,
        4 * GIB - 512 * KIB..4 * GIB + 512 * KIB,
        size - MIB..size,
    ];
    let mut actions = mixed_workload(&mut rng, &windows, format.unit(), 300, 0.04);
    // Whole blocks: zeroed or discarded, at random places among the rest.
    for _ in 0..8 {
        let w = &windows[rng.gen_range(0..windows.len())];
        let b = (w.start + rng.gen_range(0..w.end - w.start)) / block * block;
        let action = if rng.gen_bool(0.5) {
            Action::Discard {
                offset: b,
                len: block,
            }
        } else {
            Action::Zero {
                offset: b,
                len: block,
            }
        };
        actions.insert(rng.gen_range(0..actions.len()), action);
    }
    run(
        Scenario {
            name: "vhdx",
            format,
            size,
            actions,
        },
        seed,
    );
}

/// A whole-block or whole-unit zeroing or discard at a random place in `windows`.
fn whole_units(rng: &mut StdRng, windows: &[Range<u64>], unit: u64, count: usize) -> Vec<Action> {
    (0..count)
        .map(|_| {
            let w = &windows[rng.gen_range(0..windows.len())];
            let offset = (w.start + rng.gen_range(0..w.end - w.start)) / unit * unit;
            let len = unit.min(w.end.next_multiple_of(unit) - offset);
            if rng.gen_bool(0.5) {
                Action::Discard { offset, len }
            } else {
                Action::Zero { offset, len }
            }
        })
        .collect()
}

/// Dynamic VHD as we create it (2 MiB blocks), 96 MiB virtual — an exact geometry, so the
/// image is as large as asked: windows at the start, across a block boundary and at the end;
/// whole blocks zeroed and discarded too (they are freed and punched out).
#[test]
fn vhd_survives_a_crash_at_any_point() {
    let seed = diskferry_blockdev::crash_seed();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(3));
    let format = Format::Vhd;
    let size = diskferry_vdisk::vhd::geometry_for(96 * MIB).unwrap().1;
    let windows = [
        0..512 * KIB,
        48 * MIB - 512 * KIB..48 * MIB + 512 * KIB,
        size - MIB..size,
    ];
    let mut actions = mixed_workload(&mut rng, &windows, format.unit(), 260, 0.05);
    for action in whole_units(&mut rng, &windows, format.unit(), 6) {
        actions.insert(rng.gen_range(0..actions.len()), action);
    }
    run(
        Scenario {
            name: "vhd",
            format,
            size,
            actions,
        },
        seed,
    );
}

/// monolithicSparse VMDK as we create it (64 KiB grains, tables of 512 grains), 100 MiB
/// virtual: windows at the start, across a grain table boundary (32 MiB) and at the end;
/// whole grains zeroed and discarded too.
#[test]
fn vmdk_survives_a_crash_at_any_point() {
    let seed = diskferry_blockdev::crash_seed();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(4));
    let format = Format::VmdkSparse;
    let size = 100 * MIB;
    let windows = [
        0..512 * KIB,
        32 * MIB - 512 * KIB..32 * MIB + 512 * KIB,
        size - MIB..size,
    ];
    let mut actions = mixed_workload(&mut rng, &windows, format.unit(), 260, 0.05);
    for action in whole_units(&mut rng, &windows, format.unit(), 12) {
        actions.insert(rng.gen_range(0..actions.len()), action);
    }
    run(
        Scenario {
            name: "vmdk",
            format,
            size,
            actions,
        },
        seed,
    );
}
