//! Nested partitions (a live deploy's new system inside the running system's partition),
//! judged by util-linux and gdisk: `sfdisk --json` and `sgdisk -i` see the new entry where
//! it was put, nothing else of the disk changes (boot code, extended boot records, the other
//! entries), and removing it gives back the table as it was, byte for byte. A take-over
//! (the nested entry and its holder swap ranges, then the holder's goes) leaves a table both
//! tools accept, each slot keeping its flags and names.

use std::path::Path;
use std::process::Command;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_partition::nested::{
    add_nested, remove_entry, remove_nested, swap_ranges, NESTED_NAME,
};
use diskferry_partition::{read_table, Guid};

const MIB: u64 = 1 << 20;

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sfdisk(disk: &Path, script: &str) {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

fn bytes(path: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b
}

/// A sparse disk image of `mib` MiB in `dir`.
fn sparse(dir: &Path, mib: u64) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    path
}

/// A 2 GiB GPT disk in `dir`: a BIOS boot partition, a 1500 MiB root named "root", swap.
fn bios_gpt(dir: &Path) -> std::path::PathBuf {
    let path = sparse(dir, 2048);
    tool(
        "sgdisk",
        &[
            "-n",
            "1:1M:+1M",
            "-t",
            "1:ef02",
            "-n",
            "2:0:+1500M",
            "-t",
            "2:8300",
            "-c",
            "2:root",
            "-n",
            "3:0:0",
            "-t",
            "3:8200",
            path.to_str().unwrap(),
        ],
    );
    path
}

#[test]
fn an_mbr_gets_a_primary_entry_inside_root_and_loses_it_again_with_nothing_else_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse(dir.path(), 4096);
    // The Debian installer's layout: root, then an extended partition holding swap.
    sfdisk(&path, "label: dos\nstart=2048, size=6289408, type=83, bootable\nstart=6291456, type=5\nstart=6293504, type=82\n");
    // Boot code, as GRUB leaves it, and the swap's extended boot record.
    let code: Vec<u8> = (0..440u32).map(|i| (i * 7 % 256) as u8).collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&code, 0).unwrap();
    }
    let before0 = bytes(&path, 0, 512);
    let ebr = bytes(&path, 6_291_456 * 512, 512);
    let dev = FileDevice::open(&path, true).unwrap();

    let n = add_nested(&dev, 1024 * MIB, 512 * MIB, Guid([7; 16])).unwrap();
    assert_eq!(n, 3, "the first free primary slot");
    assert_eq!(
        add_nested(&dev, 1024 * MIB, 512 * MIB, Guid([7; 16])).unwrap(),
        3,
        "kept"
    );
    let json: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json", path.to_str().unwrap()])).unwrap();
    let parts = json["partitiontable"]["partitions"].as_array().unwrap();
    let third = parts
        .iter()
        .find(|p| p["node"].as_str().unwrap().ends_with('3'))
        .unwrap();
    assert_eq!(third["start"], 2 * 1024 * 1024);
    assert_eq!(third["size"], 1024 * 1024);
    assert_eq!(third["type"], "83");
    assert!(bytes(&path, 0, 440) == code, "boot code untouched");
    assert!(
        bytes(&path, 6_291_456 * 512, 512) == ebr,
        "extended boot record untouched"
    );
    assert_eq!(
        read_table(&dev).unwrap().partitions.len(),
        3,
        "root, the new one, swap"
    );

    assert_eq!(remove_nested(&dev).unwrap(), vec![3]);
    assert!(bytes(&path, 0, 512) == before0, "sector 0 as it was");
    assert_eq!(remove_nested(&dev).unwrap(), Vec::<u32>::new());
}

