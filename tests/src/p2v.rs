//! The physical machine of the P2V scenario (issue 18): a Debian debootstrapped with the generic
//! kernel (cached as its own tarball) onto a GRUB-booted MBR disk meant for an AHCI controller —
//! its initramfs holding only the drivers `MODULES=dep` picks there (ahci, sd_mod, ext4), its
//! network configured for one MAC address — so that, moved unchanged onto virtio, it cannot find
//! its root. Also its QEMU boots on a chosen controller and NIC, ending either at the marker its
//! systemd unit prints or at the initramfs shell.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::debian::{
    cached_tarball, extract_tarball, install_grub, install_marker, make_ext4, marker_unit, p,
    place_data, write_grub_cfg, Boot, Marker, Recipe, TRIM,
};
use crate::{run_ok, sh, wait_for};

const MIB: u64 = 1 << 20;
/// The disk: one ext4 root partition from 1 MiB to its end.
pub const DISK_MIB: u64 = 4096;
const ROOT_START_MIB: u64 = 1;
pub const ROOT_UUID: &str = "5eed0f15-0000-4000-8000-0000000a4c10";
/// The MAC address the machine's network configuration is pinned to.
pub const MAC: &str = "52:54:00:d1:5c:01";
pub const HOSTNAME: &str = "p2v-source";

/// The generic kernel (the cloud one has no AHCI driver), sshd (its host keys made at install),
/// iproute2 for the marker, initramfs-tools to rebuild the initramfs.
const DEBOOTSTRAP_ARGS: &[&str] = &[
    "--variant=minbase",
    "--include=systemd-sysv,udev,linux-image-amd64,e2fsprogs,iproute2,openssh-server,initramfs-tools",
];
/// Module directories (under `kernel/`) a virtual machine never needs: half the generic kernel.
const UNNEEDED_MODULES: &[&str] = &[
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/iio",
    "drivers/isdn",
    "drivers/comedi",
    "drivers/bluetooth",
    "sound",
    "net/bluetooth",
    "net/wireless",
    "net/mac80211",
];
/// What `MODULES=dep` would list on the AHCI machine (it cannot look at one from a chroot): the
/// controller, the SCSI disk driver, the root filesystem; mkinitramfs adds their dependencies.
pub const INITRAMFS_MODULES: &[&str] = &["ahci", "sd_mod", "ext4"];

/// Run in the new root after debootstrap: trim, drop the unneeded modules (depmod then matching
/// what is left), and rebuild the initramfs with `MODULES=list` from the modules above.
fn post_install() -> String {
    format!(
        "{TRIM}
         [ $(ls usr/lib/modules | wc -l) = 1 ]
         version=$(ls usr/lib/modules)
         (cd usr/lib/modules/$version/kernel && rm -rf {unneeded})
         chroot . depmod $version
         sed -i -e 's/^MODULES=.*/MODULES=list/' -e 's/^COMPRESS=.*/COMPRESS=gzip/' \
             etc/initramfs-tools/initramfs.conf
         printf '%s\\n' {modules} >> etc/initramfs-tools/modules
         chroot . update-initramfs -u -k $version",
        unneeded = UNNEEDED_MODULES.join(" "),
        modules = INITRAMFS_MODULES.join(" "),
    )
}

/// The marker unit's script: one `DISKFERRY-MARKER key=value` line per fact, then the end line.
const MARKER_SCRIPT: &str = r#"#!/bin/sh
m() { echo "DISKFERRY-MARKER $1=$2"; }
m hostname "$(hostname)"
m machine-id "$(cat /etc/machine-id)"
for k in /etc/ssh/ssh_host_*_key.pub; do m hostkey "$(ssh-keygen -lf "$k")"; done
m addr "$(ip -br addr | tr -s ' ' | tr '\n' ';')"
m root "$(findmnt -n -o SOURCE,FSTYPE / | tr -s ' ')"
m uuid "$(findmnt -n -o UUID /)"
m modules "$(lsmod | awk 'NR > 1 {print $1}' | sort | tr '\n' ',')"
m users "$(getent passwd | awk -F: '$3 >= 1000 && $3 < 65534 {print $1}' | tr '\n' ',')"
m file "$(cat /etc/diskferry-fixture-file 2>/dev/null)"
echo "DISKFERRY-MARKER-END"
"#;
/// network-online.target waits for networkd at most this long (its default is two minutes).
const WAIT_ONLINE: &str = "[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --timeout=30
";

