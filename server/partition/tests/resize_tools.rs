//! Resizing a table that real tools made, checked by real tools: the Debian installer's MBR
//! layout (root, then an extended partition whose logical partition is swap) made by `sfdisk`,
//! shrunk and grown with `resize_partition`, written onto a disk of the new size and read by
//! `sfdisk --verify`/`sfdisk --json`; a GPT with a partition after the one resized, checked
//! by `sgdisk -v` (no problems, no cautions) and its 1 MiB alignment kept.

use std::path::Path;
use std::process::Command;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_partition::{read_table, write_table, Anchor, PartitionTable};

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the tool runs (apt: fdisk, gdisk)");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn disk_file(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn sfdisk(disk: &Path, script: &str) {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (apt: fdisk)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

fn read(path: &Path) -> PartitionTable {
    read_table(&FileDevice::open(path, false).unwrap()).unwrap()
}

/// Writes `table` onto a new blank disk file of `size` bytes.
fn write_new(dir: &Path, name: &str, table: &PartitionTable, size: u64) -> std::path::PathBuf {
    let path = disk_file(dir, name, size);
    let dev = FileDevice::open(&path, true).unwrap();
    write_table(&dev, table).unwrap();
    dev.flush().unwrap();
    path
}

/// The installer's layout on 4 GiB: root 1 MiB..3 GiB, extended after it with swap inside.
fn installer_layout(dir: &Path) -> std::path::PathBuf {
    let disk = disk_file(dir, "source.img", 4096 * MIB);
    sfdisk(
        &disk,
        "label: dos\nlabel-id: 0x1234abcd\n\
         start=2048, size=6289408, type=83, bootable\n\
         start=6291456, type=5\n\
         type=82\n",
    );
    disk
}

#[test]
fn the_installers_layout_shrinks_with_swap_moving_down() {
    let dir = tempfile::tempdir().unwrap();
    let src = installer_layout(dir.path());
    let mut table = read(&src);
    assert!(
        table.mbr_extended.is_some(),
        "sfdisk made an extended partition"
    );
    let new_size = 2048 * MIB;
    let (_, usable_end) = table.usable_range(new_size);
    let moved = table.resize_partition(1, usable_end, MIB).unwrap();
    assert!(moved < 0 && moved % MIB as i64 == 0, "moved by {moved}");
    let out = write_new(dir.path(), "small.img", &table, new_size);

    run(Command::new("sfdisk").arg("--verify").arg(&out));
    let json = run(Command::new("sfdisk").arg("--json").arg(&out));
    let dump: serde_json::Value = serde_json::from_str(&json).unwrap();
    let parts = dump["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .clone();
    let field = |i: usize, k: &str| parts[i][k].as_u64().unwrap();
    assert_eq!(parts.len(), 3, "{json}");
    assert_eq!(
        parts[2]["type"], "82",
        "the swap is still the logical partition"
    );
    assert_eq!(field(2, "size"), 2095104, "the swap keeps its size");
    assert!(
        field(2, "start") + field(2, "size") <= new_size / 512,
        "{json}"
    );
    assert_eq!(field(0, "start"), 2048);
    assert_eq!(
        (field(2, "start") as i64 - 6293504) * 512,
        moved,
        "the swap moved by the distance reported"
    );
    assert_eq!(dump["partitiontable"]["id"], "0x1234abcd");
    assert_eq!(read(&out).partitions, table.partitions);
}

#[test]
fn the_installers_layout_grows_with_swap_staying_last() {
    let dir = tempfile::tempdir().unwrap();
    let src = installer_layout(dir.path());
    let mut table = read(&src);
    let new_size = 6144 * MIB;
    let (_, usable_end) = table.usable_range(new_size);
    let moved = table.resize_partition(1, usable_end, MIB).unwrap();
    assert_eq!(moved, 2048 * MIB as i64);
    let out = write_new(dir.path(), "big.img", &table, new_size);
    run(Command::new("sfdisk").arg("--verify").arg(&out));
    let swap = read(&out)
        .partitions
        .into_iter()
        .find(|p| p.number == 5)
        .unwrap();
    assert_eq!(swap.end(), new_size, "the swap still ends the disk");
}

#[test]
fn a_gpt_with_a_partition_after_the_resized_one_keeps_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let src = disk_file(dir.path(), "gpt.img", 1024 * MIB);
    run(Command::new("sgdisk")
        .args([
            "-n",
            "1:1M:+100M",
            "-t",
            "1:ef00",
            "-n",
            "2:0:+700M",
            "-n",
            "3:0:+100M",
            "-t",
            "3:8200",
        ])
        .arg(&src));
    let mut table = read(&src);
    let new_size = 600 * MIB + 12345 * 512;
    let (_, usable_end) = table.usable_range(new_size);
    table.resize_partition(2, usable_end, MIB).unwrap();
    let out = write_new(dir.path(), "gpt-small.img", &table, new_size);
    let verdict = run(Command::new("sgdisk").arg("-v").arg(&out));
    assert!(verdict.contains("No problems found"), "{verdict}");
    assert!(!verdict.to_lowercase().contains("caution"), "{verdict}");
    for p in &read(&out).partitions {
        assert_eq!(
            p.start % MIB,
            0,
            "partition {} starts at {}",
            p.number,
            p.start
        );
    }
}

#[test]
fn gaps_are_what_neither_table_nor_partitions_hold() {
    let dir = tempfile::tempdir().unwrap();
    let table = read(&installer_layout(dir.path()));
    let gaps = table.gaps(4096 * MIB);
    // The boot loader's gap after sector 0, anchored to partition 1.
    assert_eq!(gaps[0].range, 512..MIB);
    assert_eq!(gaps[0].anchor, Anchor::Before(1));
    // Nothing listed overlaps a partition or an extended boot record.
    for g in &gaps {
        for p in &table.partitions {
            assert!(
                g.range.end <= p.start || g.range.start >= p.end(),
                "{g:?} vs {p:?}"
            );
        }
        for s in table.structures(4096 * MIB) {
            assert!(
                g.range.end <= s.start || g.range.start >= s.end,
                "{g:?} vs {s:?}"
            );
        }
    }
    let last = gaps.last().unwrap();
    assert!(last.range.end <= 4096 * MIB);
}

#[test]
fn shrinking_below_what_the_followers_need_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = read(&installer_layout(dir.path()));
    let (_, usable_end) = table.usable_range(1000 * MIB);
    let err = table.resize_partition(1, usable_end, MIB).unwrap_err();
    assert!(err.to_string().contains("cannot shrink"), "{err}");
}
