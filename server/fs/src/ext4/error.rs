//! What the ext4 reader finds wrong with a volume, typed: [`Corruption`] says what is malformed
//! (with the block and byte offsets involved), [`Place`] which structure it was found in. They
//! reach callers as [`FsError::Ext4`](super::super::FsError::Ext4).

use super::super::FsError;

/// The structure a malformed record was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Superblock,
    GroupDescriptors,
    /// An inode or something it points to (extents, directory blocks, xattrs).
    Inode(u64),
    /// The volume as a whole.
    Volume,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Superblock => write!(f, "ext4 superblock"),
            Place::GroupDescriptors => write!(f, "ext4 group descriptors"),
            Place::Inode(n) => write!(f, "ext4 inode {n}"),
            Place::Volume => write!(f, "ext4"),
        }
    }
}

/// " in block N" for a structure read from block N; nothing for one inside the inode.
fn in_block(block: &Option<u64>) -> String {
    block.map(|b| format!(" in block {b}")).unwrap_or_default()
}

/// A malformed ext4 structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    // The superblock and group descriptors.
    #[error("the device is too small")]
    DeviceTooSmall,
    #[error("no ext2/3/4 magic")]
    NoMagic,
    #[error("block size 2^{} is absurd", 10 + *log_block_size as u64)]
    BlockSize { log_block_size: u32 },
    #[error("cluster size 2^{} is absurd for its block size", 10 + *log_cluster_size as u64)]
    ClusterSize { log_cluster_size: u32 },
    #[error("geometry does not hold together ({blocks} blocks of {block_size} bytes on a {device_size}-byte device, {blocks_per_group} blocks and {inodes_per_group} inodes per group, inode size {inode_size}, descriptor size {desc_size})")]
    Geometry {
        blocks: u64,
        block_size: u64,
        device_size: u64,
        blocks_per_group: u64,
        inodes_per_group: u64,
        inode_size: u64,
        desc_size: u64,
    },
    #[error("{blocks} descriptor blocks after a superblock do not fit a group of {blocks_per_group} blocks or the descriptor table")]
    DescriptorBlocks { blocks: u64, blocks_per_group: u64 },
    #[error("{inodes} inodes do not fit {groups} groups")]
    TooManyInodes { inodes: u64, groups: u64 },
    #[error("group {group} points outside the filesystem")]
    GroupOutside { group: u64 },
    #[error("block {block} is beyond the filesystem")]
    BlockBeyond { block: u64 },

    // Inodes.
    #[error("inode number out of range")]
    InodeOutOfRange,
    #[error("inode of {len} bytes is too short")]
    InodeTooShort { len: usize },
    #[error("extra inode size {extra_isize} is out of range")]
    ExtraIsize { extra_isize: usize },
    #[error("unknown file type in mode {mode:o}")]
    UnknownFileType { mode: u16 },

    // Where the data lives.
    #[error("extent tree node{} has no magic", in_block(.block))]
    ExtentMagic { block: Option<u64> },
    #[error("extent tree node{} claims {entries}/{max} entries at depth {depth}", in_block(.block))]
    ExtentHeader {
        block: Option<u64>,
        entries: usize,
        max: usize,
        depth: u16,
    },
    #[error("extent tree depths do not descend (block {block})")]
    ExtentDepth { block: u64 },
    #[error("an extent points beyond the filesystem (blocks {start}+{len})")]
    ExtentBeyond { start: u64, len: u64 },
    #[error("extents overlap or are out of order")]
    ExtentOrder,
    #[error("too many extents")]
    TooManyExtents,
    #[error("a block pointer points beyond the filesystem (block {block})")]
    PointerBeyond { block: u64 },

    // Directories and symlinks.
    #[error("directory of {size} bytes")]
    DirectoryTooLarge { size: u64 },
    /// `block` is `None` for entries kept in the inode (inline data).
    #[error("directory entry at byte {offset}{} is malformed", in_block(.block))]
    DirEntry { block: Option<u64>, offset: usize },
    #[error("inline data of {size} bytes does not fit in an inode")]
    InlineTooLarge { size: u64 },
    #[error("symlink target of {size} bytes")]
    SymlinkTooLong { size: u64 },

    // Extended attributes.
    #[error("its extended attribute block has no magic (block {block})")]
    XattrBlockMagic { block: u64 },
    #[error("an extended attribute name runs past its block (entry at byte {offset})")]
    XattrName { offset: usize },
    #[error("inode {inode} does not hold the value of one of its extended attributes")]
    XattrInode { inode: u64 },
    #[error("an extended attribute value lies outside its block (entry at byte {offset})")]
    XattrValue { offset: usize },
    #[error("unknown extended attribute namespace {index}")]
    XattrNamespace { index: u8 },
    #[error("a POSIX ACL is not in ext4's version 1 format")]
    AclVersion,
    #[error("a POSIX ACL entry is truncated (at byte {offset})")]
    AclTruncated { offset: usize },
}

impl Corruption {
    /// This corruption, found in `place`.
    pub fn at(self, place: Place) -> FsError {
        FsError::Ext4 {
            place,
            source: self,
        }
    }

    /// This corruption, found in inode `node`.
    pub fn in_inode(self, node: u64) -> FsError {
        self.at(Place::Inode(node))
    }
}
