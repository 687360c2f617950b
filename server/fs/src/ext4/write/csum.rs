//! ext4's metadata checksums: CRC32C as the kernel computes it (no final inversion, any seed),
//! seeded per filesystem from the UUID and per inode from its number and generation.

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

/// Sets an inode's checksum (low half at 0x7C, high half at 0x82 when the extra fields
/// reach it); `raw` is the whole on-disk inode.
pub fn set_inode(fs_seed: u32, ino: u32, raw: &mut [u8]) {
    let generation = u32::from_le_bytes([raw[100], raw[101], raw[102], raw[103]]);
    let has_hi = raw.len() > 128 && u16::from_le_bytes([raw[128], raw[129]]) >= 4;
    raw[0x7C..0x7E].fill(0);
    if has_hi {
        raw[0x82..0x84].fill(0);
    }
    let c = crc32c_le(inode_seed(fs_seed, ino, generation), raw);
    raw[0x7C..0x7E].copy_from_slice(&(c as u16).to_le_bytes());
    if has_hi {
        raw[0x82..0x84].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
    }
}

/// Sets the 12-byte checksum tail of a directory block.
pub fn set_dir_tail(inode_seed: u32, block: &mut [u8]) {
    let n = block.len();
    let t = &mut block[n - 12..];
    t[..4].fill(0);
    t[4..6].copy_from_slice(&12u16.to_le_bytes());
    t[6] = 0;
    t[7] = 0xDE;
    let c = crc32c_le(inode_seed, &block[..n - 12]);
    block[n - 4..].copy_from_slice(&c.to_le_bytes());
}

/// Sets the checksum after an extent block's `max` entries.
pub fn set_extent_tail(inode_seed: u32, block: &mut [u8]) {
    let max = usize::from(u16::from_le_bytes([block[4], block[5]]));
    let at = 12 + 12 * max;
    let c = crc32c_le(inode_seed, &block[..at]);
    block[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// A group descriptor's 16-bit checksum (field at 0x1E, taken as zero).
pub fn set_group_desc(fs_seed: u32, group: u32, desc: &mut [u8]) {
    desc[0x1E..0x20].fill(0);
    let c = crc32c_le(fs_seed, &group.to_le_bytes());
    let c = crc32c_le(c, desc);
    desc[0x1E..0x20].copy_from_slice(&(c as u16).to_le_bytes());
}

/// An xattr block's checksum (field at 16), seeded with its block number.
pub fn set_xattr_block(fs_seed: u32, block_nr: u64, block: &mut [u8]) {
    block[16..20].fill(0);
    let c = crc32c_le(fs_seed, &block_nr.to_le_bytes());
    let c = crc32c_le(c, block);
    block[16..20].copy_from_slice(&c.to_le_bytes());
}

/// The superblock's checksum (field at 0x3FC).
pub fn set_superblock(sb: &mut [u8]) {
    let c = crc32c_le(!0, &sb[..0x3FC]);
    sb[0x3FC..0x400].copy_from_slice(&c.to_le_bytes());
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
