//! Linux swap areas: the identity in a swap header (version 1, 4 KiB pages: UUID, label, size)
//! read from a source, and a fresh header written for a destination of any size — what `mkswap
//! -U UUID -L LABEL` makes. A swap area's other pages are scratch space the kernel rewrites
//! at every boot, so a copy keeps the header's identity and nothing else.

use diskferry_blockdev::BlockDevice;
use diskferry_layout::field::Field;

use super::{FsError, Result};

/// The page size the header is laid out for (x86, arm64 with 4 KiB pages).
pub const PAGE: u64 = 4096;
const SIGNATURE: &[u8; 10] = b"SWAPSPACE2";
const VERSION: Field<u32> = Field::at(1024);
const LAST_PAGE: Field<u32> = Field::at(1028);
const BAD_PAGES: Field<u32> = Field::at(1032);
const UUID: std::ops::Range<usize> = 1036..1052;
const LABEL: std::ops::Range<usize> = 1052..1068;

/// What identifies a swap area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapIdentity {
    pub uuid: [u8; 16],
    /// Up to 16 bytes, NUL-padded on disk.
    pub label: Vec<u8>,
}

/// Reads the identity of the version-1 swap header at the start of `dev`.
pub fn read_identity(dev: &dyn BlockDevice) -> Result<SwapIdentity> {
    if dev.size() < 2 * PAGE {
        return Err(FsError::Corrupt(
            "swap".into(),
            "the area is smaller than two pages".into(),
        ));
    }
    let mut page = vec![0u8; PAGE as usize];
    dev.read_at(&mut page, 0)?;
    if &page[PAGE as usize - SIGNATURE.len()..] != SIGNATURE {
        return Err(FsError::Unsupported(
            "only version 1 swap headers (SWAPSPACE2, 4 KiB pages) can be recreated".into(),
        ));
    }
    if VERSION.get(&page) != 1 {
        return Err(FsError::Corrupt(
            "swap".into(),
            format!("header version {} is not 1", VERSION.get(&page)),
        ));
    }
    let label = &page[LABEL];
    let len = label.iter().position(|&b| b == 0).unwrap_or(label.len());
    Ok(SwapIdentity {
        uuid: page[UUID].try_into().expect("16 bytes"),
        label: label[..len].to_vec(),
    })
}

/// Writes a swap header for all of `dev` carrying `id`; the rest of the device is left as it is
/// (zeros on a new image).
pub fn write_header(dev: &dyn BlockDevice, id: &SwapIdentity) -> Result<()> {
    let pages = dev.size() / PAGE;
    if pages < 2 {
        return Err(FsError::Unsupported(
            "a swap area needs at least two pages".into(),
        ));
    }
    let last = u32::try_from(pages - 1).unwrap_or(u32::MAX);
    let mut page = vec![0u8; PAGE as usize];
    VERSION.set(&mut page, 1);
    LAST_PAGE.set(&mut page, last);
    BAD_PAGES.set(&mut page, 0);
    page[UUID].copy_from_slice(&id.uuid);
    let n = id.label.len().min(16);
    page[LABEL][..n].copy_from_slice(&id.label[..n]);
    page[PAGE as usize - SIGNATURE.len()..].copy_from_slice(SIGNATURE);
    dev.write_at(&page, 0)?;
    Ok(())
}

/// Recreates the swap area of `src` on `dst` (any size of at least two pages).
pub fn recreate(src: &dyn BlockDevice, dst: &dyn BlockDevice) -> Result<()> {
    write_header(dst, &read_identity(src)?)
}
