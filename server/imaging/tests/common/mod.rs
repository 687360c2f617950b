//! What the imaging tests against real tools share: running a tool, placing a filesystem
//! image into a disk image, converting an output to raw, and taking a partition out of it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use diskferry_blockdev::FileDevice;
use diskferry_partition as partition;

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Writes `file` into `disk` at byte `at`.
pub fn place(disk: &Path, file: &Path, at: u64) {
    run(Command::new("dd")
        .arg(format!("if={}", file.display()))
        .arg(format!("of={}", disk.display()))
        .args([
            "bs=1M",
            "conv=notrunc,sparse",
            "status=none",
            "oflag=seek_bytes",
        ])
        .arg(format!("seek={at}")));
}

/// The image converted to raw with qemu-img, after `qemu-img check`.
pub fn as_raw(image: &Path) -> PathBuf {
    run(Command::new("qemu-img").arg("check").arg(image));
    let raw = image.with_extension("raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    raw
}

/// Extracts partition `number` of a raw disk into its own file.
pub fn extract(raw: &Path, number: u32) -> PathBuf {
    let table = partition::read_table(&FileDevice::open(raw, false).unwrap()).unwrap();
    let p = table
        .partitions
        .iter()
        .find(|p| p.number == number)
        .unwrap();
    let out = raw.with_extension(format!("p{number}"));
    run(Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", "status=none", "iflag=skip_bytes,count_bytes"])
        .arg(format!("skip={}", p.start))
        .arg(format!("count={}", p.size)));
    out
}
