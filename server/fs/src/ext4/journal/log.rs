//! Reading a jbd2 journal as e2fsck's recovery does, in three passes over the log: **scan**
//! (from the superblock's start block, follow descriptor, revoke and commit blocks while each
//! carries the next expected sequence number, checking their checksums under csum v2/v3 and
//! stopping at the first bad one), **revoke** (the newest revocation of every block among the
//! committed transactions), and **replay** (each committed transaction's blocks in order, minus
//! the revoked ones and those whose data checksum fails), giving which journal block now holds
//! each replayed block of the volume.
//!
//! Everything here is bounded by the journal's length: no pass reads more log blocks than the
//! log holds, so a log that wraps onto itself ends the scan.

use std::collections::{BTreeMap, HashMap};

use diskferry_blockdev::{BlockDevice, Result as BlockResult};

use super::super::ondisk::journal_sb::{self as jsb, tag};
use super::super::write::csum::crc32c_le;
use super::overlay::Source;

/// The largest journal replayed in memory (and mke2fs's largest default journal plus its
/// largest fast-commit area).
pub const MAX_JOURNAL_BYTES: u64 = (1 << 30) + (1 << 24);

/// Journal incompatible features this reader understands.
const KNOWN_INCOMPAT: u32 = jsb::INCOMPAT_REVOKE
    | jsb::INCOMPAT_64BIT
    | jsb::INCOMPAT_ASYNC_COMMIT
    | jsb::INCOMPAT_CSUM_V2
    | jsb::INCOMPAT_CSUM_V3
    | jsb::INCOMPAT_FAST_COMMIT;

/// Why a journal is not replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("the journal is on an external device, which is not part of this volume")]
    External,
    #[error("the journal inode {inum} cannot be read: {reason}")]
    Inode { inum: u32, reason: String },
    #[error("the journal superblock has no magic")]
    NoMagic,
    #[error("the journal superblock has an unknown type {0}")]
    BlockType(u32),
    #[error("the journal's block size {journal} differs from the filesystem's {fs}")]
    BlockSize { journal: u64, fs: u64 },
    #[error("the journal claims {bytes} bytes, more than the {limit} bytes replayed in memory")]
    TooLarge { bytes: u64, limit: u64 },
    #[error("the journal's geometry does not hold together (first block {first}, start {start}, {maxlen} blocks, {inode_blocks} in its inode)")]
    Geometry {
        first: u32,
        start: u32,
        maxlen: u32,
        inode_blocks: u64,
    },
    #[error("the journal superblock's checksum does not match")]
    SuperblockChecksum,
    #[error("the journal has features this reader does not know ({0:#x})")]
    Features(u32),
    #[error("the journal's checksum type {0} is not crc32c")]
    ChecksumType(u8),
    #[error("journal transaction {sequence} is damaged (log block {log_block}) in a way that makes e2fsck replay none of the journal")]
    Damaged { sequence: u32, log_block: u32 },
}

/// What the reader takes from the journal superblock.
#[derive(Debug, Clone)]
pub(super) struct JournalSb {
    pub block_size: u64,
    pub maxlen: u32,
    pub first: u32,
    /// One past the last block of the log (the fast-commit area follows).
    pub last: u32,
    pub sequence: u32,
    pub start: u32,
    pub incompat: u32,
    /// The checksum seed under csum v2/v3.
    pub seed: Option<u32>,
    /// Commit blocks carry the old CRC32 of their transaction's blocks (`COMPAT_CHECKSUM`).
    pub v1: bool,
}

