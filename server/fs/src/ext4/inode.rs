//! ext2/3/4 inodes: the fixed fields, nanosecond timestamps, the `i_block` area, and extended
//! attributes (stored in the inode or in an xattr block, values of `ea_inode` volumes possibly
//! in inodes of their own), POSIX ACLs given in the form tools see.

use super::super::{read_full, FileKind, Result, Timestamp};
use super::error::Corruption;
use super::ondisk::{acl, inode, xattr};
use super::Ext4;

/// The largest extended attribute value (the kernel's `XATTR_SIZE_MAX`).
const MAX_XATTR_VALUE: u64 = 65536;

/// An extended attribute's value as its entry gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrValue {
    /// The value itself, in the form tools see.
    Here(Vec<u8>),
    /// `ea_inode`: the value is the data of an inode of its own.
    InInode { inode: u64, size: u64, acl: bool },
}

/// An inode's raw bytes (the on-disk inode size) and what we read from them.
pub struct Inode {
    pub raw: Vec<u8>,
    pub mode: u16,
    pub flags: u32,
    pub size: u64,
    pub links: u16,
    pub file_acl: u64,
    /// 512-byte sectors, or filesystem blocks with HUGE_FILE_FL.
    pub blocks: u64,
    pub extra_isize: usize,
}

impl Inode {
    pub fn parse(raw: Vec<u8>) -> Result<Inode, Corruption> {
        if raw.len() < inode::GOOD_OLD_SIZE {
            return Err(Corruption::InodeTooShort { len: raw.len() });
        }
        let extra_isize = if raw.len() > inode::GOOD_OLD_SIZE {
            usize::from(inode::EXTRA_ISIZE.get(&raw))
        } else {
            0
        };
        if inode::GOOD_OLD_SIZE + extra_isize > raw.len() || extra_isize % 4 != 0 {
            return Err(Corruption::ExtraIsize { extra_isize });
        }
        Ok(Inode {
            mode: inode::MODE.get(&raw),
            flags: inode::FLAGS.get(&raw),
            size: inode::SIZE.get(&raw),
            links: inode::LINKS_COUNT.get(&raw),
            file_acl: inode::FILE_ACL.get(&raw),
            blocks: inode::BLOCKS.get(&raw),
            extra_isize,
            raw,
        })
    }

    pub fn kind(&self) -> Option<FileKind> {
        inode::kind_of_mode(self.mode)
    }

    pub fn uid(&self) -> u32 {
        inode::UID.get(&self.raw)
    }

    pub fn gid(&self) -> u32 {
        inode::GID.get(&self.raw)
    }

    /// Where the extra fields end.
    fn extra_end(&self) -> usize {
        inode::GOOD_OLD_SIZE + self.extra_isize
    }

    pub fn atime(&self) -> Timestamp {
        inode::ATIME.get(&self.raw, self.extra_end())
    }
    pub fn ctime(&self) -> Timestamp {
        inode::CTIME.get(&self.raw, self.extra_end())
    }
    pub fn mtime(&self) -> Timestamp {
        inode::MTIME.get(&self.raw, self.extra_end())
    }
    /// The creation time, which only inodes with room for it have.
    pub fn crtime(&self) -> Option<Timestamp> {
        (inode::CRTIME.extra.end() <= self.extra_end())
            .then(|| inode::CRTIME.get(&self.raw, self.extra_end()))
    }

    /// Whether the inode keeps its data in itself (inline data) rather than in blocks.
    pub fn has_inline_data(&self) -> bool {
        self.flags & inode::INLINE_DATA_FL != 0
    }

    /// The 60-byte `i_block` area (extent tree root, block map, or fast symlink target).
    pub fn i_block(&self) -> &[u8] {
        &self.raw[inode::I_BLOCK.offset..][..inode::I_BLOCK_LEN]
    }

    /// (major, minor) of a device node, from either encoding the kernel uses.
    pub fn device(&self) -> (u32, u32) {
        inode::device(self.i_block())
    }

    /// Extended attribute entries stored inside the inode after the extra fields.
    pub fn inline_xattr_area(&self) -> Option<&[u8]> {
        let start = self.extra_end();
        let header = self.raw.get(start..start + xattr::IBODY_HEADER_SIZE)?;
        (xattr::MAGIC.get(header) == xattr::MAGIC_VALUE)
            .then(|| &self.raw[start + xattr::IBODY_HEADER_SIZE..])
    }
}

/// Parses xattr entries from `entries` (which starts at the first entry), taking values from
/// `values` at each entry's value offset. A malformed entry ends the list with an error.
pub fn parse_xattrs(
    entries: &[u8],
    values: &[u8],
) -> Result<Vec<(String, XattrValue)>, Corruption> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + xattr::NAME <= entries.len() && xattr::END.get(&entries[at..]) != 0 {
        let e = &entries[at..];
        let name_len = usize::from(xattr::NAME_LEN.get(e));
        let index = xattr::NAME_INDEX.get(e);
        let value_offs = usize::from(xattr::VALUE_OFFS.get(e));
        let value_size = xattr::VALUE_SIZE.get(e) as usize;
        if xattr::NAME + name_len > e.len() {
            return Err(Corruption::XattrName { offset: at });
        }
        let value_inum = u64::from(xattr::VALUE_INUM.get(e));
        if value_inum == 0 && value_offs.saturating_add(value_size) > values.len() {
            return Err(Corruption::XattrValue { offset: at });
        }
        let prefix = xattr::prefix(index).ok_or(Corruption::XattrNamespace { index })?;
        let name = format!(
            "{prefix}{}",
            String::from_utf8_lossy(&e[xattr::NAME..xattr::NAME + name_len])
        );
        let value = if value_inum != 0 {
            XattrValue::InInode {
                inode: value_inum,
                size: value_size as u64,
                acl: xattr::is_acl(index),
            }
        } else if xattr::is_acl(index) {
            XattrValue::Here(acl_to_xattr(&values[value_offs..value_offs + value_size])?)
        } else {
            XattrValue::Here(values[value_offs..value_offs + value_size].to_vec())
        };
        out.push((name, value));
        at += xattr::entry_len(name_len);
    }
    Ok(out)
}

