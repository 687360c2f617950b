//! Live deploys onto a running system, with the real binaries: the "running system" is an
//! ext4 partition of an MBR disk image, mounted by the kernel (a loop device at the
//! partition's offset), its agent started with `--live` serving the whole disk (a second
//! loop device over the same file). This kernel does not scan loop devices for partitions,
//! so the agent is shown the partition in a fake sysfs (`DISKFERRY_SYSFS`) — the data path
//! is real: the file is pinned by the kernel's ext4, mapped by FIEMAP, and written through
//! the whole-disk device at the partition's offset plus the file's offsets.
//!
//! Checked with tools nobody here wrote: `sfdisk --json` (the nested partition entry), the
//! new filesystem cut out of the disk at that entry's range by `e2fsck -fn` and the
//! kernel's loop mount compared with `rsync -c` against the image's tree; the running
//! system's filesystem by `e2fsck -fn` and a hash of every file before and after; and a
//! rollback leaves sector 0, GRUB's files and the free space exactly as they were.

use std::path::{Path, PathBuf};
use std::process::Command;

use diskferry_e2e::{bin, cli, fixtures, make_key, run_ok, sh, Client};

const MIB: u64 = 1 << 20;
const OLD_UUID: &str = "01d5e5e5-0000-4000-8000-00000000a01d";

/// GRUB's generated menu, as far as a live switch needs it: `next_entry` honoured once,
/// custom.cfg read at the end.
const GRUB_CFG: &str = r#"if [ -s $prefix/grubenv ]; then
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
menuentry 'Debian GNU/Linux' --class debian {
	linux	/boot/vmlinuz-6.1.0-21-amd64 root=UUID=old ro quiet
	initrd	/boot/initrd.img-6.1.0-21-amd64
}
if [ -f  ${config_directory}/custom.cfg ]; then
  source ${config_directory}/custom.cfg
elif [ -z "${config_directory}" -a -f  $prefix/custom.cfg ]; then
  source $prefix/custom.cfg
fi
"#;

/// The running system: its disk image, the two loop devices and where its root is mounted.
struct OldSystem {
    dir: PathBuf,
    disk: PathBuf,
    whole: String,
    part: String,
    mnt: PathBuf,
    sysfs: PathBuf,
    mounted: bool,
}

impl OldSystem {
    /// A 1 GiB MBR disk whose one partition (from 1 MiB) holds a small Linux root with
    /// GRUB's files, mounted.
    fn new(dir: &Path) -> OldSystem {
        OldSystem::with_table(
            dir,
            "label: dos\nlabel-id: 0x0ddba11\nstart=2048, type=83, bootable\n",
        )
    }

    /// The same on a GPT disk (a BIOS boot partition's code in sector 0 kept as it is).
    fn gpt(dir: &Path) -> OldSystem {
        OldSystem::with_table(
            dir,
            "label: gpt\nlabel-id: 0DDBA110-0000-4000-8000-000000000001\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n",
        )
    }