impl JournalSb {
    /// Parses and checks the journal superblock; `inode_blocks` is the journal inode's length.
    pub fn parse(raw: &[u8], fs_block_size: u64, inode_blocks: u64) -> Result<Self, JournalError> {
        if raw.len() < jsb::SUPERBLOCK_SIZE || jsb::MAGIC.get(raw) != jsb::MAGIC_VALUE {
            return Err(JournalError::NoMagic);
        }
        let v2 = match jsb::BLOCKTYPE.get(raw) {
            jsb::SUPERBLOCK_V1 => false,
            jsb::SUPERBLOCK_V2 => true,
            other => return Err(JournalError::BlockType(other)),
        };
        let block_size = u64::from(jsb::BLOCKSIZE.get(raw));
        if block_size != fs_block_size {
            let fs = fs_block_size;
            return Err(JournalError::BlockSize {
                journal: block_size,
                fs,
            });
        }
        let (incompat, compat) = if v2 {
            (jsb::FEATURE_INCOMPAT.get(raw), jsb::FEATURE_COMPAT.get(raw))
        } else {
            (0, 0)
        };
        let sb = JournalSb {
            block_size,
            maxlen: jsb::MAXLEN.get(raw),
            first: jsb::FIRST.get(raw),
            last: 0,
            sequence: jsb::SEQUENCE.get(raw),
            start: jsb::START.get(raw),
            incompat,
            seed: None,
            v1: compat & jsb::COMPAT_CHECKSUM != 0,
        };
        sb.checked(raw, compat, inode_blocks)
    }

    /// Checks size, geometry, features and checksum; fills in `last` and `seed`.
    fn checked(mut self, raw: &[u8], compat: u32, inode_blocks: u64) -> Result<Self, JournalError> {
        let bytes = u64::from(self.maxlen) * self.block_size;
        if bytes > MAX_JOURNAL_BYTES {
            let limit = MAX_JOURNAL_BYTES;
            return Err(JournalError::TooLarge { bytes, limit });
        }
        if self.incompat & !KNOWN_INCOMPAT != 0 {
            return Err(JournalError::Features(self.incompat & !KNOWN_INCOMPAT));
        }
        let fc_blocks = match jsb::NUM_FC_BLKS.get(raw) {
            _ if self.incompat & jsb::INCOMPAT_FAST_COMMIT == 0 => 0,
            0 => jsb::DEFAULT_FC_BLOCKS,
            n => n,
        };
        self.last = self.maxlen.saturating_sub(fc_blocks);
        let csum = self.incompat & (jsb::INCOMPAT_CSUM_V2 | jsb::INCOMPAT_CSUM_V3);
        let bad_start = self.start != 0 && !(self.first..self.last).contains(&self.start);
        if u64::from(self.maxlen) > inode_blocks
            || self.first == 0
            || self.first >= self.last
            || bad_start
            || csum == jsb::INCOMPAT_CSUM_V2 | jsb::INCOMPAT_CSUM_V3
            || (csum != 0 && compat & jsb::COMPAT_CHECKSUM != 0)
        {
            return Err(JournalError::Geometry {
                first: self.first,
                start: self.start,
                maxlen: self.maxlen,
                inode_blocks,
            });
        }
        if csum != 0 {
            self.seed = Some(checked_seed(raw)?);
        }
        Ok(self)
    }

    fn csum_v3(&self) -> bool {
        self.incompat & jsb::INCOMPAT_CSUM_V3 != 0
    }

    fn wide(&self) -> bool {
        self.incompat & jsb::INCOMPAT_64BIT != 0
    }

    /// Bytes of one descriptor tag, without the UUID that may follow it.
    fn tag_bytes(&self) -> usize {
        if self.csum_v3() {
            return tag::V3_SIZE;
        }
        let size = tag::SIZE + if self.seed.is_some() { 2 } else { 0 };
        if self.wide() {
            size
        } else {
            size - 4
        }
    }

    /// Bytes at the end of descriptor and revoke blocks kept for their checksum.
    fn tail(&self) -> usize {
        if self.seed.is_some() {
            jsb::TAIL_SIZE
        } else {
            0
        }
    }

