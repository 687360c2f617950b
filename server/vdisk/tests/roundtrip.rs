//! Round trips without root or external tools: random patterns written through our qcow2 and
//! VHDX writers (into memory or a sparse temporary file), flushed, and read back through our
//! readers — the same image object, and the file opened afresh — against a reference.
//!
//! Large virtual disks are sparse: the reference keeps only the 4 KiB pages written, and the
//! check reads every page written plus random pages never written (which must read as zeros).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice, MemoryDevice};
use diskferry_vdisk::qcow2::Qcow2;
use diskferry_vdisk::vhdx::Vhdx;
use diskferry_vdisk::{open_image, Detected};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;

/// What a sparse disk should hold: pages written, everything else zeros.
#[derive(Default)]
struct Sparse {
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Sparse {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let (page, in_page) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0; PAGE as usize]);
            p[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    fn page(&self, page: u64) -> Vec<u8> {
        self.pages
            .get(&page)
            .cloned()
            .unwrap_or_else(|| vec![0; PAGE as usize])
    }
}

/// Writes `count` random patterns of random sizes at random offsets of `image` (and at the
/// offsets in `hot`, where layouts change), recording them in `reference`.
fn write_patterns(
    image: &dyn BlockDevice,
    count: usize,
    hot: &[u64],
    rng: &mut StdRng,
    reference: &mut Sparse,
) {
    let size = image.size();
    for i in 0..count {
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..512),
            1 => rng.gen_range(512..64 * 1024),
            2 => rng.gen_range(64 * 1024..3 * MIB as usize),
            _ => PAGE as usize,
        };
        let offset = match hot.get(i % (hot.len() + 3)) {
            Some(&h) => h.saturating_sub(rng.gen_range(0..len as u64)),
            None => rng.gen_range(0..size - len as u64),
        }
        .min(size - len as u64);
        // A pattern that tells pieces apart: a seed byte, then a counter.
        let seed: u8 = rng.gen();
        let data: Vec<u8> = (0..len)
            .map(|k| seed.wrapping_add((k / 7) as u8) ^ (k as u8))
            .collect();
        image.write_at(&data, offset).unwrap();
        reference.write(offset, &data);
    }
}

/// Every page written, and as many random pages, read back as the reference says.
fn check(image: &dyn BlockDevice, reference: &Sparse, rng: &mut StdRng, what: &str) {
    let size = image.size();
    let random: Vec<u64> = (0..reference.pages.len())
        .map(|_| rng.gen_range(0..size.div_ceil(PAGE)))
        .collect();
    for page in reference.pages.keys().copied().chain(random) {
        // The last page may be cut by the end of the disk.
        let mut buf = vec![0u8; PAGE.min(size - page * PAGE) as usize];
        image.read_at(&mut buf, page * PAGE).unwrap();
        assert!(
            buf == reference.page(page)[..buf.len()],
            "{what}: page {page} (offset {}) differs",
            page * PAGE
        );
    }
}

fn temp_device(dir: &Path, name: &str) -> (std::path::PathBuf, Arc<FileDevice>) {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let dev = Arc::new(FileDevice::from_file(file, &path, true).unwrap());
    (path, dev)
}

/// A VHDX of `size` bytes with `sector`-byte sectors written and read back through a file,
/// with patterns around the end of the first chunk (where the first sector-bitmap entry sits
/// in the BAT) and around 4 GiB.
fn vhdx_through_a_file(size: u64, sector: u32, block: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (path, dev) = temp_device(dir.path(), "disk.vhdx");
    let image = Vhdx::create(dev, &path, size, block, sector).unwrap();
    let chunk = (1u64 << 23) * u64::from(sector);
    let mut rng = StdRng::seed_from_u64(seed);
    let hot = [4 * GIB, chunk, chunk + block, size - 1];
    let mut reference = Sparse::default();
    write_patterns(&image, 300, &hot, &mut rng, &mut reference);
    check(&image, &reference, &mut rng, "before flush");
    image.flush().unwrap();
    drop(image);
    let (detected, reopened) = open_image(&path, false).unwrap();
    assert_eq!(detected, Detected::Vhdx);
    assert_eq!(
        (reopened.size(), reopened.logical_sector_size()),
        (size, sector)
    );
    check(&*reopened, &reference, &mut rng, "reopened");
}

