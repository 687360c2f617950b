//! Hostile VHD and VMDK files: absurd table sizes, tables and grains pointing outside the file,
//! broken markers and compressed data — each a typed error naming what is wrong, never a panic
//! or a huge allocation — and random corruption of valid images (every byte opened, read and
//! mapped without a panic).

use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{map_device, BlockDevice, MemoryDevice};
use diskferry_vdisk::vhd::ondisk::{dynamic, footer, seal};
use diskferry_vdisk::vhd::Vhd;
use diskferry_vdisk::vmdk::ondisk::{header, marker};
use diskferry_vdisk::vmdk::Vmdk;
use diskferry_vdisk::{FormatError, ImageError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const PATH: &str = "hostile.img";

#[derive(Clone, Copy, Debug)]
enum Kind {
    VhdDynamic,
    VhdFixed,
    VmdkSparse,
    VmdkStream,
}

const KINDS: [Kind; 4] = [
    Kind::VhdDynamic,
    Kind::VhdFixed,
    Kind::VmdkSparse,
    Kind::VmdkStream,
];

/// A valid image of `kind` (8 MiB, data in a few places), as bytes.
fn valid(kind: Kind) -> Vec<u8> {
    let mem = Arc::new(MemoryDevice::new(0));
    let file: Arc<dyn BlockDevice> = mem.clone();
    let path = Path::new(PATH);
    let size = 8 * MIB;
    let image: Box<dyn BlockDevice> = match kind {
        Kind::VhdDynamic => Box::new(Vhd::create(file, path, size, false).unwrap()),
        Kind::VhdFixed => Box::new(Vhd::create(file, path, size, true).unwrap()),
        Kind::VmdkSparse => Box::new(Vmdk::create_sparse(file, path, size).unwrap()),
        Kind::VmdkStream => Box::new(Vmdk::create_stream(file, path, size).unwrap()),
    };
    for (i, at) in [0, 3 * MIB + 1000, 7 * MIB].into_iter().enumerate() {
        let data: Vec<u8> = (0..70_000u32).map(|j| (j * 7 + i as u32) as u8).collect();
        image.write_at(&data, at).unwrap();
    }
    image.flush().unwrap();
    drop(image);
    mem.contents()
}

fn open(kind: Kind, bytes: Vec<u8>) -> Result<Box<dyn BlockDevice>, ImageError> {
    let file: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(bytes));
    let path = Path::new(PATH);
    Ok(match kind {
        Kind::VhdDynamic | Kind::VhdFixed => Box::new(Vhd::open(file, path)?),
        Kind::VmdkSparse | Kind::VmdkStream => Box::new(Vmdk::open(file, path)?),
    })
}

/// Reads the whole disk: the first error, if any.
fn read_all(image: &dyn BlockDevice) -> Result<(), String> {
    map_device(image).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0;
    while pos < image.size() {
        let n = (image.size() - pos).min(MIB) as usize;
        image
            .read_at(&mut buf[..n], pos)
            .map_err(|e| e.to_string())?;
        pos += n as u64;
    }
    Ok(())
}

fn problem(result: Result<Box<dyn BlockDevice>, ImageError>) -> FormatError {
    match result {
        Err(ImageError::Invalid { problem, .. }) => problem,
        Err(other) => panic!("expected an invalid image, got {other}"),
        Ok(_) => panic!("a hostile image opened"),
    }
}

/// The dynamic VHD header, edited by `edit` and resealed.
fn vhd_header_edit(bytes: &mut [u8], edit: impl Fn(&mut [u8])) {
    let h = &mut bytes[512..512 + dynamic::LEN];
    edit(h);
    seal(h, dynamic::CHECKSUM);
}

#[test]
fn vhd_with_absurd_tables_or_blocks_outside_the_file_is_refused() {
    let base = valid(Kind::VhdDynamic);
    let mut huge = base.clone();
    vhd_header_edit(&mut huge, |h| dynamic::MAX_TABLE_ENTRIES.set(h, u32::MAX));
    assert!(matches!(
        problem(open(Kind::VhdDynamic, huge)),
        FormatError::Field {
            field: "max table entries",
            ..
        }
    ));
    let mut far = base.clone();
    vhd_header_edit(&mut far, |h| dynamic::TABLE_OFFSET.set(h, u64::MAX - 7));
    assert!(matches!(
        problem(open(Kind::VhdDynamic, far)),
        FormatError::BeyondEnd {
            structure: "BAT",
            ..
        }
    ));
    let mut odd = base.clone();
    vhd_header_edit(&mut odd, |h| dynamic::BLOCK_SIZE.set(h, 3 << 20));
    assert!(matches!(
        problem(open(Kind::VhdDynamic, odd)),
        FormatError::Field {
            field: "block size",
            ..
        }
    ));
    // A BAT entry pointing past the end of the file: opening works, reading that block fails.
    let mut outside = base.clone();
    outside[1536..1540].copy_from_slice(&0x0fff_ffffu32.to_be_bytes());
    let image = open(Kind::VhdDynamic, outside).unwrap();
    let err = read_all(&*image).unwrap_err();
    assert!(err.contains("block 0 at"), "{err}");
    // A footer claiming 2 PiB (sized by the footer, as Hyper-V's are).
    let mut big = base.clone();
    let end = big.len() - 512;
    for at in [0, end] {
        let f = &mut big[at..at + 512];
        footer::CREATOR_APP.set(f, b"win ");
        footer::CURRENT_SIZE.set(f, 1 << 51);
        seal(f, footer::CHECKSUM);
    }
    assert!(matches!(
        problem(open(Kind::VhdDynamic, big)),
        FormatError::Field {
            field: "virtual size",
            ..
        }
    ));
    // A fixed disk whose footer claims more data than the file holds.
    let mut fixed = valid(Kind::VhdFixed);
    let end = fixed.len() - 512;
    let f = &mut fixed[end..];
    footer::CREATOR_APP.set(f, b"win ");
    footer::CURRENT_SIZE.set(f, 64 * MIB);
    seal(f, footer::CHECKSUM);
    assert!(matches!(
        problem(open(Kind::VhdFixed, fixed)),
        FormatError::BeyondEnd { .. }
    ));
}

