//! Creating qcow2 version 3 images and overlays, and opening existing ones for writing.
//!
//! A new image is laid out as: header (with an overlay's backing format extension and name)
//! in cluster 0, the refcount table from cluster 1 — sized for twice the data plus all
//! metadata, as discarded clusters are never reused — then the L1 table; everything else is
//! appended as it is written. The header is written last, once the tables it points to are
//! on disk: until then the file is no qcow2 image at all, never one with broken refcounts.
//! Refcounts are 16-bit (refcount order 4, qemu's default); writing other widths, internal
//! snapshots and dirty images is refused with a clear message.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::header::{Header, INCOMPAT_DIRTY, MAX_BACKING_NAME, MAX_VIRTUAL_SIZE};
use super::ondisk::REFCOUNT_BYTES;
use super::refcount::WriteState;
use super::{be64_entries, Compression, Meta, Qcow2};
use crate::error::{check_parameter, Allowed, AtPath};
use crate::{CreateError, FormatError, ImageError};
use diskferry_blockdev::BlockDevice;

/// Largest refcount table read from an existing image.
const MAX_REFCOUNT_TABLE: u64 = 256 << 20;

type Result<T> = std::result::Result<T, ImageError>;

impl Qcow2 {
    /// Creates a new image of `size` virtual bytes in the empty writable `file`.
    pub fn create(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
        cluster_bits: u32,
    ) -> Result<Qcow2> {
        Qcow2::create_inner(file, path, size, cluster_bits, None)
    }

    /// Creates an overlay on `base`: every cluster reads from `base` until written. The header
    /// names the base `base_name` (resolved by readers relative to the overlay's directory)
    /// with format `base_format` (`qcow2` or `raw`).
    pub fn create_overlay(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        base: Arc<dyn BlockDevice>,
        base_name: &str,
        base_format: &str,
        cluster_bits: u32,
    ) -> Result<Qcow2> {
        if base_name.is_empty() || base_name.len() > MAX_BACKING_NAME as usize {
            return Err(CreateError::BackingNameLength {
                len: base_name.len(),
            })
            .at(path);
        }
        let size = base.size();
        Qcow2::create_inner(
            file,
            path,
            size,
            cluster_bits,
            Some((base_name, base_format, base)),
        )
    }

    fn create_inner(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        size: u64,
        cluster_bits: u32,
        backing: Option<(&str, &str, Arc<dyn BlockDevice>)>,
    ) -> Result<Qcow2> {
        let bits = Allowed::Range { min: 9, max: 21 };
        check_parameter("cluster bits", cluster_bits.into(), bits).at(path)?;
        check_parameter("virtual size", size, Allowed::Limit(MAX_VIRTUAL_SIZE)).at(path)?;
        if file.size() != 0 {
            return Err(CreateError::NotEmpty).at(path);
        }
        let header = new_header(size, cluster_bits);
        let cluster = header.cluster_size();
        let encoded = header.encode(backing.as_ref().map(|(name, format, _)| (*name, *format)));
        if encoded.len() as u64 > cluster {
            return Err(CreateError::HeaderTooLong {
                len: encoded.len() as u64,
            })
            .at(path);
        }
        let l1_clusters = (u64::from(header.l1_size) * 8).div_ceil(cluster);
        let first_free = header.l1_table_offset + l1_clusters * cluster;
        file.resize(first_free).at(path)?;
        let table_entries = u64::from(header.refcount_table_clusters) * cluster / 8;
        let (backing_name, backing) = match backing {
            Some((name, _, base)) => (Some(name.to_string()), Some(base)),
            None => (None, None),
        };
        let image = Qcow2 {
            file,
            path: path.to_path_buf(),
            backing_name,
            backing,
            meta: Mutex::new(Meta {
                l1: vec![0; header.l1_size as usize],
                l1_dirty: true,
                l2: HashMap::new(),
                tick: 0,
                write: Some(WriteState::new(vec![0; table_entries as usize], first_free)),
            }),
            header,
            last_compressed: Mutex::new(None),
        };
        {
            // Header, refcount table and L1 table are in use.
            let mut meta = image.lock();
            for host in (0..first_free).step_by(cluster as usize) {
                image.set_refcount(&mut meta, host, 1).at(path)?;
            }
        }
        image.flush_all().at(path)?;
        image.file.write_at(&encoded, 0).at(path)?;
        image.file.flush().at(path)?;
        Ok(image)
    }

