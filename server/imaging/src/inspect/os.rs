//! Static configuration analysis: which operating system a filesystem holds, read from its
//! files alone — Linux: os-release, hostname, kernels, fstab; Windows: the SOFTWARE and SYSTEM
//! registry hives (read with `nt-hive`); boot loaders on any volume (EFI System Partition
//! files, GRUB, syslinux, bootmgr).

use serde::{Deserialize, Serialize};

use diskferry_fs::Filesystem;

/// Small configuration files are read whole up to this size.
const MAX_CONFIG: u64 = 1 << 20;
/// Largest registry hive read (a SOFTWARE hive of a long-lived system is some 100 MiB).
const MAX_HIVE: u64 = 512 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInfo {
    /// "linux" or "windows"; empty when only boot files were found.
    pub family: String,
    pub name: Option<String>,
    pub version: Option<String>,
    pub pretty_name: Option<String>,
    pub hostname: Option<String>,
    pub kernels: Vec<String>,
    pub module_dirs: Vec<String>,
    /// fstab lines (comments and blank lines left out).
    pub fstab: Vec<String>,
    /// Windows: EditionID, DisplayVersion and CurrentBuild from the SOFTWARE hive.
    pub edition: Option<String>,
    pub display_version: Option<String>,
    pub build: Option<String>,
    pub bootloaders: Vec<String>,
    /// Linux: what moving it to other hardware depends on (initramfs drivers, network tool
    /// and MAC pins, how the root is named).
    #[serde(default)]
    pub system: Option<diskferry_customize::SystemReport>,
}

fn read_text(fs: &dyn Filesystem, path: &str) -> Option<String> {
    let node = fs.resolve(path).ok()?;
    String::from_utf8(fs.read_all(node, MAX_CONFIG).ok()?).ok()
}

fn names_in(fs: &dyn Filesystem, dir: &str) -> Vec<String> {
    let Ok(node) = fs.resolve(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = fs
        .read_dir(node)
        .map(|entries| entries.iter().map(|e| e.name_lossy()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// `KEY=value` lines of os-release, unquoted.
fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}

/// What the files of `fs` say about the system on it; `None` when nothing is recognised.
pub fn detect(fs: &dyn Filesystem) -> Option<OsInfo> {
    let mut info = OsInfo::default();
    let release = read_text(fs, "/etc/os-release").or_else(|| read_text(fs, "/usr/lib/os-release"));
    if let Some(text) = &release {
        info.family = "linux".into();
        info.name = os_release_field(text, "NAME");
        info.version = os_release_field(text, "VERSION_ID");
        info.pretty_name = os_release_field(text, "PRETTY_NAME");
        info.hostname = read_text(fs, "/etc/hostname")
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty());
        info.kernels = names_in(fs, "/boot")
            .into_iter()
            .filter(|n| {
                n.starts_with("vmlinuz") || n.starts_with("vmlinux") || n.starts_with("bzImage")
            })
            .collect();
        info.module_dirs = names_in(fs, "/lib/modules");
        if info.module_dirs.is_empty() {
            info.module_dirs = names_in(fs, "/usr/lib/modules");
        }
        info.fstab = read_text(fs, "/etc/fstab")
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
    }
    let windows = release.is_none() && windows(fs, &mut info);
    info.bootloaders = bootloaders(fs);
    (release.is_some() || windows || !info.bootloaders.is_empty()).then_some(info)
}

/// Finds `path` comparing names without regard to ASCII case, as Windows does.
fn lookup_nocase(fs: &dyn Filesystem, path: &str) -> Option<diskferry_fs::NodeId> {
    let mut node = fs.root();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        node = fs
            .read_dir(node)
            .ok()?
            .into_iter()
            .find(|e| e.name.eq_ignore_ascii_case(part.as_bytes()))?
            .node;
    }
    Some(node)
}

fn read_hive(fs: &dyn Filesystem, name: &str) -> Option<Vec<u8>> {
    let node = lookup_nocase(fs, &format!("/Windows/System32/config/{name}"))?;
    fs.read_all(node, MAX_HIVE).ok()
}

/// Fills `info` from the registry hives; false when there is no Windows here.
fn windows(fs: &dyn Filesystem, info: &mut OsInfo) -> bool {
    let Some(software) = read_hive(fs, "SOFTWARE") else {
        return false;
    };
    info.family = "windows".into();
    // The hives are hostile input to a third-party parser: a panic is a lost detail, not a
    // lost inspection.
    let details = std::panic::catch_unwind(|| {
        let string = |hive: &nt_hive::Hive<&[u8]>, key: &str, value: &str| -> Option<String> {
            let root = hive.root_key_node().ok()?;
            let node = root.subpath(key)?.ok()?;
            let v = node.value(value)?.ok()?;
            v.string_data()
                .ok()
                .map(|s| s.trim_end_matches('\0').to_string())
        };
        let hive = nt_hive::Hive::new(&software[..]).ok()?;
        let cv = "Microsoft\\Windows NT\\CurrentVersion";
        Some((
            string(&hive, cv, "ProductName"),
            string(&hive, cv, "EditionID"),
            string(&hive, cv, "DisplayVersion").or_else(|| string(&hive, cv, "ReleaseId")),
            string(&hive, cv, "CurrentBuild").or_else(|| string(&hive, cv, "CurrentBuildNumber")),
        ))
    });
    if let Ok(Some((product, edition, display, build))) = details {
        info.name = product.clone();
        info.edition = edition;
        info.display_version = display.clone();
        info.build = build.clone();
        info.version = build.clone();
        info.pretty_name = product.map(|p| {
            let mut s = p;
            if let Some(d) = display {
                s.push(' ');
                s.push_str(&d);
            }
            if let Some(b) = build {
                s.push_str(&format!(" (build {b})"));
            }
            s
        });
    }
    if let Some(system) = read_hive(fs, "SYSTEM") {
        let name = std::panic::catch_unwind(|| {
            let hive = nt_hive::Hive::new(&system[..]).ok()?;
            let root = hive.root_key_node().ok()?;
            let current = root
                .subkey("Select")?
                .ok()?
                .value("Current")?
                .ok()?
                .dword_data()
                .ok()?;
            let path = format!("ControlSet{current:03}\\Control\\ComputerName\\ComputerName");
            let v = root.subpath(&path)?.ok()?.value("ComputerName")?.ok()?;
            v.string_data()
                .ok()
                .map(|s| s.trim_end_matches('\0').to_string())
        });
        info.hostname = name.ok().flatten();
    }
    true
}

/// Boot loaders whose files are on this volume.
fn bootloaders(fs: &dyn Filesystem) -> Vec<String> {
    let mut found = Vec::new();
    let exists = |p: &str| fs.lookup(p).is_ok();
    if exists("/boot/grub/grub.cfg") || exists("/boot/grub2/grub.cfg") || exists("/grub/grub.cfg") {
        found.push("grub".to_string());
    }
    if exists("/boot/syslinux") || exists("/syslinux") || exists("/ldlinux.sys") {
        found.push("syslinux".to_string());
    }
    if exists("/bootmgr") {
        found.push("bootmgr".to_string());
    }
    for vendor in names_in(fs, "/EFI") {
        for file in names_in(fs, &format!("/EFI/{vendor}")) {
            if file.to_ascii_lowercase().ends_with(".efi") {
                found.push(format!("efi:/EFI/{vendor}/{file}"));
            }
        }
    }
    found
}
