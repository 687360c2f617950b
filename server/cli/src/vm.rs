//! `diskferry vm-config IMAGE`: a VM that runs a capture at once — a libvirt domain XML and a
//! qemu command line, with the firmware, disk bus and NICs the capture needs (see
//! `diskferry_imaging::vmconfig`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diskferry_imaging::vmconfig::{firmware_of, is_windows, normalize_mac, VmConfig, VmDisk};

#[derive(Args)]
pub(crate) struct VmConfigArgs {
    /// The capture (raw, qcow2 — backing files followed —, VHDX, VHD, VMDK): inspected for its
    /// firmware (an EFI System Partition means UEFI) and its OS (Windows gets AHCI and e1000e)
    image: PathBuf,
    /// Boot from this NBD export of it instead of the file (`diskferry export` prints it):
    /// nbd://HOST:PORT/NAME
    #[arg(long, value_name = "URL")]
    nbd: Option<String>,
    /// The VM's name [default: the image's file name without extension]
    #[arg(long)]
    name: Option<String>,
    /// Memory in MiB
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    memory: u64,
    /// Virtual CPUs
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// A NIC with this MAC (repeatable: one NIC each, e.g. the source machine's MACs, so its
    /// network configuration finds its interfaces); none: one NIC with a generated MAC
    #[arg(long = "mac", value_name = "MAC")]
    macs: Vec<String>,
    /// What to print
    #[arg(long, value_enum, default_value_t = VmOutput::Both)]
    output: VmOutput,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VmOutput {
    /// The libvirt domain XML (`virsh define`)
    Libvirt,
    /// The qemu-system-x86_64 command line
    Qemu,
    /// Both, each after a comment line
    Both,
}

pub(crate) fn run(args: &VmConfigArgs) -> Result<()> {
    let (detected, device) = diskferry_vdisk::open_image(&args.image, true)
        .with_context(|| format!("opening {}", args.image.display()))?;
    let report = diskferry_imaging::inspect::inspect(&device)
        .with_context(|| format!("reading the partition table of {}", args.image.display()))?;
    let macs = args
        .macs
        .iter()
        .map(|m| normalize_mac(m).with_context(|| format!("--mac {m}: not a unicast MAC address")))
        .collect::<Result<Vec<_>>>()?;
    let disk = match &args.nbd {
        Some(url) => parse_nbd_url(url)?,
        None => VmDisk::File {
            path: std::fs::canonicalize(&args.image)?,
            format: detected.qemu_name().to_string(),
        },
    };
    let name = args.name.clone().unwrap_or_else(|| {
        args.image
            .file_stem()
            .map_or_else(|| "capture".into(), |s| s.to_string_lossy().into_owned())
    });
    let config = VmConfig {
        name,
        firmware: firmware_of(&report),
        emulated_devices: is_windows(&report),
        memory_mib: args.memory.max(64),
        cpus: args.cpus.max(1),
        macs,
        disk,
    };
    match args.output {
        VmOutput::Libvirt => print!("{}", config.libvirt_xml()),
        VmOutput::Qemu => println!("{}", config.qemu_command()),
        VmOutput::Both => {
            println!(
                "<!-- libvirt: save as {}.xml, then virsh define {0}.xml -->",
                config.name
            );
            print!("{}", config.libvirt_xml());
            println!("# qemu:\n{}", config.qemu_command());
        }
    }
    Ok(())
}

/// `nbd://HOST:PORT/NAME` (port 10809 when left out).
pub(crate) fn parse_nbd_url(url: &str) -> Result<VmDisk> {
    let Some(rest) = url.strip_prefix("nbd://") else {
        bail!("{url}: an NBD URL starts with nbd://");
    };
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().with_context(|| format!("{url}: port"))?),
        None => (authority, 10809),
    };
    if host.is_empty() {
        bail!("{url}: no host");
    }
    Ok(VmDisk::Nbd {
        host: host.to_string(),
        port,
        export: export.to_string(),
    })
}
