//! FAT rebuilds of volumes made by `mkfs.fat` and filled by mtools, checked with dosfstools
//! and mtools: the rebuilt volume keeps the source's identity — reserved sectors, FAT count
//! and size, root directory entries, geometry, hidden sectors (or the partition start it is
//! given), OEM name, media byte, serial number and label — so `fsck.fat -n -v` prints for it
//! what it prints for the source, with no note or warning and the FAT32 free-cluster summary
//! right; `minfo` shows the same boot sector and, on FAT32, FSInfo hints that match the
//! FAT; `mdir` lists the same tree (names, sizes,
//! times, label, serial, bytes free); `mtype` reads the same bytes.
//!
//! Needs dosfstools (mkfs.fat, fsck.fat) and mtools (mcopy, mmd, mattrib, mdir, mtype, minfo).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, FileDevice};
use diskferry_fs::fat::Fat;
use diskferry_fs::fat_write::write_fat;
use diskferry_fs::Filesystem;

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

fn sh(script: &str) {
    let out = Command::new("bash")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-eu", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\nfailed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tool's standard output and whether it succeeded.
fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `tool args… image` with the image's path taken out of its output.
fn report(cmd: &str, args: &[&str], image: &Path) -> String {
    let mut all = args.to_vec();
    let img = p(image);
    all.push(&img);
    let (ok, text) = run(cmd, &all);
    assert!(ok, "{cmd} {all:?}: {text}");
    text.replace(&img, "IMAGE")
}

/// How one source volume is made.
struct Case {
    name: &'static str,
    size_kib: u64,
    mkfs: &'static str,
    /// Written over the boot sector's OEM name (bytes 3..11, and the backup's on FAT32)
    /// after mkfs.fat.
    oem: &'static [u8; 8],
    /// The partition start given to the rebuild (`None`: keep the source's).
    partition_start: Option<u32>,
}

const CASES: &[Case] = &[
    Case {
        name: "floppy",
        size_kib: 1440,
        mkfs: "-F 12 -a -f 2 -r 224 -s 1 -M 0xF0 -g 2/18 -n FLOPPY -i 00C0FFEE",
        oem: b"IBM  3.3",
        partition_start: None,
    },
    Case {
        name: "fat12",
        size_kib: 4 << 10,
        mkfs: "-F 12 -a -R 3 -h 63 -g 16/63 -n SRC12 -i 1234ABCD -M 0xF0",
        oem: b"MSDOS5.0",
        partition_start: None,
    },
    Case {
        name: "fat16",
        size_kib: 40 << 10,
        mkfs: "-F 16 -R 4 -f 1 -r 256 -g 64/32 -n DATA16 -i 0BADF00D",
        oem: b"MSWIN4.1",
        partition_start: Some(2048),
    },
    Case {
        name: "fat32",
        size_kib: 80 << 10,
        mkfs: "-F 32 -s 1 -R 12 -h 2048 -g 255/63 -n 'EFI SYSTEM' -i 5EED0032",
        oem: b"mkfs.fat",
        partition_start: None,
    },
    Case {
        name: "fat32-aligned",
        size_kib: 300 << 10,
        mkfs: "-F 32 -R 40 -b 8 -n BIGGER -i 77777777",
        oem: b"FRDOS4.1",
        partition_start: Some(1_050_624),
    },
];

/// Makes the source image of `case` and fills it with mtools.
fn make_source(case: &Case, image: &Path, scratch: &Path) {
    sh(&format!(
        r#"
        cd {scratch}
        head -c 200000 /dev/urandom > random.bin
        seq 1 30000 > numbers.txt
        printf x > one.txt
        : > empty
        truncate -s {size}K {img}
        mkfs.fat {mkfs} {img} >/dev/null
        printf '{oem}' | dd of={img} bs=1 seek=3 conv=notrunc status=none
        if [ {fat32} = true ]; then
            backup=$(od -An -tu2 -j50 -N2 {img} | tr -d ' ')
            printf '{oem}' | dd of={img} bs=1 seek=$((backup * 512 + 3)) conv=notrunc status=none
        fi
        mmd -i {img} ::/EFI ::/EFI/BOOT "::/Long Directory Name" ::/Empty
        mcopy -i {img} random.bin ::/EFI/BOOT/BOOTX64.EFI
        mcopy -i {img} numbers.txt "::/Long Directory Name/a file with a long name.txt"
        mcopy -i {img} one.txt ::/README.TXT
        mcopy -i {img} one.txt ::/mixedCase.Txt
        mcopy -i {img} empty ::/Empty/zero
        for i in $(seq 1 40); do mcopy -i {img} one.txt "::/EFI/entry number $i.conf"; done
        mattrib -i {img} +h +s ::/EFI/BOOT/BOOTX64.EFI
        mattrib -i {img} +r ::/README.TXT
        "#,
        scratch = p(scratch),
        size = case.size_kib,
        img = p(image),
        mkfs = case.mkfs,
        oem = String::from_utf8_lossy(case.oem),
        fat32 = case.mkfs.contains("-F 32"),
    ));
}

/// Rebuilds `source` into a new image of the same size as a partition copy would.
fn rebuild(case: &Case, source: &Path, rebuilt: &Path) {
    let fat = Fat::open(Arc::new(FileDevice::open(source, false).unwrap())).unwrap();
    let mut opts = fat.format_options();
    opts.hidden_sectors = case.partition_start;
    let file = std::fs::File::create_new(rebuilt).unwrap();
    file.set_len(case.size_kib << 10).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::from_file(file, rebuilt, true).unwrap());
    let report = write_fat(dev, &fat, &opts).unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
}

