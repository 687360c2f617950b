//! The new system's own boot loader, written beside it so that, once committed, it can take
//! the disk over ([`super::takeover`]) and boot without the old system:
//!
//! - GRUB's modules, fonts and locales, copied from the running system's `/boot/grub`: the
//!   core image in the disk's boot track was built with exactly these, and finds them by
//!   partition number (Debian's `grub-install` writes a `(,msdos1)/boot/grub` prefix);
//! - a menu of the new system's own (`grub.cfg`, starting with [`HEADER`]): its kernel, the
//!   running system's serial/terminal settings, and the one-time boot and `custom.cfg` a later
//!   live deploy relies on (the image's own grub.cfg is kept as `grub.cfg.image`);
//! - an empty GRUB environment block.
//!
//! The old system's GRUB never reads these files: its prefix is the old filesystem until the
//! take-over swaps the partition entries.

use std::sync::Arc;

use diskferry_fs::overlay::{now, Attrs, TreeOverlay};
use diskferry_fs::{FileKind, Filesystem, NodeId};

use super::boot::{clean_title, Kernel};

/// The first line of a menu this module wrote.
pub const HEADER: &str = "# diskferry: this system's own GRUB menu";
/// Where GRUB's files are, in both systems.
const GRUB: &str = "/boot/grub";
/// The module every BIOS GRUB loads first: the sign the running system boots with one.
const NORMAL: &str = "/boot/grub/i386-pc/normal.mod";
/// Bounds on what is copied.
const MAX_BYTES: u64 = 64 << 20;
const MAX_FILES: usize = 8192;
/// GRUB's directory is two levels deep (`i386-pc/`, `locale/`, `fonts/`); one that nests
/// deeper is not GRUB's as grub-install makes it, and no kit is made of it.
const MAX_DEPTH: usize = 4;
/// Bounds on the terminal lines taken from the running system's menu.
const MAX_TERMINAL_LINES: usize = 16;
const MAX_LINE: usize = 256;

/// GRUB's files of the running system.
pub struct Kit {
    /// Paths under `/boot/grub`, with their bytes (`None`: a directory) and modes (0755 for
    /// directories, 0644 for files: nothing of the old system's setuid or writable bits).
    files: Vec<(String, Option<Vec<u8>>, u32)>,
    /// The top-level terminal and timeout lines of its grub.cfg.
    terminal: Vec<String>,
}

/// Reads GRUB's files from the running system's root `old`; why not, when they cannot be.
pub fn kit(old: &dyn Filesystem) -> Result<Kit, String> {
    old.lookup(NORMAL).map_err(|_| {
        format!("the running system has no {NORMAL}: it does not boot with BIOS GRUB from its root filesystem")
    })?;
    let dir = old
        .lookup(GRUB)
        .map_err(|e| format!("reading {GRUB}: {e}"))?;
    let mut kit = Kit {
        files: Vec::new(),
        terminal: Vec::new(),
    };
    let mut total = 0;
    collect(old, dir, "", 0, &mut kit.files, &mut total)?;
    if let Ok(node) = old.lookup(&format!("{GRUB}/grub.cfg")) {
        let cfg = old
            .read_all(node, 1 << 20)
            .map_err(|e| format!("reading grub.cfg: {e}"))?;
        kit.terminal = terminal_lines(&String::from_utf8_lossy(&cfg));
    }
    Ok(kit)
}

/// Files of the top level that are the old system's own, not GRUB's.
fn skipped(top: &str) -> bool {
    top == "grub.cfg" || top == "grubenv" || top.starts_with("custom.cfg") || top.starts_with('.')
}