#[test]
fn a_gpt_gets_a_named_entry_inside_root_and_loses_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = bios_gpt(dir.path());
    let p = path.to_str().unwrap();
    let dev = FileDevice::open(&path, true).unwrap();
    let before = read_table(&dev).unwrap();
    let size = 2048 * MIB;
    let (primary, backup) = (
        bytes(&path, 0, 34 * 512),
        bytes(&path, size - 33 * 512, 33 * 512),
    );

    let n = add_nested(&dev, 512 * MIB, 256 * MIB, Guid([9; 16])).unwrap();
    assert_eq!(n, 4);
    let info = tool("sgdisk", &["-i", "4", p]);
    assert!(info.contains("First sector: 1048576 "), "{info}");
    assert!(info.contains("Last sector: 1572863 "), "{info}");
    assert!(
        info.contains(&format!("Partition name: '{NESTED_NAME}'")),
        "{info}"
    );
    // Both headers and arrays check out; gdisk only notes the overlap that is the point.
    let verify = Command::new("sgdisk").args(["-v", p]).output().unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(text.contains("overlap"), "{text}");
    assert!(!text.to_lowercase().contains("crc"), "{text}");

    assert_eq!(remove_nested(&dev).unwrap(), vec![4]);
    dev.flush().unwrap();
    assert_eq!(read_table(&dev).unwrap(), before, "the table as it was");
    assert!(
        bytes(&path, 0, 34 * 512) == primary,
        "the primary table, byte for byte"
    );
    assert!(
        bytes(&path, size - 33 * 512, 33 * 512) == backup,
        "the backup, byte for byte"
    );
    let verify = tool("sgdisk", &["-v", p]);
    assert!(verify.contains("No problems found"), "{verify}");
}

#[test]
fn a_range_across_two_partitions_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse(dir.path(), 512);
    let p = path.to_str().unwrap();
    tool("sgdisk", &["-n", "1:1M:+200M", "-n", "2:0:0", p]);
    let dev = FileDevice::open(&path, true).unwrap();
    assert!(add_nested(&dev, 150 * MIB, 100 * MIB, Guid([1; 16])).is_err());
    assert_eq!(read_table(&dev).unwrap().partitions.len(), 2);
}

