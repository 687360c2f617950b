//! `diskferry demo`: the main job end to end on this machine, with nothing to set up.
//!
//! It builds a sample source disk with diskferry's own writers — a GPT with a FAT32 EFI System
//! Partition and an ext4 root holding a small Linux-like tree — serves it with the real agent
//! code on a loopback port (in-process, encrypted, authenticated with a fresh key), lists the
//! agent's disks, inspects the disk over the wire, captures it into a VHDX (auto mode: both
//! filesystems recreated file by file) and verifies the capture file by file; `qemu-img check`
//! judges the VHDX when it is installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use diskferry_blockdev::{BlockDevice, FileDevice, SliceDevice};
use diskferry_client::disks::DiskSpec;
use diskferry_fs::ext4::write::{write_ext4, Ext4Options};
use diskferry_fs::fat_write::{write_fat, FatOptions};
use diskferry_fs::host::HostFs;
use diskferry_fs::FsKind;
use diskferry_imaging::pipeline::{Mode, OutputOptions};
use diskferry_imaging::source::{open_source, SourceSpec};
use diskferry_imaging::{CaptureOptions, CaptureOutcome, CaptureSummary};
use diskferry_partition::{
    self as partition, Guid, Partition, PartitionTable, PartitionType, Scheme,
};
use diskferry_protocol::{PublicKey, SessionOptions, StaticKey};
use diskferry_remote::Connection;
use diskferry_vdisk::ImageFormat;

use crate::{human_bytes, print_disks, progress_for, ProgressKind};

const MIB: u64 = 1 << 20;
const ESP_MIB: u64 = 64;

