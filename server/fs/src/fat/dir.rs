//! Directory entries as the reader sees them: short entries (8.3 names with the NT case
//! flags, attributes, DOS times, first cluster, size) and the long names stored before them,
//! accepted only when their checksum matches the short name's.

use super::super::Timestamp;
use super::ondisk::{dirent, lfn};

/// A parsed short directory entry and its long name.
pub(super) struct RawEntry {
    /// Byte offset of the entry in the volume: the file's node id.
    pub offset: u64,
    pub name: Vec<u8>,
    pub attr: u8,
    pub first_cluster: u32,
    pub size: u32,
    pub raw: [u8; dirent::LEN],
}

impl RawEntry {
    /// The entry `raw` stored at `offset`, named `long` if it has a long name. Only FAT32
    /// keeps the first cluster's high half.
    pub fn new(offset: u64, raw: [u8; dirent::LEN], long: Option<Vec<u8>>, fat32: bool) -> Self {
        let hi = if fat32 {
            u32::from(dirent::FIRST_CLUSTER_HI.get(&raw)) << 16
        } else {
            0
        };
        RawEntry {
            offset,
            name: long.unwrap_or_else(|| short_name(&raw)),
            attr: dirent::ATTR.get(&raw),
            first_cluster: hi | u32::from(dirent::FIRST_CLUSTER_LO.get(&raw)),
            size: dirent::FILE_SIZE.get(&raw),
            raw,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.attr & dirent::ATTR_DIRECTORY != 0
    }

    /// Creation, modification and access times.
    pub fn times(&self) -> (Option<Timestamp>, Option<Timestamp>, Option<Timestamp>) {
        let r = &self.raw;
        (
            dos_time(
                dirent::CREATION_DATE.get(r),
                dirent::CREATION_TIME.get(r),
                dirent::CREATION_CENTIS.get(r),
            ),
            dos_time(dirent::WRITE_DATE.get(r), dirent::WRITE_TIME.get(r), 0),
            dos_time(dirent::ACCESS_DATE.get(r), 0, 0),
        )
    }
}

/// The long-name entries seen since the last short entry.
#[derive(Default)]
pub(super) struct LongName {
    pieces: Vec<(u8, [u16; lfn::UNITS_PER_ENTRY])>,
    checksum: u8,
}

impl LongName {
    /// Takes the long-name entry `e`; the one marked last starts a new name.
    pub fn push(&mut self, e: &[u8]) {
        let order = lfn::ORDER.get(e);
        if order & lfn::LAST != 0 {
            self.pieces.clear();
            self.checksum = lfn::CHECKSUM.get(e);
        }
        let units = std::array::from_fn(|i| lfn::unit(e, i));
        self.pieces.push((order & lfn::ORDER_MASK, units));
    }

    pub fn clear(&mut self) {
        self.pieces.clear();
    }

    /// The name collected for the short entry `raw`, if its checksum matches; then starts over.
    pub fn take_for(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        let matches = !self.pieces.is_empty() && self.checksum == checksum(&dirent::NAME.get(raw));
        let name = matches.then(|| {
            self.pieces.sort_by_key(|(order, _)| *order);
            let units: Vec<u16> = self
                .pieces
                .iter()
                .flat_map(|(_, p)| p.iter().copied())
                .take_while(|&u| u != 0 && u != 0xFFFF)
                .collect();
            String::from_utf16_lossy(&units).into_bytes()
        });
        self.pieces.clear();
        name
    }
}

/// The 8.3 name as DOS shows it, lowercased where the NT case flags say so.
pub(super) fn short_name(raw: &[u8; dirent::LEN]) -> Vec<u8> {
    let mut base = dirent::BASE.get(raw).to_vec();
    if base[0] == dirent::E5_ESCAPE {
        base[0] = dirent::DELETED;
    }
    let trim = |v: &mut Vec<u8>| {
        while v.last() == Some(&b' ') {
            v.pop();
        }
    };
    trim(&mut base);
    let mut ext = dirent::EXTENSION.get(raw).to_vec();
    trim(&mut ext);
    let case = dirent::NT_CASE.get(raw);
    if case & dirent::NT_LOWER_BASE != 0 {
        base.make_ascii_lowercase();
    }
    if case & dirent::NT_LOWER_EXTENSION != 0 {
        ext.make_ascii_lowercase();
    }
    if !ext.is_empty() {
        base.push(b'.');
        base.extend_from_slice(&ext);
    }
    base
}

/// The checksum of an 11-byte short name that its long-name entries carry.
pub(super) fn checksum(name: &[u8]) -> u8 {
    name.iter().fold(0u8, |sum, &c| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(c)
    })
}

/// A volume label as shown: trailing spaces trimmed, "NO NAME" as none.
pub(super) fn label_text(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b).trim_end().to_string();
    if text == "NO NAME" {
        String::new()
    } else {
        text
    }
}

/// A DOS date and time (2-second resolution, plus `centis` hundredths) as a timestamp.
pub(super) fn dos_time(date: u16, time: u16, centis: u8) -> Option<Timestamp> {
    if date == 0 {
        return None;
    }
    let (year, month, day) = (
        1980 + i64::from(date >> 9),
        i64::from((date >> 5) & 0xF),
        i64::from(date & 0x1F),
    );
    if !(1..=12).contains(&month) || day == 0 {
        return None;
    }
    let secs = i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3F) * 60
        + i64::from(time & 0x1F) * 2
        + i64::from(centis / 100);
    Some(Timestamp::from_civil(
        year,
        month,
        day,
        secs,
        u32::from(centis % 100) * 10_000_000,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_times_convert_to_unix_seconds() {
        // 2001-02-03 04:05:06 = 981173106.
        let date = ((2001 - 1980) << 9) | (2 << 5) | 3;
        let time = (4 << 11) | (5 << 5) | 3;
        let t = dos_time(date, time, 0).unwrap();
        assert_eq!(t.secs, 981_173_106);
        let t = dos_time(date, time, 150).unwrap();
        assert_eq!((t.secs, t.nanos), (981_173_107, 500_000_000));
        assert!(dos_time(0, 0, 0).is_none());
    }

    #[test]
    fn short_names_follow_the_case_flags() {
        let mut raw = [b' '; 32];
        raw[..8].copy_from_slice(b"README  ");
        raw[8..11].copy_from_slice(b"TXT");
        raw[12] = 0x18;
        assert_eq!(short_name(&raw), b"readme.txt");
        raw[12] = 0;
        raw[8..11].copy_from_slice(b"   ");
        assert_eq!(short_name(&raw), b"README");
    }
}