#[test]
fn vhdx_past_4_gib_with_512_byte_sectors_reads_back() {
    // 32 MiB blocks: the first sector-bitmap entry follows block 127, at 4 GiB.
    vhdx_through_a_file(6 * GIB + 3 * MIB, 512, 32 * MIB, 1);
}

#[test]
fn vhdx_past_the_first_chunk_with_4096_byte_sectors_reads_back() {
    // A chunk is 2^23 sectors: 32 GiB of 4096-byte sectors.
    vhdx_through_a_file(40 * GIB, 4096, 32 * MIB, 2);
}

#[test]
fn vhdx_random_writes_zeros_and_discards_match_a_reference_and_reopen() {
    let size = 40usize << 20;
    let file = Arc::new(MemoryDevice::new(0));
    let path = Path::new("m.vhdx");
    let image = Vhdx::create(file.clone(), path, size as u64, MIB, 4096).unwrap();
    let mut reference = vec![0u8; size];
    let mut rng = StdRng::seed_from_u64(21);
    for _ in 0..2000 {
        let len = if rng.gen_bool(0.2) {
            MIB as usize
        } else {
            rng.gen_range(1..300_000)
        };
        let offset = if len == MIB as usize {
            rng.gen_range(0..40) * MIB as usize
        } else {
            rng.gen_range(0..size - len)
        };
        let len = len.min(size - offset);
        match rng.gen_range(0..10) {
            0..=6 => {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                image.write_at(&data, offset as u64).unwrap();
                reference[offset..offset + len].copy_from_slice(&data);
            }
            7 => {
                image.write_at(&vec![0; len], offset as u64).unwrap();
                reference[offset..offset + len].fill(0);
            }
            _ => {
                image.discard(offset as u64, len as u64).unwrap();
                reference[offset..offset + len].fill(0);
            }
        }
    }
    let mut got = vec![0u8; size];
    image.read_at(&mut got, 0).unwrap();
    assert!(got == reference, "in-memory view differs");
    image.flush().unwrap();
    drop(image);
    let reopened = Vhdx::open(file, path).unwrap();
    reopened.read_at(&mut got, 0).unwrap();
    assert!(got == reference, "reopened image differs");
}

#[test]
fn qcow2_past_4_gib_reads_back_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, dev) = temp_device(dir.path(), "disk.qcow2");
    let size = 6 * GIB + 12345 * 512;
    let image = Qcow2::create(dev, &path, size, 16).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    // 64 KiB clusters: one L2 table maps 512 MiB, so 4 GiB starts a new one.
    let hot = [4 * GIB, 512 * MIB, size - 1];
    let mut reference = Sparse::default();
    write_patterns(&image, 300, &hot, &mut rng, &mut reference);
    check(&image, &reference, &mut rng, "before flush");
    image.flush().unwrap();
    drop(image);
    let (detected, reopened) = open_image(&path, false).unwrap();
    assert_eq!((detected, reopened.size()), (Detected::Qcow2, size));
    check(&*reopened, &reference, &mut rng, "reopened");
    drop(reopened);
    // Written again after reopening for writing (in place and copy-on-write), read back.
    let file = Arc::new(FileDevice::open(&path, true).unwrap());
    let image = Qcow2::open_writable(file, &path, None).unwrap();
    write_patterns(&image, 100, &hot, &mut rng, &mut reference);
    image.flush().unwrap();
    drop(image);
    let (_, reopened) = open_image(&path, false).unwrap();
    check(&*reopened, &reference, &mut rng, "second round, reopened");
}

#[test]
fn qcow2_in_memory_compressed_round_trip() {
    let file = Arc::new(MemoryDevice::new(0));
    let path = Path::new("c.qcow2");
    let image = Qcow2::create(file.clone(), path, 64 * MIB, 16).unwrap();
    image.set_compress(true).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let mut reference = Sparse::default();
    write_patterns(&image, 200, &[MIB], &mut rng, &mut reference);
    image.flush().unwrap();
    drop(image);
    let reopened = Qcow2::open(file, path).unwrap();
    check(&reopened, &reference, &mut rng, "compressed, reopened");
}