pub fn run(dir: Option<PathBuf>, size_mib: u64) -> Result<()> {
    ensure!(size_mib >= 256, "--size-mib must be at least 256");
    let base = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("diskferry-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    demo(&base, size_mib * MIB)
}

fn demo(base: &Path, size: u64) -> Result<()> {
    println!("diskferry demo — working in {}\n", base.display());
    let key_file = base.join("server.key");
    let _ = std::fs::remove_file(&key_file);
    let server_key = StaticKey::create_file(&key_file)?;

    let source = base.join("source.img");
    build_sample_disk(base, &source, size)?;
    println!(
        "1. built a sample disk {} ({}) with diskferry's own writers: GPT, a FAT32 EFI System\n   Partition and an ext4 root holding a small Debian-like tree",
        source.display(),
        human_bytes(size)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let addr = start_agent(&source, server_key.public())?;
    println!("2. started the agent (the code of diskferry-client) on {addr}, read-only; it serves only\n   the holder of server key {} (Noise XK)\n", server_key.public().fingerprint());
    let session = SessionOptions::controller(server_key);
    list_agent_disks(&rt, &addr, &session)?;

    let name = source.display().to_string();
    let remote = format!("{name}@{addr}");
    let spec = SourceSpec::Remote {
        disk: name,
        addr: addr.clone(),
    };
    let reconnect = diskferry_imaging::source::DEFAULT_RECONNECT;
    let src = open_source(&spec, rt.handle(), Some(&session), false, reconnect)?;
    let used = show_inspection(&src, &remote)?;

    let out = base.join("capture.vhdx");
    println!("\n5. `diskferry capture {remote} {} --verify` (auto mode: ext4 and FAT recreated file by file):", out.display());
    let outcome = capture_and_verify(src, &out)?;
    print_figures(&outcome, size, used)?;
    qemu_check(&out)?;
    println!(
        "\nThe capture is {} (Hyper-V boots VHDX directly; remove {} when done).\n\
         On real machines: make a server key (diskferry keygen server.key), boot\n\
         diskferry-client --listen 0.0.0.0:7700 --server-key PUBLIC-KEY on the source, then run\n\
         diskferry inspect DISK@HOST:7700 --key-file server.key and\n\
         diskferry capture DISK@HOST:7700 OUT.vhdx --key-file server.key --verify.",
        out.display(),
        base.display()
    );
    Ok(())
}

/// Step 3: the agent's disks, as `diskferry disks` shows them.
fn list_agent_disks(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    session: &SessionOptions,
) -> Result<()> {
    let disks = rt.block_on(async {
        anyhow::Ok(
            Connection::connect(addr, session)
                .await?
                .list_disks()
                .await?,
        )
    })?;
    println!("3. `diskferry disks {addr}` sees:");
    print_disks(&disks);
    Ok(())
}

/// Step 4: `inspect` over the wire; returns the bytes the filesystems use.
fn show_inspection(src: &Arc<dyn BlockDevice>, remote: &str) -> Result<u64> {
    let report = diskferry_imaging::inspect::inspect(src)?;
    println!("\n4. `diskferry inspect {remote}` over the wire:");
    for p in &report.partitions {
        println!(
            "   partition {}: {}, {}, label {:?}, {} used{}",
            p.number,
            p.type_name,
            p.filesystem,
            p.label.as_deref().unwrap_or(""),
            human_bytes(p.used_bytes.unwrap_or(0)),
            p.os.as_ref()
                .and_then(|o| o.pretty_name.clone())
                .map(|n| format!(" — {n}"))
                .unwrap_or_default()
        );
    }
    Ok(report.partitions.iter().filter_map(|p| p.used_bytes).sum())
}

/// Step 5: the capture, through the same function `diskferry capture` calls, verified.
fn capture_and_verify(src: Arc<dyn BlockDevice>, out: &Path) -> Result<CaptureOutcome> {
    let progress = progress_for(ProgressKind::Bar);
    let options = CaptureOptions {
        output: OutputOptions {
            format: ImageFormat::from_extension(out),
            compress: false,
            overwrite: true,
        },
        mode: Mode::Auto,
        size: None,
        verify: true,
        chunk_map: false,
        base: None,
        transform: None,
    };
    Ok(diskferry_imaging::capture(
        src,
        out,
        &options,
        progress.as_ref(),
    )?)
}

fn print_figures(outcome: &CaptureOutcome, size: u64, used: u64) -> Result<()> {
    let CaptureSummary::Partitions(captured) = &outcome.summary else {
        anyhow::bail!("the sample disk has a partition table: expected a partition capture");
    };
    let verified = outcome
        .verify
        .as_ref()
        .context("the capture was to be verified")?;
    let read: u64 = captured.partitions.iter().map(|p| p.read).sum::<u64>() + captured.boot_bytes;
    let on_disk = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&outcome.out)?.blocks() * 512
    };
    println!(
        "\n   source disk           {}\n   used by filesystems   {}\n   read over the wire    {}\n   output (VHDX)         {} on disk, {} virtual\n   time                  {:.2} s\n   verify                no differences ({} files, {} compared)",
        human_bytes(size),
        human_bytes(used),
        human_bytes(read),
        human_bytes(on_disk),
        human_bytes(captured.output_size),
        captured.elapsed.as_secs_f64(),
        verified.files_compared,
        human_bytes(verified.bytes_compared)
    );
    Ok(())
}

