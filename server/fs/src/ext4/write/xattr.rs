//! Encoding extended attributes the way ext4 stores them: names split into a namespace index
//! and a suffix, POSIX ACLs converted from the VFS form to ext4's compact one, entry and block
//! hashes, and the two places they live — inside the inode after its extra fields, or in one
//! xattr block of their own.

/// One attribute as stored: namespace index, name suffix, value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

const MAGIC: u32 = 0xEA02_0000;

/// Splits a full name into ext4's namespace index and the rest; `None` for namespaces ext4
/// cannot hold.
pub fn split(full: &str, value: &[u8]) -> Result<Attr, String> {
    let (index, name) = if full == "system.posix_acl_access" {
        (2, "")
    } else if full == "system.posix_acl_default" {
        (3, "")
    } else if let Some(rest) = full.strip_prefix("user.") {
        (1, rest)
    } else if let Some(rest) = full.strip_prefix("trusted.") {
        (4, rest)
    } else if let Some(rest) = full.strip_prefix("security.") {
        (6, rest)
    } else if full == "system.richacl" {
        (8, "")
    } else {
        return Err(format!("ext4 has no namespace for the attribute {full}"));
    };
    if name.len() > 255 {
        return Err(format!("attribute name {full} is longer than 255 bytes"));
    }
    let value = if index == 2 || index == 3 {
        acl_to_ext4(value)?
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
/// id for the owner, owning group, mask and other entries).
fn acl_to_ext4(v: &[u8]) -> Result<Vec<u8>, String> {
    if v.len() < 4
        || u32::from_le_bytes([v[0], v[1], v[2], v[3]]) != 2
        || !(v.len() - 4).is_multiple_of(8)
    {
        return Err("a POSIX ACL is not in the VFS version 2 form".into());
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[..4]);
        if tag == 0x02 || tag == 0x08 {
            out.extend_from_slice(&e[4..8]);
        }
    }
    Ok(out)
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

fn entry_len(a: &Attr) -> usize {
    (16 + a.name.len()).next_multiple_of(4)
}

/// Lays out entries from `entries_at` and values from `end` downward inside `area`; value
/// offsets are relative to `base`. `None` when they do not fit.
fn lay_out(area: &mut [u8], entries_at: usize, base: usize, attrs: &[Attr]) -> Option<Vec<u32>> {
    let mut at = entries_at;
    let mut value_end = area.len();
    let mut hashes = Vec::new();
    for a in attrs {
        let vlen = a.value.len().next_multiple_of(4);
        if at + entry_len(a) + 4 > value_end.checked_sub(vlen)? {
            return None;
        }
        value_end -= vlen;
        area[value_end..value_end + a.value.len()].copy_from_slice(&a.value);
        let h = entry_hash(a);
        let e = &mut area[at..at + entry_len(a)];
        e[0] = a.name.len() as u8;
        e[1] = a.index;
        let offs = if a.value.is_empty() {
            0
        } else {
            value_end - base
        };
        e[2..4].copy_from_slice(&(offs as u16).to_le_bytes());
        e[8..12].copy_from_slice(&(a.value.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&h.to_le_bytes());
        e[16..16 + a.name.len()].copy_from_slice(&a.name);
        hashes.push(h);
        at += entry_len(a);
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
    tmp[..4].copy_from_slice(&MAGIC.to_le_bytes());
    if lay_out(&mut tmp, 4, 4, attrs).is_none() {
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
    b[..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes()); // refcount
    b[8..12].copy_from_slice(&1u32.to_le_bytes()); // blocks
    let hashes = lay_out(&mut b, 32, 0, &sorted)?;
    let mut hash = 0u32;
    for h in hashes {
        hash = (hash << 16) ^ (hash >> 16) ^ h;
    }
    b[12..16].copy_from_slice(&hash.to_le_bytes());
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
        assert!(split("ntfs.stream.x", b"").is_err());
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
