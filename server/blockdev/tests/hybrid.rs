//! The hybrid RAM + spill-file volume and the copy-on-write device, against a byte model.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{
    map_device, BlockDevice, BlockError, CowDevice, HybridError, HybridOptions, HybridVolume,
    MemoryDevice, Region, CLUSTER,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const C: usize = CLUSTER as usize;

fn volume(size: u64, ram_clusters: u64, spill: Option<&Path>) -> HybridVolume {
    let options = HybridOptions {
        ram_limit: ram_clusters * CLUSTER,
        spill: spill.map(Path::to_path_buf),
    };
    HybridVolume::new(size, options).unwrap()
}

fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    dev.read_at(&mut buf, offset).unwrap();
    buf
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// What the device must hold: bytes, and whether each byte is still specified (not trimmed
/// since it was last written).
struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    fn apply(&mut self, dev: &dyn BlockDevice, rng: &mut StdRng) {
        let size = self.data.len();
        let at = rng.gen_range(0..size);
        let len = rng.gen_range(0..=(size - at).min(3 * C + 777));
        let r = at..at + len;
        match rng.gen_range(0..10) {
            0..=5 => {
                let bytes = if rng.gen_bool(0.15) {
                    vec![0; len]
                } else {
                    random_bytes(rng, len)
                };
                dev.write_at(&bytes, at as u64).unwrap();
                self.data[r.clone()].copy_from_slice(&bytes);
                self.known[r].fill(true);
            }
            6 | 7 => {
                dev.write_zeroes(at as u64, len as u64).unwrap();
                self.data[r.clone()].fill(0);
                self.known[r].fill(true);
            }
            _ => {
                dev.discard(at as u64, len as u64).unwrap();
                self.known[r].fill(false);
            }
        }
    }

    fn check(&self, dev: &dyn BlockDevice, rng: &mut StdRng) {
        for _ in 0..4 {
            let at = rng.gen_range(0..self.data.len());
            let len = rng.gen_range(0..=(self.data.len() - at).min(5 * C));
            let got = read(dev, at as u64, len);
            for (i, b) in got.iter().enumerate() {
                if self.known[at + i] {
                    assert_eq!(*b, self.data[at + i], "byte {}", at + i);
                }
            }
        }
    }
}

/// Every extent `block_status` calls Zero reads as zeros.
fn zero_extents_read_zero(dev: &dyn BlockDevice) {
    for e in map_device(dev).unwrap() {
        if e.region == Region::Zero {
            assert!(read(dev, e.offset, e.len as usize).iter().all(|&b| b == 0));
        }
    }
}

fn run_model(dev: &dyn BlockDevice, initial: Vec<u8>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let known = vec![true; initial.len()];
    let mut model = Model {
        data: initial,
        known,
    };
    for step in 0..400 {
        model.apply(dev, &mut rng);
        model.check(dev, &mut rng);
        if step % 50 == 0 {
            zero_extents_read_zero(dev);
        }
    }
}

/// A size with a short last cluster.
const MODEL_SIZE: u64 = 20 * CLUSTER + 12345;

#[test]
fn random_writes_zeroes_and_trims_read_back_as_the_model_in_ram_and_spilled() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, ram, spill) in [
        (1, 64, None),
        (2, 3, Some(dir.path().join("spill"))),
        (3, 0, Some(dir.path().join("s0"))),
    ] {
        let vol = volume(MODEL_SIZE, ram, spill.as_deref());
        run_model(&vol, vec![0; MODEL_SIZE as usize], seed);
        let stats = vol.stats();
        assert!(stats.ram_clusters <= ram, "{stats:?}");
        if ram == 0 {
            assert_eq!(stats.ram_bytes, 0);
        }
    }
}

#[test]
fn copy_on_write_reads_as_the_model_over_a_random_base_that_never_changes() {
    let dir = tempfile::tempdir().unwrap();
    let base_bytes = random_bytes(&mut StdRng::seed_from_u64(7), MODEL_SIZE as usize);
    let base = Arc::new(MemoryDevice::read_only(base_bytes.clone()));
    let top = Arc::new(volume(MODEL_SIZE, 4, Some(&dir.path().join("spill"))));
    let cow = CowDevice::new(base.clone(), top).unwrap();
    run_model(&cow, base_bytes.clone(), 11);
    assert_eq!(base.contents(), base_bytes);
}

fn pattern(i: usize) -> Vec<u8> {
    (0..C).map(|j| (i * 31 + j % 251 + 1) as u8).collect()
}

