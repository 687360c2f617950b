//! `diskferry export`: images and a client's disk served over NBD, checked with qemu-img,
//! qemu-io and nbdinfo; writes land in redo logs and never in the image.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use diskferry_e2e::http::Server;
use diskferry_e2e::nbd::Exported;
use diskferry_e2e::{diskferry, run_ok, Client};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A 256 MiB qcow2 qemu wrote: 8 MiB of data at 1 MiB, 1 MiB at 200 MiB.
fn capture(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("capture.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&image), "256M"],
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 8M",
            "-c",
            "write -P 0x77 200M 1M",
            p(&image),
        ],
    );
    image
}

fn sha256(path: &Path) -> String {
    run_ok("sha256sum", &[p(path)])
        .split_whitespace()
        .next()
        .unwrap()
        .into()
}

fn qemu_io(url: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(url);
    run_ok("qemu-io", &args)
}

#[test]
fn a_capture_is_served_read_only_and_writes_without_a_redo_log_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = capture(dir.path());
    let export = Exported::start(p(&image), &[]).unwrap();
    run_ok(
        "qemu-img",
        &["compare", "-F", "qcow2", &export.url, p(&image)],
    );
    let info = run_ok("nbdinfo", &[&export.url]);
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(export.stop().0);

    let (ok, _, err) = diskferry(&["export".as_ref(), image.as_os_str(), "--writable".as_ref()]);
    assert!(!ok && err.contains("--redo"), "{err}");
    let (ok, _, err) = diskferry(&[
        "export".as_ref(),
        image.as_os_str(),
        "--listen".as_ref(),
        "0.0.0.0:0".as_ref(),
    ]);
    assert!(!ok && err.contains("loopback"), "{err}");
}

#[test]
fn writes_through_a_qcow2_redo_log_read_back_and_the_log_continues_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let image = capture(dir.path());
    let before = sha256(&image);
    let redo = dir.path().join("redo.qcow2");
    let args = ["--writable", "--redo", p(&redo)];
    let export = Exported::start(p(&image), &args).unwrap();
    qemu_io(
        &export.url,
        &[
            "write -P 0x42 2M 192k",
            "read -P 0x42 2M 192k",
            "read -P 0x5a 4M 1M",
        ],
    );
    let (stopped, log) = export.stop();
    assert!(stopped, "{log}");
    assert_eq!(sha256(&image), before, "the capture never changes");
    let check = run_ok("qemu-img", &["check", p(&redo)]);
    assert!(check.contains("No errors were found"), "{check}");
    // qemu reads the redo log as the capture plus the writes.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x42 2M 192k",
            "-c",
            "read -P 0x77 200M 1M",
            p(&redo),
        ],
    );
    // Exported again with the same log: the writes are there.
    let again = Exported::start(p(&image), &args).unwrap();
    qemu_io(
        &again.url,
        &["read -P 0x42 2M 192k", "write -P 0x43 100M 64k"],
    );
    assert!(again.stop().0);
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x43 100M 64k", p(&redo)],
    );
    assert_eq!(sha256(&image), before);
}

#[test]
fn a_ram_redo_spills_past_its_threshold_reads_back_and_trims_shrink_the_spill_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = capture(dir.path());
    let before = sha256(&image);
    let spill = dir.path().join("spill");
    let redo = format!("ram:1M:{}", p(&spill));
    let export = Exported::start(p(&image), &["--writable", "--redo", &redo]).unwrap();
    // 4 MiB written: 1 MiB stays in memory, 3 MiB spill.
    qemu_io(
        &export.url,
        &[
            "write -P 0x21 16M 4M",
            "read -P 0x21 16M 4M",
            "read -P 0x5a 1M 1M",
        ],
    );
    let spilled = std::fs::metadata(&spill).unwrap().blocks() * 512;
    assert!(spilled >= 3 << 20, "{spilled} bytes in the spill file");
    qemu_io(&export.url, &["discard 16M 4M"]);
    let after = std::fs::metadata(&spill).unwrap().blocks() * 512;
    eprintln!(
        "spill file: {spilled} bytes allocated after 4 MiB written, {after} after trimming it"
    );
    assert!(
        after < spilled / 4,
        "trim punches the spill file: {after} of {spilled}"
    );
    // Trimmed clusters read as the capture again.
    qemu_io(&export.url, &["read -P 0 16M 4M", "read -P 0x5a 1M 8M"]);
    assert!(export.stop().0);
    assert!(!spill.exists(), "the spill file goes with the export");
    assert_eq!(sha256(&image), before);
}

