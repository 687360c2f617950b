//! UEFI boot entries through efivarfs: the one write the agent makes outside the disks it
//! serves, and only when started with `--allow-firmware` (the boot environment is). The server
//! builds the load option — it knows the deployed disk's partition and loader; the agent checks
//! its shape (attributes, a description ending in NUL, a device path list whose nodes fit it
//! and end with an End node), reuses the number of an entry already holding the same option or
//! takes the lowest free one, writes `Boot####` and puts it first in `BootOrder`.
//!
//! Each variable is written in one `write` of its attributes (non-volatile, boot service and
//! runtime access) and data, as efivarfs requires. `DISKFERRY_EFIVARS` is the test seam
//! (default `/sys/firmware/efi/efivars`).

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;

use diskferry_protocol::{ErrorCode, MAX_LOAD_OPTION};

use crate::disks::DiskError;

/// The EFI global variable GUID, as efivarfs names files.
const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS.
const ATTRIBUTES: u32 = 0x7;
/// Most boot entries looked at.
const MAX_ENTRIES: usize = 512;

fn efivars() -> PathBuf {
    std::env::var_os("DISKFERRY_EFIVARS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/firmware/efi/efivars"))
}

fn err(code: ErrorCode, message: impl Into<String>) -> DiskError {
    DiskError {
        code,
        message: message.into(),
    }
}

fn io_err(what: &str, e: io::Error) -> DiskError {
    err(ErrorCode::Io, format!("{what}: {e}"))
}

/// Writes `option` as a boot entry first in the boot order; returns its number.
pub fn set_boot_entry(option: &[u8]) -> Result<u16, DiskError> {
    check_load_option(option)
        .map_err(|why| err(ErrorCode::Unsupported, format!("not a load option: {why}")))?;
    let dir = efivars();
    if !dir.is_dir() {
        return Err(err(
            ErrorCode::Unsupported,
            "this machine has no UEFI variables (it started with BIOS, or efivarfs is not mounted)",
        ));
    }
    let entries = boot_entries(&dir)?;
    let number = match entries.iter().find(|(_, data)| data.as_slice() == option) {
        Some((n, _)) => *n,
        None => (0..=u16::MAX)
            .find(|n| !entries.iter().any(|(m, _)| m == n))
            .ok_or_else(|| err(ErrorCode::Io, "every boot entry number is taken"))?,
    };
    write_var(&dir, &format!("Boot{number:04X}"), option)?;
    let mut order = read_var(&dir, "BootOrder")?
        .map(|d| {
            d.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    order.retain(|&n| n != number);
    order.insert(0, number);
    let bytes: Vec<u8> = order.iter().flat_map(|n| n.to_le_bytes()).collect();
    write_var(&dir, "BootOrder", &bytes)?;
    Ok(number)
}

/// The existing `Boot####` entries: number and data (attributes stripped).
fn boot_entries(dir: &std::path::Path) -> Result<Vec<(u16, Vec<u8>)>, DiskError> {
    let mut out = Vec::new();
    let list = fs::read_dir(dir).map_err(|e| io_err("listing the UEFI variables", e))?;
    for entry in list.flatten().take(16 * MAX_ENTRIES) {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| {
                n.strip_suffix(GLOBAL)?
                    .strip_suffix('-')?
                    .strip_prefix("Boot")
            })
            .filter(|hex| hex.len() == 4)
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        if let Some(data) = read_var(dir, &format!("Boot{number:04X}"))? {
            out.push((number, data));
        }
        if out.len() >= MAX_ENTRIES {
            break;
        }
    }
    Ok(out)
}

/// A global variable's data, without its 4 attribute bytes; `None` when it does not exist.
fn read_var(dir: &std::path::Path, name: &str) -> Result<Option<Vec<u8>>, DiskError> {
    let path = dir.join(format!("{name}-{GLOBAL}"));
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&format!("reading {name}"), e)),
    };
    let mut data = Vec::new();
    use std::io::Read;
    file.take(MAX_LOAD_OPTION as u64 + 4 + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_err(&format!("reading {name}"), e))?;
    Ok(data.get(4..).map(<[u8]>::to_vec))
}

/// Writes a global variable in one write: attributes, then data.
fn write_var(dir: &std::path::Path, name: &str, data: &[u8]) -> Result<(), DiskError> {
    let path = dir.join(format!("{name}-{GLOBAL}"));
    let mut content = ATTRIBUTES.to_le_bytes().to_vec();
    content.extend_from_slice(data);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err(&format!("opening {name} for writing"), e))?;
    let n = file
        .write(&content)
        .map_err(|e| io_err(&format!("writing {name}"), e))?;
    if n != content.len() {
        return Err(err(ErrorCode::Io, format!("writing {name}: short write")));
    }
    Ok(())
}

/// Checks the shape of an `EFI_LOAD_OPTION`.
pub fn check_load_option(o: &[u8]) -> Result<(), &'static str> {
    if o.len() > MAX_LOAD_OPTION {
        return Err("too long");
    }
    let list_len = usize::from(u16::from_le_bytes(
        o.get(4..6)
            .ok_or("too short")?
            .try_into()
            .expect("two bytes"),
    ));
    // The description: UTF-16 units up to and including a NUL.
    let mut at = 6;
    loop {
        let unit = o.get(at..at + 2).ok_or("the description has no end")?;
        at += 2;
        if unit == [0, 0] {
            break;
        }
    }
    let list = o
        .get(at..at + list_len)
        .ok_or("the device path list is cut short")?;
    let mut node = 0;
    loop {
        let head = list
            .get(node..node + 4)
            .ok_or("a device path node is cut short")?;
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        if len < 4 || node + len > list.len() {
            return Err("a device path node has a bad length");
        }
        if head[0] == 0x7f && head[1] == 0xff {
            return if node + len == list.len() {
                Ok(())
            } else {
                Err("the device path list goes on after its end")
            };
        }
        node += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(description: &str, path: &[u8]) -> Vec<u8> {
        let mut o = 1u32.to_le_bytes().to_vec();
        o.extend_from_slice(&(path.len() as u16).to_le_bytes());
        for u in description.encode_utf16().chain([0]) {
            o.extend_from_slice(&u.to_le_bytes());
        }
        o.extend_from_slice(path);
        o
    }

    const END: [u8; 4] = [0x7f, 0xff, 4, 0];

    #[test]
    fn load_options_are_checked_before_anything_is_written() {
        assert!(check_load_option(&option("debian", &END)).is_ok());
        let file = [4u8, 4, 8, 0, b'a', 0, 0, 0];
        assert!(check_load_option(&option("debian", &[&file[..], &END].concat())).is_ok());
        assert!(
            check_load_option(&option("debian", &[])).is_err(),
            "no end node"
        );
        assert!(check_load_option(&option("debian", &[4, 4, 2, 0, 0x7f, 0xff, 4, 0])).is_err());
        assert!(check_load_option(&option("debian", &[0x7f, 0xff, 4, 0, 1, 1, 4, 0])).is_err());
        let mut cut = option("debian", &END);
        cut.truncate(cut.len() - 1);
        assert!(check_load_option(&cut).is_err());
        let mut unterminated = option("debian", &END);
        unterminated.truncate(10);
        assert!(check_load_option(&unterminated).is_err());
        assert!(check_load_option(&[1, 0]).is_err());
        assert!(check_load_option(&vec![0u8; MAX_LOAD_OPTION + 1]).is_err());
    }
}
