//! Switching a machine to its live system, and back.
//!
//! **Switch**: a partition entry covering the live system's range is added, nested inside
//! the running system's partition ([`diskferry_partition::nested`]), so the kernel and GRUB
//! find the new filesystem; then the running system's agent installs a GRUB menu entry for
//! it ([`menu`]) and boots it once (`next_entry`, as `grub-reboot` does). The entry finds the
//! new root by UUID, starts its kernel with `panic=10` (a new system that cannot start
//! reboots into the old one, whose GRUB no longer names it) and `diskferry.live=TOKEN`, by
//! which the new system's agent shows it is the live system that booted.
//!
//! **Commit**: the new system's agent marks its root committed; the menu, which looks for
//! that mark, then makes the entry the default.
//!
//! **Rollback** ([`undo`]), from the old system: the nested entry removed, the GRUB menu of
//! the running system restored, the live file unpinned and deleted — the old system exactly
//! as it was.

use std::sync::Arc;

use diskferry_blockdev::BlockDevice;
use diskferry_fs::Filesystem;
use diskferry_partition::nested::{add_nested, remove_nested};
use diskferry_partition::Guid;
use diskferry_protocol::{Reply, Request, LIVE_ENTRY_ID, LIVE_STATE};
use diskferry_remote::Connection;

use super::{LiveDeployError, Window};

/// Where the live system's kernel and initrd are, and the kernel's arguments, as the new
/// system's own GRUB menu gives them (else Debian's `/vmlinuz` and `/initrd.img` links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub linux: String,
    pub initrd: Option<String>,
    /// Arguments other than `root=` and `BOOT_IMAGE=`.
    pub args: Vec<String>,
}

/// The kernel the new system's tree boots.
pub fn kernel(tree: &dyn Filesystem) -> Kernel {
    let from_menu = ["/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"]
        .iter()
        .find_map(|p| {
            let node = tree.lookup(p).ok()?;
            let text = tree.read_all(node, 1 << 20).ok()?;
            first_entry(&String::from_utf8_lossy(&text))
        });
    let links = Kernel {
        linux: "/vmlinuz".into(),
        initrd: tree
            .resolve("/initrd.img")
            .ok()
            .map(|_| "/initrd.img".into()),
        args: vec!["ro".into()],
    };
    match from_menu {
        // Debian keeps /vmlinuz pointing at the newest kernel: it survives kernel updates.
        Some(k) if tree.resolve("/vmlinuz").is_ok() => Kernel {
            args: k.args,
            ..links
        },
        Some(k) => k,
        None => links,
    }
}

/// The first menu entry's `linux` and `initrd` lines of a grub.cfg.
fn first_entry(cfg: &str) -> Option<Kernel> {
    let mut linux: Option<(String, Vec<String>)> = None;
    for line in cfg.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), &linux) {
            (Some("linux" | "linux16" | "linuxefi"), None) => {
                let path = words.next()?.to_string();
                let args = words
                    .filter(|w| !w.starts_with("root=") && !w.starts_with("BOOT_IMAGE="))
                    .map(str::to_string)
                    .collect();
                linux = Some((path, args));
            }
            (Some("initrd" | "initrd16" | "initrdefi"), Some((path, args))) => {
                return Some(Kernel {
                    linux: path.clone(),
                    initrd: words.next().map(str::to_string),
                    args: args.clone(),
                });
            }
            _ => {}
        }
    }
    linux.map(|(linux, args)| Kernel {
        linux,
        initrd: None,
        args,
    })
}

/// `title` without what would end or expand a double-quoted GRUB word.
pub fn clean_title(title: &str) -> String {
    title
        .chars()
        .filter(|c| !matches!(c, '"' | '\\' | '$' | '\n'))
        .collect()
}