#[test]
fn a_listening_clients_disk_is_served_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let data: Vec<u8> = (0..(32u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&disk, &data).unwrap();
    let key = dir.path().join("server.key");
    let (ok, _, err) = diskferry(&["keygen".as_ref(), key.as_os_str()]);
    assert!(ok, "{err}");
    let client = Client::start(&key, &["--disk", p(&disk)]).unwrap();
    let export = Exported::start(
        &client.source(&disk),
        &["--key-file", p(&key), "--name", "remote"],
    )
    .unwrap();
    assert!(export.url.ends_with("/remote"), "{}", export.url);
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &export.url, p(&disk)],
    );
    let copy = dir.path().join("copy.raw");
    run_ok("nbdcopy", &[&export.url, p(&copy)]);
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    assert!(export.stop().0);
}

/// `diskferry vm-config` for `disk`, as `virt-xml-validate` judges it; returns the XML.
fn validated_domain(dir: &Path, disk: &Path, extra: &[&str]) -> String {
    let mut args = vec!["vm-config", p(disk), "--output", "libvirt"];
    args.extend(extra);
    let os: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    let (ok, xml, err) = diskferry(&os);
    assert!(ok, "{err}");
    let file = dir.join("domain.xml");
    std::fs::write(&file, &xml).unwrap();
    run_ok("virt-xml-validate", &[p(&file), "domain"]);
    xml
}