    /// The disk partitioned by the sfdisk `script` (one partition from sector 2048).
    fn with_table(dir: &Path, script: &str) -> OldSystem {
        let disk = dir.join("old.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1024 * MIB)
            .unwrap();
        let mut sfdisk = Command::new("sfdisk")
            .args(["-q", disk.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        sfdisk
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(sfdisk.wait().unwrap().success());
        let d = disk.to_str().unwrap();
        let whole = run_ok("losetup", &["-f", "--show", d]).trim().to_string();
        // Partition 1 exactly as the table has it (a GPT's backup follows it).
        let json: serde_json::Value =
            serde_json::from_str(&run_ok("sfdisk", &["--json", d])).unwrap();
        let p1 = &json["partitiontable"]["partitions"][0];
        let (start, size) = (p1["start"].as_u64().unwrap(), p1["size"].as_u64().unwrap());
        assert_eq!(
            start, 2048,
            "the fake sysfs says partition 1 starts at sector 2048"
        );
        let part = run_ok(
            "losetup",
            &[
                "-f",
                "--show",
                "-o",
                &(start * 512).to_string(),
                "--sizelimit",
                &(size * 512).to_string(),
                d,
            ],
        )
        .trim()
        .to_string();
        let mnt = dir.join("old-root");
        std::fs::create_dir(&mnt).unwrap();
        let mut old = OldSystem {
            dir: dir.to_path_buf(),
            disk,
            whole,
            part,
            mnt,
            sysfs: dir.join("sysfs"),
            mounted: false,
        };
        run_ok(
            "mkfs.ext4",
            &["-q", "-b", "4096", "-U", OLD_UUID, &old.part],
        );
        old.mount();
        let m = old.mnt.display().to_string();
        sh(&format!(
            r#"
            mkdir -p {m}/etc {m}/boot/grub {m}/home/user/data {m}/var/log
            printf 'ID=debian\nVERSION_ID="12"\n' > {m}/etc/os-release
            echo old-host > {m}/etc/hostname
            for i in $(seq 1 40); do head -c $((i * 7919)) /dev/urandom > {m}/home/user/data/f$i; done
            head -c 30000000 /dev/urandom > {m}/var/log/big.log
            # Free space that held data: the live file may land on it.
            head -c 300000000 /dev/urandom > {m}/deleted.bin
            sync
            rm {m}/deleted.bin
            sync
            "#
        ));
        std::fs::write(old.mnt.join("boot/grub/grub.cfg"), GRUB_CFG).unwrap();
        let mut env = b"# GRUB Environment Block\n".to_vec();
        env.resize(1024, b'#');
        std::fs::write(old.mnt.join("boot/grub/grubenv"), env).unwrap();
        old.fake_sysfs();
        old
    }

    /// sysfs as a kernel that scanned the whole-disk loop device would show it: the mounted
    /// device is its partition 1, starting at sector 2048.
    fn fake_sysfs(&self) {
        let devno = |dev: &str| {
            run_ok("stat", &["-L", "-c", "%Hr:%Lr", dev])
                .trim()
                .to_string()
        };
        let (whole, part) = (devno(&self.whole), devno(&self.part));
        let name = Path::new(&self.whole)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let disk_dir = self.sysfs.join("devices/virtual/block").join(&name);
        let part_dir = disk_dir.join(format!("{name}p1"));
        std::fs::create_dir_all(&part_dir).unwrap();
        std::fs::write(disk_dir.join("dev"), format!("{whole}\n")).unwrap();
        std::fs::write(part_dir.join("partition"), "1\n").unwrap();
        std::fs::write(part_dir.join("start"), "2048\n").unwrap();
        std::fs::create_dir_all(self.sysfs.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&part_dir, self.sysfs.join("dev/block").join(&part)).unwrap();
        std::os::unix::fs::symlink(&disk_dir, self.sysfs.join("dev/block").join(&whole)).unwrap();
    }

    fn mount(&mut self) {
        run_ok("mount", &[&self.part, self.mnt.to_str().unwrap()]);
        self.mounted = true;
    }

    /// `e2fsck -fn` of the running system's filesystem (unmounted for it, mounted again).
    fn fsck(&mut self) {
        run_ok("umount", &[self.mnt.to_str().unwrap()]);
        self.mounted = false;
        run_ok("e2fsck", &["-fn", &self.part]);
        self.mount();
    }

    /// SHA-256 of every file but GRUB's and the live file's, by path.
    fn hashes(&self) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg("find . -xdev -type f ! -path ./diskferry-live ! -path './boot/grub/*' -print0 | sort -z | xargs -0 sha256sum")
            .current_dir(&self.mnt)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    fn free(&self) -> u64 {
        run_ok("df", &["--output=avail", "-B1", self.mnt.to_str().unwrap()])
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn sector0(&self) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; 512];
        std::fs::File::open(&self.disk)
            .unwrap()
            .read_exact_at(&mut b, 0)
            .unwrap();
        b
    }

    /// The agent, live, serving the whole disk, its GRUB root the mounted filesystem.
    fn agent(&self, key: &Path, live: bool) -> Client {
        let file = self.mnt.join("diskferry-live");
        let file = file.to_str().unwrap();
        let mut args = vec!["--disk", &self.whole, "--allow-power"];
        if live {
            args.extend(["--live", "--live-file", file]);
        }
        Client::start_with(
            key,
            &args,
            &[
                ("DISKFERRY_SYSFS", self.sysfs.to_str().unwrap()),
                ("DISKFERRY_LIVE_ROOT", self.mnt.to_str().unwrap()),
            ],
        )
        .unwrap()
    }
}

impl Drop for OldSystem {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mnt).status();
        }
        for dev in [&self.part, &self.whole] {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = &self.dir;
    }
}

