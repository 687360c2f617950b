//! The qcow2 header (versions 2 and 3): parsed through the field table in `ondisk.rs` and
//! validated against the file before anything it describes is trusted; encoded through the
//! same table.

use std::path::Path;

use super::ondisk::{extension, header as h};
use crate::error::{check_field, Allowed, AtPath};
use crate::{FormatError, ImageError};

pub use super::ondisk::header::{
    INCOMPAT_COMPRESSION_TYPE, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2,
    INCOMPAT_EXTERNAL_DATA,
};

pub const MAGIC: &[u8; 4] = h::MAGIC_VALUE;

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
/// Longest backing file name (qemu's limit).
pub const MAX_BACKING_NAME: u32 = 1023;

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

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// The bytes, and their offset in the file, that rewrite the incompatible-features field
    /// alone with `bits` (how the dirty bit is set and cleared).
    pub fn incompatible_patch(bits: u64) -> ([u8; 8], u64) {
        let field = h::INCOMPATIBLE_FEATURES;
        let mut raw = [0u8; h::V3_MIN_LEN];
        field.set(&mut raw, bits);
        let mut patch = [0u8; 8];
        patch.copy_from_slice(&raw[field.offset..field.end()]);
        (patch, field.offset as u64)
    }

    /// A version 3 header as we write it: for an overlay, followed by the backing format
    /// extension, the end marker and the backing file name (all within the first cluster).
    pub fn encode(&self, backing: Option<(&str, &str)>) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some((_, format)) = backing {
            ext.extend(extension_bytes(
                extension::BACKING_FORMAT,
                format.as_bytes(),
            ));
        }
        ext.extend(extension_bytes(extension::END, &[]));
        let name = backing.map_or(&[][..], |(name, _)| name.as_bytes());
        let mut b = vec![0u8; h::V3_LEN];
        h::MAGIC.set(&mut b, MAGIC);
        h::VERSION.set(&mut b, 3);
        if !name.is_empty() {
            h::BACKING_FILE_OFFSET.set(&mut b, (h::V3_LEN + ext.len()) as u64);
            h::BACKING_FILE_SIZE.set(&mut b, name.len() as u32);
        }
        h::CLUSTER_BITS.set(&mut b, self.cluster_bits);
        h::SIZE.set(&mut b, self.size);
        h::L1_SIZE.set(&mut b, self.l1_size);
        h::L1_TABLE_OFFSET.set(&mut b, self.l1_table_offset);
        h::REFCOUNT_TABLE_OFFSET.set(&mut b, self.refcount_table_offset);
        h::REFCOUNT_TABLE_CLUSTERS.set(&mut b, self.refcount_table_clusters);
        h::INCOMPATIBLE_FEATURES.set(&mut b, self.incompatible);
        h::REFCOUNT_ORDER.set(&mut b, 4); // 16-bit refcounts
        h::HEADER_LENGTH.set(&mut b, h::V3_LEN as u32);
        // No encryption, snapshots, compatible or autoclear features; zlib compression.
        b.extend_from_slice(&ext);
        b.extend_from_slice(name);
        b
    }

    /// Parses and validates the first bytes of an image of `file_len` bytes.
    pub fn parse(raw: &[u8], file_len: u64, path: &Path) -> Result<Header, ImageError> {
        if raw.len() < h::V2_LEN || h::MAGIC.get(raw) != *MAGIC {
            return Err(FormatError::NotFormat {
                format: "qcow2",
                magic: "QFI\\xfb",
            })
            .at(path);
        }
        let version = h::VERSION.get(raw);
        if version != 2 && version != 3 {
            return Err(unsupported(path, format!("qcow2 version {version}")));
        }
        if h::CRYPT_METHOD.get(raw) != 0 {
            return Err(unsupported(path, "encrypted qcow2".into()));
        }
        let mut header = Header {
            version,
            backing_file_offset: h::BACKING_FILE_OFFSET.get(raw),
            backing_file_size: h::BACKING_FILE_SIZE.get(raw),
            cluster_bits: h::CLUSTER_BITS.get(raw),
            size: h::SIZE.get(raw),
            l1_size: h::L1_SIZE.get(raw),
            l1_table_offset: h::L1_TABLE_OFFSET.get(raw),
            refcount_table_offset: h::REFCOUNT_TABLE_OFFSET.get(raw),
            refcount_table_clusters: h::REFCOUNT_TABLE_CLUSTERS.get(raw),
            nb_snapshots: h::NB_SNAPSHOTS.get(raw),
            incompatible: 0,
            refcount_order: 4,
            header_length: h::V2_LEN as u32,
            compression: Compression::Zlib,
        };
        if version == 3 {
            header.parse_v3(raw, path)?;
        }
        header.check_geometry(file_len).at(path)?;
        Ok(header)
    }

    /// The version 3 fields: features (refusing what we cannot read), refcount width,
    /// header length, compression type.
    fn parse_v3(&mut self, raw: &[u8], path: &Path) -> Result<(), ImageError> {
        if raw.len() < h::V3_MIN_LEN {
            return Err(FormatError::Short {
                structure: "version 3 header",
                len: raw.len() as u64,
                needed: h::V3_MIN_LEN as u64,
            })
            .at(path);
        }
        self.incompatible = h::INCOMPATIBLE_FEATURES.get(raw);
        self.refcount_order = h::REFCOUNT_ORDER.get(raw);
        self.header_length = h::HEADER_LENGTH.get(raw);
        let length = Allowed::Range {
            min: h::V3_MIN_LEN as u64,
            max: raw.len() as u64,
        };
        check_field("header", "header length", self.header_length.into(), length).at(path)?;
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(unsupported(
                path,
                format!("incompatible feature bits {unknown:#x}"),
            ));
        }
        let refused = [
            (INCOMPAT_EXTERNAL_DATA, "an external data file"),
            (INCOMPAT_EXTENDED_L2, "extended L2 entries (subclusters)"),
        ];
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(FormatError::MarkedCorrupt).at(path);
        }
        if let Some((_, feature)) = refused.iter().find(|(bit, _)| self.incompatible & bit != 0) {
            return Err(unsupported(path, (*feature).into()));
        }
        if self.incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
            let with_type = Allowed::Range {
                min: h::COMPRESSION_TYPE.end() as u64,
                max: raw.len() as u64,
            };
            check_field(
                "header",
                "header length",
                self.header_length.into(),
                with_type,
            )
            .at(path)?;
            self.compression = match h::COMPRESSION_TYPE.get(raw) {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                t => return Err(unsupported(path, format!("compression type {t}"))),
            };
        }
        let order = Allowed::Range { min: 0, max: 6 };
        check_field(
            "header",
            "refcount order",
            self.refcount_order.into(),
            order,
        )
        .at(path)
    }

    /// Cluster size, virtual size, the L1 table and the backing file name against the file.
    fn check_geometry(&self, file_len: u64) -> Result<(), FormatError> {
        check_field(
            "header",
            "cluster bits",
            self.cluster_bits.into(),
            Allowed::Range { min: 9, max: 21 },
        )?;
        check_field(
            "header",
            "virtual size",
            self.size,
            Allowed::Limit(MAX_VIRTUAL_SIZE),
        )?;
        let cluster = self.cluster_size();
        let needed_l1 = self.size.div_ceil(cluster * self.l2_entries());
        check_field(
            "header",
            "L1 table size",
            self.l1_size.into(),
            Allowed::Range {
                min: needed_l1,
                max: MAX_L1_ENTRIES,
            },
        )?;
        let within = |offset: u64, len: u64| {
            offset.is_multiple_of(cluster) && offset.checked_add(len).is_some_and(|e| e <= file_len)
        };
        if self.l1_size > 0 && !within(self.l1_table_offset, u64::from(self.l1_size) * 8) {
            return Err(FormatError::Misplaced {
                structure: "L1 table",
                index: None,
                offset: self.l1_table_offset,
            });
        }
        if self.backing_file_offset != 0 {
            let end = self
                .backing_file_offset
                .checked_add(u64::from(self.backing_file_size));
            if self.backing_file_size == 0 || end.is_none_or(|e| e > file_len) {
                return Err(FormatError::BeyondEnd {
                    structure: "backing file name",
                    offset: self.backing_file_offset,
                    len: self.backing_file_size.into(),
                });
            }
            check_field(
                "header",
                "backing file name length",
                self.backing_file_size.into(),
                Allowed::Range {
                    min: 1,
                    max: MAX_BACKING_NAME.into(),
                },
            )?;
        }
        Ok(())
    }
}

/// A header extension of `kind` holding `data`, padded to 8 bytes.
pub(super) fn extension_bytes(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; extension::DATA];
    extension::TYPE.set(&mut e, kind);
    extension::LENGTH.set(&mut e, data.len() as u32);
    e.extend_from_slice(data);
    e.resize(e.len().next_multiple_of(8), 0);
    e
}

fn unsupported(path: &Path, feature: String) -> ImageError {
    ImageError::Unsupported {
        path: path.to_path_buf(),
        feature,
    }
}