#[test]
fn vm_definitions_pass_libvirts_schema_with_the_firmware_the_disk_needs() {
    let dir = tempfile::tempdir().unwrap();
    let uefi = dir.path().join("uefi.raw");
    std::fs::File::create(&uefi)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run_ok(
        "sgdisk",
        &[
            "-n",
            "1:2048:+32M",
            "-t",
            "1:ef00",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
            p(&uefi),
        ],
    );
    let bios = dir.path().join("bios.raw");
    std::fs::File::create(&bios)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sfdisk = std::process::Command::new("sfdisk")
        .arg(&bios)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"label: dos\nstart=2048, type=83, bootable\n")?;
            c.wait()
        })
        .unwrap();
    assert!(sfdisk.success());

    let xml = validated_domain(
        dir.path(),
        &uefi,
        &["--mac", "52-54-00-AA-BB-01", "--mac", "52:54:00:aa:bb:02"],
    );
    assert!(xml.contains("<os firmware='efi'>"), "{xml}");
    assert_eq!(
        xml.matches("<interface type='network'>").count(),
        2,
        "{xml}"
    );
    assert!(xml.contains("<mac address='52:54:00:aa:bb:01'/>"), "{xml}");
    assert!(
        xml.contains("<source file='") && xml.contains("<readonly/>"),
        "{xml}"
    );

    let xml = validated_domain(
        dir.path(),
        &bios,
        &[
            "--nbd",
            "nbd://127.0.0.1:10809/bios.raw",
            "--memory",
            "4096",
        ],
    );
    assert!(!xml.contains("firmware='efi'"), "{xml}");
    assert!(
        xml.contains("<source protocol='nbd' name='bios.raw'>"),
        "{xml}"
    );
    assert!(xml.contains("<memory unit='MiB'>4096</memory>"), "{xml}");

    let (ok, _, err) = diskferry(&[
        "vm-config".as_ref(),
        bios.as_os_str(),
        "--mac".as_ref(),
        "01:00:5e:00:00:01".as_ref(),
    ]);
    assert!(!ok && err.contains("unicast"), "{err}");
    let (ok, qemu, err) = diskferry(&[
        "vm-config".as_ref(),
        uefi.as_os_str(),
        "--output".as_ref(),
        "qemu".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(
        qemu.starts_with("qemu-system-x86_64 ")
            && qemu.contains("-bios")
            && qemu.contains("-snapshot"),
        "{qemu}"
    );
}

#[test]
fn the_server_exports_its_captures_and_its_ui_says_how_to_run_them() {
    let data = tempfile::tempdir().unwrap();
    let caps = data.path().join("captures");
    std::fs::create_dir_all(&caps).unwrap();
    let image = capture(&caps);
    // An overlay whose backing file lies outside the captures is never opened for a client.
    let outside = data.path().join("outside.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p(&outside), "256M"],
    );
    let sneaky = caps.join("sneaky.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            p(&outside),
            p(&sneaky),
        ],
    );
    let server = Server::start(data.path()).unwrap();
    let nbd = server
        .nbd_addr
        .clone()
        .expect("the server logs its NBD address");
    let list = server.get("/api/captures").json();
    let id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "capture.qcow2")
        .map(|c| c["id"].as_i64().unwrap())
        .expect("the capture is catalogued");

    let url = format!("nbd://{nbd}/capture.qcow2");
    run_ok("qemu-img", &["compare", "-F", "qcow2", &url, p(&image)]);
    let listed = run_ok("nbdinfo", &["--list", &format!("nbd://{nbd}")]);
    assert!(listed.contains("capture.qcow2"), "{listed}");
    let info = run_ok("nbdinfo", &[&url]);
    assert!(info.contains("is_read_only: true"), "{info}");
    let refused = std::process::Command::new("nbdinfo")
        .arg(format!("nbd://{nbd}/sneaky.qcow2"))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "an overlay on a file outside the captures is not served"
    );
    let refused = std::process::Command::new("nbdinfo")
        .arg(format!("nbd://{nbd}/../outside.qcow2"))
        .output()
        .unwrap();
    assert!(!refused.status.success());

    let vm = server.get(&format!("/api/captures/{id}/vm"));
    assert_eq!(vm.status, 200, "{}", vm.text());
    let vm = vm.json();
    assert_eq!(vm["nbd_url"], url.as_str());
    assert!(vm["qemu"].as_str().unwrap().contains(&url), "{vm}");
    let xml = dir_file(
        data.path(),
        "domain.xml",
        vm["libvirt_xml"].as_str().unwrap(),
    );
    run_ok("virt-xml-validate", &[p(&xml), "domain"]);
    let page = server.get(&format!("/captures/{id}")).text();
    assert!(page.contains("Run it") && page.contains(&url), "{page}");
}

fn dir_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// What `nbdcopy` copies of `url` into `dir/name`: the partition table checked by `sgdisk -v`,
/// the first partition's ext4 checked by `e2fsck -fn`, mounted read-only by the kernel and
/// compared with `tree` by `rsync -n -aHAXc` (content, owners, modes, hard links, ACLs,
/// xattrs): nothing may differ.
fn assert_skeleton_holds(url: &str, dir: &Path, name: &str, tree: &Path) {
    let raw = dir.join(format!("{name}.raw"));
    run_ok("nbdcopy", &[url, p(&raw)]);
    let verify = run_ok("sgdisk", &["-v", p(&raw)]);
    assert!(verify.contains("No problems found"), "{verify}");
    let fs = diskferry_e2e::fixtures::extract(
        &raw,
        1 << 20,
        std::fs::metadata(&raw).unwrap().len() - (2 << 20),
        &dir.join(format!("{name}.ext4")),
    );
    let fsck = run_ok("e2fsck", &["-fn", p(&fs)]);
    assert!(
        !fsck.contains("UNEXPECTED") && !fsck.contains("Fix?"),
        "{fsck}"
    );
    let mnt = dir.join(format!("{name}.mnt"));
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok("mount", &["-o", "loop,ro", p(&fs), p(&mnt)]);
    let diff = std::process::Command::new("rsync")
        .args([
            "-n",
            "-aHAXc",
            "--itemize-changes",
            &format!("{}/", p(tree)),
            &format!("{}/", p(&mnt)),
        ])
        .output()
        .unwrap();
    run_ok("umount", &[p(&mnt)]);
    let listed = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff.status.success() && listed.trim().is_empty(),
        "the skeleton differs from the tree:\n{listed}"
    );
}