#[test]
fn clusters_past_the_ram_limit_spill_to_the_file_and_trimming_them_punches_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spill");
    let vol = volume(64 * CLUSTER, 4, Some(&path));
    for i in 0..20 {
        vol.write_at(&pattern(i), i as u64 * CLUSTER).unwrap();
    }
    let s = vol.stats();
    assert_eq!(
        (s.ram_clusters, s.file_clusters, s.zero_clusters),
        (4, 16, 0)
    );
    assert_eq!((s.ram_bytes, s.spill_bytes), (4 * CLUSTER, 16 * CLUSTER));
    for i in 0..20 {
        assert_eq!(read(&vol, i as u64 * CLUSTER, C), pattern(i), "cluster {i}");
    }
    let before = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert_eq!(s.spill_disk_bytes, Some(before));
    vol.discard(4 * CLUSTER, 16 * CLUSTER).unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
    eprintln!("spill file allocated: {before} bytes with 16 clusters, {after} after trimming them");
    assert!(
        before >= 16 * CLUSTER && after < CLUSTER,
        "{before} -> {after}"
    );
    let s = vol.stats();
    assert_eq!((s.ram_clusters, s.file_clusters), (4, 0));
    assert!(read(&vol, 4 * CLUSTER, 16 * C).iter().all(|&b| b == 0));
    // Punched slots are reused before the file grows.
    let len = std::fs::metadata(&path).unwrap().len();
    vol.write_at(&pattern(40), 40 * CLUSTER).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_eq!(read(&vol, 40 * CLUSTER, C), pattern(40));
    drop(vol);
    assert!(!path.exists(), "the spill file is removed with the volume");
}

#[test]
fn an_existing_spill_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, b"keep me").unwrap();
    let options = HybridOptions {
        ram_limit: CLUSTER,
        spill: Some(path.clone()),
    };
    let err = HybridVolume::new(CLUSTER, options).unwrap_err();
    assert!(matches!(err, HybridError::SpillExists { .. }), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

/// The typed error inside a write's `BlockError`.
fn hybrid_error(e: &BlockError) -> &HybridError {
    let BlockError::Io { source, .. } = e else {
        panic!("not an I/O error: {e}");
    };
    assert_eq!(source.kind(), io::ErrorKind::StorageFull);
    source.get_ref().unwrap().downcast_ref().unwrap()
}

#[test]
fn a_full_ram_redo_without_a_spill_file_refuses_new_clusters_and_keeps_what_it_holds() {
    let vol = volume(16 * CLUSTER, 4, None);
    for i in 0..4 {
        vol.write_at(&pattern(i), i as u64 * CLUSTER).unwrap();
    }
    let err = vol.write_at(&pattern(4), 4 * CLUSTER).unwrap_err();
    assert!(matches!(hybrid_error(&err), HybridError::RamFull { .. }));
    assert!(err.to_string().contains("spill file"), "{err}");
    // A write over a held cluster and into a new one is refused whole.
    let err = vol.write_at(&[9; 100], 4 * CLUSTER - 50).unwrap_err();
    assert!(matches!(hybrid_error(&err), HybridError::RamFull { .. }));
    for i in 0..4 {
        assert_eq!(read(&vol, i as u64 * CLUSTER, C), pattern(i), "cluster {i}");
    }
    // Zeroing needs no room; a trimmed cluster's page is reused.
    vol.write_zeroes(8 * CLUSTER, 8 * CLUSTER).unwrap();
    vol.discard(0, CLUSTER).unwrap();
    vol.write_at(&pattern(5), 5 * CLUSTER).unwrap();
    assert_eq!(read(&vol, 5 * CLUSTER, C), pattern(5));
    let s = vol.stats();
    assert_eq!((s.ram_clusters, s.zero_clusters), (4, 8));
}

#[test]
fn block_status_and_allocation_tell_data_zero_and_unallocated_apart() {
    let vol = volume(10 * CLUSTER, 8, None);
    vol.write_at(&[1; 10], CLUSTER + 5).unwrap();
    vol.write_zeroes(3 * CLUSTER, 2 * CLUSTER).unwrap();
    vol.write_at(&vec![0; C], 6 * CLUSTER).unwrap();
    let map: Vec<(u64, u64, Region)> = map_device(&vol)
        .unwrap()
        .into_iter()
        .map(|e| (e.offset / CLUSTER, e.len / CLUSTER, e.region))
        .collect();
    assert_eq!(
        map,
        vec![
            (0, 1, Region::Zero),
            (1, 1, Region::Data),
            (2, 8, Region::Zero)
        ]
    );
    let alloc: Vec<(u64, bool)> = vol
        .allocated(0, 10 * CLUSTER)
        .into_iter()
        .map(|(r, a)| (r.start / CLUSTER, a))
        .collect();
    assert_eq!(
        alloc,
        vec![
            (0, false),
            (1, true),
            (2, false),
            (3, true),
            (5, false),
            (6, true),
            (7, false)
        ]
    );
    assert_eq!(vol.stats().zero_clusters, 3);
}

#[test]
fn copy_on_write_keeps_the_base_around_partial_writes_and_falls_back_to_it_on_trim() {
    let base_bytes = random_bytes(&mut StdRng::seed_from_u64(3), 8 * C);
    let base = Arc::new(MemoryDevice::read_only(base_bytes.clone()));
    let top = Arc::new(volume(8 * CLUSTER, 8, None));
    let cow = CowDevice::new(base.clone(), top.clone()).unwrap();
    cow.write_at(&[7; 512], CLUSTER + 4096).unwrap();
    let mut expect = base_bytes.clone();
    expect[C + 4096..C + 4608].fill(7);
    cow.write_zeroes(3 * CLUSTER + 100, 2 * CLUSTER).unwrap();
    expect[3 * C + 100..5 * C + 100].fill(0);
    assert_eq!(read(&cow, 0, 8 * C), expect);
    assert_eq!(
        top.stats().zero_clusters,
        1,
        "cluster 4 is a whole zero cluster"
    );
    let status: Vec<Region> = map_device(&cow).unwrap().iter().map(|e| e.region).collect();
    assert_eq!(
        status,
        [
            Region::Unknown,
            Region::Data,
            Region::Unknown,
            Region::Data,
            Region::Zero,
            Region::Data,
            Region::Unknown
        ]
    );
    cow.discard(0, 8 * CLUSTER).unwrap();
    assert_eq!(read(&cow, 0, 8 * C), base_bytes);
    assert_eq!(base.contents(), base_bytes);
    assert!(CowDevice::new(base, Arc::new(volume(CLUSTER, 1, None))).is_err());
}

/// Four threads write (and zero) random pieces of their own regions and read them back;
/// neighbouring regions share a cluster. `initial` is what the device reads before.
fn hammer(dev: &dyn BlockDevice, region: usize, initial: &[u8]) {
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                let base = t as usize * region;
                let mut mine = initial[base..base + region].to_vec();
                for _ in 0..300 {
                    let at = rng.gen_range(0..region);
                    let len = rng.gen_range(1..=(region - at).min(C + 3000));
                    if rng.gen_bool(0.2) {
                        dev.write_zeroes((base + at) as u64, len as u64).unwrap();
                        mine[at..at + len].fill(0);
                    } else {
                        let bytes = random_bytes(&mut rng, len);
                        dev.write_at(&bytes, (base + at) as u64).unwrap();
                        mine[at..at + len].copy_from_slice(&bytes);
                    }
                    let at = rng.gen_range(0..region);
                    assert!(read(dev, (base + at) as u64, region - at) == mine[at..]);
                }
            });
        }
    });
}

