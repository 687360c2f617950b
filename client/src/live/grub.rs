//! The running system's GRUB, switched to boot the live system once: the menu the server
//! sends goes into `custom.cfg` beside `grub.cfg` (which Debian's and Fedora's generated
//! menus read at their end), any custom.cfg of the system's own kept after it and saved as
//! `custom.cfg.diskferry-orig`, and `next_entry` set in the GRUB environment block — what
//! `grub-reboot` does: GRUB boots that entry once and clears it. Undone by an empty menu.
//!
//! Files are written through the kernel like any program writes them (a new custom.cfg by
//! rename, the 1024-byte environment block in place, as GRUB itself rewrites it), and the
//! agent reads nothing of them but to check they are what it expects.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use diskferry_protocol::{is_live_committed, live_state, LIVE_STATE, LIVE_STATE_SIZE};

use super::LiveError;

/// The menu entry's id, which `next_entry` names.
pub use diskferry_protocol::LIVE_ENTRY_ID as ENTRY_ID;
/// The first line of a custom.cfg this agent wrote.
const OURS: &str = "# diskferry live deploy";
/// The first line of a GRUB environment block, and its size.
const ENV_HEADER: &str = "# GRUB Environment Block\n";
const ENV_SIZE: usize = 1024;
/// Largest menu accepted.
pub const MAX_MENU: usize = 64 << 10;

/// The GRUB directory under `root` whose grub.cfg reads custom.cfg and honours `next_entry`.
pub fn grub_dir(root: &Path) -> Result<PathBuf, LiveError> {
    let refuse = |why: String| LiveError::Grub { why };
    for dir in ["boot/grub", "boot/grub2"] {
        let dir = root.join(dir);
        let Ok(cfg) = std::fs::read_to_string(dir.join("grub.cfg")) else {
            continue;
        };
        if !cfg.contains("custom.cfg") {
            return Err(refuse(format!(
                "{}/grub.cfg does not read custom.cfg (is /etc/grub.d/41_custom missing?)",
                dir.display()
            )));
        }
        if !cfg.contains("next_entry") {
            return Err(refuse(format!(
                "{}/grub.cfg has no one-time boot (next_entry, as grub-reboot uses)",
                dir.display()
            )));
        }
        return Ok(dir);
    }
    Err(refuse(
        "no /boot/grub/grub.cfg: this system does not boot with GRUB".into(),
    ))
}

/// Installs `menu` and boots its entry once; an empty `menu` undoes it.
pub fn switch(root: &Path, menu: &str) -> Result<(), LiveError> {
    let dir = grub_dir(root)?;
    if menu.is_empty() {
        restore_custom(&dir)?;
        set_env(&dir, "next_entry", None)
    } else {
        write_custom(&dir, menu)?;
        set_env(&dir, "next_entry", Some(ENTRY_ID))
    }
}

fn io_error(what: &str, path: &Path, source: io::Error) -> LiveError {
    LiveError::Io {
        what: format!("{what} {}", path.display()),
        source,
    }
}

/// custom.cfg: our header and menu, then the system's own custom.cfg (saved once).
fn write_custom(dir: &Path, menu: &str) -> Result<(), LiveError> {
    let custom = dir.join("custom.cfg");
    let saved = dir.join("custom.cfg.diskferry-orig");
    match std::fs::read_to_string(&custom) {
        Ok(text) if !text.starts_with(OURS) && !saved.exists() => {
            std::fs::copy(&custom, &saved).map_err(|e| io_error("save", &custom, e))?;
        }
        _ => {}
    }
    let own = std::fs::read_to_string(&saved).unwrap_or_default();
    let text = format!("{OURS}: booted once by next_entry, kept once committed\n{menu}\n{own}");
    let tmp = dir.join("custom.cfg.diskferry-new");
    std::fs::write(&tmp, text).map_err(|e| io_error("write", &tmp, e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error("sync", &tmp, e))?;
    std::fs::rename(&tmp, &custom).map_err(|e| io_error("rename", &tmp, e))?;
    sync(dir)
}

/// The system's own custom.cfg back, or none.
fn restore_custom(dir: &Path) -> Result<(), LiveError> {
    let custom = dir.join("custom.cfg");
    let saved = dir.join("custom.cfg.diskferry-orig");
    if saved.exists() {
        std::fs::rename(&saved, &custom).map_err(|e| io_error("restore", &custom, e))?;
    } else if std::fs::read_to_string(&custom).is_ok_and(|t| t.starts_with(OURS)) {
        std::fs::remove_file(&custom).map_err(|e| io_error("remove", &custom, e))?;
    }
    sync(dir)
}

fn sync(dir: &Path) -> Result<(), LiveError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync", dir, e))
}