    /// The log block after `b`, wrapping from the end of the log to its first block.
    fn next(&self, b: u32) -> u32 {
        let n = b + 1;
        if n >= self.last {
            n - (self.last - self.first)
        } else {
            n
        }
    }
}

/// The csum v2/v3 seed, after checking the superblock's own checksum.
fn checked_seed(raw: &[u8]) -> Result<u32, JournalError> {
    if jsb::CHECKSUM_TYPE.get(raw) != jsb::CHECKSUM_CRC32C {
        return Err(JournalError::ChecksumType(jsb::CHECKSUM_TYPE.get(raw)));
    }
    let mut copy = raw[..jsb::SUPERBLOCK_SIZE].to_vec();
    jsb::CHECKSUM.set(&mut copy, 0);
    if crc32c_le(!0, &copy) != jsb::CHECKSUM.get(raw) {
        return Err(JournalError::SuperblockChecksum);
    }
    Ok(crc32c_le(!0, &jsb::UUID.get(raw)))
}

/// One block a transaction logs: where it goes, which log block holds it, and how.
#[derive(Debug, Clone, Copy)]
struct Tag {
    target: u64,
    log_block: u32,
    escaped: bool,
    checksum: u32,
}

/// A transaction: its blocks and revocations, and the running CRC32 of its blocks (checked
/// at its commit under `COMPAT_CHECKSUM`).
#[derive(Debug)]
struct Transaction {
    sequence: u32,
    tags: Vec<Tag>,
    revoked: Vec<u64>,
    crc: u32,
    /// A descriptor or revoke block of it that failed its checksum.
    suspect: Option<u32>,
    /// A revoke block of it whose count does not fit.
    malformed: Option<u32>,
}

impl Transaction {
    fn new(sequence: u32) -> Self {
        Transaction {
            sequence,
            tags: Vec::new(),
            revoked: Vec::new(),
            crc: !0,
            suspect: None,
            malformed: None,
        }
    }
}

/// Why the scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEnd {
    /// A block that does not continue the log: its normal end.
    End,
    /// The log wrapped onto itself without ending.
    Wrapped,
    /// Transaction `sequence` failed a checksum at `log_block` (its commit block's, or a
    /// descriptor or revoke block's with a stale commit): it and the rest are not replayed.
    BadBlock { sequence: u32, log_block: u32 },
}

/// What the scan found.
#[derive(Debug)]
pub(super) struct Scan {
    committed: Vec<Transaction>,
    pub stop: LogEnd,
}

impl Scan {
    pub fn transactions(&self) -> usize {
        self.committed.len()
    }
}

/// A journal on a volume: its superblock and the byte offset of each journal block.
pub(super) struct Log<'a> {
    pub dev: &'a dyn BlockDevice,
    pub sb: JournalSb,
    pub offsets: Vec<u64>,
}

