//! ext2/3/4 inodes: the fixed fields, nanosecond timestamps, where the data lives (extent
//! trees or the classic block map), and extended attributes stored in the inode.

use super::super::{FileKind, Timestamp};
pub(super) use diskferry_layout::le::{le16, le32};

pub const EXTENTS_FL: u32 = 0x0008_0000;
pub const INLINE_DATA_FL: u32 = 0x1000_0000;
pub const HUGE_FILE_FL: u32 = 0x0004_0000;

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
    pub fn parse(raw: Vec<u8>) -> Result<Inode, String> {
        if raw.len() < 128 {
            return Err(format!("inode of {} bytes is too short", raw.len()));
        }
        let extra_isize = if raw.len() > 128 {
            le16(&raw, 128) as usize
        } else {
            0
        };
        if 128 + extra_isize > raw.len() || extra_isize % 4 != 0 {
            return Err(format!("extra inode size {extra_isize} is out of range"));
        }
        Ok(Inode {
            mode: le16(&raw, 0),
            flags: le32(&raw, 32),
            size: u64::from(le32(&raw, 4)) | (u64::from(le32(&raw, 108)) << 32),
            links: le16(&raw, 26),
            file_acl: u64::from(le32(&raw, 104)) | (u64::from(le16(&raw, 118)) << 32),
            blocks: u64::from(le32(&raw, 28)) | (u64::from(le16(&raw, 116)) << 32),
            extra_isize,
            raw,
        })
    }

    pub fn kind(&self) -> Option<FileKind> {
        Some(match self.mode & 0xF000 {
            0x8000 => FileKind::File,
            0x4000 => FileKind::Dir,
            0xA000 => FileKind::Symlink,
            0x2000 => FileKind::CharDevice,
            0x6000 => FileKind::BlockDevice,
            0x1000 => FileKind::Fifo,
            0xC000 => FileKind::Socket,
            _ => return None,
        })
    }

    pub fn uid(&self) -> u32 {
        u32::from(le16(&self.raw, 2)) | (u32::from(le16(&self.raw, 120)) << 16)
    }

    pub fn gid(&self) -> u32 {
        u32::from(le16(&self.raw, 24)) | (u32::from(le16(&self.raw, 122)) << 16)
    }

    /// Whether the extra fields include the 4-byte field at `at` (offset from the inode start).
    fn has_extra(&self, at: usize) -> bool {
        at + 4 <= 128 + self.extra_isize
    }

    /// A timestamp: 32-bit signed seconds at `base`, extended by the `extra` field's two epoch
    /// bits and 30 nanosecond bits when the inode is large enough to have it.
    fn time(&self, base: usize, extra: usize) -> Timestamp {
        let secs = i64::from(le32(&self.raw, base) as i32);
        if !self.has_extra(extra) {
            return Timestamp { secs, nanos: 0 };
        }
        let e = le32(&self.raw, extra);
        Timestamp {
            secs: secs + (i64::from(e & 3) << 32),
            nanos: (e >> 2).min(999_999_999),
        }
    }

    pub fn atime(&self) -> Timestamp {
        self.time(8, 140)
    }
    pub fn ctime(&self) -> Timestamp {
        self.time(12, 132)
    }
    pub fn mtime(&self) -> Timestamp {
        self.time(16, 136)
    }
    pub fn crtime(&self) -> Option<Timestamp> {
        self.has_extra(148).then(|| self.time(144, 148))
    }

    /// The 60-byte `i_block` area (extent tree root, block map, or fast symlink target).
    pub fn i_block(&self) -> &[u8] {
        &self.raw[40..100]
    }

    /// (major, minor) of a device node, from either encoding the kernel uses.
    pub fn device(&self) -> (u32, u32) {
        let b = self.i_block();
        let old = le32(b, 0);
        if old != 0 {
            ((old >> 8) & 0xFF, old & 0xFF)
        } else {
            let new = le32(b, 4);
            ((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))
        }
    }

    /// Extended attribute entries stored inside the inode after the extra fields.
    pub fn inline_xattr_area(&self) -> Option<&[u8]> {
        let start = 128 + self.extra_isize;
        if self.raw.len() < start + 4 || le32(&self.raw, start) != XATTR_MAGIC {
            return None;
        }
        Some(&self.raw[start + 4..])
    }
}