/// The image to deploy: a GPT disk whose root holds the fixture Linux tree, with a GRUB
/// menu and Debian's /vmlinuz link. Returns the disk and the tree.
fn new_image(dir: &Path) -> (PathBuf, PathBuf) {
    let tree = fixtures::linux_tree(dir);
    std::fs::create_dir_all(tree.join("boot/grub")).unwrap();
    std::fs::write(
        tree.join("boot/grub/grub.cfg"),
        "menuentry 'Debian GNU/Linux' {\n\tlinux\t/boot/vmlinuz-6.1.0-21-amd64 root=UUID=x ro console=ttyS0\n}\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-21-amd64", tree.join("vmlinuz")).unwrap();
    let root = dir.join("new-root.ext4");
    fixtures::ext4_image(&tree, &root, 96, "newroot");
    let disk = dir.join("golden.img");
    let offsets = fixtures::gpt_disk(&disk, 128, &[(96, "8300", "root")]);
    fixtures::place(&disk, offsets[0], &root);
    (disk, tree)
}

fn uuid_of(fs: &Path) -> String {
    run_ok(
        "blkid",
        &["-o", "value", "-s", "UUID", fs.to_str().unwrap()],
    )
    .trim()
    .to_string()
}

/// The nested partition 2 of the old disk: (start, size) in bytes, from sfdisk.
fn nested_partition(disk: &Path) -> Option<(u64, u64)> {
    fixtures::sfdisk_partitions(disk)
        .into_iter()
        .find(|p| p.0 == "2")
        .map(|p| (p.1, p.2))
}

#[test]
fn a_running_system_receives_a_new_one_in_a_pinned_file_and_rolls_it_back_unchanged() {
    let (log, bad) = round_trip(false, 200);
    assert!(log.contains(" 0 bad blocks"), "{log}");
    assert!(bad.contains("Blockcount: 0\n"), "{bad}");
}

#[test]
fn a_gpt_running_system_gets_a_named_entry_through_the_agent_s_table_guard() {
    let (log, _) = round_trip_on(OldSystem::gpt, false, 200);
    assert!(log.contains("partition 2"), "{log}");
}

