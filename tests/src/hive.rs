//! A minimal Windows registry hive writer for fixtures (regf base block, one hive bin, `nk`
//! keys with `lf` subkey lists, `vk` values), so Windows detection can be tested against a
//! hive whose content is known. The reader under test is the `nt-hive` crate.

/// A value to store: REG_SZ or REG_DWORD.
pub enum Value {
    Sz(&'static str),
    Dword(u32),
}

/// A key: its name, values and subkeys.
pub struct Key {
    pub name: &'static str,
    pub values: Vec<(&'static str, Value)>,
    pub subkeys: Vec<Key>,
}

/// A key with subkeys only.
pub fn key(name: &'static str, subkeys: Vec<Key>) -> Key {
    Key {
        name,
        values: Vec::new(),
        subkeys,
    }
}

/// A key with values only.
pub fn leaf(name: &'static str, values: Vec<(&'static str, Value)>) -> Key {
    Key {
        name,
        values,
        subkeys: Vec::new(),
    }
}

/// The first hive bin's bytes as cells are appended; offsets are relative to the bin start.
struct Cells(Vec<u8>);

impl Cells {
    /// Appends a cell holding `data` and returns its offset.
    fn push(&mut self, data: &[u8]) -> u32 {
        let at = self.0.len() as u32;
        let size = (4 + data.len()).next_multiple_of(8);
        self.0.extend_from_slice(&(-(size as i32)).to_le_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(at as usize + size, 0);
        at
    }

    fn patch32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
}

fn put_key(cells: &mut Cells, k: &Key, parent: u32, root: bool) -> u32 {
    let mut nk = vec![0u8; 76];
    nk[..2].copy_from_slice(b"nk");
    let flags: u16 = 0x20 | if root { 0x04 } else { 0 };
    nk[2..4].copy_from_slice(&flags.to_le_bytes());
    nk[16..20].copy_from_slice(&parent.to_le_bytes());
    nk[28..32].copy_from_slice(&u32::MAX.to_le_bytes()); // subkey list, patched below
    nk[32..36].copy_from_slice(&u32::MAX.to_le_bytes()); // volatile subkey list
    nk[40..44].copy_from_slice(&u32::MAX.to_le_bytes()); // value list, patched below
    nk[44..48].copy_from_slice(&u32::MAX.to_le_bytes()); // security
    nk[48..52].copy_from_slice(&u32::MAX.to_le_bytes()); // class name
    nk[72..74].copy_from_slice(&(k.name.len() as u16).to_le_bytes());
    nk.extend_from_slice(k.name.as_bytes());
    let me = cells.push(&nk);
    let field = |off: usize| me as usize + 4 + off;
    if !k.values.is_empty() {
        let mut offsets = Vec::new();
        for (name, value) in &k.values {
            let (ty, data): (u32, Vec<u8>) = match value {
                Value::Sz(s) => (
                    1,
                    s.encode_utf16()
                        .chain([0])
                        .flat_map(u16::to_le_bytes)
                        .collect(),
                ),
                Value::Dword(d) => (4, d.to_le_bytes().to_vec()),
            };
            let mut vk = vec![0u8; 20];
            vk[..2].copy_from_slice(b"vk");
            vk[2..4].copy_from_slice(&(name.len() as u16).to_le_bytes());
            if ty == 4 {
                vk[4..8].copy_from_slice(&(4u32 | 0x8000_0000).to_le_bytes());
                vk[8..12].copy_from_slice(&data);
            } else {
                let data_at = cells.push(&data);
                vk[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
                vk[8..12].copy_from_slice(&data_at.to_le_bytes());
            }
            vk[12..16].copy_from_slice(&ty.to_le_bytes());
            vk[16..18].copy_from_slice(&1u16.to_le_bytes()); // ASCII name
            vk.extend_from_slice(name.as_bytes());
            offsets.push(cells.push(&vk));
        }
        let list: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let list_at = cells.push(&list);
        cells.patch32(field(36), offsets.len() as u32);
        cells.patch32(field(40), list_at);
    }
    if !k.subkeys.is_empty() {
        let mut sorted: Vec<&Key> = k.subkeys.iter().collect();
        sorted.sort_by_key(|s| s.name.to_ascii_uppercase());
        let children: Vec<(u32, &Key)> = sorted
            .iter()
            .map(|s| (put_key(cells, s, me, false), *s))
            .collect();
        let mut lf = b"lf".to_vec();
        lf.extend_from_slice(&(children.len() as u16).to_le_bytes());
        for (at, s) in &children {
            lf.extend_from_slice(&at.to_le_bytes());
            let mut hint = [0u8; 4];
            for (i, b) in s.name.bytes().take(4).enumerate() {
                hint[i] = b;
            }
            lf.extend_from_slice(&hint);
        }
        let lf_at = cells.push(&lf);
        cells.patch32(field(20), children.len() as u32);
        cells.patch32(field(28), lf_at);
    }
    me
}

/// The bytes of a hive file whose root key holds `root`'s values and subkeys.
pub fn hive(root: &Key) -> Vec<u8> {
    // Cell offsets are relative to the first hive bin, whose 32-byte header comes first.
    let mut cells = Cells(vec![0u8; 32]);
    let root_at = put_key(&mut cells, root, 0, true);
    let mut bin = cells.0;
    let used = bin.len();
    let bin_size = used.next_multiple_of(4096);
    bin.resize(bin_size, 0);
    bin[..4].copy_from_slice(b"hbin");
    bin[8..12].copy_from_slice(&(bin_size as u32).to_le_bytes());
    if used < bin_size {
        // The rest of the bin is one free cell.
        bin[used..used + 4].copy_from_slice(&((bin_size - used) as i32).to_le_bytes());
    }
    let mut base = vec![0u8; 4096];
    base[..4].copy_from_slice(b"regf");
    base[4..8].copy_from_slice(&1u32.to_le_bytes()); // sequence numbers, equal: clean
    base[8..12].copy_from_slice(&1u32.to_le_bytes());
    base[20..24].copy_from_slice(&1u32.to_le_bytes()); // major version
    base[24..28].copy_from_slice(&5u32.to_le_bytes()); // minor version
    base[32..36].copy_from_slice(&1u32.to_le_bytes()); // file format: direct memory load
    base[36..40].copy_from_slice(&root_at.to_le_bytes());
    base[40..44].copy_from_slice(&(bin_size as u32).to_le_bytes());
    base[44..48].copy_from_slice(&1u32.to_le_bytes()); // clustering factor
    let sum = base[..508].chunks_exact(4).fold(0u32, |x, c| {
        x ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]])
    });
    let sum = match sum {
        0 => 1,
        u32::MAX => u32::MAX - 1,
        s => s,
    };
    base[508..512].copy_from_slice(&sum.to_le_bytes());
    base.extend_from_slice(&bin);
    base
}
