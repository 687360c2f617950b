//! A volume whose journal still holds committed transactions (`needs_recovery`, after a power
//! loss) is presented as e2fsck would leave it, without writing to it: the journal is read
//! ([`log`]: scan, revoke and replay passes over jbd2's log) and the blocks it would write
//! are served by a [`ReplayedDevice`] over the volume, through which the superblock and group
//! descriptors are read again and every later read goes — [`Filesystem::device`] included.
//!
//! As e2fsck leaves it: the replayed superblock loses `needs_recovery` and the journal
//! superblock is emptied (in memory), so a block copy of the replayed view is a clean volume.
//! Except with fast commits: their area cannot be replayed, so only the full commits are and
//! both flags stay, letting the kernel finish a block copy; a file-by-file rebuild is then
//! refused ([`JournalView::obstacle`]). An external journal cannot be read: the view stays
//! unreplayed, with a note saying so.
//!
//! [`Filesystem::device`]: super::super::Filesystem::device

mod log;
mod overlay;

use std::collections::BTreeMap;
use std::sync::Arc;

use super::super::{FsError, Result};
use super::ondisk::{journal_sb, sb};
use super::write::{csum, JournalFeatures};
use super::Ext4;
use diskferry_blockdev::BlockDevice;
pub use log::{JournalError, LogEnd};
use log::{JournalSb, Log, Scan};
pub use overlay::ReplayedDevice;
use overlay::Source;

/// What opening a volume did about its journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalView {
    /// Nothing was waiting in the journal.
    Clean,
    /// The committed transactions were replayed in memory.
    Replayed {
        transactions: u64,
        /// Block writes replayed.
        blocks: u64,
        /// Logged blocks left out (data checksum mismatch, target beyond the volume).
        skipped: u64,
        stop: LogEnd,
        /// A fast-commit area exists and was not replayed.
        fast_commit: bool,
    },
    /// The journal needed recovery but could not be replayed: the view is the stale one.
    NotReplayed(JournalError),
}

impl JournalView {
    /// What the reader did to present this view, for people.
    pub fn notes(&self) -> Vec<String> {
        match self {
            JournalView::Clean => Vec::new(),
            JournalView::NotReplayed(e) => vec![format!(
                "the journal needs recovery but was not replayed ({e}): this view lacks its last transactions"
            )],
            JournalView::Replayed {
                transactions,
                blocks,
                skipped,
                stop,
                fast_commit,
            } => {
                let mut notes = vec![format!(
                    "replayed {transactions} journal transaction{} ({blocks} block{}) in memory; the source was not written",
                    plural(*transactions),
                    plural(*blocks)
                )];
                if *skipped > 0 {
                    notes.push(format!("{skipped} journaled block{} failed their checksum or pointed beyond the volume and were left out, as e2fsck does", plural(*skipped)));
                }
                match stop {
                    LogEnd::End => {}
                    LogEnd::Wrapped => notes.push("the journal's log wraps onto itself: replay stopped after one pass over it".into()),
                    LogEnd::BadBlock { sequence, log_block } => notes.push(format!("journal transaction {sequence} is damaged (log block {log_block}): it and any later ones were not replayed, as e2fsck does")),
                }
                if *fast_commit {
                    notes.push("its fast-commit journal area cannot be replayed: only the full commits were".into());
                }
                notes
            }
        }
    }

