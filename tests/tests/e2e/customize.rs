//! Customization (`diskferry customize`, `deploy --customize`): a Linux root recreated with a
//! SPEC's edits, judged by e2fsck, debugfs and ssh-keygen; two deploys of one image get their
//! own host name, machine-id and host keys; the image never changes; a bad SPEC writes
//! nothing.

use std::path::{Path, PathBuf};

use diskferry_e2e::debian::debugfs;
use diskferry_e2e::{diskferry, fixtures, run_ok};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A GPT disk with one ext4 root holding the fixture tree plus the accounts, hosts and SSH
/// host keys of a Debian system.
pub(crate) fn linux_disk(dir: &Path) -> PathBuf {
    let tree = fixtures::linux_tree(dir);
    std::fs::create_dir_all(tree.join("etc/ssh")).unwrap();
    for (path, text) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
        ("etc/group", "root:x:0:\nshadow:x:42:\nsudo:x:27:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n127.0.1.1\tfixture-host\n",
        ),
        ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
        ("etc/ssh/ssh_host_ed25519_key", "the capture's key\n"),
    ] {
        std::fs::write(tree.join(path), text).unwrap();
    }
    let fs = dir.join("root.ext4");
    fixtures::ext4_image(&tree, &fs, 64, "root");
    let disk = dir.join("golden.raw");
    let offsets = fixtures::gpt_disk(&disk, 72, &[(64, "8300", "root")]);
    fixtures::place(&disk, offsets[0], &fs);
    disk
}

