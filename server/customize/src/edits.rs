//! The small edits: host name (`/etc/hostname`, the `127.0.1.1` line of `/etc/hosts`),
//! machine-id (`/etc/machine-id` and a D-Bus copy), files, and first-boot commands (a
//! oneshot systemd unit that runs them once and removes itself).

use diskferry_fs::overlay::{Attrs, TreeOverlay};
use diskferry_fs::{FileKind, Filesystem};

use crate::{CustomizeError, MAX_CONFIG, ORIG_SUFFIX};

/// The text of the regular file at `path`, if there is one.
pub(crate) fn read_text(o: &TreeOverlay, path: &str) -> Result<Option<String>, CustomizeError> {
    Ok(o.read_file(path, MAX_CONFIG)?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// Writes `text` at `path`: a regular file there is replaced (kept as `*.diskferry-orig`,
/// owner and mode kept); anything else, or nothing, becomes a new file with `attrs`.
pub(crate) fn put_text(
    o: &mut TreeOverlay,
    path: &str,
    text: String,
    attrs: Attrs,
) -> Result<(), CustomizeError> {
    match o.stat(path)? {
        Some((_, FileKind::File)) => o.replace_file(path, text.into_bytes(), ORIG_SUFFIX)?,
        _ => o.write_file(path, text.into_bytes(), attrs)?,
    }
    Ok(())
}

/// Files of `dir` whose name ends with `suffix`.
pub(crate) fn files_in(
    o: &TreeOverlay,
    dir: &str,
    suffix: &str,
) -> Result<Vec<String>, CustomizeError> {
    let Some((node, FileKind::Dir)) = o.stat(dir)? else {
        return Ok(Vec::new());
    };
    Ok(o.read_dir(node)?
        .into_iter()
        .filter(|e| e.kind == FileKind::File)
        .map(|e| e.name_lossy())
        .filter(|n| n.ends_with(suffix))
        .map(|n| format!("{dir}/{n}"))
        .collect())
}

/// 32 lowercase hex digits, as `/etc/machine-id` holds.
pub(crate) fn random_machine_id() -> Result<String, CustomizeError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| CustomizeError::System(format!("randomness: {e}")))?;
    // A v4 UUID's bits, as systemd makes them.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

pub(crate) fn hostname(o: &mut TreeOverlay, name: &str) -> Result<Vec<String>, CustomizeError> {
    let old = read_text(o, "/etc/hostname")?.map(|t| t.trim().to_string());
    put_text(o, "/etc/hostname", format!("{name}\n"), Attrs::root(0o644))?;
    let mut changes = vec![match old {
        Some(old) => format!("hostname: {old} → {name} (/etc/hostname)"),
        None => format!("hostname: {name} (/etc/hostname)"),
    }];
    if let Some(hosts) = read_text(o, "/etc/hosts")? {
        let short = name.split('.').next().unwrap_or(name);
        let line = if short == name {
            format!("127.0.1.1\t{name}")
        } else {
            format!("127.0.1.1\t{name}\t{short}")
        };
        let mut found = false;
        let mut lines: Vec<String> = hosts
            .lines()
            .map(|l| {
                if l.split_whitespace().next() == Some("127.0.1.1") {
                    found = true;
                    line.clone()
                } else {
                    l.to_string()
                }
            })
            .collect();
        if !found {
            lines.push(line);
        }
        put_text(o, "/etc/hosts", lines.join("\n") + "\n", Attrs::root(0o644))?;
        changes.push("hostname: the 127.0.1.1 line of /etc/hosts".into());
    }
    Ok(changes)
}

/// `id` into `/etc/machine-id` (empty: systemd makes a new one at first boot); a D-Bus copy
/// that is a file gets the same (or goes, so D-Bus follows systemd's).
pub(crate) fn machine_id(o: &mut TreeOverlay, id: &str) -> Result<Vec<String>, CustomizeError> {
    let text = if id.is_empty() {
        String::new()
    } else {
        format!("{id}\n")
    };
    put_text(o, "/etc/machine-id", text.clone(), Attrs::root(0o444))?;
    let dbus = "/var/lib/dbus/machine-id";
    if let Some((_, FileKind::File)) = o.stat(dbus)? {
        if id.is_empty() {
            o.remove(dbus)?;
        } else {
            put_text(o, dbus, text, Attrs::root(0o444))?;
        }
    }
    Ok(vec![if id.is_empty() {
        "machine-id: emptied (systemd makes a new one at first boot)".into()
    } else {
        format!("machine-id: {id}")
    }])
}

pub(crate) fn file(
    o: &mut TreeOverlay,
    f: &crate::spec::File,
) -> Result<Vec<String>, CustomizeError> {
    let mode = crate::spec::mode_of("files.mode", f.mode.as_deref())?;
    let parent = f.path.rsplit_once('/').map_or("", |(p, _)| p);
    if !parent.is_empty() {
        o.create_dirs(parent, Attrs::root(0o755))?;
    }
    let existing = o.stat(&f.path)?;
    if let Some((_, FileKind::File)) = existing {
        o.rename(&f.path, &format!("{}{ORIG_SUFFIX}", f.path))?;
    }
    let attrs = Attrs {
        mode,
        uid: f.uid,
        gid: f.gid,
    };
    o.write_file(&f.path, f.content.clone().into_bytes(), attrs)?;
    Ok(vec![format!(
        "file {} {} ({} bytes, mode {mode:04o}, {}:{})",
        f.path,
        if existing.is_some() {
            "replaced"
        } else {
            "added"
        },
        f.content.len(),
        f.uid,
        f.gid
    )])
}

const FIRST_BOOT_SCRIPT: &str = "/usr/local/sbin/diskferry-first-boot";
const FIRST_BOOT_UNIT: &str = "/etc/systemd/system/diskferry-first-boot.service";
const FIRST_BOOT_WANTS: &str =
    "/etc/systemd/system/multi-user.target.wants/diskferry-first-boot.service";

/// The commands as a script, a oneshot unit that runs it once the network is up and then
/// removes the script, itself and its enablement — and the enablement.
pub(crate) fn first_boot(
    o: &mut TreeOverlay,
    commands: &[String],
) -> Result<Vec<String>, CustomizeError> {
    let mut script = String::from(
        "#!/bin/sh\n# Written by diskferry: the first-boot commands of this system's customization.\nset -e\n",
    );
    for c in commands {
        script.push_str(c);
        script.push('\n');
    }
    let unit = format!(
        "[Unit]\nDescription=diskferry first-boot commands\nWants=network-online.target\nAfter=network-online.target\nConditionPathExists={FIRST_BOOT_SCRIPT}\n\n[Service]\nType=oneshot\nExecStart={FIRST_BOOT_SCRIPT}\nExecStartPost=/bin/rm -f {FIRST_BOOT_SCRIPT} {FIRST_BOOT_WANTS} {FIRST_BOOT_UNIT}\n\n[Install]\nWantedBy=multi-user.target\n"
    );
    o.create_dirs("/usr/local/sbin", Attrs::root(0o755))?;
    o.write_file(FIRST_BOOT_SCRIPT, script.into_bytes(), Attrs::root(0o755))?;
    o.create_dirs(
        "/etc/systemd/system/multi-user.target.wants",
        Attrs::root(0o755),
    )?;
    o.write_file(FIRST_BOOT_UNIT, unit.into_bytes(), Attrs::root(0o644))?;
    o.symlink(FIRST_BOOT_WANTS, FIRST_BOOT_UNIT)?;
    Ok(vec![format!(
        "first boot: {} command(s) in {FIRST_BOOT_SCRIPT}, run once by diskferry-first-boot.service",
        commands.len()
    )])
}
