//! Who this machine is, for dial-back registration: MAC addresses of its network interfaces,
//! DMI vendor/product/serial/UUID, CPU count, memory, hostname and the disks served — read
//! from /sys and /proc, sent as one small JSON document (written by hand: the agent stays
//! small).

use std::fmt::Write as _;
use std::path::Path;

use crate::disks;
use crate::Config;

/// The identity document.
pub fn collect(config: &Config) -> String {
    let dmi = |f: &str| read_trimmed(&Path::new("/sys/class/dmi/id").join(f));
    let mut out = String::from("{");
    field(
        &mut out,
        "hostname",
        read_trimmed(Path::new("/proc/sys/kernel/hostname")),
    );
    out.push_str("\"macs\":[");
    for (i, mac) in macs().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(&mut out, mac);
    }
    out.push_str("],");
    field(&mut out, "vendor", dmi("sys_vendor"));
    field(&mut out, "product", dmi("product_name"));
    field(&mut out, "serial", dmi("product_serial"));
    field(&mut out, "uuid", dmi("product_uuid"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = write!(out, "\"cpus\":{cpus},\"memory\":{},", memory_bytes());
    out.push_str("\"disks\":[");
    let mut first = true;
    for d in &config.disks {
        let Ok(info) = disks::describe(d, config.allow_write) else {
            continue;
        };
        if !first {
            out.push(',');
        }
        first = false;
        out.push('{');
        field(&mut out, "name", Some(info.name));
        let _ = write!(out, "\"size\":{},", info.size);
        field(&mut out, "model", Some(info.model));
        field(&mut out, "serial", Some(info.serial));
        let _ = write!(out, "\"read_only\":{}", info.read_only);
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// MAC addresses (lowercase, colon form) of interfaces that have one, loopback and all-zero
/// addresses left out; sorted.
pub fn macs() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for entry in dir.flatten() {
            if entry.file_name() == "lo" {
                continue;
            }
            if let Some(mac) = read_trimmed(&entry.path().join("address")) {
                let mac = mac.to_ascii_lowercase();
                if mac.len() == 17 && mac != "00:00:00:00:00:00" {
                    out.push(mac);
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// `"key":"value",` (or `null`).
fn field(out: &mut String, key: &str, value: Option<String>) {
    push_str(out, key);
    out.push(':');
    match value {
        Some(v) => push_str(out, &v),
        None => out.push_str("null"),
    }
    out.push(',');
}

/// A JSON string literal.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_str(&mut s, "a\"b\\c\n");
        assert_eq!(s, r#""a\"b\\c\u000a""#);
    }
}