#[test]
fn in_fragmented_free_space_the_running_system_s_blocks_become_bad_blocks_and_stay_untouched() {
    let (log, bad) = round_trip(true, 150);
    let listed: u64 = bad
        .lines()
        .find_map(|l| l.strip_prefix("TOTAL: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("debugfs lists inode 1's blocks");
    assert!(
        listed > 100,
        "the running system's blocks in the range are listed:\n{bad}\n{log}"
    );
    assert!(!log.contains(" 0 bad blocks"), "{log}");
}

/// Fills the running system's free space with 19 MiB files, each followed by a 1 MiB one of
/// random bytes, then deletes the large ones: free space in 19 MiB pieces between files that
/// stay. One process allocates them all (`fallocate`, in order): ext4 starts each file's
/// search where the process's last one ended, so the pieces alternate as written.
fn fragment(old: &OldSystem) {
    let script = r#"
import os, sys
d = os.path.join(sys.argv[1], "fill")
os.mkdir(d)
i = 0
while True:
    try:
        for name, size in (("a%d" % i, 19 << 20), ("b%d" % i, 1 << 20)):
            fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)
                if name[0] == "b":
                    os.pwrite(fd, os.urandom(size), 0)
                    os.fsync(fd)
            finally:
                os.close(fd)
    except OSError:
        break
    i += 1
for name in os.listdir(d):
    if name[0] == "a":
        os.unlink(os.path.join(d, name))
os.sync()
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&old.mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deploys the image live into a running system (its free space fragmented first, when
/// asked) with a live file of `size_mib`, checks everything, rolls back and checks that
/// nothing changed; returns the deploy's log and `debugfs`' view of the new filesystem's
/// bad-block inode.
fn round_trip(fragmented: bool, size_mib: u64) -> (String, String) {
    round_trip_on(OldSystem::new, fragmented, size_mib)
}

/// [`round_trip`] on the running system `make` builds.
fn round_trip_on(
    make: fn(&Path) -> OldSystem,
    fragmented: bool,
    size_mib: u64,
) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "server.key");
    let (image, tree) = new_image(dir.path());
    let new_uuid = uuid_of(&dir.path().join("new-root.ext4"));
    let mut old = make(dir.path());
    let table = run_ok("sfdisk", &["--dump", old.disk.to_str().unwrap()]);
    if fragmented {
        fragment(&old);
    }
    let (hashes, free, sector0) = (old.hashes(), old.free(), old.sector0());
    let agent = old.agent(&key, true);
    let k = key.to_str().unwrap();
    let target = format!("{}@{}", old.whole, agent.addr);

    let (ok, log) = cli(&[
        "deploy",
        image.to_str().unwrap(),
        &target,
        "--live",
        "--live-size",
        &format!("{size_mib}M"),
        "--key-file",
        k,
        "--progress",
        "none",
    ]);
    assert!(ok, "{log}");
    assert!(log.contains("partition 2"), "{log}");
    let deployed = log;

    // The table has a new entry inside the running system's partition.
    let (start, size) = nested_partition(&old.disk).expect("partition 2");
    assert!(
        start >= MIB && start + size <= 1024 * MIB && size >= size_mib * MIB,
        "{start}+{size}"
    );
    assert_eq!(old.sector0()[..440], sector0[..440], "boot code untouched");

    // Cut out at that range, the new filesystem is the image's root, by e2fsck and rsync.
    let cut = fixtures::extract(&old.disk, start, size, &dir.path().join("cut.ext4"));
    run_ok("e2fsck", &["-fn", cut.to_str().unwrap()]);
    assert_eq!(uuid_of(&cut), new_uuid, "the image's identity");
    let bad = run_ok("debugfs", &["-R", "stat <1>", cut.to_str().unwrap()]);
    let cut_mnt = dir.path().join("cut-mnt");
    std::fs::create_dir(&cut_mnt).unwrap();
    run_ok(
        "mount",
        &[
            "-o",
            "loop,ro",
            cut.to_str().unwrap(),
            cut_mnt.to_str().unwrap(),
        ],
    );
    let diff = Command::new("rsync")
        .args([
            "-rlptgoDcni",
            "--delete",
            "--exclude=/usr/local/",
            "--exclude=/etc/systemd/",
            "--exclude=/etc/diskferry/",
            "--exclude=/var/lib/",
            "--exclude=/lost+found/",
        ])
        .arg(format!("{}/", tree.display()))
        .arg(format!("{}/", cut_mnt.display()))
        .output()
        .unwrap();
    let agent_bin = std::fs::read(cut_mnt.join("usr/local/sbin/diskferry-client"));
    let unit =
        std::fs::read_to_string(cut_mnt.join("etc/systemd/system/diskferry-live-agent.service"));
    let state = std::fs::read_to_string(cut_mnt.join("etc/diskferry/live.cfg"));
    let wanted = std::fs::read_link(
        cut_mnt.join("etc/systemd/system/multi-user.target.wants/diskferry-live-agent.service"),
    );
    run_ok("umount", &[cut_mnt.to_str().unwrap()]);
    let changes = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff.status.success() && changes.trim().is_empty(),
        "rsync -c found differences:\n{changes}"
    );
    assert!(
        state.unwrap().starts_with("set diskferry_committed=0\n"),
        "uncommitted"
    );
    assert_eq!(
        wanted.unwrap(),
        Path::new("/etc/systemd/system/diskferry-live-agent.service"),
        "enabled"
    );
    assert_eq!(
        agent_bin.unwrap(),
        std::fs::read(bin("diskferry-client")).unwrap()
    );
    let unit = unit.unwrap();
    assert!(
        unit.contains(&format!("--listen {} ", agent.addr)),
        "{unit}"
    );

    // GRUB boots it once; the running system is as it was, its filesystem clean.
    let custom = std::fs::read_to_string(old.mnt.join("boot/grub/custom.cfg")).unwrap();
    assert!(
        custom.contains("--id diskferry-live") && custom.contains(&new_uuid),
        "{custom}"
    );
    assert!(
        custom.contains("linux ($diskferry_live)/vmlinuz root=UUID="),
        "{custom}"
    );
    let env = std::fs::read_to_string(old.mnt.join("boot/grub/grubenv")).unwrap();
    assert!(
        env.contains("next_entry=diskferry-live\n") && env.len() == 1024,
        "{env}"
    );
    assert_eq!(old.hashes(), hashes);
    old.fsck();
    let (_, state) = cli(&["live", &agent.addr, "--key-file", k]);
    assert!(
        state.contains("running the old system, with a live file"),
        "{state}"
    );

    // Rolled back: sector 0, GRUB's files and the free space are as before.
    let (ok, log) = cli(&["live", &agent.addr, "--rollback", "--key-file", k]);
    assert!(ok && log.contains("rolled back"), "{log}");
    assert_eq!(nested_partition(&old.disk), None);
    assert!(old.sector0() == sector0, "sector 0 as it was");
    assert_eq!(
        run_ok("sfdisk", &["--dump", old.disk.to_str().unwrap()]),
        table,
        "the table as it was"
    );
    assert!(!old.mnt.join("boot/grub/custom.cfg").exists());
    let env = std::fs::read_to_string(old.mnt.join("boot/grub/grubenv")).unwrap();
    assert!(!env.contains("next_entry"), "{env}");
    assert!(!old.mnt.join("diskferry-live").exists());
    assert_eq!(old.hashes(), hashes);
    assert!(
        old.free() >= free,
        "free space given back: {} < {free}",
        old.free()
    );
    old.fsck();
    agent.stop();
    (deployed, bad)
}

