//! `get` against a hostile ext4 image: names made by editing directory blocks hold `/` and
//! `../..`, and a directory entry reuses the name of a symlink to a directory outside DEST.
//! Nothing may land outside DEST, nothing may be written through the link, the honest files
//! come out intact, and the refusals are reported (exit status non-zero).

use std::path::Path;

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

#[test]
fn hostile_names_and_links_never_write_outside_dest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let outside = d.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let tree = d.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("honest.txt"), b"honest\n").unwrap();
    std::fs::write(tree.join("aXXb"), b"slash\n").unwrap();
    std::fs::write(tree.join("sub/QQ_QQ_escaped"), b"escape\n").unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("zlink")).unwrap();
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