fn collect(
    fs: &dyn Filesystem,
    dir: NodeId,
    rel: &str,
    depth: usize,
    out: &mut Vec<(String, Option<Vec<u8>>, u32)>,
    total: &mut u64,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "{GRUB}{rel} is nested deeper than GRUB's own files"
        ));
    }
    let entries = fs
        .read_dir(dir)
        .map_err(|e| format!("reading {GRUB}{rel}: {e}"))?;
    for e in entries {
        let name = e.name_lossy();
        let odd = name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']);
        if odd || (rel.is_empty() && skipped(&name)) {
            continue;
        }
        let path = format!("{rel}/{name}");
        if out.len() >= MAX_FILES {
            return Err(format!("{GRUB} holds more than {MAX_FILES} files"));
        }
        match e.kind {
            FileKind::Dir => {
                out.push((path.clone(), None, 0o755));
                collect(fs, e.node, &path, depth + 1, out, total)?;
            }
            FileKind::File => {
                let bytes = fs
                    .read_all(e.node, MAX_BYTES)
                    .map_err(|e| format!("reading {GRUB}{path}: {e}"))?;
                *total += bytes.len() as u64;
                if *total > MAX_BYTES {
                    return Err(format!("{GRUB} holds more than {MAX_BYTES} bytes"));
                }
                out.push((path, Some(bytes), 0o644));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A grub.cfg's top-level terminal and timeout settings (before its first entry). They are
/// the running system's, which the copied modules already trust to boot the machine.
fn terminal_lines(cfg: &str) -> Vec<String> {
    cfg.lines()
        .take_while(|l| !l.starts_with("menuentry") && !l.starts_with("submenu"))
        .filter(|l| l.len() <= MAX_LINE)
        .filter(|l| {
            [
                "serial ",
                "terminal_input ",
                "terminal_output ",
                "set timeout=",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .take(MAX_TERMINAL_LINES)
        .map(str::to_string)
        .collect()
}

/// The new system's own menu: its kernel from its root `uuid`, booted by default.
pub fn menu(kit: &Kit, kernel: &Kernel, uuid: &str, title: &str) -> String {
    let initrd = kernel
        .initrd
        .as_ref()
        .map(|i| format!("\n    initrd {i}"))
        .unwrap_or_default();
    format!(
        "{HEADER}, written by a live deploy: GRUB reads it once this system has taken the disk over; update-grub replaces it.\n\
         insmod part_msdos\ninsmod part_gpt\ninsmod ext2\n\
         {terminal}\
         if [ -s $prefix/grubenv ]; then\n  set have_grubenv=true\n  load_env\nfi\n\
         if [ \"${{next_entry}}\" ] ; then\n   set default=\"${{next_entry}}\"\n   set next_entry=\n   save_env next_entry\n   set boot_once=true\nelse\n   set default=\"0\"\nfi\n\
         menuentry \"{title}\" --id diskferry-own {{\n    \
         search --no-floppy --fs-uuid --set=root {uuid}\n    \
         linux {linux} root=UUID={uuid} {args}{initrd}\n}}\n\
         if [ -f ${{config_directory}}/custom.cfg ]; then\n  source ${{config_directory}}/custom.cfg\n\
         elif [ -z \"${{config_directory}}\" -a -f $prefix/custom.cfg ]; then\n  source $prefix/custom.cfg\nfi\n",
        terminal = kit.terminal.iter().map(|l| format!("{l}\n")).collect::<String>(),
        title = clean_title(title),
        linux = kernel.linux,
        args = kernel.args.join(" "),
    )
}

/// The system's name, from its `/etc/os-release`.
pub fn system_name(tree: &dyn Filesystem) -> String {
    tree.resolve("/etc/os-release")
        .and_then(|n| tree.read_all(n, 64 << 10))
        .ok()
        .and_then(|b| {
            String::from_utf8_lossy(&b).lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "Linux".into())
}

/// `tree` with the kit and `menu` added under `/boot/grub`.
pub fn add(
    tree: Arc<dyn Filesystem>,
    kit: &Kit,
    menu: String,
) -> diskferry_fs::Result<TreeOverlay> {
    let mut o = TreeOverlay::new(tree, now());
    o.create_dirs(GRUB, Attrs::root(0o755))?;
    let cfg = format!("{GRUB}/grub.cfg");
    if o.stat(&cfg)?.is_some() {
        o.rename(&cfg, &format!("{cfg}.image"))?;
    }
    // The image's own GRUB directories go: their modules are not the core image's.
    for (path, bytes, _) in &kit.files {
        if bytes.is_none() && path.matches('/').count() == 1 {
            let at = format!("{GRUB}{path}");
            if o.stat(&at)?.is_some() {
                o.remove(&at)?;
            }
        }
    }
    for (path, bytes, mode) in &kit.files {
        let at = format!("{GRUB}{path}");
        match bytes {
            None => o.create_dirs(&at, Attrs::root(*mode & 0o7777))?,
            Some(b) => o.write_file(&at, b.clone(), Attrs::root(*mode & 0o7777))?,
        }
    }
    o.write_file(&cfg, menu.into_bytes(), Attrs::root(0o644))?;
    let mut env = b"# GRUB Environment Block\n".to_vec();
    env.resize(1024, b'#');
    o.write_file(&format!("{GRUB}/grubenv"), env, Attrs::root(0o644))?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_menu_boots_the_new_root_by_default_and_keeps_what_a_later_deploy_needs() {
        let kit = Kit {
            files: Vec::new(),
            terminal: terminal_lines(
                "serial --unit=0 --speed=115200\nterminal_output serial\nset timeout=0\n\
                 if loadfont x; then\n  terminal_output gfxterm\nfi\n\
                 menuentry 'Debian' {\n  set timeout=9\n}\nserial --unit=1\n",
            ),
        };
        assert_eq!(
            kit.terminal,
            [
                "serial --unit=0 --speed=115200",
                "terminal_output serial",
                "set timeout=0"
            ]
        );
        let k = Kernel {
            linux: "/vmlinuz".into(),
            initrd: Some("/initrd.img".into()),
            args: vec!["ro".into(), "console=ttyS0".into()],
        };
        let m = menu(&kit, &k, "ab-cd", "Debian \"13\"");
        assert!(m.starts_with(HEADER), "{m}");
        assert!(
            m.contains("menuentry \"Debian 13\" --id diskferry-own"),
            "{m}"
        );
        assert!(
            m.contains("linux /vmlinuz root=UUID=ab-cd ro console=ttyS0\n    initrd /initrd.img"),
            "{m}"
        );
        // What a later live deploy's agent checks the menu for.
        assert!(m.contains("custom.cfg") && m.contains("next_entry"), "{m}");
        assert!(
            !m.contains("diskferry.live") && !m.contains("panic="),
            "{m}"
        );
        assert!(skipped("custom.cfg.diskferry-orig") && !skipped("i386-pc"));
    }

    /// A running system's root: GRUB's files, and `nested` directories under `/boot/grub`.
    fn old_root(nested: usize) -> (tempfile::TempDir, diskferry_fs::host::HostFs) {
        let dir = tempfile::tempdir().unwrap();
        let grub = dir.path().join("boot/grub");
        std::fs::create_dir_all(grub.join("i386-pc")).unwrap();
        std::fs::write(grub.join("i386-pc/normal.mod"), "module").unwrap();
        std::fs::write(grub.join("grub.cfg"), "serial --unit=0\n").unwrap();
        std::fs::write(grub.join("grubenv"), [b'#'; 1024]).unwrap();
        let mut deep = grub.clone();
        for i in 0..nested {
            deep.push(format!("d{i}"));
        }
        std::fs::create_dir_all(deep).unwrap();
        let fs = diskferry_fs::host::HostFs::open(dir.path()).unwrap();
        (dir, fs)
    }

    #[test]
    fn the_kit_copies_grub_s_files_but_the_menus_and_stops_at_a_hostile_depth() {
        let (_d, old) = old_root(0);
        let kit = kit(&old).unwrap();
        let mut paths: Vec<&str> = kit.files.iter().map(|f| f.0.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["/i386-pc", "/i386-pc/normal.mod"]);
        assert_eq!(kit.terminal, ["serial --unit=0"]);
        let (_d, deep) = old_root(12);
        let e = kit_error(&deep);
        assert!(e.contains("nested deeper"), "{e}");
        let bare = tempfile::tempdir().unwrap();
        let none = diskferry_fs::host::HostFs::open(bare.path()).unwrap();
        assert!(kit_error(&none).contains("BIOS GRUB"));
    }

    fn kit_error(fs: &dyn Filesystem) -> String {
        match kit(fs) {
            Ok(_) => panic!("a kit was made"),
            Err(e) => e,
        }
    }
}
