//! An image's backing file name: reading it from the header (bounded, UTF-8), and pointing an
//! existing image at another backing file — or none — in place (what `rebase` needs).
//!
//! The header cluster holds the header, its extensions up to the end marker, and the backing
//! file name; nothing else lives there. A new name is first written into free space of that
//! cluster (after everything the current header uses, or between the extensions and the old
//! name), synced, and only then are the header fields (name offset and size) and, when the
//! backing format changes, the extensions rewritten in one write of the header's first bytes,
//! then synced: a crash before that write leaves the old header intact, and the write itself
//! is small enough to sit in the first sector for images we and qemu-img make. Images with
//! their dirty or corrupt bit set, version 2 images and snapshot holders are refused.

use std::path::Path;

use super::header::{Header, MAX_BACKING_NAME};
use super::ondisk::{extension, header as h};
use crate::error::AtPath;
use crate::{FormatError, ImageError};
use diskferry_blockdev::BlockDevice;

type Result<T> = std::result::Result<T, ImageError>;

/// The backing file name `header` points at in `file`, if any (at most 1023 bytes, checked by
/// [`Header::parse`]).
pub(super) fn read_backing_name(
    file: &dyn BlockDevice,
    header: &Header,
    path: &Path,
) -> Result<Option<String>> {
    if header.backing_file_offset == 0 {
        return Ok(None);
    }
    let mut name = vec![0u8; header.backing_file_size as usize];
    file.read_at(&mut name, header.backing_file_offset)
        .at(path)?;
    String::from_utf8(name)
        .map(Some)
        .map_err(|_| FormatError::BackingNameNotUtf8)
        .at(path)
}

/// The backing file name of the qcow2 image in `file`, reading only its header and the name
/// (no tables): for scanning a directory for images built on another.
pub fn backing_name_of(file: &dyn BlockDevice, path: &Path) -> Result<Option<String>> {
    let header = header_cluster(file, path)?.0;
    read_backing_name(file, &header, path)
}

/// Points the qcow2 image in `file` at the backing file `name` of qemu format `format`, or at
/// none. Call it only on an image no open [`Qcow2`](super::Qcow2) is writing.
pub fn set_backing_file(
    file: &dyn BlockDevice,
    path: &Path,
    backing: Option<(&str, &str)>,
) -> Result<()> {
    let rewrite = plan(file, path, backing)?;
    if let Some((at, name)) = backing.map(|(name, _)| (rewrite.name_at, name)) {
        file.write_at(name.as_bytes(), at).at(path)?;
        file.flush().at(path)?;
    }
    file.write_at(&rewrite.prefix, 0).at(path)?;
    file.flush().at(path)?;
    tracing::debug!(image = %path.display(), backing = ?backing, "backing file rewritten");
    Ok(())
}

/// Checks, writing nothing, that [`set_backing_file`] can rewrite the header of the image in
/// `file` as asked (before a long copy that would otherwise be wasted).
pub fn check_backing_file(
    file: &dyn BlockDevice,
    path: &Path,
    backing: Option<(&str, &str)>,
) -> Result<()> {
    plan(file, path, backing).map(drop)
}

/// What a backing file rewrite writes: the name at `name_at`, then `prefix` at 0 (the header
/// with the new name's offset and size, and the extensions when they change).
struct Rewrite {
    name_at: u64,
    prefix: Vec<u8>,
}