#[test]
fn refusals_say_why_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "server.key");
    let (image, _) = new_image(dir.path());
    let old = OldSystem::new(dir.path());
    let (hashes, sector0) = (old.hashes(), old.sector0());
    let k = key.to_str().unwrap();
    let img = image.to_str().unwrap();

    let agent = old.agent(&key, true);
    let target = format!("{}@{}", old.whole, agent.addr);
    let (ok, log) = cli(&[
        "deploy",
        img,
        &target,
        "--live",
        "--live-size",
        "2G",
        "--key-file",
        k,
    ]);
    assert!(!ok && log.contains("not enough free space"), "{log}");
    let (ok, log) = cli(&[
        "deploy",
        img,
        &format!("/dev/nowhere@{}", agent.addr),
        "--live",
        "--key-file",
        k,
    ]);
    assert!(!ok && log.contains("not on /dev/nowhere"), "{log}");
    agent.stop();

    let plain = old.agent(&key, false);
    let (ok, log) = cli(&[
        "deploy",
        img,
        &format!("{}@{}", old.whole, plain.addr),
        "--live",
        "--key-file",
        k,
    ]);
    assert!(!ok && log.contains("not in live mode"), "{log}");
    plain.stop();

    assert!(old.sector0() == sector0);
    assert!(!old.mnt.join("diskferry-live").exists());
    assert!(!old.mnt.join("boot/grub/custom.cfg").exists());
    assert_eq!(old.hashes(), hashes);
}

