//! VHD and VMDK against qemu-img, the reference implementation nobody here wrote:
//!
//! - **Reading**: images `qemu-img convert` makes from a raw disk with data and holes (vpc
//!   dynamic and fixed, sized by geometry or by the footer; vmdk monolithicSparse with and
//!   without zeroed grains, and streamOptimized; three sizes) read through
//!   our reader byte for byte as `qemu-img convert -O raw` reads them, at the size
//!   `qemu-img info` reports.
//! - **Writing**: images we write from the same disks (in pieces of many sizes, some cutting
//!   grains and blocks, some all zeros) pass `qemu-img check` where qemu can check the format
//!   (vmdk; it cannot check vpc), `qemu-img compare` against the raw disk both ways, show the
//!   rounded size in `qemu-img info`, and `qemu-img map` allocates only units we wrote data to.
//! - **Naming**: containers qemu-img makes that we cannot read (VDI, QED, qcow 1, encrypted
//!   qcow2, qcow2 with a data file, VMDK descriptors, Parallels) and a VHD differencing footer
//!   are named, never taken for raw disks.
//! - **VHDX block size**: the option reaches the header (`qemu-img info` cluster size).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskferry_blockdev::{map_device, BlockDevice, FileDevice, Region};
use diskferry_vdisk::{create_image, detect, open_image, Detected, Foreign, ImageFormat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Runs a tool, returning its status code and stdout (panics if it cannot start).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (install qemu-utils)"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn qemu(args: &[&str]) -> String {
    let mut all = vec!["qemu-img"];
    all.extend_from_slice(args);
    let (code, out, err) = run(&all);
    assert_eq!(code, 0, "qemu-img {args:?} failed: {out}{err}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw disk of `size` bytes with runs of random data, runs of a repeating pattern and holes;
/// returns the byte ranges holding data.
fn make_source(path: &Path, size: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut runs = Vec::new();
    for i in 0..24 {
        let len = match i % 4 {
            0 => rng.gen_range(1..4 * KIB),
            1 => rng.gen_range(60 * KIB..200 * KIB),
            2 => rng.gen_range(1..3 * MIB),
            _ => 512 * rng.gen_range(1..64),
        }
        .min(size);
        let offset = match i {
            0 => 0,
            1 => size - len,
            _ => rng.gen_range(0..=size - len),
        };
        let data: Vec<u8> = if i % 3 == 0 {
            (0..len).map(|j| (j % 251) as u8 ^ 0x5a).collect()
        } else {
            (0..len).map(|_| rng.gen()).collect()
        };
        std::os::unix::fs::FileExt::write_all_at(&file, &data, offset).unwrap();
        runs.push((offset, data));
    }
    runs
}

fn info(path: &Path, format: &str) -> serde_json::Value {
    let out = qemu(&["info", "-f", format, "--output=json", s(path)]);
    serde_json::from_str(&out).unwrap()
}

/// Our reader's bytes of `image` equal qemu's (`convert -O raw`), at qemu's size: all of
/// them on small disks; on large (sparse) ones every data run, random windows elsewhere, and
/// every extent our reader reports as data.
fn assert_reads_as_qemu(
    dir: &Path,
    image: &Path,
    qemu_format: &str,
    detected: Detected,
    runs: &[(u64, Vec<u8>)],
) {
    let raw = dir.join("qemu-view.raw");
    let _ = std::fs::remove_file(&raw);
    qemu(&["convert", "-f", qemu_format, "-O", "raw", s(image), s(&raw)]);
    let (kind, ours) = open_image(image, false).unwrap();
    assert_eq!(kind, detected, "{image:?}");
    let size = info(image, qemu_format)["virtual-size"].as_u64().unwrap();
    assert_eq!(ours.size(), size, "virtual size of {image:?}");
    let reference = FileDevice::open(&raw, false).unwrap();
    assert_eq!(reference.size(), size);
    let mut windows: Vec<(u64, u64)> = Vec::new();
    if size <= 256 * MIB {
        // Odd piece sizes cross grain and block boundaries.
        let piece = 3 * MIB + 4096 + 512;
        windows.extend(
            (0..size)
                .step_by(piece as usize)
                .map(|o| (o, piece.min(size - o))),
        );
    } else {
        let mut rng = StdRng::seed_from_u64(size);
        windows.extend(runs.iter().map(|(o, d)| (*o, d.len() as u64)));
        windows.extend((0..64).map(|_| (rng.gen_range(0..size - MIB), MIB)));
        let extents = map_device(&*ours).unwrap();
        windows.extend(
            extents
                .iter()
                .filter(|e| e.region != Region::Zero)
                .map(|e| (e.offset, e.len.min(64 * MIB))),
        );
    }
    for (offset, len) in windows {
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        ours.read_at(&mut a, offset).unwrap();
        reference.read_at(&mut b, offset).unwrap();
        assert!(a == b, "{image:?}: {offset}+{len} differs from qemu's");
    }
}

/// Formats and creation options: VHDs sized by geometry (creator "qemu") and, with
/// force_size, by the footer (creator "qem2", as Hyper-V's "win " are); VMDKs with and without
/// zeroed-grain entries.
const QEMU_MADE: [(&str, &str, Detected); 7] = [
    ("vpc", "subformat=dynamic", Detected::Vhd),
    ("vpc", "subformat=fixed", Detected::Vhd),
    ("vpc", "subformat=dynamic,force_size=on", Detected::Vhd),
    ("vpc", "subformat=fixed,force_size=on", Detected::Vhd),
    ("vmdk", "subformat=monolithicSparse", Detected::Vmdk),
    (
        "vmdk",
        "subformat=monolithicSparse,zeroed_grain=on",
        Detected::Vmdk,
    ),
    ("vmdk", "subformat=streamOptimized", Detected::Vmdk),
];

/// Sizes: not a multiple of a grain or block, an exact CHS geometry's worth, past 127 GiB of
/// CHS (sparse).
const SIZES: [u64; 3] = [37 * MIB + 3 * KIB + 512, 64 * MIB, 130 << 30];

#[test]
fn images_qemu_img_makes_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut passed = 0;
    for (i, size) in SIZES.into_iter().enumerate() {
        let src = dir.path().join(format!("src{i}.raw"));
        let runs = make_source(&src, size, 7 + i as u64);
        for (j, (format, opt, detected)) in QEMU_MADE.into_iter().enumerate() {
            if opt.contains("fixed") && size > 1 << 30 {
                continue; // a fixed image of that size is a large sparse file; covered smaller
            }
            let img = dir.path().join(format!("qemu{i}-{j}.img"));
            let args = ["-f", "raw", "-O", format, "-o", opt, s(&src), s(&img)];
            qemu(&[&["convert"], &args[..]].concat());
            assert_reads_as_qemu(dir.path(), &img, format, detected, &runs);
            std::fs::remove_file(&img).unwrap();
            passed += 1;
        }
    }
    eprintln!("{passed} qemu-img-made images read as qemu reads them");
    assert_eq!(passed, 19);
}

/// Writes the source's data runs into a new image of `format`, in pieces of varied sizes (some
/// all zeros, some cutting grains), flushes, renames nothing (the test owns the file).
fn write_image(out: &Path, format: ImageFormat, size: u64, runs: &[(u64, Vec<u8>)], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(out)
        .unwrap();
    let image = create_image(format, file, out, size, false, 512).unwrap();
    // Zeros over never-written space allocate nothing (data written later may land there).
    image
        .write_at(&vec![0u8; 300_000], size / 2 - 150_000)
        .unwrap();
    for (offset, data) in runs {
        let mut done = 0usize;
        while done < data.len() {
            let n = [511usize, 4096, 65536, 100_000, 1 << 20][rng.gen_range(0..5)];
            let n = n.min(data.len() - done);
            image
                .write_at(&data[done..done + n], offset + done as u64)
                .unwrap();
            done += n;
        }
    }
    image.flush().unwrap();
}

/// The allocation units (of `unit` bytes) holding non-zero data after the runs are written.
fn units_with_data(runs: &[(u64, Vec<u8>)], size: u64, unit: u64, src: &Path) -> BTreeSet<u64> {
    let file = FileDevice::open(src, false).unwrap();
    let mut out = BTreeSet::new();
    for (offset, data) in runs {
        for u in offset / unit..(offset + data.len() as u64).div_ceil(unit) {
            let start = u * unit;
            let mut buf = vec![0u8; unit.min(size - start) as usize];
            file.read_at(&mut buf, start).unwrap();
            if buf.iter().any(|&b| b != 0) {
                out.insert(u);
            }
        }
    }
    out
}

const WE_WRITE: [(ImageFormat, &str, u64); 4] = [
    (ImageFormat::Vhd, "vpc", 2 * MIB),
    (ImageFormat::VhdFixed, "vpc", 0),
    (ImageFormat::Vmdk, "vmdk", 64 * KIB),
    (ImageFormat::VmdkStream, "vmdk", 64 * KIB),
];

#[test]
fn images_we_write_pass_qemu_img_check_compare_info_and_map() {
    let dir = tempfile::tempdir().unwrap();
    let mut passed = 0;
    for (i, size) in SIZES.into_iter().enumerate() {
        let src = dir.path().join(format!("src{i}.raw"));
        let runs = make_source(&src, size, 100 + i as u64);
        for (format, qemu_format, unit) in WE_WRITE {
            if format == ImageFormat::VhdFixed && size > 1 << 30 {
                continue;
            }
            let out = dir.path().join(format!("ours{i}-{}.img", format.name()));
            write_image(&out, format, size, &runs, i as u64);
            check_with_qemu(&src, &out, format, qemu_format, size);
            if unit != 0 {
                let want = units_with_data(&runs, size, unit, &src);
                assert_map_within(&out, qemu_format, unit, &want);
            }
            // Our reader agrees with qemu on our own image too.
            assert_reads_as_qemu(dir.path(), &out, qemu_format, detected_as(format), &runs);
            std::fs::remove_file(&out).unwrap();
            passed += 1;
        }
    }
    eprintln!("{passed} images we wrote pass qemu-img");
    assert_eq!(passed, 11);
}

fn detected_as(format: ImageFormat) -> Detected {
    match format {
        ImageFormat::Vhd | ImageFormat::VhdFixed => Detected::Vhd,
        _ => Detected::Vmdk,
    }
}

fn check_with_qemu(src: &Path, out: &Path, format: ImageFormat, qemu_format: &str, size: u64) {
    if qemu_format == "vmdk" {
        let report = qemu(&["check", "-f", "vmdk", s(out)]);
        assert!(report.contains("No errors"), "{format:?}: {report}");
    } else {
        // qemu cannot check vpc images: it says so rather than passing them.
        let (code, _, err) = run(&["qemu-img", "check", "-f", "vpc", s(out)]);
        assert!(
            code != 0 && err.contains("does not support checks"),
            "{err}"
        );
    }
    let qsize = info(out, qemu_format)["virtual-size"].as_u64().unwrap();
    let expected = match format {
        ImageFormat::Vhd | ImageFormat::VhdFixed => {
            diskferry_vdisk::vhd::geometry_for(size).unwrap().1
        }
        _ => size.next_multiple_of(512),
    };
    assert_eq!(qsize, expected, "{format:?}: qemu-img info virtual size");
    for (a, fa, b, fb) in [
        (src, "raw", out, qemu_format),
        (out, qemu_format, src, "raw"),
    ] {
        let (code, text, err) = run(&["qemu-img", "compare", "-f", fa, "-F", fb, s(a), s(b)]);
        assert_eq!(
            code, 0,
            "{format:?}: qemu-img compare {a:?} {b:?}: {text}{err}"
        );
    }
}

/// `qemu-img map`: every extent qemu calls data lies in a unit we wrote data to.
fn assert_map_within(out: &Path, qemu_format: &str, unit: u64, want: &BTreeSet<u64>) {
    let map = qemu(&["map", "-f", qemu_format, "--output=json", s(out)]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let mut seen = BTreeSet::new();
    for e in extents.iter().filter(|e| e["data"] == true) {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for u in start / unit..(start + len).div_ceil(unit) {
            assert!(
                want.contains(&u),
                "{out:?}: unit {u} allocated without data"
            );
            seen.insert(u);
        }
    }
    assert_eq!(&seen, want, "{out:?}: units with data not all allocated");
}

#[test]
fn containers_we_cannot_read_are_named_not_taken_for_raw() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let secret = "secret,id=sec0,data=diskferry";
    let cases: Vec<(PathBuf, Vec<&str>, Foreign)> = vec![
        (p("a.vdi"), vec!["-f", "vdi"], Foreign::Vdi),
        (p("a.qed"), vec!["-f", "qed"], Foreign::Qed),
        (p("a.qcow"), vec!["-f", "qcow"], Foreign::Qcow1),
        (
            p("enc.qcow2"),
            vec![
                "--object",
                secret,
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0",
            ],
            Foreign::Qcow2Encrypted,
        ),
        (
            p("ext.qcow2"),
            vec!["-f", "qcow2", "-o", "data_file=ext.data"],
            Foreign::Qcow2ExternalData,
        ),
        (
            p("flat.vmdk"),
            vec!["-f", "vmdk", "-o", "subformat=monolithicFlat"],
            Foreign::VmdkDescriptor,
        ),
        (
            p("split.vmdk"),
            vec!["-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"],
            Foreign::VmdkDescriptor,
        ),
        (
            p("a.parallels"),
            vec!["-f", "parallels"],
            Foreign::Parallels,
        ),
    ];
    let mut named = 0;
    for (path, args, expected) in cases {
        let mut all = vec!["qemu-img", "create"];
        all.extend(args);
        all.extend([s(&path), "64M"]);
        let (code, out, err) = run_in(dir.path(), &all);
        assert_eq!(code, 0, "{all:?}: {out}{err}");
        assert_named(&path, expected);
        named += 1;
    }
    // A split VMDK's extent file alone, and a VHD differencing footer (qemu-img cannot make
    // one: a dynamic VHD's footer copies with the type changed and the checksums resealed).
    assert_named(&p("split-s001.vmdk"), Foreign::VmdkSplitExtent);
    let vhd = p("diff.vhd");
    qemu(&["create", "-f", "vpc", s(&vhd), "8M"]);
    make_differencing(&vhd);
    assert_named(&vhd, Foreign::VhdDifferencing);
    eprintln!("{} foreign containers named", named + 2);
}

fn run_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_named(path: &Path, expected: Foreign) {
    let file = FileDevice::open(path, false).unwrap();
    match detect(&file) {
        Err(diskferry_vdisk::DetectError::Foreign(f)) => assert_eq!(f, expected, "{path:?}"),
        other => panic!("{path:?}: detected {other:?}, expected {expected:?}"),
    }
    let err = match open_image(path, false) {
        Err(e) => e.to_string(),
        Ok((kind, _)) => panic!("{path:?} opened as {kind:?}"),
    };
    let wanted = format!("is a {expected} image, which diskferry cannot read yet");
    assert!(err.contains(&wanted), "{err}");
}

/// Sets both footer copies' disk type to differencing and reseals their checksums.
fn make_differencing(path: &Path) {
    use diskferry_vdisk::vhd::ondisk::{footer, seal};
    let mut bytes = std::fs::read(path).unwrap();
    let end = bytes.len() - 512;
    for at in [0, end] {
        let f = &mut bytes[at..at + 512];
        footer::DISK_TYPE.set(f, footer::TYPE_DIFFERENCING);
        seal(f, footer::CHECKSUM);
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn the_vhdx_block_size_option_reaches_the_header() {
    let dir = tempfile::tempdir().unwrap();
    for (block_size, expected) in [
        (None, 8 * MIB),
        (Some(32 * MIB), 32 * MIB),
        (Some(MIB), MIB),
    ] {
        let out = dir.path().join(format!("b{expected}.vhdx"));
        let format = ImageFormat::Vhdx { block_size };
        let file = File::create_new(&out).unwrap();
        let image = create_image(format, file, &out, 100 * MIB, false, 512).unwrap();
        image.write_at(&[7u8; 4096], 50 * MIB).unwrap();
        image.flush().unwrap();
        drop(image);
        let cluster = info(&out, "vhdx")["cluster-size"].as_u64().unwrap();
        assert_eq!(cluster, expected, "{block_size:?}");
        let report = qemu(&["check", "-f", "vhdx", s(&out)]);
        assert!(report.contains("No errors"), "{report}");
    }
    let out = dir.path().join("bad.vhdx");
    let file = File::create_new(&out).unwrap();
    let bad = ImageFormat::Vhdx {
        block_size: Some(3 * MIB),
    };
    let Err(err) = create_image(bad, file, &out, 100 * MIB, false, 512) else {
        panic!("a 3 MiB VHDX block size was accepted");
    };
    assert!(err.to_string().contains("block size"), "{err}");
}

/// A dynamic VHD whose footer copy at the start is damaged is still a VHD (not a raw disk),
/// read through the footer at the end as qemu reads the intact image.
#[test]
fn a_dynamic_vhd_with_a_damaged_first_footer_reads_through_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_source(&src, 24 * MIB, 3);
    let img = dir.path().join("d.vhd");
    qemu(&["convert", "-f", "raw", "-O", "vpc", s(&src), s(&img)]);
    let reference = dir.path().join("qemu.raw");
    qemu(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&reference)]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[..512].fill(0);
    std::fs::write(&img, bytes).unwrap();
    let (kind, ours) = open_image(&img, false).unwrap();
    assert_eq!(kind, Detected::Vhd);
    let expected = std::fs::read(&reference).unwrap();
    let mut got = vec![0u8; expected.len()];
    ours.read_at(&mut got, 0).unwrap();
    assert!(
        got == expected,
        "differs from qemu's reading of the intact image"
    );
}

/// A qcow2 overlay on a VHD names its backing format as qemu does ("vpc"): qemu reads the
/// overlay through it.
#[test]
fn an_overlay_on_a_vhd_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_source(&src, 16 * MIB, 5);
    let base = dir.path().join("base.vhd");
    qemu(&["convert", "-f", "raw", "-O", "vpc", s(&src), s(&base)]);
    let out = dir.path().join("top.qcow2");
    let file = File::create_new(&out).unwrap();
    let overlay = diskferry_vdisk::create_overlay(file, &out, &base).unwrap();
    overlay.flush().unwrap();
    drop(overlay);
    let backing = info(&out, "qcow2")["backing-filename-format"].clone();
    assert_eq!(backing, "vpc");
    let (code, text, err) = run(&[
        "qemu-img",
        "compare",
        "-f",
        "qcow2",
        "-F",
        "vpc",
        s(&out),
        s(&base),
    ]);
    assert_eq!(code, 0, "{text}{err}");
}
