//! An inode: 128 bytes of original fields, then `i_extra_isize` bytes of extra fields, then
//! (up to the inode size) extended attributes stored in the inode.

use super::super::super::{FileKind, Timestamp};
use super::Halves;
use diskferry_layout::field::{Bytes, Field};

/// The original inode size, where the extra fields begin.
pub const GOOD_OLD_SIZE: usize = 128;

pub const MODE: Field<u16> = Field::at(0x00);
pub const UID: Halves<u16, u16> = Halves::at(0x02, 0x78);
pub const SIZE: Halves<u32, u32> = Halves::at(0x04, 0x6C);
pub const ATIME: Time = Time::at(0x08, 0x8C);
pub const CTIME: Time = Time::at(0x0C, 0x84);
pub const MTIME: Time = Time::at(0x10, 0x88);
pub const GID: Halves<u16, u16> = Halves::at(0x18, 0x7A);
pub const LINKS_COUNT: Field<u16> = Field::at(0x1A);
/// 512-byte sectors, or blocks with `HUGE_FILE_FL`.
pub const BLOCKS: Halves<u32, u16> = Halves::at(0x1C, 0x74);
pub const FLAGS: Field<u32> = Field::at(0x20);
/// Extent tree root, block map, fast symlink target or device number.
pub const I_BLOCK: Bytes<60> = Bytes::at(0x28);
pub const I_BLOCK_LEN: usize = 60;
pub const GENERATION: Field<u32> = Field::at(0x64);
/// The extended attribute block.
pub const FILE_ACL: Halves<u32, u16> = Halves::at(0x68, 0x76);
pub const CHECKSUM_LO: Field<u16> = Field::at(0x7C);
// The extra fields.
pub const EXTRA_ISIZE: Field<u16> = Field::at(0x80);
pub const CHECKSUM_HI: Field<u16> = Field::at(0x82);
pub const CRTIME: Time = Time::at(0x90, 0x94);

pub const SECRM_FL: u32 = 0x0000_0001;
pub const UNRM_FL: u32 = 0x0000_0002;
pub const SYNC_FL: u32 = 0x0000_0008;
pub const IMMUTABLE_FL: u32 = 0x0000_0010;
pub const APPEND_FL: u32 = 0x0000_0020;
pub const NODUMP_FL: u32 = 0x0000_0040;
pub const NOATIME_FL: u32 = 0x0000_0080;
pub const INDEX_FL: u32 = 0x0000_1000;
pub const DIRSYNC_FL: u32 = 0x0001_0000;
pub const TOPDIR_FL: u32 = 0x0002_0000;
pub const HUGE_FILE_FL: u32 = 0x0004_0000;
pub const EXTENTS_FL: u32 = 0x0008_0000;
/// The inode holds an extended attribute's value (`ea_inode`).
pub const EA_INODE_FL: u32 = 0x0020_0000;
pub const INLINE_DATA_FL: u32 = 0x1000_0000;

/// Device numbers inside `i_block`: the old 8:8 encoding in the first word, the new
/// 12:20 one in the second.
pub const DEV_OLD: Field<u32> = Field::at(0);
pub const DEV_NEW: Field<u32> = Field::at(4);

/// Block map: 12 direct pointers, then single, double and triple indirect ones, each a
/// 32-bit block number in `i_block`.
pub const DIRECT_POINTERS: usize = 12;
pub const POINTER_SIZE: usize = 4;
/// The `i`th block pointer of `i_block` or of an indirect block.
pub const fn pointer(i: usize) -> Field<u32> {
    Field::at(i * POINTER_SIZE)
}

/// A timestamp: signed 32-bit seconds in the original fields, and in the extra fields two
/// epoch bits (extending the seconds to 34 bits) and 30 bits of nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Time {
    pub secs: Field<u32>,
    pub extra: Field<u32>,
}

impl Time {
    pub const fn at(secs: usize, extra: usize) -> Time {
        Time {
            secs: Field::at(secs),
            extra: Field::at(extra),
        }
    }

    /// The time, from an inode whose extra fields end at `extra_end` (seconds only when
    /// they do not reach this time's extra field).
    pub fn get(&self, raw: &[u8], extra_end: usize) -> Timestamp {
        let secs = i64::from(self.secs.get(raw) as i32);
        if self.extra.end() > extra_end {
            return Timestamp { secs, nanos: 0 };
        }
        let e = self.extra.get(raw);
        Timestamp {
            secs: secs + (i64::from(e & 3) << 32),
            nanos: (e >> 2).min(999_999_999),
        }
    }

    /// Stores the time, extra field included.
    pub fn set(&self, raw: &mut [u8], t: Timestamp) {
        self.secs.set(raw, t.secs as i32 as u32);
        let epoch = (((t.secs - i64::from(t.secs as i32)) >> 32) & 3) as u32;
        self.extra.set(raw, epoch | (t.nanos.min(999_999_999) << 2));
    }
}

/// The file type bits of `i_mode`.
const S_IFMT: u16 = 0xF000;
const TYPES: [(u16, FileKind); 7] = [
    (0x8000, FileKind::File),
    (0x4000, FileKind::Dir),
    (0xA000, FileKind::Symlink),
    (0x2000, FileKind::CharDevice),
    (0x6000, FileKind::BlockDevice),
    (0x1000, FileKind::Fifo),
    (0xC000, FileKind::Socket),
];

/// The file type `i_mode` names, if any.
pub fn kind_of_mode(mode: u16) -> Option<FileKind> {
    TYPES.iter().find(|t| t.0 == mode & S_IFMT).map(|t| t.1)
}

/// The `i_mode` type bits for a file type.
pub fn mode_type(kind: FileKind) -> u16 {
    TYPES.iter().find(|t| t.1 == kind).map_or(0, |t| t.0)
}

/// (major, minor) of a device node's `i_block`, from either encoding.
pub fn device(i_block: &[u8]) -> (u32, u32) {
    let old = DEV_OLD.get(i_block);
    if old != 0 {
        ((old >> 8) & 0xFF, old & 0xFF)
    } else {
        let new = DEV_NEW.get(i_block);
        ((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))
    }
}

/// Stores a device number in `i_block`, in the old encoding when it fits, as the kernel
/// does.
pub fn set_device(i_block: &mut [u8], (major, minor): (u32, u32)) {
    if major < 256 && minor < 256 {
        DEV_OLD.set(i_block, (major << 8) | minor);
    } else {
        DEV_NEW.set(
            i_block,
            (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12),
        );
    }
}