/// The GRUB script the running system's agent installs: the `diskferry-live` entry, made the
/// default once the new system is committed.
pub fn menu(kernel: &Kernel, uuid: &str, token: &str, title: &str) -> String {
    let title = clean_title(title);
    let search = format!("search --no-floppy --fs-uuid --set=diskferry_live {uuid}");
    let args = kernel.args.join(" ");
    let initrd = kernel
        .initrd
        .as_ref()
        .map(|i| format!("\n    initrd ($diskferry_live){i}"))
        .unwrap_or_default();
    format!(
        "insmod part_msdos\ninsmod part_gpt\ninsmod ext2\n\
         {search}\n\
         if [ -f ($diskferry_live)/{state} ]; then\n    source ($diskferry_live)/{state}\nfi\n\
         if [ \"${{diskferry_committed}}\" = 1 ]; then\n    set default={id}\nfi\n\
         menuentry \"{title} (diskferry live)\" --id {id} {{\n    \
         {search}\n    \
         linux ($diskferry_live){linux} root=UUID={uuid} {args} panic=10 diskferry.live={token}{initrd}\n}}\n",
        state = LIVE_STATE,
        id = LIVE_ENTRY_ID,
        linux = kernel.linux,
    )
}

/// Refuses, before anything is written, a running system a live system cannot be added to:
/// one whose file is not inside a partition, one that itself runs from a live partition (its
/// root nested in another: its firmware boots another system's GRUB), one whose root has the
/// image's filesystem UUID (GRUB and the kernel would find the running root for the new one),
/// or a table without a free entry. Answers the running system's filesystem, when it can be
/// read.
pub fn check_host(
    disk: &Arc<dyn BlockDevice>,
    window: &Window,
    uuid: &str,
) -> Result<Option<Box<dyn Filesystem>>, LiveDeployError> {
    let refuse = |why: String| Err(LiveDeployError::Boot(why));
    let table = diskferry_partition::read_table(&**disk)
        .map_err(|e| LiveDeployError::Boot(format!("reading the partition table: {e}")))?;
    let end = window.start + window.len;
    let Some(host) = table
        .partitions
        .iter()
        .filter(|p| p.start <= window.start && end <= p.end())
        .min_by_key(|p| p.size)
    else {
        return refuse("the live file is not inside a partition of the disk's table".into());
    };
    if table
        .partitions
        .iter()
        .any(|o| o.number != host.number && o.start <= host.start && host.end() <= o.end())
    {
        return refuse(format!(
            "the running system runs from a live partition ({} inside another): live-deploy from the system it was deployed from (after a rollback), or by network boot",
            host.number
        ));
    }
    let host_fs = diskferry_partition::open_partition(Arc::clone(disk), host)
        .map_err(|e| e.to_string())
        .and_then(|slice| diskferry_fs::open(Arc::new(slice)).map_err(|e| e.to_string()))
        .ok();
    if let Some(fs) = &host_fs {
        if fs.info().uuid.eq_ignore_ascii_case(uuid) {
            return refuse(format!(
                "the running system's filesystem has the image's UUID {uuid}: the new system could not be told from it at boot; deploy an image with another identity"
            ));
        }
    }
    let used = table.partitions.iter().filter(|p| p.number <= 4).count()
        + usize::from(table.mbr_extended.is_some());
    let full = match table.scheme {
        diskferry_partition::Scheme::Gpt => {
            table.partitions.len() >= table.gpt_entries.max(128) as usize
        }
        _ => used >= 4,
    };
    if full {
        return refuse("the partition table has no free entry for the live system".into());
    }
    Ok(host_fs)
}

