//! `diskferry commit` and `diskferry rebase`: folding chains of incremental captures. The
//! image work is `diskferry_vdisk::chain`; this module keeps the chunk maps beside the images
//! true. A commit removes the base's map before the base is written (an interrupted commit
//! leaves a base incremental captures refuse, never one they trust) and, once the base reads
//! as the overlay did, gives it the overlay's map re-stamped for it; the overlay is removed,
//! or with `--keep` re-created empty on the base (clusters it held are now the base's: kept,
//! they would only take space). A rebase leaves what the overlay reads unchanged, so its map
//! is re-stamped.

use std::path::Path;

use anyhow::{bail, Context, Result};
use diskferry_imaging::chunkmap::{self, ChunkMap};
use diskferry_imaging::pipeline::PartialOutput;
use diskferry_imaging::progress::Progress;
use diskferry_vdisk::chain;

use crate::{human_bytes, progress_for, ProgressKind};

pub fn commit(overlay: &Path, keep: bool, force: bool, progress: ProgressKind) -> Result<()> {
    let carried = current_map(overlay);
    let plan = chain::prepare_commit(overlay, force)?;
    let base = plan.base().to_path_buf();
    if !keep && !plan.built_on_overlay().is_empty() {
        bail!(
            "{} {} built on {}: removing it would break them; pass --keep to leave it empty on \
             the base (they then read as before)",
            list(plan.built_on_overlay()),
            if plan.built_on_overlay().len() == 1 {
                "is"
            } else {
                "are"
            },
            overlay.display()
        );
    }
    for image in plan.dependents() {
        eprintln!(
            "warning: {} is built on {} too and will read differently (--force)",
            image.display(),
            base.display()
        );
    }
    chunkmap::remove(&base)?;
    let bar = progress_for(progress);
    let stats = plan.run(&mut phase(bar.as_ref(), "committing"))?;
    bar.finish();
    if let Some(map) = &carried {
        map.clone().save_restamped(&base)?;
    }
    if keep {
        recreate_empty(overlay, &base)?;
        if let Some(map) = carried {
            map.save_restamped(overlay)?;
        }
    } else {
        chunkmap::remove(overlay)?;
        std::fs::remove_file(overlay)
            .with_context(|| format!("removing {} after the commit", overlay.display()))?;
    }
    eprintln!(
        "committed {} into {}: {} of data, {} zeroed{}",
        overlay.display(),
        base.display(),
        human_bytes(stats.data),
        human_bytes(stats.zeros),
        if keep {
            "; the overlay is empty again"
        } else {
            "; the overlay is removed"
        }
    );
    Ok(())
}

pub fn rebase(overlay: &Path, onto: &Path, progress: ProgressKind) -> Result<()> {
    let new_base = (onto != Path::new("none")).then_some(onto);
    let carried = current_map(overlay);
    let bar = progress_for(progress);
    let stats = chain::rebase(overlay, new_base, &mut phase(bar.as_ref(), "rebasing"))?;
    bar.finish();
    if let Some(map) = carried {
        map.save_restamped(overlay)?;
    }
    eprintln!(
        "rebased {} onto {}: {} compared, {} copied in from the old chain",
        overlay.display(),
        new_base.map_or("nothing (standalone)".into(), |p| p.display().to_string()),
        human_bytes(stats.compared),
        human_bytes(stats.copied)
    );
    Ok(())
}

/// A progress callback taking (done, total) that starts the phase `name` on `bar` at its first
/// call and then advances it by what was done since the last.
fn phase<'a>(bar: &'a dyn Progress, name: &'a str) -> impl FnMut(u64, u64) + 'a {
    let mut last = None;
    move |done, total| {
        let before = *last.get_or_insert_with(|| {
            bar.start(name, total);
            0
        });
        bar.advance(done.saturating_sub(before));
        last = Some(done);
    }
}

