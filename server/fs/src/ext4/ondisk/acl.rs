//! POSIX ACL values: a version word, then entries of tag, permissions and (in the VFS form
//! always, in ext4's only for named users and groups) an id.

use diskferry_layout::field::Field;

pub const VERSION: Field<u32> = Field::at(0);
pub const HEADER_SIZE: usize = 4;
/// ext4's compact form, and the form the VFS (getxattr/setxattr) uses.
pub const EXT4_VERSION: u32 = 1;
pub const VFS_VERSION: u32 = 2;

// An entry.
pub const TAG: Field<u16> = Field::at(0);
pub const PERM: Field<u16> = Field::at(2);
pub const ID: Field<u32> = Field::at(4);
pub const SHORT_ENTRY: usize = 4;
pub const FULL_ENTRY: usize = 8;
/// The id of entries without one, in the VFS form.
pub const UNDEFINED_ID: u32 = u32::MAX;

pub const TAG_USER: u16 = 0x02;
pub const TAG_GROUP: u16 = 0x08;

/// Whether entries with this tag carry an id (named users and groups).
pub fn has_id(tag: u16) -> bool {
    tag == TAG_USER || tag == TAG_GROUP
}