impl Ext4 {
    /// An attribute's value, read from its own inode for `ea_inode` (which must be one: an
    /// inode flagged as holding a value, of the value's size).
    pub(super) fn xattr_value(&self, node: u64, value: XattrValue) -> Result<Vec<u8>> {
        let (inode, size, acl) = match value {
            XattrValue::Here(v) => return Ok(v),
            XattrValue::InInode { inode, size, acl } => (inode, size, acl),
        };
        let holder = self.inode(inode)?;
        if size > MAX_XATTR_VALUE || holder.flags & inode::EA_INODE_FL == 0 || holder.size != size {
            return Err(Corruption::XattrInode { inode }.in_inode(node));
        }
        let mut v = vec![0u8; size as usize];
        let n = read_full(self, inode, 0, &mut v)?;
        v.truncate(n);
        if acl {
            v = acl_to_xattr(&v).map_err(|e| e.in_inode(node))?;
        }
        Ok(v)
    }
}

/// ext4 stores POSIX ACLs compactly (version 1; no id for the owner/group/mask/other
/// entries); tools see the VFS form (version 2; every entry 8 bytes). Converts the former to
/// the latter, as the kernel does for getxattr.
fn acl_to_xattr(v: &[u8]) -> Result<Vec<u8>, Corruption> {
    if v.len() < acl::HEADER_SIZE || acl::VERSION.get(v) != acl::EXT4_VERSION {
        return Err(Corruption::AclVersion);
    }
    let mut out = vec![0u8; acl::HEADER_SIZE];
    acl::VERSION.set(&mut out, acl::VFS_VERSION);
    let mut at = acl::HEADER_SIZE;
    while at < v.len() {
        let e = &v[at..];
        if e.len() < acl::SHORT_ENTRY {
            return Err(Corruption::AclTruncated { offset: at });
        }
        let tag = acl::TAG.get(e);
        let (id, len) = if acl::has_id(tag) {
            if e.len() < acl::FULL_ENTRY {
                return Err(Corruption::AclTruncated { offset: at });
            }
            (acl::ID.get(e), acl::FULL_ENTRY)
        } else {
            (acl::UNDEFINED_ID, acl::SHORT_ENTRY)
        };
        let mut full = [0u8; acl::FULL_ENTRY];
        full[..acl::SHORT_ENTRY].copy_from_slice(&e[..acl::SHORT_ENTRY]);
        acl::ID.set(&mut full, id);
        out.extend_from_slice(&full);
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_inode() -> Vec<u8> {
        let mut raw = vec![0u8; 256];
        inode::MODE.set(&mut raw, inode::mode_type(FileKind::File) | 0o640);
        inode::EXTRA_ISIZE.set(&mut raw, 32);
        inode::UID.set(&mut raw, 70_000);
        inode::SIZE.set(&mut raw, 5 << 32);
        raw
    }

    #[test]
    fn inodes_parse_and_refuse_bad_extra_sizes() {
        let ino = Inode::parse(raw_inode()).unwrap();
        assert_eq!(ino.kind(), Some(FileKind::File));
        assert_eq!((ino.uid(), ino.size), (70_000, 5 << 32));
        assert!(ino.crtime().is_some());
        let mut raw = raw_inode();
        inode::EXTRA_ISIZE.set(&mut raw, 6);
        assert_eq!(
            Inode::parse(raw).err(),
            Some(Corruption::ExtraIsize { extra_isize: 6 })
        );
        assert_eq!(
            Inode::parse(vec![0; 100]).err(),
            Some(Corruption::InodeTooShort { len: 100 })
        );
    }

    #[test]
    fn malformed_attributes_say_where() {
        let mut area = vec![0u8; 64];
        xattr::NAME_LEN.set(&mut area, 1);
        xattr::NAME_INDEX.set(&mut area, 1);
        xattr::VALUE_OFFS.set(&mut area, 60);
        xattr::VALUE_SIZE.set(&mut area, 8);
        assert_eq!(
            parse_xattrs(&area, &area).err(),
            Some(Corruption::XattrValue { offset: 0 })
        );
        xattr::VALUE_SIZE.set(&mut area, 4);
        xattr::NAME_INDEX.set(&mut area, 5);
        assert_eq!(
            parse_xattrs(&area, &area).err(),
            Some(Corruption::XattrNamespace { index: 5 })
        );
        // A truncated ACL: a named user entry cut after its tag and permissions.
        let mut acl_value = vec![0u8; 8];
        acl::VERSION.set(&mut acl_value, acl::EXT4_VERSION);
        acl::TAG.set(&mut acl_value[acl::HEADER_SIZE..], acl::TAG_USER);
        assert_eq!(
            acl_to_xattr(&acl_value).err(),
            Some(Corruption::AclTruncated { offset: 4 })
        );
    }
}
