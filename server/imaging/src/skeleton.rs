//! Skeleton disks: a disk synthesized on the fly from a tree of files — a host directory, or
//! a filesystem inside a capture — that holds only the partition table and the filesystem's
//! metadata, while every file-data block is redirected to the file it belongs to. Nothing is
//! copied: a backup of files becomes a bootable, mountable disk in the time it takes to lay
//! out its metadata.
//!
//! The metadata comes from the ext4 or FAT writer itself, run with `map_file_data`: it plans
//! and writes the filesystem as it always does, but instead of copying file data it reports
//! where each file's data goes (`MappedData`; the FAT writer allocates the clusters with
//! zeros, which the sparse volume stores as nothing). Those writes land in a [`HybridVolume`] the
//! size of the disk (sparse: only metadata takes memory); the data map, sorted by disk
//! offset, is the block-location cache reads go through: a read of a data block becomes a
//! `read_at` of its file at the mapped offset.
//!
//! Three layouts: of a tree ([`SkeletonDisk::of_tree`]), GPT with one Linux-filesystem
//! partition from 1 MiB to 1 MiB before the end, ext4 sized for the tree (`suggested_size`, as
//! `mkfs` does); of one partition of a captured disk ([`SkeletonDisk::of_partition`]), GPT
//! with one partition of its size and kind (an EFI System Partition stays one) holding the
//! same filesystem (ext2/3/4 or FAT, same identity); of a captured disk
//! ([`SkeletonDisk::of_disk`]), the capture itself with each ext2/3/4 and FAT partition
//! replaced by its skeleton (same size, identity and file layout), so the table, boot code,
//! gaps and other partitions are the capture's. The skeleton is read-only;
//! writes go to a redo layer over it (`CowDevice`).

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::{
    BlockDevice, BlockError, Extent, HybridOptions, HybridVolume, Region, Result as BlockResult,
    SliceDevice,
};
use diskferry_fs::ext4::write::{suggested_size, write_ext4, Ext4Options};
use diskferry_fs::fat_write::{write_fat, FatOptions};
use diskferry_fs::overlay::TreeTransform;
use diskferry_fs::{Filesystem, MappedData, NodeId};
use diskferry_partition::{gpt_types, Guid, Partition, PartitionTable, PartitionType, Scheme};

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SkeletonError {
    #[error("reading the source tree: {0}")]
    Tree(String),
    #[error("the metadata volume: {0}")]
    Volume(#[from] diskferry_blockdev::HybridError),
    #[error("writing the partition table: {0}")]
    Table(#[from] diskferry_partition::PartitionError),
    #[error("laying out the filesystem metadata: {0}")]
    Filesystem(#[from] diskferry_fs::FsError),
    #[error("partition {0} is not in the table")]
    NoPartition(u32),
    #[error("partition {0} holds no ext2/3/4 or FAT filesystem a skeleton can be made of")]
    NotRebuildable(u32),
    #[error("{0}")]
    Block(#[from] BlockError),
}

/// What building a skeleton did.
#[derive(Debug, Clone)]
pub struct SkeletonStats {
    pub files: u64,
    pub dirs: u64,
    /// File data the disk redirects to the source.
    pub mapped_bytes: u64,
    /// Bytes the metadata holds in memory.
    pub metadata_bytes: u64,
    /// From the first read of the tree to a disk ready to serve.
    pub elapsed: Duration,
    /// Entries the writer could not represent, with why.
    pub skipped: Vec<(String, String)>,
    /// What a customization changed, a line each.
    pub changes: Vec<String>,
}

/// A disk whose filesystems' metadata is in memory and whose file data is read from the
/// source's files; everything outside those filesystems (the partition table, boot code,
/// gaps, other partitions) is read from `base`.
pub struct SkeletonDisk {
    base: Arc<dyn BlockDevice>,
    /// Sorted by start, disjoint.
    parts: Vec<SkeletonPart>,
}

/// One synthesized filesystem: its place on the disk, its metadata and its data map.
struct SkeletonPart {
    start: u64,
    size: u64,
    meta: Arc<HybridVolume>,
    /// Partition-relative, sorted by `disk`, disjoint.
    map: Vec<Mapped>,
    source: Arc<dyn Filesystem>,
}

/// A run of partition bytes that reads as a file's bytes.
#[derive(Debug, Clone, Copy)]
struct Mapped {
    disk: u64,
    len: u64,
    node: NodeId,
    file_offset: u64,
}

impl Mapped {
    fn end(&self) -> u64 {
        self.disk + self.len
    }
}

impl SkeletonDisk {
    /// The skeleton of `source`'s whole tree: GPT, one ext4 sized for the tree.
    pub fn of_tree(
        source: Arc<dyn Filesystem>,
    ) -> Result<(SkeletonDisk, SkeletonStats), SkeletonError> {
        let started = Instant::now();
        let (data, entries) =
            diskferry_fs::tree::space_needed(&*source).map_err(SkeletonError::Tree)?;
        let fs_size = suggested_size(data, entries);
        let opts = Ext4Options {
            label: Some("skeleton".into()),
            ..Ext4Options::default()
        };
        let kind = PartitionType::Gpt(Guid::parse(gpt_types::LINUX_FILESYSTEM).expect("a GUID"));
        single_partition(source, fs_size, kind, FsLayout::Ext4(opts), started)
    }

    /// The skeleton of a captured disk: its table, boot code, gaps and other partitions read
    /// from `disk` as they are, each ext2/3/4 and FAT partition replaced by a skeleton with
    /// the same size, identity (UUID or serial, label, features) and file layout — so it boots
    /// as the capture does. Partitions whose filesystem cannot be rebuilt file by file stay as
    /// they are.
    pub fn of_disk(
        disk: Arc<dyn BlockDevice>,
    ) -> Result<(SkeletonDisk, SkeletonStats), SkeletonError> {
        Self::of_disk_with(disk, None)
    }

    /// [`SkeletonDisk::of_disk`] with `transform`'s edits (a customization) made to each
    /// skeleton partition's tree; edited files read from memory.
    pub fn of_disk_with(
        disk: Arc<dyn BlockDevice>,
        transform: Option<&dyn TreeTransform>,
    ) -> Result<(SkeletonDisk, SkeletonStats), SkeletonError> {
        let started = Instant::now();
        let table = diskferry_partition::read_table(&*disk)?;
        let mut built = Vec::new();
        for p in &table.partitions {
            let slice: Arc<dyn BlockDevice> =
                Arc::new(SliceDevice::new(Arc::clone(&disk), p.start, p.size)?);
            if let Some((source, layout)) = rebuildable(slice, p.number, p.start) {
                let (source, changes) = edited(source, p.number, transform)?;
                let (part, mut report) = SkeletonPart::build(source, p.start, p.size, layout)?;
                report.changes = changes;
                built.push((part, report));
            }
        }
        let pairs: Vec<_> = built.iter().map(|(p, r)| (p, r)).collect();
        let stats = SkeletonStats::of(&pairs, started);
        let mut parts: Vec<SkeletonPart> = built.into_iter().map(|(p, _)| p).collect();
        parts.sort_by_key(|p| p.start);
        Ok((SkeletonDisk { base: disk, parts }, stats))
    }

    /// The skeleton of partition `number` of a captured disk on a disk of its own: GPT with one
    /// partition of the same size and kind (EFI System, Linux filesystem or basic data) at
    /// 1 MiB, holding the same filesystem (ext2/3/4 or FAT) with the same identity.
    pub fn of_partition(
        disk: Arc<dyn BlockDevice>,
        number: u32,
    ) -> Result<(SkeletonDisk, SkeletonStats), SkeletonError> {
        let started = Instant::now();
        let table = diskferry_partition::read_table(&*disk)?;
        let p = table
            .partitions
            .iter()
            .find(|p| p.number == number)
            .ok_or(SkeletonError::NoPartition(number))?;
        let slice: Arc<dyn BlockDevice> = Arc::new(SliceDevice::new(disk, p.start, p.size)?);
        let (source, layout) =
            rebuildable(slice, number, MIB).ok_or(SkeletonError::NotRebuildable(number))?;
        let kind = match (&layout, is_esp(&p.kind)) {
            (_, true) => gpt_types::EFI_SYSTEM,
            (FsLayout::Ext4(_), false) => gpt_types::LINUX_FILESYSTEM,
            (FsLayout::Fat(_), false) => gpt_types::MICROSOFT_BASIC_DATA,
        };
        let kind = PartitionType::Gpt(Guid::parse(kind).expect("a GUID"));
        single_partition(source, p.size, kind, layout, started)
    }
}

/// A GPT disk of one partition of `kind` at 1 MiB holding the skeleton of `source`, a
/// filesystem of `fs_size` bytes laid out as `layout` says.
fn single_partition(
    source: Arc<dyn Filesystem>,
    fs_size: u64,
    kind: PartitionType,
    layout: FsLayout,
    started: Instant,
) -> Result<(SkeletonDisk, SkeletonStats), SkeletonError> {
    let table_volume = HybridVolume::new(
        fs_size + 2 * MIB,
        HybridOptions {
            ram_limit: 4 * MIB,
            spill: None,
        },
    )?;
    diskferry_partition::write_table(&table_volume, &gpt_with_one_partition(fs_size, kind))?;
    let (part, report) = SkeletonPart::build(source, MIB, fs_size, layout)?;
    let stats = SkeletonStats::of(&[(&part, &report)], started);
    Ok((
        SkeletonDisk {
            base: Arc::new(table_volume),
            parts: vec![part],
        },
        stats,
    ))
}

/// How a skeleton partition's filesystem is laid out.
enum FsLayout {
    Ext4(Ext4Options),
    Fat(FatOptions),
}

/// The filesystem on `slice` (partition `number`, to sit at byte `start` of its disk) and the
/// options that lay it out again with the same identity, when a skeleton can be made of it.
fn rebuildable(
    slice: Arc<dyn BlockDevice>,
    number: u32,
    start: u64,
) -> Option<(Arc<dyn Filesystem>, FsLayout)> {
    if let Ok(ext) = diskferry_fs::ext4::Ext4::open(Arc::clone(&slice)) {
        if let Some(why) = ext.rebuild_obstacle() {
            tracing::info!(partition = number, "kept as it is: {why}");
            return None;
        }
        let mut opts = ext.format_options();
        opts.keep_source_layout = true;
        return Some((Arc::new(ext), FsLayout::Ext4(opts)));
    }
    let fat = diskferry_fs::fat::Fat::open(slice).ok()?;
    let opts = FatOptions {
        hidden_sectors: u32::try_from(start / 512).ok(),
        ..fat.format_options()
    };
    Some((Arc::new(fat), FsLayout::Fat(opts)))
}

/// An EFI System Partition's type.
fn is_esp(kind: &PartitionType) -> bool {
    match kind {
        PartitionType::Mbr(t) => *t == 0xef,
        PartitionType::Gpt(g) => Guid::parse(gpt_types::EFI_SYSTEM).is_some_and(|esp| *g == esp),
    }
}

/// `source` with `transform`'s edits for partition `number`, and the changes made.
fn edited(
    source: Arc<dyn Filesystem>,
    number: u32,
    transform: Option<&dyn TreeTransform>,
) -> Result<(Arc<dyn Filesystem>, Vec<String>), SkeletonError> {
    let Some(t) = transform else {
        return Ok((source, Vec::new()));
    };
    Ok(match t.apply(number, Arc::clone(&source))? {
        Some((overlay, changes)) => (Arc::new(overlay), changes),
        None => (source, Vec::new()),
    })
}

/// What laying out one skeleton filesystem did.
struct Built {
    files: u64,
    dirs: u64,
    skipped: Vec<(String, String)>,
    /// What a transform changed in its tree.
    changes: Vec<String>,
}

impl SkeletonStats {
    fn of(parts: &[(&SkeletonPart, &Built)], started: Instant) -> SkeletonStats {
        let mut s = SkeletonStats {
            files: 0,
            dirs: 0,
            mapped_bytes: 0,
            metadata_bytes: 0,
            elapsed: started.elapsed(),
            skipped: Vec::new(),
            changes: Vec::new(),
        };
        for (part, report) in parts {
            s.files += report.files;
            s.dirs += report.dirs;
            s.mapped_bytes += part.map.iter().map(|m| m.len).sum::<u64>();
            s.metadata_bytes += part.meta.stats().ram_bytes;
            s.skipped.extend(report.skipped.iter().cloned());
            s.changes.extend(report.changes.iter().cloned());
        }
        s
    }
}

impl SkeletonPart {
    /// Lays out the metadata of a filesystem of `size` bytes for `source` (at `start` on the
    /// disk).
    fn build(
        source: Arc<dyn Filesystem>,
        start: u64,
        size: u64,
        layout: FsLayout,
    ) -> Result<(SkeletonPart, Built), SkeletonError> {
        let meta = Arc::new(HybridVolume::new(
            size,
            HybridOptions {
                ram_limit: size,
                spill: None,
            },
        )?);
        let dev = Arc::clone(&meta) as Arc<dyn BlockDevice>;
        let (data_map, files, dirs, skipped) = match layout {
            FsLayout::Ext4(opts) => {
                let opts = Ext4Options {
                    map_file_data: true,
                    ..opts
                };
                let r = write_ext4(dev, &*source, &opts)?;
                (r.data_map, r.files, r.dirs, r.skipped)
            }
            FsLayout::Fat(opts) => {
                let opts = FatOptions {
                    map_file_data: true,
                    ..opts
                };
                let r = write_fat(dev, &*source, &opts)?;
                (r.data_map, r.files, r.dirs, r.skipped)
            }
        };
        let report = Built {
            files,
            dirs,
            skipped,
            changes: Vec::new(),
        };
        let map = data_map
            .iter()
            .map(|m: &MappedData| Mapped {
                disk: m.fs_offset,
                len: m.len,
                node: m.node,
                file_offset: m.file_offset,
            })
            .collect();
        Ok((
            SkeletonPart {
                start,
                size,
                meta,
                map,
                source,
            },
            report,
        ))
    }

    fn end(&self) -> u64 {
        self.start + self.size
    }

    /// The mapped runs overlapping `range` (partition-relative), from the first on.
    fn mapped_in(&self, range: Range<u64>) -> impl Iterator<Item = &Mapped> {
        let first = self.map.partition_point(|m| m.end() <= range.start);
        self.map[first..]
            .iter()
            .take_while(move |m| m.disk < range.end)
    }

    /// Reads `buf.len()` bytes of a mapped run from `at` (inside it): the file's bytes, zeros
    /// past its end.
    fn read_mapped(&self, m: &Mapped, buf: &mut [u8], at: u64) -> BlockResult<()> {
        let offset = m.file_offset + (at - m.disk);
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .source
                .read_at(m.node, offset + done as u64, &mut buf[done..])
                .map_err(|e| BlockError::Format(Box::new(e)))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Reads partition bytes at `offset`: mapped runs from the files, the rest from the
    /// metadata.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        for m in self.mapped_in(offset..end) {
            if m.disk > at {
                self.meta.read_at(
                    &mut buf[(at - offset) as usize..(m.disk - offset) as usize],
                    at,
                )?;
                at = m.disk;
            }
            let stop = m.end().min(end);
            self.read_mapped(
                m,
                &mut buf[(at - offset) as usize..(stop - offset) as usize],
                at,
            )?;
            at = stop;
        }
        if at < end {
            self.meta.read_at(&mut buf[(at - offset) as usize..], at)?;
        }
        Ok(())
    }

    /// Mapped runs are data; elsewhere, what the metadata volume holds (partition-relative).
    fn block_status(&self, offset: u64, end: u64) -> BlockResult<Vec<Extent>> {
        if let Some(m) = self.mapped_in(offset..end).next() {
            if m.disk <= offset {
                let len = m.end().min(end) - offset;
                return Ok(vec![Extent {
                    offset,
                    len,
                    region: Region::Data,
                }]);
            }
            return self.meta.block_status(offset, m.disk - offset);
        }
        self.meta.block_status(offset, end - offset)
    }
}

impl SkeletonDisk {
    /// The skeleton partition holding `offset`, or where the next one starts.
    fn part_at(&self, offset: u64) -> Result<&SkeletonPart, u64> {
        let i = self.parts.partition_point(|p| p.end() <= offset);
        match self.parts.get(i) {
            Some(p) if p.start <= offset => Ok(p),
            Some(p) => Err(p.start),
            None => Err(u64::MAX),
        }
    }
}

impl BlockDevice for SkeletonDisk {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        diskferry_blockdev::check_range(self.size(), offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let piece = &mut buf[(at - offset) as usize..];
            let n = match self.part_at(at) {
                Ok(p) => {
                    let n = (p.end().min(end) - at) as usize;
                    p.read_at(&mut piece[..n], at - p.start)?;
                    n
                }
                Err(next) => {
                    let n = (next.min(end) - at) as usize;
                    self.base.read_at(&mut piece[..n], at)?;
                    n
                }
            };
            at += n as u64;
        }
        Ok(())
    }

    /// Inside a skeleton partition: its mapped runs are data, the rest what its metadata
    /// holds; outside: the base's status.
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        match self.part_at(offset) {
            Ok(p) => {
                let local = p.block_status(offset - p.start, p.end().min(end) - p.start)?;
                Ok(local
                    .into_iter()
                    .map(|e| Extent {
                        offset: e.offset + p.start,
                        ..e
                    })
                    .collect())
            }
            Err(next) => self.base.block_status(offset, next.min(end) - offset),
        }
    }
}

/// A GPT with one partition of type `kind` and `fs_size` bytes at 1 MiB, fresh GUIDs.
fn gpt_with_one_partition(fs_size: u64, kind: PartitionType) -> PartitionTable {
    PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: 512,
        disk_guid: Some(random_guid()),
        mbr_signature: None,
        partitions: vec![Partition {
            number: 1,
            start: MIB,
            size: fs_size,
            kind,
            guid: Some(random_guid()),
            name: "skeleton".into(),
            attributes: 0,
            bootable: false,
        }],
        gpt_entries: 128,
        mbr_extended: None,
        warnings: Vec::new(),
    }
}

/// A random (version 4) GUID (all zeros if the system has no randomness to give: still a
/// valid table).
fn random_guid() -> Guid {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b[7] = (b[7] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Guid(b)
}
