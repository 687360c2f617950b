//! Hashed (htree, dir_index) directories: the half-MD4 name hash (its signed- or
//! unsigned-char variant, as the superblock is flagged), and a directory laid out as a root index block, optional
//! second-level index blocks, and leaf blocks holding the entries in hash order. Every index
//! block carries a dx tail checksum and every leaf the usual directory tail (metadata_csum).

use super::super::ondisk::{dirent, dx, sb};
use super::csum;

/// How names are hashed: the superblock's `s_hash_seed` words (all zero means the default
/// seed) and whether name bytes count as signed chars (`signed_directory_hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKey {
    pub seed: [u32; 4],
    pub signed: bool,
}

/// `(hash, minor hash)` of `name` under `key`.
pub fn half_md4(name: &[u8], key: HashKey) -> (u32, u32) {
    let mut buf = if key.seed == [0; 4] {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    } else {
        key.seed
    };
    let mut rest = name;
    loop {
        let mut input = [0u32; 8];
        str2hashbuf(rest, &mut input, key.signed);
        transform(&mut buf, &input);
        if rest.len() <= 32 {
            break;
        }
        rest = &rest[32..];
    }
    (buf[1] & !1, buf[2])
}

/// Packs up to 32 name bytes into eight words; `signed` sign-extends each byte first.
fn str2hashbuf(msg: &[u8], out: &mut [u32; 8], signed: bool) {
    let len = msg.len() as u32;
    let mut pad = len | (len << 8);
    pad |= pad << 16;
    let mut val = pad;
    let take = msg.len().min(32);
    let mut at = 0;
    for (i, &c) in msg[..take].iter().enumerate() {
        let c = if signed { c as i8 as u32 } else { u32::from(c) };
        val = c.wrapping_add(val << 8);
        if i % 4 == 3 {
            out[at] = val;
            at += 1;
            val = pad;
        }
    }
    if at < 8 {
        out[at] = val;
        at += 1;
    }
    while at < 8 {
        out[at] = pad;
        at += 1;
    }
}

