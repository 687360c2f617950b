//! `diskferry demo`: the main job end to end on this machine, with nothing to set up.
//!
//! It writes a sample disk (data and holes), serves it with the real agent code on a loopback
//! port (in-process, encrypted, authenticated with a fresh key), lists the agent's disks,
//! captures the disk into a qcow2 image with a progress bar, and proves the image reads back
//! identical (and, when qemu-img is installed, that `qemu-img check` finds it clean).

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use diskferry::blockdev::{BlockDevice, Connection, FileDevice};
use diskferry::pipeline::{capture_sectors, OutputOptions};
use diskferry::source::{open_source, SourceSpec};
use diskferry::vdisk::qcow2::Qcow2;
use diskferry::vdisk::ImageFormat;
use diskferry_client::disks::DiskSpec;
use diskferry_protocol::{Psk, Role, SessionOptions};

use crate::{human_bytes, print_disks, progress_for, ProgressKind};

const MIB: u64 = 1 << 20;

pub fn run(dir: Option<PathBuf>, size_mib: u64) -> Result<()> {
    ensure!(size_mib >= 64, "--size-mib must be at least 64");
    let keep = dir.is_some();
    let base = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("diskferry-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let result = demo(&base, size_mib * MIB);
    if !keep {
        let _ = std::fs::remove_dir_all(&base);
    }
    result
}

fn demo(base: &Path, size: u64) -> Result<()> {
    println!("diskferry demo — working in {}\n", base.display());
    let secret = Psk::generate_secret();
    std::fs::write(base.join("key"), &secret)?;
    let psk = Psk::from_secret(secret.trim().as_bytes());

    let source = base.join("source.img");
    let data = write_sample_disk(&source, size)?;
    println!(
        "1. wrote a sample disk {}: {} virtual, {} of data in 4 regions, the rest holes",
        source.display(),
        human_bytes(size),
        human_bytes(data)
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let addr = start_agent(&source, psk.clone())?;
    println!("2. started the agent (the code of diskferry-client) on {addr}, read-only, key-authenticated\n");

    let session = SessionOptions::new(Role::Controller, psk);
    let disks = rt.block_on(async {
        anyhow::Ok(
            Connection::connect(&addr, &session)
                .await?
                .list_disks()
                .await?,
        )
    })?;
    println!("3. `diskferry disks {addr}` sees:");
    print_disks(&disks);

    let out = base.join("capture.qcow2");
    let name = source.display().to_string();
    println!(
        "\n4. `diskferry capture {name}@{addr} {}` (encrypted; qcow2, from the extension):",
        out.display()
    );
    let src = open_source(
        &SourceSpec::Remote {
            disk: name,
            addr: addr.clone(),
        },
        rt.handle(),
        Some(&session),
        false,
    )?;
    let progress = progress_for(ProgressKind::Bar);
    let output = OutputOptions {
        format: ImageFormat::from_extension(&out),
        compress: false,
        overwrite: true,
    };
    let stats = capture_sectors(src.as_ref(), &out, output, progress.as_ref())?;
    let secs = stats.elapsed.as_secs_f64().max(1e-9);
    println!(
        "   {} read over the wire ({} never sent: the agent reported them as holes), {} written, {:.2} s, {:.0} MB/s",
        human_bytes(stats.read),
        human_bytes(stats.skipped_by_status),
        human_bytes(stats.written),
        secs,
        stats.read as f64 / secs / 1e6
    );

    let image_file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&out, false)?);
    let image = Qcow2::open(image_file, &out)?;
    same_bytes(&source, &image)?;
    let allocated = std::fs::metadata(&out)?.blocks() * 512;
    println!(
        "\n5. verified: the qcow2 image reads back byte-identical to the source, and holds only the data\n   ({} on disk for a {} virtual disk)",
        human_bytes(allocated),
        human_bytes(size)
    );
    match std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&out)
        .output()
    {
        Ok(o) if o.status.success() => println!("   qemu-img check: no errors, no leaks"),
        Ok(o) => anyhow::bail!(
            "qemu-img check found problems:\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(_) => println!("   (install qemu-utils to have qemu-img check it too)"),
    }
    println!(
        "\nOn real machines: boot diskferry-client --listen 0.0.0.0:7700 --key-file KEY on the source,\n\
         then run diskferry disks HOST:7700 --key-file KEY and diskferry capture DISK@HOST:7700 OUT.qcow2 --key-file KEY."
    );
    Ok(())
}

/// A sparse disk with a boot area, two large data regions and a last sector. Returns the
/// number of data bytes.
fn write_sample_disk(path: &Path, size: u64) -> Result<u64> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let regions = [
        (0, MIB),
        (size / 16, size / 8),
        (size / 2, size / 16),
        (size - 4096, 4096),
    ];
    let mut buf = vec![0u8; 4 << 20];
    let mut state = 0x243f_6a88_85a3_08d3u64;
    for &(offset, len) in &regions {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            for chunk in buf[..n].chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            f.write_all_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
    }
    f.sync_all()?;
    Ok(regions.iter().map(|r| r.1).sum())
}

/// Runs the agent on its own thread with its own single-threaded runtime, as the real client.
fn start_agent(disk: &Path, psk: Psk) -> Result<String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?.to_string();
    let config = Arc::new(diskferry_client::Config {
        disks: vec![DiskSpec {
            path: disk.to_path_buf(),
            name: disk.display().to_string(),
        }],
        allow_write: false,
        session: SessionOptions::new(Role::Agent, psk),
        max_inflight: 64 << 20,
        quiet: true,
    });
    std::thread::Builder::new()
        .name("demo-agent".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("agent runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("agent listener");
                diskferry_client::accept_loop(listener, config).await;
            });
        })?;
    Ok(addr)
}

/// Compares the source file with what the image reads back, 8 MiB at a time.
fn same_bytes(source: &Path, image: &dyn BlockDevice) -> Result<()> {
    let f = std::fs::File::open(source)?;
    let len = f.metadata()?.len();
    ensure!(len == image.size(), "sizes differ");
    let (mut a, mut b) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(a.len() as u64) as usize;
        f.read_exact_at(&mut a[..n], off)?;
        image.read_at(&mut b[..n], off)?;
        ensure!(
            a[..n] == b[..n],
            "the capture differs from the source near offset {off}"
        );
        off += n as u64;
    }
    Ok(())
}
