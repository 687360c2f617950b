//! Writing an equivalent partition table onto another disk: sgdisk and sfdisk (the independent
//! readers) must find the same identifiers, types, names, attributes, numbers and offsets, a
//! valid GPT (`sgdisk -v`), and the last partition grown when the destination is larger.

use std::path::Path;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_e2e::fixtures::{gpt_disk, mbr_disk, sgdisk_last_sector};
use diskferry_e2e::run_ok;
use diskferry_partition::{read_table, write_table};

const MIB: u64 = 1 << 20;

fn blank(path: &Path, size: u64) -> FileDevice {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    FileDevice::open(path, true).unwrap()
}

/// sgdisk's view of a GPT disk: disk GUID and per partition number, first and last sector,
/// type code, unique GUID, attributes and name.
fn sgdisk_view(disk: &Path) -> (String, Vec<String>) {
    let d = disk.to_str().unwrap();
    let print = run_ok("sgdisk", &["-p", d]);
    let guid = print
        .lines()
        .find_map(|l| l.strip_prefix("Disk identifier (GUID): "))
        .unwrap()
        .to_string();
    let numbers: Vec<String> = print
        .lines()
        .skip_while(|l| !l.starts_with("Number"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    let parts = numbers
        .iter()
        .map(|n| {
            let info = run_ok("sgdisk", &["-i", n, d]);
            info.lines()
                .filter(|l| !l.starts_with("Partition size") && !l.contains("unit"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    (guid, parts)
}

#[test]
fn gpt_tables_are_rewritten_equivalently_and_the_last_partition_can_grow() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    gpt_disk(
        &src,
        100,
        &[
            (20, "ef00", "EFI system"),
            (30, "8300", "root"),
            (10, "8200", "swap"),
        ],
    );
    run_ok(
        "sgdisk",
        &["-A", "2:set:2", "-A", "1:set:0", src.to_str().unwrap()],
    );
    let table = read_table(&FileDevice::open(&src, false).unwrap()).unwrap();

    let same = dir.path().join("same.img");
    let dev = blank(&same, 100 * MIB);
    write_table(&dev, &table).unwrap();
    drop(dev);
    let verify = run_ok("sgdisk", &["-v", same.to_str().unwrap()]);
    assert!(verify.contains("No problems found"), "{verify}");
    assert_eq!(sgdisk_view(&same), sgdisk_view(&src));

    // A larger disk: the backup GPT moves to the new end and the last partition grows.
    let big = dir.path().join("big.img");
    let dev = blank(&big, 300 * MIB);
    let mut grown = table.clone();
    let (_, end) = grown.usable_range(dev.size());
    assert_eq!(grown.resize_last(end).unwrap().number, 3);
    write_table(&dev, &grown).unwrap();
    drop(dev);
    let verify = run_ok("sgdisk", &["-v", big.to_str().unwrap()]);
    assert!(verify.contains("No problems found"), "{verify}");
    let last = sgdisk_last_sector(&big, 3);
    assert_eq!(
        last,
        300 * MIB / 512 - 34,
        "the last partition ends where the usable area does"
    );
    // Too small a disk is refused with the reason.
    let small = dir.path().join("small.img");
    let dev = blank(&small, 50 * MIB);
    let err = write_table(&dev, &table).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn mbr_tables_with_logical_partitions_are_rewritten_equivalently() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    mbr_disk(&src, 80, [10, 10, 10, 10], ["83", "7", "c", "82"]);
    run_ok("sfdisk", &["-A", src.to_str().unwrap(), "2"]);
    let table = read_table(&FileDevice::open(&src, false).unwrap()).unwrap();
    let copy = dir.path().join("copy.img");
    let dev = blank(&copy, 80 * MIB);
    write_table(&dev, &table).unwrap();
    drop(dev);
    let dump = |p: &Path| {
        run_ok("sfdisk", &["-d", p.to_str().unwrap()]).replace(p.to_str().unwrap(), "DISK")
    };
    assert_eq!(dump(&copy), dump(&src));
    assert!(dump(&copy).contains("label-id: 0x12345678"));
    assert!(dump(&copy).contains("bootable"));
}