impl Log<'_> {
    fn read(&self, b: u32) -> BlockResult<Vec<u8>> {
        let mut raw = vec![0u8; self.sb.block_size as usize];
        self.dev.read_at(&mut raw, self.offsets[b as usize])?;
        Ok(raw)
    }

    /// Pass 1: the committed transactions from the start of the log — or an error when the
    /// log is damaged in a way that makes e2fsck replay none of it.
    pub fn scan(&self) -> BlockResult<Result<Scan, JournalError>> {
        let mut scan = Scan {
            committed: Vec::new(),
            stop: LogEnd::End,
        };
        if self.sb.start == 0 {
            return Ok(Ok(scan));
        }
        let mut st = State {
            open: Transaction::new(self.sb.sequence),
            cursor: Cursor {
                block: self.sb.start,
                left: self.sb.last - self.sb.first,
            },
            last_time: 0,
        };
        scan.stop = loop {
            let Some(at) = st.cursor.take(&self.sb) else {
                break LogEnd::Wrapped;
            };
            let raw = self.read(at)?;
            let seq = st.open.sequence;
            if jsb::MAGIC.get(&raw) != jsb::MAGIC_VALUE || jsb::HEADER_SEQUENCE.get(&raw) != seq {
                break LogEnd::End;
            }
            let step = match jsb::BLOCKTYPE.get(&raw) {
                jsb::DESCRIPTOR_BLOCK => self.descriptor(&raw, at, &mut st)?,
                jsb::REVOKE_BLOCK => {
                    self.revoke(&raw, at, &mut st.open);
                    Ok(())
                }
                jsb::COMMIT_BLOCK => self
                    .commit(&raw, at, &mut st)
                    .map(|t| scan.committed.push(t)),
                _ => break LogEnd::End,
            };
            match step {
                Ok(()) => continue,
                Err(End::Stop(stop)) => break stop,
                Err(End::Refuse(e)) => return Ok(Err(e)),
            }
        };
        Ok(Ok(scan))
    }

    /// A descriptor block: its tags, each taking the next log block. One failing its
    /// checksum makes the transaction suspect (its tags are skipped). Under
    /// `COMPAT_CHECKSUM` the block and those it describes join the transaction's CRC32.
    fn descriptor(&self, raw: &[u8], at: u32, st: &mut State) -> BlockResult<Result<(), End>> {
        let good = self.tail_ok(raw);
        if !good {
            st.open.suspect.get_or_insert(at);
        }
        if self.sb.v1 {
            st.open.crc = crc32_be(st.open.crc, raw);
        }
        for (target, flags, checksum) in self.tags(raw) {
            let Some(log_block) = st.cursor.take(&self.sb) else {
                return Ok(Err(End::Stop(LogEnd::Wrapped)));
            };
            if self.sb.v1 {
                st.open.crc = crc32_be(st.open.crc, &self.read(log_block)?);
            }
            if good {
                st.open.tags.push(Tag {
                    target,
                    log_block,
                    escaped: flags & tag::FLAG_ESCAPE != 0,
                    checksum,
                });
            }
        }
        Ok(Ok(()))
    }

    /// A commit block ends the open transaction, as e2fsck decides: a bad checksum ends
    /// the log before it; a suspect transaction ends it too when the commit is older than
    /// the last good one (a stale block), and otherwise makes e2fsck refuse the whole log.
    fn commit(&self, raw: &[u8], at: u32, st: &mut State) -> Result<Transaction, End> {
        let sequence = st.open.sequence;
        let time = jsb::COMMIT_SEC.get(raw);
        if let Some(log_block) = st.open.suspect {
            if time >= st.last_time {
                return Err(End::Refuse(JournalError::Damaged {
                    sequence,
                    log_block,
                }));
            }
            return Err(End::Stop(LogEnd::BadBlock {
                sequence,
                log_block,
            }));
        }
        if !self.commit_ok(raw, st.open.crc) {
            return Err(End::Stop(LogEnd::BadBlock {
                sequence,
                log_block: at,
            }));
        }
        if let Some(log_block) = st.open.malformed {
            return Err(End::Refuse(JournalError::Damaged {
                sequence,
                log_block,
            }));
        }
        st.last_time = time;
        let next = Transaction::new(sequence.wrapping_add(1));
        Ok(std::mem::replace(&mut st.open, next))
    }

    /// A descriptor block's tags: (target block, flags, data checksum).
    fn tags(&self, raw: &[u8]) -> Vec<(u64, u32, u32)> {
        let (size, end) = (self.sb.tag_bytes(), raw.len() - self.sb.tail());
        let mut out = Vec::new();
        let mut at = jsb::HEADER_SIZE;
        while at + size <= end {
            let t = &raw[at..];
            let (flags, checksum) = if self.sb.csum_v3() {
                (tag::FLAGS32.get(t), tag::CHECKSUM32.get(t))
            } else {
                let c = if self.sb.seed.is_some() {
                    tag::CHECKSUM16.get(t)
                } else {
                    0
                };
                (u32::from(tag::FLAGS16.get(t)), u32::from(c))
            };
            let high = if self.sb.wide() {
                tag::BLOCKNR_HIGH.get(t)
            } else {
                0
            };
            out.push((
                u64::from(tag::BLOCKNR.get(t)) | u64::from(high) << 32,
                flags,
                checksum,
            ));
            at += size;
            if flags & tag::FLAG_SAME_UUID == 0 {
                at += tag::UUID_SIZE;
            }
            if flags & tag::FLAG_LAST_TAG != 0 {
                break;
            }
        }
        out
    }

    /// A revoke block's records. One failing its checksum makes the transaction suspect; a
    /// count that does not fit makes it malformed (e2fsck refuses the log if it commits).
    fn revoke(&self, raw: &[u8], at: u32, open: &mut Transaction) {
        let count = jsb::REVOKE_COUNT.get(raw) as usize;
        if !self.tail_ok(raw) {
            open.suspect.get_or_insert(at);
            return;
        }
        if count < jsb::REVOKE_HEADER_SIZE || count > raw.len() - self.sb.tail() {
            open.malformed.get_or_insert(at);
            return;
        }
        let width = if self.sb.wide() { 8 } else { 4 };
        for r in raw[jsb::REVOKE_HEADER_SIZE..count].chunks_exact(width) {
            let mut be = [0u8; 8];
            be[8 - width..].copy_from_slice(r);
            open.revoked.push(u64::from_be_bytes(be));
        }
    }

    /// A descriptor or revoke block's tail checksum holds (or there is none).
    fn tail_ok(&self, raw: &[u8]) -> bool {
        let Some(seed) = self.sb.seed else {
            return true;
        };
        let at = raw.len() - jsb::TAIL_SIZE;
        let mut copy = raw.to_vec();
        copy[at..].fill(0);
        crc32c_le(seed, &copy).to_be_bytes() == raw[at..]
    }

    /// A commit block's checksum holds (or there is none); `crc` is the transaction's CRC32
    /// for `COMPAT_CHECKSUM`, which a commit block may also leave unset.
    fn commit_ok(&self, raw: &[u8], crc: u32) -> bool {
        let Some(seed) = self.sb.seed else {
            let (kind, size, sum) = (
                jsb::COMMIT_CHECKSUM_TYPE.get(raw),
                jsb::COMMIT_CHECKSUM_SIZE.get(raw),
                jsb::COMMIT_CHECKSUM.get(raw),
            );
            return !self.sb.v1
                || (kind, size, sum) == (jsb::CHECKSUM_CRC32, 4, crc)
                || (kind, size, sum) == (0, 0, 0);
        };
        let mut copy = raw.to_vec();
        jsb::COMMIT_CHECKSUM.set(&mut copy, 0);
        crc32c_le(seed, &copy) == jsb::COMMIT_CHECKSUM.get(raw)
    }

    /// A logged block's data checksum holds (or there is none).
    fn data_ok(&self, sequence: u32, data: &[u8], checksum: u32) -> bool {
        let Some(seed) = self.sb.seed else {
            return true;
        };
        let c = crc32c_le(crc32c_le(seed, &sequence.to_be_bytes()), data);
        if self.sb.csum_v3() {
            c == checksum
        } else {
            c & 0xFFFF == checksum
        }
    }
}

