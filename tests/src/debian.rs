//! A Debian machine as its installer leaves it, for the "real machine" scenario: a minimal root
//! made by `debootstrap` (from the mirror and release this machine's own apt uses, cached as a
//! tarball between runs), installed on an MBR disk that GRUB boots — ext4 root first, swap last
//! in a logical partition — whose root filesystem holds an unreplayed, committed journal
//! transaction: the files written just before a power cut. Also the QEMU (TCG) boot of such a
//! disk, and the marker its systemd unit prints on the serial console before powering off.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{pattern, run_ok, sh, wait_for};

const MIB: u64 = 1 << 20;
/// The disk and its partitions, in MiB: root from 1 MiB, then an extended partition to the end
/// of the disk holding swap (logical, number 5) 1 MiB into it — the Debian installer's layout.
pub const DISK_MIB: u64 = 3072;
pub const ROOT_START_MIB: u64 = 1;
pub const ROOT_MIB: u64 = 2815;
pub const EXTENDED_START_MIB: u64 = 2816;
pub const SWAP_START_MIB: u64 = 2817;
pub const SWAP_MIB: u64 = 255;
pub const ROOT_UUID: &str = "5eed0f15-0000-4000-8000-00000000d15c";
pub const SWAP_UUID: &str = "5eed0f15-0000-4000-8000-00000005a4a9";
pub const SWAP_LABEL: &str = "debian-swap";
/// Block size of the root filesystem (the journal transaction is made of its blocks).
const BLOCK: usize = 4096;
/// Journal blocks a transaction may take here (the 64 MiB journal holds 16384).
const MAX_JOURNALED_BLOCKS: usize = 4096;

/// What debootstrap installs: the smallest bootable systemd Debian (the cloud kernel is a quarter
/// of the generic one and has the virtio drivers) and e2fsprogs, as an installed system has.
const DEBOOTSTRAP_ARGS: &[&str] = &[
    "--variant=minbase",
    "--include=systemd-sysv,udev,linux-image-cloud-amd64,e2fsprogs",
];
/// Run in the new root after debootstrap: what a disk image needs no copy of.
pub(crate) const TRIM: &str = "rm -rf usr/share/doc/* usr/share/man/* var/cache/apt/*.bin \
     var/cache/apt/archives/*.deb var/lib/apt/lists/*
     find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +";

