//! Inline data (`inline_data`): the bytes of a small file, directory or symlink kept in its
//! inode — the 60 bytes of `i_block`, continued in the value of the `system.data` extended
//! attribute stored in the inode. (An inline directory's bytes begin with its parent's inode
//! number, then entries; see `dir`.)

use super::super::{NodeId, Result};
use super::error::Corruption;
use super::inode::{parse_xattrs, Inode, XattrValue};
use super::ondisk::inode;
use super::Ext4;

/// The extended attribute holding what does not fit in `i_block`; it is part of the data, not
/// an attribute tools show.
pub(super) const DATA_ATTR: &str = "system.data";

impl Ext4 {
    /// The inline bytes of an inode with `INLINE_DATA_FL`, at most `i_size` of them.
    pub(super) fn inline_data(&self, node: NodeId, ino: &Inode) -> Result<Vec<u8>> {
        let mut data = ino.i_block().to_vec();
        if let Some(area) = ino.inline_xattr_area() {
            let attrs = parse_xattrs(area, area).map_err(|e| e.in_inode(node))?;
            let more = attrs.into_iter().find(|(name, _)| name == DATA_ATTR);
            if let Some((_, XattrValue::Here(more))) = more {
                data.extend(more);
            }
        }
        // `i_block` and the rest of the inode are all an inode holds.
        if ino.size > (inode::I_BLOCK_LEN as u64) + self.sb.inode_size {
            return Err(Corruption::InlineTooLarge { size: ino.size }.in_inode(node));
        }
        data.truncate(ino.size as usize);
        Ok(data)
    }
}
