//! PXE under QEMU (TCG): a VM that boots from the network with the boot environment served by
//! `diskferry serve`, the boot environment built once per target directory, and an extlinux
//! disk that boots that kernel with a marker on its command line (a deployed "system" that is
//! quick to boot).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::http::Server;
use crate::{bin_dir, sh, wait_for};

const MIB: u64 = 1 << 20;
/// What the extlinux disk puts on its kernel command line.
pub const MARKER: &str = "diskferry.marker=DEPLOYED-DISK-BOOTED";

/// A QEMU process logging its serial console to a file; killed when dropped.
pub struct Vm {
    child: Child,
    log: PathBuf,
}

impl Vm {
    /// Starts QEMU with `args`; a reboot of the guest ends it.
    pub fn start(log: &Path, args: &[String]) -> Vm {
        let mut all = vec!["-no-reboot".to_string()];
        all.extend_from_slice(args);
        Vm::start_rebooting(log, &all)
    }

    /// Starts QEMU with `args`; the guest may reboot.
    pub fn start_rebooting(log: &Path, args: &[String]) -> Vm {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "512", "-nographic"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("qemu-system-x86_64 (Debian qemu-system-x86)");
        Vm {
            child,
            log: log.to_path_buf(),
        }
    }

    /// PXE-boots with one NIC of this MAC and the given raw disks.
    pub fn pxe(log: &Path, http: &str, mac: &str, disks: &[&Path]) -> Vm {
        let mut args = vec!["-boot".to_string(), "n".into()];
        args.extend(Vm::network_args(http, mac, disks));
        Vm::start(log, &args)
    }

    /// The arguments for one NIC of this MAC whose network boot asks `/boot.ipxe` on the
    /// server's HTTP port `http`, and the given raw disks.
    pub fn network_args(http: &str, mac: &str, disks: &[&Path]) -> Vec<String> {
        let mut args = vec![
            "-netdev".to_string(),
            format!("user,id=n0,bootfile=http://10.0.2.2:{http}/boot.ipxe"),
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={mac}"),
            // Entropy for the agent's key, as libvirt gives VMs by default.
            "-device".into(),
            "virtio-rng-pci".into(),
        ];
        for d in disks {
            args.push("-drive".into());
            args.push(format!("file={},format=raw,if=virtio", d.display()));
        }
        args
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        wait_for(limit, || self.child.try_wait().ok().flatten().is_some())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The boot environment, built once per target directory.
pub fn bootenv() -> PathBuf {
    let dir = bin_dir().join("bootenv-test");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("bash")
        .arg(root.join("deploy/build-bootenv.sh"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-bootenv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    dir
}

/// An MBR disk with one active ext4 partition that extlinux boots: the kernel and initramfs
/// of the boot environment, with the marker on the kernel command line.
pub fn bootable_disk(path: &Path, boot: &Path, work: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    sh(&format!(
        "printf 'label: dos\\nlabel-id: 0x0b00710a\\nstart=2048, type=83, bootable\\n' | sfdisk --quiet {disk}
         dd if=/usr/lib/syslinux/mbr/mbr.bin of={disk} bs=440 count=1 conv=notrunc status=none
         part={work}/bootpart.ext4
         truncate -s $(( (64 - 1) * 1048576 )) $part
         mkfs.ext4 -q -O ^64bit,^metadata_csum -L BOOTME $part
         mnt={work}/bootmnt; mkdir -p $mnt
         mount -o loop $part $mnt
         mkdir -p $mnt/boot/extlinux
         cp {boot}/vmlinuz {boot}/initramfs.img $mnt/boot/
         printf 'DEFAULT marker\\nPROMPT 0\\nTIMEOUT 1\\nLABEL marker\\n  KERNEL /boot/vmlinuz\\n  APPEND console=ttyS0 initrd=/boot/initramfs.img {marker}\\n' > $mnt/boot/extlinux/extlinux.conf
         extlinux --install $mnt/boot/extlinux >/dev/null
         umount $mnt
         dd if=$part of={disk} bs=1M seek=1 conv=notrunc,sparse status=none",
        disk = path.display(),
        work = work.display(),
        boot = boot.display(),
        marker = MARKER,
    ));
}

/// `diskferry serve` on `data` for VMs under QEMU's user networking: its agent port on a free
/// loopback port that the boot script names (10.0.2.2 reaches the host's loopback); returns
/// the server and its HTTP port.
pub fn server_for_vms(data: &Path) -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = Server::start_with_agent_port(data, &format!("127.0.0.1:{port}")).unwrap();
    let http = s.addr.rsplit_once(':').unwrap().1.to_string();
    (s, http)
}
