//! The VHDX metadata log: finding the active sequence of entries and replaying it in memory.
//!
//! A VHDX writer logs metadata updates (BAT, metadata region) before making them, and a crash
//! can leave entries that were never applied; the header's log GUID is then non-zero. Readers
//! must apply them first. We never change the file we read: the replay is held in a
//! [`Replayed`] overlay that reads like the file after replay.
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is a header sector (`loge`,
//! CRC32C over the whole entry, length, tail, sequence number, descriptor count, log GUID,
//! flushed and last file offsets) followed by its descriptors (`desc`: write one 4 KiB
//! sector; `zero`: zero a range) and one data sector (`data`) per `desc` descriptor. The active
//! sequence is the run of valid, consecutively numbered entries with the highest head sequence
//! number whose head's tail points at one of its own entries; it is replayed from that tail.

use std::collections::BTreeMap;

use super::ondisk::{checksum, log_data, log_descriptor, log_entry};
use diskferry_blockdev::{check_range, BlockDevice, Result};
use diskferry_layout::Guid;

const SECTOR: u64 = 4096;
/// Largest log accepted (Hyper-V and qemu use 1 MiB).
pub const MAX_LOG: u64 = 64 << 20;
/// Most 4 KiB sectors a replay may zero or write (16 GiB): beyond this the log is not one a
/// writer would produce.
const MAX_PAGES: usize = 1 << 22;

/// Why a log cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The header places the log badly or makes it absurdly large.
    #[error("the log ({len} bytes at {offset}) is misplaced or absurdly large")]
    Misplaced { offset: u64, len: u64 },
    /// The active sequence zeroes more than a writer ever would.
    #[error("the log's entry {sequence} zeroes more than 16 GiB")]
    TooLarge { sequence: u64 },
    /// The log says the file was longer than it is.
    #[error(
        "the file ends at {file_size} but its log says {flushed} bytes were flushed (truncated?)"
    )]
    Truncated { file_size: u64, flushed: u64 },
}

/// One parsed log entry.
struct Entry {
    /// Where the entry starts in the log.
    at: u64,
    len: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    /// The updates, in order.
    updates: Vec<Update>,
}

enum Update {
    Zero { offset: u64, len: u64 },
    Write { offset: u64, sector: Box<[u8]> },
}

/// The state of 4 KiB file sectors after replay: zeroed, or new contents.
pub type Pages = BTreeMap<u64, Option<Box<[u8]>>>;

/// The replayed log: changed sectors, and the file size the replay requires.
pub struct Replay {
    pub pages: Pages,
    pub min_file_size: u64,
    pub flushed_file_offset: u64,
}

/// `len` bytes of the circular `log` from `at`, wrapping at its end.
fn circular(log: &[u8], at: u64, len: u64) -> Vec<u8> {
    let n = log.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = at % n;
    let mut left = len;
    while left > 0 {
        let take = left.min(n - pos);
        out.extend_from_slice(&log[pos as usize..(pos + take) as usize]);
        left -= take;
        pos = (pos + take) % n;
    }
    out
}

/// The entry at `at`, if there is a valid one with this log GUID.
fn parse_entry(log: &[u8], at: u64, guid: Guid) -> Option<Entry> {
    let n = log.len() as u64;
    let head = circular(log, at, SECTOR);
    if log_entry::SIGNATURE.get(&head) != *log_entry::SIGNATURE_VALUE
        || log_entry::LOG_GUID.get(&head) != guid
    {
        return None;
    }
    let len = u64::from(log_entry::ENTRY_LENGTH.get(&head));
    let tail = u64::from(log_entry::TAIL.get(&head));
    let sequence = log_entry::SEQUENCE_NUMBER.get(&head);
    let descriptors = u64::from(log_entry::DESCRIPTOR_COUNT.get(&head));
    if len < SECTOR
        || !len.is_multiple_of(SECTOR)
        || len > n
        || !tail.is_multiple_of(SECTOR)
        || tail >= n
    {
        return None;
    }
    let descriptor_sectors = (log_entry::DESCRIPTORS.at(0) as u64
        + descriptors * log_descriptor::LEN as u64)
        .div_ceil(SECTOR);
    if descriptor_sectors > len / SECTOR {
        return None;
    }
    let bytes = circular(log, at, len);
    if log_entry::CHECKSUM.get(&bytes) != checksum(&bytes, log_entry::CHECKSUM) {
        return None;
    }
    let mut updates = Vec::new();
    let mut data_sector = descriptor_sectors;
    for i in 0..descriptors as usize {
        let d = log_entry::DESCRIPTORS.get(&bytes, i);
        let update = parse_descriptor(d, sequence, &bytes, &mut data_sector)?;
        updates.push(update);
    }
    Some(Entry {
        at,
        len,
        tail,
        sequence,
        flushed_file_offset: log_entry::FLUSHED_FILE_OFFSET.get(&head),
        last_file_offset: log_entry::LAST_FILE_OFFSET.get(&head),
        updates,
    })
}

