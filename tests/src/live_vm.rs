//! Debian machines for live deploys under qemu (TCG): an "old" installed system whose own
//! diskferry agent runs in live mode (listening on port 7000, forwarded to the host), with
//! GRUB's menu as Debian generates it where it matters (the environment block loaded, a
//! one-time `next_entry` honoured and cleared, custom.cfg read at the end); and the images
//! deployed onto it: a different Debian, and a broken one whose initrd is garbage, so its
//! kernel panics. Each system prints `DISKFERRY-LIVE name=… root=UUID fw=bios|uefi n=…` on
//! the serial console every two seconds for as long as it runs. The old machine boots with
//! BIOS from an MBR disk, or with UEFI (OVMF) from a GPT disk ([`CoreImage`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::debian::{
    extract_tarball, grub_modules, install_grub_config, install_marker, make_ext4, p, partition,
    place_data, root_tarball, ROOT_MIB, ROOT_START_MIB, SWAP_START_MIB, SWAP_UUID,
};
use crate::uefi::GRUB_EFI;
use crate::{bin, run_ok, sh, wait_for};

const MIB: u64 = 1 << 20;
pub const OLD_UUID: &str = "01d0f15e-0000-4000-8000-0000000000a1";
pub const NEW_UUID: &str = "9e70f15e-0000-4000-8000-0000000000b2";
pub const BROKEN_UUID: &str = "b40e0f15-0000-4000-8000-0000000000c3";
/// The agent's port inside the machine.
pub const AGENT_PORT: u16 = 7000;
/// Size of a deployable image's root.
const IMAGE_ROOT_MIB: u64 = 1024;

/// The marker: one line every two seconds, forever.
fn marker_script(name: &str) -> String {
    format!(
        "#!/bin/sh\nn=0\nfw=bios\n[ -d /sys/firmware/efi ] && fw=uefi\nwhile true; do\n  echo \"DISKFERRY-LIVE name={name} root=$(findmnt -n -o UUID /) fw=$fw n=$n\"\n  n=$((n + 1))\n  sleep 2\ndone\n"
    )
}

const MARKER_UNIT: &str = "[Unit]
Description=diskferry live test marker on the serial console
After=local-fs.target

[Service]
ExecStart=/usr/local/sbin/diskferry-marker
StandardOutput=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

/// DHCP on the virtio NIC (systemd-networkd, part of Debian's systemd).
fn network(tree: &Path) {
    std::fs::create_dir_all(tree.join("etc/systemd/network")).unwrap();
    std::fs::write(
        tree.join("etc/systemd/network/20-wired.network"),
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    )
    .unwrap();
    let wants = tree.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    let unit = "/lib/systemd/system/systemd-networkd.service";
    let _ = std::fs::remove_file(wants.join("systemd-networkd.service"));
    std::os::unix::fs::symlink(unit, wants.join("systemd-networkd.service")).unwrap();
}

/// A system's own files: fstab, hostname, the marker, the network, a data tree.
fn configure(tree: &Path, uuid: &str, name: &str) {
    let write = |path: &str, text: &str| std::fs::write(tree.join(path), text).unwrap();
    write(
        "etc/fstab",
        &format!("UUID={uuid} / ext4 errors=remount-ro 0 1\nUUID={SWAP_UUID} none swap sw 0 0\n"),
    );
    write("etc/hostname", &format!("debian-{name}\n"));
    install_marker(tree, &marker_script(name), MARKER_UNIT);
    network(tree);
    sh(&format!(
        "mkdir -p {d} && for i in $(seq 1 30); do head -c $((i * 4099)) /dev/urandom > {d}/f$i; done",
        d = p(&tree.join("srv/data"))
    ));
}

/// GRUB's menu, as Debian's grub-mkconfig writes the parts a live switch relies on.
fn grub_cfg(tree: &Path, uuid: &str) {
    std::fs::create_dir_all(tree.join("boot/grub")).unwrap();
    std::fs::write(
        tree.join("boot/grub/grub.cfg"),
        format!(
            r#"serial --unit=0 --speed=115200
terminal_output serial
set timeout=0
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${{next_entry}}" ] ; then
   set default="${{next_entry}}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
menuentry 'Debian GNU/Linux' {{
  search --no-floppy --fs-uuid --set=root {uuid}
  echo 'grub: loading linux'
  linux /vmlinuz root=UUID={uuid} ro console=ttyS0 quiet systemd.show_status=0 systemd.getty_auto=0
  initrd /initrd.img
}}
if [ -f  ${{config_directory}}/custom.cfg ]; then
  source ${{config_directory}}/custom.cfg
elif [ -z "${{config_directory}}" -a -f  $prefix/custom.cfg ]; then
  source $prefix/custom.cfg
fi
"#
        ),
    )
    .unwrap();
    let mut env = b"# GRUB Environment Block\n".to_vec();
    env.resize(1024, b'#');
    std::fs::write(tree.join("boot/grub/grubenv"), env).unwrap();
}

