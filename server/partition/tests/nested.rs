//! Nested partitions (a live deploy's new system inside the running system's partition),
//! judged by util-linux and gdisk: `sfdisk --json` and `sgdisk -i` see the new entry where
//! it was put, nothing else of the disk changes (boot code, extended boot records, the other
//! entries), and removing it gives back the table as it was, byte for byte.

use std::path::Path;
use std::process::Command;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_partition::nested::{add_nested, remove_nested, NESTED_NAME};
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

#[test]
fn an_mbr_gets_a_primary_entry_inside_root_and_loses_it_again_with_nothing_else_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4096 * MIB)
        .unwrap();
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
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(2048 * MIB)
        .unwrap();
    let p = path.to_str().unwrap();
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
            "-n",
            "3:0:0",
            "-t",
            "3:8200",
            p,
        ],
    );
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
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    let p = path.to_str().unwrap();
    tool("sgdisk", &["-n", "1:1M:+200M", "-n", "2:0:0", p]);
    let dev = FileDevice::open(&path, true).unwrap();
    assert!(add_nested(&dev, 150 * MIB, 100 * MIB, Guid([1; 16])).is_err());
    assert_eq!(read_table(&dev).unwrap().partitions.len(), 2);
}
