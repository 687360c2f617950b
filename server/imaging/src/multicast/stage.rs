//! The disk a multicast deploy sends, built once on the server: the ordinary deploy run onto
//! a sparse file of the smallest target's size (files-mode partitions recreated there, the
//! table scaled, verified by reading the file back through the filesystem readers), while a
//! wrapper notes every range the deploy wrote or zeroed.
//!
//! What every target must then hold is those ranges plus the blocks each recreated
//! filesystem uses (a used block that is all zeros was never written onto the zeroed file, but
//! on a used disk it must be zeroed). Of that, the ranges where the file holds data are sent;
//! the rest is zeroed by each agent on its side, so no zeros cross the network. Free blocks
//! of the new filesystems are left as they were, exactly as a single deploy leaves them.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use diskferry_blockdev::{BlockDevice, Extent, FileDevice, Result, SliceDevice};
use diskferry_protocol::chunks::ChunkHash;

use crate::pipeline::{deploy_disk, DeployError, DeployHow, DeployReport};
use crate::progress::Progress;
use crate::ranges::{intersect, normalize, subtract};

/// A staged disk and what targets must hold of it.
pub struct Staged {
    pub device: Arc<dyn BlockDevice>,
    /// Ranges sent (the file holds data there), sorted and disjoint.
    pub data: Vec<Range<u64>>,
    /// Ranges each agent zeroes, disjoint from `data`.
    pub zero: Vec<Range<u64>>,
    /// The deploy onto the file, with its verification (`None`: the image itself is sent).
    pub report: Option<DeployReport>,
    /// Removed when dropped.
    _file: Option<tempfile::TempPath>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("data", &self.data.len())
            .field("zero", &self.zero.len())
            .finish_non_exhaustive()
    }
}

impl Staged {
    /// Every range a target must hold, sorted.
    pub fn must_hold(&self) -> Vec<Range<u64>> {
        normalize(self.data.iter().chain(&self.zero).cloned().collect())
    }
}

/// Deploys `image` onto a new sparse file of `size` bytes in `dir` and works out what is sent.
/// An image without a partition table and without edits is sent as it is: a deploy would
/// copy it byte for byte onto the disk's first bytes.
pub fn stage(
    image: Arc<dyn BlockDevice>,
    size: u64,
    how: &DeployHow,
    dir: &Path,
    progress: &dyn Progress,
) -> std::result::Result<Staged, DeployError> {
    let whole = diskferry_partition::read_table(&*image)
        .is_ok_and(|t| t.scheme == diskferry_partition::Scheme::None);
    if whole && how.transform.is_none() && image.size() <= size {
        return as_is(image);
    }
    let io = |source: std::io::Error| DeployError::Stage(source.to_string());
    let file = tempfile::Builder::new()
        .prefix(".multicast-stage-")
        .tempfile_in(dir)
        .map_err(io)?;
    file.as_file().set_len(size).map_err(io)?;
    let path = file.into_temp_path();
    let device: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&path, true).map_err(|e| DeployError::Stage(e.to_string()))?);
    let touched = Arc::new(Touched::new(Arc::clone(&device)));
    let image_size = image.size();
    let report = deploy_disk(
        image,
        Arc::clone(&touched) as Arc<dyn BlockDevice>,
        "the multicast stage",
        how,
        progress,
    )?;
    let mut must = touched.take();
    match blocks_in_use(&device) {
        Some(used) => must.extend(used),
        // An image without a partition table lands whole on the disk's first bytes: all of
        // them must read as the image does, zeros included (a single deploy writes those that
        // differ).
        None => must.push(0..image_size.min(size)),
    }
    let must = normalize(must);
    let held = crate::pipeline::capture::data_ranges(&*device)
        .map_err(|e| DeployError::Stage(e.to_string()))?;
    let data = intersect(&must, &normalize(held));
    let zero = subtract(&must, &data);
    Ok(Staged {
        device,
        data,
        zero,
        report: Some(report),
        _file: Some(path),
    })
}

