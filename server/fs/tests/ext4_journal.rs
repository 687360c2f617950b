//! Journal replay in memory, judged by e2fsck: volumes made by `mke2fs` and filled by
//! `debugfs -w`, left with committed but unreplayed transactions by debugfs's own journal
//! commands (`jo`, `jw`, `jc`: the blocks a later state of the volume changed, logged as
//! transactions), are opened by our reader and compared with what `e2fsck -fy -E
//! journal_only` makes of a copy, dumped by `debugfs rdump`: names, kinds, sizes, modes,
//! mtimes, contents and symlink targets — and block for block through
//! `Filesystem::device()`. ext3 and ext4, 1 KiB and 4 KiB blocks, 32- and 64-bit journals,
//! no checksums and csum v2/v3, several transactions, a revoke, a damaged commit block, a
//! fast-commit volume, an external journal and absurd journal superblocks.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::{run_status, run_tool as run};
use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_fs::ext4::{Ext4, JournalError, JournalView, LogEnd};
use diskferry_fs::{FileKind, Filesystem};

/// One entry as both sides can tell it: kind, permission bits, mtime, size and contents
/// (files) or target (symlinks).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: char,
    mode: u32,
    mtime: i64,
    size: u64,
    data: Vec<u8>,
}

type Tree = BTreeMap<String, Seen>;

struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        Work {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `mke2fs -q -F ARGS` on a new image of `mib` MiB.
    fn mkfs(&self, name: &str, args: &[&str], mib: u64) -> PathBuf {
        let img = self.path(name);
        let size = format!("{mib}M");
        let mut all = vec!["-q", "-F"];
        all.extend_from_slice(args);
        all.extend([img.to_str().unwrap(), size.as_str()]);
        run("mke2fs", &all);
        img
    }

    /// Runs a `debugfs -w` script on `img`; a line debugfs complains with fails the test.
    fn debugfs(&self, img: &Path, script: &str) {
        let file = self.path("script");
        std::fs::write(&file, script).unwrap();
        let text = run(
            "debugfs",
            &["-w", "-f", file.to_str().unwrap(), img.to_str().unwrap()],
        );
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("debugfs") && !l.starts_with("Setting csum"))
            .filter(|l| !l.starts_with("Allocated inode") && !l.trim().is_empty())
            .collect();
        assert!(bad.is_empty(), "debugfs {script}:\n{text}");
    }

    /// A file in the work directory holding `data`, for `debugfs write`.
    fn file(&self, name: &str, data: &[u8]) -> String {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn copy(&self, from: &Path, name: &str) -> PathBuf {
        let to = self.path(name);
        std::fs::copy(from, &to).unwrap();
        to
    }

    /// A copy of `base` whose journal holds, unreplayed, one transaction per later state:
    /// the blocks in which each state differs from the one before.
    fn journaled(&self, base: &Path, states: &[&Path], open: &str, bs: usize) -> PathBuf {
        let img = self.copy(base, "journaled.img");
        let mut script = format!("jo {open}\n");
        let mut prev = std::fs::read(base).unwrap();
        for (i, state) in states.iter().enumerate() {
            let next = std::fs::read(state).unwrap();
            let blocks: Vec<usize> = (0..next.len() / bs)
                .filter(|b| prev[b * bs..(b + 1) * bs] != next[b * bs..(b + 1) * bs])
                .collect();
            let data: Vec<u8> = blocks
                .iter()
                .flat_map(|b| next[b * bs..(b + 1) * bs].to_vec())
                .collect();
            let list: Vec<String> = blocks.iter().map(|b| b.to_string()).collect();
            let file = self.file(&format!("tx{i}"), &data);
            script += &format!("jw -b {} {file}\n", list.join(","));
            prev = next;
        }
        script += "jc\n";
        self.debugfs(&img, &script);
        img
    }

    /// What e2fsck's journal replay makes of `img` (on a copy), and what it said. It may
    /// report a damaged journal (exit code 1, "errors corrected") but nothing worse.
    fn e2fsck_replayed(&self, img: &Path) -> (PathBuf, String) {
        let copy = self.copy(img, "e2fsck.img");
        let args = ["-fy", "-E", "journal_only", copy.to_str().unwrap()];
        let (code, text) = run_status("e2fsck", &args);
        assert!(code <= 1, "e2fsck {args:?} exited with {code}:\n{text}");
        (copy, text)
    }

    /// The tree `debugfs rdump` extracts from `img` (debugfs does not replay journals).
    fn rdump(&self, img: &Path) -> Tree {
        let out = tempfile::tempdir_in(self.dir.path()).unwrap();
        let cmd = format!("rdump / {}", out.path().display());
        run("debugfs", &["-R", &cmd, img.to_str().unwrap()]);
        let mut tree = Tree::new();
        host_tree(out.path(), "", &mut tree);
        tree
    }
}