/// The machine's disk and what went into it.
#[derive(Debug)]
pub struct P2vDisk {
    /// The raw MBR disk image.
    pub disk: PathBuf,
    pub root_uuid: &'static str,
    /// The MAC address its network configuration matches.
    pub mac: &'static str,
    /// The installed kernel's version (`/usr/lib/modules/VERSION`).
    pub kernel_version: String,
    /// The modules in its initramfs, by `lsinitramfs`.
    pub initramfs_modules: Vec<String>,
    /// Whether the debootstrap cache had to be built for this run.
    pub built_cache: bool,
}

/// Builds the AHCI machine's disk in `work`: root tree from the cached tarball (its initramfs
/// checked), configured, made into ext4, placed on an sfdisk-made MBR disk that GRUB boots.
pub fn ahci_disk(work: &Path) -> P2vDisk {
    let post = post_install();
    let recipe = Recipe {
        prefix: "p2v-debian",
        debootstrap: DEBOOTSTRAP_ARGS,
        post: &post,
    };
    let (tarball, built_cache) = cached_tarball(&recipe);
    let tree = work.join("tree");
    extract_tarball(&tarball, &tree);
    let kernel_version = kernel_version(&tree);
    let initramfs_modules = initramfs_modules(&tree, &kernel_version);
    configure(&tree);
    let root_fs = work.join("root.ext4");
    make_ext4(
        &tree,
        ROOT_UUID,
        "p2v-root",
        DISK_MIB - ROOT_START_MIB,
        &root_fs,
    );
    std::fs::remove_dir_all(&tree).unwrap();
    let disk = work.join("disk.raw");
    partition(&disk);
    place_data(&disk, ROOT_START_MIB * MIB, &root_fs);
    std::fs::remove_file(&root_fs).unwrap();
    install_grub(&disk, work);
    P2vDisk {
        disk,
        root_uuid: ROOT_UUID,
        mac: MAC,
        kernel_version,
        initramfs_modules,
        built_cache,
    }
}

/// The one kernel version under `/usr/lib/modules`.
fn kernel_version(tree: &Path) -> String {
    let versions: Vec<String> = std::fs::read_dir(tree.join("usr/lib/modules"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(versions.len(), 1, "kernels installed: {versions:?}");
    versions.into_iter().next().unwrap()
}

/// The modules (names, without `.ko`) in the tree's initramfs, by its own `lsinitramfs`; the
/// AHCI driver must be there, and no virtio one: the whole fixture depends on it.
fn initramfs_modules(tree: &Path, version: &str) -> Vec<String> {
    let listing = run_ok(
        "chroot",
        &[
            p(tree),
            "lsinitramfs",
            &format!("/boot/initrd.img-{version}"),
        ],
    );
    let mut modules: Vec<String> = listing
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.split_once(".ko"))
        .map(|(name, _)| name.to_string())
        .collect();
    modules.sort();
    let has = |m: &str| modules.iter().any(|x| x == m);
    assert!(
        has("ahci") && has("sd_mod") && has("ext4"),
        "initramfs: {modules:?}"
    );
    let virtio: Vec<&String> = modules.iter().filter(|m| m.starts_with("virtio")).collect();
    assert!(
        virtio.is_empty(),
        "virtio modules in the initramfs: {virtio:?}"
    );
    modules
}

/// The installed system's own configuration: fstab naming root by UUID, its name, networkd
/// enabled with a configuration for [`MAC`] only, the marker unit, GRUB's menu.
fn configure(tree: &Path) {
    let write = |path: &str, text: &str| {
        let path = tree.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap()
    };
    write(
        "etc/fstab",
        &format!("UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"),
    );
    write("etc/hostname", &format!("{HOSTNAME}\n"));
    write(
        "etc/hosts",
        &format!("127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n"),
    );
    write(
        "etc/systemd/network/10-wired.network",
        &format!("[Match]\nMACAddress={MAC}\n\n[Network]\nDHCP=yes\n"),
    );
    write(
        "etc/systemd/system/systemd-networkd-wait-online.service.d/timeout.conf",
        WAIT_ONLINE,
    );
    run_ok(
        "chroot",
        &[
            p(tree),
            "systemctl",
            "enable",
            "--quiet",
            "systemd-networkd",
        ],
    );
    install_marker(
        tree,
        MARKER_SCRIPT,
        &marker_unit(
            "local-fs.target network-online.target",
            "network-online.target",
        ),
    );
    write_grub_cfg(tree, ROOT_UUID);
}

/// A sparse disk with an MBR holding one active Linux partition from 1 MiB to the end.
fn partition(disk: &Path) {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(DISK_MIB * MIB)
        .unwrap();
    sh(&format!(
        "printf 'label: dos\\nlabel-id: 0x5eeda4c1\\nstart={}, type=83, bootable\\n' | sfdisk --quiet {}",
        ROOT_START_MIB * MIB / 512,
        p(disk)
    ));
}

/// The storage controller the boot disk hangs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// An ICH9 AHCI controller, the disk on its first port.
    Ahci,
    /// A virtio-blk PCI device.
    Virtio,
}

