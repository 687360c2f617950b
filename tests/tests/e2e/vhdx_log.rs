//! A VHDX whose writer stopped before applying its log reads as it will after replay: the test
//! plants a log (entries written here, independently of the server's parser) in an image
//! qemu-img made, lets qemu replay it in a copy (qemu replays on a read-write open), and
//! qemu-img compare judges that our in-memory replay of the untouched file reads the same.
//! The original file is never modified by our reader.

use std::path::Path;

use diskferry_e2e::{diskferry, make_disk, qemu_img_convert, run_ok};

const MIB: u64 = 1 << 20;
const SECTOR: usize = 4096;
const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08,
];

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
/// Stores the CRC32C of `b` (computed with the checksum field zero) at offset 4.
fn seal(b: &mut [u8]) {
    put32(b, 4, 0);
    let crc = crc32c::crc32c(b);
    put32(b, 4, crc);
}

enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

/// One log entry (header, descriptors, data sectors) per the VHDX specification.
fn entry(guid: &[u8; 16], sequence: u64, tail: u32, file_end: u64, ops: &[Op]) -> Vec<u8> {
    let writes = ops.iter().filter(|o| matches!(o, Op::Write(..))).count();
    let descriptor_sectors = (64 + ops.len() * 32).div_ceil(SECTOR);
    let mut e = vec![0u8; (descriptor_sectors + writes) * SECTOR];
    e[..4].copy_from_slice(b"loge");
    let len = e.len() as u32;
    put32(&mut e, 8, len);
    put32(&mut e, 12, tail);
    put64(&mut e, 16, sequence);
    put32(&mut e, 24, ops.len() as u32);
    e[32..48].copy_from_slice(guid);
    put64(&mut e, 48, file_end);
    put64(&mut e, 56, file_end);
    let mut data = descriptor_sectors * SECTOR;
    for (i, op) in ops.iter().enumerate() {
        let d = 64 + i * 32;
        match op {
            Op::Zero(offset, len) => {
                e[d..d + 4].copy_from_slice(b"zero");
                put64(&mut e, d + 8, *len);
                put64(&mut e, d + 16, *offset);
            }
            Op::Write(offset, sector) => {
                e[d..d + 4].copy_from_slice(b"desc");
                e[d + 4..d + 8].copy_from_slice(&sector[4092..]);
                e[d + 8..d + 16].copy_from_slice(&sector[..8]);
                put64(&mut e, d + 16, *offset);
                e[data..data + 4].copy_from_slice(b"data");
                put32(&mut e, data + 4, (sequence >> 32) as u32);
                e[data + 8..data + 4092].copy_from_slice(&sector[8..4092]);
                put32(&mut e, data + 4092, sequence as u32);
                data += SECTOR;
            }
        }
        put64(&mut e, d + 24, sequence);
    }
    seal(&mut e);
    e
}

#[test]
fn a_pending_log_is_replayed_in_memory_as_qemu_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    make_disk(&raw, 64 * MIB, &[(0, 3 * MIB), (24 * MIB, 2 * MIB)]).unwrap();
    let img = dir.path().join("logged.vhdx");
    qemu_img_convert(&raw, &img, "vhdx", &["-o", "block_size=1M"]);
    let mut bytes = std::fs::read(&img).unwrap();

    // The current header, the log region and the BAT.
    let h = [64 * 1024, 128 * 1024]
        .into_iter()
        .max_by_key(|&at| u64_at(&bytes, at + 8))
        .unwrap();
    let (log_len, log_at) = (
        u32_at(&bytes, h + 68) as usize,
        u64_at(&bytes, h + 72) as usize,
    );
    let regions = 192 * 1024;
    let bat_at = (0..u32_at(&bytes, regions + 8) as usize)
        .map(|i| regions + 16 + i * 32)
        .find(|&e| bytes[e..e + 16] == BAT_GUID)
        .map(|e| u64_at(&bytes, e + 16) as usize)
        .unwrap();
    // 1 MiB blocks; block 0 holds data, block 40 (at 40 MiB) holds none.
    let block0 = u64_at(&bytes, bat_at);
    assert_eq!(block0 & 7, 6, "block 0 is fully present");
    assert!(
        u64_at(&bytes, bat_at + 40 * 8) & 7 <= 2,
        "block 40 is absent or zero"
    );
    let host0 = (block0 >> 20) << 20;

    // Entry 10: map block 40 onto block 0's data and overwrite block 0's first sector.
    let mut bat_sector = bytes[bat_at..bat_at + SECTOR].to_vec();
    put64(&mut bat_sector, 40 * 8, block0);
    let stamp: Vec<u8> = (0..SECTOR).map(|i| (i * 7 % 251) as u8 + 1).collect();
    let file_end = bytes.len() as u64;
    let guid: [u8; 16] = *b"diskferry-log-ts";
    let first = entry(
        &guid,
        10,
        0,
        file_end,
        &[
            Op::Write(bat_at as u64, bat_sector),
            Op::Write(host0, stamp),
        ],
    );
    // Entry 11 (tail still at entry 10): zero two sectors of block 0's data.
    let second = entry(
        &guid,
        11,
        0,
        file_end,
        &[Op::Zero(host0 + 2 * SECTOR as u64, 2 * SECTOR as u64)],
    );
    // A stale entry from another log (other GUID) after them is ignored.
    let stale = entry(
        b"someone-elses-lg",
        12,
        0,
        file_end,
        &[Op::Zero(host0, MIB)],
    );
    let mut at = log_at;
    for e in [&first, &second, &stale] {
        assert!(at + e.len() <= log_at + log_len);
        bytes[at..at + e.len()].copy_from_slice(e);
        at += e.len();
    }
    bytes[h + 48..h + 64].copy_from_slice(&guid);
    seal(&mut bytes[h..h + SECTOR]);
    std::fs::write(&img, &bytes).unwrap();

    // qemu refuses to read it read-only; opened read-write, it replays the log (in a copy).
    let info = std::process::Command::new("qemu-img")
        .args(["info", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !info.status.success(),
        "qemu-img info needs the log replayed"
    );
    let theirs = dir.path().join("replayed-by-qemu.vhdx");
    std::fs::copy(&img, &theirs).unwrap();
    run_ok(
        "qemu-io",
        &["-f", "vhdx", "-c", "flush", theirs.to_str().unwrap()],
    );

    // Ours reads the untouched file as replayed.
    let ours = dir.path().join("ours.raw");
    let (ok, _, err) = diskferry(&[
        "convert".as_ref(),
        img.as_os_str(),
        ours.as_os_str(),
        "--format".as_ref(),
        "raw".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        bytes,
        "our reader left the file as it was"
    );
    compare(&theirs, &ours);
    // And the replay did something: block 40 now shows block 0's (changed) data.
    let read = std::fs::read(&ours).unwrap();
    assert_eq!(read[40 << 20..41 << 20], read[..1 << 20]);
    assert_eq!(
        read[..8],
        (1..=8u8)
            .map(|i| ((i as usize - 1) * 7 % 251) as u8 + 1)
            .collect::<Vec<_>>()[..]
    );
    assert!(read[2 * SECTOR..4 * SECTOR].iter().all(|&b| b == 0));
}

fn compare(vhdx: &Path, raw: &Path) {
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "raw",
            vhdx.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}
