//! Hashed (htree, dir_index) directories: the half-MD4 name hash (unsigned-char variant, the
//! filesystem is flagged so), and a directory laid out as a root index block, optional
//! second-level index blocks, and leaf blocks holding the entries in hash order. Every index
//! block carries a dx tail checksum and every leaf the usual directory tail (metadata_csum).

use super::csum;
use diskferry_layout::le::{put16, put32};

/// `(hash, minor hash)` of `name` under `seed` (the superblock's s_hash_seed words; all zero
/// means the default seed).
pub fn half_md4(name: &[u8], seed: [u32; 4]) -> (u32, u32) {
    let mut buf = if seed == [0; 4] {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    } else {
        seed
    };
    let mut rest = name;
    loop {
        let mut input = [0u32; 8];
        str2hashbuf(rest, &mut input);
        transform(&mut buf, &input);
        if rest.len() <= 32 {
            break;
        }
        rest = &rest[32..];
    }
    (buf[1] & !1, buf[2])
}

fn str2hashbuf(msg: &[u8], out: &mut [u32; 8]) {
    let len = msg.len() as u32;
    let mut pad = len | (len << 8);
    pad |= pad << 16;
    let mut val = pad;
    let take = msg.len().min(32);
    let mut at = 0;
    for (i, &c) in msg[..take].iter().enumerate() {
        val = u32::from(c).wrapping_add(val << 8);
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

/// Sets the dx tail checksum of an index block whose count/limit header is at `count_at`.
fn set_dx_tail(seed: u32, block: &mut [u8], count_at: usize) {
    let limit = usize::from(u16::from_le_bytes([block[count_at], block[count_at + 1]]));
    let count = usize::from(u16::from_le_bytes([
        block[count_at + 2],
        block[count_at + 3],
    ]));
    let tail = count_at + limit * 8;
    block[tail..tail + 8].fill(0);
    let c = csum::crc32c_le(seed, &block[..count_at + count * 8]);
    let c = csum::crc32c_le(c, &block[tail..tail + 4]);
    let c = csum::crc32c_le(c, &[0; 4]);
    put32(block, tail + 4, c);
}

/// Fills index entries (hash, logical block) into an index block at `count_at`.
fn fill_index(block: &mut [u8], count_at: usize, limit: usize, entries: &[(u32, u32)]) {
    put16(block, count_at, limit as u16);
    put16(block, count_at + 2, entries.len() as u16);
    put32(block, count_at + 4, entries[0].1);
    for (i, (hash, blk)) in entries.iter().enumerate().skip(1) {
        put32(block, count_at + 8 * i, *hash);
        put32(block, count_at + 8 * i + 4, *blk);
    }
}

/// A directory entry to write: name, inode, file type.
pub type DirEntry = (Vec<u8>, u32, u8);

/// The blocks of an indexed directory, in logical order, or `None` when even two index
/// levels cannot hold it. `entries` excludes `.` and `..`; each is (name, inode, file type).
pub fn indexed_dir(
    ino: u32,
    parent: u32,
    entries: &[DirEntry],
    bs: usize,
    inode_seed: u32,
    hash_seed: [u32; 4],
) -> Option<Vec<Vec<u8>>> {
    let mut hashed: Vec<(u32, u32, &DirEntry)> = entries
        .iter()
        .map(|e| {
            let (h, m) = half_md4(&e.0, hash_seed);
            (h, m, e)
        })
        .collect();
    hashed.sort_by_key(|e| (e.0, e.1));
    // Leaves: packed in hash order.
    let usable = bs - 12;
    let mut leaves: Vec<(u32, Vec<u8>)> = Vec::new(); // (first hash, block)
    let mut block = vec![0u8; bs];
    let mut at = 0usize;
    let mut last_at = 0usize;
    let mut first_hash = 0u32;
    let mut prev_hash = None;
    let close =
        |block: &mut Vec<u8>, last_at: usize, first_hash: u32, leaves: &mut Vec<(u32, Vec<u8>)>| {
            put16(block, last_at + 4, (usable - last_at) as u16);
            csum::set_dir_tail(inode_seed, block);
            leaves.push((first_hash, std::mem::replace(block, vec![0u8; bs])));
        };
    for (hash, _, (name, child, ft)) in &hashed {
        let len = (8 + name.len()).next_multiple_of(4);
        if at + len > usable {
            close(&mut block, last_at, first_hash, &mut leaves);
            at = 0;
        }
        if at == 0 {
            // A leaf starting inside a run of equal hashes is flagged as a continuation.
            first_hash = *hash | u32::from(prev_hash == Some(*hash));
        }
        put32(&mut block, at, *child);
        put16(&mut block, at + 4, len as u16);
        block[at + 6] = name.len() as u8;
        block[at + 7] = *ft;
        block[at + 8..at + 8 + name.len()].copy_from_slice(name);
        last_at = at;
        at += len;
        prev_hash = Some(*hash);
    }
    close(&mut block, last_at, first_hash, &mut leaves);

    let root_limit = (bs - 32 - 8) / 8;
    let node_limit = (bs - 8 - 8) / 8;
    let mut root = vec![0u8; bs];
    put32(&mut root, 0, ino);
    put16(&mut root, 4, 12);
    root[6] = 1;
    root[7] = 2;
    root[8] = b'.';
    put32(&mut root, 12, parent);
    put16(&mut root, 16, (bs - 12) as u16);
    root[18] = 2;
    root[19] = 2;
    root[20..22].copy_from_slice(b"..");
    root[24 + 4] = 1; // half_md4
    root[24 + 5] = 8; // info length
    let mut out = vec![];
    if leaves.len() <= root_limit {
        // Root at block 0, leaves at 1..
        let index: Vec<(u32, u32)> = leaves
            .iter()
            .enumerate()
            .map(|(i, (h, _))| (*h, i as u32 + 1))
            .collect();
        fill_index(&mut root, 32, root_limit, &index);
        set_dx_tail(inode_seed, &mut root, 32);
        out.push(root);
        out.extend(leaves.into_iter().map(|l| l.1));
        return Some(out);
    }
    // Two levels: root at 0, index nodes at 1..=n, leaves after them.
    let nodes = leaves.len().div_ceil(node_limit);
    if nodes > root_limit {
        return None;
    }
    root[24 + 6] = 1; // indirect levels
    let mut root_index = Vec::new();
    let mut node_blocks = Vec::new();
    for (n, chunk) in leaves.chunks(node_limit).enumerate() {
        let first_leaf = 1 + nodes + n * node_limit;
        let index: Vec<(u32, u32)> = chunk
            .iter()
            .enumerate()
            .map(|(i, (h, _))| (*h, (first_leaf + i) as u32))
            .collect();
        let mut node = vec![0u8; bs];
        put16(&mut node, 4, bs as u16); // a fake, empty directory entry covering the block
        fill_index(&mut node, 8, node_limit, &index);
        set_dx_tail(inode_seed, &mut node, 8);
        root_index.push((chunk[0].0, (1 + n) as u32));
        node_blocks.push(node);
    }
    fill_index(&mut root, 32, root_limit, &root_index);
    set_dx_tail(inode_seed, &mut root, 32);
    out.push(root);
    out.extend(node_blocks);
    out.extend(leaves.into_iter().map(|l| l.1));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_deterministic_and_even() {
        let (h, _) = half_md4(b"lost+found", [0; 4]);
        assert_eq!(h & 1, 0);
        assert_eq!(half_md4(b"a", [1, 2, 3, 4]), half_md4(b"a", [1, 2, 3, 4]));
        assert_ne!(half_md4(b"a", [0; 4]), half_md4(b"b", [0; 4]));
        // Names longer than one 32-byte round are hashed in rounds.
        let long = vec![b'x'; 100];
        assert_ne!(half_md4(&long, [0; 4]), half_md4(&long[..99], [0; 4]));
    }
}