pub const XATTR_MAGIC: u32 = 0xEA02_0000;

/// Parses xattr entries from `entries` (which starts at the first entry), taking values from
/// `values` at each entry's value offset. A malformed entry ends the list with an error.
pub fn parse_xattrs(entries: &[u8], values: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= entries.len() && le32(entries, at) != 0 {
        let name_len = usize::from(entries[at]);
        let index = entries[at + 1];
        let value_offs = usize::from(le16(entries, at + 2));
        let value_inum = le32(entries, at + 4);
        let value_size = le32(entries, at + 8) as usize;
        if at + 16 + name_len > entries.len() {
            return Err("an extended attribute name runs past its block".into());
        }
        if value_inum != 0 {
            return Err(
                "extended attributes stored in their own inodes (ea_inode) are not supported"
                    .into(),
            );
        }
        if value_offs.saturating_add(value_size) > values.len() {
            return Err("an extended attribute value lies outside its block".into());
        }
        let prefix = match index {
            1 => "user.",
            2 => "system.posix_acl_access",
            3 => "system.posix_acl_default",
            4 => "trusted.",
            6 => "security.",
            7 => "system.",
            8 => "system.richacl",
            _ => return Err(format!("unknown extended attribute namespace {index}")),
        };
        let name = format!(
            "{prefix}{}",
            String::from_utf8_lossy(&entries[at + 16..at + 16 + name_len])
        );
        let mut value = values[value_offs..value_offs + value_size].to_vec();
        if index == 2 || index == 3 {
            value = acl_to_xattr(&value)?;
        }
        out.push((name, value));
        at += (16 + name_len).next_multiple_of(4);
    }
    Ok(out)
}

/// ext4 stores POSIX ACLs compactly (version 1; no id for the owner/group/mask/other
/// entries); tools see the VFS form (version 2; every entry 8 bytes). Converts the former to
/// the latter, as the kernel does for getxattr.
fn acl_to_xattr(v: &[u8]) -> Result<Vec<u8>, String> {
    if v.len() < 4 || le32(v, 0) != 1 {
        return Err("a POSIX ACL is not in ext4's version 1 format".into());
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut at = 4;
    while at < v.len() {
        if at + 4 > v.len() {
            return Err("a POSIX ACL entry is truncated".into());
        }
        let tag = le16(v, at);
        let (id, len) = match tag {
            0x02 | 0x08 => {
                if at + 8 > v.len() {
                    return Err("a POSIX ACL entry is truncated".into());
                }
                (le32(v, at + 4), 8)
            }
            _ => (u32::MAX, 4),
        };
        out.extend_from_slice(&v[at..at + 4]);
        out.extend_from_slice(&id.to_le_bytes());
        at += len;
    }
    Ok(out)
}

/// One leaf extent: logical block, physical block, block count, unwritten.
#[derive(Debug, Clone, Copy)]
pub struct RawExtent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub unwritten: bool,
}

/// An extent tree node's header: (entries, depth), checked against the node's size.
pub fn extent_header(node: &[u8]) -> Result<(usize, u16), String> {
    if node.len() < 12 || le16(node, 0) != 0xF30A {
        return Err("extent tree node has no magic".into());
    }
    let (entries, max, depth) = (
        usize::from(le16(node, 2)),
        usize::from(le16(node, 4)),
        le16(node, 6),
    );
    if entries > max || 12 + max * 12 > node.len() || depth > 5 {
        return Err(format!(
            "extent tree node claims {entries}/{max} entries at depth {depth}"
        ));
    }
    Ok((entries, depth))
}
