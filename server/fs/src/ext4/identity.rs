//! What a file-by-file rebuild keeps of a volume: the writer's options that reproduce its
//! parameters and identity — block and inode size, UUID, label, directory hash seed and
//! signedness, inode count, reserved GDT blocks (resize_inode), last mount point, journal
//! size and journal features.

use super::ondisk::sb;
use super::{write, Ext4};

impl Ext4 {
    /// Options that make the writer produce a filesystem with this one's parameters and
    /// identity (the inode count becomes as many as fit when the destination is smaller).
    pub fn format_options(&self) -> write::Ext4Options {
        let raw = self.raw_superblock();
        let compat = sb::FEATURE_COMPAT.get(&raw);
        let last_mounted = sb::LAST_MOUNTED.get(&raw);
        let journal = compat & sb::COMPAT_HAS_JOURNAL != 0;
        let journal_features = match sb::JOURNAL_INUM.get(&raw) {
            inum if journal && inum != 0 => self.journal_features(inum),
            _ => write::JournalFeatures::default(),
        };
        write::Ext4Options {
            block_size: self.sb.block_size,
            inode_size: self.sb.inode_size.max(256),
            label: Some(self.sb.label.clone()).filter(|l| !l.is_empty()),
            uuid: Some(self.sb.uuid),
            hash_seed: Some(self.sb.hash_seed),
            signed_hash: sb::FLAGS.get(&raw) & sb::FLAGS_SIGNED_HASH != 0,
            journal_blocks: Some(self.sb.journal_blocks),
            journal_features,
            inodes: Some(self.sb.inodes),
            // The source's density, so a smaller destination keeps the proportion.
            bytes_per_inode: (self.sb.blocks * self.sb.block_size / self.sb.inodes.max(1))
                .max(1024),
            reserved_gdt_blocks: if compat & sb::COMPAT_RESIZE_INODE != 0 {
                self.sb.reserved_gdt
            } else {
                0
            },
            last_mounted: Some(last_mounted).filter(|m| m.iter().any(|&b| b != 0)),
            ..write::Ext4Options::default()
        }
    }

    /// The primary superblock's bytes as the reader sees them (after any journal replay);
    /// zeros when it cannot be read, which keeps every option at its default.
    fn raw_superblock(&self) -> Vec<u8> {
        let mut raw = vec![0u8; sb::SIZE];
        if self.dev.read_at(&mut raw, sb::OFFSET).is_err() {
            raw.fill(0);
        }
        raw
    }
}
