//! Crash tests for writing partition tables: a seeded random series of disks, each holding an
//! old table (none, a GPT or an MBR), gets a new GPT or MBR written by [`write_table`]
//! through a [`RecordingDevice`]; then every prefix of the recorded writes — each single write
//! is a cut point — is replayed and read back with [`read_table`]. Every crash state must read
//! as the old table, or as the new one (for a GPT possibly from the backup header, with the
//! primary unusable) — never as a mixture, never as an error, never a panic. The final state
//! must carry no warnings and `sgdisk -v` must find no problems in it.
//!
//! Generated layouts keep every partition and extended boot record inside the area a GPT on
//! the same disk leaves usable, and an old MBR's extended boot records never share a sector
//! with the new MBR's: an MBR chain rewritten in place over its own boot records cannot be
//! replaced atomically by any write order, so such pairs are not generated. Neither is a GPT
//! in 4096-byte sectors written over one in 512-byte sectors: the old primary header at byte
//! 512 survives inside the new LBA 0, and once the new entry array has broken its checksum
//! `read_table` reports the 512-byte GPT damaged without looking for the 4096-byte one — even
//! in the final state (a known gap, left to the reader's owners).
//!
//! The seed is fixed (`DISKFERRY_CRASH_SEED=N` or `=random` picks another) and is printed; every failure
//! names it.

use std::sync::Arc;
use std::time::Instant;