    /// Opens an existing image for reading and writing; an overlay needs its `backing`.
    pub fn open_writable(
        file: Arc<dyn BlockDevice>,
        path: &Path,
        backing: Option<Arc<dyn BlockDevice>>,
    ) -> Result<Qcow2> {
        let image = match backing {
            Some(b) => Qcow2::open_with_backing(file, path, b)?,
            None => Qcow2::open(file, path)?,
        };
        check_writable(&image.header, path)?;
        let table = image.read_refcount_table()?;
        let cluster = image.header.cluster_size();
        let mut state = WriteState::new(table, image.file.size().div_ceil(cluster) * cluster);
        state.table_dirty = false;
        state.dirty_on_disk = false;
        image.lock().write = Some(state);
        Ok(image)
    }

    /// The refcount table of an existing image, every entry checked against the file.
    fn read_refcount_table(&self) -> Result<Vec<u64>> {
        let h = &self.header;
        let cluster = h.cluster_size();
        let table_len = u64::from(h.refcount_table_clusters) * cluster;
        let file_len = self.file.size();
        if !h.refcount_table_offset.is_multiple_of(cluster)
            || table_len > MAX_REFCOUNT_TABLE
            || h.refcount_table_offset.saturating_add(table_len) > file_len
        {
            return Err(FormatError::Misplaced {
                structure: "refcount table",
                index: None,
                offset: h.refcount_table_offset,
            })
            .at(&self.path);
        }
        let mut raw = vec![0u8; table_len as usize];
        self.file
            .read_at(&mut raw, h.refcount_table_offset)
            .at(&self.path)?;
        let table = be64_entries(&raw);
        for (i, e) in table.iter().enumerate() {
            if !e.is_multiple_of(cluster) || e.saturating_add(cluster) > file_len {
                return Err(FormatError::Misplaced {
                    structure: "refcount block of refcount table entry",
                    index: Some(i as u64),
                    offset: *e,
                })
                .at(&self.path);
            }
        }
        Ok(table)
    }
}

/// The header of a new image: the refcount table from cluster 1, sized for the data twice
/// over (discards are never reused) plus all metadata, then the L1 table.
fn new_header(size: u64, cluster_bits: u32) -> Header {
    let cluster = 1u64 << cluster_bits;
    let l1_entries = size.div_ceil(cluster * (cluster / 8)).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(cluster);
    let per_block = cluster / REFCOUNT_BYTES;
    let budget = 2 * (size.div_ceil(cluster) + l1_entries + l1_clusters) + 64;
    let table_clusters = (budget.div_ceil(per_block) + 2)
        .saturating_mul(8)
        .div_ceil(cluster);
    Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: (1 + table_clusters) * cluster,
        refcount_table_offset: cluster,
        refcount_table_clusters: table_clusters as u32,
        nb_snapshots: 0,
        incompatible: 0,
        refcount_order: 4,
        header_length: super::ondisk::header::V3_LEN as u32,
        compression: Compression::Zlib,
    }
}

/// Refuses images this writer cannot keep consistent.
pub(super) fn check_writable(h: &Header, path: &Path) -> Result<()> {
    let refuse = |why: &str| {
        Err(ImageError::Unsupported {
            path: path.to_path_buf(),
            feature: why.into(),
        })
    };
    if h.version != 3 {
        return refuse("writing qcow2 version 2 images (convert them to version 3)");
    }
    if h.refcount_order != 4 {
        return refuse("writing images with refcounts other than 16 bits");
    }
    if h.nb_snapshots != 0 {
        return refuse("writing images with internal snapshots");
    }
    if h.incompatible & INCOMPAT_DIRTY != 0 {
        return Err(FormatError::NotClean).at(path);
    }
    Ok(())
}