fn transform(buf: &mut [u32; 4], x: &[u32; 8]) {
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let (mut a, mut b, mut c, mut d) = (buf[0], buf[1], buf[2], buf[3]);
    macro_rules! round {
        ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    round!(f, a, b, c, d, x[0], 3);
    round!(f, d, a, b, c, x[1], 7);
    round!(f, c, d, a, b, x[2], 11);
    round!(f, b, c, d, a, x[3], 19);
    round!(f, a, b, c, d, x[4], 3);
    round!(f, d, a, b, c, x[5], 7);
    round!(f, c, d, a, b, x[6], 11);
    round!(f, b, c, d, a, x[7], 19);
    round!(g, a, b, c, d, x[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, x[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, x[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, x[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, x[6].wrapping_add(K2), 13);
    round!(h, a, b, c, d, x[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, x[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, x[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, x[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, x[4].wrapping_add(K3), 15);
    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// Sets the dx tail checksum of an index block whose index (count/limit header) is at
/// `index_at`.
fn set_dx_tail(seed: u32, block: &mut [u8], index_at: usize) {
    let limit = usize::from(dx::LIMIT.get(&block[index_at..]));
    let count = usize::from(dx::COUNT.get(&block[index_at..]));
    let tail = index_at + limit * dx::ENTRY_SIZE;
    block[tail..tail + dx::TAIL_SIZE].fill(0);
    let c = csum::crc32c_le(seed, &block[..index_at + count * dx::ENTRY_SIZE]);
    let c = csum::crc32c_le(c, &block[tail..tail + dx::TAIL_CHECKSUM.offset]);
    let c = csum::crc32c_le(c, &[0; 4]);
    dx::TAIL_CHECKSUM.set(&mut block[tail..], c);
}

/// Fills an index — (hash, logical block) entries, the first hash unused — into `index`,
/// with room for `limit`.
fn fill_index(index: &mut [u8], limit: usize, entries: &[(u32, u32)]) {
    dx::LIMIT.set(index, limit as u16);
    dx::COUNT.set(index, entries.len() as u16);
    dx::block(0).set(index, entries[0].1);
    for (i, (hash, blk)) in entries.iter().enumerate().skip(1) {
        dx::hash(i).set(index, *hash);
        dx::block(i).set(index, *blk);
    }
}

/// An index block with its index at `index_at` holding `entries`, checksummed.
fn finish_index(block: &mut [u8], index_at: usize, entries: &[(u32, u32)], inode_seed: u32) {
    let limit = dx::limit(block.len(), index_at);
    fill_index(&mut block[index_at..], limit, entries);
    set_dx_tail(inode_seed, block, index_at);
}

/// A directory entry to write: name, inode, file type.
pub type DirEntry = (Vec<u8>, u32, u8);

/// Index entries: (hash, logical block).
type Index = Vec<(u32, u32)>;

/// Leaf blocks holding `entries` in hash order, each with the hash of its first entry (odd
/// when the leaf continues a run of equal hashes from the previous one).
fn leaves(entries: &[DirEntry], bs: usize, inode_seed: u32, key: HashKey) -> Vec<(u32, Vec<u8>)> {
    let mut hashed: Vec<(u32, u32, &DirEntry)> = entries
        .iter()
        .map(|e| {
            let (h, m) = half_md4(&e.0, key);
            (h, m, e)
        })
        .collect();
    hashed.sort_by_key(|e| (e.0, e.1));
    let mut first_hashes = Vec::new();
    let blocks = super::dir::pack(
        hashed
            .iter()
            .map(|(_, _, (n, i, ft))| (n.as_slice(), *i, *ft)),
        bs,
        inode_seed,
        |i| {
            let continues = i > 0 && hashed[i - 1].0 == hashed[i].0;
            first_hashes.push(hashed[i].0 | u32::from(continues));
        },
    );
    first_hashes.resize(blocks.len(), 0);
    first_hashes.into_iter().zip(blocks).collect()
}

/// The root block: `.` and `..` entries, the root info, and room for the index.
fn root_block(ino: u32, parent: u32, bs: usize) -> Vec<u8> {
    let dir = dirent::file_type(super::FileKind::Dir);
    let mut root = vec![0u8; bs];
    dirent::put(&mut root[dx::DOT..], ino, dx::DOT_REC_LEN, b".", dir);
    dirent::put(&mut root[dx::DOTDOT..], parent, bs - dx::DOTDOT, b"..", dir);
    dx::HASH_VERSION.set(&mut root, sb::HASH_HALF_MD4);
    dx::INFO_LENGTH.set(&mut root, dx::INFO_LENGTH_VALUE);
    root
}

/// The blocks of an indexed directory, in logical order, or `None` when even two index
/// levels cannot hold it. `entries` excludes `.` and `..`; each is (name, inode, file type).
pub fn indexed_dir(
    ino: u32,
    parent: u32,
    entries: &[DirEntry],
    bs: usize,
    inode_seed: u32,
    key: HashKey,
) -> Option<Vec<Vec<u8>>> {
    let leaves = leaves(entries, bs, inode_seed, key);
    let mut root = root_block(ino, parent, bs);
    let mut out = vec![];
    if leaves.len() <= dx::limit(bs, dx::ROOT_INDEX) {
        // Root at block 0, leaves at 1..
        let index: Index = leaves
            .iter()
            .enumerate()
            .map(|(i, (h, _))| (*h, i as u32 + 1))
            .collect();
        finish_index(&mut root, dx::ROOT_INDEX, &index, inode_seed);
        out.push(root);
        out.extend(leaves.into_iter().map(|l| l.1));
        return Some(out);
    }
    let (root_index, nodes) = index_nodes(&leaves, bs, inode_seed)?;
    dx::INDIRECT_LEVELS.set(&mut root, 1);
    finish_index(&mut root, dx::ROOT_INDEX, &root_index, inode_seed);
    out.push(root);
    out.extend(nodes);
    out.extend(leaves.into_iter().map(|l| l.1));
    Some(out)
}

/// Two levels: the root's index and the interior index blocks (at blocks 1..=n, the leaves
/// after them), or `None` when the root cannot index that many.
fn index_nodes(
    leaves: &[(u32, Vec<u8>)],
    bs: usize,
    inode_seed: u32,
) -> Option<(Index, Vec<Vec<u8>>)> {
    let node_limit = dx::limit(bs, dx::NODE_INDEX);
    let nodes = leaves.len().div_ceil(node_limit);
    if nodes > dx::limit(bs, dx::ROOT_INDEX) {
        return None;
    }
    let mut root_index = Vec::new();
    let mut node_blocks = Vec::new();
    for (n, chunk) in leaves.chunks(node_limit).enumerate() {
        let first_leaf = 1 + nodes + n * node_limit;
        let index: Index = chunk
            .iter()
            .enumerate()
            .map(|(i, (h, _))| (*h, (first_leaf + i) as u32))
            .collect();
        let mut node = vec![0u8; bs];
        // A fake, empty directory entry covering the block.
        dirent::REC_LEN.set(&mut node, bs as u16);
        finish_index(&mut node, dx::NODE_INDEX, &index, inode_seed);
        root_index.push((chunk[0].0, (1 + n) as u32));
        node_blocks.push(node);
    }
    Some((root_index, node_blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: [u32; 4]) -> HashKey {
        HashKey {
            seed,
            signed: false,
        }
    }

    #[test]
    fn hashes_are_deterministic_and_even() {
        let (h, _) = half_md4(b"lost+found", key([0; 4]));
        assert_eq!(h & 1, 0);
        let k = key([1, 2, 3, 4]);
        assert_eq!(half_md4(b"a", k), half_md4(b"a", k));
        assert_ne!(half_md4(b"a", key([0; 4])), half_md4(b"b", key([0; 4])));
        // Names longer than one 32-byte round are hashed in rounds.
        let long = vec![b'x'; 100];
        assert_ne!(
            half_md4(&long, key([0; 4])),
            half_md4(&long[..99], key([0; 4]))
        );
    }

    #[test]
    fn signed_and_unsigned_hashes_differ_only_past_ascii() {
        let signed = HashKey {
            seed: [5, 6, 7, 8],
            signed: true,
        };
        let unsigned = key([5, 6, 7, 8]);
        assert_eq!(half_md4(b"plain", signed), half_md4(b"plain", unsigned));
        let name = "caf\u{e9}".as_bytes();
        assert_ne!(half_md4(name, signed), half_md4(name, unsigned));
    }
}