/// `sfdisk --json`'s partitions: (number, start sector, sectors, bootable).
fn sfdisk_entries(path: &Path) -> Vec<(u32, u64, u64, bool)> {
    let json: serde_json::Value =
        serde_json::from_str(&tool("sfdisk", &["--json", path.to_str().unwrap()])).unwrap();
    json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let n = node[node.trim_end_matches(|c: char| c.is_ascii_digit()).len()..]
                .parse()
                .unwrap();
            (
                n,
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                p["bootable"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn an_mbr_taken_over_holds_the_nested_range_in_the_old_slot_and_frees_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse(dir.path(), 4096);
    sfdisk(&path, "label: dos\nstart=2048, size=6289408, type=83, bootable\nstart=6291456, type=5\nstart=6293504, type=82\n");
    let dev = FileDevice::open(&path, true).unwrap();
    add_nested(&dev, 1024 * MIB, 512 * MIB, Guid([7; 16])).unwrap();
    let nested = bytes(&path, 0, 512);
    let ebr = bytes(&path, 6_291_456 * 512, 512);

    swap_ranges(&dev, 1, 3).unwrap();
    let e = sfdisk_entries(&path);
    assert!(
        e.contains(&(1, 2 * 1024 * 1024, 1024 * 1024, true)),
        "{e:?}"
    );
    assert!(e.contains(&(3, 2048, 6_289_408, false)), "{e:?}");
    swap_ranges(&dev, 1, 3).unwrap();
    assert!(
        bytes(&path, 0, 512) == nested,
        "swapped back, byte for byte"
    );

    swap_ranges(&dev, 1, 3).unwrap();
    remove_entry(&dev, 3).unwrap();
    let e = sfdisk_entries(&path);
    assert_eq!(
        e,
        [
            (1, 2 * 1024 * 1024, 1024 * 1024, true),
            (2, 6_291_456, 2_097_152, false),
            (5, 6_293_504, 2_095_104, false)
        ]
    );
    assert!(bytes(&path, 6_291_456 * 512, 512) == ebr, "the EBR kept");
    // util-linux sees the old partition's space, around the new one, as free.
    let free = tool("sfdisk", &["-F", path.to_str().unwrap()]);
    assert!(free.contains("2048 2097151 2095104"), "{free}");
    assert!(
        remove_entry(&dev, 5).is_err(),
        "logical entries are not changed"
    );
    assert!(swap_ranges(&dev, 1, 4).is_err(), "no partition 4");
}

#[test]
fn a_gpt_taken_over_keeps_names_and_guids_in_their_slots_and_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = bios_gpt(dir.path());
    let p = path.to_str().unwrap();
    let dev = FileDevice::open(&path, true).unwrap();
    add_nested(&dev, 512 * MIB, 256 * MIB, Guid([9; 16])).unwrap();
    let guid = |n: &str| {
        tool("sgdisk", &["-i", n, p])
            .lines()
            .find(|l| l.starts_with("Partition unique GUID"))
            .unwrap()
            .to_string()
    };
    let (root_guid, nested_guid) = (guid("2"), guid("4"));

    swap_ranges(&dev, 2, 4).unwrap();
    let two = tool("sgdisk", &["-i", "2", p]);
    assert!(two.contains("First sector: 1048576 "), "{two}");
    assert!(two.contains("Partition name: 'root'"), "{two}");
    assert_eq!(guid("2"), root_guid);
    assert_eq!(guid("4"), nested_guid);

    remove_entry(&dev, 4).unwrap();
    let verify = tool("sgdisk", &["-v", p]);
    assert!(verify.contains("No problems found"), "{verify}");
    let table = read_table(&dev).unwrap();
    let numbers: Vec<u32> = table.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert_eq!(
        (table.partitions[1].start, table.partitions[1].size),
        (512 * MIB, 256 * MIB)
    );
}

/// A disk whose writes below `fail_below` fail (a primary GPT that cannot be written).
struct FailingPrimary {
    inner: FileDevice,
    fail_below: u64,
}

impl BlockDevice for FailingPrimary {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskferry_blockdev::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> diskferry_blockdev::Result<()> {
        if offset < self.fail_below {
            return Err(diskferry_blockdev::BlockError::ReadOnly);
        }
        self.inner.write_at(buf, offset)
    }
}

#[test]
fn a_gpt_whose_primary_cannot_be_written_keeps_its_backup_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse(dir.path(), 1024);
    let p = path.to_str().unwrap();
    tool("sgdisk", &["-n", "1:1M:0", "-t", "1:8300", p]);
    let size = 1024 * MIB;
    let backup = bytes(&path, size - 33 * 512, 33 * 512);
    let dev = FailingPrimary {
        inner: FileDevice::open(&path, true).unwrap(),
        fail_below: 34 * 512,
    };
    assert!(add_nested(&dev, 512 * MIB, 256 * MIB, Guid([3; 16])).is_err());
    assert!(
        bytes(&path, size - 33 * 512, 33 * 512) == backup,
        "the backup put back as it was"
    );
    let verify = tool("sgdisk", &["-v", p]);
    assert!(verify.contains("No problems found"), "{verify}");
}

#[test]
fn a_gpt_whose_entries_fail_their_checksum_is_refused_before_anything_is_written() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = bios_gpt(dir.path());
    let size = 2048 * MIB;
    // One byte of an unused entry of the primary array (LBA 2 on).
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x5a], 2 * 512 + 100 * 128).unwrap();
    let (primary, backup) = (
        bytes(&path, 0, 34 * 512),
        bytes(&path, size - 33 * 512, 33 * 512),
    );
    let dev = FileDevice::open(&path, true).unwrap();
    assert!(add_nested(&dev, 512 * MIB, 256 * MIB, Guid([3; 16])).is_err());
    assert!(
        bytes(&path, 0, 34 * 512) == primary,
        "the primary untouched"
    );
    assert!(
        bytes(&path, size - 33 * 512, 33 * 512) == backup,
        "the backup untouched"
    );
}
