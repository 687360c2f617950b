//! Encoding extended attributes the way ext4 stores them: names split into a namespace index
//! and a suffix, POSIX ACLs converted from the VFS form to ext4's compact one, entry and block
//! hashes, and the two places they live — inside the inode after its extra fields, or in one
//! xattr block of their own.

use super::super::ondisk::{acl, dirent, xattr};

/// One attribute as stored: namespace index, name suffix, value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Why an attribute cannot be stored in ext4.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    #[error("ext4 has no namespace for the attribute {name}")]
    NoNamespace { name: String },
    #[error("attribute name {name} is longer than 255 bytes")]
    NameTooLong { name: String },
    #[error("{name}: a POSIX ACL is not in the VFS version 2 form")]
    NotAnAcl { name: String },
}

/// ext4's namespace index for a full name, and the rest of the name. ACLs and richacl are
/// whole names; other `system.` attributes are ext4's own business (inline data) and have no
/// place in a copy.
fn namespace(full: &str) -> Option<(u8, &str)> {
    xattr::NAMESPACES.iter().find_map(|&(index, prefix)| {
        if prefix.ends_with('.') {
            (index != xattr::INDEX_SYSTEM)
                .then(|| full.strip_prefix(prefix))
                .flatten()
                .map(|rest| (index, rest))
        } else {
            (full == prefix).then_some((index, ""))
        }
    })
}

/// Splits a full name into ext4's namespace index and the rest, converting POSIX ACLs to
/// ext4's form.
pub fn split(full: &str, value: &[u8]) -> Result<Attr, AttrError> {
    let (index, name) = namespace(full).ok_or_else(|| AttrError::NoNamespace {
        name: full.to_string(),
    })?;
    if name.len() > dirent::MAX_NAME_LEN {
        return Err(AttrError::NameTooLong {
            name: full.to_string(),
        });
    }
    let value = if xattr::is_acl(index) {
        acl_to_ext4(value).ok_or_else(|| AttrError::NotAnAcl {
            name: full.to_string(),
        })?
    } else {
        value.to_vec()
    };
    Ok(Attr {
        index,
        name: name.as_bytes().to_vec(),
        value,
    })
}

/// A POSIX ACL in the VFS form (version 2, 8 bytes per entry) in ext4's form (version 1; no
/// id for the owner, owning group, mask and other entries); `None` when it is not in the VFS
/// form.
fn acl_to_ext4(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < acl::HEADER_SIZE
        || acl::VERSION.get(v) != acl::VFS_VERSION
        || !(v.len() - acl::HEADER_SIZE).is_multiple_of(acl::FULL_ENTRY)
    {
        return None;
    }
    let mut out = vec![0u8; acl::HEADER_SIZE];
    acl::VERSION.set(&mut out, acl::EXT4_VERSION);
    for e in v[acl::HEADER_SIZE..].chunks_exact(acl::FULL_ENTRY) {
        let len = if acl::has_id(acl::TAG.get(e)) {
            acl::FULL_ENTRY
        } else {
            acl::SHORT_ENTRY
        };
        out.extend_from_slice(&e[..len]);
    }
    Some(out)
}

