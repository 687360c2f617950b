//! Which block device a live file's filesystem sits on, from sysfs: the whole disk and where
//! on it the filesystem starts. Filesystems whose byte offsets are not one disk's sectors
//! (device-mapper: LUKS, LVM; software RAID) are refused here.

use std::path::{Path, PathBuf};

use crate::identity::read_trimmed;

use super::LiveError;

/// A filesystem's place: the disk under it and the disk offset of its first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The whole disk's device number (`makedev(major, minor)`).
    pub disk: u64,
    /// The disk's kernel name (`vda`).
    pub disk_name: String,
    /// Bytes from the start of the disk to the filesystem's first byte (a partition's start;
    /// 0 for a filesystem on the whole disk).
    pub start: u64,
}

/// The disk holding the filesystem whose device number is `dev` (a `stat`'s `st_dev`), read
/// from `sys` (`/sys`).
pub fn holder(dev: u64, sys: &Path) -> Result<Holder, LiveError> {
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let link = sys.join(format!("dev/block/{major}:{minor}"));
    let node = std::fs::canonicalize(&link).map_err(|_| LiveError::NotABlockDevice {
        device: format!("{major}:{minor}"),
    })?;
    let name = file_name(&node);
    if node.join("dm").is_dir() {
        let what = read_trimmed(&node.join("dm/name")).unwrap_or_else(|| name.clone());
        return Err(LiveError::Layered {
            device: name,
            what: format!("device-mapper volume {what:?} (LUKS encryption or LVM)"),
        });
    }
    if node.join("md").is_dir() {
        return Err(LiveError::Layered {
            device: name,
            what: "software RAID array".into(),
        });
    }
    if !node.join("partition").is_file() {
        return Ok(Holder {
            disk: dev,
            disk_name: name,
            start: 0,
        });
    }
    let sectors = number(&node.join("start"))?;
    let parent: PathBuf = node.parent().map(Path::to_path_buf).unwrap_or_default();
    let disk = device_number(&parent.join("dev"))?;
    Ok(Holder {
        disk,
        disk_name: file_name(&parent),
        start: sectors.checked_mul(512).ok_or_else(|| bad(&node))?,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn bad(p: &Path) -> LiveError {
    LiveError::Sysfs {
        path: p.display().to_string(),
    }
}

fn number(p: &Path) -> Result<u64, LiveError> {
    read_trimmed(p)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(p))
}

/// A sysfs `dev` attribute (`MAJOR:MINOR`) as a device number.
fn device_number(p: &Path) -> Result<u64, LiveError> {
    let text = read_trimmed(p).ok_or_else(|| bad(p))?;
    let (major, minor) = text.split_once(':').ok_or_else(|| bad(p))?;
    match (major.parse(), minor.parse()) {
        (Ok(major), Ok(minor)) => Ok(rustix::fs::makedev(major, minor)),
        _ => Err(bad(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs: disk vda (253:0) with partition vda2 (253:2) starting at sector 4096, and
    /// dm-0 (254:0), an encrypted volume.
    fn fake_sysfs(root: &Path) {
        let vda = root.join("devices/pci0000:00/0000:00:04.0/virtio1/block/vda");
        std::fs::create_dir_all(vda.join("vda2")).unwrap();
        std::fs::write(vda.join("dev"), "253:0\n").unwrap();
        std::fs::write(vda.join("vda2/partition"), "2\n").unwrap();
        std::fs::write(vda.join("vda2/start"), "4096\n").unwrap();
        let dm = root.join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(dm.join("dm")).unwrap();
        std::fs::write(dm.join("dm/name"), "luks-root\n").unwrap();
        std::fs::create_dir_all(root.join("dev/block")).unwrap();
        for (devno, target) in [
            (
                "253:0",
                "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda",
            ),
            (
                "253:2",
                "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda/vda2",
            ),
            ("254:0", "../../devices/virtual/block/dm-0"),
        ] {
            symlink(target, root.join("dev/block").join(devno)).unwrap();
        }
    }

    #[test]
    fn a_partition_is_found_on_its_disk_at_its_start() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path());
        let got = holder(rustix::fs::makedev(253, 2), dir.path()).unwrap();
        assert_eq!(
            got,
            Holder {
                disk: rustix::fs::makedev(253, 0),
                disk_name: "vda".into(),
                start: 4096 * 512,
            }
        );
        let whole = holder(rustix::fs::makedev(253, 0), dir.path()).unwrap();
        assert_eq!((whole.disk_name.as_str(), whole.start), ("vda", 0));
    }

    #[test]
    fn encrypted_volumes_and_unknown_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path());
        let e = holder(rustix::fs::makedev(254, 0), dir.path()).unwrap_err();
        assert!(e.to_string().contains("luks-root"), "{e}");
        let e = holder(rustix::fs::makedev(8, 0), dir.path()).unwrap_err();
        assert!(matches!(e, LiveError::NotABlockDevice { .. }), "{e}");
    }
}
