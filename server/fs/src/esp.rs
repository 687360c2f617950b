//! EFI system partitions and the firmware's fallback boot loader. With no boot entry in its
//! variables (blank NVRAM: a new machine, a replaced board, a VM with fresh variables) UEFI
//! firmware starts `\EFI\BOOT\BOOTX64.EFI` of a FAT volume and nothing else; a Linux system
//! installed with `grub-install` (without `--removable`) has its loader only in
//! `\EFI\<vendor>\` and a boot entry naming it. [`FallbackLoader`] is a [`TreeTransform`] that
//! adds the fallback to such a volume while a deploy recreates it: a copy of the vendor's own
//! loader — `shimx64.efi` (with the `grubx64.efi` and `mmx64.efi` shim loads from its own
//! directory) when the vendor has shim and GRUB, else `grubx64.efi` — and the vendor's
//! `grub.cfg` beside it when there is one (a signed monolithic GRUB reads it from its own
//! directory). Nothing already in `\EFI\BOOT` is replaced.
//!
//! A volume counts as an EFI system partition when it is FAT and holds an `EFI` directory:
//! firmware looks at every FAT volume it can read, whatever the partition's type. Names
//! compare case-insensitively (ASCII), as FAT's do. Everything in the volume is hostile: only
//! plain vendor names are used, directories are read a bounded number of times, and each
//! copied file is bounded ([`MAX_LOADER`]); the copies must fit the volume's free space with a
//! margin. Whatever stands in the way is a note (logged once per partition), never an error:
//! the fallback must not make a deploy fail.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::overlay::{Attrs, TreeOverlay, TreeTransform};
use super::{DirEntry, FileKind, Filesystem, FsKind, NodeId, Result, Timestamp};

/// The fallback loader's name in `\EFI\BOOT` (x86-64).
pub const FALLBACK: &str = "BOOTX64.EFI";
/// Largest file copied: loaders are a few MiB.
pub const MAX_LOADER: u64 = 32 << 20;
/// Vendor directories looked at, at most (sorted by name first).
const MAX_VENDORS: usize = 64;
/// Longest vendor name used.
const MAX_VENDOR_NAME: usize = 64;

const SHIM: &str = "shimx64.efi";
const GRUB: &str = "grubx64.efi";
const MOK_MANAGER: &str = "mmx64.efi";
const GRUB_CFG: &str = "grub.cfg";

/// The transform adding `\EFI\BOOT\BOOTX64.EFI` to EFI system partitions that lack it.
#[derive(Default)]
pub struct FallbackLoader {
    /// Notes already logged, by partition: a deploy applies the transform three times.
    noted: Mutex<BTreeSet<(u32, String)>>,
}

impl FallbackLoader {
    pub fn new() -> FallbackLoader {
        FallbackLoader::default()
    }

    fn note(&self, partition: u32, note: String) {
        let first = self
            .noted
            .lock()
            .map(|mut n| n.insert((partition, note.clone())))
            .unwrap_or(true);
        if first {
            tracing::warn!(partition, "{note}");
        }
    }
}

/// What a volume needs.
#[derive(Debug)]
enum Need {
    /// Not an EFI system partition, or its fallback is there: nothing to do.
    Nothing,
    /// The fallback is missing and cannot be added, for this reason.
    Cannot(String),
    /// The fallback is missing; these copies add it.
    Add(Plan),
}

/// One file to copy into `\EFI\BOOT`.
#[derive(Debug)]
struct Copy {
    from: NodeId,
    /// Where it comes from, for people (`\EFI\debian\shimx64.efi`).
    from_shown: String,
    to: &'static str,
    size: u64,
}

/// How the fallback is added.
#[derive(Debug)]
struct Plan {
    /// The volume's `EFI` directory as it is spelled there.
    efi: String,
    /// `\EFI\BOOT` as it is spelled there, or `None` when it must be made.
    boot: Option<String>,
    /// The fallback itself first.
    copies: Vec<Copy>,
    /// Files already in `\EFI\BOOT` that a copy would have replaced.
    kept: Vec<&'static str>,
    /// Other vendors' loaders passed over.
    passed_over: Vec<String>,
}