/// How the scan ends early: with the transactions so far, or refusing the whole log.
enum End {
    Stop(LogEnd),
    Refuse(JournalError),
}

/// The scan's progress: the open transaction, where it reads, and the commit time of the
/// last committed transaction.
struct State {
    open: Transaction,
    cursor: Cursor,
    last_time: u64,
}

/// Walks the log, counting down the blocks it may still read.
struct Cursor {
    block: u32,
    left: u32,
}

impl Cursor {
    /// The next log block, or `None` once the whole log has been read.
    fn take(&mut self, sb: &JournalSb) -> Option<u32> {
        self.left = self.left.checked_sub(1)?;
        let at = self.block;
        self.block = sb.next(at);
        Some(at)
    }
}

/// The kernel's `crc32_be`: CRC32 most significant bit first, no inversions.
fn crc32_be(mut crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = (i as u32) << 24;
            let mut bit = 0;
            while bit < 8 {
                c = (c << 1) ^ if c & 0x8000_0000 != 0 { 0x04C1_1DB7 } else { 0 };
                bit += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    for &b in data {
        crc = (crc << 8) ^ TABLE[((crc >> 24) as u8 ^ b) as usize];
    }
    crc
}

/// `a` is after `b` in sequence-number order (which wraps).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Pass 2: for every revoked block, the newest transaction revoking it.
fn revocations(scan: &Scan) -> HashMap<u64, u32> {
    let mut table: HashMap<u64, u32> = HashMap::new();
    for t in &scan.committed {
        for &block in &t.revoked {
            let newest = table.entry(block).or_insert(t.sequence);
            if after(t.sequence, *newest) {
                *newest = t.sequence;
            }
        }
    }
    table
}

/// What the replay wrote (in memory).
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// Each replayed volume block and where its contents are.
    pub blocks: BTreeMap<u64, Source>,
    /// Block writes replayed (a block logged twice counts twice).
    pub writes: u64,
    /// Logged blocks left out: data checksum mismatch, or a target beyond the volume.
    pub bad: u64,
}

