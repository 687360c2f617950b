//! Trimming a RAM redo gives its memory back to the kernel. Alone in its test binary (its own
//! process), so no other test's allocations move the figures.

use diskferry_blockdev::{BlockDevice, HybridOptions, HybridVolume, CLUSTER};

/// A `kB` figure from a `/proc` file, in bytes.
fn proc_kb(file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// The process's resident memory and the kernel's shared memory in use (where the RAM pool's
/// pages are).
fn memory() -> (u64, u64) {
    (
        proc_kb("/proc/self/status", "VmRSS:"),
        proc_kb("/proc/meminfo", "Shmem:"),
    )
}

const MIB: u64 = 1 << 20;

#[test]
fn trimming_clusters_gives_their_memory_back_even_when_they_are_scattered() {
    let clusters = 4096; // 256 MiB
    let bytes = clusters * CLUSTER;
    let options = HybridOptions {
        ram_limit: bytes,
        spill: None,
    };
    let vol = HybridVolume::new(2 * bytes, options).unwrap();
    let page: Vec<u8> = (0..CLUSTER).map(|i| i as u8 | 1).collect();
    let (rss0, shm0) = memory();
    for i in 0..clusters {
        vol.write_at(&page, i * CLUSTER).unwrap();
    }
    let (rss1, shm1) = memory();
    let held1 = vol.stats().ram_resident_bytes;
    for i in (0..clusters).step_by(2) {
        vol.discard(i * CLUSTER, CLUSTER).unwrap();
    }
    let (_, shm2) = memory();
    let held2 = vol.stats().ram_resident_bytes;
    vol.discard(0, bytes).unwrap();
    let (rss3, shm3) = memory();
    let held3 = vol.stats().ram_resident_bytes;
    eprintln!(
        "RAM pool held {} / {} / {} MiB (written, every other cluster trimmed, all trimmed); \
         kernel Shmem {} -> {} / {} / {} MiB; process RSS {} -> {} -> {} MiB",
        held1 / MIB,
        held2 / MIB,
        held3 / MIB,
        shm0 / MIB,
        shm1 / MIB,
        shm2 / MIB,
        shm3 / MIB,
        rss0 / MIB,
        rss1 / MIB,
        rss3 / MIB,
    );
    assert!(held1 >= bytes, "{held1}");
    assert!(
        held2 <= held1 / 2 + MIB,
        "{held2}: scattered trims release their pages"
    );
    assert!(held3 < MIB, "{held3}");
    // The kernel's own figures (other processes may move them a little).
    assert!(
        shm1 >= shm0 + bytes * 3 / 4 && shm3 + bytes / 2 <= shm1,
        "{shm0} {shm1} {shm3}"
    );
    // The clusters never sat in the heap, where the allocator would keep them after a trim.
    assert!(rss1 < rss0 + 32 * MIB, "{rss0} -> {rss1}");
}