/// A random token naming one live deploy.
pub fn new_token() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).expect("the system's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Adds the partition entry for `window` on `disk` and has the running system boot `menu`
/// once; returns the new partition's number.
pub fn switch(
    conn: &Connection,
    disk: &Arc<dyn BlockDevice>,
    window: &Window,
    menu: &str,
) -> Result<u32, LiveDeployError> {
    let mut guid = [0u8; 16];
    getrandom::fill(&mut guid).map_err(|e| LiveDeployError::Boot(e.to_string()))?;
    guid[7] = (guid[7] & 0x0F) | 0x40;
    let sector = u64::from(disk.logical_sector_size());
    let number = add_nested(
        &**disk,
        window.start,
        window.len / sector * sector,
        Guid(guid),
    )
    .map_err(|e| LiveDeployError::Boot(format!("adding the partition entry: {e}")))?;
    if let Err(e) = call(conn, Request::LiveBoot { menu: menu.into() }) {
        let _ = remove_nested(&**disk);
        return Err(LiveDeployError::Boot(e));
    }
    Ok(number)
}

/// Undoes a live deploy from the old system: the nested entry, the GRUB menu and the live
/// file; returns what was done.
pub fn undo(
    conn: &Connection,
    disk: &Arc<dyn BlockDevice>,
) -> Result<Vec<String>, LiveDeployError> {
    let mut done = Vec::new();
    let removed = remove_nested(&**disk)
        .map_err(|e| LiveDeployError::Boot(format!("removing the partition entry: {e}")))?;
    if !removed.is_empty() {
        done.push(format!("partition entry {removed:?} removed"));
    }
    call(
        conn,
        Request::LiveBoot {
            menu: String::new(),
        },
    )
    .map_err(LiveDeployError::Boot)?;
    done.push("GRUB menu restored".into());
    call(conn, Request::LiveRemove).map_err(LiveDeployError::Agent)?;
    done.push("live file removed, its space given back".into());
    Ok(done)
}

/// Marks the running live system committed.
pub fn commit(conn: &Connection) -> Result<(), LiveDeployError> {
    call(conn, Request::LiveCommit { committed: true }).map_err(LiveDeployError::Agent)
}

/// Asks the agent for `request`, which it answers `Done` or with an error (said).
pub(super) fn call(conn: &Connection, request: Request) -> Result<(), String> {
    match conn.call_blocking(request) {
        Ok(Reply::Done) => Ok(()),
        Ok(Reply::Error { message, .. }) => Err(message),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "menuentry 'Debian GNU/Linux' --class debian {\n\
        \tload_video\n\tinsmod ext2\n\tsearch --no-floppy --fs-uuid --set=root 1234\n\
        \techo 'Loading Linux 6.1.0-18-cloud-amd64 ...'\n\
        \tlinux\t/boot/vmlinuz-6.1.0-18-cloud-amd64 root=UUID=1234 ro console=ttyS0 quiet\n\
        \techo 'Loading initial ramdisk ...'\n\tinitrd\t/boot/initrd.img-6.1.0-18-cloud-amd64\n}\n\
        menuentry 'Debian, recovery' {\n\tlinux /boot/vmlinuz-old root=UUID=1234 single\n}\n";

    #[test]
    fn the_first_entry_gives_the_kernel_and_its_arguments() {
        let k = first_entry(DEBIAN).unwrap();
        assert_eq!(k.linux, "/boot/vmlinuz-6.1.0-18-cloud-amd64");
        assert_eq!(
            k.initrd.as_deref(),
            Some("/boot/initrd.img-6.1.0-18-cloud-amd64")
        );
        assert_eq!(k.args, ["ro", "console=ttyS0", "quiet"]);
        assert_eq!(first_entry("set default=0\n"), None);
    }

    #[test]
    fn the_menu_boots_the_new_root_by_uuid_with_the_token_and_a_panic_timeout() {
        let k = first_entry(DEBIAN).unwrap();
        let m = menu(&k, "abcd-ef", "0123456789ab", "golden \"v2\"");
        assert!(m.contains("--id diskferry-live"), "{m}");
        assert!(
            m.contains("menuentry \"golden v2 (diskferry live)\""),
            "{m}"
        );
        assert!(m.contains(
            "linux ($diskferry_live)/boot/vmlinuz-6.1.0-18-cloud-amd64 root=UUID=abcd-ef ro console=ttyS0 quiet panic=10 diskferry.live=0123456789ab"
        ), "{m}");
        assert!(m.contains("initrd ($diskferry_live)/boot/initrd.img-6.1.0-18-cloud-amd64"));
        assert!(
            m.contains("source ($diskferry_live)/etc/diskferry/live.cfg"),
            "{m}"
        );
        assert!(
            m.contains(
                "if [ \"${diskferry_committed}\" = 1 ]; then\n    set default=diskferry-live"
            ),
            "{m}"
        );
        assert_eq!(new_token().len(), 24);
    }
}