/// The entry hash e2fsprogs and the kernel compute (unsigned name bytes).
pub fn entry_hash(a: &Attr) -> u32 {
    let mut hash = 0u32;
    for &c in &a.name {
        hash = (hash << 5) ^ (hash >> 27) ^ u32::from(c);
    }
    let mut padded = a.value.clone();
    padded.resize(a.value.len().next_multiple_of(4), 0);
    for w in padded.chunks_exact(4) {
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    hash
}

/// Lays out entries from `entries_at` and values from `end` downward inside `area`; value
/// offsets are relative to `base`. `None` when they do not fit.
fn lay_out(area: &mut [u8], entries_at: usize, base: usize, attrs: &[Attr]) -> Option<Vec<u32>> {
    let mut at = entries_at;
    let mut value_end = area.len();
    let mut hashes = Vec::new();
    for a in attrs {
        let vlen = a.value.len().next_multiple_of(4);
        let elen = xattr::entry_len(a.name.len());
        // Room for the entry and the end marker before the values.
        if at + elen + xattr::END.end() > value_end.checked_sub(vlen)? {
            return None;
        }
        value_end -= vlen;
        area[value_end..value_end + a.value.len()].copy_from_slice(&a.value);
        let h = entry_hash(a);
        let e = &mut area[at..at + elen];
        xattr::NAME_LEN.set(e, a.name.len() as u8);
        xattr::NAME_INDEX.set(e, a.index);
        let offs = if a.value.is_empty() {
            0
        } else {
            value_end - base
        };
        xattr::VALUE_OFFS.set(e, offs as u16);
        xattr::VALUE_SIZE.set(e, a.value.len() as u32);
        xattr::ENTRY_HASH.set(e, h);
        e[xattr::NAME..xattr::NAME + a.name.len()].copy_from_slice(&a.name);
        hashes.push(h);
        at += elen;
    }
    Some(hashes)
}

/// Stores `attrs` in the inode's space after its extra fields (`area`, which begins with the
/// magic); false when they do not fit.
pub fn write_inline(area: &mut [u8], attrs: &[Attr]) -> bool {
    if attrs.is_empty() {
        return true;
    }
    let mut tmp = vec![0u8; area.len()];
    xattr::MAGIC.set(&mut tmp, xattr::MAGIC_VALUE);
    let header = xattr::IBODY_HEADER_SIZE;
    if lay_out(&mut tmp, header, header, attrs).is_none() {
        return false;
    }
    area.copy_from_slice(&tmp);
    true
}

/// An xattr block holding `attrs` (sorted as ext4 keeps them), without its checksum; `None`
/// when they do not fit one block.
pub fn block(block_size: usize, attrs: &[Attr]) -> Option<Vec<u8>> {
    let mut sorted = attrs.to_vec();
    sorted.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    let mut b = vec![0u8; block_size];
    xattr::MAGIC.set(&mut b, xattr::MAGIC_VALUE);
    xattr::REFCOUNT.set(&mut b, 1);
    xattr::BLOCKS.set(&mut b, 1);
    let hashes = lay_out(&mut b, xattr::BLOCK_HEADER_SIZE, 0, &sorted)?;
    let mut hash = 0u32;
    for h in hashes {
        hash = (hash << 16) ^ (hash >> 16) ^ h;
    }
    xattr::HASH.set(&mut b, hash);
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acls_convert_to_the_compact_form() {
        // user::rw-, user:1000:r--, group::r--, mask::r--, other::---
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        let ext4 = split("system.posix_acl_access", &vfs).unwrap();
        assert_eq!(ext4.index, 2);
        assert_eq!(ext4.value.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(
            split("ntfs.stream.x", b""),
            Err(AttrError::NoNamespace {
                name: "ntfs.stream.x".into()
            })
        );
        assert!(matches!(
            split("system.posix_acl_default", b"\x02\0\0\0\x01"),
            Err(AttrError::NotAnAcl { .. })
        ));
        assert!(matches!(
            split("system.data", b""),
            Err(AttrError::NoNamespace { .. })
        ));
        assert_eq!(split("user.x", b"v").map(|a| a.index), Ok(1));
        assert_eq!(split("system.richacl", b"v").map(|a| a.index), Ok(8));
    }

    #[test]
    fn inline_attributes_that_do_not_fit_are_refused() {
        let mut area = vec![0u8; 96];
        let small = Attr {
            index: 1,
            name: b"a".to_vec(),
            value: b"xyz".to_vec(),
        };
        assert!(write_inline(&mut area, &[small]));
        let big = Attr {
            index: 1,
            name: b"a".to_vec(),
            value: vec![1; 100],
        };
        assert!(!write_inline(&mut area, std::slice::from_ref(&big)));
        assert!(block(4096, &[big]).is_some());
    }
}
