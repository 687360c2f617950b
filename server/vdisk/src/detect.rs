//! What a file holds, judged by its signatures: the formats diskferry reads ([`Detected`]),
//! and the containers it recognises but cannot read ([`Foreign`]) — those are an error
//! naming the format, never a "raw disk". Only when no signature matches is a file raw.
//!
//! Looked at: the first sector (qcow magic and version, qcow2 encryption and external data
//! file, VHDX, a VHD footer copy and its disk type, VMDK "KDMV" / "COWD" / seSparse headers
//! and descriptor text, VDI, QED, Parallels) and the last sector (a VHD footer — a fixed disk's
//! only one — which must pass its checksum).

use std::fmt;

use diskferry_blockdev::{BlockDevice, BlockError};
use diskferry_layout::field::{Be, Bytes, Field, Le};

use crate::{qcow2, vhd, vhdx, vmdk, ImageError};

/// What a file holds, judged by its first and last bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Qcow2,
    /// A VHDX image (read-only for now).
    Vhdx,
    /// A fixed or dynamic VHD.
    Vhd,
    /// A monolithicSparse or streamOptimized VMDK.
    Vmdk,
    /// No known signature: taken as a raw disk.
    Raw,
}

impl Detected {
    pub fn name(self) -> &'static str {
        match self {
            Detected::Qcow2 => "qcow2",
            Detected::Vhdx => "vhdx",
            Detected::Vhd => "vhd",
            Detected::Vmdk => "vmdk",
            Detected::Raw => "raw",
        }
    }

    /// The format's name for qemu (a qcow2 overlay's backing format): VHD is "vpc".
    pub fn qemu_name(self) -> &'static str {
        match self {
            Detected::Vhd => "vpc",
            other => other.name(),
        }
    }
}

/// A container recognised by its signature that diskferry cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    /// VirtualBox's VDI.
    Vdi,
    /// QEMU Enhanced Disk.
    Qed,
    /// qcow version 1.
    Qcow1,
    Qcow2Encrypted,
    /// A qcow2 whose data lives in another file.
    Qcow2ExternalData,
    VhdDifferencing,
    /// A VMDK descriptor file: the data is in extents in other files (split or flat).
    VmdkDescriptor,
    /// One sparse extent of a split VMDK (no embedded descriptor naming a one-file disk).
    VmdkSplitExtent,
    /// A VMDK 3 / ESX "COWD" sparse extent.
    VmdkCowd,
    VmdkSeSparse,
    Parallels,
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Foreign::Vdi => "VDI (VirtualBox)",
            Foreign::Qed => "QED",
            Foreign::Qcow1 => "qcow version 1",
            Foreign::Qcow2Encrypted => "encrypted qcow2",
            Foreign::Qcow2ExternalData => "qcow2 with an external data file",
            Foreign::VhdDifferencing => "VHD differencing",
            Foreign::VmdkDescriptor => "VMDK descriptor (split or flat extents)",
            Foreign::VmdkSplitExtent => "VMDK split extent",
            Foreign::VmdkCowd => "VMDK 3 (COWD)",
            Foreign::VmdkSeSparse => "VMDK seSparse",
            Foreign::Parallels => "Parallels",
        })
    }
}

/// Why [`detect`] gives no format.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Io(#[from] BlockError),
    #[error("a {0} image, which diskferry cannot read yet")]
    Foreign(Foreign),
}

impl DetectError {
    /// The error about the file at `path`.
    pub fn at(self, path: &std::path::Path) -> ImageError {
        match self {
            DetectError::Io(source) => ImageError::Io {
                path: path.to_path_buf(),
                source,
            },
            DetectError::Foreign(format) => ImageError::Foreign {
                path: path.to_path_buf(),
                format,
            },
        }
    }
}