#[test]
fn a_skeleton_of_a_directory_is_an_ext4_the_kernel_mounts_with_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    let tree = diskferry_e2e::fixtures::linux_tree(dir.path());
    let export = Exported::start_with(&["--files", p(&tree), "--name", "tree"]).unwrap();
    assert_skeleton_holds(&export.url, dir.path(), "dir", &tree);
    let (stopped, log) = export.stop();
    assert!(stopped && log.contains("skeleton of"), "{log}");
    assert!(log.contains("ready in"), "{log}");
}

#[test]
fn a_skeleton_of_a_captures_partition_reads_its_files_and_takes_writes_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let tree = diskferry_e2e::fixtures::linux_tree(dir.path());
    let disk = dir.path().join("capture.raw");
    let offsets = diskferry_e2e::fixtures::gpt_disk(&disk, 72, &[(64, "8300", "root")]);
    let fs = dir.path().join("root.ext4");
    diskferry_e2e::fixtures::ext4_image(&tree, &fs, 64, "root");
    diskferry_e2e::fixtures::place(&disk, offsets[0], &fs);
    let before = sha256(&disk);
    let files = format!("{}:1", p(&disk));
    let export =
        Exported::start_with(&["--files", &files, "--writable", "--redo", "ram:64M"]).unwrap();
    assert_skeleton_holds(&export.url, dir.path(), "part", &tree);
    qemu_io(&export.url, &["write -P 0x61 0 1M", "read -P 0x61 0 1M"]);
    assert!(export.stop().0);
    assert_eq!(sha256(&disk), before, "the capture's files are only read");
    let (ok, _, err) = diskferry(&[
        "export".as_ref(),
        "--files".as_ref(),
        tree.as_os_str(),
        "--writable".as_ref(),
    ]);
    assert!(!ok && err.contains("--redo ram"), "{err}");
}

