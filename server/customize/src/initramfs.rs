//! An initramfs file as the kernel reads it: zero or more uncompressed cpio archives (early
//! microcode), then the main archive, compressed (gzip, zstd, xz, or lz4 in the kernel's
//! legacy framing) or not. [`Initramfs`]
//! keeps the early archives byte for byte and the main one as entries to edit; saving
//! writes the early bytes and the main archive again, gzip-compressed (every kernel that
//! boots an initramfs reads gzip, and `lsinitramfs`/`unmkinitramfs` find it by its magic).
//! Decompression is bounded: an archive that would unpack past [`MAX_UNPACKED`] is refused.

use std::io::{Read, Write};

use crate::cpio::{self, Entry};
use crate::CustomizeError;

/// Largest main archive unpacked (a generic Debian initramfs is some 60 MiB).
pub const MAX_UNPACKED: u64 = 1 << 30;

const GZIP: &[u8] = &[0x1f, 0x8b];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
/// `lz4 -l`, the framing the kernel's initramfs unpacker reads: 8 MiB blocks.
const LZ4_LEGACY: &[u8] = &[0x02, 0x21, 0x4c, 0x18];
const LZ4_BLOCK: usize = 8 << 20;

/// The compressions seen at the main archive's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
    Lz4,
}

/// An initramfs opened for editing.
#[derive(Debug)]
pub struct Initramfs {
    early: Vec<u8>,
    pub compression: Compression,
    pub entries: Vec<Entry>,
}

fn bad(why: impl Into<String>) -> CustomizeError {
    CustomizeError::System(format!("initramfs: {}", why.into()))
}

/// Everything `r` gives, at most [`MAX_UNPACKED`] bytes.
fn bounded(mut r: impl Read) -> Result<Vec<u8>, CustomizeError> {
    let mut out = Vec::new();
    (&mut r)
        .take(MAX_UNPACKED + 1)
        .read_to_end(&mut out)
        .map_err(|e| bad(format!("decompressing: {e}")))?;
    if out.len() as u64 > MAX_UNPACKED {
        return Err(bad(format!(
            "unpacks to more than {} MiB",
            MAX_UNPACKED >> 20
        )));
    }
    Ok(out)
}

/// Every zstd frame of `data`, one after another.
fn unzstd(mut data: &[u8]) -> Result<Vec<u8>, CustomizeError> {
    let mut out = Vec::new();
    while data.starts_with(ZSTD) {
        let mut d = ruzstd::decoding::StreamingDecoder::new(&mut data)
            .map_err(|e| bad(format!("zstd: {e}")))?;
        let frame = bounded(&mut d)?;
        if (out.len() + frame.len()) as u64 > MAX_UNPACKED {
            return Err(bad("unpacks to too much"));
        }
        out.extend(frame);
    }
    Ok(out)
}