fn host_tree(dir: &Path, prefix: &str, tree: &mut Tree) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = format!("{prefix}{}", e.file_name().to_string_lossy());
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        let (kind, size, data) = if meta.is_dir() {
            host_tree(&e.path(), &format!("{path}/"), tree);
            ('d', 0, Vec::new())
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(e.path()).unwrap();
            (
                'l',
                meta.len(),
                target.into_os_string().into_encoded_bytes(),
            )
        } else {
            ('-', meta.len(), std::fs::read(e.path()).unwrap())
        };
        let mode = meta.permissions().mode() & 0o7777;
        // rdump sets no time on the symlinks it makes.
        let mtime = if kind == 'l' { 0 } else { meta.mtime() };
        tree.insert(
            path,
            Seen {
                kind,
                mode,
                mtime,
                size,
                data,
            },
        );
    }
}

/// The tree our reader sees.
fn our_tree(fs: &dyn Filesystem) -> Tree {
    let mut tree = Tree::new();
    diskferry_fs::tree::walk(
        fs,
        fs.root(),
        &mut |path, e| {
            let m = fs.metadata(e.node)?;
            let (kind, size, data) = match m.kind {
                FileKind::Dir => ('d', 0, Vec::new()),
                FileKind::Symlink => ('l', m.size, fs.read_link(e.node)?),
                _ => ('-', m.size, fs.read_all(e.node, 1 << 30)?),
            };
            let mtime = if kind == 'l' {
                0
            } else {
                m.mtime.unwrap().secs
            };
            let mode = m.mode;
            tree.insert(
                path.to_string(),
                Seen {
                    kind,
                    mode,
                    mtime,
                    size,
                    data,
                },
            );
            Ok(())
        },
        &mut |path, e| panic!("{path}: {e}"),
    )
    .unwrap();
    tree
}

