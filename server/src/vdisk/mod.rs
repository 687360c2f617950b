//! Sparse virtual disk formats as block devices. Each format answers "where does virtual
//! range X live?" with a [`Mapping`], and a separate step performs the I/O — so metadata
//! logic is testable without files, and locks on metadata stay short.
//!
//! Today: the qcow2 reader. The qcow2 writer, overlays, VHDX and raw images follow.

pub mod qcow2;

use std::path::PathBuf;

/// Where a piece of the virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// `len` bytes stored at `host` in the image file.
    Data { host: u64, len: u64 },
    /// Reads as zeros (explicitly marked).
    Zero { len: u64 },
    /// Never written: zeros, or the backing image's bytes for an overlay.
    Unallocated { len: u64 },
    /// Inside a compressed cluster: `len` bytes from `in_cluster` of the cluster that
    /// decompresses from at most `stored` bytes at `host`.
    Compressed {
        host: u64,
        stored: u64,
        in_cluster: u64,
        len: u64,
    },
}

impl Mapping {
    pub fn len(&self) -> u64 {
        match *self {
            Mapping::Data { len, .. }
            | Mapping::Zero { len }
            | Mapping::Unallocated { len }
            | Mapping::Compressed { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why an image cannot be opened or read. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("{path}: {feature} is not supported")]
    Unsupported { path: PathBuf, feature: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: crate::blockdev::BlockError,
    },
}
