//! Live files on real filesystems: ext4 images on loop devices, mounted by the kernel, with
//! e2fsprogs' `debugfs` (which reads the extent tree itself, not through FIEMAP) and
//! `e2fsck -fn` as the independent checkers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::disks::{DiskSpec, OpenDisk};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A filesystem image on a loop device, mounted; unmounted and detached when dropped.
struct Mounted {
    _dir: tempfile::TempDir,
    device: String,
    mnt: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// `mkfs` (with `args`) on a `mib` MiB image, mounted.
    fn new(mkfs: &str, args: &[&str], mib: u64) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let device = run("losetup", &["-f", "--show", img.to_str().unwrap()])
            .trim()
            .to_string();
        let mut fs_args = args.to_vec();
        fs_args.push(&device);
        run(mkfs, &fs_args);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mounted {
            _dir: dir,
            device,
            mnt,
            mounted: false,
        };
        m.mount();
        m
    }

    fn ext4(mib: u64) -> Mounted {
        Mounted::new("mkfs.ext4", &["-q", "-F", "-b", "4096"], mib)
    }

    fn mount(&mut self) {
        run("mount", &[&self.device, self.mnt.to_str().unwrap()]);
        self.mounted = true;
    }

    fn unmount(&mut self) {
        run("umount", &[self.mnt.to_str().unwrap()]);
        self.mounted = false;
    }

    fn spec(&self) -> DiskSpec {
        DiskSpec {
            path: PathBuf::from(&self.device),
            name: self.device.clone(),
        }
    }

    fn live(&self) -> Live {
        Live::new(self.mnt.join("diskferry-live"), &[self.spec()])
    }

    /// `e2fsck -fn` must find nothing (unmounted).
    fn fsck_clean(&mut self) {
        let was = self.mounted;
        if was {
            self.unmount();
        }
        run("e2fsck", &["-fn", &self.device]);
        if was {
            self.mount();
        }
    }

    /// Entries in the filesystem's root, other than lost+found.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lost+found")
            .collect();
        names.sort();
        names
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// The file's disk runs as e2fsprogs reads its extent tree (`debugfs ex`), in file order.
fn debugfs_runs(device: &str, name: &str, block: u64) -> Vec<DiskRun> {
    let out = run("debugfs", &["-R", &format!("ex /{name}"), device]);
    let mut runs: Vec<DiskRun> = Vec::new();
    // Leaf lines: "Level Entries  Logical  Physical Length Flags", e.g.
    // " 0/ 0   1/  1     0 - 4095  1234 - 5329   4096 Uninit"
    for line in out.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = cols.iter().rposition(|c| *c == "-") else {
            continue;
        };
        let (Ok(phys), Ok(len)) = (cols[dash - 1].parse::<u64>(), cols[dash + 2].parse::<u64>())
        else {
            continue;
        };
        let (offset, len) = (phys * block, len * block);
        match runs.last_mut() {
            Some(r) if r.offset + r.len == offset => r.len += len,
            _ => runs.push(DiskRun { offset, len }),
        }
    }
    runs
}