/// A server whose data directory (`dir/data`) holds the image as capture `golden.img`.
fn server_with_image(dir: &Path) -> (diskferry_e2e::http::Server, PathBuf) {
    let (image, _) = new_image(dir);
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("captures")).unwrap();
    std::fs::copy(&image, data.join("captures/golden.img")).unwrap();
    (diskferry_e2e::http::Server::start(&data).unwrap(), data)
}

#[test]
fn a_server_s_live_job_switches_the_running_system_and_shows_where_it_stands() {
    let dir = tempfile::tempdir().unwrap();
    let (server, data) = server_with_image(dir.path());
    let key = data.join("server.key");
    let old = OldSystem::new(dir.path());
    let (hashes, sector0) = (old.hashes(), old.sector0());
    let agent = old.agent(&key, true);
    let target = format!("{}@{}", old.whole, agent.addr);

    // A machine name is not a live agent: refused before anything runs.
    let r = server.api(
        "POST",
        "/api/jobs",
        serde_json::json!({"kind": "live", "image": "golden.img", "target": "no-such-machine"})
            .to_string()
            .as_bytes(),
    );
    assert!(r.status >= 400 && r.status < 500, "{}", r.text());

    let job = server.run_job(&serde_json::json!({
        "kind": "live", "image": "golden.img", "target": target,
        "live_size_mib": 200, "live_wait_minutes": 0,
    }));
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["params"]["live"], "switched", "{job:#}");
    let log = job["log"].to_string();
    assert!(log.contains("GRUB starts it once"), "{log}");
    let (start, size) = nested_partition(&old.disk).expect("partition 2");
    assert!(size >= 200 * MIB && start >= MIB);
    assert!(
        std::fs::read_to_string(old.mnt.join("boot/grub/custom.cfg"))
            .unwrap()
            .contains("--id diskferry-live")
    );
    let page = server.get(&format!("/jobs/{}", job["id"])).text();
    assert!(
        page.contains("switched"),
        "the job page says where it stands"
    );

    let (ok, out) = cli(&[
        "live",
        &agent.addr,
        "--rollback",
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(old.sector0() == sector0);
    assert_eq!(old.hashes(), hashes);
    agent.stop();
}

/// An agent of the running system (or of the new one, when its root is elsewhere) that dials
/// back to a server, killed when dropped.
struct Dialling(std::process::Child);

impl Dialling {
    fn start(
        old: &OldSystem,
        server: &str,
        data: &Path,
        key: &Path,
        root: &Path,
        token: Option<&str>,
    ) -> Dialling {
        let mut cmd = Command::new(bin("diskferry-client"));
        cmd.args(["--connect", server, "--server-key"])
            .arg(diskferry_e2e::public_key(&data.join("server.key")))
            .arg("--agent-key")
            .arg(key)
            .args(["--disk", &old.whole, "--live", "--live-file"])
            .arg(old.mnt.join("diskferry-live"))
            .env("DISKFERRY_SYSFS", &old.sysfs)
            .env("DISKFERRY_LIVE_ROOT", root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        Dialling(cmd.spawn().unwrap())
    }
}

impl Drop for Dialling {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_machine_that_dials_back_is_live_deployed_and_its_new_system_commits_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let (server, data) = server_with_image(dir.path());
    let old = OldSystem::new(dir.path());
    // The machine's MACs and DMI are this host's.
    std::os::unix::fs::symlink("/sys/class", old.sysfs.join("class")).unwrap();
    let old_agent = Dialling::start(
        &old,
        &server.agent_addr,
        &data,
        &dir.path().join("old.key"),
        &old.mnt,
        None,
    );
    let mut mac = String::new();
    assert!(diskferry_e2e::wait_for(
        std::time::Duration::from_secs(30),
        || {
            let list = server.get("/api/machines").json();
            mac = list[0]["macs"][0].as_str().unwrap_or_default().to_string();
            !mac.is_empty()
        }
    ));
    let r = server.api("POST", &format!("/api/machines/{mac}/approve"), b"");
    assert!(r.status < 300, "{}", r.text());

    let r = server.api(
        "POST",
        "/api/jobs",
        serde_json::json!({
            "kind": "live", "image": "golden.img", "target": format!("{}@{mac}", old.whole),
            "live_size_mib": 200, "live_wait_minutes": 5,
        })
        .to_string()
        .as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let job = |s: &diskferry_e2e::http::Server| s.get(&format!("/api/jobs/{id}")).json();
    assert!(
        diskferry_e2e::wait_for(std::time::Duration::from_secs(120), || job(&server)
            ["params"]["live"]
            == "switched"),
        "{:#}",
        job(&server)
    );

    // "Reboot": the old system's agent goes; the new system's comes up with what the deploy
    // gave it — the unit's enrollment token, and the deploy's token on its kernel command line.
    drop(old_agent);
    let (start, size) = nested_partition(&old.disk).expect("the live partition");
    let cut = fixtures::extract(&old.disk, start, size, &dir.path().join("cut.ext4"));
    let c = cut.to_str().unwrap();
    let unit = run_ok(
        "debugfs",
        &[
            "-R",
            "cat /etc/systemd/system/diskferry-live-agent.service",
            c,
        ],
    );
    assert!(
        unit.contains(&format!("--connect {}", server.agent_addr)),
        "{unit}"
    );
    let enrollment = unit
        .split("--token ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("an enrollment token");
    let menu = std::fs::read_to_string(old.mnt.join("boot/grub/custom.cfg")).unwrap();
    let live_token = menu
        .split("diskferry.live=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap();
    let new_root = dir.path().join("new-root");
    std::fs::create_dir_all(new_root.join("proc")).unwrap();
    std::fs::create_dir_all(new_root.join("etc/diskferry")).unwrap();
    std::fs::write(
        new_root.join("proc/cmdline"),
        format!("root=UUID=x ro diskferry.live={live_token}\n"),
    )
    .unwrap();
    run_ok(
        "debugfs",
        &[
            "-R",
            &format!(
                "dump /etc/diskferry/live.cfg {}",
                new_root.join("etc/diskferry/live.cfg").display()
            ),
            c,
        ],
    );
    let _new_agent = Dialling::start(
        &old,
        &server.agent_addr,
        &data,
        &dir.path().join("new.key"),
        &new_root,
        Some(enrollment),
    );

    assert!(
        diskferry_e2e::wait_for(std::time::Duration::from_secs(120), || job(&server)
            ["state"]
            != "running"),
        "{:#}",
        job(&server)
    );
    let done = job(&server);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    // This old system has no BIOS GRUB files to give the new one (/boot/grub/i386-pc), so
    // the new system cannot take the disk over: committed, the old one kept as boot host.
    assert_eq!(
        done["params"]["live"], "committed, old system kept",
        "{done:#}"
    );
    let log = done["log"].as_str().unwrap();
    assert!(
        log.contains("not taken over: the live system has no boot loader of its own"),
        "{log}"
    );
    let state = std::fs::read_to_string(new_root.join("etc/diskferry/live.cfg")).unwrap();
    assert!(state.starts_with("set diskferry_committed=1\n"), "{state}");
    let machine = server.get("/api/machines").json();
    assert_eq!(machine[0]["state"], "deployed", "{machine:#}");
}