/// The vendor loader a fallback copies.
struct Vendor {
    name: String,
    entries: Vec<DirEntry>,
    shim: bool,
}

/// Whether `fs` is an EFI system partition lacking `\EFI\BOOT\BOOTX64.EFI` (for a note when
/// a copy by blocks cannot add it).
pub fn lacks_fallback(fs: &dyn Filesystem) -> bool {
    !matches!(need(fs), Ok(Need::Nothing))
}

/// The loader a boot entry for `fs` names, as firmware paths are written
/// (`\EFI\debian\shimx64.efi`): the vendor's shim when it has one with its GRUB, else its
/// GRUB; `None` when `fs` is not an EFI system partition holding one.
pub fn vendor_loader(fs: &dyn Filesystem) -> Result<Option<String>> {
    if !matches!(
        fs.info().kind,
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32
    ) {
        return Ok(None);
    }
    let root = fs.read_dir(fs.root())?;
    let Some(efi) = find(&root, "EFI").filter(|e| e.kind == FileKind::Dir) else {
        return Ok(None);
    };
    let efi_name = String::from_utf8_lossy(&efi.name).into_owned();
    let Some(vendor) = vendors(fs, &fs.read_dir(efi.node)?)?.into_iter().next() else {
        return Ok(None);
    };
    let wanted = if vendor.shim { SHIM } else { GRUB };
    let loader = file(&vendor.entries, wanted).expect("vendors() found it");
    Ok(Some(format!(
        "\\{efi_name}\\{}\\{}",
        vendor.name,
        String::from_utf8_lossy(&loader.name)
    )))
}

/// The entry of `entries` named `name` up to ASCII case (the first by raw name when a
/// damaged directory holds several).
fn find<'a>(entries: &'a [DirEntry], name: &str) -> Option<&'a DirEntry> {
    entries
        .iter()
        .filter(|e| e.name.eq_ignore_ascii_case(name.as_bytes()))
        .min_by(|a, b| a.name.cmp(&b.name))
}

/// A regular file of `entries` named `name` (up to case).
fn file<'a>(entries: &'a [DirEntry], name: &str) -> Option<&'a DirEntry> {
    find(entries, name).filter(|e| e.kind == FileKind::File)
}

/// A vendor directory's name, when it is plain enough to show and use: UTF-8, no path
/// separators or control characters, not `.`/`..`, not too long.
fn plain_name(name: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(name).ok()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_VENDOR_NAME
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == '\\' || c.is_control());
    ok.then(|| s.to_string())
}

/// What `fs` needs for a fallback loader.
fn need(fs: &dyn Filesystem) -> Result<Need> {
    if !matches!(
        fs.info().kind,
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32
    ) {
        return Ok(Need::Nothing);
    }
    let root = fs.read_dir(fs.root())?;
    let Some(efi) = find(&root, "EFI").filter(|e| e.kind == FileKind::Dir) else {
        return Ok(Need::Nothing);
    };
    let efi_name = String::from_utf8_lossy(&efi.name).into_owned();
    let efi_entries = fs.read_dir(efi.node)?;
    let (boot, boot_entries) = match find(&efi_entries, "BOOT") {
        Some(b) if b.kind == FileKind::Dir => {
            let entries = fs.read_dir(b.node)?;
            if find(&entries, FALLBACK).is_some() {
                return Ok(Need::Nothing);
            }
            (Some(String::from_utf8_lossy(&b.name).into_owned()), entries)
        }
        Some(_) => {
            return Ok(Need::Cannot(format!(
                "\\EFI\\BOOT is not a directory: no fallback loader (\\EFI\\BOOT\\{FALLBACK}) added"
            )))
        }
        None => (None, Vec::new()),
    };
    let mut vendors = vendors(fs, &efi_entries)?;
    if vendors.is_empty() {
        return Ok(Need::Cannot(format!(
            "no \\EFI\\<vendor>\\ holds {GRUB} (or {SHIM} with it): no fallback loader (\\EFI\\BOOT\\{FALLBACK}) added; firmware with blank boot variables will not find a loader here"
        )));
    }
    let chosen = vendors.remove(0);
    let passed_over = vendors
        .iter()
        .map(|v| format!("\\EFI\\{}\\", v.name))
        .collect();
    plan(fs, efi_name, boot, &boot_entries, chosen, passed_over)
}