const SNIFF: usize = 512;
const QCOW_VERSION: Field<u32, Be> = Field::at(4);
const QCOW_CRYPT_METHOD: Field<u32, Be> = Field::at(32);
const QCOW_INCOMPATIBLE: Field<u64, Be> = Field::at(72);
const QCOW_EXTERNAL_DATA: u64 = 1 << 2;
const VDI_SIGNATURE: Field<u32, Le> = Field::at(0x40);
const VDI_SIGNATURE_VALUE: u32 = 0xbeda_107f;
const SESPARSE_MAGIC: Field<u64, Le> = Field::at(0);
const SESPARSE_MAGIC_VALUE: u64 = 0xcafe_babe;
const PREFIX: Bytes<8> = Bytes::at(0);

/// Recognises image formats by their signatures; a container it knows but diskferry cannot
/// read is [`DetectError::Foreign`].
pub fn detect(file: &dyn BlockDevice) -> Result<Detected, DetectError> {
    let mut head = [0u8; SNIFF];
    let n = file.size().min(SNIFF as u64) as usize;
    file.read_at(&mut head[..n], 0)?;
    if let Some(known) = by_first_sector(&head)? {
        if known == Detected::Vmdk && !vmdk::is_whole_disk(file, &head)? {
            return foreign(Foreign::VmdkSplitExtent);
        }
        return Ok(known);
    }
    // A fixed VHD's only footer, or a dynamic one's whose copy at the start is damaged.
    match vhd::open::find_footer(file)? {
        Some((foot, _)) if is_differencing(&foot) => foreign(Foreign::VhdDifferencing),
        Some(_) => Ok(Detected::Vhd),
        None => Ok(Detected::Raw),
    }
}

fn foreign<T>(format: Foreign) -> Result<T, DetectError> {
    Err(DetectError::Foreign(format))
}

/// The format the first sector names, if it names one.
fn by_first_sector(head: &[u8; SNIFF]) -> Result<Option<Detected>, DetectError> {
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(qcow2::MAGIC) {
        return qcow_kind(head).map(Some);
    }
    if PREFIX.get(head) == *vhdx::MAGIC {
        return Ok(Some(Detected::Vhdx));
    }
    if PREFIX.get(head) == *vhd::MAGIC {
        return match is_differencing(head) {
            true => foreign(Foreign::VhdDifferencing),
            false => Ok(Some(Detected::Vhd)),
        };
    }
    if starts(vmdk::MAGIC) {
        return Ok(Some(Detected::Vmdk));
    }
    let named = [
        (starts(b"COWD"), Foreign::VmdkCowd),
        (is_descriptor(head), Foreign::VmdkDescriptor),
        (
            SESPARSE_MAGIC.get(head) == SESPARSE_MAGIC_VALUE,
            Foreign::VmdkSeSparse,
        ),
        (VDI_SIGNATURE.get(head) == VDI_SIGNATURE_VALUE, Foreign::Vdi),
        (starts(b"QED\0"), Foreign::Qed),
        (
            starts(b"WithoutFreeSpace") || starts(b"WithouFreSpacExt"),
            Foreign::Parallels,
        ),
    ];
    match named.into_iter().find(|(hit, _)| *hit) {
        Some((_, format)) => foreign(format),
        None => Ok(None),
    }
}

fn is_differencing(footer: &[u8]) -> bool {
    vhd::ondisk::footer::DISK_TYPE.get(footer) == vhd::ondisk::footer::TYPE_DIFFERENCING
}

/// A VMDK descriptor: text naming a createType near its start.
fn is_descriptor(head: &[u8]) -> bool {
    head.starts_with(b"# Disk DescriptorFile") || head.windows(12).any(|w| w == b"createType=\"")
}

/// A qcow file: version 1, or a qcow2 we can read, or one encrypted or with external data.
fn qcow_kind(head: &[u8]) -> Result<Detected, DetectError> {
    match QCOW_VERSION.get(head) {
        1 => foreign(Foreign::Qcow1),
        _ if QCOW_CRYPT_METHOD.get(head) != 0 => foreign(Foreign::Qcow2Encrypted),
        3 if QCOW_INCOMPATIBLE.get(head) & QCOW_EXTERNAL_DATA != 0 => {
            foreign(Foreign::Qcow2ExternalData)
        }
        _ => Ok(Detected::Qcow2),
    }
}