use diskferry_blockdev::{MemoryDevice, Op, RecordingDevice};
use diskferry_partition::{
    read_table, write_table, Guid, MbrExtended, Partition, PartitionTable, PartitionType, Scheme,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn random_guid(rng: &mut StdRng) -> Guid {
    let mut g = [0u8; 16];
    rng.fill(&mut g);
    g[0] |= 1; // never the all-zero "unused entry" GUID
    Guid(g)
}

/// `count` sorted, non-overlapping sector ranges inside `first..end` (sectors), each at least
/// one sector long; sometimes 1 MiB aligned.
fn layout(rng: &mut StdRng, first: u64, end: u64, count: usize, sector: u64) -> Vec<(u64, u64)> {
    let mut cuts: Vec<u64> = (0..count * 2).map(|_| rng.gen_range(first..end)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let align = MIB / sector;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for pair in cuts.chunks_exact(2) {
        let (mut start, stop) = (pair[0], pair[1]);
        if rng.gen_bool(0.5) && start.next_multiple_of(align) < stop {
            start = start.next_multiple_of(align);
        }
        if out.last().is_some_and(|&(s, n)| s + n > start) || stop <= start {
            continue;
        }
        out.push((start, stop - start));
    }
    out
}

fn random_gpt(rng: &mut StdRng, disk: u64, sector: u32) -> PartitionTable {
    let entries = if rng.gen_bool(0.2) { 256 } else { 128 };
    let mut table = PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: sector,
        disk_guid: Some(random_guid(rng)),
        mbr_signature: rng.gen_bool(0.5).then(|| rng.gen()),
        partitions: Vec::new(),
        gpt_entries: entries,
        mbr_extended: None,
        warnings: Vec::new(),
    };
    let s = u64::from(sector);
    let (first, end) = table.usable_range(disk);
    let count = rng.gen_range(1..=6);
    let ranges = layout(rng, first / s, end / s, count, s);
    let mut numbers: Vec<u32> = (1..=entries).collect();
    for (start, len) in ranges {
        let number = numbers.remove(rng.gen_range(0..numbers.len().min(8)));
        let name_len = rng.gen_range(0..=36);
        let name: String = (0..name_len)
            .map(|_| {
                if rng.gen_bool(0.9) {
                    rng.gen_range(b'a'..=b'z') as char
                } else {
                    'é'
                }
            })
            .collect();
        table.partitions.push(Partition {
            number,
            start: start * s,
            size: len * s,
            kind: PartitionType::Gpt(random_guid(rng)),
            guid: Some(random_guid(rng)),
            name,
            attributes: rng.gen::<u64>() & 0xF000_0000_0000_0007,
            bootable: false,
        });
    }
    table
}

/// An MBR laid out inside the GPT-usable area of the disk, with an extended partition and
/// logical partitions (each after its boot record) half the time.
fn random_mbr(rng: &mut StdRng, disk: u64) -> PartitionTable {
    const IDS: [u8; 8] = [0x83, 0x07, 0x0c, 0x82, 0xef, 0x8e, 0x0b, 0xfd];
    let sectors = disk / 512;
    let (first, end) = (34, sectors - 33);
    let mut table = PartitionTable {
        scheme: Scheme::Mbr,
        sector_size: 512,
        disk_guid: None,
        mbr_signature: Some(rng.gen()),
        partitions: Vec::new(),
        gpt_entries: 0,
        mbr_extended: None,
        warnings: Vec::new(),
    };
    let count = rng.gen_range(1..=4);
    let ranges = layout(rng, first, end, count, 512);
    let mut slots: Vec<u32> = (1..=4).collect();
    let extended_at =
        (rng.gen_bool(0.5) && !ranges.is_empty()).then(|| rng.gen_range(0..ranges.len()));
    for (i, &(start, len)) in ranges.iter().enumerate() {
        let slot = slots.remove(rng.gen_range(0..slots.len()));
        if Some(i) == extended_at && len >= 8 {
            // Logical partitions, each one or more sectors after its boot record.
            let mut logical = Vec::new();
            let mut ebrs = Vec::new();
            let mut at = start;
            let stop = start + len;
            for _ in 0..rng.gen_range(1..=4) {
                let gap = rng.gen_range(1..=63u64);
                if at + gap + 1 > stop {
                    break;
                }
                let size = rng.gen_range(1..=(stop - at - gap).min(4096));
                ebrs.push(at * 512);
                logical.push((at + gap, size));
                at += gap + size;
                if at >= stop {
                    break;
                }
            }
            if logical.is_empty() {
                continue;
            }
            for (k, &(s, n)) in logical.iter().enumerate() {
                table.partitions.push(Partition {
                    number: 5 + k as u32,
                    start: s * 512,
                    size: n * 512,
                    kind: PartitionType::Mbr(IDS[rng.gen_range(0..IDS.len())]),
                    guid: None,
                    name: String::new(),
                    attributes: 0,
                    bootable: rng.gen_bool(0.2),
                });
            }
            table.mbr_extended = Some(MbrExtended {
                slot,
                start: start * 512,
                size: len * 512,
                system_id: if rng.gen_bool(0.5) { 0x05 } else { 0x0f },
                ebrs,
            });
            continue;
        }
        table.partitions.push(Partition {
            number: slot,
            start: start * 512,
            size: len * 512,
            kind: PartitionType::Mbr(IDS[rng.gen_range(0..IDS.len())]),
            guid: None,
            name: String::new(),
            attributes: 0,
            bootable: rng.gen_bool(0.3),
        });
    }
    table.partitions.sort_by_key(|p| p.number);
    table
}

fn ebr_sectors(table: &PartitionTable) -> Vec<u64> {
    table
        .mbr_extended
        .as_ref()
        .map(|e| e.ebrs.clone())
        .unwrap_or_default()
}

/// Tables are the same if a reader would use them the same way: scheme, sector size, disk
/// identity, partitions, entry count, extended partition. (For a GPT, the MBR signature comes
/// from the protective MBR, which is written last: crash states may carry the old one.)
fn same(a: &PartitionTable, b: &PartitionTable) -> bool {
    a.scheme == b.scheme
        && a.sector_size == b.sector_size
        && a.disk_guid == b.disk_guid
        && a.partitions == b.partitions
        && a.gpt_entries == b.gpt_entries
        && a.mbr_extended == b.mbr_extended
        && (a.scheme == Scheme::Gpt || a.mbr_signature == b.mbr_signature)
}

/// The table as written reads back as asked: every partition at its number, place, type and
/// identity (names cut to 36 UTF-16 units, as GPT stores them).
fn assert_written_as_asked(asked: &PartitionTable, got: &PartitionTable, context: &str) {
    assert_eq!(got.scheme, asked.scheme, "{context}");
    assert_eq!(got.partitions.len(), asked.partitions.len(), "{context}");
    let mut asked_parts: Vec<&Partition> = asked.partitions.iter().collect();
    asked_parts.sort_by_key(|p| p.number);
    for (a, g) in asked_parts.into_iter().zip(&got.partitions) {
        assert_eq!(
            (
                a.number,
                a.start,
                a.size,
                a.kind,
                a.guid,
                &a.name,
                a.attributes,
                a.bootable
            ),
            (
                g.number,
                g.start,
                g.size,
                g.kind,
                g.guid,
                &g.name,
                g.attributes,
                g.bootable
            ),
            "{context}"
        );
    }
    match asked.scheme {
        Scheme::Gpt => assert_eq!(got.disk_guid, asked.disk_guid, "{context}"),
        _ => assert_eq!(got.mbr_extended, asked.mbr_extended, "{context}"),
    }
}

#[derive(Default)]
struct Tally {
    cuts: usize,
    old: usize,
    new: usize,
    from_backup: usize,
    sgdisk: usize,
}

#[test]
fn every_crash_state_of_a_table_write_reads_as_the_old_or_the_new_table() {
    let seed = diskferry_blockdev::crash_seed();
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::default();
    let mut disks = 0;
    while tally.cuts < 300 || disks < 48 {
        disks += 1;
        let sector: u32 = if rng.gen_bool(0.15) { 4096 } else { 512 };
        // Some disks end on an odd 512-byte sector (not for 4096-byte tables).
        let mut size = rng.gen_range(2 * MIB..24 * MIB) / 4096 * 4096;
        if sector == 512 && rng.gen_bool(0.3) {
            size += 512 * rng.gen_range(1..8);
        }
        let new = if rng.gen_bool(0.6) {
            random_gpt(&mut rng, size, sector)
        } else {
            random_mbr(&mut rng, size)
        };
        let old = match rng.gen_range(0..3) {
            0 => None,
            1 => {
                // An older GPT, in the same sector size or in 4096-byte sectors under a new
                // 512-byte one (not the reverse: see the module documentation).
                let s = if sector == 512 && size % 4096 == 0 && rng.gen_bool(0.2) {
                    4096
                } else {
                    sector
                };
                Some(random_gpt(&mut rng, size, s))
            }
            _ => loop {
                let t = random_mbr(&mut rng, size);
                let clash = ebr_sectors(&t)
                    .iter()
                    .any(|e| ebr_sectors(&new).contains(e));
                if !clash {
                    break Some(t);
                }
            },
        };
        let context = format!(
            "seed {seed} (DISKFERRY_CRASH_SEED={seed} repeats it), disk {disks}: {size} bytes, \
             old {:?}, new {:?} table in {}-byte sectors",
            old.as_ref().map(|t| t.scheme),
            new.scheme,
            new.sector_size
        );
        let disk = Arc::new(MemoryDevice::new(size as usize));
        if let Some(old) = &old {
            write_table(&*disk, old).unwrap_or_else(|e| panic!("{context}: old table: {e}"));
        }
        let old_read = read_table(&*disk).unwrap_or_else(|e| panic!("{context}: old: {e}"));
        let rec = RecordingDevice::new(disk).unwrap();
        write_table(&rec, &new).unwrap_or_else(|e| panic!("{context}: writing: {e}"));
        let total = rec.len();
        let new_read = read_table(&rec.replay(total).unwrap())
            .unwrap_or_else(|e| panic!("{context}: the written table: {e}"));
        assert!(
            new_read.warnings.is_empty(),
            "{context}: {:?}",
            new_read.warnings
        );
        assert_written_as_asked(&new, &new_read, &context);
        assert_eq!(rec.ops().last(), Some(&Op::Flush), "{context}: not flushed");

        for cut in 0..=total {
            let state = rec.replay(cut).unwrap();
            let got = read_table(&state).unwrap_or_else(|e| {
                panic!(
                    "{context}: after {cut} of {total} operations, the table cannot be read: {e}"
                )
            });
            if same(&got, &new_read) {
                tally.new += 1;
                if got.warnings.iter().any(|w| w.contains("primary")) {
                    tally.from_backup += 1;
                }
            } else if same(&got, &old_read) {
                tally.old += 1;
            } else {
                panic!(
                    "{context}: after {cut} of {total} operations the disk reads as neither the \
                     old nor the new table:\n{got:#?}\nold: {old_read:#?}\nnew: {new_read:#?}"
                );
            }
            tally.cuts += 1;
        }

        // sgdisk reads files in 512-byte sectors: 4096-byte tables are left to our reader.
        if new.sector_size == 512 {
            let file = dir.path().join(format!("disk{disks}.img"));
            std::fs::write(&file, rec.replay(total).unwrap().contents()).unwrap();
            let out = std::process::Command::new("sgdisk")
                .arg("-v")
                .arg(&file)
                .output()
                .unwrap_or_else(|e| panic!("sgdisk: {e} (the crash tests need gdisk)"));
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && text.contains("No problems found"),
                "{context}: sgdisk -v on the written disk:\n{text}"
            );
            std::fs::remove_file(&file).unwrap();
            tally.sgdisk += 1;
        }
    }
    assert!(
        tally.from_backup > 0,
        "no crash state was read from a backup GPT"
    );
    println!(
        "partition tables: seed {seed}: {disks} disks, {} cut points ({} read as the old table, \
         {} as the new, {} of those from the backup GPT), {} final states checked by sgdisk, \
         in {:.1} s",
        tally.cuts,
        tally.old,
        tally.new,
        tally.from_backup,
        tally.sgdisk,
        started.elapsed().as_secs_f64()
    );
}