impl Controller {
    /// qemu arguments attaching `drive` (its `file=...,format=...` options) here.
    fn args(self, drive: &str) -> Vec<String> {
        match self {
            Controller::Ahci => vec![
                "-device".into(),
                "ahci,id=ahci".into(),
                "-drive".into(),
                format!("{drive},if=none,id=d0"),
                "-device".into(),
                "ide-hd,drive=d0,bus=ahci.0".into(),
            ],
            Controller::Virtio => vec!["-drive".into(), format!("{drive},if=virtio")],
        }
    }
}

/// A network card on qemu's user network: its qemu model and MAC address.
#[derive(Debug, Clone, Copy)]
pub struct Nic<'a> {
    pub model: &'a str,
    pub mac: &'a str,
}

/// Starts a TCG boot of `disk` (writes to a temporary snapshot) on `controller` with `nic`.
pub fn boot(disk: &Path, format: &str, controller: Controller, nic: Nic, log: &Path) -> Boot {
    let drive = format!("file={},format={format},snapshot=on", p(disk));
    let mut args = controller.args(&drive);
    args.push("-nic".into());
    args.push(format!("user,model={},mac={}", nic.model, nic.mac));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Boot::spawn(&args, log)
}

/// How a boot ended.
#[derive(Debug)]
pub enum Outcome {
    /// The system came up, printed its marker and powered off.
    Marker(Marker),
    /// The initramfs did not find the root and opened its shell; its `ALERT!` line.
    InitramfsShell(String),
}

/// The initramfs-tools shell's prompt, printed once it gave up waiting for the root.
const SHELL_PROMPT: &str = "(initramfs)";

impl Boot {
    /// Waits until the machine powers off after its marker, or its initramfs opens the shell
    /// (qemu is then killed at once); returns which, and the time from power-on. Panics with
    /// the console if neither happens within `limit`.
    pub fn outcome(mut self, limit: Duration) -> (Outcome, Duration) {
        let mut shell = false;
        let ended = wait_for(limit, || {
            shell = self.console().contains(SHELL_PROMPT);
            shell || self.child.try_wait().ok().flatten().is_some()
        });
        let elapsed = self.started.elapsed();
        let console = self.console();
        let what = self.log.display().to_string();
        assert!(
            ended,
            "{what}: no marker, no initramfs shell within {limit:?}:\n{console}"
        );
        if shell {
            let alert = console.lines().find(|l| l.contains("ALERT!")).unwrap_or("");
            return (Outcome::InitramfsShell(alert.trim().to_string()), elapsed);
        }
        let marker = Marker::parse(&console);
        let marker = marker.unwrap_or_else(|| panic!("{what}: off without a marker:\n{console}"));
        (Outcome::Marker(marker), elapsed)
    }
}