/// The update descriptor `d` of the entry `bytes` (numbered `sequence`) makes; a data
/// descriptor takes the entry's next data sector, `data_sector`.
fn parse_descriptor(
    d: &[u8],
    sequence: u64,
    bytes: &[u8],
    data_sector: &mut u64,
) -> Option<Update> {
    use log_descriptor as desc;
    let offset = desc::FILE_OFFSET.get(d);
    if desc::SEQUENCE_NUMBER.get(d) != sequence || !offset.is_multiple_of(SECTOR) {
        return None;
    }
    match &desc::SIGNATURE.get(d) {
        desc::ZERO_SIGNATURE => {
            let len = desc::ZERO_LENGTH.get(d);
            if !len.is_multiple_of(SECTOR) || offset.checked_add(len).is_none() {
                return None;
            }
            Some(Update::Zero { offset, len })
        }
        desc::DATA_SIGNATURE => {
            let at = (*data_sector * SECTOR) as usize;
            let s = bytes.get(at..at + SECTOR as usize)?;
            let s_seq = (u64::from(log_data::SEQUENCE_HIGH.get(s)) << 32)
                | u64::from(log_data::SEQUENCE_LOW.get(s));
            if log_data::SIGNATURE.get(s) != *log_data::SIGNATURE_VALUE || s_seq != sequence {
                return None;
            }
            let mut sector = vec![0u8; SECTOR as usize].into_boxed_slice();
            // The sector's first 8 and last 4 bytes are kept in the descriptor.
            sector[..log_data::DATA.start].copy_from_slice(&desc::LEADING_BYTES.get(d));
            sector[log_data::DATA].copy_from_slice(&s[log_data::DATA]);
            sector[log_data::DATA.end..].copy_from_slice(&desc::TRAILING_BYTES.get(d));
            *data_sector += 1;
            Some(Update::Write { offset, sector })
        }
        _ => None,
    }
}

/// The active sequence: scanning from the start of the log, each run of valid consecutive
/// entries is a candidate; it is valid from the entry its head's tail names; the valid one
/// with the highest head sequence number wins.
fn active_sequence(log: &[u8], guid: Guid) -> Option<Vec<Entry>> {
    let n = log.len() as u64;
    let mut best: Option<Vec<Entry>> = None;
    let mut start = 0;
    while start < n {
        let mut run: Vec<Entry> = Vec::new();
        let mut pos = start;
        let mut covered = 0;
        while covered < n {
            let Some(e) = parse_entry(log, pos, guid) else {
                break;
            };
            if run
                .last()
                .is_some_and(|last| e.sequence != last.sequence + 1)
                || covered + e.len > n
            {
                break;
            }
            covered += e.len;
            pos = (pos + e.len) % n;
            run.push(e);
        }
        if run.is_empty() {
            start += SECTOR;
            continue;
        }
        let head = run.last().map(|h| (h.tail, h.sequence));
        if let Some((tail, sequence)) = head {
            if let Some(first) = run.iter().position(|e| e.at == tail) {
                if best
                    .as_ref()
                    .and_then(|b| b.last())
                    .is_none_or(|b| sequence > b.sequence)
                {
                    best = Some(run.split_off(first));
                }
            }
        }
        // Continue after this run (a run that wrapped has seen the whole log).
        if start + covered >= n {
            break;
        }
        start += covered;
    }
    best
}

/// Finds and replays the active sequence of `log` (the whole log region) for the log GUID
/// `guid`. `None` when the log holds no valid sequence (nothing to replay).
pub fn replay(log: &[u8], guid: Guid) -> std::result::Result<Option<Replay>, LogError> {
    let Some(sequence) = active_sequence(log, guid) else {
        return Ok(None);
    };
    let mut pages = Pages::new();
    for entry in &sequence {
        for update in &entry.updates {
            match update {
                Update::Zero { offset, len } => {
                    for page in (0..len / SECTOR).map(|i| offset + i * SECTOR) {
                        pages.insert(page, None);
                        if pages.len() > MAX_PAGES {
                            return Err(LogError::TooLarge {
                                sequence: entry.sequence,
                            });
                        }
                    }
                }
                Update::Write { offset, sector } => {
                    pages.insert(*offset, Some(sector.clone()));
                }
            }
        }
    }
    let head = sequence.last().expect("an active sequence has entries");
    let written_end = pages.keys().next_back().map_or(0, |p| p + SECTOR);
    Ok(Some(Replay {
        min_file_size: head.last_file_offset.max(written_end),
        flushed_file_offset: head.flushed_file_offset,
        pages,
    }))
}