fn plan(file: &dyn BlockDevice, path: &Path, backing: Option<(&str, &str)>) -> Result<Rewrite> {
    let (header, cluster) = header_cluster(file, path)?;
    super::create::check_writable(&header, path)?;
    if let Some((name, _)) = backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(crate::CreateError::BackingNameLength { len: name.len() }).at(path);
        }
    }
    let hl = header.header_length as usize;
    let (kept, old_ext_end) = other_extensions(&cluster, hl).at(path)?;
    let mut ext = Vec::new();
    if let Some((_, format)) = backing {
        ext.extend(super::header::extension_bytes(
            extension::BACKING_FORMAT,
            format.as_bytes(),
        ));
    }
    ext.extend_from_slice(&kept);
    ext.extend(super::header::extension_bytes(extension::END, &[]));
    let new_ext_end = hl + ext.len();
    let name_len = backing.map_or(0, |(name, _)| name.len());
    if new_ext_end > cluster.len() {
        return Err(no_room(path, name_len));
    }
    let mut prefix = cluster[..hl].to_vec();
    let (name_at, size) = match backing {
        Some(_) => (
            name_place(&header, cluster.len(), old_ext_end, new_ext_end, name_len)
                .ok_or_else(|| no_room(path, name_len))?,
            name_len as u32,
        ),
        None => (0, 0),
    };
    h::BACKING_FILE_OFFSET.set(&mut prefix, name_at);
    h::BACKING_FILE_SIZE.set(&mut prefix, size);
    if ext != cluster[hl..old_ext_end] {
        prefix.extend_from_slice(&ext);
    }
    Ok(Rewrite { name_at, prefix })
}

/// The parsed header and the bytes of the header cluster (as much of it as the file holds).
fn header_cluster(file: &dyn BlockDevice, path: &Path) -> Result<(Header, Vec<u8>)> {
    let file_len = file.size();
    let mut raw = vec![0u8; file_len.min(512) as usize];
    file.read_at(&mut raw, 0).at(path)?;
    let header = Header::parse(&raw, file_len, path)?;
    // Cluster bits are at most 21 (checked by the parse): at most 2 MiB.
    let mut cluster = vec![0u8; header.cluster_size().min(file_len) as usize];
    file.read_at(&mut cluster, 0).at(path)?;
    Ok((header, cluster))
}

/// The header extensions from `start` other than the backing format, as stored, and where the
/// list ends (after its end marker). Every length is checked against the cluster.
fn other_extensions(
    cluster: &[u8],
    start: usize,
) -> std::result::Result<(Vec<u8>, usize), FormatError> {
    let mut kept = Vec::new();
    let mut at = start;
    // Each extension takes at least 8 bytes: the cluster bounds the loop.
    loop {
        if at + extension::DATA > cluster.len() {
            return Err(FormatError::Missing {
                structure: "header extension list",
                item: "end marker inside the header cluster",
            });
        }
        let kind = extension::TYPE.get(&cluster[at..]);
        let len = extension::LENGTH.get(&cluster[at..]) as usize;
        let end = (at + extension::DATA).saturating_add(len.next_multiple_of(8));
        if end > cluster.len() {
            return Err(FormatError::BeyondEnd {
                structure: "header extension",
                offset: at as u64,
                len: len as u64,
            });
        }
        if kind == extension::END {
            return Ok((kept, at + extension::DATA));
        }
        if kind != extension::BACKING_FORMAT {
            kept.extend_from_slice(&cluster[at..end]);
        }
        at = end;
    }
}

/// Where a new name of `len` bytes can go in the header cluster without touching anything the
/// current header uses: after all of it, or else between the new extension list and the old
/// name.
fn name_place(
    header: &Header,
    cluster_len: usize,
    old_ext_end: usize,
    new_ext_end: usize,
    len: usize,
) -> Option<u64> {
    let (old_name, old_end) = match header.backing_file_offset {
        0 => (u64::MAX, 0),
        off => (off, off + u64::from(header.backing_file_size)),
    };
    let used = (old_ext_end.max(new_ext_end) as u64).max(old_end);
    let after = used.next_multiple_of(8);
    if after + len as u64 <= cluster_len as u64 {
        return Some(after);
    }
    let before = (old_ext_end.max(new_ext_end) as u64).next_multiple_of(8);
    (before + len as u64 <= old_name.min(cluster_len as u64)).then_some(before)
}

fn no_room(path: &Path, len: usize) -> ImageError {
    ImageError::Unsupported {
        path: path.to_path_buf(),
        feature: format!(
            "a backing file name of {len} bytes where the header cluster has no free room for it"
        ),
    }
}
