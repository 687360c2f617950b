//! Directory blocks: entries packed in order, each block ending in its checksum tail; a
//! directory that needs more than one block is hashed instead ([`super::htree`]).

use super::super::super::FileKind;
use super::super::ondisk::dirent;
use super::{csum, htree};

/// An entry to write: name, inode, kind.
pub(super) type Entry = (Vec<u8>, u32, FileKind);

/// Packs entries — (name, inode, file type) — in order into blocks of `bs` bytes that end in
/// a checksum tail (seeded with `inode_seed`), the last entry of each block stretched to the
/// tail. `on_block_start` learns the index of each block's first entry.
pub(super) fn pack<'a>(
    entries: impl IntoIterator<Item = (&'a [u8], u32, u8)>,
    bs: usize,
    inode_seed: u32,
    mut on_block_start: impl FnMut(usize),
) -> Vec<Vec<u8>> {
    let usable = bs - dirent::TAIL_SIZE;
    let mut blocks = Vec::new();
    let mut b = vec![0u8; bs];
    let mut at = 0usize;
    let mut last = 0usize;
    for (i, (name, ino, ft)) in entries.into_iter().enumerate() {
        let len = dirent::rec_len(name.len());
        if at + len > usable {
            close(&mut b, last, usable, inode_seed);
            blocks.push(std::mem::replace(&mut b, vec![0u8; bs]));
            at = 0;
        }
        if at == 0 {
            on_block_start(i);
        }
        dirent::put(&mut b[at..], ino, len, name, ft);
        last = at;
        at += len;
    }
    close(&mut b, last, usable, inode_seed);
    blocks.push(b);
    blocks
}

/// Stretches the entry at `last` to the tail at `usable` and sets the tail's checksum.
fn close(b: &mut [u8], last: usize, usable: usize, inode_seed: u32) {
    dirent::REC_LEN.set(&mut b[last..], (usable - last) as u16);
    csum::set_dir_tail(inode_seed, b);
}

/// Linear directory blocks for `entries` (with `.` and `..` first).
pub(super) fn linear_blocks(entries: &[Entry], bs: usize, inode_seed: u32) -> Vec<Vec<u8>> {
    pack(
        entries
            .iter()
            .map(|(n, i, k)| (n.as_slice(), *i, dirent::file_type(*k))),
        bs,
        inode_seed,
        |_| {},
    )
}

/// How a directory's blocks are organized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// One block, read linearly.
    Linear,
    /// A hash index (htree) over leaf blocks.
    Indexed,
    /// Linear blocks, too many for two index levels.
    TooLargeToIndex,
}

/// The blocks of directory `ino` (parent `parent`) holding `entries` (without `.` and `..`):
/// one linear block when they fit, a hash index otherwise.
pub(super) fn directory_blocks(
    ino: u32,
    parent: u32,
    entries: &[Entry],
    bs: usize,
    inode_seed: u32,
    key: htree::HashKey,
) -> (Vec<Vec<u8>>, Shape) {
    let mut all = vec![
        (b".".to_vec(), ino, FileKind::Dir),
        (b"..".to_vec(), parent, FileKind::Dir),
    ];
    all.extend(entries.iter().cloned());
    let blocks = linear_blocks(&all, bs, inode_seed);
    if blocks.len() == 1 {
        return (blocks, Shape::Linear);
    }
    let typed: Vec<htree::DirEntry> = entries
        .iter()
        .map(|(n, i, k)| (n.clone(), *i, dirent::file_type(*k)))
        .collect();
    match htree::indexed_dir(ino, parent, &typed, bs, inode_seed, key) {
        Some(indexed) => (indexed, Shape::Indexed),
        None => (blocks, Shape::TooLargeToIndex),
    }
}
