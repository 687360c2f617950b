//! A non-resident NTFS value's clusters, and reading a compressed one.
//!
//! [`RunList`] is the data runs of a value in VCN order (real or sparse), from which come a
//! plain value's extents. [`Compressed`] reads a value with the compressed flag: the value is
//! cut into compression units of 16 clusters (the only unit NTFS compression uses). A unit
//! whose clusters are all real is stored as is; one whose clusters are all sparse reads as
//! zeros; one with some real clusters and a sparse tail holds LZNT1 data in its real
//! clusters ([`super::lznt1`]). A read expands one unit at a time into a buffer of the unit's
//! size (at most 64 KiB: compression is refused for clusters over 4 KiB).

use super::lznt1;
use crate::{FileExtent, FsError, Result};
use diskferry_blockdev::BlockDevice;

/// Clusters in a compression unit.
const UNIT_CLUSTERS: u64 = 16;
/// Largest cluster a compressed value may have (Windows and ntfs-3g compress only up to 4 KiB).
const MAX_COMPRESSED_CLUSTER: u64 = 4096;

/// One data run: `clusters` clusters from `vcn`, at byte `disk` of the volume (`None`: sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    vcn: u64,
    clusters: u64,
    disk: Option<u64>,
}

/// A value's data runs in VCN order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunList {
    cluster: u64,
    runs: Vec<Run>,
}

impl RunList {
    /// The runs of a non-resident value (as (allocated bytes, disk position) pairs in order),
    /// for clusters of `cluster` bytes.
    pub fn new(
        cluster: u64,
        runs: impl IntoIterator<Item = std::result::Result<(u64, Option<u64>), String>>,
    ) -> std::result::Result<RunList, String> {
        let mut out = Vec::new();
        let mut vcn = 0u64;
        for run in runs {
            let (bytes, disk) = run?;
            let clusters = bytes / cluster;
            out.push(Run {
                vcn,
                clusters,
                disk,
            });
            // Every byte offset of the value then fits in 64 bits.
            vcn = vcn
                .checked_add(clusters)
                .filter(|v| v.checked_mul(cluster).is_some())
                .ok_or("data runs overflow the value's size")?;
        }
        Ok(RunList { cluster, runs: out })
    }

    /// Bytes of real (not sparse) clusters.
    pub fn allocated(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.disk.is_some())
            .map(|r| r.clusters * self.cluster)
            .sum()
    }

    /// Where the first `len` bytes of a plain (uncompressed) value are on disk.
    pub fn extents(&self, len: u64) -> Vec<FileExtent> {
        self.runs
            .iter()
            .filter_map(|r| {
                let file_offset = r.vcn * self.cluster;
                let disk_offset = r.disk?;
                (file_offset < len).then(|| FileExtent {
                    file_offset,
                    disk_offset,
                    len: (r.clusters * self.cluster).min(len - file_offset),
                    unwritten: false,
                })
            })
            .collect()
    }

    /// Reads up to `buf.len()` bytes at `offset` of a plain value of `len` bytes stored in
    /// these runs (sparse clusters and clusters past the runs read as zeros).
    pub fn read_plain(
        &self,
        dev: &dyn BlockDevice,
        len: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        if offset >= len {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(len - offset);
        let first = offset / self.cluster;
        let last = (offset + want).div_ceil(self.cluster);
        let mut file_at = first * self.cluster;
        let mut done = 0usize;
        for (disk, bytes) in self.pieces(first, last - first) {
            // The part of this piece inside offset..offset + want.
            let from = offset.max(file_at);
            let to = (offset + want).min(file_at + bytes);
            if from < to {
                let out = &mut buf[done..done + (to - from) as usize];
                match disk {
                    Some(d) => dev.read_at(out, d + (from - file_at))?,
                    None => out.fill(0),
                }
                done += out.len();
            }
            file_at += bytes;
        }
        Ok(done)
    }

    /// The pieces of clusters `first..first + count` as (disk byte or `None` for sparse,
    /// bytes), in VCN order; clusters past the last run are sparse.
    fn pieces(&self, first: u64, count: u64) -> Vec<(Option<u64>, u64)> {
        let end = first + count;
        let mut out = Vec::new();
        let mut covered = first;
        let from = self.runs.partition_point(|r| r.vcn + r.clusters <= first);
        for r in self.runs[from..].iter().take_while(|r| r.vcn < end) {
            let start = r.vcn.max(first);
            let stop = (r.vcn + r.clusters).min(end);
            let disk = r
                .disk
                .map(|d| d.saturating_add((start - r.vcn) * self.cluster));
            out.push((disk, (stop - start) * self.cluster));
            covered = stop;
        }
        if covered < end {
            out.push((None, (end - covered) * self.cluster));
        }
        out
    }
}

/// A compressed value: its runs and length.
#[derive(Debug, Clone)]
pub struct Compressed {
    runs: RunList,
    len: u64,
    unit: u64,
}

