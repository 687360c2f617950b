//! The qcow2 header (versions 2 and 3), parsed from big-endian bytes and validated against
//! the file before anything it describes is trusted.

use super::super::ImageError;
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Bytes of a version 2 header; version 3 headers say their own length (at least 104).
const V2_HEADER_LEN: usize = 72;
const V3_MIN_HEADER_LEN: u32 = 104;

/// Header extension naming the backing file's format.
const BACKING_FORMAT_EXTENSION: u32 = 0xe279_2aca;

/// Incompatible feature bits (version 3).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// Largest virtual size accepted (qemu's own limit is 2^61 bytes; anything near it is hostile
/// or broken, and sizes must fit L1 bounds below anyway).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Largest L1 table accepted, in entries (qemu caps the table at 32 MiB).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// The fields diskferry uses, validated.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Offset of the incompatible-features field (version 3), rewritten to set the dirty bit.
    pub const INCOMPATIBLE_OFFSET: u64 = 72;

    /// A version 3 header as we write it: for an overlay, followed by the backing format
    /// extension, the end marker and the backing file name (all within the first cluster).
    pub fn encode(&self, backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some((_, format)) = backing {
            ext.extend_from_slice(&BACKING_FORMAT_EXTENSION.to_be_bytes());
            ext.extend_from_slice(&(format.len() as u32).to_be_bytes());
            ext.extend_from_slice(format.as_bytes());
            ext.resize(ext.len().next_multiple_of(8), 0);
        }
        ext.extend_from_slice(&[0; 8]); // end of header extensions
        let name_offset = 112 + ext.len() as u64;
        let (name_offset, name_len) = match backing {
            Some((name, _)) => (name_offset, name.len() as u32),
            None => (0, 0),
        };
        let mut b = Vec::with_capacity(120 + name_len as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(&name_offset.to_be_bytes());
        b.extend_from_slice(&name_len.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // snapshots
        b.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
        b.extend_from_slice(&self.incompatible.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // compatible features
        b.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
        b.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16-bit
        b.extend_from_slice(&112u32.to_be_bytes()); // header length
        b.push(0); // compression type: zlib
        b.extend_from_slice(&[0; 7]);
        b.extend_from_slice(&ext);
        if let Some((name, _)) = backing {
            b.extend_from_slice(name.as_bytes());
        }
        b
    }

    /// Parses and validates the first bytes of an image of `file_len` bytes.
    pub fn parse(raw: &[u8], file_len: u64, path: &Path) -> Result<Header, ImageError> {
        let bad = |problem: String| ImageError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        let unsupported = |feature: &str| ImageError::Unsupported {
            path: path.to_path_buf(),
            feature: feature.into(),
        };
        if raw.len() < V2_HEADER_LEN || &raw[..4] != MAGIC {
            return Err(bad(
                "not a qcow2 image (no QFI\\xfb magic at the start)".into()
            ));
        }
        let version = be32(raw, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(&format!("qcow2 version {version}")));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(raw, 8),
            backing_file_size: be32(raw, 16),
            cluster_bits: be32(raw, 20),
            size: be64(raw, 24),
            l1_size: be32(raw, 36),
            l1_table_offset: be64(raw, 40),
            refcount_table_offset: be64(raw, 48),
            refcount_table_clusters: be32(raw, 56),
            nb_snapshots: be32(raw, 60),
            incompatible: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: Compression::Zlib,
        };
        if be32(raw, 32) != 0 {
            return Err(unsupported("encrypted qcow2"));
        }
        if version == 3 {
            if raw.len() < V3_MIN_HEADER_LEN as usize {
                return Err(bad(format!(
                    "version 3 header cut short at {} bytes",
                    raw.len()
                )));
            }
            h.incompatible = be64(raw, 72);
            h.refcount_order = be32(raw, 96);
            h.header_length = be32(raw, 100);
            if h.header_length < V3_MIN_HEADER_LEN || h.header_length as usize > raw.len() {
                return Err(bad(format!(
                    "header length {} is out of range",
                    h.header_length
                )));
            }
            let unknown = h.incompatible & !INCOMPAT_KNOWN;
            if unknown != 0 {
                return Err(unsupported(&format!(
                    "incompatible feature bits {unknown:#x}"
                )));
            }
            if h.incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(bad(
                    "the image is marked corrupt; repair it with `qemu-img check -r all`".into(),
                ));
            }
            if h.incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
                return Err(unsupported("an external data file"));
            }
            if h.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
                return Err(unsupported("extended L2 entries (subclusters)"));
            }
            if h.incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
                if h.header_length < 105 {
                    return Err(bad(
                        "compression type bit set but the header has no compression type".into(),
                    ));
                }
                h.compression = match raw[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(unsupported(&format!("compression type {t}"))),
                };
            }
            if h.refcount_order > 6 {
                return Err(bad(format!(
                    "refcount order {} is above 6",
                    h.refcount_order
                )));
            }
        }
        if !(9..=21).contains(&h.cluster_bits) {
            return Err(bad(format!(
                "cluster bits {} outside 9..=21",
                h.cluster_bits
            )));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(bad(format!("virtual size {} is absurd", h.size)));
        }
        let cluster = h.cluster_size();
        let needed_l1 = h.size.div_ceil(cluster * h.l2_entries());
        if u64::from(h.l1_size) < needed_l1 || u64::from(h.l1_size) > MAX_L1_ENTRIES {
            return Err(bad(format!(
                "L1 table of {} entries cannot map {} bytes (needs {needed_l1}, at most {MAX_L1_ENTRIES})",
                h.l1_size, h.size
            )));
        }
        let within = |offset: u64, len: u64| {
            offset.is_multiple_of(cluster) && offset.checked_add(len).is_some_and(|e| e <= file_len)
        };
        if h.l1_size > 0 && !within(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            return Err(bad(format!(
                "L1 table at {} is misaligned or beyond the end of the file",
                h.l1_table_offset
            )));
        }
        if h.backing_file_offset != 0 {
            let end = h
                .backing_file_offset
                .checked_add(u64::from(h.backing_file_size));
            if h.backing_file_size == 0
                || h.backing_file_size > 1023
                || end.is_none_or(|e| e > file_len)
            {
                return Err(bad("backing file name is out of range".into()));
            }
        }
        Ok(h)
    }
}