/// The files of the FAT volume at `offset` (`len` bytes) of `raw`, copied out by mtools into
/// `to`, after `fsck.fat -n` found nothing to say; and its `blkid` identity (type, version,
/// serial, label).
fn fat_files(raw: &Path, offset: u64, len: u64, to: &Path) -> String {
    let vol = diskferry_e2e::fixtures::extract(raw, offset, len, &to.with_extension("fat"));
    let fsck = run_ok("fsck.fat", &["-n", p(&vol)]);
    assert!(!fsck.contains("differ") && !fsck.contains("?"), "{fsck}");
    std::fs::create_dir_all(to).unwrap();
    let copied = std::process::Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-n", "-i", p(&vol), "::/*", p(to)])
        .output()
        .unwrap();
    assert!(copied.status.success(), "{copied:?}");
    let id = run_ok("blkid", &["-p", "-o", "export", p(&vol)]);
    id.lines()
        .filter(|l| {
            ["TYPE=", "VERSION=", "UUID=", "LABEL="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The file count a skeleton export's log reports (`skeleton of X: N files, ...`).
fn skeleton_files(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.starts_with("skeleton of "))
        .unwrap_or_else(|| panic!("no skeleton line in {log}"));
    let (_, rest) = line.split_once(": ").unwrap();
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn skeletons_of_an_esp_are_fat_volumes_with_the_same_files_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("uefi.raw");
    let offsets =
        diskferry_e2e::fixtures::gpt_disk(&disk, 120, &[(40, "ef00", "EFI"), (64, "8300", "root")]);
    let esp = d.join("esp.img");
    diskferry_e2e::fixtures::fat_image(&esp, 32, 40, "ESP");
    diskferry_e2e::fixtures::place(&disk, offsets[0], &esp);
    let tree = diskferry_e2e::fixtures::linux_tree(d);
    let root = d.join("root.ext4");
    diskferry_e2e::fixtures::ext4_image(&tree, &root, 64, "root");
    diskferry_e2e::fixtures::place(&disk, offsets[1], &root);
    let before = sha256(&disk);
    let original = fat_files(&esp, 0, 40 << 20, &d.join("original"));

    // The ESP alone: a GPT whose one partition is an EFI System Partition.
    let export = Exported::start_with(&["--files", &format!("{}:1", p(&disk))]).unwrap();
    let raw = d.join("esp-skeleton.raw");
    run_ok("nbdcopy", &[&export.url, p(&raw)]);
    let (stopped, log) = export.stop();
    assert!(stopped);
    let esp_files = skeleton_files(&log);
    assert_eq!(esp_files, 5, "{log}");
    let verify = run_ok("sgdisk", &["-v", "-i", "1", p(&raw)]);
    assert!(
        verify.contains("No problems found") && verify.contains("EFI system partition"),
        "{verify}"
    );
    let alone = fat_files(&raw, 1 << 20, 40 << 20, &d.join("alone"));
    assert_eq!(alone, original, "the same FAT type, serial and label");
    run_ok("diff", &["-r", p(&d.join("original")), p(&d.join("alone"))]);

    // The whole disk: the ESP is a skeleton too, in its place.
    let export = Exported::start_with(&["--files", p(&disk)]).unwrap();
    let raw = d.join("disk-skeleton.raw");
    run_ok("nbdcopy", &[&export.url, p(&raw)]);
    let (_, log) = export.stop();
    let root = Exported::start_with(&["--files", &format!("{}:2", p(&disk))]).unwrap();
    let (_, root_log) = root.stop();
    assert_eq!(
        skeleton_files(&log),
        esp_files + skeleton_files(&root_log),
        "both partitions are skeletons: {log}"
    );
    let whole = fat_files(&raw, offsets[0], 40 << 20, &d.join("whole"));
    assert_eq!(whole, original);
    run_ok("diff", &["-r", p(&d.join("original")), p(&d.join("whole"))]);
    assert_eq!(sha256(&disk), before, "the capture is only read");
}

#[test]
fn the_server_can_export_on_a_unix_socket_only_its_user_may_open() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let caps = data.path().join("captures");
    std::fs::create_dir_all(&caps).unwrap();
    let image = capture(&caps);
    let socket = data.path().join("nbd.sock");
    let listen = format!("unix:{}", p(&socket));
    let server = Server::start_with(data.path(), &["--nbd-listen", &listen]).unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let url = format!("nbd+unix:///capture.qcow2?socket={}", p(&socket));
    run_ok("qemu-img", &["compare", "-F", "qcow2", &url, p(&image)]);
    let list = server.get("/api/captures").json();
    let id = list.as_array().unwrap()[0]["id"].as_i64().unwrap();
    let vm = server.get(&format!("/api/captures/{id}/vm")).json();
    assert_eq!(vm["nbd_url"], url.as_str());
    let xml = vm["libvirt_xml"].as_str().unwrap();
    assert!(xml.contains("transport='unix'"), "{xml}");
    let file = dir_file(data.path(), "domain.xml", xml);
    run_ok("virt-xml-validate", &[p(&file), "domain"]);
}