/// The disks of a live deploy test.
pub struct LiveDisks {
    /// The old machine's MBR disk: GRUB, root (partition 1), swap (partition 5), its agent.
    pub old: PathBuf,
    /// Deployable images: a different Debian, and one that panics.
    pub new_image: PathBuf,
    pub broken_image: PathBuf,
    /// qemu's firmware arguments (none: SeaBIOS).
    pub firmware: Vec<String>,
}

/// How the old machine boots: which firmware, and how its GRUB core image finds its files.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CoreImage {
    /// BIOS, an MBR disk; on partition 1, by number (`(hd0,msdos1)/boot/grub`: grub-install's
    /// usual prefix).
    ByPartition,
    /// BIOS, an MBR disk; on the old root filesystem, by its UUID (an embedded
    /// `search.fs_uuid`).
    ByUuid,
    /// UEFI (OVMF), a GPT disk: an ESP whose `\EFI\BOOT\BOOTX64.EFI` is GRUB finding the
    /// root by UUID, as Debian's x86_64-efi core image does; the root, then swap.
    Uefi,
}

/// Sizes of the UEFI machine's GPT partitions, in MiB: ESP, root, swap.
const UEFI_PARTS: [u64; 3] = [100, 2600, 255];

/// Builds the old machine's disk (its agent trusting `server_key`, hex) and the images.
pub fn build(work: &Path, server_key: &str, core: CoreImage) -> LiveDisks {
    let (tarball, _) = root_tarball();
    let tree = work.join("old-tree");
    extract_tarball(&tarball, &tree);
    configure(&tree, OLD_UUID, "old");
    grub_cfg(&tree, OLD_UUID);
    agent(&tree, server_key);
    if core == CoreImage::Uefi {
        grub_modules(&tree, GRUB_EFI, "x86_64-efi");
        let old = uefi_disk(work, &tree);
        std::fs::remove_dir_all(&tree).unwrap();
        let vars = work.join("vars.fd");
        std::fs::copy(crate::uefi::OVMF_VARS, &vars).expect("OVMF (Debian package ovmf)");
        return LiveDisks {
            old,
            new_image: image(work, &tarball, NEW_UUID, "new", false),
            broken_image: image(work, &tarball, BROKEN_UUID, "broken", true),
            firmware: vec![
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,readonly=on,file={}",
                    crate::uefi::OVMF_CODE
                ),
                "-drive".into(),
                format!("if=pflash,format=raw,file={}", p(&vars)),
            ],
        };
    }
    grub_modules(&tree, "/usr/lib/grub/i386-pc", "i386-pc");
    let root = work.join("old-root.ext4");
    make_ext4(&tree, OLD_UUID, "old-root", ROOT_MIB, &root);
    std::fs::remove_dir_all(&tree).unwrap();
    let old = work.join("old.img");
    partition(&old);
    place_data(&old, ROOT_START_MIB * MIB, &root);
    std::fs::remove_file(&root).unwrap();
    let swap = work.join("swap.img");
    std::fs::File::create(&swap)
        .unwrap()
        .set_len(255 * MIB)
        .unwrap();
    run_ok("mkswap", &["-U", SWAP_UUID, p(&swap)]);
    place_data(&old, SWAP_START_MIB * MIB, &swap);
    std::fs::remove_file(&swap).unwrap();
    let by_uuid = (core == CoreImage::ByUuid).then_some(OLD_UUID);
    let modules = ["loadenv", "test", "part_gpt"];
    install_grub_config(&old, work, &modules, by_uuid);
    LiveDisks {
        old,
        new_image: image(work, &tarball, NEW_UUID, "new", false),
        broken_image: image(work, &tarball, BROKEN_UUID, "broken", true),
        firmware: Vec::new(),
    }
}

/// The UEFI machine's GPT disk: an ESP with GRUB as the removable-media loader (OVMF starts it
/// with blank variables), the root made from `tree`, and swap.
fn uefi_disk(work: &Path, tree: &Path) -> PathBuf {
    let [esp_mib, root_mib, swap_mib] = UEFI_PARTS;
    let root = work.join("old-root.ext4");
    make_ext4(tree, OLD_UUID, "old-root", root_mib, &root);
    let core = crate::uefi::grub_core(work, OLD_UUID);
    let esp = work.join("esp.fat");
    crate::uefi::make_esp(&esp, &core, esp_mib, "::/EFI/BOOT/BOOTX64.EFI");
    let swap = work.join("swap.img");
    std::fs::File::create(&swap)
        .unwrap()
        .set_len(swap_mib * MIB)
        .unwrap();
    run_ok("mkswap", &["-U", SWAP_UUID, p(&swap)]);
    let disk = work.join("old.img");
    let offsets = crate::fixtures::gpt_disk(
        &disk,
        UEFI_PARTS.iter().sum::<u64>() + 2,
        &[
            (esp_mib, "ef00", "EFI system partition"),
            (root_mib, "8300", "old-root"),
            (swap_mib, "8200", "swap"),
        ],
    );
    for (at, part) in offsets.iter().zip([&esp, &root, &swap]) {
        place_data(&disk, *at, part);
        std::fs::remove_file(part).unwrap();
    }
    disk
}