/// A table-less image as its own stage: all of it must be held, its data ranges sent.
fn as_is(image: Arc<dyn BlockDevice>) -> std::result::Result<Staged, DeployError> {
    let whole = 0..image.size();
    let must = std::slice::from_ref(&whole);
    let held = crate::pipeline::capture::data_ranges(&*image)
        .map_err(|e| DeployError::Stage(e.to_string()))?;
    let data = intersect(must, &normalize(held));
    let zero = subtract(must, &data);
    tracing::info!("the image has no partition table: it is sent as it is");
    Ok(Staged {
        device: image,
        data,
        zero,
        report: None,
        _file: None,
    })
}

/// The blocks each partition's filesystem uses, on the staged disk (partitions without a
/// filesystem we read add nothing: what was written of them is in the recorded ranges);
/// `None` when the disk has no partition table.
fn blocks_in_use(device: &Arc<dyn BlockDevice>) -> Option<Vec<Range<u64>>> {
    let table = diskferry_partition::read_table(&**device).ok()?;
    if table.scheme == diskferry_partition::Scheme::None {
        return None;
    }
    let mut out = Vec::new();
    for p in &table.partitions {
        let Ok(slice) = SliceDevice::new(Arc::clone(device), p.start, p.size) else {
            continue;
        };
        let slice: Arc<dyn BlockDevice> = Arc::new(slice);
        if let Some(used) = crate::pipeline::delta::in_use_known(&slice) {
            out.extend(used.into_iter().map(|r| p.start + r.start..p.start + r.end));
        }
    }
    Some(out)
}

/// A device that notes every range written or zeroed through it.
struct Touched {
    inner: Arc<dyn BlockDevice>,
    ranges: Mutex<Vec<Range<u64>>>,
}

impl Touched {
    fn new(inner: Arc<dyn BlockDevice>) -> Touched {
        Touched {
            inner,
            ranges: Mutex::new(Vec::new()),
        }
    }

    fn note(&self, offset: u64, len: u64) {
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        match ranges.last_mut() {
            Some(last) if last.end == offset => last.end += len,
            _ => ranges.push(offset..offset + len),
        }
        // Bounded: long runs of scattered writes are joined as they come.
        if ranges.len() >= 1 << 20 {
            let joined = normalize(std::mem::take(&mut *ranges));
            *ranges = joined;
        }
    }

    fn take(&self) -> Vec<Range<u64>> {
        std::mem::take(&mut *self.ranges.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl BlockDevice for Touched {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.inner.logical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write_at(buf, offset)?;
        self.note(offset, buf.len() as u64);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.write_zeroes(offset, len)?;
        self.note(offset, len);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
    fn chunk_hashes(&self, offset: u64, len: u64, chunk: u32) -> Result<Vec<ChunkHash>> {
        self.inner.chunk_hashes(offset, len, chunk)
    }
    fn read_ranges(
        &self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, Bytes) -> Result<()>,
    ) -> Result<()> {
        self.inner.read_ranges(ranges, sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

    #[test]
    fn an_image_without_a_table_is_sent_as_it_is_its_holes_zeroed() {
        use std::os::unix::fs::FileExt;
        let mib = 1usize << 20;
        let dir = tempfile::tempdir().unwrap();
        // A sparse raw image: data, a 2 MiB hole, data.
        let path = dir.path().join("image.raw");
        let file = std::fs::File::create(&path).unwrap();
        file.write_all_at(&vec![0x5a; mib], 0).unwrap();
        file.write_all_at(&vec![0xa5; mib], 3 * mib as u64).unwrap();
        let image: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&path, false).unwrap());
        let staged = stage(
            image,
            6 * mib as u64,
            &DeployHow::default(),
            dir.path(),
            &Silent,
        )
        .unwrap();
        let m = mib as u64;
        assert_eq!(staged.data, vec![0..m, 3 * m..4 * m]);
        assert_eq!(
            staged.zero,
            vec![m..3 * m],
            "the image's zeros must be zeroed on a used disk"
        );
        assert_eq!(
            staged.must_hold(),
            vec![0..4 * m],
            "the disk past the image is left alone"
        );
        let mut back = vec![0u8; mib];
        staged.device.read_at(&mut back, 3 * m).unwrap();
        assert!(back.iter().all(|&b| b == 0xa5));
    }
}