#[test]
fn a_pinned_file_maps_to_the_sectors_its_filesystem_gives_it_and_only_those_are_writable() {
    let mut fs = Mounted::ext4(64);
    std::fs::write(fs.mnt.join("keep.txt"), b"the running system's file\n").unwrap();
    let live = fs.live();
    let map = live.prepare(24 << 20, &[fs.spec()]).unwrap();
    assert_eq!(map.size(), 24 << 20);
    assert_eq!(map.disk, fs.device);
    assert_eq!(map.block_size, 4096);
    // Nothing partial is left, the file is pinned.
    assert_eq!(fs.entries(), ["diskferry-live", "keep.txt"]);
    let lsattr = run("lsattr", &[fs.mnt.join("diskferry-live").to_str().unwrap()]);
    assert!(
        lsattr.split_whitespace().next().unwrap().contains('i'),
        "{lsattr}"
    );
    assert!(std::fs::remove_file(fs.mnt.join("diskferry-live")).is_err());

    // e2fsprogs reads the same runs from the extent tree.
    run("sync", &[]);
    assert_eq!(debugfs_runs(&fs.device, "diskferry-live", 4096), map.runs);

    // Writes go inside the map and nowhere else.
    let disk = OpenDisk::open(&fs.spec(), true, Some(Arc::new(fs.live()))).unwrap();
    let first = map.runs[0];
    let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    disk.write(first.offset, &pattern).unwrap();
    let lowest = map.runs.iter().map(|r| r.offset).min().unwrap();
    let end = map.runs.iter().map(|r| r.offset + r.len).max().unwrap();
    for (offset, len) in [(0, 4096), (lowest - 4096, 8192), (end - 4096, 8192)] {
        let e = disk.write(offset, &vec![0xEE; len]).unwrap_err();
        assert!(e.message.contains("live"), "{offset}: {}", e.message);
    }
    assert!(disk.write_zeroes(0, 4096).is_err());
    assert!(disk.discard(end, 4096).is_err());
    disk.flush().unwrap();
    drop(disk);

    // The bytes are on the device where the map says; the old filesystem is untouched.
    let mut back = vec![0u8; pattern.len()];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&fs.device).unwrap(),
        &mut back,
        first.offset,
    )
    .unwrap();
    assert!(
        back == pattern,
        "the pattern is on the disk at the mapped offset"
    );
    fs.fsck_clean();
    assert_eq!(
        std::fs::read(fs.mnt.join("keep.txt")).unwrap(),
        b"the running system's file\n"
    );

    // A restarted agent takes the pinned file up again with the same map.
    let again = fs.live();
    assert_eq!(again.pinned_size(), Some(24 << 20));
    assert_eq!(
        again.prepare(0, &[fs.spec()]).unwrap(),
        map,
        "size 0 asks for the map"
    );
    // A pinned file is never handed out again to be written, whatever the size.
    for size in [24 << 20, 8 << 20] {
        let e = again.prepare(size, &[fs.spec()]).unwrap_err();
        assert!(matches!(e, LiveError::AlreadyPinned { .. }), "{e}");
    }

    // Removing gives the space back, and nothing may be written any more.
    let free_before = pin::free_bytes(&fs.mnt).unwrap();
    assert!(again.remove().unwrap());
    assert!(!again.remove().unwrap(), "a second remove finds nothing");
    assert_eq!(fs.entries(), ["keep.txt"]);
    assert!(pin::free_bytes(&fs.mnt).unwrap() >= free_before + (24 << 20));
    assert!(again
        .guarded(map_disk(&fs), first.offset, 4096, None, || Ok(()))
        .is_err());
    // With nothing pinned, only a committed live system may change its own disk's
    // partition table (taking the disk over), and nothing else: sector 0 with its boot code
    // kept.
    let mut sector0 = vec![0u8; 512];
    sector0[510..].copy_from_slice(&[0x55, 0xAA]);
    let mut table = sector0.clone();
    table[446 + 4] = 0x83;
    let read0 = || Some(sector0.clone());
    let write = |live: &Live, data: &[u8], disk, offset| {
        let t = super::TableWrite {
            data,
            sector0: &read0,
            disk_size: 1 << 30,
            sector: 512,
        };
        live.guarded(disk, offset, data.len() as u64, Some(t), || Ok(()))
    };
    let disk = map_disk(&fs);
    let system = || {
        Live::with_system(
            fs.mnt.join("diskferry-live"),
            fs.mnt.clone(),
            PathBuf::from("/sys"),
            &[fs.spec()],
        )
    };
    std::fs::create_dir_all(fs.mnt.join("etc/diskferry")).unwrap();
    let state = fs.mnt.join(diskferry_protocol::LIVE_STATE);
    std::fs::write(&state, diskferry_protocol::live_state(false)).unwrap();
    assert!(write(&system(), &table, disk, 0).is_err(), "not committed");
    std::fs::write(&state, diskferry_protocol::live_state(true)).unwrap();
    let committed = system();
    assert!(write(&committed, &table, disk, 0).is_ok(), "a table write");
    assert!(
        write(&committed, &table, disk + 1, 0).is_err(),
        "another disk"
    );
    assert!(
        write(&committed, &table, disk, 4096).is_err(),
        "not the table"
    );
    table[0] = 0xEB;
    assert!(
        write(&committed, &table, disk, 0).is_err(),
        "boot code changed"
    );
    std::fs::remove_dir_all(fs.mnt.join("etc")).unwrap();
    assert!(matches!(
        again.prepare(0, &[fs.spec()]),
        Err(LiveError::NothingPinned)
    ));
    fs.fsck_clean();
}

fn map_disk(fs: &Mounted) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(&fs.device).unwrap().rdev()
}