#[test]
fn four_threads_write_and_read_disjoint_regions_that_share_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let region = 5 * C + 1000; // not cluster-aligned: neighbours share a cluster
    let size = 4 * region;
    let vol = volume(size as u64, 8, Some(&dir.path().join("spill")));
    hammer(&vol, region, &vec![0; size]);
    assert!(
        vol.stats().file_clusters > 0,
        "the test reaches the spill file"
    );

    let base_bytes = random_bytes(&mut StdRng::seed_from_u64(9), size);
    let base = Arc::new(MemoryDevice::read_only(base_bytes.clone()));
    let top = Arc::new(volume(size as u64, 8, Some(&dir.path().join("spill2"))));
    let cow = CowDevice::new(base.clone(), top).unwrap();
    hammer(&cow, region, &base_bytes);
    assert!(base.contents() == base_bytes);
}

#[test]
fn sizes_are_bounded_and_a_sparse_two_tib_volume_costs_only_its_bitmaps() {
    let err = HybridVolume::new(1 << 60, HybridOptions::default()).unwrap_err();
    assert!(matches!(err, HybridError::TooLarge { .. }), "{err}");
    let size = 2u64 << 40;
    let vol = volume(size, 4, None);
    vol.write_at(b"end", size - 3).unwrap();
    assert_eq!(read(&vol, size - 5, 5), b"\0\0end");
    assert!(vol.write_at(b"x", size).is_err());
    assert!(vol.read_at(&mut [0; 2], u64::MAX).is_err());
    assert!(vol.discard(u64::MAX - 1, 5).is_err());
    vol.write_at(b"middle", size / 2 + 1).unwrap();
    let map: Vec<(u64, u64, Region)> = map_device(&vol)
        .unwrap()
        .into_iter()
        .map(|e| (e.offset, e.len, e.region))
        .collect();
    let (mid, end) = (size / 2, size - CLUSTER);
    assert_eq!(
        map,
        [
            (0, mid, Region::Zero),
            (mid, CLUSTER, Region::Data),
            (mid + CLUSTER, end - mid - CLUSTER, Region::Zero),
            (end, CLUSTER, Region::Data)
        ]
    );
}
