//! Users: added to (or updated in) `/etc/passwd`, `/etc/shadow` and `/etc/group` as
//! `useradd` would — the next free uid from 1000, a group of the same name, a home directory
//! (0700) — with their password hash (or a locked password), extra groups and
//! `~/.ssh/authorized_keys` (0600, theirs).

use diskferry_fs::overlay::{Attrs, TreeOverlay};
use diskferry_fs::{Filesystem, Timestamp};

use crate::edits::{put_text, read_text};
use crate::spec::User;
use crate::CustomizeError;

/// First uid and gid given to people.
const FIRST_ID: u32 = 1000;
/// Ids at and above this are system ranges (nobody is 65534).
const LAST_ID: u32 = 59999;

fn sys(why: String) -> CustomizeError {
    CustomizeError::System(why)
}

/// The colon-separated lines of an account file.
fn records(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(':').map(String::from).collect())
        .collect()
}

fn join(records: &[Vec<String>]) -> String {
    records.iter().map(|r| r.join(":") + "\n").collect()
}

/// The lowest id from 1000 that no record uses in field `field`.
fn free_id(records: &[Vec<String>], field: usize) -> Result<u32, CustomizeError> {
    let used: std::collections::BTreeSet<u32> = records
        .iter()
        .filter_map(|r| r.get(field)?.parse().ok())
        .collect();
    (FIRST_ID..=LAST_ID)
        .find(|id| !used.contains(id))
        .ok_or_else(|| sys("no free id from 1000 to 59999".into()))
}

pub(crate) fn apply(
    o: &mut TreeOverlay,
    u: &User,
    now: Timestamp,
) -> Result<Vec<String>, CustomizeError> {
    let mut passwd =
        records(&read_text(o, "/etc/passwd")?.ok_or_else(|| sys("/etc/passwd is missing".into()))?);
    let mut group = records(&read_text(o, "/etc/group")?.unwrap_or_default());
    let mut shadow = records(&read_text(o, "/etc/shadow")?.unwrap_or_default());
    let existing = passwd.iter().position(|r| r[0] == u.name);
    let (uid, gid, home, added) = match existing {
        Some(i) => {
            let r = &passwd[i];
            let id = |f: usize| r.get(f).and_then(|v| v.parse().ok()).unwrap_or(0);
            (id(2), id(3), r.get(5).cloned().unwrap_or_default(), false)
        }
        None => {
            let uid = match u.uid {
                Some(id)
                    if passwd
                        .iter()
                        .any(|r| r.get(2).is_some_and(|v| *v == id.to_string())) =>
                {
                    return Err(sys(format!("uid {id} of user {} is taken", u.name)))
                }
                Some(id) => id,
                None => free_id(&passwd, 2)?,
            };
            let gid = match group.iter().position(|r| r[0] == u.name) {
                Some(g) => group[g].get(2).and_then(|v| v.parse().ok()).unwrap_or(uid),
                None => {
                    let gid = if group
                        .iter()
                        .any(|r| r.get(2).is_some_and(|v| *v == uid.to_string()))
                    {
                        free_id(&group, 2)?
                    } else {
                        uid
                    };
                    group.push(vec![
                        u.name.clone(),
                        "x".into(),
                        gid.to_string(),
                        String::new(),
                    ]);
                    gid
                }
            };
            let shell = match &u.shell {
                Some(s) => s.clone(),
                // Looking, not editing: /bin is a link to usr/bin on merged-/usr systems.
                None if o.resolve("/bin/bash").is_ok() => "/bin/bash".into(),
                None => "/bin/sh".into(),
            };
            let home = format!("/home/{}", u.name);
            passwd.push(vec![
                u.name.clone(),
                "x".into(),
                uid.to_string(),
                gid.to_string(),
                String::new(),
                home.clone(),
                shell,
            ]);
            (uid, gid, home, true)
        }
    };
    if let Some(s) = u.shell.as_ref().filter(|_| !added) {
        if let Some(r) = passwd.iter_mut().find(|r| r[0] == u.name) {
            if r.len() > 6 {
                r[6] = s.clone();
            }
        }
    }
    let hash = u.password_hash.clone().unwrap_or_else(|| "!".into());
    let days = (now.secs / 86_400).to_string();
    match shadow.iter_mut().find(|r| r[0] == u.name) {
        Some(r) if r.len() > 2 => {
            r[1] = hash;
            r[2] = days;
        }
        _ => shadow.push(vec![
            u.name.clone(),
            hash,
            days,
            "0".into(),
            "99999".into(),
            "7".into(),
            String::new(),
            String::new(),
            String::new(),
        ]),
    }
    for g in &u.groups {
        let Some(r) = group.iter_mut().find(|r| r[0] == *g) else {
            return Err(sys(format!("user {}: the system has no group {g}", u.name)));
        };
        while r.len() < 4 {
            r.push(String::new());
        }
        let mut members: Vec<String> = r[3]
            .split(',')
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect();
        if !members.contains(&u.name) {
            members.push(u.name.clone());
        }
        r[3] = members.join(",");
    }
    put_text(o, "/etc/passwd", join(&passwd), Attrs::root(0o644))?;
    put_text(o, "/etc/group", join(&group), Attrs::root(0o644))?;
    put_text(
        o,
        "/etc/shadow",
        join(&shadow),
        Attrs {
            mode: 0o640,
            uid: 0,
            gid: shadow_gid(&group),
        },
    )?;
    let mine = Attrs {
        mode: 0o700,
        uid,
        gid,
    };
    if !home.starts_with('/') || home == "/" {
        return Err(sys(format!(
            "user {}: home {home:?} is not a directory to write to",
            u.name
        )));
    }
    if let Some((parent, _)) = home.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
        o.create_dirs(parent, Attrs::root(0o755))?;
    }
    o.create_dirs(&home, mine)?;
    if !u.authorized_keys.is_empty() {
        let ssh = format!("{home}/.ssh");
        o.create_dirs(&ssh, mine)?;
        let keys: String = u.authorized_keys.iter().map(|k| format!("{k}\n")).collect();
        o.write_file(
            &format!("{ssh}/authorized_keys"),
            keys.into_bytes(),
            Attrs {
                mode: 0o600,
                uid,
                gid,
            },
        )?;
    }
    Ok(vec![format!(
        "user {} {} (uid {uid}, gid {gid}{}{}{})",
        u.name,
        if added { "added" } else { "updated" },
        if u.password_hash.is_some() {
            ", password set"
        } else {
            ", password locked"
        },
        if u.groups.is_empty() {
            String::new()
        } else {
            format!(", groups {}", u.groups.join(","))
        },
        if u.authorized_keys.is_empty() {
            String::new()
        } else {
            format!(", {} authorized key(s)", u.authorized_keys.len())
        },
    )])
}

/// The `shadow` group's id (Debian's /etc/shadow is root:shadow 0640), else root's.
fn shadow_gid(group: &[Vec<String>]) -> u32 {
    group
        .iter()
        .find(|r| r[0] == "shadow")
        .and_then(|r| r.get(2)?.parse().ok())
        .unwrap_or(0)
}
