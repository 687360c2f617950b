//! Round trips without root or external tools: a table written with `write_table` onto a
//! memory disk reads back equal with `read_table` — GPT (512- and 4096-byte sectors, names,
//! attributes, GUIDs, sparse entry numbers, a damaged primary) and MBR (primaries, an
//! extended partition with logical ones behind EBRs), plus seeded random tables.

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_partition::{
    read_table, write_table, Guid, MbrExtended, Partition, PartitionTable, PartitionType, Scheme,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn guid(seed: u8) -> Guid {
    Guid(std::array::from_fn(|i| {
        seed.wrapping_mul(31).wrapping_add(i as u8)
    }))
}

fn gpt_partition(number: u32, start: u64, size: u64, name: &str, seed: u8) -> Partition {
    Partition {
        number,
        start,
        size,
        kind: PartitionType::Gpt(guid(seed)),
        guid: Some(guid(seed.wrapping_add(100))),
        name: name.into(),
        attributes: u64::from(seed) << 48 | 1,
        bootable: false,
    }
}

fn mbr_partition(number: u32, start: u64, size: u64, id: u8, bootable: bool) -> Partition {
    Partition {
        number,
        start,
        size,
        kind: PartitionType::Mbr(id),
        guid: None,
        name: String::new(),
        attributes: 0,
        bootable,
    }
}

fn gpt_table(sector: u32, partitions: Vec<Partition>) -> PartitionTable {
    PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: sector,
        disk_guid: Some(guid(7)),
        // The protective MBR carries it; the reader reports it.
        mbr_signature: Some(0xDEAD_BEEF),
        partitions,
        gpt_entries: 128,
        mbr_extended: None,
        warnings: Vec::new(),
    }
}

/// Writes `table` onto a fresh disk of `size` bytes and reads it back.
fn round_trip(table: &PartitionTable, size: u64) -> (MemoryDevice, PartitionTable) {
    let disk = MemoryDevice::new(size as usize);
    write_table(&disk, table).unwrap();
    let back = read_table(&disk).unwrap();
    (disk, back)
}

#[test]
fn gpt_with_512_and_4096_byte_sectors_reads_back_equal() {
    for sector in [512u32, 4096] {
        let s = u64::from(sector);
        let table = gpt_table(
            sector,
            vec![
                gpt_partition(1, MIB, 8 * MIB, "EFI system partition", 1),
                gpt_partition(2, 9 * MIB, 3 * MIB + 7 * s, "Linux — root ✓", 2),
                // Entry numbers need not be dense.
                gpt_partition(5, 16 * MIB, 4 * MIB, "", 3),
                gpt_partition(128, 24 * MIB, 2 * MIB, &"n".repeat(36), 4),
            ],
        );
        let (_, back) = round_trip(&table, 64 * MIB);
        assert_eq!(back, table, "{sector}-byte sectors");
    }
}

#[test]
fn gpt_names_longer_than_36_units_are_cut() {
    let mut table = gpt_table(512, vec![gpt_partition(1, MIB, MIB, &"x".repeat(50), 1)]);
    let (_, back) = round_trip(&table, 16 * MIB);
    table.partitions[0].name = "x".repeat(36);
    assert_eq!(back, table);
}

#[test]
fn a_damaged_primary_gpt_reads_from_the_backup_with_a_warning() {
    let table = gpt_table(512, vec![gpt_partition(1, MIB, 4 * MIB, "data", 9)]);
    let (disk, _) = round_trip(&table, 16 * MIB);
    disk.write_at(b"garbage!", 512 + 24).unwrap();
    let back = read_table(&disk).unwrap();
    assert_eq!(back.partitions, table.partitions);
    assert_eq!(back.disk_guid, table.disk_guid);
    assert!(
        back.warnings[0].contains("primary GPT header is unusable"),
        "{:?}",
        back.warnings
    );
    // Both damaged: a clear error.
    let last = disk.size() - 512;
    disk.write_at(b"garbage!", last + 24).unwrap();
    let err = read_table(&disk).unwrap_err().to_string();
    assert!(err.contains("neither GPT header is valid"), "{err}");
}

#[test]
fn mbr_with_primaries_and_logical_partitions_reads_back_equal() {
    let ext_start = 20 * MIB;
    let table = PartitionTable {
        scheme: Scheme::Mbr,
        sector_size: 512,
        disk_guid: None,
        mbr_signature: Some(0x1234_5678),
        partitions: vec![
            mbr_partition(1, MIB, 8 * MIB, 0x0C, true),
            mbr_partition(3, 10 * MIB, 4 * MIB, 0x83, false),
            mbr_partition(5, ext_start + MIB, 3 * MIB, 0x83, false),
            mbr_partition(6, ext_start + 5 * MIB, 2 * MIB, 0x07, true),
            mbr_partition(7, ext_start + 8 * MIB + 512, 6 * MIB, 0x82, false),
        ],
        gpt_entries: 0,
        mbr_extended: Some(MbrExtended {
            slot: 2,
            start: ext_start,
            size: 20 * MIB,
            system_id: 0x0F,
            ebrs: vec![ext_start, ext_start + 4 * MIB, ext_start + 8 * MIB],
        }),
        warnings: Vec::new(),
    };
    let (disk, back) = round_trip(&table, 64 * MIB);
    assert_eq!(back, table);
    // Boot code before the table is left as it was.
    let code = vec![0x90u8; 440];
    disk.write_at(&code, 0).unwrap();
    write_table(&disk, &table).unwrap();
    let mut got = vec![0u8; 440];
    disk.read_at(&mut got, 0).unwrap();
    assert_eq!(got, code);
    assert_eq!(read_table(&disk).unwrap(), table);
}