fn spec(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const SPEC: &str = r#"
hostname = "{name}"
machine_id = "new"
ssh_host_keys = "regenerate"
first_boot = ["echo first boot of {name} > /var/log/diskferry-first-boot"]
[[users]]
name = "alice"
password_hash = "$6$salt$Zx"
authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"]
groups = ["sudo"]
[[files]]
path = "/etc/motd"
content = "this is {name}\n"
mode = "0640"
"#;

/// The root filesystem of a deployed or customized raw disk, cut out for the checkers.
pub(crate) fn root_of(raw: &Path, dir: &Path, name: &str) -> PathBuf {
    fixtures::extract(raw, 1 << 20, 64 << 20, &dir.join(format!("{name}.ext4")))
}

pub(crate) fn cat(fs: &Path, path: &str) -> String {
    debugfs(fs, &format!("cat {path}"))
}

/// e2fsck finds nothing; the edits are there, with the right owners and modes; the host keys
/// are real OpenSSH keys whose public halves match. Returns (machine-id, ed25519 public key).
fn check_customized(fs: &Path, dir: &Path, name: &str) -> (String, String) {
    let fsck = run_ok("e2fsck", &["-fn", p(fs)]);
    assert!(
        !fsck.contains("UNEXPECTED") && !fsck.contains("Fix?"),
        "{fsck}"
    );
    assert_eq!(cat(fs, "/etc/hostname"), format!("{name}\n"));
    assert_eq!(cat(fs, "/etc/hostname.diskferry-orig"), "fixture-host\n");
    assert!(cat(fs, "/etc/hosts").contains(&format!("127.0.1.1\t{name}")));
    assert_eq!(cat(fs, "/etc/motd"), format!("this is {name}\n"));
    assert!(cat(fs, "/etc/passwd").contains("alice:x:1000:1000::/home/alice:/bin/"));
    assert!(cat(fs, "/etc/group").contains("sudo:x:27:alice"));
    let stat = debugfs(fs, "stat /home/alice/.ssh/authorized_keys");
    assert!(
        stat.contains("Mode:  0600") && stat.contains("User:  1000"),
        "{stat}"
    );
    let stat = debugfs(fs, "stat /etc/motd");
    assert!(stat.contains("Mode:  0640"), "{stat}");
    assert!(
        cat(fs, "/usr/local/sbin/diskferry-first-boot").contains(&format!("first boot of {name}"))
    );
    let wants = debugfs(fs, "ls -l /etc/systemd/system/multi-user.target.wants");
    assert!(wants.contains("diskferry-first-boot.service"), "{wants}");
    let keys = dir.join(format!("{name}-keys"));
    std::fs::create_dir_all(&keys).unwrap();
    let mut ed25519 = String::new();
    for kind in ["ed25519", "rsa", "ecdsa"] {
        let file = format!("/etc/ssh/ssh_host_{kind}_key");
        let stat = debugfs(fs, &format!("stat {file}"));
        assert!(
            stat.contains("Mode:  0600") && stat.contains("User:     0"),
            "{stat}"
        );
        let private = keys.join(kind);
        std::fs::write(&private, cat(fs, &file)).unwrap();
        std::fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let derived = run_ok("ssh-keygen", &["-y", "-f", p(&private)]);
        let public = cat(fs, &format!("{file}.pub"));
        assert_eq!(
            derived.split_whitespace().take(2).collect::<Vec<_>>(),
            public.split_whitespace().take(2).collect::<Vec<_>>(),
            "{kind}: the public key is the private key's"
        );
        if kind == "ed25519" {
            ed25519 = public;
        }
    }
    let id = cat(fs, "/etc/machine-id");
    assert!(
        id.len() == 33 && id != "0123456789abcdef0123456789abcdef\n",
        "{id}"
    );
    (id, ed25519)
}

#[test]
fn customize_and_deploy_give_each_machine_its_own_identity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let golden = linux_disk(d);
    let before = std::fs::read(&golden).unwrap();
    let spec = spec(d, "spec.toml", SPEC);

    // An image factory: a customized image of the golden one.
    let out = d.join("web-07.qcow2");
    let (ok, _, err) = diskferry(&[
        "customize".as_ref(),
        golden.as_os_str(),
        out.as_os_str(),
        "--customize".as_ref(),
        spec.as_os_str(),
        "--machine-name".as_ref(),
        "web-07".as_ref(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("hostname: fixture-host → web-07") && err.contains("verified"),
        "{err}"
    );
    run_ok("qemu-img", &["check", p(&out)]);
    let raw = d.join("web-07.raw");
    run_ok("qemu-img", &["convert", "-O", "raw", p(&out), p(&raw)]);
    let first = check_customized(&root_of(&raw, d, "web-07"), d, "web-07");

    // A deploy onto a used disk with another name: its own machine-id and host keys.
    let target = d.join("target.raw");
    std::fs::write(&target, vec![0x5a; 72 << 20]).unwrap();
    let (ok, _, err) = diskferry(&[
        "deploy".as_ref(),
        golden.as_os_str(),
        target.as_os_str(),
        "--customize".as_ref(),
        spec.as_os_str(),
        "--machine-name".as_ref(),
        "web-08".as_ref(),
        "--progress".as_ref(),
        "none".as_ref(),
    ]);
    assert!(ok, "{err}");
    let second = check_customized(&root_of(&target, d, "web-08"), d, "web-08");
    assert_ne!(first.0, second.0, "each machine has its own machine-id");
    assert_ne!(first.1, second.1, "each machine has its own host keys");
    assert_eq!(
        std::fs::read(&golden).unwrap(),
        before,
        "the golden image is only read"
    );
}

#[test]
fn a_bad_spec_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let golden = linux_disk(d);
    let target = d.join("target.raw");
    std::fs::write(&target, vec![0x5a; 72 << 20]).unwrap();
    for (text, key) in [
        ("hostnme = \"x\"", "hostnme"),
        (
            "[[users]]\nname = \"alice\"\npassword_hash = \"secret\"",
            "users[0].password_hash",
        ),
        ("hostname = \"{name}\"", "hostname: uses {name}"),
        // Valid, but not for this system: found before the target is touched.
        (
            "[[users]]\nname = \"bob\"\ngroups = [\"wheel\"]",
            "the system has no group wheel",
        ),
    ] {
        let spec = spec(d, "bad.toml", text);
        let (ok, _, err) = diskferry(&[
            "deploy".as_ref(),
            golden.as_os_str(),
            target.as_os_str(),
            "--customize".as_ref(),
            spec.as_os_str(),
            "--progress".as_ref(),
            "none".as_ref(),
        ]);
        assert!(!ok && err.contains(key), "{text}: {err}");
    }
    assert!(
        std::fs::read(&target).unwrap().iter().all(|b| *b == 0x5a),
        "nothing was written"
    );
    let out = d.join("never.qcow2");
    let spec = spec(d, "ok.toml", "hostname = \"x\"");
    let (ok, _, err) = diskferry(&[
        "customize".as_ref(),
        golden.as_os_str(),
        out.as_os_str(),
        "--customize".as_ref(),
        spec.as_os_str(),
        "--mode".as_ref(),
        "blocks".as_ref(),
    ]);
    assert!(!ok && !out.exists(), "{err}");
}

#[test]
fn an_exported_image_is_served_customized_as_its_skeleton() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let golden = linux_disk(d);
    let before = std::fs::read(&golden).unwrap();
    let spec = spec(
        d,
        "spec.toml",
        "hostname = \"{name}\"\nmachine_id = \"new\"\n",
    );
    let export = diskferry_e2e::nbd::Exported::start(
        p(&golden),
        &["--customize", p(&spec), "--machine-name", "web-10"],
    )
    .unwrap();
    let raw = d.join("served.raw");
    run_ok("nbdcopy", &[&export.url, p(&raw)]);
    let (stopped, log) = export.stop();
    assert!(
        stopped && log.contains("customized: hostname: fixture-host → web-10"),
        "{log}"
    );
    let root = root_of(&raw, d, "served");
    let fsck = run_ok("e2fsck", &["-fn", p(&root)]);
    assert!(
        !fsck.contains("UNEXPECTED") && !fsck.contains("Fix?"),
        "{fsck}"
    );
    assert_eq!(cat(&root, "/etc/hostname"), "web-10\n");
    assert_eq!(cat(&root, "/etc/hostname.diskferry-orig"), "fixture-host\n");
    assert_ne!(
        cat(&root, "/etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n"
    );
    assert_eq!(
        std::fs::read(&golden).unwrap(),
        before,
        "the image is only read"
    );
}