/// The vendor directories holding a loader, the chosen one first: those with shim (and the
/// GRUB it loads) before those with GRUB alone, each by name.
fn vendors(fs: &dyn Filesystem, efi_entries: &[DirEntry]) -> Result<Vec<Vendor>> {
    let mut dirs: Vec<(String, NodeId)> = efi_entries
        .iter()
        .filter(|e| e.kind == FileKind::Dir && !e.name.eq_ignore_ascii_case(b"BOOT"))
        .filter_map(|e| plain_name(&e.name).map(|n| (n, e.node)))
        .collect();
    dirs.sort_by(|a, b| (a.0.to_ascii_lowercase(), &a.0).cmp(&(b.0.to_ascii_lowercase(), &b.0)));
    let mut found = Vec::new();
    for (name, node) in dirs.into_iter().take(MAX_VENDORS) {
        let entries = fs.read_dir(node)?;
        if file(&entries, GRUB).is_none() {
            continue;
        }
        let shim = file(&entries, SHIM).is_some();
        found.push(Vendor {
            name,
            entries,
            shim,
        });
    }
    // Stable: the name order stays within each group.
    found.sort_by_key(|v| !v.shim);
    Ok(found)
}

/// The copies from `vendor` into `\EFI\BOOT` (whose entries are `boot_entries`), checked
/// against the size bound and the volume's free space.
fn plan(
    fs: &dyn Filesystem,
    efi: String,
    boot: Option<String>,
    boot_entries: &[DirEntry],
    vendor: Vendor,
    passed_over: Vec<String>,
) -> Result<Need> {
    let wanted: &[(&str, &'static str)] = if vendor.shim {
        &[
            (SHIM, FALLBACK),
            (GRUB, GRUB),
            (MOK_MANAGER, MOK_MANAGER),
            (GRUB_CFG, GRUB_CFG),
        ]
    } else {
        &[(GRUB, FALLBACK), (GRUB_CFG, GRUB_CFG)]
    };
    let mut copies = Vec::new();
    let mut kept = Vec::new();
    for &(from, to) in wanted {
        let Some(e) = file(&vendor.entries, from) else {
            continue;
        };
        if to != FALLBACK && find(boot_entries, to).is_some() {
            kept.push(to);
            continue;
        }
        let from_shown = format!(
            "\\EFI\\{}\\{}",
            vendor.name,
            String::from_utf8_lossy(&e.name)
        );
        let size = fs.metadata(e.node)?.size;
        if size > MAX_LOADER {
            return Ok(Need::Cannot(format!(
                "{from_shown} is {size} bytes, more than a boot loader's {MAX_LOADER}: no fallback loader (\\EFI\\BOOT\\{FALLBACK}) added"
            )));
        }
        copies.push(Copy {
            from: e.node,
            from_shown,
            to,
            size,
        });
    }
    if let Some(why) = no_room(fs, &copies, boot.is_none()) {
        return Ok(Need::Cannot(why));
    }
    Ok(Need::Add(Plan {
        efi,
        boot,
        copies,
        kept,
        passed_over,
    }))
}

/// Why the copies would not fit the volume, if they would not: each takes whole clusters, a
/// new `\EFI\BOOT` one more, and a margin of two clusters and the allocation tables' share
/// stands for the volume's own structures (its used bytes count clusters only).
fn no_room(fs: &dyn Filesystem, copies: &[Copy], new_dir: bool) -> Option<String> {
    let info = fs.info();
    let cluster = u64::from(info.block_size.max(512));
    let data: u64 = copies
        .iter()
        .map(|c| c.size.div_ceil(cluster) * cluster)
        .sum();
    let tables = info.total_bytes / cluster * 4 * 2;
    let need = data + cluster * (2 + u64::from(new_dir)) + tables;
    let free = info.total_bytes.saturating_sub(info.used_bytes);
    (need > free).then(|| {
        format!(
            "the EFI system partition has about {free} bytes free, too few for the {data} bytes of a fallback loader: no \\EFI\\BOOT\\{FALLBACK} added"
        )
    })
}

/// The change lines of `plan`.
fn lines(plan: &Plan) -> Vec<String> {
    let mut out: Vec<String> = plan
        .copies
        .iter()
        .map(|c| {
            let why = match c.to {
                FALLBACK if plan.passed_over.is_empty() => String::new(),
                FALLBACK => format!(
                    "; chosen over {} (shim first, then by name)",
                    plan.passed_over.join(", ")
                ),
                GRUB => "; shim loads it from its own directory".into(),
                MOK_MANAGER => "; shim's MOK manager".into(),
                _ => "; GRUB reads it from its own directory".into(),
            };
            format!(
                "added \\EFI\\BOOT\\{} (copy of {}{why})",
                c.to, c.from_shown
            )
        })
        .collect();
    out.extend(
        plan.kept
            .iter()
            .map(|k| format!("kept the \\EFI\\BOOT\\{k} already there")),
    );
    out
}

impl FallbackLoader {
    /// The overlay adding `plan`'s copies onto `base`, dated like the loader it copies.
    fn add(base: Arc<dyn Filesystem>, plan: &Plan) -> Result<TreeOverlay> {
        let time = base
            .metadata(plan.copies[0].from)?
            .mtime
            .unwrap_or(Timestamp { secs: 0, nanos: 0 });
        let efi_dir = base.lookup(&plan.efi)?;
        let efi_meta = base.metadata(efi_dir)?;
        let mut o = TreeOverlay::new(base, time);
        let boot = match &plan.boot {
            Some(b) => b.clone(),
            None => {
                let attrs = Attrs {
                    mode: efi_meta.mode,
                    uid: efi_meta.uid,
                    gid: efi_meta.gid,
                };
                o.create_dirs(&format!("/{}/BOOT", plan.efi), attrs)?;
                "BOOT".to_string()
            }
        };
        for c in &plan.copies {
            o.copy_file(
                c.from,
                &format!("/{}/{boot}/{}", plan.efi, c.to),
                MAX_LOADER,
            )?;
        }
        Ok(o)
    }
}

impl TreeTransform for FallbackLoader {
    /// Never an error: what stands in the way is a note and the volume is left as it is.
    fn apply(
        &self,
        partition: u32,
        base: Arc<dyn Filesystem>,
    ) -> Result<Option<(TreeOverlay, Vec<String>)>> {
        let plan = match need(&*base) {
            Ok(Need::Nothing) => return Ok(None),
            Ok(Need::Add(plan)) if !plan.copies.is_empty() => plan,
            Ok(Need::Add(_)) => return Ok(None),
            Ok(Need::Cannot(why)) => {
                self.note(partition, why);
                return Ok(None);
            }
            Err(e) => {
                self.note(
                    partition,
                    format!("looking for the EFI fallback loader: {e}; none added"),
                );
                return Ok(None);
            }
        };
        match FallbackLoader::add(base, &plan) {
            Ok(o) => Ok(Some((o, lines(&plan)))),
            Err(e) => {
                self.note(
                    partition,
                    format!("adding the EFI fallback loader: {e}; none added"),
                );
                Ok(None)
            }
        }
    }

    fn describe(&self) -> String {
        format!("the EFI fallback loader (\\EFI\\BOOT\\{FALLBACK}) where missing")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fat::Fat;
    use crate::fat_write::{write_fat, FatOptions};
    use crate::host::HostFs;
    use diskferry_blockdev::{BlockDevice, MemoryDevice};

    const SIZE: usize = 16 << 20;

    /// A FAT volume holding `files` (path, content), written by our FAT writer from a host
    /// tree (names keep their case).
    fn esp(files: &[(&str, &[u8])]) -> Arc<dyn Filesystem> {
        esp_sized(files, SIZE)
    }

    fn esp_sized(files: &[(&str, &[u8])], size: usize) -> Arc<dyn Filesystem> {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        let host = HostFs::open(dir.path()).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(size));
        write_fat(Arc::clone(&dev), &host, &FatOptions::default()).unwrap();
        Arc::new(Fat::open(dev).unwrap())
    }

    /// The tree `fs` with `t`'s edits, written to a new FAT volume and read back.
    fn written(fs: &Arc<dyn Filesystem>, t: &dyn TreeTransform) -> (Fat, Vec<String>) {
        let (o, changes) = t.apply(1, Arc::clone(fs)).unwrap().expect("edits");
        let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(SIZE));
        write_fat(Arc::clone(&dev), &o, &FatOptions::default()).unwrap();
        (Fat::open(dev).unwrap(), changes)
    }

    fn read(fs: &dyn Filesystem, path: &str) -> Vec<u8> {
        fs.read_all(fs.lookup(path).unwrap(), 1 << 24).unwrap()
    }

    const SHIM_BYTES: &[u8] = b"MZ shim";
    const GRUB_BYTES: &[u8] = b"MZ grub";

    #[test]
    fn grub_alone_is_copied_with_its_config_and_its_times() {
        let fs = esp(&[
            ("EFI/debian/grubx64.efi", GRUB_BYTES),
            ("EFI/debian/grub.cfg", b"search.fs_uuid x root\n"),
        ]);
        let (out, changes) = written(&fs, &FallbackLoader::new());
        assert_eq!(read(&out, "/EFI/BOOT/BOOTX64.EFI"), GRUB_BYTES);
        assert_eq!(read(&out, "/EFI/BOOT/grub.cfg"), b"search.fs_uuid x root\n");
        assert_eq!(read(&out, "/EFI/debian/grubx64.efi"), GRUB_BYTES);
        assert_eq!(
            changes,
            [
                "added \\EFI\\BOOT\\BOOTX64.EFI (copy of \\EFI\\debian\\grubx64.efi)",
                "added \\EFI\\BOOT\\grub.cfg (copy of \\EFI\\debian\\grub.cfg; GRUB reads it from its own directory)"
            ]
        );
        let orig = fs
            .metadata(fs.lookup("/EFI/debian/grubx64.efi").unwrap())
            .unwrap();
        let copy = out
            .metadata(out.lookup("/EFI/BOOT/BOOTX64.EFI").unwrap())
            .unwrap();
        assert_eq!(
            (copy.mtime, copy.mode, copy.flags),
            (orig.mtime, orig.mode, orig.flags)
        );
    }

    #[test]
    fn shim_comes_first_with_the_grub_and_mok_manager_it_loads() {
        let fs = esp(&[
            ("EFI/debian/shimx64.efi", SHIM_BYTES),
            ("EFI/debian/grubx64.efi", GRUB_BYTES),
            ("EFI/debian/mmx64.efi", b"MZ mm"),
            ("EFI/debian/grub.cfg", b"cfg"),
            ("EFI/debian/BOOTX64.CSV", b"csv"),
        ]);
        let (out, changes) = written(&fs, &FallbackLoader::new());
        assert_eq!(read(&out, "/EFI/BOOT/BOOTX64.EFI"), SHIM_BYTES);
        assert_eq!(read(&out, "/EFI/BOOT/grubx64.efi"), GRUB_BYTES);
        assert_eq!(read(&out, "/EFI/BOOT/mmx64.efi"), b"MZ mm");
        assert_eq!(read(&out, "/EFI/BOOT/grub.cfg"), b"cfg");
        let boot = out.lookup("/EFI/BOOT").unwrap();
        assert_eq!(out.read_dir(boot).unwrap().len(), 4);
        assert_eq!(changes.len(), 4);
        assert_eq!(
            changes[0],
            "added \\EFI\\BOOT\\BOOTX64.EFI (copy of \\EFI\\debian\\shimx64.efi)"
        );
    }

    #[test]
    fn a_fallback_in_any_case_is_present_and_left_alone() {
        for path in [
            "efi/boot/bootx64.efi",
            "EFI/Boot/BootX64.efi",
            "EFI/BOOT/BOOTX64.EFI",
        ] {
            let efi = path.split('/').next().unwrap();
            let vendor = format!("{efi}/debian/grubx64.efi");
            let fs = esp(&[(path, b"theirs"), (&vendor, GRUB_BYTES)]);
            assert!(!lacks_fallback(&*fs), "{path}");
            assert!(
                FallbackLoader::new().apply(1, fs).unwrap().is_none(),
                "{path}"
            );
        }
    }

    #[test]
    fn lowercase_efi_and_boot_directories_are_used_as_they_are_spelled() {
        let fs = esp(&[
            ("efi/boot/fbx64.efi", b"fb"),
            ("efi/debian/grubx64.efi", GRUB_BYTES),
        ]);
        let (out, _) = written(&fs, &FallbackLoader::new());
        let efi = out.read_dir(out.root()).unwrap();
        assert_eq!(
            efi.iter().map(|e| e.name_lossy()).collect::<Vec<_>>(),
            ["efi"]
        );
        let boot: Vec<String> = out
            .read_dir(out.lookup("/efi/boot").unwrap())
            .unwrap()
            .iter()
            .map(|e| e.name_lossy())
            .collect();
        assert_eq!(boot.len(), 2, "{boot:?}");
        assert_eq!(read(&out, "/efi/boot/BOOTX64.EFI"), GRUB_BYTES);
        assert_eq!(
            out.read_dir(out.lookup("/efi").unwrap()).unwrap().len(),
            2,
            "no second BOOT beside boot"
        );
    }

    #[test]
    fn files_already_in_boot_are_kept() {
        let fs = esp(&[
            ("EFI/BOOT/grubx64.efi", b"older grub"),
            ("EFI/ubuntu/shimx64.efi", SHIM_BYTES),
            ("EFI/ubuntu/grubx64.efi", GRUB_BYTES),
        ]);
        let (out, changes) = written(&fs, &FallbackLoader::new());
        assert_eq!(read(&out, "/EFI/BOOT/BOOTX64.EFI"), SHIM_BYTES);
        assert_eq!(read(&out, "/EFI/BOOT/grubx64.efi"), b"older grub");
        assert!(changes.contains(&"kept the \\EFI\\BOOT\\grubx64.efi already there".into()));
    }

    #[test]
    fn several_vendors_shim_first_then_by_name() {
        let fs = esp(&[
            ("EFI/arch/grubx64.efi", b"arch grub"),
            ("EFI/fedora/shimx64.efi", b"fedora shim"),
            ("EFI/fedora/grubx64.efi", b"fedora grub"),
            ("EFI/Debian/shimx64.efi", b"debian shim"),
            ("EFI/Debian/grubx64.efi", b"debian grub"),
            // shim without the GRUB it loads cannot boot anything
            ("EFI/aaa/shimx64.efi", b"lonely shim"),
        ]);
        let (out, changes) = written(&fs, &FallbackLoader::new());
        assert_eq!(read(&out, "/EFI/BOOT/BOOTX64.EFI"), b"debian shim");
        assert_eq!(read(&out, "/EFI/BOOT/grubx64.efi"), b"debian grub");
        assert_eq!(
            changes[0],
            "added \\EFI\\BOOT\\BOOTX64.EFI (copy of \\EFI\\Debian\\shimx64.efi; chosen over \\EFI\\fedora\\, \\EFI\\arch\\ (shim first, then by name))"
        );
        let fs = esp(&[
            ("EFI/zeta/grubx64.efi", b"zeta"),
            ("EFI/alpha/grubx64.efi", b"alpha"),
        ]);
        assert_eq!(
            read(
                &written(&fs, &FallbackLoader::new()).0,
                "/EFI/BOOT/BOOTX64.EFI"
            ),
            b"alpha"
        );
    }

    #[test]
    fn no_vendor_loader_adds_nothing_and_boot_is_never_a_vendor() {
        for files in [
            &[("EFI/Microsoft/Boot/bootmgfw.efi", &b"MZ"[..])][..],
            // A grubx64.efi in BOOT itself is not a vendor's loader to copy.
            &[("EFI/BOOT/grubx64.efi", &b"MZ"[..]), ("EFI/boot2/x", b"")][..],
            &[("EFI/debian/shimx64.efi", &b"MZ"[..])][..],
        ] {
            let fs = esp(files);
            assert!(lacks_fallback(&*fs));
            let t = FallbackLoader::new();
            assert!(t.apply(1, fs).unwrap().is_none());
            assert_eq!(t.noted.lock().unwrap().len(), 1);
        }
        // Not an ESP: no EFI directory, or not FAT at all.
        let fs = esp(&[("boot/grubx64.efi", GRUB_BYTES)]);
        assert!(!lacks_fallback(&*fs));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("EFI/debian")).unwrap();
        std::fs::write(dir.path().join("EFI/debian/grubx64.efi"), GRUB_BYTES).unwrap();
        let host: Arc<dyn Filesystem> = Arc::new(HostFs::open(dir.path()).unwrap());
        assert!(FallbackLoader::new().apply(1, host).unwrap().is_none());
    }

    #[test]
    fn hostile_names_and_sizes_add_nothing() {
        assert_eq!(plain_name(b".."), None);
        assert_eq!(plain_name(b"a\\b"), None);
        assert_eq!(plain_name(b"a/b"), None);
        assert_eq!(plain_name(b"a\nb"), None);
        assert_eq!(plain_name(&[0xff, 0xfe]), None);
        assert_eq!(plain_name(&[b'v'; 65]), None);
        assert_eq!(plain_name(b"debian").as_deref(), Some("debian"));
        // A vendor named with a control character is passed over for a plain one.
        let fs = esp(&[
            ("EFI/a\u{1b}[2J/grubx64.efi", b"hostile"),
            ("EFI/debian/grubx64.efi", GRUB_BYTES),
        ]);
        assert_eq!(
            read(
                &written(&fs, &FallbackLoader::new()).0,
                "/EFI/BOOT/BOOTX64.EFI"
            ),
            GRUB_BYTES
        );
        // A "loader" of absurd size is not read: a note instead.
        let big = vec![0u8; (MAX_LOADER + 1) as usize];
        let fs = esp_sized(&[("EFI/debian/grubx64.efi", &big)], 48 << 20);
        let t = FallbackLoader::new();
        assert!(t.apply(1, fs).unwrap().is_none());
        let notes = t.noted.lock().unwrap();
        assert!(
            notes
                .iter()
                .any(|(_, n)| n.contains("more than a boot loader's")),
            "{notes:?}"
        );
    }

    #[test]
    fn a_nearly_full_volume_gets_a_note_not_a_failed_write() {
        let loader = vec![7u8; 3 << 20];
        let filler = vec![1u8; 4 << 20];
        let fs = esp_sized(
            &[("EFI/debian/grubx64.efi", &loader), ("filler", &filler)],
            8 << 20,
        );
        let t = FallbackLoader::new();
        assert!(t.apply(1, Arc::clone(&fs)).unwrap().is_none());
        assert!(t.apply(1, fs).unwrap().is_none());
        let notes = t.noted.lock().unwrap();
        assert_eq!(notes.len(), 1, "noted once: {notes:?}");
        assert!(notes.iter().next().unwrap().1.contains("too few"));
    }

    #[test]
    fn applied_twice_it_makes_the_same_tree() {
        let fs = esp(&[("EFI/debian/grubx64.efi", GRUB_BYTES)]);
        let t = FallbackLoader::new();
        let (a, ca) = t.apply(1, Arc::clone(&fs)).unwrap().unwrap();
        let (b, cb) = t.apply(1, fs).unwrap().unwrap();
        assert_eq!(ca, cb);
        let meta = |o: &TreeOverlay| {
            o.metadata(o.lookup("/EFI/BOOT/BOOTX64.EFI").unwrap())
                .unwrap()
        };
        let (ma, mb) = (meta(&a), meta(&b));
        assert_eq!(
            (ma.mtime, ma.crtime, ma.mode),
            (mb.mtime, mb.crtime, mb.mode)
        );
    }
}