#[test]
fn a_resized_last_partition_reads_back() {
    let mut table = gpt_table(512, vec![gpt_partition(1, MIB, 4 * MIB, "grow me", 5)]);
    let disk_size = 32 * MIB;
    let (_, end) = table.usable_range(disk_size);
    table.resize_last(end).unwrap();
    let (_, back) = round_trip(&table, disk_size);
    assert_eq!(back, table);
    assert_eq!(back.partitions[0].end(), end);
}

/// Non-overlapping aligned ranges in `first..end`, in order.
fn random_ranges(
    rng: &mut StdRng,
    first: u64,
    end: u64,
    count: usize,
    align: u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = first.div_ceil(align) * align;
    for _ in 0..count {
        let gap = rng.gen_range(0..4) * align;
        let size = rng.gen_range(2..64) * align;
        if at + gap + size > end {
            break;
        }
        out.push((at + gap, size));
        at += gap + size;
    }
    out
}

#[test]
fn random_gpt_and_mbr_tables_read_back_equal() {
    let mut rng = StdRng::seed_from_u64(11);
    let disk_size = 48 * MIB;
    for round in 0..40 {
        let sector = if rng.gen_bool(0.5) { 512u32 } else { 4096 };
        let s = u64::from(sector);
        let empty = gpt_table(sector, Vec::new());
        let (first, end) = empty.usable_range(disk_size);
        let count = rng.gen_range(1..12);
        let ranges = random_ranges(&mut rng, first, end, count, 64 * s);
        let mut numbers: Vec<u32> = (1..=128).collect();
        let mut partitions: Vec<Partition> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(start, size))| {
                let n = numbers.remove(rng.gen_range(0..numbers.len()));
                let name: String = (0..rng.gen_range(0..40))
                    .map(|_| rng.gen_range('a'..='z'))
                    .collect();
                let mut p = gpt_partition(n, start, size, &name, i as u8 + 1);
                p.name = name.chars().take(36).collect();
                p
            })
            .collect();
        partitions.sort_by_key(|p| p.number);
        let table = gpt_table(sector, partitions);
        let (_, back) = round_trip(&table, disk_size);
        // The reader lists partitions by entry number.
        assert_eq!(back, table, "GPT round {round}");

        // MBR: up to three primaries, then logicals each behind its EBR one sector before.
        let count = rng.gen_range(2..10);
        let ranges = random_ranges(&mut rng, 512, disk_size, count, 512 * 8);
        let primaries = ranges.len().min(rng.gen_range(1..=3));
        let mut partitions: Vec<Partition> = ranges[..primaries]
            .iter()
            .enumerate()
            .map(|(i, &(start, size))| {
                mbr_partition(i as u32 + 1, start, size, rng.gen_range(1..=0xFF), false)
            })
            // Not extended (only one, in slot 4) and not GPT-protective.
            .filter(|p| !matches!(p.kind, PartitionType::Mbr(0x05 | 0x0F | 0x85 | 0xEE)))
            .collect();
        let logicals = &ranges[primaries..];
        let mbr_extended = (!logicals.is_empty()).then(|| {
            let start = logicals[0].0;
            let end = logicals.last().map(|&(s, n)| s + n).unwrap();
            MbrExtended {
                slot: 4,
                start,
                size: end - start,
                system_id: 0x05,
                ebrs: logicals.iter().map(|&(s, _)| s).collect(),
            }
        });
        for (i, &(start, size)) in logicals.iter().enumerate() {
            // The EBR takes the range's first 4 KiB.
            let id = if i % 2 == 0 { 0x83 } else { 0x07 };
            partitions.push(mbr_partition(
                i as u32 + 5,
                start + 4096,
                size - 4096,
                id,
                i == 1,
            ));
        }
        // Primaries' numbers may have gaps after filtering; keep the slots as numbered.
        let table = PartitionTable {
            scheme: Scheme::Mbr,
            sector_size: 512,
            disk_guid: None,
            mbr_signature: Some(rng.gen()),
            partitions,
            gpt_entries: 0,
            mbr_extended,
            warnings: Vec::new(),
        };
        let (_, back) = round_trip(&table, disk_size);
        assert_eq!(back, table, "MBR round {round}");
    }
}