#[test]
fn vmdk_with_absurd_tables_or_grains_outside_the_file_is_refused() {
    let base = valid(Kind::VmdkSparse);
    let edit = |f: &dyn Fn(&mut [u8])| {
        let mut b = base.clone();
        f(&mut b[..512]);
        problem(open(Kind::VmdkSparse, b))
    };
    assert!(matches!(
        edit(&|h| header::CAPACITY.set(h, 1 << 50)),
        FormatError::Field {
            field: "capacity",
            ..
        }
    ));
    assert!(matches!(
        edit(&|h| header::GRAIN_SIZE.set(h, 3)),
        FormatError::Field {
            field: "grain size",
            ..
        }
    ));
    assert!(matches!(
        edit(&|h| header::GTES_PER_GT.set(h, 0)),
        FormatError::Field { .. }
    ));
    // A directory of a million entries, for a 2 TiB disk of one-sector grains.
    assert!(matches!(
        edit(&|h| {
            header::CAPACITY.set(h, 1 << 32);
            header::GRAIN_SIZE.set(h, 1);
            header::GTES_PER_GT.set(h, 1);
        }),
        FormatError::TooManyEntries { .. }
    ));
    assert!(matches!(
        edit(&|h| header::GD_OFFSET.set(h, 1 << 40)),
        FormatError::BeyondEnd {
            structure: "grain directory",
            ..
        }
    ));
    // Every directory entry pointing at one table: more table than file.
    let mut same = base.clone();
    let gd = header::GD_OFFSET.get(&same) as usize * 512;
    let first = same[gd..gd + 4].to_vec();
    let mut b = same.clone();
    header::CAPACITY.set(&mut b[..512], 1 << 32);
    let gd_len = (1u64 << 32).div_ceil(128 * 512) as usize * 4;
    b.resize(b.len().max(gd + gd_len), 0);
    for e in b[gd..gd + gd_len].chunks_exact_mut(4) {
        e.copy_from_slice(&first);
    }
    assert!(matches!(
        problem(open(Kind::VmdkSparse, b)),
        FormatError::TooManyEntries { .. }
    ));
    // A grain table entry pointing past the end of the file.
    let gt = u32::from_le_bytes(first.try_into().unwrap()) as usize * 512;
    same[gt..gt + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    let image = open(Kind::VmdkSparse, same).unwrap();
    let err = read_all(&*image).unwrap_err();
    assert!(err.contains("grain 0 at"), "{err}");
}

#[test]
fn stream_vmdk_with_broken_markers_or_compressed_data_is_refused() {
    let base = valid(Kind::VmdkStream);
    let first_grain = 128 * 512; // our streams' grains start at sector 128
    type Edit<'a> = &'a dyn Fn(&mut [u8]);
    let cases: [(&str, Edit); 3] = [
        ("sector", &|m| marker::VALUE.set(m, 99)),
        ("size", &|m| marker::SIZE.set(m, u32::MAX)),
        ("does not decompress", &|m| m[20..40].fill(0xAA)),
    ];
    for (expected, edit) in cases {
        let mut b = base.clone();
        edit(&mut b[first_grain..first_grain + 512]);
        let image = open(Kind::VmdkStream, b).unwrap();
        let err = read_all(&*image).unwrap_err();
        assert!(err.contains(expected), "{expected}: {err}");
    }
    let mut cut = base.clone();
    cut.truncate(cut.len() - 512);
    assert!(matches!(
        problem(open(Kind::VmdkStream, cut)),
        FormatError::Missing { .. }
    ));
}

/// Random corruption anywhere in valid images: opening, mapping and reading never panic and
/// end (an error or data, either is fine).
#[test]
fn randomly_corrupted_images_never_panic() {
    let seed = 0x5eed;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes = [0usize; 2];
    for kind in KINDS {
        let base = valid(kind);
        for _ in 0..300 {
            let mut b = base.clone();
            for _ in 0..rng.gen_range(1..8) {
                // Mostly metadata (the first 64 KiB and the last KiB), sometimes anywhere.
                let at = match rng.gen_range(0..3) {
                    0 => rng.gen_range(0..b.len().min(65536)),
                    1 => b.len() - 1 - rng.gen_range(0..1024.min(b.len())),
                    _ => rng.gen_range(0..b.len()),
                };
                b[at] = rng.gen();
            }
            let ok = open(kind, b).map(|image| read_all(&*image).is_ok());
            outcomes[usize::from(matches!(ok, Ok(true)))] += 1;
        }
    }
    eprintln!(
        "seed {seed:#x}: {} refused or failed reads, {} read",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[0] > 0, "no corruption was ever noticed");
}