/// A read-only view of a file with a replayed log laid over it: sectors the log wrote or
/// zeroed read as the log says, and the file reads as at least `min_file_size` long.
pub struct Replayed {
    file: std::sync::Arc<dyn BlockDevice>,
    pages: Pages,
    size: u64,
}

impl Replayed {
    pub fn new(file: std::sync::Arc<dyn BlockDevice>, replay: Replay) -> Replayed {
        let size = file.size().max(replay.min_file_size);
        Replayed {
            file,
            pages: replay.pages,
            size,
        }
    }
}

impl BlockDevice for Replayed {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let in_file = self
            .file
            .size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        if in_file > 0 {
            self.file.read_at(&mut buf[..in_file], offset)?;
        }
        buf[in_file..].fill(0);
        let first = offset / SECTOR * SECTOR;
        for (&page, contents) in self.pages.range(first..end) {
            let from = page.max(offset);
            let to = (page + SECTOR).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match contents {
                Some(c) => dst.copy_from_slice(&c[(from - page) as usize..(to - page) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::vhdx::ondisk::seal;

    const GUID: Guid = Guid(*b"0123456789abcdef");

    /// An entry at sequence `seq` with tail `tail` that zeroes the sector at `offset`.
    fn zero_entry(seq: u64, tail: u32, offset: u64) -> Vec<u8> {
        let mut e = vec![0u8; SECTOR as usize];
        log_entry::SIGNATURE.set(&mut e, log_entry::SIGNATURE_VALUE);
        log_entry::ENTRY_LENGTH.set(&mut e, SECTOR as u32);
        log_entry::TAIL.set(&mut e, tail);
        log_entry::SEQUENCE_NUMBER.set(&mut e, seq);
        log_entry::DESCRIPTOR_COUNT.set(&mut e, 1);
        log_entry::LOG_GUID.set(&mut e, GUID);
        let d = log_entry::DESCRIPTORS.get_mut(&mut e, 0);
        log_descriptor::SIGNATURE.set(d, log_descriptor::ZERO_SIGNATURE);
        log_descriptor::ZERO_LENGTH.set(d, SECTOR);
        log_descriptor::FILE_OFFSET.set(d, offset);
        log_descriptor::SEQUENCE_NUMBER.set(d, seq);
        seal(&mut e, log_entry::CHECKSUM);
        e
    }

    fn log_of(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut log = vec![0u8; 1 << 20];
        for (at, e) in entries {
            log[*at as usize..*at as usize + e.len()].copy_from_slice(e);
        }
        log
    }

    #[test]
    fn the_newest_valid_sequence_wins_and_is_replayed_from_its_tail() {
        // An old sequence (5, 6) and a newer one (20, 21, 22) whose head's tail is entry 21.
        let log = log_of(&[
            (0, zero_entry(5, 0, 1 << 20)),
            (4096, zero_entry(6, 0, 2 << 20)),
            (40960, zero_entry(20, 40960, 3 << 20)),
            (45056, zero_entry(21, 45056, 4 << 20)),
            (49152, zero_entry(22, 45056, 5 << 20)),
        ]);
        let replay = replay(&log, GUID).unwrap().unwrap();
        let zeroed: Vec<u64> = replay.pages.keys().copied().collect();
        assert_eq!(zeroed, vec![4 << 20, 5 << 20]);
    }

    #[test]
    fn broken_checksums_other_guids_and_gaps_are_not_replayed() {
        let mut bad_crc = zero_entry(7, 0, 1 << 20);
        bad_crc[100] ^= 1;
        assert!(replay(&log_of(&[(0, bad_crc)]), GUID).unwrap().is_none());
        let other = zero_entry(7, 0, 1 << 20);
        assert!(replay(&other_guid_log(other), GUID).unwrap().is_none());
        // Sequence numbers must follow each other: 8 after 3 starts a new run.
        let log = log_of(&[
            (0, zero_entry(3, 0, 1 << 20)),
            (4096, zero_entry(8, 0, 2 << 20)),
        ]);
        let replay = replay(&log, GUID).unwrap().unwrap();
        assert_eq!(
            replay.pages.keys().copied().collect::<Vec<_>>(),
            vec![1 << 20]
        );
    }

    fn other_guid_log(mut e: Vec<u8>) -> Vec<u8> {
        e[log_entry::LOG_GUID.offset] ^= 0xff;
        seal(&mut e, log_entry::CHECKSUM);
        log_of(&[(0, e)])
    }

    #[test]
    fn hostile_logs_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let base = log_of(&[(0, zero_entry(1, 0, 0)), (4096, zero_entry(2, 0, 4096))]);
        for _ in 0..2000 {
            let mut log = base.clone();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..8192);
                log[i] = rng.gen();
            }
            let _ = replay(&log, GUID);
        }
    }
}