/// A writer taking at most [`MAX_UNPACKED`] bytes.
struct Capped(Vec<u8>);

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if (self.0.len() + b.len()) as u64 > MAX_UNPACKED {
            return Err(std::io::Error::other(format!(
                "unpacks to more than {} MiB",
                MAX_UNPACKED >> 20
            )));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn unxz(mut data: &[u8]) -> Result<Vec<u8>, CustomizeError> {
    let mut out = Capped(Vec::new());
    lzma_rs::xz_decompress(&mut data, &mut out).map_err(|e| bad(format!("xz: {e}")))?;
    Ok(out.0)
}

/// The blocks of a legacy lz4 stream (`[u32 size][block]`…, the magic again between
/// concatenated streams), until a size no block can have.
fn unlz4(data: &[u8]) -> Result<Vec<u8>, CustomizeError> {
    let mut rest = &data[LZ4_LEGACY.len()..];
    let mut out = Vec::new();
    while rest.len() >= 4 {
        if rest.starts_with(LZ4_LEGACY) {
            rest = &rest[4..];
            continue;
        }
        let size = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if size == 0 || size > LZ4_BLOCK + LZ4_BLOCK / 255 + 16 {
            break;
        }
        let block = rest
            .get(4..4 + size)
            .ok_or_else(|| bad("lz4: a block runs past the end"))?;
        let chunk =
            lz4_flex::block::decompress(block, LZ4_BLOCK).map_err(|e| bad(format!("lz4: {e}")))?;
        if (out.len() + chunk.len()) as u64 > MAX_UNPACKED {
            return Err(bad(format!(
                "unpacks to more than {} MiB",
                MAX_UNPACKED >> 20
            )));
        }
        out.extend(chunk);
        rest = &rest[4 + size..];
    }
    Ok(out)
}

impl Initramfs {
    pub fn parse(data: &[u8]) -> Result<Initramfs, CustomizeError> {
        let mut at = 0;
        loop {
            while data.get(at) == Some(&0) {
                at += 1;
            }
            let rest = &data[at..];
            if !cpio::is_cpio(rest) {
                break;
            }
            let (_, used) = cpio::read_archive(rest)?;
            let after = at + used;
            // An uncompressed archive is early only when something follows it.
            if data[after..].iter().all(|b| *b == 0) {
                return Ok(Initramfs {
                    early: data[..at].to_vec(),
                    compression: Compression::None,
                    entries: cpio::read_all(rest)?,
                });
            }
            at = after;
        }
        let rest = &data[at..];
        let (compression, unpacked) = if rest.starts_with(GZIP) {
            let d = flate2::read::MultiGzDecoder::new(rest);
            (Compression::Gzip, bounded(d)?)
        } else if rest.starts_with(ZSTD) {
            (Compression::Zstd, unzstd(rest)?)
        } else if rest.starts_with(XZ) {
            (Compression::Xz, unxz(rest)?)
        } else if rest.starts_with(LZ4_LEGACY) {
            (Compression::Lz4, unlz4(rest)?)
        } else {
            let magic: Vec<String> = rest.iter().take(6).map(|b| format!("{b:02x}")).collect();
            return Err(bad(format!(
                "the main archive is compressed in a way not read here (magic {}): gzip, zstd, xz, lz4 or none",
                magic.join(" ")
            )));
        };
        Ok(Initramfs {
            early: data[..at].to_vec(),
            compression,
            entries: cpio::read_all(&unpacked)?,
        })
    }

    /// The early archives as they were, then the main archive gzip-compressed.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CustomizeError> {
        let mut out = self.early.clone();
        let archive = cpio::write_archive(&self.entries);
        let mut gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::new(6));
        gz.write_all(&archive)
            .and_then(|_| gz.finish().map(drop))
            .map_err(|e| bad(format!("compressing: {e}")))?;
        Ok(out)
    }

    pub fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Puts `entry` in, replacing one of the same name; missing parent directories are added.
    pub fn put(&mut self, entry: Entry) {
        let mut parent = String::new();
        let parts: Vec<&str> = entry.name.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(p);
            if self.find(&parent).is_none() {
                self.entries.push(Entry::dir(&parent, entry.mtime));
            }
        }
        match self.entries.iter_mut().find(|e| e.name == entry.name) {
            Some(e) => *e = entry,
            None => self.entries.push(entry),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(script: &str) {
        let out = Command::new("sh").args(["-ec", script]).output().unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
    }

    /// An initramfs as Debian builds one: an uncompressed early archive (microcode), then
    /// the main archive compressed with `compress`, made by cpio(1).
    fn debian_like(dir: &std::path::Path, compress: &str) -> Vec<u8> {
        let d = dir.display();
        sh(&format!(
            "mkdir -p {d}/early/kernel/x86/microcode {d}/main/usr/lib/modules/6.1.0/kernel {d}/main/conf
             printf ucode > {d}/early/kernel/x86/microcode/GenuineIntel.bin
             printf 'kernel/ahci.ko:\n' > {d}/main/usr/lib/modules/6.1.0/modules.dep
             printf 'AHCI' > {d}/main/usr/lib/modules/6.1.0/kernel/ahci.ko
             printf 'ahci\n' > {d}/main/conf/modules
             ln -s usr/lib {d}/main/lib
             (cd {d}/early && find . | cpio -o -H newc --quiet) > {d}/initrd
             (cd {d}/main && find . | cpio -o -H newc --quiet | {compress}) >> {d}/initrd"
        ));
        std::fs::read(dir.join("initrd")).unwrap()
    }

    fn listed(dir: &std::path::Path, bytes: &[u8]) -> String {
        let path = dir.join("new-initrd");
        std::fs::write(&path, bytes).unwrap();
        let out = Command::new("lsinitramfs").arg(&path).output().unwrap();
        assert!(out.status.success(), "lsinitramfs: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn an_edited_initramfs_lists_its_new_files_with_lsinitramfs() {
        for compress in [
            "zstd -q -c",
            "gzip -c",
            "xz --check=crc32 -c",
            "lz4 -l -q -c",
            "cat",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut ramfs = Initramfs::parse(&debian_like(dir.path(), compress)).unwrap();
            let want = match compress.split(' ').next() {
                Some("cat") => Compression::None,
                Some("zstd") => Compression::Zstd,
                Some("xz") => Compression::Xz,
                Some("lz4") => Compression::Lz4,
                _ => Compression::Gzip,
            };
            assert_eq!(ramfs.compression, want);
            assert_eq!(
                ramfs
                    .find("usr/lib/modules/6.1.0/kernel/ahci.ko")
                    .unwrap()
                    .data,
                b"AHCI"
            );
            let link = ramfs.find("lib").unwrap();
            assert_eq!(
                (link.mode & 0o170000, link.data.as_slice()),
                (0o120000, &b"usr/lib"[..])
            );
            ramfs.put(Entry::file(
                "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko",
                0o644,
                0,
                b"VIRTIO".to_vec(),
            ));
            let list = listed(dir.path(), &ramfs.to_bytes().unwrap());
            for name in [
                "kernel/x86/microcode/GenuineIntel.bin",
                "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko",
                "usr/lib/modules/6.1.0/kernel/drivers/block",
                "usr/lib/modules/6.1.0/kernel/ahci.ko",
                "conf/modules",
            ] {
                assert!(
                    list.lines().any(|l| l == name),
                    "{compress}: {name} in\n{list}"
                );
            }
        }
    }

    #[test]
    fn hostile_initramfs_files_are_errors_not_panics() {
        assert!(Initramfs::parse(b"").is_err());
        assert!(Initramfs::parse(b"BZh91AY&SY").is_err());
        assert!(Initramfs::parse(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2]).is_err());
        assert!(Initramfs::parse(&[0x02, 0x21, 0x4c, 0x18, 9, 0, 0, 0, 1, 2]).is_err());
        assert!(Initramfs::parse(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3]).is_err());
        assert!(Initramfs::parse(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0]).is_err());
        assert!(Initramfs::parse(b"070701garbage").is_err());
        // A gzip bomb: 2 GiB of zeros in a few MiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..((MAX_UNPACKED >> 20) + 8) {
            gz.write_all(&zeros).unwrap();
        }
        let bomb = gz.finish().unwrap();
        let err = Initramfs::parse(&bomb).unwrap_err().to_string();
        assert!(err.contains("more than"), "{err}");
    }
}
