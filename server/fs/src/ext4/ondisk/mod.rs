//! ext4's on-disk structures, spelled once: one table of named fields per structure (offsets as
//! in the kernel's `ext4.h`, `xattr.h` and `jbd2.h`), plus the encodings both sides share —
//! split 64-bit values, timestamps, device numbers, file types, attribute namespaces. The
//! reader (`ext4/*.rs`) and the writer (`ext4/write/*.rs`) read and write these structures only
//! through these tables.
//!
//! Offsets are relative to the structure's start; a structure inside a block (a directory
//! entry, an extent, an xattr entry) is addressed by slicing the block at its start first.

use diskferry_layout::field::{Field, Le};

pub mod acl;
pub mod dirent;
pub mod dx;
pub mod extent;
pub mod gd;
pub mod inode;
pub mod journal_sb;
pub mod sb;
pub mod xattr;

/// A value kept as a low half and a high half in two places: ext4 grew its 32-bit fields to
/// 48 and 64 bits by adding high halves elsewhere in the structure.
#[derive(Debug, Clone, Copy)]
pub struct Halves<L, H> {
    pub lo: Field<L, Le>,
    pub hi: Field<H, Le>,
}

impl<L, H> Halves<L, H> {
    pub const fn at(lo: usize, hi: usize) -> Self {
        Halves {
            lo: Field::at(lo),
            hi: Field::at(hi),
        }
    }
}

macro_rules! halves {
    ($lo:ty, $hi:ty, $v:ty) => {
        impl Halves<$lo, $hi> {
            /// Both halves.
            pub fn get(&self, b: &[u8]) -> $v {
                <$v>::from(self.lo.get(b)) | (<$v>::from(self.hi.get(b)) << <$lo>::BITS)
            }
            /// Both halves when the structure has the high one (`wide`), else the low one.
            pub fn get_if(&self, b: &[u8], wide: bool) -> $v {
                if wide {
                    self.get(b)
                } else {
                    <$v>::from(self.lo.get(b))
                }
            }
            /// Stores both halves; bits above them are dropped.
            pub fn set(&self, b: &mut [u8], v: $v) {
                self.lo.set(b, v as $lo);
                self.hi.set(b, (v >> <$lo>::BITS) as $hi);
            }
        }
    };
}
halves!(u32, u32, u64);
halves!(u32, u16, u64);
halves!(u16, u16, u32);

#[cfg(test)]
mod tests {
    use super::super::super::{FileKind, Timestamp};
    use super::*;

    #[test]
    fn halves_join_and_split() {
        let mut b = [0u8; 0x40];
        gd::INODE_TABLE.set(&mut b, 0x1_2345_6789);
        assert_eq!(gd::INODE_TABLE.lo.get(&b), 0x2345_6789);
        assert_eq!(gd::INODE_TABLE.hi.get(&b), 1);
        assert_eq!(gd::INODE_TABLE.get(&b), 0x1_2345_6789);
        assert_eq!(gd::INODE_TABLE.get_if(&b, false), 0x2345_6789);
        let mut e = [0u8; 12];
        extent::LEAF_START.set(&mut e, 0xABCD_0000_0001);
        assert_eq!(e[6..8], [0xCD, 0xAB]);
        assert_eq!(extent::LEAF_START.get(&e), 0xABCD_0000_0001);
    }

    #[test]
    fn timestamps_round_trip_beyond_2038_and_before_1970() {
        let mut raw = [0u8; 256];
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp {
                secs: -1_000_000_000,
                nanos: 5,
            },
            Timestamp {
                secs: 3_000_000_000,
                nanos: 999_999_999,
            },
            Timestamp {
                secs: 15_000_000_000,
                nanos: 1,
            },
        ] {
            inode::MTIME.set(&mut raw, t);
            assert_eq!(inode::MTIME.get(&raw, 160), t);
        }
        // Without the extra fields: seconds only.
        assert_eq!(inode::MTIME.get(&raw, 128).nanos, 0);
    }

    #[test]
    fn devices_use_the_old_encoding_when_they_fit() {
        let mut ib = [0u8; 60];
        inode::set_device(&mut ib, (8, 1));
        assert_eq!(inode::DEV_OLD.get(&ib), 0x801);
        assert_eq!(inode::device(&ib), (8, 1));
        let mut ib = [0u8; 60];
        inode::set_device(&mut ib, (259, 70_000));
        assert_eq!(inode::DEV_OLD.get(&ib), 0);
        assert_eq!(inode::device(&ib), (259, 70_000));
    }

    #[test]
    fn types_map_both_ways() {
        for k in [
            FileKind::File,
            FileKind::Dir,
            FileKind::Symlink,
            FileKind::CharDevice,
            FileKind::BlockDevice,
            FileKind::Fifo,
            FileKind::Socket,
        ] {
            assert_eq!(inode::kind_of_mode(inode::mode_type(k) | 0o644), Some(k));
            assert_eq!(dirent::kind_of(dirent::file_type(k)), Some(k));
        }
        assert_eq!(inode::kind_of_mode(0o644), None);
        assert_eq!(dirent::kind_of(0), None);
    }

    #[test]
    fn sizes_match_the_kernel_structures() {
        assert_eq!(extent::ROOT_ENTRIES, 4);
        assert_eq!(sb::CHECKSUM.end(), sb::SIZE);
        assert_eq!(gd::ITABLE_UNUSED.hi.end(), 0x34);
        assert_eq!(inode::CRTIME.extra.end(), 0x98);
        assert_eq!(dx::limit(4096, dx::ROOT_INDEX), 507);
        assert_eq!(dx::limit(4096, dx::NODE_INDEX), 510);
    }
}
