//! Live deploys onto a running Debian under qemu (TCG), end to end with the real binaries:
//! the machine's own agent (started with `--live` at boot) receives another Debian while
//! the old system keeps printing its marker, reboots once into it (GRUB's `next_entry`), the
//! new system's agent confirms and the deploy commits, and from then on the machine boots
//! the new system by default. A broken image (its kernel panics: no usable initrd) brings
//! the old system back at the next boot, and the deploy rolls back: the old system's files
//! are as they were. Once committed, the new system takes the disk over: it boots through
//! GRUB files of its own, and the old partition is removed; a GRUB core image that finds its
//! files by UUID (not partition number) cannot be taken over, and the old system stays the
//! boot host with nothing changed. `e2fsck -fn` judges both filesystems; `sfdisk` the table.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use diskferry_e2e::live_vm::{self, CoreImage, Vm, NEW_UUID, OLD_UUID};
use diskferry_e2e::{cli, make_key, public_key, run_ok, wait_for};

const MIB: u64 = 1 << 20;
/// How long a boot under TCG may take, to the agent answering.
const BOOT: Duration = Duration::from_secs(300);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the agent at `addr` answers `diskferry live` with a line containing `says`.
fn wait_agent(addr: &str, key: &str, says: &str, vm: &Vm) -> String {
    let mut last = String::new();
    let up = wait_for(BOOT, || {
        let (ok, out) = cli(&["live", addr, "--key-file", key]);
        last = out;
        ok && last.contains(says)
    });
    assert!(
        up,
        "the agent at {addr} never said {says:?}; last: {last}\nconsole:\n{}",
        vm.console()
    );
    last
}

/// `e2fsck -fn` of the filesystem at `start..start+size` of `disk`, cut out.
fn fsck_at(disk: &Path, start: u64, size: u64, work: &Path, name: &str) {
    let cut = diskferry_e2e::fixtures::extract(disk, start, size, &work.join(name));
    run_ok("e2fsck", &["-fn", cut.to_str().unwrap()]);
    std::fs::remove_file(cut).unwrap();
}

