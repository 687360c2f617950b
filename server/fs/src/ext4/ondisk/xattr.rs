//! Extended attributes: a header (4 bytes in the inode, 32 in an xattr block), entries from
//! there on, values elsewhere in the same area at each entry's value offset.

use diskferry_layout::field::Field;

pub const MAGIC_VALUE: u32 = 0xEA02_0000;
/// Both headers begin with the magic.
pub const MAGIC: Field<u32> = Field::at(0);
/// The header in the inode: the magic alone.
pub const IBODY_HEADER_SIZE: usize = 4;
// The block header.
pub const REFCOUNT: Field<u32> = Field::at(0x4);
pub const BLOCKS: Field<u32> = Field::at(0x8);
pub const HASH: Field<u32> = Field::at(0xC);
pub const CHECKSUM: Field<u32> = Field::at(0x10);
pub const BLOCK_HEADER_SIZE: usize = 32;

// An entry.
pub const NAME_LEN: Field<u8> = Field::at(0);
pub const NAME_INDEX: Field<u8> = Field::at(1);
pub const VALUE_OFFS: Field<u16> = Field::at(2);
pub const VALUE_INUM: Field<u32> = Field::at(4);
pub const VALUE_SIZE: Field<u32> = Field::at(8);
pub const ENTRY_HASH: Field<u32> = Field::at(12);
/// The name follows the 16-byte entry header.
pub const NAME: usize = 16;
/// The list ends where an entry would begin with 4 zero bytes.
pub const END: Field<u32> = Field::at(0);

/// Bytes an entry with a name of `name_len` bytes takes (4-byte aligned).
pub const fn entry_len(name_len: usize) -> usize {
    (NAME + name_len).next_multiple_of(4)
}

pub const INDEX_USER: u8 = 1;
pub const INDEX_POSIX_ACL_ACCESS: u8 = 2;
pub const INDEX_POSIX_ACL_DEFAULT: u8 = 3;
pub const INDEX_TRUSTED: u8 = 4;
pub const INDEX_SECURITY: u8 = 6;
pub const INDEX_SYSTEM: u8 = 7;
pub const INDEX_RICHACL: u8 = 8;

/// Namespace index → name prefix; for ACLs and richacl, the whole name.
pub const NAMESPACES: [(u8, &str); 7] = [
    (INDEX_USER, "user."),
    (INDEX_POSIX_ACL_ACCESS, "system.posix_acl_access"),
    (INDEX_POSIX_ACL_DEFAULT, "system.posix_acl_default"),
    (INDEX_TRUSTED, "trusted."),
    (INDEX_SECURITY, "security."),
    (INDEX_SYSTEM, "system."),
    (INDEX_RICHACL, "system.richacl"),
];

/// The name prefix of namespace `index`.
pub fn prefix(index: u8) -> Option<&'static str> {
    NAMESPACES.iter().find(|n| n.0 == index).map(|n| n.1)
}

/// Whether values of namespace `index` are POSIX ACLs.
pub fn is_acl(index: u8) -> bool {
    index == INDEX_POSIX_ACL_ACCESS || index == INDEX_POSIX_ACL_DEFAULT
}