/// qemu-img, when installed, judges the VHDX too.
fn qemu_check(out: &Path) -> Result<()> {
    match std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(out)
        .output()
    {
        Ok(o) if o.status.success() => println!("   qemu-img check        no errors"),
        Ok(o) => anyhow::bail!(
            "qemu-img check found problems:\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(_) => println!("   (install qemu-utils to have qemu-img check it too)"),
    }
    Ok(())
}

/// Writes a sample tree to `dir/tree`: what a small Debian system keeps in /etc, /boot and
/// /usr, a hard link, symlinks, many small files and a larger one.
fn sample_tree(dir: &Path) -> Result<PathBuf> {
    let t = dir.join("tree");
    let w = |rel: &str, data: &[u8]| -> Result<()> {
        let p = t.join(rel);
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(&p, data)?;
        Ok(())
    };
    w("usr/lib/os-release", b"PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n")?;
    w("etc/hostname", b"demo-host\n")?;
    w(
        "etc/fstab",
        b"UUID=1f2e3d4c-0000-4000-8000-0123456789ab / ext4 errors=remount-ro 0 1\n",
    )?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    w("boot/vmlinuz-6.1.0-21-amd64", &noise(8 << 20))?;
    w(
        "lib/modules/6.1.0-21-amd64/modules.dep",
        b"kernel/drivers/virtio.ko:\n",
    )?;
    for i in 0..500 {
        w(
            &format!("usr/share/doc/pkg{:03}/copyright", i),
            &noise(1000 + i * 7),
        )?;
    }
    w("var/lib/data.bin", &noise(24 << 20))?;
    std::os::unix::fs::symlink("../usr/lib/os-release", t.join("etc/os-release"))?;
    std::os::unix::fs::symlink("/boot/vmlinuz-6.1.0-21-amd64", t.join("vmlinuz"))?;
    std::fs::hard_link(t.join("etc/hostname"), t.join("etc/hostname.bak"))?;
    std::fs::create_dir_all(t.join("home/user"))?;
    Ok(t)
}

/// A GPT disk: a FAT32 ESP with a boot loader file, and an ext4 root with the sample tree.
fn build_sample_disk(base: &Path, path: &Path, size: u64) -> Result<()> {
    let _ = std::fs::remove_dir_all(base.join("tree"));
    let _ = std::fs::remove_dir_all(base.join("esp"));
    let tree = sample_tree(base)?;
    let esp = base.join("esp/EFI/BOOT");
    std::fs::create_dir_all(&esp)?;
    std::fs::write(esp.join("BOOTX64.EFI"), b"a boot loader would be here")?;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    drop(f);
    let disk: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, true)?);
    let guid = |s: &str| Guid::parse(s).expect("a valid GUID");
    let root_start = (1 + ESP_MIB) * MIB;
    let root_end = size - MIB;
    let table = PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: 512,
        disk_guid: Some(guid("5D1F0A3E-7C44-4B8E-9A61-2F3B4C5D6E7F")),
        mbr_signature: None,
        partitions: vec![
            Partition {
                number: 1,
                start: MIB,
                size: ESP_MIB * MIB,
                kind: PartitionType::Gpt(guid(partition::gpt_types::EFI_SYSTEM)),
                guid: Some(guid("0B1C2D3E-4F50-4617-8899-AABBCCDDEEFF")),
                name: "EFI System Partition".into(),
                attributes: 0,
                bootable: false,
            },
            Partition {
                number: 2,
                start: root_start,
                size: root_end - root_start,
                kind: PartitionType::Gpt(guid(partition::gpt_types::LINUX_FILESYSTEM)),
                guid: Some(guid("1F2E3D4C-0000-4000-8000-0123456789AB")),
                name: "root".into(),
                attributes: 0,
                bootable: false,
            },
        ],
        gpt_entries: 128,
        mbr_extended: None,
        warnings: Vec::new(),
    };
    partition::write_table(&*disk, &table)?;
    let slice = |p: &Partition| -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(SliceDevice::new(
            Arc::clone(&disk),
            p.start,
            p.size,
        )?))
    };
    write_fat(
        slice(&table.partitions[0])?,
        &HostFs::open(&base.join("esp"))?,
        &FatOptions {
            kind: Some(FsKind::Fat32),
            label: Some("ESP".into()),
            cluster_size: Some(512),
            serial: Some(0x1234_abcd),
            ..FatOptions::default()
        },
    )?;
    write_ext4(
        slice(&table.partitions[1])?,
        &HostFs::open(&tree)?,
        &Ext4Options {
            label: Some("rootfs".into()),
            ..Ext4Options::default()
        },
    )?;
    disk.flush()?;
    Ok(())
}

/// Runs the agent on its own thread with its own single-threaded runtime, as the real client.
fn start_agent(disk: &Path, server: PublicKey) -> Result<String> {
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
        session: SessionOptions::agent(StaticKey::generate(), server),
        max_inflight: 64 << 20,
        quiet: true,
        allow_power: false,
        allow_firmware: false,
        live: None,
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
                diskferry_client::accept_loop(listener, config, 4).await;
            });
        })?;
    Ok(addr)
}