/// The entries in which two trees differ, shortly: (path, ours, theirs) without contents.
fn differences(a: &Tree, b: &Tree) -> Vec<String> {
    let short = |s: Option<&Seen>| {
        s.map(|s| {
            format!(
                "{} {:o} {} {}B crc {:08x}",
                s.kind,
                s.mode,
                s.mtime,
                s.size,
                crc32c::crc32c(&s.data)
            )
        })
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {:?} vs {:?}", short(a.get(k)), short(b.get(k))))
        .collect()
}

fn assert_same(a: &Tree, b: &Tree, what: &str) {
    let d = differences(a, b);
    assert!(d.is_empty(), "{what}:\n{}", d.join("\n"));
}

fn open(img: &Path) -> Ext4 {
    let dev = Arc::new(MemoryDevice::read_only(std::fs::read(img).unwrap()));
    Ext4::open(dev as Arc<dyn BlockDevice>).unwrap()
}

/// The volume block holding block `n` of inode `ino`, by debugfs.
fn bmap(img: &Path, ino: u32, n: u64) -> u64 {
    let text = run(
        "debugfs",
        &["-R", &format!("bmap <{ino}> {n}"), img.to_str().unwrap()],
    );
    text.lines()
        .filter_map(|l| l.trim().parse().ok())
        .next()
        .unwrap_or_else(|| panic!("bmap: {text}"))
}

/// Our replayed view of `img` has e2fsck's tree: the same as debugfs dumps from e2fsck's
/// replay, not the stale one debugfs dumps from `img` itself. Returns the view and what
/// e2fsck said.
fn assert_tree_as_e2fsck(work: &Work, img: &Path) -> (Ext4, String) {
    let fs = open(img);
    let (replayed, said) = work.e2fsck_replayed(img);
    let want = work.rdump(&replayed);
    let got = our_tree(&fs);
    assert_same(&got, &want, "the replayed view is e2fsck's");
    assert_ne!(got, work.rdump(img), "the stale view differs");
    (fs, said)
}

/// Our replayed view of `img` is e2fsck's: the same tree, and the same bytes through
/// `device()` except the two superblocks (which e2fsck also stamps). Returns the view.
fn assert_replays_as_e2fsck(work: &Work, img: &Path, bs: u64) -> Ext4 {
    let (fs, _) = assert_tree_as_e2fsck(work, img);
    let e2fsck = std::fs::read(work.path("e2fsck.img")).unwrap();
    let mut ours = vec![0u8; e2fsck.len()];
    fs.device().unwrap().read_at(&mut ours, 0).unwrap();
    let journal_sb = bmap(img, 8, 0);
    let differ: Vec<u64> = (0..e2fsck.len() as u64 / bs)
        .filter(|&b| {
            let r = (b * bs) as usize..((b + 1) * bs) as usize;
            ours[r.clone()] != e2fsck[r]
        })
        .filter(|&b| b != 1024 / bs && b != journal_sb)
        .collect();
    assert!(
        differ.is_empty(),
        "blocks unlike e2fsck's replay: {differ:?}"
    );
    // A block copy of the replayed view is a volume with an empty journal, as clean as
    // e2fsck's replay leaves it.
    let copy = work.path("blocks-copy.img");
    std::fs::write(&copy, &ours).unwrap();
    let theirs = run_status(
        "e2fsck",
        &["-fn", work.path("e2fsck.img").to_str().unwrap()],
    );
    let (code, text) = run_status("e2fsck", &["-fn", copy.to_str().unwrap()]);
    assert!(
        theirs.0 != 0 || code == 0,
        "e2fsck -fn of our block copy:\n{text}"
    );
    fs
}

fn replayed(fs: &Ext4) -> (u64, u64, LogEnd) {
    match fs.journal_view() {
        JournalView::Replayed {
            transactions,
            skipped,
            stop,
            ..
        } => (*transactions, *skipped, *stop),
        other => panic!("not replayed: {other:?}"),
    }
}

/// A base volume with a few files, and `n` later states each changing it further.
fn states(work: &Work, mkfs: &[&str], mib: u64, n: usize) -> (PathBuf, Vec<PathBuf>) {
    let base = work.mkfs("base.img", mkfs, mib);
    let small = work.file("small", b"first contents\n");
    let big = work.file(
        "big",
        &(0..200_000u32)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<_>>(),
    );
    work.debugfs(
        &base,
        &format!(
            "mkdir etc\nwrite {small} etc/hostname\nwrite {big} data\nsymlink link etc/hostname\n"
        ),
    );
    let mut out = Vec::new();
    let mut prev = base.clone();
    for i in 0..n {
        let next = work.copy(&prev, &format!("state{i}.img"));
        let content = work.file(
            &format!("c{i}"),
            format!("state {i}\n").repeat(1000 * (i + 1)).as_bytes(),
        );
        work.debugfs(
            &next,
            &format!(
                "mkdir dir{i}\nwrite {content} dir{i}/file\nrm {}\nset_inode_field etc mode 040750\n",
                ["etc/hostname", "data", "link"][i]
            ),
        );
        out.push(next.clone());
        prev = next;
    }
    (base, out)
}

#[test]
fn ext4_with_metadata_csum_replays_a_csum_v3_transaction_as_e2fsck() {
    let work = Work::new();
    let (base, later) = states(
        &work,
        &["-t", "ext4", "-b", "4096", "-O", "metadata_csum,64bit"],
        32,
        1,
    );
    let img = work.journaled(&base, &[&later[0]], "-c", 4096);
    assert!(run("dumpe2fs", &["-h", img.to_str().unwrap()]).contains("journal_checksum_v3"));
    let fs = assert_replays_as_e2fsck(&work, &img, 4096);
    assert_eq!(replayed(&fs), (1, 0, LogEnd::End));
    assert!(
        fs.view_notes()[0].starts_with("replayed 1 journal transaction ("),
        "{:?}",
        fs.view_notes()
    );
    assert_eq!(fs.rebuild_obstacle(), None);
    // The stale view is still there to see.
    let stale = Ext4::open_unreplayed(Arc::new(MemoryDevice::read_only(
        std::fs::read(&img).unwrap(),
    )))
    .unwrap();
    assert!(stale.lookup("etc/hostname").is_ok());
    assert!(fs.lookup("etc/hostname").is_err());
}

#[test]
fn ext3_on_1k_blocks_replays_several_transactions_without_checksums() {
    let work = Work::new();
    let (base, later) = states(&work, &["-t", "ext3", "-b", "1024"], 16, 3);
    let refs: Vec<&Path> = later.iter().map(|p| p.as_path()).collect();
    let img = work.journaled(&base, &refs, "", 1024);
    let fs = assert_replays_as_e2fsck(&work, &img, 1024);
    assert_eq!(replayed(&fs), (3, 0, LogEnd::End));
    assert_same(&our_tree(&fs), &work.rdump(&later[2]), "the last state");
}

#[test]
fn a_32bit_journal_replays_csum_v2_tags() {
    let work = Work::new();
    let mkfs = ["-t", "ext4", "-b", "4096", "-O", "metadata_csum,^64bit"];
    let (base, later) = states(&work, &mkfs, 32, 2);
    let refs: Vec<&Path> = later.iter().map(|p| p.as_path()).collect();
    let img = work.journaled(&base, &refs, "-c -v 2", 4096);
    let header = run("dumpe2fs", &["-h", img.to_str().unwrap()]);
    let v2 = header.contains("journal_checksum_v2") && !header.contains("journal_64bit");
    assert!(v2, "{header}");
    let fs = assert_replays_as_e2fsck(&work, &img, 4096);
    assert_eq!(replayed(&fs), (2, 0, LogEnd::End));
}

#[test]
fn a_revoked_block_is_not_replayed() {
    let work = Work::new();
    let base = work.mkfs("base.img", &["-t", "ext4", "-b", "4096"], 16);
    let (a, b) = (work.file("a", &[b'a'; 4096]), work.file("b", &[b'b'; 4096]));
    work.debugfs(&base, &format!("write {a} a\nwrite {b} b\n"));
    let (block_a, block_b) = (bmap(&base, 12, 0), bmap(&base, 13, 0));
    let x = work.file("x", &[b'x'; 8192]);
    let img = work.copy(&base, "journaled.img");
    work.debugfs(
        &img,
        &format!("jo -c\njw -b {block_a},{block_b} {x}\njw -r {block_a} /dev/null\njc\n"),
    );
    let fs = assert_replays_as_e2fsck(&work, &img, 4096);
    assert_eq!(replayed(&fs).0, 2);
    assert_eq!(
        fs.read_all(fs.lookup("a").unwrap(), 1 << 20).unwrap(),
        vec![b'a'; 4096]
    );
    assert_eq!(
        fs.read_all(fs.lookup("b").unwrap(), 1 << 20).unwrap(),
        vec![b'x'; 4096]
    );
}

#[test]
fn a_transaction_over_several_descriptor_blocks_replays_whole() {
    let work = Work::new();
    let base = work.mkfs("base.img", &["-t", "ext4", "-b", "4096"], 32);
    let after = work.copy(&base, "after.img");
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    let big = work.file("big", &data);
    work.debugfs(&after, &format!("write {big} big\n"));
    let img = work.journaled(&base, &[&after], "-c", 4096);
    let log = run("debugfs", &["-R", "logdump", img.to_str().unwrap()]);
    let descriptors = log
        .lines()
        .filter(|l| l.contains("sequence 1, type 1"))
        .count();
    assert!(descriptors >= 2, "{log}");
    let fs = assert_replays_as_e2fsck(&work, &img, 4096);
    assert_eq!(replayed(&fs).0, 1);
    assert_eq!(
        fs.read_all(fs.lookup("big").unwrap(), 4 << 20).unwrap(),
        data
    );
}

#[test]
fn a_block_starting_with_the_journal_magic_is_escaped_and_restored() {
    let work = Work::new();
    let base = work.mkfs("base.img", &["-t", "ext4", "-b", "4096"], 16);
    let a = work.file("a", &[b'a'; 4096]);
    work.debugfs(&base, &format!("write {a} a\n"));
    let block = bmap(&base, 12, 0);
    let mut magic = vec![b'm'; 4096];
    magic[..4].copy_from_slice(&0xC03B_3998u32.to_be_bytes());
    let m = work.file("m", &magic);
    let img = work.copy(&base, "journaled.img");
    work.debugfs(&img, &format!("jo -c\njw -b {block} {m}\njc\n"));
    // The log: descriptor at journal block 1, the block at 2 — stored without its magic.
    let logged = bmap(&img, 8, 2) as usize * 4096;
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(raw[logged..logged + 4], [0; 4], "debugfs escaped it");
    assert_eq!(raw[logged + 4..logged + 4096], magic[4..]);
    let fs = assert_replays_as_e2fsck(&work, &img, 4096);
    assert_eq!(
        fs.read_all(fs.lookup("a").unwrap(), 1 << 20).unwrap(),
        magic
    );
}

/// A volume of 4 KiB blocks made with `mkfs`, whose journal (opened with `open`, checked to
/// show `header` in dumpe2fs) holds two transactions, the second one damaged: a byte flipped
/// in the `plus`-th log block after the second block logdump calls `what` ("descriptor" or
/// "commit"). Returns the work, the image and the two later states.
fn damaged(
    mkfs: &[&str],
    open: &str,
    header: &str,
    what: &str,
    plus: u64,
) -> (Work, PathBuf, Vec<PathBuf>) {
    let work = Work::new();
    let (base, later) = states(&work, mkfs, 32, 2);
    let img = work.journaled(&base, &[&later[0], &later[1]], open, 4096);
    assert!(run("dumpe2fs", &["-h", img.to_str().unwrap()]).contains(header));
    let log = run("debugfs", &["-R", "logdump", img.to_str().unwrap()]);
    let found: u64 = log
        .lines()
        .filter(|l| l.contains(&format!("({what} block) at block")))
        .nth(1)
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no second {what} block:\n{log}"));
    let at = bmap(&img, 8, found + plus) * 4096 + 2000;
    let mut raw = std::fs::read(&img).unwrap();
    raw[at as usize] ^= 0xFF;
    std::fs::write(&img, raw).unwrap();
    (work, img, later)
}

/// The replay of a `damaged` volume is e2fsck's, and ends after the first transaction.
fn assert_stops_after_the_first(work: &Work, img: &Path, later: &[PathBuf]) {
    let fs = assert_replays_as_e2fsck(work, img, 4096);
    let (transactions, _, stop) = replayed(&fs);
    assert_eq!(transactions, 1);
    assert!(matches!(stop, LogEnd::BadBlock { .. }), "{stop:?}");
    let first = work.rdump(&later[0]);
    assert_same(&our_tree(&fs), &first, "the first transaction only");
    assert!(fs.view_notes().iter().any(|n| n.contains("damaged")));
}

const EXT4_4K: [&str; 4] = ["-t", "ext4", "-b", "4096"];

#[test]
fn a_damaged_csum_v3_commit_block_ends_the_replay_there_as_in_e2fsck() {
    let (work, img, later) = damaged(&EXT4_4K, "-c", "journal_checksum_v3", "commit", 0);
    assert_stops_after_the_first(&work, &img, &later);
}

#[test]
fn a_damaged_block_under_the_old_crc32_commit_checksum_ends_the_replay_there() {
    // Without metadata_csum, `jo -c` makes the old COMPAT_CHECKSUM journal: a damaged data
    // block makes its commit's CRC32 wrong.
    let mkfs = ["-t", "ext4", "-b", "4096", "-O", "^metadata_csum"];
    let (work, img, later) = damaged(&mkfs, "-c", "journal_checksum", "descriptor", 1);
    assert_stops_after_the_first(&work, &img, &later);
}

#[test]
fn a_damaged_csum_v3_data_block_alone_is_left_out_as_in_e2fsck() {
    // e2fsck leaves the block out too, then — the journal being damaged — goes on to a full
    // check that fixes the counts the missing block leaves wrong: the trees agree, the
    // blocks e2fsck repaired do not.
    let (work, img, _) = damaged(&EXT4_4K, "-c", "journal_checksum_v3", "descriptor", 2);
    let (fs, said) = assert_tree_as_e2fsck(&work, &img);
    assert!(
        said.contains("Invalid checksum recovering data block"),
        "{said}"
    );
    assert_eq!(replayed(&fs), (2, 1, LogEnd::End));
    assert!(fs
        .view_notes()
        .iter()
        .any(|n| n.contains("failed their checksum")));
}

#[test]
fn a_damaged_csum_v3_descriptor_block_makes_the_whole_journal_unreplayable_as_in_e2fsck() {
    // A bad descriptor whose transaction still commits after the last good one: e2fsck
    // replays nothing (and says "Journal checksum error"); neither do we.
    let (work, img, _) = damaged(&EXT4_4K, "-c", "journal_checksum_v3", "descriptor", 0);
    let fs = open(&img);
    let want = work.rdump(&work.e2fsck_replayed(&img).0);
    assert_same(&our_tree(&fs), &want, "e2fsck's view");
    assert!(matches!(
        fs.journal_view(),
        JournalView::NotReplayed(JournalError::Damaged { .. })
    ));
    assert!(fs.rebuild_obstacle().is_some());
}

#[test]
fn a_fast_commit_volume_replays_its_full_commits_and_refuses_a_rebuild() {
    let work = Work::new();
    let (base, later) = states(
        &work,
        &["-t", "ext4", "-b", "4096", "-O", "fast_commit"],
        32,
        1,
    );
    let img = work.journaled(&base, &[&later[0]], "-c", 4096);
    let fs = open(&img);
    assert_eq!(replayed(&fs).0, 1);
    let want = work.rdump(&work.e2fsck_replayed(&img).0);
    assert_same(&our_tree(&fs), &want, "the replayed view is e2fsck's");
    let obstacle = fs.rebuild_obstacle().expect("an obstacle");
    assert!(obstacle.contains("fast-commit"), "{obstacle}");
}

#[test]
fn an_external_journal_is_noted_and_the_view_left_unreplayed() {
    let work = Work::new();
    let (base, later) = states(&work, &["-t", "ext4", "-b", "4096"], 16, 1);
    let img = work.journaled(&base, &[&later[0]], "", 4096);
    work.debugfs(
        &img,
        "ssv journal_inum 0\nssv journal_uuid 01234567-89ab-cdef-0123-456789abcdef\n",
    );
    let fs = open(&img);
    assert_eq!(
        fs.journal_view(),
        &JournalView::NotReplayed(JournalError::External)
    );
    assert!(fs.rebuild_obstacle().unwrap().contains("external device"));
    assert!(fs.view_notes()[0].contains("not replayed"));
    assert_same(&our_tree(&fs), &work.rdump(&img), "the stale view");
}

#[test]
fn absurd_journal_superblocks_are_refused_without_replay_or_panic() {
    let work = Work::new();
    let (base, later) = states(&work, &["-t", "ext4", "-b", "4096"], 16, 1);
    for (open_args, expect_csum) in [("", false), ("-c", true)] {
        let img = work.journaled(&base, &[&later[0]], open_args, 4096);
        let at = (bmap(&img, 8, 0) * 4096) as usize;
        let pristine = std::fs::read(&img).unwrap();
        let stale = our_tree(
            &Ext4::open_unreplayed(Arc::new(MemoryDevice::read_only(pristine.clone()))).unwrap(),
        );
        // (offset in the journal superblock, big-endian value)
        for (field, value) in [
            (0x0, 0u32),
            (0x4, 9),
            (0xC, 512),
            (0x10, u32::MAX),
            (0x10, 3),
            (0x14, 0),
            (0x1C, 1 << 30),
            (0x28, 0x8000),
        ] {
            let mut raw = pristine.clone();
            raw[at + field..at + field + 4].copy_from_slice(&value.to_be_bytes());
            let fs = Ext4::open(Arc::new(MemoryDevice::read_only(raw))).unwrap();
            match fs.journal_view() {
                JournalView::NotReplayed(e) => {
                    if expect_csum && (field, value) == (0x10, 3) {
                        assert_eq!(e, &JournalError::SuperblockChecksum);
                    }
                    assert!(fs.rebuild_obstacle().is_some());
                }
                // A log too short to hold the transaction: nothing committed to replay.
                JournalView::Replayed {
                    transactions: 0, ..
                } => assert!(!expect_csum),
                other => panic!("field {field:#x} = {value:#x}: {other:?}"),
            }
            assert_same(&our_tree(&fs), &stale, "field {field:#x}: the stale view");
        }
    }
}
