//! `get` against a hostile ext4 image: names made by editing directory blocks hold `/` and
//! `../..`, and a directory entry reuses the name of a symlink to a directory outside DEST.
//! Nothing may land outside DEST, nothing may be written through the link, the honest files
//! come out intact, and the refusals are reported (exit status non-zero).

use std::path::Path;

use diskferry_e2e::fixtures::{gpt_disk, place};
use diskferry_e2e::http::Server;
use diskferry_e2e::{diskferry, sh};

/// Replaces every occurrence of `from` in the file by `to` (same length); returns how many.
fn patch(image: &Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(image).unwrap();
    let mut n = 0;
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(from.len()).position(|w| w == from) {
        bytes[i + at..i + at + to.len()].copy_from_slice(to);
        n += 1;
        i += at + to.len();
    }
    std::fs::write(image, bytes).unwrap();
    n
}

/// The hostile ext4 volume; `outside` is where its link points.
fn hostile_ext4(d: &Path, outside: &Path) -> std::path::PathBuf {
    let tree = d.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("honest.txt"), b"honest\n").unwrap();
    std::fs::write(tree.join("aXXb"), b"slash\n").unwrap();
    std::fs::write(tree.join("sub/QQ_QQ_escaped"), b"escape\n").unwrap();
    std::os::unix::fs::symlink(outside, tree.join("zlink")).unwrap();
    std::fs::create_dir(tree.join("zlinj")).unwrap();
    std::fs::write(tree.join("zlinj/pwned"), b"through the link\n").unwrap();
    let image = d.join("hostile.ext4");
    sh(&format!(
        "truncate -s 16M {img} && mkfs.ext4 -q -O ^metadata_csum,^dir_index -d {tree} {img}",
        img = image.display(),
        tree = tree.display()
    ));
    // Names no honest filesystem has: "a/b", "../../escaped", and a second "zlink".
    assert_eq!(patch(&image, b"aXXb", b"a//b"), 1);
    assert_eq!(patch(&image, b"QQ_QQ_escaped", b"../../escaped"), 1);
    assert_eq!(patch(&image, b"zlinj", b"zlink"), 1);
    image
}

#[test]
fn hostile_names_and_links_never_write_outside_dest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let outside = d.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let image = hostile_ext4(d, &outside);
    let dest = d.join("dest");
    let (ok, _, err) = diskferry(&[
        "get".as_ref(),
        image.as_os_str(),
        "/".as_ref(),
        dest.as_os_str(),
    ]);
    assert!(!ok, "the refusals are reported: {err}");
    assert!(err.contains("refused the name"), "{err}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert!(!d.join("escaped").exists() && !dir.path().parent().unwrap().join("escaped").exists());
    assert!(
        !dest.join("a").exists(),
        "no directory made from a name with '/'"
    );
    assert_eq!(std::fs::read(dest.join("honest.txt")).unwrap(), b"honest\n");
    // One of the two "zlink" entries came out (whichever came first), the other was refused
    // instead of being written over or through it.
    assert!(std::fs::symlink_metadata(dest.join("zlink")).is_ok());
    assert!(err.contains("zlink"), "{err}");
}

#[test]
fn a_tar_download_leaves_hostile_names_out() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let image = hostile_ext4(work.path(), &work.path().join("outside"));
    let disk = data.path().join("captures/hostile.img");
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    let offsets = gpt_disk(&disk, 24, &[(16, "8300", "root")]);
    place(&disk, offsets[0], &image);
    let s = Server::start(data.path()).unwrap();
    let id = s.get("/api/captures").json()[0]["id"].as_i64().unwrap();
    let r = s.get(&format!("/api/captures/{id}/partitions/1/tar?path=/"));
    assert_eq!(r.status, 200, "{}", r.text());
    let tar = work.path().join("out.tar");
    std::fs::write(&tar, &r.body).unwrap();
    // GNU tar, nobody's code here, lists what the archive holds.
    let listing = diskferry_e2e::run_ok("tar", &["-tvf", tar.to_str().unwrap()]);
    assert!(listing.contains("honest.txt"), "{listing}");
    assert!(!listing.contains(".."), "no entry climbs: {listing}");
    assert!(
        !listing.contains("a/b"),
        "no name with '/' becomes a path: {listing}"
    );
}