/// `fsck.fat -n -v` of the rebuilt volume is the source's, but for the hidden sectors the
/// rebuild was given; it has no line but those of a clean volume.
fn check_fsck(case: &Case, source: &Path, rebuilt: &Path) {
    let mut want = report("fsck.fat", &["-n", "-v"], source);
    if let Some(start) = case.partition_start {
        let hidden = want
            .lines()
            .find(|l| l.ends_with("hidden sectors"))
            .unwrap()
            .to_string();
        want = want.replace(&hidden, &format!("{start:>10} hidden sectors"));
    }
    let got = report("fsck.fat", &["-n", "-v"], rebuilt);
    assert_eq!(got, want, "{}: fsck.fat -n -v", case.name);
    assert_clean(case.name, &got);
    let oem = String::from_utf8_lossy(case.oem);
    assert!(got.contains(&format!("System ID \"{oem}\"")), "{got}");
}

/// `fsck.fat -n -v` output with nothing but the lines of a clean volume.
fn assert_clean(name: &str, fsck: &str) {
    let clean = [
        "fsck.fat ",
        "Checking we can access the last sector",
        "Boot sector contents:",
        "System ID \"",
        "Media byte 0x",
        "Root directory st",
        "Data area starts at",
        "Checking for unused clusters.",
        "Checking free cluster summary.",
        "IMAGE: ",
    ];
    for line in fsck.lines() {
        let known = clean.iter().any(|c| line.starts_with(c))
            || line.trim_start().starts_with(|c: char| c.is_ascii_digit())
            || line.starts_with("First FAT starts");
        assert!(known, "{name}: fsck.fat said {line:?}");
    }
}

/// On FAT32, FSInfo as `minfo` reads it: the free clusters `fsck.fat` counts, and as last
/// allocated cluster the highest one `mshowfat` finds in any file's or directory's chain.
fn check_fsinfo(case: &Case, rebuilt: &Path) {
    if !case.mkfs.contains("-F 32") {
        return;
    }
    let fsck = report("fsck.fat", &["-n"], rebuilt);
    let (used, total) = fsck
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE: "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|c| c.trim_end_matches(" clusters").split_once('/'))
        .map(|(u, t)| (u.parse::<u32>().unwrap(), t.parse::<u32>().unwrap()))
        .unwrap_or_else(|| panic!("{fsck}"));
    let info = report("minfo", &["-i"], rebuilt);
    let field = |name: &str| -> u32 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {info}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(
        field("free clusters="),
        total - used,
        "{}: {info}",
        case.name
    );
    let last = field("last allocated cluster=");
    assert!((2..total + 2).contains(&last), "{}: {info}", case.name);
    // Every cluster of every file and directory, as mshowfat follows the chains.
    let paths = report("mdir", &["-/", "-b", "-i"], rebuilt);
    let mut highest = 2; // the root directory's
    for path in paths.lines().filter(|l| l.starts_with("::/")) {
        let out = Command::new("mshowfat")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &p(rebuilt), path.trim_end_matches('/')])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for run in text.split('<').skip(1) {
            let run = run.split('>').next().unwrap();
            let end = run.rsplit('-').next().unwrap().parse::<u32>().unwrap();
            highest = highest.max(end);
        }
    }
    assert_eq!(last, highest, "{}: last allocated cluster", case.name);
}