fn list(paths: &[std::path::PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// The overlay's chunk map if it still describes it; a damaged one is reported and dropped.
fn current_map(image: &Path) -> Option<ChunkMap> {
    ChunkMap::load_current(image).unwrap_or_else(|e| {
        eprintln!("warning: {e}; not carried over");
        None
    })
}

/// Replaces `overlay` by an empty overlay on `base` (written aside and renamed over it).
fn recreate_empty(overlay: &Path, base: &Path) -> Result<()> {
    let output = PartialOutput::create(overlay, true)?;
    let file = output.file().try_clone()?;
    let image = diskferry_vdisk::create_overlay(file, output.partial_path(), base)?;
    image.flush()?;
    drop(image);
    output.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The chunk maps through a commit and a rebase, with the imaging crate's own incremental
    //! capture as the judge of whether a map is trusted, and qemu-img as the judge of what the
    //! images read.
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;

    use diskferry_blockdev::{hash_device, BlockDevice, MemoryDevice};
    use diskferry_imaging::chunkmap::{self, chunk_for, ChunkMap, Layout};
    use diskferry_imaging::pipeline::{capture_overlay, Base, IncrementalError};
    use diskferry_imaging::progress::Silent;
    use diskferry_vdisk::{create_image, ImageFormat};

    use crate::ProgressKind;

    const MIB: usize = 1 << 20;

    /// `qemu-img compare` of the chain at `image` against the source's bytes.
    fn assert_reads_as(image: &Path, source: &MemoryDevice, dir: &Path) {
        let raw = dir.join("source.raw");
        std::fs::write(&raw, source.contents()).unwrap();
        let out = Command::new("qemu-img")
            .args(["compare", "-F", "raw"])
            .args([image, &raw])
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(out.status.success(), "{image:?}: {out:?}");
    }

    /// A full capture of `source` into `out` (qcow2) with its chunk map.
    fn full_capture(source: &Arc<dyn BlockDevice>, out: &Path) {
        let file = std::fs::File::create_new(out).unwrap();
        let image = create_image(ImageFormat::Qcow2, file, out, source.size(), false, 512).unwrap();
        let mut buf = vec![0u8; source.size() as usize];
        source.read_at(&mut buf, 0).unwrap();
        image.write_at(&buf, 0).unwrap();
        image.flush().unwrap();
        drop(image);
        ChunkMap::of_source(source, out, Layout::WholeDisk)
            .unwrap()
            .save(out)
            .unwrap();
    }

    fn change(source: &MemoryDevice, at: usize, byte: u8) {
        source.write_at(&vec![byte; 100_000], at as u64).unwrap();
    }

    /// An incremental capture of `source` on `base` into `out`, with its own map.
    fn capture_incremental(
        source: &Arc<dyn BlockDevice>,
        out: &Path,
        base: &Path,
    ) -> Result<(), IncrementalError> {
        let base = Base::open(base, source, &Silent)?;
        capture_overlay(&**source, out, &base, false, &Silent)?;
        base.map_for(out, Layout::WholeDisk)
            .unwrap()
            .save(out)
            .unwrap();
        Ok(())
    }

    fn incremental(source: &Arc<dyn BlockDevice>, out: &Path, base: &Path) -> PathBuf {
        capture_incremental(source, out, base).unwrap();
        out.to_path_buf()
    }

    #[test]
    fn commit_carries_the_overlay_map_to_the_base_and_rebase_restamps() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let memory = Arc::new(MemoryDevice::new(8 * MIB));
        let source: Arc<dyn BlockDevice> = memory.clone();
        change(&memory, 0, 0x11);
        change(&memory, 5 * MIB, 0x12);
        let a = d.join("a.qcow2");
        full_capture(&source, &a);
        change(&memory, 3 * MIB, 0x21);
        change(&memory, 5 * MIB, 0); // data the base holds now reads as zeros
        let b = incremental(&source, &d.join("b.qcow2"), &a);

        super::commit(&b, false, false, ProgressKind::None).unwrap();
        assert!(!b.exists() && !chunkmap::path_for(&b).exists());
        assert_reads_as(&a, &memory, d);
        let map = ChunkMap::load_current(&a)
            .unwrap()
            .expect("a current map on the base");
        assert_eq!(
            map.hashes,
            hash_device(&*source, chunk_for(source.size())).unwrap()
        );

        // The committed base is accepted for the next incremental capture.
        change(&memory, 7 * MIB, 0x31);
        let c = incremental(&source, &d.join("c.qcow2"), &a);
        assert_reads_as(&c, &memory, d);

        // A stale map (the base changed after it) is refused, not trusted.
        let stale = d.join("stale.qcow2");
        std::fs::copy(&a, &stale).unwrap();
        map.save(&stale).unwrap();
        let e = capture_incremental(&source, &d.join("x.qcow2"), &stale);
        assert!(
            matches!(e, Err(IncrementalError::BaseChanged { .. })),
            "{e:?}"
        );

        // Rebased standalone, C keeps a current map and takes the next capture.
        super::rebase(&c, Path::new("none"), ProgressKind::None).unwrap();
        assert!(ChunkMap::load_current(&c).unwrap().is_some());
        assert_reads_as(&c, &memory, d);
        change(&memory, MIB, 0x41);
        let e = incremental(&source, &d.join("e.qcow2"), &c);
        assert_reads_as(&e, &memory, d);

        // --keep: the overlay stays, empty, on the base, with the map too.
        super::commit(&e, true, false, ProgressKind::None).unwrap();
        assert_reads_as(&c, &memory, d);
        assert_reads_as(&e, &memory, d);
        assert!(ChunkMap::load_current(&e).unwrap().is_some());
        assert!(ChunkMap::load_current(&c).unwrap().is_some());

        // An overlay without a map leaves its base without one: the old map is stale.
        std::fs::remove_file(&e).unwrap();
        let bare = d.join("bare.qcow2");
        crate::images::overlay(&c, &bare, false).unwrap();
        super::commit(&bare, false, false, ProgressKind::None).unwrap();
        assert!(!chunkmap::path_for(&c).exists());
    }

    /// C on B on A (qemu-img): committing B would break C if B went, so it is refused unless
    /// kept; kept (emptied), C reads as before.
    #[test]
    fn an_overlay_others_are_built_on_is_only_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |program: &str, args: &[&str]| {
            let out = Command::new(program)
                .current_dir(d)
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{program} {args:?}: {out:?}");
        };
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"],
        );
        run("qemu-io", &["-c", "write -P 0x11 0 6M", "a.qcow2"]);
        for (top, base) in [("b.qcow2", "a.qcow2"), ("c.qcow2", "b.qcow2")] {
            let args = [
                "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top,
            ];
            run("qemu-img", &args);
        }
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x22 1M 2M",
                "-c",
                "write -z 4M 1M",
                "b.qcow2",
            ],
        );
        run("qemu-io", &["-c", "write -P 0x33 2M 64k", "c.qcow2"]);
        run("qemu-img", &["convert", "-O", "raw", "c.qcow2", "c.raw"]);
        let b = d.join("b.qcow2");
        let err = super::commit(&b, false, false, ProgressKind::None).unwrap_err();
        assert!(err.to_string().contains("--keep"), "{err}");
        assert!(b.exists());
        super::commit(&b, true, false, ProgressKind::None).unwrap();
        run("qemu-img", &["compare", "-F", "raw", "c.qcow2", "c.raw"]);
        run("qemu-img", &["check", "b.qcow2"]);
        run("qemu-img", &["check", "a.qcow2"]);
    }
}