/// Runs `diskferry deploy IMAGE /dev/vda@ADDR --live --reboot --live-wait` to its end.
fn deploy_live(image: &Path, addr: &str, key: &str) -> (bool, String) {
    let out = Command::new(diskferry_e2e::bin("diskferry"))
        .args([
            "deploy",
            image.to_str().unwrap(),
            &format!("/dev/vda@{addr}"),
        ])
        .args([
            "--live",
            "--reboot",
            "--live-wait",
            "15",
            "--progress",
            "none",
            "--key-file",
            key,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A machine's disks and server key in a work directory.
struct Machine {
    work: tempfile::TempDir,
    key: std::path::PathBuf,
    disks: live_vm::LiveDisks,
}

impl Machine {
    fn new(core: CoreImage) -> Machine {
        let work = tempfile::tempdir_in("/var/tmp").unwrap();
        let key = make_key(work.path(), "server.key");
        let disks = live_vm::build(work.path(), &public_key(&key), core);
        Machine { work, key, disks }
    }

    /// A BIOS machine whose agent trusts a server running from `work`'s `data` directory
    /// (its key made there first, which the server then takes up).
    fn for_server(work: tempfile::TempDir) -> Machine {
        let data = work.path().join("data");
        std::fs::create_dir_all(data.join("captures")).unwrap();
        let key = make_key(&data, "server.key");
        let disks = live_vm::build(work.path(), &public_key(&key), CoreImage::ByPartition);
        Machine { work, key, disks }
    }

    fn k(&self) -> &str {
        self.key.to_str().unwrap()
    }

    /// Boots the old system until its agent answers; the machine and its agent's address.
    fn boot(&self) -> (Vm, String) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let vm = Vm::start(&self.disks, port, &self.work.path().join("console.log"));
        let (_, root) = vm.wait_marker("old", 0, BOOT);
        assert_eq!(root, OLD_UUID);
        wait_agent(&addr, self.k(), "running its own system", &vm);
        (vm, addr)
    }

    /// Powers the machine off through its agent and waits for it.
    fn power_off(&self, vm: &mut Vm, addr: &str) {
        let (ok, out) = cli(&["live", addr, "--key-file", self.k(), "--poweroff"]);
        assert!(ok, "{out}");
        assert!(
            vm.wait_poweroff(Duration::from_secs(120)),
            "{}",
            vm.console()
        );
    }
}

#[test]
fn a_running_debian_is_replaced_live_boots_the_new_one_once_commits_it_and_keeps_it() {
    let m = Machine::new(CoreImage::ByPartition);
    let (w, k, disks) = (m.work.path(), m.k(), &m.disks);
    let table_before = diskferry_e2e::fixtures::sfdisk_partitions(&disks.old);
    let (mut vm, addr) = m.boot();

    let before = vm.markers().len();
    let (ok, log) = deploy_live(&disks.new_image, &addr, k);
    eprintln!("{log}");
    assert!(ok, "{log}\nconsole:\n{}", vm.console());
    assert!(log.contains("committed"), "{log}");
    assert!(log.contains("taken over"), "{log}");
    // The old system kept running while its disk received the new one.
    let markers = vm.markers();
    let first_new = markers
        .iter()
        .position(|(n, _)| n == "new")
        .expect("the new system ran");
    assert!(
        first_new - before >= 5,
        "only {} old markers during the deploy",
        first_new - before
    );
    assert_eq!(
        markers[first_new].1, NEW_UUID,
        "findmnt / is the new filesystem"
    );

    // Committed and taken over: the next boot starts the new system again, through its own
    // GRUB files.
    let seen = vm.markers().len();
    let (ok, out) = cli(&["live", &addr, "--key-file", k, "--reboot"]);
    assert!(ok, "{out}");
    let (_, root) = vm.wait_marker("new", seen + 1, BOOT);
    assert_eq!(root, NEW_UUID);
    assert!(
        !vm.markers().iter().skip(seen).any(|(n, _)| n == "old"),
        "the old system started again:\n{}",
        vm.console()
    );
    wait_agent(&addr, k, "running its own system", &vm);
    m.power_off(&mut vm, &addr);

    // The new system holds slot 1 (where GRUB's core image looks), inside the old
    // partition's range; the old partition is gone (slot 2 is the extended one, 5 the swap),
    // and its space around the new system is free.
    let parts = diskferry_e2e::fixtures::sfdisk_partitions(&disks.old);
    let numbers: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(numbers, ["1", "2", "5"], "{parts:?}");
    let new = &parts[0];
    let old = &table_before[0];
    assert!(
        old.1 < new.1 && new.1 + new.2 <= old.1 + old.2,
        "{parts:?} inside {old:?}"
    );
    let free = diskferry_e2e::run_ok("sfdisk", &["-F", disks.old.to_str().unwrap()]);
    assert!(
        free.lines()
            .any(|l| l.trim_start().starts_with(&format!("{} ", old.1 / 512))),
        "the old partition's start is free:\n{free}"
    );
    fsck_at(&disks.old, new.1, new.2, w, "new.ext4");
    // The old filesystem's bytes, no longer a partition, were never written by the new
    // system (it lived in the pinned file): still clean.
    fsck_at(&disks.old, old.1, old.2, w, "old.ext4");
}

#[test]
fn a_live_image_that_panics_brings_the_old_system_back_unchanged() {
    let m = Machine::new(CoreImage::ByPartition);
    let (w, k, disks) = (m.work.path(), m.k(), &m.disks);
    let tree = ["srv", "usr", "etc/systemd"];
    let hashes = live_vm::hashes(&disks.old, MIB, &tree, w);
    let table = diskferry_e2e::fixtures::sfdisk_partitions(&disks.old);
    let (mut vm, addr) = m.boot();

    let before = vm.markers().len();
    let (ok, log) = deploy_live(&disks.broken_image, &addr, k);
    assert!(
        !ok && log.contains("rolled back"),
        "{log}\nconsole:\n{}",
        vm.console()
    );
    let console = vm.console();
    assert!(
        console.contains("Kernel panic"),
        "the new kernel panicked:\n{console}"
    );
    assert!(!vm.markers().iter().any(|(n, _)| n == "broken"));
    let (_, root) = vm.wait_marker("old", before, BOOT);
    assert_eq!(root, OLD_UUID);
    wait_agent(&addr, k, "running its own system", &vm);
    m.power_off(&mut vm, &addr);

    assert_eq!(
        diskferry_e2e::fixtures::sfdisk_partitions(&disks.old),
        table,
        "the partition table as it was"
    );
    assert_eq!(
        live_vm::hashes(&disks.old, MIB, &tree, w),
        hashes,
        "the old system's files"
    );
    let old = &table[0];
    fsck_at(&disks.old, old.1, old.2, w, "old.ext4");
    let root = live_vm::hashes(&disks.old, MIB, &["."], w);
    assert!(!root.contains("./diskferry-live"), "the live file is gone");
    assert!(
        !root.contains("./boot/grub/custom.cfg"),
        "GRUB's custom menu is gone"
    );
}

#[test]
fn a_core_image_finding_grub_by_uuid_is_not_taken_over_and_the_old_system_stays_boot_host() {
    let m = Machine::new(CoreImage::ByUuid);
    let (w, k, disks) = (m.work.path(), m.k(), &m.disks);
    let table_before = diskferry_e2e::fixtures::sfdisk_partitions(&disks.old);
    let (mut vm, addr) = m.boot();

    let (ok, log) = deploy_live(&disks.new_image, &addr, k);
    eprintln!("{log}");
    assert!(ok, "{log}\nconsole:\n{}", vm.console());
    assert!(log.contains("committed"), "{log}");
    assert!(
        log.contains("not taken over") && log.contains("by UUID"),
        "{log}"
    );
    // The take-over's reboot went through the old menu, which boots the committed system.
    let new_boots = vm.markers().iter().filter(|(n, _)| n == "new").count();
    assert!(
        new_boots >= 2,
        "two boots of the new system:\n{}",
        vm.console()
    );
    wait_agent(&addr, k, "running a live-deployed system", &vm);
    m.power_off(&mut vm, &addr);

    // The swap was undone: the old root is partition 1 again, the new system 3 inside it.
    let parts = diskferry_e2e::fixtures::sfdisk_partitions(&disks.old);
    let numbers: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(numbers, ["1", "2", "3", "5"], "{parts:?}");
    assert_eq!(parts[0], table_before[0]);
    let (old, new) = (&parts[0], &parts[2]);
    assert!(old.1 < new.1 && new.1 + new.2 <= old.1 + old.2, "{parts:?}");
    fsck_at(&disks.old, old.1, old.2, w, "old.ext4");
    fsck_at(&disks.old, new.1, new.2, w, "new.ext4");
}

#[test]
fn a_uefi_machine_is_replaced_live_and_keeps_the_old_system_as_boot_host() {
    let m = Machine::new(CoreImage::Uefi);
    let (w, k, disks) = (m.work.path(), m.k(), &m.disks);
    let (mut vm, addr) = m.boot();
    assert!(vm.console().contains("fw=uefi"), "{}", vm.console());

    let before = vm.markers().len();
    let (ok, log) = deploy_live(&disks.new_image, &addr, k);
    eprintln!("{log}");
    assert!(ok, "{log}\nconsole:\n{}", vm.console());
    assert!(log.contains("committed"), "{log}");
    // UEFI GRUB finds its files by UUID: no take-over, the old system stays the boot host.
    assert!(log.contains("not taken over"), "{log}");
    let markers = vm.markers();
    let first_new = markers.iter().position(|(n, _)| n == "new").unwrap();
    assert!(first_new - before >= 5, "the old system kept running");
    assert_eq!(markers[first_new].1, NEW_UUID);

    // Committed: a reboot starts the new system again, through the old GRUB menu.
    let seen = vm.markers().len();
    let (ok, out) = cli(&["live", &addr, "--key-file", k, "--reboot"]);
    assert!(ok, "{out}");
    let (_, root) = vm.wait_marker("new", seen + 1, BOOT);
    assert_eq!(root, NEW_UUID);
    wait_agent(&addr, k, "running a live-deployed system", &vm);
    m.power_off(&mut vm, &addr);

    // A GPT entry named diskferry-live inside the root's; gdisk finds only the overlap.
    let info = run_ok("sgdisk", &["-i", "4", disks.old.to_str().unwrap()]);
    assert!(info.contains("Partition name: 'diskferry-live'"), "{info}");
    let verify = Command::new("sgdisk")
        .args(["-v", disks.old.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(!text.to_lowercase().contains("crc"), "{text}");
    let parts = diskferry_e2e::fixtures::sfdisk_partitions(&disks.old);
    let (old, new) = (&parts[1], &parts[3]);
    assert!(old.1 < new.1 && new.1 + new.2 <= old.1 + old.2, "{parts:?}");
    fsck_at(&disks.old, old.1, old.2, w, "old.ext4");
    fsck_at(&disks.old, new.1, new.2, w, "new.ext4");
}

#[test]
fn a_server_job_replaces_a_running_debian_live_and_the_new_system_takes_the_disk_over() {
    let m = Machine::for_server(tempfile::tempdir_in("/var/tmp").unwrap());
    let (w, k, disks) = (m.work.path(), m.k(), &m.disks);
    let data = w.join("data");
    run_ok(
        "cp",
        &[
            "--sparse=always",
            disks.new_image.to_str().unwrap(),
            data.join("captures/new.img").to_str().unwrap(),
        ],
    );
    let server = diskferry_e2e::http::Server::start(&data).unwrap();
    let (mut vm, addr) = m.boot();

    let r = server.api(
        "POST",
        "/api/jobs",
        serde_json::json!({
            "kind": "live", "image": "new.img", "target": format!("/dev/vda@{addr}"),
            "reboot": true, "live_wait_minutes": 15,
        })
        .to_string()
        .as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    let job = || server.get(&format!("/api/jobs/{id}")).json();
    let ended = wait_for(Duration::from_secs(900), || {
        !matches!(job()["state"].as_str(), Some("queued" | "running"))
    });
    let done = job();
    assert!(ended, "{done:#}\nconsole:\n{}", vm.console());
    assert_eq!(
        done["state"],
        "succeeded",
        "{done:#}\nconsole:\n{}",
        vm.console()
    );
    assert_eq!(done["params"]["live"], "taken over", "{done:#}");
    let log = done["log"].as_str().unwrap();
    assert!(log.contains("the old system's partition is gone"), "{log}");
    let page = server.get(&format!("/jobs/{id}")).text();
    assert!(page.contains("taken over"), "the job page shows the stage");

    assert_eq!(
        vm.markers().last().map(|m| m.1.as_str()),
        Some(NEW_UUID),
        "the new system runs"
    );
    wait_agent(&addr, k, "running its own system", &vm);
    m.power_off(&mut vm, &addr);
    let parts = diskferry_e2e::fixtures::sfdisk_partitions(&disks.old);
    let numbers: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(numbers, ["1", "2", "5"], "{parts:?}");
    fsck_at(&disks.old, parts[0].1, parts[0].2, w, "new.ext4");
}
