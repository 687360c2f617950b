//! Directory entries (`ext4_dir_entry_2`): inode, record length, name length, file type, name.
//! The last 12 bytes of each leaf block are a fake entry holding the block's checksum.

use super::super::super::FileKind;
use diskferry_layout::field::Field;

pub const INODE: Field<u32> = Field::at(0);
pub const REC_LEN: Field<u16> = Field::at(4);
pub const NAME_LEN: Field<u8> = Field::at(6);
pub const FILE_TYPE: Field<u8> = Field::at(7);
/// The name follows the 8-byte header.
pub const NAME: usize = 8;
pub const MAX_NAME_LEN: usize = 255;

/// A record length as stored: with 64 KiB blocks, which a 16-bit length cannot span, 0 and
/// 65535 mean the whole block and the low two bits carry bits 16–17.
pub fn rec_len_from_disk(raw: u16, block_size: u64) -> usize {
    let len = usize::from(raw);
    if block_size < 65536 {
        len
    } else if raw == u16::MAX || raw == 0 {
        block_size as usize
    } else {
        (len & 65532) | ((len & 3) << 16)
    }
}

/// The checksum tail: an entry of inode 0, record length 12, file type 0xDE, then the
/// checksum.
pub const TAIL_SIZE: usize = 12;
pub const TAIL_FILE_TYPE: u8 = 0xDE;
pub const TAIL_CHECKSUM: Field<u32> = Field::at(8);

/// Bytes an entry with a name of `name_len` bytes takes (4-byte aligned).
pub const fn rec_len(name_len: usize) -> usize {
    (NAME + name_len).next_multiple_of(4)
}

/// Writes an entry at the start of `b`.
pub fn put(b: &mut [u8], inode: u32, rec_len: usize, name: &[u8], file_type: u8) {
    INODE.set(b, inode);
    REC_LEN.set(b, rec_len as u16);
    NAME_LEN.set(b, name.len() as u8);
    FILE_TYPE.set(b, file_type);
    b[NAME..NAME + name.len()].copy_from_slice(name);
}

const TYPES: [(u8, FileKind); 7] = [
    (1, FileKind::File),
    (2, FileKind::Dir),
    (3, FileKind::CharDevice),
    (4, FileKind::BlockDevice),
    (5, FileKind::Fifo),
    (6, FileKind::Socket),
    (7, FileKind::Symlink),
];

/// The file type an entry records, if any (ext2 without `filetype` records none).
pub fn kind_of(file_type: u8) -> Option<FileKind> {
    TYPES.iter().find(|t| t.0 == file_type).map(|t| t.1)
}

pub fn file_type(kind: FileKind) -> u8 {
    TYPES.iter().find(|t| t.1 == kind).map_or(0, |t| t.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lengths_of_64k_blocks_carry_two_more_bits() {
        assert_eq!(rec_len_from_disk(12, 4096), 12);
        assert_eq!(rec_len_from_disk(0, 65536), 65536);
        assert_eq!(rec_len_from_disk(u16::MAX, 65536), 65536);
        assert_eq!(rec_len_from_disk(0xFFF4 | 1, 65536), 0x1FFF4);
        assert_eq!(rec_len_from_disk(40, 65536), 40);
    }
}