/// Asserts that preparing fails with an error containing `says` and leaves `fs` as it was.
fn refused(live: &Live, size: u64, served: &[DiskSpec], dir: &Path, says: &str) {
    let before = listing(dir);
    let e = live.prepare(size, served).unwrap_err();
    assert!(e.to_string().contains(says), "{e}");
    assert_eq!(listing(dir), before, "a refusal changes nothing");
    assert_eq!(live.pinned_size(), None);
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_file_on_a_disk_the_agent_does_not_serve_or_without_room_is_refused() {
    let mut fs = Mounted::ext4(32);
    let other = Mounted::ext4(16);
    let live = fs.live();
    refused(&live, 8 << 20, &[other.spec()], &fs.mnt, "does not serve");
    refused(
        &live,
        64 << 20,
        &[fs.spec()],
        &fs.mnt,
        "not enough free space",
    );
    refused(&live, 4097, &[fs.spec()], &fs.mnt, "multiple of 4096");
    let e = live.prepare(0, &[fs.spec()]).unwrap_err();
    assert!(matches!(e, LiveError::NothingPinned), "{e}");
    fs.fsck_clean();
}

#[test]
fn btrfs_and_filesystems_without_disk_sectors_are_refused() {
    let btrfs = Mounted::new("mkfs.btrfs", &["-q", "-f"], 128);
    let live = btrfs.live();
    refused(&live, 8 << 20, &[btrfs.spec()], &btrfs.mnt, "btrfs");
    // Not even with copy-on-write turned off for the directory.
    run("chattr", &["+C", btrfs.mnt.to_str().unwrap()]);
    refused(&live, 8 << 20, &[btrfs.spec()], &btrfs.mnt, "btrfs");

    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let live = Live::new(tmp.path().join("diskferry-live"), &[]);
    refused(&live, 8 << 20, &[], tmp.path(), "not ext4 or XFS");
}

/// A GRUB directory under `root` as Debian generates it where a switch looks.
fn grub_files(root: &Path) -> PathBuf {
    let grub = root.join("boot/grub");
    std::fs::create_dir_all(&grub).unwrap();
    std::fs::write(
        grub.join("grub.cfg"),
        "if [ \"${next_entry}\" ] ; then\n  set default=\"${next_entry}\"\nfi\nsource $prefix/custom.cfg\n",
    )
    .unwrap();
    let mut env = b"# GRUB Environment Block\n".to_vec();
    env.resize(1024, b'#');
    std::fs::write(grub.join("grubenv"), env).unwrap();
    grub
}

#[test]
fn a_one_time_boot_is_refused_where_grub_could_not_clear_it() {
    // On btrfs GRUB cannot rewrite grubenv: next_entry would stay, and a failing new system
    // would be booted again and again.
    let btrfs = Mounted::new("mkfs.btrfs", &["-q", "-f"], 128);
    let grub = grub_files(&btrfs.mnt);
    let live = Live::with_system(
        btrfs.mnt.join("diskferry-live"),
        btrfs.mnt.clone(),
        PathBuf::from("/sys"),
        &[btrfs.spec()],
    );
    let env = std::fs::read(grub.join("grubenv")).unwrap();
    let e = live.boot_once("menuentry x {}").unwrap_err();
    assert!(
        e.to_string().contains("could not clear a one-time boot"),
        "{e}"
    );
    assert!(e.to_string().contains("btrfs"), "{e}");
    assert!(!grub.join("custom.cfg").exists(), "nothing written");
    assert_eq!(std::fs::read(grub.join("grubenv")).unwrap(), env);

    // On a plain ext4 it is switched, and undone.
    let ext4 = Mounted::ext4(64);
    let grub = grub_files(&ext4.mnt);
    let live = Live::with_system(
        ext4.mnt.join("diskferry-live"),
        ext4.mnt.clone(),
        PathBuf::from("/sys"),
        &[ext4.spec()],
    );
    live.boot_once("menuentry x {}").unwrap();
    assert!(grub.join("custom.cfg").exists());
    live.boot_once("").unwrap();
    assert!(!grub.join("custom.cfg").exists());
}

/// The file's disk runs as XFS's own block map ioctl reports them (`xfs_bmap`, 512-byte
/// units), in file order.
fn xfs_bmap_runs(path: &Path) -> Vec<DiskRun> {
    let out = run("xfs_bmap", &[path.to_str().unwrap()]);
    let mut runs: Vec<DiskRun> = Vec::new();
    // "\t0: [0..40959]: 192..41151"
    for line in out.lines().skip(1) {
        let Some((_, phys)) = line.rsplit_once(": ") else {
            continue;
        };
        let (from, to) = phys.trim().split_once("..").unwrap();
        let (from, to): (u64, u64) = (from.parse().unwrap(), to.parse().unwrap());
        let (offset, len) = (from * 512, (to + 1 - from) * 512);
        match runs.last_mut() {
            Some(r) if r.offset + r.len == offset => r.len += len,
            _ => runs.push(DiskRun { offset, len }),
        }
    }
    runs
}

#[test]
fn xfs_gives_a_live_file_too() {
    let fs = Mounted::new("mkfs.xfs", &["-q", "-f"], 320);
    let live = fs.live();
    let map = live.prepare(40 << 20, &[fs.spec()]).unwrap();
    assert_eq!(map.size(), 40 << 20);
    assert_eq!(xfs_bmap_runs(&fs.mnt.join("diskferry-live")), map.runs);
    assert!(live.remove().unwrap());
    assert_eq!(fs.entries(), Vec::<String>::new());
}