/// The marker unit's script: one `DISKFERRY-MARKER key=value` line per fact, then the end line.
const MARKER_SCRIPT: &str = r#"#!/bin/sh
echo "DISKFERRY-MARKER powercut=$(cat /var/log/powercut-marker 2>/dev/null || echo MISSING)"
echo "DISKFERRY-MARKER motd=$(head -n1 /etc/motd)"
for f in /root/powercut/*; do echo "DISKFERRY-MARKER file=$(cksum "$f")"; done
echo "DISKFERRY-MARKER swaps=$(swapon --noheadings --raw --bytes --show=NAME,TYPE,SIZE,UUID,LABEL | tr '\n' ';')"
echo "DISKFERRY-MARKER root=$(findmnt -n -o SOURCE,FSTYPE,SIZE --bytes / | tr -s ' ')"
echo "DISKFERRY-MARKER-END"
"#;
/// The marker unit: runs the marker script once `after` is reached (and `wants` pulled in,
/// when not empty), prints on the serial console, then powers the machine off.
pub(crate) fn marker_unit(after: &str, wants: &str) -> String {
    let wants = if wants.is_empty() {
        String::new()
    } else {
        format!("Wants={wants}\n")
    };
    format!(
        "[Unit]
Description=diskferry test marker on the serial console
After={after}
{wants}SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/diskferry-marker
StandardOutput=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
"
    )
}
/// Units that only cost boot time here: the console login and the periodic jobs.
const UNNEEDED_UNITS: &[&str] = &[
    "getty.target.wants/getty@tty1.service",
    "multi-user.target.wants/e2scrub_reap.service",
    "timers.target.wants/apt-daily.timer",
    "timers.target.wants/apt-daily-upgrade.timer",
    "timers.target.wants/dpkg-db-backup.timer",
    "timers.target.wants/e2scrub_all.timer",
    "timers.target.wants/fstrim.timer",
];

/// A file written "just before the power cut": it exists only in the journal.
#[derive(Debug)]
pub struct PowercutFile {
    /// Its path on the installed system.
    pub guest: &'static str,
    /// A copy of its contents on this machine.
    pub host: PathBuf,
}

/// The installed disk and what went into it.
#[derive(Debug)]
pub struct InstalledDisk {
    /// The raw MBR disk image.
    pub disk: PathBuf,
    /// Its root filesystem as placed on the disk (journal not replayed).
    pub root_fs: PathBuf,
    /// `/var/log/powercut-marker`, the overwritten `/etc/motd` and `/root/powercut/*`.
    pub powercut: Vec<PowercutFile>,
    /// Whether the debootstrap cache had to be built for this run.
    pub built_cache: bool,
}

pub(crate) fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Where the debootstrap tarball is kept between runs: `$DISKFERRY_TEST_CACHE`, or
/// `/var/cache/diskferry-tests`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DISKFERRY_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/diskferry-tests"))
}

/// FNV-1a, to name the tarball after the recipe that made it.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How a cached root is made: the tarball's name prefix (one per fixture: each removes only
/// its own older tarballs), debootstrap's arguments, and a shell script then run in the new root
/// (its working directory).
pub(crate) struct Recipe<'a> {
    pub prefix: &'a str,
    pub debootstrap: &'a [&'a str],
    pub post: &'a str,
}

/// This fixture's recipe: the debootstrapped root, trimmed.
const RECIPE: Recipe = Recipe {
    prefix: "debian",
    debootstrap: DEBOOTSTRAP_ARGS,
    post: TRIM,
};

/// The tarball of the debootstrapped root, built under a lock file when missing (another test
/// process waits for it instead of building its own); returns it and whether it was built.
pub fn root_tarball() -> (PathBuf, bool) {
    cached_tarball(&RECIPE)
}

/// The tarball `recipe` makes from this machine's release, built under a lock file when
/// missing; returns it and whether it was built.
pub(crate) fn cached_tarball(recipe: &Recipe) -> (PathBuf, bool) {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let codename = os_release_codename(&std::fs::read_to_string("/etc/os-release").unwrap());
    let hash = fnv1a(&format!(
        "{codename} {:?} {}",
        recipe.debootstrap, recipe.post
    ));
    let prefix = recipe.prefix;
    let tarball = dir.join(format!("{prefix}-{codename}-{hash:016x}.tar"));
    let lock = std::fs::File::create(dir.join(format!("{prefix}.lock"))).unwrap();
    lock.lock().unwrap();
    if tarball.exists() {
        return (tarball, false);
    }
    let mirror = apt_mirror(&codename, &apt_sources());
    build_tarball(recipe, &codename, &mirror, &tarball);
    (tarball, true)
}

/// debootstrap into a scratch directory beside the cache, run the recipe's script, tar, rename
/// into place (so a tarball that exists is complete).
fn build_tarball(recipe: &Recipe, codename: &str, mirror: &str, tarball: &Path) {
    let dir = tarball.parent().unwrap();
    let scratch = tempfile::tempdir_in(dir).unwrap();
    let root = scratch.path().join("root");
    let out = Command::new("debootstrap")
        .args(recipe.debootstrap)
        .args([codename, p(&root), mirror])
        .output()
        .expect("debootstrap (Debian package debootstrap)");
    assert!(
        out.status.success(),
        "debootstrap {codename} from {mirror}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let partial = scratch.path().join("root.tar");
    sh(&format!(
        "cd {root}\n{post}\ntar --numeric-owner --xattrs -C {root} -cf {partial} .",
        root = p(&root),
        post = recipe.post,
        partial = p(&partial)
    ));
    std::fs::rename(&partial, tarball).unwrap();
    remove_older_tarballs(dir, recipe.prefix, tarball);
}

/// Tarballs of earlier recipes are never used again: a changed package list leaves one 250 MiB
/// file behind each time. Only those of `prefix` go: another fixture's tarball stays.
fn remove_older_tarballs(dir: &Path, prefix: &str, keep: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_tarball_of(prefix, &name) && entry.path() != keep {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
}

/// Whether `name` is a tarball `cached_tarball` names for `prefix`: `PREFIX-CODENAME-HASH.tar`
/// (so prefix `debian` is not taken for `debian-p2v`).
fn is_tarball_of(prefix: &str, name: &str) -> bool {
    let rest = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-'));
    let Some((codename, hash)) = rest.and_then(|r| r.strip_suffix(".tar")?.split_once('-')) else {
        return false;
    };
    !codename.is_empty() && hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `VERSION_CODENAME` of an os-release file.
pub fn os_release_codename(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .expect("/etc/os-release names no VERSION_CODENAME (this test wants a Debian machine)")
}

/// The text of every apt source file: `/etc/apt/sources.list` and `sources.list.d/*.list` and
/// `*.sources`.
fn apt_sources() -> Vec<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "list" || x == "sources")),
        );
    }
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect()
}

/// The archive URI apt uses for the suite `codename`, from one-line (`deb [opts] URI SUITE ...`)
/// or deb822 (`URIs:` / `Suites:` stanzas) sources: no mirror is named in this repository.
pub fn apt_mirror(codename: &str, sources: &[String]) -> String {
    sources
        .iter()
        .find_map(|text| one_line_mirror(codename, text).or_else(|| deb822_mirror(codename, text)))
        .unwrap_or_else(|| panic!("no apt source for {codename} on this machine"))
}

fn one_line_mirror(codename: &str, text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first()?.starts_with('[') {
            let end = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=end);
        }
        (rest.get(1)? == &codename).then(|| rest[0].to_string())
    })
}

fn deb822_mirror(codename: &str, text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let types = field("Types:")?;
        let suites = field("Suites:")?;
        let uri = field("URIs:")?.split_whitespace().next()?;
        (types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == codename))
        .then(|| uri.to_string())
    })
}

/// Removes virtio_blk and virtio_scsi from the root's initramfs(es) with Debian's own tools,
/// as a system installed on a SATA disk with `MODULES=dep` has none.
pub fn strip_virtio_disk_drivers(disk: &Path, work: &Path) {
    sh(&format!(
        r#"
        mnt={work}/mnt; x={work}/unpacked
        mkdir -p $mnt
        mount -o loop,offset={offset} {disk} $mnt
        trap 'umount $mnt' EXIT
        for initrd in $mnt/boot/initrd.img-*; do
          v=${{initrd#$mnt/boot/initrd.img-}}
          rm -rf $x; unmkinitramfs $initrd $x
          find $x -name virtio_blk.ko -delete -o -name virtio_scsi.ko -delete
          depmod -b $x $v
          (cd $x && find . | cpio -o -H newc --quiet | gzip -c) > $initrd
          ! lsinitramfs $initrd | grep -q virtio_blk
        done
        "#,
        work = p(work),
        disk = p(disk),
        offset = ROOT_START_MIB << 20,
    ));
}

/// Builds the installed disk in `work`: root tree from the cached tarball, configured (fstab by
/// UUID, the marker unit, GRUB's menu), made into ext4 with `mke2fs -d`, given its power-cut
/// transaction, placed with a swap area on an sfdisk-made MBR disk, GRUB written on the MBR.
pub fn installer_disk(work: &Path) -> InstalledDisk {
    let (tarball, built_cache) = root_tarball();
    let tree = work.join("tree");
    extract_tarball(&tarball, &tree);
    configure(&tree);
    let root_fs = work.join("root.ext4");
    make_ext4(&tree, ROOT_UUID, "debian-root", ROOT_MIB, &root_fs);
    std::fs::remove_dir_all(&tree).unwrap();
    let powercut = power_cut(work, &root_fs);
    let swap = work.join("swap.img");
    std::fs::File::create(&swap)
        .unwrap()
        .set_len(SWAP_MIB * MIB)
        .unwrap();
    run_ok("mkswap", &["-U", SWAP_UUID, "-L", SWAP_LABEL, p(&swap)]);
    let disk = work.join("disk.img");
    partition(&disk);
    place_data(&disk, ROOT_START_MIB * MIB, &root_fs);
    place_data(&disk, SWAP_START_MIB * MIB, &swap);
    std::fs::remove_file(&swap).unwrap();
    install_grub(&disk, work);
    InstalledDisk {
        disk,
        root_fs,
        powercut,
        built_cache,
    }
}

/// Unpacks a root tarball into `tree` (made), owners and extended attributes kept.
pub(crate) fn extract_tarball(tarball: &Path, tree: &Path) {
    std::fs::create_dir_all(tree).unwrap();
    let args = [
        "--numeric-owner",
        "--xattrs",
        "-C",
        p(tree),
        "-xf",
        p(tarball),
    ];
    run_ok("tar", &args);
}

/// Makes `out`, an ext4 filesystem of `mib` MiB (4 KiB blocks) holding `tree`, with `mke2fs -d`.
pub(crate) fn make_ext4(tree: &Path, uuid: &str, label: &str, mib: u64, out: &Path) {
    let size = format!("{mib}M");
    let args = [
        "-q",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-d",
        p(tree),
        "-U",
        uuid,
        "-L",
        label,
    ];
    run_ok("mke2fs", &[&args[..], &[p(out), &size]].concat());
}

/// The installed system's own configuration: fstab naming root and swap by UUID, the marker
/// unit enabled, units that only cost boot time disabled, GRUB's menu.
fn configure(tree: &Path) {
    let write = |path: &str, text: &str| std::fs::write(tree.join(path), text).unwrap();
    write(
        "etc/fstab",
        &format!(
            "UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\nUUID={SWAP_UUID} none swap sw 0 0\n"
        ),
    );
    write("etc/hostname", "debian-installed\n");
    write(
        "etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 debian-installed\n",
    );
    install_marker(
        tree,
        MARKER_SCRIPT,
        &marker_unit("local-fs.target swap.target", ""),
    );
    write_grub_cfg(tree, ROOT_UUID);
}

/// Installs the marker script and its unit (enabled) in `tree`, and disables the units that
/// only cost boot time.
pub(crate) fn install_marker(tree: &Path, script: &str, unit: &str) {
    let write = |path: &str, text: &str| std::fs::write(tree.join(path), text).unwrap();
    write("usr/local/sbin/diskferry-marker", script);
    write("etc/systemd/system/diskferry-marker.service", unit);
    let units = tree.join("etc/systemd/system");
    sh(&format!(
        "chmod 755 {script}
         ln -sf /etc/systemd/system/diskferry-marker.service {units}/multi-user.target.wants/
         cd {units} && rm -f {unneeded}",
        script = p(&tree.join("usr/local/sbin/diskferry-marker")),
        units = p(&units),
        unneeded = UNNEEDED_UNITS.join(" "),
    ));
}

/// GRUB's menu in `tree`: the serial console, no delay, the kernel booted with its root by UUID.
pub(crate) fn write_grub_cfg(tree: &Path, root_uuid: &str) {
    std::fs::create_dir_all(tree.join("boot/grub")).unwrap();
    std::fs::write(
        tree.join("boot/grub/grub.cfg"),
        format!(
            "serial --unit=0 --speed=115200
terminal_output serial
set timeout=0
set default=0
menuentry 'Debian GNU/Linux' {{
  search --no-floppy --fs-uuid --set=root {root_uuid}
  echo 'grub: loading linux'
  linux /vmlinuz root=UUID={root_uuid} ro console=ttyS0 quiet systemd.show_status=0 systemd.getty_auto=0
  initrd /initrd.img
}}
"
        ),
    )
    .unwrap();
}

/// Writes the power-cut files into a copy of `root_fs` with `debugfs -w`, then puts every block
/// that changed into `root_fs`'s journal as one committed transaction (debugfs `jo`/`jw`/`jc`),
/// leaving `root_fs` itself as it was before: stale, with `needs_recovery` set.
fn power_cut(work: &Path, root_fs: &Path) -> Vec<PowercutFile> {
    let dir = work.join("powercut");
    std::fs::create_dir_all(&dir).unwrap();
    let mut big = vec![0u8; 300_000];
    pattern(&mut big, 0x9c07);
    let contents: [(&'static str, &str, Vec<u8>); 4] = [
        (
            "/var/log/powercut-marker",
            "marker",
            b"written just before the power cut 7c1f\n".to_vec(),
        ),
        ("/etc/motd", "motd", b"diskferry power-cut motd\n".to_vec()),
        ("/root/powercut/big.bin", "big.bin", big),
        (
            "/root/powercut/small.txt",
            "small.txt",
            b"a small file\n".to_vec(),
        ),
    ];
    let mut files = Vec::new();
    let mut cmds = String::from("rm /etc/motd\nmkdir /root/powercut\n");
    for (guest, name, data) in contents {
        let host = dir.join(name);
        std::fs::write(&host, data).unwrap();
        cmds += &format!("write {} {guest}\n", p(&host));
        files.push(PowercutFile { guest, host });
    }
    let after = work.join("after.ext4");
    run_ok("cp", &["--sparse=always", p(root_fs), p(&after)]);
    debugfs_script(&after, &cmds, &work.join("powercut.debugfs"));
    journal_difference(root_fs, &after, work);
    std::fs::remove_file(&after).unwrap();
    files
}

/// Runs debugfs -w with a command file; debugfs exits 0 even when a command fails, so its
/// output is searched for the failures it prints.
fn debugfs_script(fs: &Path, cmds: &str, file: &Path) {
    std::fs::write(file, cmds).unwrap();
    let out = run_ok("debugfs", &["-w", "-f", p(file), p(fs)]);
    let failed = ["not found", "Could not", "rror", "Usage", "Ext2 "];
    assert!(
        !out.lines().any(|l| failed.iter().any(|f| l.contains(f))),
        "debugfs on {}:\n{out}",
        fs.display()
    );
}

/// The byte ranges of a sparse file that hold data, by `qemu-img map` (which asks the host
/// filesystem), widened to whole blocks, sorted and merged: reading the holes of a mostly
/// empty 3 GiB disk costs seconds each time.
fn data_extents(files: &[&Path]) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for f in files {
        let map = run_ok("qemu-img", &["map", "-f", "raw", "--output=json", p(f)]);
        let json: serde_json::Value = serde_json::from_str(&map).expect("qemu-img map JSON");
        for e in json.as_array().unwrap() {
            if e["data"] == true {
                let start = e["start"].as_u64().unwrap();
                let end = start + e["length"].as_u64().unwrap();
                let b = BLOCK as u64;
                ranges.push((start / b * b, end.div_ceil(b) * b));
            }
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Calls `each(offset, bytes)` for the data of `file` within `ranges`, a MiB at a time.
fn for_each_chunk(file: &std::fs::File, ranges: &[(u64, u64)], mut each: impl FnMut(u64, &[u8])) {
    let len = file.metadata().unwrap().len();
    let mut buf = vec![0u8; MIB as usize];
    for &(start, end) in ranges {
        let mut at = start;
        while at < end.min(len) {
            let n = (end.min(len) - at).min(MIB) as usize;
            file.read_exact_at(&mut buf[..n], at).unwrap();
            each(at, &buf[..n]);
            at += n as u64;
        }
    }
}

/// Writes the blocks where `after` differs from `before` into `before`'s journal as one
/// committed transaction (checksummed, v3), without applying them.
fn journal_difference(before: &Path, after: &Path, work: &Path) {
    let a = std::fs::File::open(before).unwrap();
    let b = std::fs::File::open(after).unwrap();
    assert_eq!(a.metadata().unwrap().len(), b.metadata().unwrap().len());
    let blocks_file = work.join("journal-blocks.bin");
    let out = std::fs::File::create(&blocks_file).unwrap();
    let mut old = vec![0u8; MIB as usize];
    let mut changed = Vec::new();
    for_each_chunk(&b, &data_extents(&[before, after]), |at, new| {
        a.read_exact_at(&mut old[..new.len()], at).unwrap();
        for (i, (x, y)) in old.chunks(BLOCK).zip(new.chunks(BLOCK)).enumerate() {
            if x != y {
                out.write_all_at(y, (changed.len() * BLOCK) as u64).unwrap();
                changed.push((at / BLOCK as u64 + i as u64).to_string());
            }
        }
    });
    assert!(
        !changed.is_empty() && changed.len() <= MAX_JOURNALED_BLOCKS,
        "{} changed blocks",
        changed.len()
    );
    let cmds = format!(
        "jo -c\njw -b {} {}\njc\n",
        changed.join(","),
        p(&blocks_file)
    );
    debugfs_script(before, &cmds, &work.join("journal.debugfs"));
    std::fs::remove_file(&blocks_file).unwrap();
}

/// Copies the data of the sparse `image` into `disk` at byte `offset`.
pub(crate) fn place_data(disk: &Path, offset: u64, image: &Path) {
    let src = std::fs::File::open(image).unwrap();
    let dst = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    for_each_chunk(&src, &data_extents(&[image]), |at, data| {
        dst.write_all_at(data, offset + at).unwrap();
    });
}

/// A sparse disk with the installer's MBR: root (active) first, an extended partition to the
/// end holding the swap as logical partition 5.
pub(crate) fn partition(disk: &Path) {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(DISK_MIB * MIB)
        .unwrap();
    let s = |mib: u64| mib * MIB / 512;
    sh(&format!(
        "printf 'label: dos\\nlabel-id: 0x5eed0f15\\nstart={}, size={}, type=83, bootable\\nstart={}, type=5\\nstart={}, size={}, type=82\\n' | sfdisk --quiet {}",
        s(ROOT_START_MIB),
        s(ROOT_MIB),
        s(EXTENDED_START_MIB),
        s(SWAP_START_MIB),
        s(SWAP_MIB),
        p(disk)
    ));
}

/// GRUB's modules of `platform` (from `from`) in `/boot/grub/PLATFORM`, as `grub-install`
/// copies them there (the core image loads what it lacks from them).
pub(crate) fn grub_modules(tree: &Path, from: &str, platform: &str) {
    let to = tree.join("boot/grub").join(platform);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "mod" || x == "lst") {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// GRUB for BIOS on the MBR, as grub-install puts it: `boot.img`'s code in sector 0 (the
/// partition table kept) and a `core.img` from grub-mkimage in the gap after it, which finds
/// `/boot/grub` on the first partition.
pub(crate) fn install_grub(disk: &Path, work: &Path) {
    install_grub_with(disk, work, &[]);
}

/// [`install_grub`], with `extra` modules in the core image (a menu that reads and saves
/// GRUB's environment needs `loadenv` and `test`).
pub(crate) fn install_grub_with(disk: &Path, work: &Path, extra: &[&str]) {
    install_grub_config(disk, work, extra, None);
}

/// [`install_grub_with`], the core image finding `/boot/grub` on the filesystem with UUID
/// `by_uuid` (an embedded `search.fs_uuid`, as grub-install writes when it cannot name the
/// partition) rather than on partition 1.
pub(crate) fn install_grub_config(disk: &Path, work: &Path, extra: &[&str], by_uuid: Option<&str>) {
    let grub = Path::new("/usr/lib/grub/i386-pc");
    let core = work.join("core.img");
    let config = work.join("load.cfg");
    let mut embedded: Vec<&str> = Vec::new();
    if let Some(uuid) = by_uuid {
        std::fs::write(
            &config,
            format!("search.fs_uuid {uuid} root hd0,msdos1\nset prefix=($root)'/boot/grub'\n"),
        )
        .unwrap();
        embedded = vec!["-c", p(&config)];
    }
    let args = [
        "-O",
        "i386-pc",
        "-d",
        p(grub),
        "-o",
        p(&core),
        "-p",
        "(hd0,msdos1)/boot/grub",
        "biosdisk",
        "part_msdos",
        "ext2",
        "normal",
        "linux",
        "search",
        "search_fs_uuid",
        "serial",
        "terminal",
        "echo",
        "configfile",
    ];
    run_ok("grub-mkimage", &[&args[..], extra, &embedded].concat());
    let core = std::fs::read(&core).unwrap();
    assert!(
        512 + core.len() as u64 <= ROOT_START_MIB * MIB,
        "core.img ({} bytes) does not fit before the first partition",
        core.len()
    );
    let boot = std::fs::read(grub.join("boot.img")).expect("boot.img (Debian grub-pc-bin)");
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(&boot[..440], 0).unwrap();
    f.write_all_at(&core, 512).unwrap();
}

/// Runs `debugfs -R request` on a filesystem image; returns what it printed on stdout (its
/// banner goes to stderr).
pub fn debugfs(fs: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request, p(fs)])
        .output()
        .expect("debugfs (Debian package e2fsprogs)");
    assert!(out.status.success(), "debugfs {request}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `lsinitramfs` lists of the initramfs in `/boot` of the ext4 image `root_fs` (the
/// one in use: not a `*.diskferry-orig` kept beside it), dumped into `work`.
pub fn initramfs_listing(root_fs: &Path, work: &Path) -> String {
    let boot = debugfs(root_fs, "ls -p /boot");
    let name = boot
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .find(|n| n.starts_with("initrd.img-") && !n.ends_with(".diskferry-orig"))
        .unwrap_or_else(|| panic!("no initrd in /boot: {boot}"))
        .to_string();
    let copy = work.join(format!(
        "{}.{name}",
        root_fs.file_name().unwrap().to_string_lossy()
    ));
    debugfs(root_fs, &format!("dump /boot/{name} {}", p(&copy)));
    run_ok("lsinitramfs", &[p(&copy)])
}

/// What the marker unit printed: its `key=value` lines, each value once, in order.
#[derive(Debug)]
pub struct Marker {
    pub lines: Vec<(String, String)>,
}

impl Marker {
    pub(crate) fn parse(console: &str) -> Option<Marker> {
        if !console.contains("DISKFERRY-MARKER-END") {
            return None;
        }
        let mut seen = BTreeSet::new();
        let lines = console
            .lines()
            .filter_map(|l| {
                l.trim_end_matches('\r')
                    .split_once("DISKFERRY-MARKER ")?
                    .1
                    .split_once('=')
            })
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .filter(|kv| seen.insert(kv.clone()))
            .collect();
        Some(Marker { lines })
    }

    /// Every value printed under `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value printed under `key`.
    pub fn one(&self, key: &str) -> &str {
        let all = self.all(key);
        assert_eq!(all.len(), 1, "marker {key}: {all:?}");
        all[0]
    }
}

/// A QEMU (TCG) boot of a disk image, writes going to a temporary snapshot, the serial console
/// logged to a file; killed when dropped.
#[derive(Debug)]
pub struct Boot {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
    pub(crate) started: Instant,
}

impl Boot {
    pub fn start(disk: &Path, format: &str, log: &Path) -> Boot {
        let drive = format!("file={},format={format},if=virtio,snapshot=on", p(disk));
        Boot::start_drive(&drive, log)
    }

    /// Boots the disk qemu's `-drive` option `drive` names (an NBD URL, say).
    pub fn start_drive(drive: &str, log: &Path) -> Boot {
        Boot::spawn(&["-nic", "none", "-drive", drive], log)
    }

    /// Boots a machine whose disks and NICs are the qemu arguments `devices`.
    pub(crate) fn spawn(devices: &[&str], log: &Path) -> Boot {
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot"])
            .args(["-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", p(log)))
            .args(devices)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (Debian qemu-system-x86)");
        Boot {
            child,
            log: log.to_path_buf(),
            started: Instant::now(),
        }
    }

    pub(crate) fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits for the machine to power itself off after its marker; returns the marker and the
    /// time from power-on. Panics with the console if it does not within `limit`.
    pub fn finish(mut self, limit: Duration) -> (Marker, Duration) {
        let exited = wait_for(limit, || self.child.try_wait().ok().flatten().is_some());
        let console = self.console();
        let marker = Marker::parse(&console);
        assert!(
            exited && marker.is_some(),
            "{} did not boot to its marker and power off within {limit:?}:\n{console}",
            self.log.display()
        );
        (marker.unwrap(), self.started.elapsed())
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_comes_from_one_line_and_deb822_sources() {
        let one = "# comment\ndeb-src http://a/debian bookworm main\n\
                   deb [arch=amd64 signed-by=/k.gpg] http://b/debian bookworm main\n"
            .to_string();
        assert_eq!(apt_mirror("bookworm", &[one]), "http://b/debian");
        let deb822 = "Types: deb\nURIs: http://s/debian-security\nSuites: bookworm-security\n\n\
                      Types: deb deb-src\nURIs: http://m/debian\nSuites: bookworm bookworm-updates\n"
            .to_string();
        assert_eq!(apt_mirror("bookworm", &[deb822]), "http://m/debian");
    }

    #[test]
    fn each_fixture_removes_only_its_own_tarballs() {
        let hash = "c72384fd33940924";
        assert!(is_tarball_of(
            "debian",
            &format!("debian-bookworm-{hash}.tar")
        ));
        assert!(!is_tarball_of(
            "debian",
            &format!("p2v-debian-bookworm-{hash}.tar")
        ));
        assert!(!is_tarball_of(
            "debian",
            &format!("debian-p2v-bookworm-{hash}.tar")
        ));
        assert!(is_tarball_of(
            "p2v-debian",
            &format!("p2v-debian-bookworm-{hash}.tar")
        ));
        assert!(!is_tarball_of(
            "p2v-debian",
            &format!("debian-bookworm-{hash}.tar")
        ));
        assert!(!is_tarball_of("debian", "debian.lock"));
    }

    #[test]
    fn codename_is_read_from_os_release() {
        let text = "NAME=\"Debian GNU/Linux\"\nVERSION_CODENAME=trixie\n";
        assert_eq!(os_release_codename(text), "trixie");
    }
}