/// `minfo` shows the source's boot sector (the hidden sectors as given, the FSInfo hints
/// aside); `mdir` lists the same tree, label and serial; `mtype` reads the same bytes.
fn check_mtools(case: &Case, source: &Path, rebuilt: &Path) {
    let boot = |image: &Path| {
        report("minfo", &["-i"], image)
            .lines()
            .filter(|l| {
                !(l.starts_with("free clusters=")
                    || l.starts_with("last allocated cluster=")
                    || l.starts_with("hidden sectors:"))
            })
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(boot(rebuilt), boot(source), "{}: minfo", case.name);
    let hidden = report("minfo", &["-i"], rebuilt);
    if let Some(start) = case.partition_start {
        assert!(
            hidden.contains(&format!("hidden sectors: {start}\n")),
            "{hidden}"
        );
    }
    let listing = |image: &Path| tree(&report("mdir", &["-/", "-a", "-i"], image));
    assert_eq!(listing(rebuilt), listing(source), "{}: mdir", case.name);
    for file in [
        "::/EFI/BOOT/BOOTX64.EFI",
        "::/Long Directory Name/a file with a long name.txt",
        "::/README.TXT",
        "::/Empty/zero",
        "::/EFI/entry number 40.conf",
    ] {
        let read = |image: &Path| {
            let out = Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-i", &p(image), file])
                .output()
                .unwrap();
            assert!(out.status.success(), "mtype {file}");
            out.stdout
        };
        assert!(
            read(rebuilt) == read(source),
            "{}: {file} differs",
            case.name
        );
    }
}

/// What `mdir -/ -a` says of a volume, without what depends on the writer's naming choices
/// (the order of entries and directories, generated short aliases, long names kept for names
/// that fit 8.3): the label and serial lines, then each directory as its heading, its
/// entries by their name (the long one, else the short one) with size and time, and its
/// totals, sorted; then the overall totals (files, bytes, bytes free).
fn tree(mdir: &str) -> Vec<Vec<String>> {
    let mut blocks: Vec<Vec<String>> = vec![Vec::new()];
    for line in mdir.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("Directory for") || line.starts_with("Total files") {
            blocks.push(Vec::new());
        }
        let block = blocks.last_mut().unwrap();
        let entry = line.len() > 12 && !line.starts_with(' ') && !line.ends_with(':');
        if !entry || line.starts_with("Directory for") {
            block.push(line.to_string());
            continue;
        }
        let (base, ext) = (line[..8].trim_end(), line[9..12].trim_end());
        let fields: Vec<&str> = line[12..].split_whitespace().collect();
        let long = fields[3..].join(" ");
        let name = match (long.is_empty(), ext.is_empty()) {
            (false, _) => long,
            (true, true) => base.to_string(),
            (true, false) => format!("{base}.{ext}"),
        };
        block.push(format!("{} {}", name.to_uppercase(), fields[..3].join(" ")));
    }
    for block in &mut blocks {
        block.sort();
    }
    let last = blocks.len() - 1;
    blocks[1..last].sort();
    blocks
}

#[test]
fn rebuilds_of_mkfs_fat_volumes_keep_their_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut passed = 0;
    for case in CASES {
        let source = dir.path().join(format!("{}.img", case.name));
        let rebuilt = dir.path().join(format!("{}-rebuilt.img", case.name));
        make_source(case, &source, dir.path());
        rebuild(case, &source, &rebuilt);
        check_fsck(case, &source, &rebuilt);
        check_mtools(case, &source, &rebuilt);
        check_fsinfo(case, &rebuilt);
        // Our reader agrees on the identity too.
        let ours = Fat::open(Arc::new(FileDevice::open(&rebuilt, false).unwrap())).unwrap();
        let theirs = Fat::open(Arc::new(FileDevice::open(&source, false).unwrap())).unwrap();
        assert_eq!(ours.info(), theirs.info(), "{}", case.name);
        passed += 1;
    }
    assert_eq!(passed, CASES.len());
}

#[test]
fn a_rebuild_into_a_grown_partition_fills_it() {
    let dir = tempfile::tempdir().unwrap();
    let case = &Case {
        name: "grown",
        size_kib: 40 << 10,
        mkfs: "-F 16 -n GROWN -i 12121212",
        oem: b"mkfs.fat",
        partition_start: Some(63),
    };
    let source = dir.path().join("small.img");
    make_source(case, &source, dir.path());
    let grown = Case {
        size_kib: 60 << 10,
        ..*case
    };
    let rebuilt = dir.path().join("grown.img");
    rebuild(&grown, &source, &rebuilt);
    let fsck = report("fsck.fat", &["-n", "-v"], &rebuilt);
    assert_clean(case.name, &fsck);
    let total = |text: &str| -> u64 {
        let line = text.lines().find(|l| l.ends_with("sectors total")).unwrap();
        line.split_whitespace().next().unwrap().parse().unwrap()
    };
    let before = total(&report("fsck.fat", &["-n", "-v"], &source));
    // The source's device had as many sectors past its volume as the grown one has.
    assert_eq!((40 << 11) - before, (60 << 11) - total(&fsck), "{fsck}");
    let listing = |image: &Path| {
        let mut t = tree(&report("mdir", &["-/", "-a", "-i"], image));
        t.last_mut().unwrap().retain(|l| !l.ends_with("bytes free"));
        t
    };
    assert_eq!(listing(&rebuilt), listing(&source));
}

/// Rebuilds from sources whose boot sector has random bytes changed: an error or a volume,
/// never a panic, and never a write past the destination.
#[test]
fn damaged_boot_sectors_give_errors_or_volumes_never_panics() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src.img");
    make_source(&CASES[2], &source, dir.path());
    let bytes = std::fs::read(&source).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let (mut built, mut refused) = (0, 0);
    for _ in 0..200 {
        let mut damaged = bytes.clone();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(3..62);
            damaged[at] = rng.gen();
        }
        let src: Arc<dyn BlockDevice> =
            Arc::new(diskferry_blockdev::MemoryDevice::read_only(damaged));
        let Ok(fat) = Fat::open(src) else {
            refused += 1;
            continue;
        };
        let dst: Arc<dyn BlockDevice> =
            Arc::new(diskferry_blockdev::MemoryDevice::new(bytes.len()));
        match write_fat(dst, &fat, &fat.format_options()) {
            Ok(_) => built += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(built > 0 && refused > 0, "{built} built, {refused} refused");
}