impl Compressed {
    /// A compressed value of `len` bytes stored in `runs`.
    pub fn new(runs: RunList, len: u64) -> Result<Compressed> {
        if runs.cluster > MAX_COMPRESSED_CLUSTER {
            return Err(FsError::Unsupported(format!(
                "NTFS compression with {}-byte clusters",
                runs.cluster
            )));
        }
        let unit = runs.cluster * UNIT_CLUSTERS;
        Ok(Compressed { runs, len, unit })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Bytes the value occupies on disk.
    pub fn allocated(&self) -> u64 {
        self.runs.allocated()
    }

    /// The byte ranges that hold data: every unit with a real cluster, merged, within the
    /// value's length.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in self.runs.runs.iter().filter(|r| r.disk.is_some()) {
            let start = r.vcn / UNIT_CLUSTERS * self.unit;
            let end = ((r.vcn + r.clusters).div_ceil(UNIT_CLUSTERS))
                .saturating_mul(self.unit)
                .min(self.len);
            if start >= end {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 >= start => {
                    last.1 = last.1.max(end - last.0);
                }
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Reads up to `buf.len()` bytes at `offset`, expanding the units they fall in.
    pub fn read_at(&self, dev: &dyn BlockDevice, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.len - offset) as usize;
        let mut unit = vec![0u8; self.unit as usize];
        let mut done = 0;
        while done < want {
            let at = offset + done as u64;
            let index = at / self.unit;
            self.read_unit(dev, index, &mut unit)?;
            let skip = (at % self.unit) as usize;
            let n = (self.unit as usize - skip).min(want - done);
            buf[done..done + n].copy_from_slice(&unit[skip..skip + n]);
            done += n;
        }
        Ok(done)
    }

    /// Expands unit `index` into `out` (the unit's size).
    fn read_unit(&self, dev: &dyn BlockDevice, index: u64, out: &mut [u8]) -> Result<()> {
        let pieces = self.runs.pieces(index * UNIT_CLUSTERS, UNIT_CLUSTERS);
        let stored: u64 = pieces.iter().filter(|p| p.0.is_some()).map(|p| p.1).sum();
        if stored == 0 {
            out.fill(0);
            return Ok(());
        }
        if stored == self.unit {
            return read_pieces(dev, &pieces, out);
        }
        let mut packed = vec![0u8; stored as usize];
        read_pieces(dev, &pieces, &mut packed)?;
        lznt1::decompress(&packed, out).map_err(|e| {
            FsError::Corrupt(
                format!("NTFS compression unit {index} (byte {})", index * self.unit),
                e.to_string(),
            )
        })
    }
}

/// Reads the real pieces one after another into `out`.
fn read_pieces(dev: &dyn BlockDevice, pieces: &[(Option<u64>, u64)], out: &mut [u8]) -> Result<()> {
    let mut at = 0usize;
    for &(disk, len) in pieces {
        let Some(disk) = disk else { continue };
        let len = len as usize;
        dev.read_at(&mut out[at..at + len], disk)?;
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(runs: &[(u64, Option<u64>)]) -> RunList {
        RunList::new(512, runs.iter().map(|&(c, d)| Ok((c * 512, d)))).unwrap()
    }

    #[test]
    fn pieces_split_runs_at_unit_edges_and_pad_with_sparse() {
        // 20 real clusters at byte 0x10000, 12 sparse, 3 real at 0x40000.
        let l = list(&[(20, Some(0x10000)), (12, None), (3, Some(0x40000))]);
        assert_eq!(l.pieces(0, 16), vec![(Some(0x10000), 16 * 512)]);
        assert_eq!(
            l.pieces(16, 16),
            vec![(Some(0x10000 + 16 * 512), 4 * 512), (None, 12 * 512)]
        );
        assert_eq!(
            l.pieces(32, 16),
            vec![(Some(0x40000), 3 * 512), (None, 13 * 512)]
        );
        assert_eq!(l.pieces(48, 16), vec![(None, 16 * 512)]);
        assert_eq!(l.allocated(), 23 * 512);
    }

    #[test]
    fn plain_reads_follow_runs_and_fill_holes() {
        let dev = diskferry_blockdev::MemoryDevice::new(8192);
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i / 512) as u8 + 1).collect();
        dev.write_at(&bytes, 0).unwrap();
        // Cluster 0 at sector 3, cluster 1 sparse, clusters 2..4 at sectors 10..12.
        let l = list(&[(1, Some(3 * 512)), (1, None), (2, Some(10 * 512))]);
        let mut buf = vec![0xEEu8; 2000];
        let n = l.read_plain(&dev, 1900, 100, &mut buf).unwrap();
        assert_eq!(n, 1800);
        assert!(buf[..412].iter().all(|&b| b == 4));
        assert!(buf[412..924].iter().all(|&b| b == 0));
        assert!(buf[924..1436].iter().all(|&b| b == 11));
        assert!(buf[1436..1800].iter().all(|&b| b == 12));
        assert_eq!(l.read_plain(&dev, 1900, 1900, &mut buf).unwrap(), 0);
    }

    #[test]
    fn data_ranges_cover_units_with_real_clusters() {
        let l = list(&[
            (20, Some(0x10000)),
            (12, None),
            (16, None),
            (2, Some(0x40000)),
        ]);
        let c = Compressed::new(l, 60 * 512).unwrap();
        let unit = 16 * 512;
        assert_eq!(
            c.data_ranges(),
            vec![(0, 2 * unit), (3 * unit, 60 * 512 - 3 * unit)]
        );
    }

    #[test]
    fn large_clusters_are_refused() {
        let l = RunList::new(65536, [Ok((65536, Some(0)))]).unwrap();
        assert!(matches!(
            Compressed::new(l, 1),
            Err(FsError::Unsupported(_))
        ));
    }
}