impl Log<'_> {
    /// Passes 2 and 3: the committed transactions' blocks, in order, minus revoked ones and
    /// those that fail their checksum or point beyond the volume's `fs_blocks`.
    pub fn replay(&self, scan: &Scan, fs_blocks: u64) -> BlockResult<Replayed> {
        let revoked = revocations(scan);
        let mut out = Replayed::default();
        for t in &scan.committed {
            for tag in &t.tags {
                if revoked
                    .get(&tag.target)
                    .is_some_and(|&r| !after(t.sequence, r))
                {
                    continue;
                }
                let data_ok = self.sb.seed.is_none()
                    || self.data_ok(t.sequence, &self.read(tag.log_block)?, tag.checksum);
                if !data_ok || tag.target >= fs_blocks {
                    out.bad += 1;
                    continue;
                }
                let offset = self.offsets[tag.log_block as usize];
                let escaped = tag.escaped;
                out.blocks
                    .insert(tag.target, Source::Log { offset, escaped });
                out.writes += 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskferry_blockdev::MemoryDevice;
    use rand::{Rng, SeedableRng};

    /// A valid v2 superblock for a 64-block journal of 1 KiB blocks starting at block 1.
    fn superblock(incompat: u32) -> Vec<u8> {
        let mut raw = vec![0u8; 1024];
        jsb::MAGIC.set(&mut raw, jsb::MAGIC_VALUE);
        jsb::BLOCKTYPE.set(&mut raw, jsb::SUPERBLOCK_V2);
        jsb::BLOCKSIZE.set(&mut raw, 1024);
        jsb::MAXLEN.set(&mut raw, 64);
        jsb::FIRST.set(&mut raw, 1);
        jsb::SEQUENCE.set(&mut raw, 5);
        jsb::START.set(&mut raw, 1);
        jsb::FEATURE_INCOMPAT.set(&mut raw, incompat);
        jsb::NUM_FC_BLKS.set(&mut raw, 8);
        raw
    }

    #[test]
    fn crc32_be_is_the_msb_first_crc32() {
        // CRC-32/MPEG-2 (this polynomial, MSB first, seed ~0, no final inversion).
        assert_eq!(crc32_be(!0, b"123456789"), 0x0376_E6E7);
        assert_eq!(crc32_be(crc32_be(!0, b"1234"), b"56789"), 0x0376_E6E7);
    }

    #[test]
    fn absurd_superblocks_are_typed_errors() {
        let ok = superblock(jsb::INCOMPAT_REVOKE);
        assert!(JournalSb::parse(&ok, 1024, 64).is_ok());
        let mut big = ok.clone();
        jsb::MAXLEN.set(&mut big, u32::MAX);
        assert!(matches!(
            JournalSb::parse(&big, 1024, u64::MAX),
            Err(JournalError::TooLarge { .. })
        ));
        assert!(matches!(
            JournalSb::parse(&ok, 1024, 10),
            Err(JournalError::Geometry { .. })
        ));
        assert!(matches!(
            JournalSb::parse(&ok, 4096, 64),
            Err(JournalError::BlockSize { .. })
        ));
        let mut start = ok.clone();
        jsb::START.set(&mut start, 64);
        assert!(matches!(
            JournalSb::parse(&start, 1024, 64),
            Err(JournalError::Geometry { .. })
        ));
        let both = superblock(jsb::INCOMPAT_CSUM_V2 | jsb::INCOMPAT_CSUM_V3);
        assert!(JournalSb::parse(&both, 1024, 64).is_err());
        let mut csum = superblock(jsb::INCOMPAT_CSUM_V3);
        jsb::CHECKSUM_TYPE.set(&mut csum, jsb::CHECKSUM_CRC32C);
        assert_eq!(
            JournalSb::parse(&csum, 1024, 64).unwrap_err(),
            JournalError::SuperblockChecksum
        );
        assert_eq!(
            JournalSb::parse(&superblock(0x8000), 1024, 64).unwrap_err(),
            JournalError::Features(0x8000)
        );
    }

    /// Random log blocks, some given the journal magic and the expected sequence so the scan
    /// goes deep: never a panic, never more log blocks than the log has.
    #[test]
    fn random_logs_scan_without_panics_and_within_bounds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        for round in 0..300 {
            let incompat = [
                0,
                jsb::INCOMPAT_64BIT,
                jsb::INCOMPAT_CSUM_V3 | jsb::INCOMPAT_64BIT,
                jsb::INCOMPAT_CSUM_V2,
                jsb::INCOMPAT_FAST_COMMIT,
            ][round % 5];
            let mut sbraw = superblock(incompat);
            if incompat & (jsb::INCOMPAT_CSUM_V2 | jsb::INCOMPAT_CSUM_V3) != 0 {
                jsb::CHECKSUM_TYPE.set(&mut sbraw, jsb::CHECKSUM_CRC32C);
                let c = crc32c_le(!0, &sbraw);
                jsb::CHECKSUM.set(&mut sbraw, c);
            }
            let sb = JournalSb::parse(&sbraw, 1024, 64).unwrap();
            let mut image = vec![0u8; 64 * 1024];
            rng.fill(&mut image[1024..]);
            for b in 1..64 {
                let raw = &mut image[b * 1024..(b + 1) * 1024];
                if rng.gen_bool(0.7) {
                    jsb::MAGIC.set(raw, jsb::MAGIC_VALUE);
                    jsb::BLOCKTYPE.set(raw, rng.gen_range(1..=5));
                    jsb::HEADER_SEQUENCE.set(raw, 5 + rng.gen_range(0..3));
                    jsb::REVOKE_COUNT.set(raw, rng.gen_range(0..1100));
                }
            }
            let dev = MemoryDevice::read_only(image);
            let log = Log {
                dev: &dev,
                sb,
                offsets: (0..64).map(|b| b * 1024).collect(),
            };
            let Ok(scan) = log.scan().unwrap() else {
                continue;
            };
            let logged: usize = scan.committed.iter().map(|t| t.tags.len()).sum();
            assert!(logged < 64, "round {round}: {logged} blocks");
            let replayed = log.replay(&scan, 1 << 20).unwrap();
            assert!(replayed.writes as usize <= logged);
        }
    }
}
