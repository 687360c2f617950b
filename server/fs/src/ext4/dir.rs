//! Reading directories: every block of the directory read linearly (hashed directories too —
//! their index blocks look like blocks of one empty entry), or the entries kept in the inode
//! (inline data), each entry checked against its block before its name is taken.

use super::super::{DirEntry, FileKind, FsError, NodeId, Result};
use super::error::Corruption;
use super::ondisk::dirent;
use super::Ext4;

/// Most directory bytes read for one directory (a directory of millions of entries).
const MAX_DIR_BYTES: u64 = 1 << 30;
/// An inline directory starts with its parent's inode number.
const INLINE_PARENT_LEN: usize = 4;

impl Ext4 {
    pub(super) fn read_directory(&self, dir: NodeId) -> Result<Vec<DirEntry>> {
        let ino = self.inode(dir)?;
        if self.kind_of(dir, &ino)? != FileKind::Dir {
            return Err(FsError::NotADirectory(format!("inode {dir}")));
        }
        if ino.size > MAX_DIR_BYTES {
            return Err(Corruption::DirectoryTooLarge { size: ino.size }.in_inode(dir));
        }
        let mut out = Vec::new();
        if ino.has_inline_data() {
            let data = self.inline_data(dir, &ino)?;
            // The parent's inode number, then entries.
            let entries = data.get(INLINE_PARENT_LEN..).unwrap_or_default();
            self.parse_entries(dir, entries, None, &mut out)?;
            return Ok(out);
        }
        for e in self.raw_extents(dir, &ino)? {
            for b in 0..e.len {
                if (e.logical + b) * self.sb.block_size >= ino.size {
                    break;
                }
                self.read_dir_block(dir, e.physical + b, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Adds the entries of directory block `nr`.
    fn read_dir_block(&self, dir: NodeId, nr: u64, out: &mut Vec<DirEntry>) -> Result<()> {
        self.parse_entries(dir, &self.read_block(nr)?, Some(nr), out)
    }

    /// Adds the entries in `block` (without `.`, `..` and unused entries); `nr` is where it
    /// was read from (`None`: the inode).
    fn parse_entries(
        &self,
        dir: NodeId,
        block: &[u8],
        nr: Option<u64>,
        out: &mut Vec<DirEntry>,
    ) -> Result<()> {
        let mut at = 0usize;
        while at + dirent::NAME <= block.len() {
            let e = &block[at..];
            let inode_no = u64::from(dirent::INODE.get(e));
            let rec_len = dirent::rec_len_from_disk(dirent::REC_LEN.get(e), self.sb.block_size);
            let name_len = usize::from(dirent::NAME_LEN.get(e));
            if rec_len < dirent::NAME || rec_len > e.len() || dirent::NAME + name_len > rec_len {
                return Err(Corruption::DirEntry {
                    block: nr,
                    offset: at,
                }
                .in_inode(dir));
            }
            let name = &e[dirent::NAME..dirent::NAME + name_len];
            if inode_no != 0 && name != b"." && name != b".." {
                out.push(DirEntry {
                    name: name.to_vec(),
                    node: inode_no,
                    kind: self.entry_kind(inode_no, dirent::FILE_TYPE.get(e))?,
                });
            }
            at += rec_len;
        }
        Ok(())
    }

    /// The kind an entry records, or — without a file type in the entry (ext2 without
    /// `filetype`) — the one its inode says.
    fn entry_kind(&self, node: NodeId, file_type: u8) -> Result<FileKind> {
        match dirent::kind_of(file_type) {
            Some(kind) => Ok(kind),
            None => self.kind_of(node, &self.inode(node)?),
        }
    }
}