/// Sets (or removes) one variable of grubenv, rewriting its 1024 bytes in place (GRUB finds
/// the block where it was); a missing grubenv is created.
fn set_env(dir: &Path, key: &str, value: Option<&str>) -> Result<(), LiveError> {
    let path = dir.join("grubenv");
    let mut vars = match std::fs::read(&path) {
        Ok(b) => parse_env(&b).ok_or_else(|| LiveError::Grub {
            why: format!("{} is not a GRUB environment block", path.display()),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error("read", &path, e)),
    };
    vars.retain(|(k, _)| k != key);
    if let Some(v) = value {
        vars.push((key.to_string(), v.to_string()));
    }
    let block = encode_env(&vars).ok_or_else(|| LiveError::Grub {
        why: "the GRUB environment is full".into(),
    })?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error("open", &path, e))?;
    file.write_all_at(&block, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", &path, e))
}

/// The variables of a GRUB environment block; `None` when it is not one.
fn parse_env(b: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(b).ok()?;
    let body = text.strip_prefix(ENV_HEADER)?;
    if b.len() != ENV_SIZE {
        return None;
    }
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The 1024-byte block holding `vars`, padded with `#`; `None` when they do not fit.
fn encode_env(vars: &[(String, String)]) -> Option<Vec<u8>> {
    let mut text = String::from(ENV_HEADER);
    for (k, v) in vars {
        text.push_str(&format!("{k}={v}\n"));
    }
    if text.len() > ENV_SIZE {
        return None;
    }
    let mut b = text.into_bytes();
    b.resize(ENV_SIZE, b'#');
    Some(b)
}

/// The running kernel's boot id (`/proc/sys/kernel/random/boot_id`): it changes at every
/// boot, so the server tells a reboot from a dropped connection.
pub fn boot_id(root: &Path) -> Option<String> {
    let id = std::fs::read_to_string(root.join("proc/sys/kernel/random/boot_id")).ok()?;
    let id = id.trim();
    (id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .then(|| id.to_string())
}

/// The live deploy token on the running kernel's command line (`diskferry.live=TOKEN`): the
/// live system's GRUB entry passes it, so the server knows it booted.
pub fn token(root: &Path) -> Option<String> {
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("diskferry.live="))
        .filter(|t| t.len() <= 64 && t.chars().all(|c| c.is_ascii_alphanumeric()))
        .map(str::to_string)
}

/// The `root=` argument of the running kernel's command line (`UUID=…`, `/dev/sda1`): which
/// filesystem the boot loader started, so the server tells a system taken over from the one
/// before it.
pub fn booted_root(root: &Path) -> Option<String> {
    let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("root="))
        .filter(|r| r.len() <= 128 && r.chars().all(|c| c.is_ascii_graphic() && c != '"'))
        .map(str::to_string)
}

/// Whether the running system is a committed live system (its state file says so).
pub fn is_committed(root: &Path) -> bool {
    let mut head = [0u8; 64];
    std::fs::File::open(root.join(LIVE_STATE))
        .and_then(|f| f.read_at(&mut head, 0))
        .is_ok_and(|n| is_live_committed(&head[..n]))
}

/// Marks the running system committed (or not): its state file, made by the deploy, is
/// rewritten in place, where GRUB reads it whether or not the journal was written back.
pub fn commit(root: &Path, committed: bool) -> Result<(), LiveError> {
    let path = root.join(LIVE_STATE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| LiveError::Grub {
            why: format!(
                "{} is missing ({e}): this is not a live-deployed system",
                path.display()
            ),
        })?;
    let mut now = vec![0u8; LIVE_STATE_SIZE];
    let read = file
        .read_at(&mut now, 0)
        .map_err(|e| io_error("read", &path, e))?;
    let len = file
        .metadata()
        .map_err(|e| io_error("stat", &path, e))?
        .len();
    if read != LIVE_STATE_SIZE
        || len != LIVE_STATE_SIZE as u64
        || !now.starts_with(b"set diskferry_committed=")
    {
        return Err(LiveError::Grub {
            why: format!("{} is not a live state file", path.display()),
        });
    }
    file.write_all_at(&live_state(committed), 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| io_error("write", &path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with Debian's generated grub.cfg fragments that matter, a grubenv made by
    /// grub-editenv, and a custom.cfg of the system's own.
    fn root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let grub = root.path().join("boot/grub");
        std::fs::create_dir_all(&grub).unwrap();
        std::fs::write(
            grub.join("grub.cfg"),
            "if [ \"${next_entry}\" ] ; then\n   set default=\"${next_entry}\"\n   set next_entry=\n   save_env next_entry\nfi\n\
             if [ -f  ${config_directory}/custom.cfg ]; then\n  source ${config_directory}/custom.cfg\nfi\n",
        )
        .unwrap();
        let mut env = ENV_HEADER.as_bytes().to_vec();
        env.extend_from_slice(b"saved_entry=0\n");
        env.resize(ENV_SIZE, b'#');
        std::fs::write(grub.join("grubenv"), env).unwrap();
        std::fs::write(grub.join("custom.cfg"), "menuentry mine {}\n").unwrap();
        root
    }

    #[test]
    fn a_switch_boots_the_entry_once_and_is_undone_exactly() {
        let root = root();
        let grub = root.path().join("boot/grub");
        let env_before = std::fs::read(grub.join("grubenv")).unwrap();
        switch(root.path(), "menuentry \"new\" --id diskferry-live {}").unwrap();
        let custom = std::fs::read_to_string(grub.join("custom.cfg")).unwrap();
        assert!(custom.starts_with(OURS), "{custom}");
        assert!(custom.contains("--id diskferry-live"));
        assert!(
            custom.ends_with("menuentry mine {}\n"),
            "the system's own entries stay"
        );
        let env = std::fs::read(grub.join("grubenv")).unwrap();
        assert_eq!(env.len(), ENV_SIZE);
        let vars = parse_env(&env).unwrap();
        assert!(
            vars.contains(&("next_entry".into(), ENTRY_ID.into())),
            "{vars:?}"
        );
        assert!(vars.contains(&("saved_entry".into(), "0".into())));
        // Twice is the same as once.
        switch(root.path(), "menuentry \"new\" --id diskferry-live {}").unwrap();
        assert_eq!(
            std::fs::read_to_string(grub.join("custom.cfg")).unwrap(),
            custom
        );

        switch(root.path(), "").unwrap();
        assert_eq!(
            std::fs::read_to_string(grub.join("custom.cfg")).unwrap(),
            "menuentry mine {}\n"
        );
        assert!(!grub.join("custom.cfg.diskferry-orig").exists());
        assert!(std::fs::read(grub.join("grubenv")).unwrap() == env_before);
    }

    #[test]
    fn a_menu_without_custom_cfg_or_a_foreign_grubenv_is_refused_untouched() {
        let root = root();
        let grub = root.path().join("boot/grub");
        std::fs::write(grub.join("grub.cfg"), "set default=0\n").unwrap();
        let e = switch(root.path(), "menuentry x {}").unwrap_err();
        assert!(e.to_string().contains("custom.cfg"), "{e}");
        assert_eq!(
            std::fs::read_to_string(grub.join("custom.cfg")).unwrap(),
            "menuentry mine {}\n"
        );

        let root = self::root();
        let grub = root.path().join("boot/grub");
        std::fs::write(grub.join("grubenv"), "not an environment block").unwrap();
        assert!(switch(root.path(), "menuentry x {}").is_err());
        let bare = tempfile::tempdir().unwrap();
        assert!(switch(bare.path(), "menuentry x {}")
            .unwrap_err()
            .to_string()
            .contains("GRUB"));
    }

    #[test]
    fn the_token_comes_from_the_kernel_command_line_and_commit_rewrites_the_state_in_place() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("proc")).unwrap();
        std::fs::write(
            root.path().join("proc/cmdline"),
            "BOOT_IMAGE=/vmlinuz root=UUID=x ro diskferry.live=ab12CD panic=10\n",
        )
        .unwrap();
        assert_eq!(token(root.path()).as_deref(), Some("ab12CD"));
        assert_eq!(booted_root(root.path()).as_deref(), Some("UUID=x"));
        assert_eq!(boot_id(root.path()), None);
        std::fs::create_dir_all(root.path().join("proc/sys/kernel/random")).unwrap();
        let id = root.path().join("proc/sys/kernel/random/boot_id");
        std::fs::write(&id, "6d1f0c2e-3b1a-4c55-9a5e-0f2d3c4b5a69\n").unwrap();
        assert_eq!(
            boot_id(root.path()).as_deref(),
            Some("6d1f0c2e-3b1a-4c55-9a5e-0f2d3c4b5a69")
        );
        std::fs::write(&id, "\"not an id\"\n").unwrap();
        assert_eq!(boot_id(root.path()), None);
        std::fs::write(root.path().join("proc/cmdline"), "diskferry.live=a/b\n").unwrap();
        assert_eq!(token(root.path()), None);
        assert_eq!(booted_root(root.path()), None);
        assert!(
            commit(root.path(), true).is_err(),
            "not a live-deployed system"
        );
        let state = root.path().join(LIVE_STATE);
        std::fs::create_dir_all(state.parent().unwrap()).unwrap();
        std::fs::write(&state, live_state(false)).unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&state).unwrap());
        commit(root.path(), true).unwrap();
        let text = std::fs::read_to_string(&state).unwrap();
        assert!(text.starts_with("set diskferry_committed=1\n") && text.len() == LIVE_STATE_SIZE);
        let meta = std::fs::metadata(&state).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&meta),
            inode,
            "rewritten in place"
        );
        commit(root.path(), false).unwrap();
        assert!(std::fs::read_to_string(&state)
            .unwrap()
            .starts_with("set diskferry_committed=0\n"));
        std::fs::write(&state, "rm -rf /\n").unwrap();
        assert!(commit(root.path(), true).is_err(), "not a state file");
    }
}
