//! The cpio "newc" archive format an initramfs is made of (`070701` headers of 13 hex
//! fields, names and data padded to 4 bytes, ended by `TRAILER!!!`): read into entries,
//! edited, written back. Archives come from images: every length is checked against what is
//! left before anything is allocated, and counts are bounded.

use crate::CustomizeError;

const MAGIC: &[u8; 6] = b"070701";
const MAGIC_CRC: &[u8; 6] = b"070702";
const HEADER: usize = 110;
const TRAILER: &str = "TRAILER!!!";
/// Most entries one archive may hold.
const MAX_ENTRIES: usize = 1 << 20;
/// Longest name.
const MAX_NAME: usize = 4096;

/// One archive member, its header fields as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u32,
    /// Type and permission bits (`0o100644` a file, `0o040755` a directory, `0o120777` a link).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub dev: (u32, u32),
    pub rdev: (u32, u32),
    /// File contents, or a link's target.
    pub data: Vec<u8>,
}

impl Entry {
    /// A regular file owned by root.
    pub fn file(name: &str, mode: u32, mtime: u32, data: Vec<u8>) -> Entry {
        Entry {
            name: name.to_string(),
            ino: 0,
            mode: 0o100000 | (mode & 0o7777),
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime,
            dev: (0, 0),
            rdev: (0, 0),
            data,
        }
    }

    /// A directory owned by root.
    pub fn dir(name: &str, mtime: u32) -> Entry {
        Entry {
            mode: 0o040755,
            nlink: 2,
            ..Entry::file(name, 0, mtime, Vec::new())
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }
}

fn bad(why: impl Into<String>) -> CustomizeError {
    CustomizeError::System(format!("initramfs: {}", why.into()))
}

fn hex_field(h: &[u8], i: usize) -> Result<u32, CustomizeError> {
    let f = &h[6 + i * 8..14 + i * 8];
    std::str::from_utf8(f)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or_else(|| bad("a cpio header field is not hex"))
}

const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Whether `data` starts with a newc header.
pub fn is_cpio(data: &[u8]) -> bool {
    data.starts_with(MAGIC) || data.starts_with(MAGIC_CRC)
}

/// Reads one archive from the start of `data`: its entries (the trailer left out) and the
/// bytes it took.
pub fn read_archive(data: &[u8]) -> Result<(Vec<Entry>, usize), CustomizeError> {
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        if out.len() >= MAX_ENTRIES {
            return Err(bad("more than a million entries"));
        }
        let h = data
            .get(at..at + HEADER)
            .ok_or_else(|| bad("the archive ends inside a header"))?;
        if !is_cpio(h) {
            return Err(bad(format!("no cpio header at byte {at}")));
        }
        let field = |i| hex_field(h, i);
        let (size, namesize) = (field(6)? as usize, field(11)? as usize);
        if namesize == 0 || namesize > MAX_NAME {
            return Err(bad(format!("a name of {namesize} bytes")));
        }
        let name_at = at + HEADER;
        let raw = data
            .get(name_at..name_at + namesize)
            .ok_or_else(|| bad("the archive ends inside a name"))?;
        let name = String::from_utf8_lossy(&raw[..namesize - 1]).into_owned();
        let data_at = pad4(name_at + namesize);
        let body = data
            .get(data_at..data_at + size)
            .ok_or_else(|| bad(format!("{name}: the archive ends inside its data")))?;
        at = pad4(data_at + size);
        if name == TRAILER {
            return Ok((out, at));
        }
        out.push(Entry {
            name,
            ino: field(0)?,
            mode: field(1)?,
            uid: field(2)?,
            gid: field(3)?,
            nlink: field(4)?,
            mtime: field(5)?,
            dev: (field(7)?, field(8)?),
            rdev: (field(9)?, field(10)?),
            data: body.to_vec(),
        });
    }
}

/// Every archive of `data`, one after another (zero padding between them skipped).
pub fn read_all(data: &[u8]) -> Result<Vec<Entry>, CustomizeError> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < data.len() {
        if data[at] == 0 {
            at += 1;
            continue;
        }
        let (entries, used) = read_archive(&data[at..])?;
        out.extend(entries);
        at += used;
    }
    Ok(out)
}

fn header(out: &mut Vec<u8>, e: &Entry, ino: u32, size: usize, namesize: usize) {
    out.extend_from_slice(MAGIC);
    let fields = [
        ino,
        e.mode,
        e.uid,
        e.gid,
        e.nlink,
        e.mtime,
        size as u32,
        e.dev.0,
        e.dev.1,
        e.rdev.0,
        e.rdev.1,
        namesize as u32,
        0,
    ];
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
}

fn push_padded(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
    out.resize(pad4(out.len()), 0);
}

/// One archive of `entries`, with its trailer. Entries without an inode number get fresh
/// ones above every number in use.
pub fn write_archive(entries: &[Entry]) -> Vec<u8> {
    let mut next = entries.iter().map(|e| e.ino).max().unwrap_or(0) + 1;
    let mut out = Vec::new();
    let trailer = Entry {
        nlink: 1,
        mode: 0,
        ..Entry::file(TRAILER, 0, 0, Vec::new())
    };
    for e in entries.iter().chain(std::iter::once(&trailer)) {
        let ino = if e.ino == 0 && e.name != TRAILER {
            next += 1;
            next
        } else {
            e.ino
        };
        let mut name = e.name.clone().into_bytes();
        name.push(0);
        header(&mut out, e, ino, e.data.len(), name.len());
        push_padded(&mut out, &name);
        push_padded(&mut out, &e.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_round_trips_and_damage_is_an_error() {
        let entries = vec![
            Entry::dir("usr", 7),
            Entry::file("usr/x.ko", 0o644, 7, b"module bytes".to_vec()),
            Entry::file("empty", 0o600, 7, Vec::new()),
        ];
        let bytes = write_archive(&entries);
        let (back, used) = read_archive(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back.len(), 3);
        assert_eq!(back[1].data, b"module bytes");
        assert_eq!(back[1].mode, 0o100644);
        assert!(back[0].is_dir());
        for cut in [10, HEADER + 3, bytes.len() - 20] {
            assert!(read_archive(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = bytes.clone();
        huge[6 + 6 * 8..14 + 6 * 8].copy_from_slice(b"7fffffff");
        assert!(read_archive(&huge).is_err());
    }
}