/// The old system's agent: this build's diskferry-client, started at boot in live mode.
fn agent(tree: &Path, server_key: &str) {
    let sbin = tree.join("usr/local/sbin");
    std::fs::create_dir_all(&sbin).unwrap();
    std::fs::copy(bin("diskferry-client"), sbin.join("diskferry-client")).unwrap();
    let unit = format!(
        "[Unit]\nDescription=diskferry agent\nAfter=network.target\n\n[Service]\n\
         ExecStart=/usr/local/sbin/diskferry-client --listen 0.0.0.0:{AGENT_PORT} --server-key {server_key} --live --allow-power\n\
         Restart=always\n\n[Install]\nWantedBy=multi-user.target\n"
    );
    let units = tree.join("etc/systemd/system");
    std::fs::write(units.join("diskferry-agent.service"), unit).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/diskferry-agent.service",
        units.join("multi-user.target.wants/diskferry-agent.service"),
    )
    .unwrap();
}

/// A deployable image: one MBR partition holding a Debian root named `name`; `broken`, its
/// initrd is garbage, so the kernel cannot mount its root and panics.
fn image(work: &Path, tarball: &Path, uuid: &str, name: &str, broken: bool) -> PathBuf {
    let tree = work.join(format!("{name}-tree"));
    extract_tarball(tarball, &tree);
    configure(&tree, uuid, name);
    crate::debian::write_grub_cfg(&tree, uuid);
    if broken {
        // /initrd.img links to the real file, relatively or not.
        let target = std::fs::read_link(tree.join("initrd.img")).unwrap();
        let file = tree.join(target.to_str().unwrap().trim_start_matches('/'));
        std::fs::write(&file, vec![0x5a; 4096]).unwrap();
    }
    let root = work.join(format!("{name}-root.ext4"));
    make_ext4(&tree, uuid, &format!("{name}-root"), IMAGE_ROOT_MIB, &root);
    std::fs::remove_dir_all(&tree).unwrap();
    let disk = work.join(format!("{name}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len((IMAGE_ROOT_MIB + 2) * MIB)
        .unwrap();
    sh(&format!(
        "printf 'label: dos\\nstart=2048, size={}, type=83\\n' | sfdisk --quiet {}",
        IMAGE_ROOT_MIB * MIB / 512,
        p(&disk)
    ));
    place_data(&disk, MIB, &root);
    std::fs::remove_file(&root).unwrap();
    disk
}

/// A machine under qemu (TCG) that reboots in place, its serial console in a file and its
/// agent's port forwarded to `host_port` on 127.0.0.1.
pub struct Vm {
    child: Child,
    pub log: PathBuf,
}

impl Vm {
    pub fn start(disks: &LiveDisks, host_port: u16, log: &Path) -> Vm {
        let disk = &disks.old;
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "1024",
                "-nographic",
                "-monitor",
                "none",
            ])
            .args(&disks.firmware)
            .arg("-serial")
            .arg(format!("file:{}", p(log)))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", p(disk)))
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{host_port}-:{AGENT_PORT}"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (Debian qemu-system-x86)");
        Vm {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The marker lines printed so far: (name, root UUID), in order.
    pub fn markers(&self) -> Vec<(String, String)> {
        self.console()
            .lines()
            .filter_map(|l| {
                l.split_once("DISKFERRY-LIVE ")
                    .map(|(_, rest)| rest.trim_end())
            })
            .filter_map(|rest| {
                let field = |k: &str| {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(k).map(str::to_string))
                };
                Some((field("name=")?, field("root=")?))
            })
            .collect()
    }

    /// Waits until a marker of `name` has been printed since marker number `after`; panics
    /// with the console after `limit`.
    pub fn wait_marker(&self, name: &str, after: usize, limit: Duration) -> (String, String) {
        let started = Instant::now();
        let found = wait_for(limit, || {
            self.markers().iter().skip(after).any(|(n, _)| n == name)
        });
        assert!(
            found,
            "no marker of {name} within {limit:?} ({:?} waited); console:\n{}",
            started.elapsed(),
            self.console()
        );
        self.markers()
            .into_iter()
            .skip(after)
            .find(|(n, _)| n == name)
            .unwrap()
    }

    /// Waits for qemu to end by itself (the machine powered off).
    pub fn wait_poweroff(&mut self, limit: Duration) -> bool {
        wait_for(limit, || self.child.try_wait().ok().flatten().is_some())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SHA-256 of every file under `dirs` of the ext4 filesystem at byte `offset` of `disk`
/// (mounted read-only by the kernel).
pub fn hashes(disk: &Path, offset: u64, dirs: &[&str], work: &Path) -> String {
    let mnt = tempfile::tempdir_in(work).unwrap();
    run_ok(
        "mount",
        &[
            "-o",
            &format!("loop,ro,noload,offset={offset}"),
            p(disk),
            p(mnt.path()),
        ],
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find {} -xdev -type f -print0 | sort -z | xargs -0 sha256sum",
            dirs.join(" ")
        ))
        .current_dir(mnt.path())
        .output()
        .unwrap();
    run_ok("umount", &[p(mnt.path())]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}
