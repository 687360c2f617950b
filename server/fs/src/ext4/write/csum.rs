//! ext4's metadata checksums: CRC32C as the kernel computes it (no final inversion, any seed),
//! seeded per filesystem from the UUID and per inode from its number and generation.

use super::super::ondisk::{dirent, extent, gd, inode, sb, xattr};

/// The kernel's `crc32c_le(seed, data)`: CRC32C without the final inversion.
pub fn crc32c_le(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The filesystem seed: `crc32c_le(~0, uuid)`.
pub fn fs_seed(uuid: &[u8; 16]) -> u32 {
    crc32c_le(!0, uuid)
}

/// The per-inode seed used by directory blocks, extent blocks and the inode itself.
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    let c = crc32c_le(fs_seed, &ino.to_le_bytes());
    crc32c_le(c, &generation.to_le_bytes())
}

/// Sets an inode's checksum (the high half too when the extra fields reach it); `raw` is the
/// whole on-disk inode.
pub fn set_inode(fs_seed: u32, ino: u32, raw: &mut [u8]) {
    let generation = inode::GENERATION.get(raw);
    let has_hi = raw.len() > inode::GOOD_OLD_SIZE
        && inode::CHECKSUM_HI.end()
            <= inode::GOOD_OLD_SIZE + usize::from(inode::EXTRA_ISIZE.get(raw));
    inode::CHECKSUM_LO.set(raw, 0);
    if has_hi {
        inode::CHECKSUM_HI.set(raw, 0);
    }
    let c = crc32c_le(inode_seed(fs_seed, ino, generation), raw);
    inode::CHECKSUM_LO.set(raw, c as u16);
    if has_hi {
        inode::CHECKSUM_HI.set(raw, (c >> 16) as u16);
    }
}

/// Sets the 12-byte checksum tail of a directory block.
pub fn set_dir_tail(inode_seed: u32, block: &mut [u8]) {
    let at = block.len() - dirent::TAIL_SIZE;
    let c = crc32c_le(inode_seed, &block[..at]);
    let tail = &mut block[at..];
    dirent::INODE.set(tail, 0);
    dirent::REC_LEN.set(tail, dirent::TAIL_SIZE as u16);
    dirent::NAME_LEN.set(tail, 0);
    dirent::FILE_TYPE.set(tail, dirent::TAIL_FILE_TYPE);
    dirent::TAIL_CHECKSUM.set(tail, c);
}

/// Sets the checksum after an extent block's `max` entries.
pub fn set_extent_tail(inode_seed: u32, block: &mut [u8]) {
    let tail = extent::tail(usize::from(extent::MAX.get(block)));
    let c = crc32c_le(inode_seed, &block[..tail.offset]);
    tail.set(block, c);
}

/// A group descriptor's 16-bit checksum (taken as zero while computed).
pub fn set_group_desc(fs_seed: u32, group: u32, desc: &mut [u8]) {
    gd::CHECKSUM.set(desc, 0);
    let c = crc32c_le(fs_seed, &group.to_le_bytes());
    let c = crc32c_le(c, desc);
    gd::CHECKSUM.set(desc, c as u16);
}

/// An xattr block's checksum, seeded with its block number.
pub fn set_xattr_block(fs_seed: u32, block_nr: u64, block: &mut [u8]) {
    xattr::CHECKSUM.set(block, 0);
    let c = crc32c_le(fs_seed, &block_nr.to_le_bytes());
    let c = crc32c_le(c, block);
    xattr::CHECKSUM.set(block, c);
}

/// The superblock's checksum, over everything before it.
pub fn set_superblock(raw: &mut [u8]) {
    let c = crc32c_le(!0, &raw[..sb::CHECKSUM.offset]);
    sb::CHECKSUM.set(raw, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_crc32c_relates_to_the_standard_one() {
        // The standard CRC32C of "123456789" is 0xE3069283; the kernel form with seed ~0
        // is its inversion.
        assert_eq!(crc32c_le(!0, b"123456789"), !0xE306_9283);
        // Chaining equals one pass.
        assert_eq!(
            crc32c_le(crc32c_le(7, b"1234"), b"56789"),
            crc32c_le(7, b"123456789")
        );
    }
}