    /// Why a file-by-file rebuild would miss what the volume holds, if it would.
    pub fn obstacle(&self) -> Option<String> {
        match self {
            JournalView::NotReplayed(e) => Some(format!(
                "its journal needs recovery and cannot be replayed ({e})"
            )),
            JournalView::Replayed {
                fast_commit: true, ..
            } => Some("its fast-commit journal area cannot be replayed".into()),
            _ => None,
        }
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A journal error, or an error reading the device (which ends the open).
enum LoadError {
    Journal(JournalError),
    Fs(FsError),
}

impl From<JournalError> for LoadError {
    fn from(e: JournalError) -> Self {
        LoadError::Journal(e)
    }
}

impl Ext4 {
    /// This volume as e2fsck's journal recovery would leave it (itself when nothing waits in
    /// its journal).
    pub(super) fn replay_journal(self) -> Result<Ext4> {
        let mut raw = vec![0u8; sb::SIZE];
        self.dev.read_at(&mut raw, sb::OFFSET)?;
        let compat = sb::FEATURE_COMPAT.get(&raw);
        if sb::FEATURE_INCOMPAT.get(&raw) & sb::INCOMPAT_RECOVER == 0
            || compat & sb::COMPAT_HAS_JOURNAL == 0
        {
            return Ok(self);
        }
        let inum = sb::JOURNAL_INUM.get(&raw);
        let (jsb, offsets) = match self.load_log(inum) {
            Ok(loaded) => loaded,
            Err(LoadError::Fs(e)) => return Err(e),
            Err(LoadError::Journal(e)) => return Ok(self.unreplayed(e)),
        };
        let log = Log {
            dev: &*self.dev,
            sb: jsb,
            offsets,
        };
        let fast_commit = compat & sb::COMPAT_FAST_COMMIT != 0;
        let scan = match log.scan()? {
            Ok(scan) => scan,
            Err(e) => return Ok(self.unreplayed(e)),
        };
        let replayed = log.replay(&scan, self.sb.blocks)?;
        let mut blocks = replayed.blocks;
        if !fast_commit {
            self.settle(&log, &scan, &mut blocks)?;
        }
        let view = JournalView::Replayed {
            transactions: scan.transactions() as u64,
            blocks: replayed.writes,
            skipped: replayed.bad,
            stop: scan.stop,
            fast_commit,
        };
        tracing::info!(?view, "ext4: journal replayed in memory");
        let dev = ReplayedDevice::new(Arc::clone(&self.dev), self.sb.block_size, blocks);
        match Ext4::open_unreplayed(Arc::new(dev)) {
            Ok(mut fs) => {
                fs.journal = view;
                Ok(fs)
            }
            Err(FsError::Io(e)) => Err(FsError::Io(e)),
            Err(e) => Ok(self.unreplayed(JournalError::Inode {
                inum,
                reason: format!("after replay, {e}"),
            })),
        }
    }

    /// The journal's features, for a rebuild to keep (none when it cannot be read).
    pub(super) fn journal_features(&self, inum: u32) -> JournalFeatures {
        match self.load_log(inum) {
            Ok((jsb, _)) => JournalFeatures {
                compat: if jsb.v1 {
                    journal_sb::COMPAT_CHECKSUM
                } else {
                    0
                },
                incompat: jsb.incompat,
            },
            Err(_) => JournalFeatures::default(),
        }
    }

    fn unreplayed(mut self, e: JournalError) -> Ext4 {
        tracing::warn!(error = %e, "ext4: the journal needs recovery but is not replayed");
        self.journal = JournalView::NotReplayed(e);
        self
    }

    /// The journal superblock and the byte offset of each journal block, from inode `inum`.
    fn load_log(&self, inum: u32) -> Result<(JournalSb, Vec<u64>), LoadError> {
        if inum == 0 {
            return Err(JournalError::External.into());
        }
        let bad_inode = |e: FsError| match e {
            FsError::Io(_) => LoadError::Fs(e),
            other => LoadError::Journal(JournalError::Inode {
                inum,
                reason: other.to_string(),
            }),
        };
        let ino = self.inode(u64::from(inum)).map_err(bad_inode)?;
        let extents = self.raw_extents(u64::from(inum), &ino).map_err(bad_inode)?;
        let bs = self.sb.block_size;
        let first = extents.iter().find(|e| e.logical == 0 && e.len > 0);
        let Some(first) = first else {
            return Err(bad_inode(FsError::Corrupt(
                "journal".into(),
                "its first block is not mapped".into(),
            )));
        };
        let mut raw = vec![0u8; bs as usize];
        self.dev
            .read_at(&mut raw, first.physical * bs)
            .map_err(|e| LoadError::Fs(e.into()))?;
        let jsb = JournalSb::parse(&raw, bs, ino.size / bs)?;
        let maxlen = u64::from(jsb.maxlen);
        let mut offsets = vec![u64::MAX; maxlen as usize];
        // Each journal block is mapped once: overlapping extents end the work at once.
        for e in extents.iter().filter(|e| e.logical < maxlen) {
            for l in e.logical..(e.logical + e.len).min(maxlen) {
                if offsets[l as usize] != u64::MAX {
                    return Err(bad_inode(FsError::Corrupt(
                        "journal".into(),
                        "its extents overlap".into(),
                    )));
                }
                offsets[l as usize] = (e.physical + l - e.logical) * bs;
            }
        }
        if offsets.contains(&u64::MAX) {
            return Err(bad_inode(FsError::Corrupt(
                "journal".into(),
                "it has holes".into(),
            )));
        }
        Ok((jsb, offsets))
    }

    /// What e2fsck writes after a replay: the superblock without `needs_recovery` (its
    /// checksum redone) and an empty journal superblock whose sequence follows the replayed
    /// transactions.
    fn settle(&self, log: &Log, scan: &Scan, blocks: &mut BTreeMap<u64, Source>) -> Result<()> {
        let bs = self.sb.block_size;
        let view = ReplayedDevice::new(Arc::clone(&self.dev), bs, blocks.clone());
        let (sb_block, within) = (sb::OFFSET / bs, (sb::OFFSET % bs) as usize);
        let mut block = vec![0u8; bs as usize];
        view.read_at(&mut block, sb_block * bs)?;
        let raw = &mut block[within..within + sb::SIZE];
        let incompat = sb::FEATURE_INCOMPAT.get(raw);
        sb::FEATURE_INCOMPAT.set(raw, incompat & !sb::INCOMPAT_RECOVER);
        if sb::FEATURE_RO_COMPAT.get(raw) & sb::RO_COMPAT_METADATA_CSUM != 0 {
            csum::set_superblock(raw);
        }
        blocks.insert(sb_block, Source::Whole(block.into()));

        let mut jraw = vec![0u8; bs as usize];
        self.dev.read_at(&mut jraw, log.offsets[0])?;
        journal_sb::START.set(&mut jraw, 0);
        let next = log.sb.sequence.wrapping_add(scan.transactions() as u32);
        journal_sb::SEQUENCE.set(&mut jraw, next);
        if log.sb.seed.is_some() {
            journal_sb::CHECKSUM.set(&mut jraw, 0);
            let c = csum::crc32c_le(!0, &jraw[..journal_sb::SUPERBLOCK_SIZE]);
            journal_sb::CHECKSUM.set(&mut jraw, c);
        }
        blocks.insert(log.offsets[0] / bs, Source::Whole(jraw.into()));
        Ok(())
    }
}
