//! `diskferry`: the imaging server's command line.

mod browse;
mod capture;
mod chain;
mod customize;
mod demo;
mod deploy;
mod export;
mod extract;
mod images;
mod live;
mod logging;
mod machines;
mod mkfs;
mod multicast;
mod progress_bar;
// Only the README test renders the reference.
#[cfg(test)]
mod reference;
mod serve;
mod vm;
mod when;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use capture::{CaptureArgs, Format, OutputArgs};
use clap::{Args, Parser, Subcommand, ValueEnum};
use diskferry_imaging::pipeline::Mode as DiskMode;
use diskferry_imaging::progress::{Progress, Silent};
use diskferry_imaging::source::{open_source, SourceSpec};
pub(crate) use diskferry_imaging::units::human_bytes;
use diskferry_protocol::{DiskInfo, SessionOptions, StaticKey};
use diskferry_remote::Connection;
use progress_bar::TerminalBar;

/// Large receive buffers are allocated and freed per request; mimalloc keeps that memory
/// mapped instead of returning it to the OS and faulting it back in (measured in bench/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "diskferry",
    version,
    about = "Network disk imaging: capture machines served by diskferry-client into images"
)]
#[command(
    long_about = "Network disk imaging. A machine booted into diskferry-client serves its raw disks over an \
authenticated, encrypted block protocol; diskferry reads them as if they were local and writes images.\n\n\
Remote disks are named DISK@HOST:PORT, e.g. /dev/sda@192.0.2.10:7700. The server side holds a private key \
(create one with `diskferry keygen FILE`); clients are started with its public key (--server-key) and serve \
nobody else."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the disks a diskferry-client serves
    ///
    /// One line per disk: name, size, logical and physical sector size, model, serial and flags
    /// (`ro`, `rotational`).
    Disks {
        /// The client's address, HOST:PORT
        addr: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Copy a disk into an image file
    ///
    /// A partitioned source is captured partition by partition into an equivalent table (same
    /// disk GUID or MBR signature, partition GUIDs, types, names and numbers), with the boot code
    /// in sector 0 and the gap before the first partition; --mode says how each partition is
    /// copied. A source without a partition table gets every non-zero sector.
    ///
    /// OUT is written as OUT.partial and renamed when complete (on failure only OUT.partial
    /// remains); nothing all-zero is written. `--progress json` prints one JSON object per line:
    /// phase, done, total, rate, eta_s; files_done/files_total while a filesystem is recreated
    /// file by file; overall_done/overall_total for the whole disk.
    ///
    /// A machine that dialed back (MACHINE or DISK@MACHINE) is captured by the server holding
    /// its connection, into that server's captures under OUT's file name; the command follows
    /// the job's log.
    Capture(CaptureArgs),
    /// Write an image onto a disk (a client's, or a local file/device), verified afterwards
    ///
    /// The partition table is scaled to the target (the last partition follows when it is
    /// recreated file by file); a target too small is refused before anything is written, with
    /// the numbers; only the chunks that differ from the image are written (zeroed on the client
    /// first; the new filesystems' free space is left as it is); the client hashes what it
    /// wrote again, and every file is compared through the filesystem readers.
    Deploy(deploy::DeployArgs),
    /// Serve an image, a local disk or a client's disk over NBD (qemu, nbdcopy, nbdinfo)
    ///
    /// Read-only by default. With --writable an image's writes go to a redo log (--redo
    /// FILE.qcow2, an overlay kept for later, or --redo ram:SIZE[:SPILLFILE], dropped at
    /// exit): the image itself never changes. Runs until Ctrl-C or SIGTERM; prints the NBD
    /// URL and a qemu command line that boots it.
    Export(export::ExportArgs),
    /// Print a VM that runs a capture: a libvirt domain XML and a qemu command line
    ///
    /// Firmware from the capture's disk (an EFI System Partition: UEFI; otherwise BIOS), the
    /// disk bus and NIC model its OS has drivers for (virtio; AHCI and e1000e for Windows), one
    /// NIC per --mac. The disk is the image file (qemu's -snapshot keeps it unchanged) or an
    /// NBD export of it (--nbd).
    VmConfig(vm::VmConfigArgs),
    /// Run the server: web UI and JSON API for the captures in DATA_DIR, jobs, machines
    Serve(serve::ServeArgs),
    /// List the machines a running server knows (name, MACs, hardware, disks, state)
    ///
    /// States: unregistered, dormant, transitioning, deployed, failed; "(online)" while the
    /// machine is connected. MACs are shown lowercase, colon-separated.
    Machines {
        #[command(flatten)]
        daemon: machines::DaemonArgs,
    },
    /// Where a machine's live deploy is, and finishing it: commit or roll back
    ///
    /// HOST:PORT is the machine's agent (diskferry-client --live). Without --commit or
    /// --rollback, says whether the machine runs its old system (with a live system waiting
    /// for the next boot), a live-deployed one, or neither.
    Live(live::LiveCommandArgs),
    /// Register, rename, reboot or power off a machine known to a running server
    Machine {
        #[command(subcommand)]
        command: machines::MachineCommand,
        #[command(flatten)]
        daemon: machines::DaemonArgs,
    },
    /// Show the main job end to end on this machine: serve a sample disk, capture it, verify it
    Demo {
        /// Work here instead of a new directory under the system's temporary directory (the
        /// files are kept either way; the last lines say where)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Size of the sample disk in MiB
        #[arg(long, default_value_t = 512, value_name = "MIB")]
        size_mib: u64,
    },
    /// Describe an image: format, virtual size, space used on disk, format details
    ///
    /// Format details: for qcow2 the cluster size, version, refcount width, dirty flag and
    /// backing file (named, never opened); for VHDX the block size and logical sector size;
    /// for VHD fixed or dynamic and the block size; for VMDK the subformat and grain (cluster)
    /// size.
    /// A container diskferry recognises but cannot read (VDI, QED, a VMDK descriptor, a VHD
    /// differencing disk, an encrypted qcow2...) is named in an error, never shown as raw.
    Info {
        /// The image (raw, qcow2, VHDX, VHD or VMDK)
        image: PathBuf,
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Create an empty sparse image
    Create {
        /// The image to create
        out: PathBuf,
        /// Virtual size: bytes, or with a unit (K, M, G, T; binary)
        #[arg(long)]
        size: String,
        /// Image format [default: from OUT's extension]
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// VHDX block size: a power of two from 1M to 256M [default: by the disk's size]
        #[arg(long, value_name = "SIZE")]
        vhdx_block_size: Option<String>,
        /// Logical sector size recorded in the image (VHDX): 512 or 4096 (qemu opens only 512;
        /// Hyper-V opens both)
        #[arg(long, default_value_t = 512, value_parser = parse_sector_size)]
        sector_size: u32,
        /// Replace OUT if it exists
        #[arg(long)]
        force: bool,
    },
    /// Convert an image (raw, qcow2, VHDX, VHD or VMDK) into another, keeping it sparse
    ///
    /// Reads raw, qcow2 (versions 2 and 3, zlib- or zstd-compressed clusters), VHDX, VHD
    /// (fixed and dynamic) and VMDK (monolithicSparse and streamOptimized), and
    /// copies only data, with the output rules of `capture`. `--compress` suits archives.
    Convert {
        /// The image to read
        input: PathBuf,
        /// The image to write (written as OUT.partial and renamed when complete)
        out: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// A customized image of IMAGE: hostname, machine-id, SSH host keys, users, files,
    /// network and first-boot commands from a SPEC, made while each Linux root is recreated
    ///
    /// IMAGE is never written. OUT is verified against IMAGE's tree with the same edits;
    /// replaced files stay beside the new ones as *.diskferry-orig. See README
    /// "Customization" for the SPEC.
    Customize(customize::CustomizeCommand),
    /// Create a qcow2 overlay on BASE: reads come from BASE until written; BASE is never changed
    Overlay {
        /// The image to build on (raw or qcow2; referenced by its absolute path)
        base: PathBuf,
        /// The overlay to create (qcow2)
        out: PathBuf,
        /// Replace OUT if it exists
        #[arg(long)]
        force: bool,
    },
    /// Write what a qcow2 overlay holds into its backing file, as `qemu-img commit` does
    ///
    /// Every data and zero cluster of OVERLAY is written into its backing file (raw, or qcow2
    /// version 3), so the backing file alone reads as the chain did; then OVERLAY is removed
    /// (or, with --keep, made empty again: needed when other images in its directory are built
    /// on it). The backing file is written in place: refused when another image in its
    /// directory is built on it. Chunk maps follow: the base gets the
    /// overlay's (its old one is removed before anything is written), so the next incremental
    /// capture can use the base.
    Commit {
        /// The overlay to fold into its backing file
        overlay: PathBuf,
        /// Keep OVERLAY, re-created empty on the base, instead of removing it
        #[arg(long)]
        keep: bool,
        /// Commit even when other images in the base's directory are built on it (they will
        /// read differently afterwards)
        #[arg(long)]
        force: bool,
        /// Progress display: a bar on a terminal, JSON lines, or nothing
        #[arg(long, value_enum, default_value_t = ProgressKind::Bar)]
        progress: ProgressKind,
    },
    /// Point a qcow2 overlay at another backing file without changing what it reads, as
    /// `qemu-img rebase` (safe mode) does
    ///
    /// Every cluster OVERLAY does not hold where its current chain and NEWBASE read
    /// differently is copied into it, then its header names NEWBASE (by absolute path). With C
    /// on B on A, `rebase C --onto A` lets B be deleted; `--onto none` makes OVERLAY a
    /// standalone image. Its chunk map, if any, is re-stamped.
    Rebase {
        /// The overlay to rebase
        overlay: PathBuf,
        /// The new backing file (any image diskferry reads), or `none` (`./none` for a file
        /// of that name)
        #[arg(long, value_name = "NEWBASE")]
        onto: PathBuf,
        /// Progress display: a bar on a terminal, JSON lines, or nothing
        #[arg(long, value_enum, default_value_t = ProgressKind::Bar)]
        progress: ProgressKind,
    },
    /// Show what a disk holds: partition table, filesystems (type, label, UUID, space used)
    /// and the operating system found in their files
    ///
    /// Nothing is mounted. Shows the disk size, the table (GPT, MBR or none; disk GUID or MBR
    /// signature) and per partition its number, start, size, type, filesystem (ntfs, ext2/3/4
    /// and fat12/16/32 are read; exfat, xfs, btrfs, swap, lvm2-pv, luks and bios-boot are
    /// named), label, UUID or serial, used bytes, and the operating system found (Linux:
    /// os-release, hostname, kernels, fstab; Windows: product, edition, version, build and
    /// computer name from the registry; boot loaders).
    Inspect {
        /// DISK@HOST:PORT (a client's disk), a local file or block device, or an image
        /// (qcow2, VHDX, VHD, VMDK)
        source: String,
        /// Pretty-printed JSON instead of a table
        #[arg(long)]
        json: bool,
        /// Read a local qcow2 overlay through its backing file(s) (never done implicitly)
        #[arg(long)]
        follow_backing: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List a directory inside a disk's filesystem (nothing is mounted)
    Ls {
        #[command(flatten)]
        target: browse::Target,
        /// Directory or file inside the filesystem
        #[arg(default_value = "/")]
        path: String,
        /// Long format: type, mode, links, owner, size, modification time (UTC), link target
        #[arg(short = 'l')]
        long: bool,
        /// Everything below PATH
        #[arg(short = 'R')]
        recursive: bool,
    },
    /// Write a file from inside a disk's filesystem to standard output
    Cat {
        #[command(flatten)]
        target: browse::Target,
        /// File inside the filesystem
        path: String,
    },
    /// Copy a file or a whole directory tree out of a disk's filesystem, keeping modes and times
    ///
    /// Access and modification times keep their nanoseconds; symbolic links are recreated;
    /// device nodes, FIFOs and sockets are skipped with a message.
    Get {
        #[command(flatten)]
        target: browse::Target,
        /// File or directory inside the filesystem
        path: String,
        /// Where to write it (an existing directory receives a file under its own name)
        dest: PathBuf,
    },
    /// Build a filesystem image from a directory of this machine (raw, or qcow2/VHDX by the
    /// name's extension)
    ///
    /// ext4: 4 KiB blocks, 256-byte inodes, a journal, extents, flex_bg, metadata_csum, hashed
    /// directories; keeps file bytes, holes, modes, owners, nanosecond times, hard links,
    /// symlinks, device nodes, FIFOs, sockets, xattrs in every namespace and POSIX ACLs. FAT:
    /// FAT12/16/32 by size, long names, read-only/archive attributes, times; symlinks and
    /// device nodes are skipped with a message. A tree too big for --size is refused before
    /// anything is written.
    Mkfs {
        /// The filesystem to build
        #[arg(value_enum)]
        fs: mkfs::FsType,
        /// The image to write (written as OUT.partial and renamed when complete)
        out: PathBuf,
        /// The directory whose contents go into the filesystem
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Filesystem size: bytes, or with a unit (K, M, G, T; binary) [default: what the tree
        /// needs plus 10%]
        #[arg(long)]
        size: Option<String>,
        /// Volume label (FAT: up to 11 characters)
        #[arg(long)]
        label: Option<String>,
        /// Volume identifier (FAT: the serial, XXXX-XXXX)
        #[arg(long)]
        uuid: Option<String>,
        /// Replace OUT if it exists
        #[arg(long)]
        force: bool,
    },
    /// Compare two disks (or images) partition by partition: every file's content and
    /// metadata where both hold a readable filesystem, the bytes elsewhere; exit non-zero on
    /// any difference
    Verify {
        /// The reference: DISK@HOST:PORT, a local file or device, or an image
        a: String,
        /// The disk to check against it
        b: String,
        /// Read qcow2 overlays (incremental captures) through their backing file(s) (never
        /// done implicitly)
        #[arg(long)]
        follow_backing: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Write a new server key, or print the public half of one
    ///
    /// The key file holds 64 hex digits (32 bytes) from the operating system's random source:
    /// the server's private key, for --key-file. Its public key is printed on stdout: give it
    /// to clients as --server-key (it is not secret). `diskferry serve` makes its own,
    /// DATA_DIR/server.key.
    Keygen {
        /// Where to write the key (created with mode 0600; never overwritten)
        file: PathBuf,
        /// Only print the public key of the existing key file
        #[arg(long)]
        public: bool,
    },
}

#[derive(Args)]
pub(crate) struct ConnArgs {
    /// The server's private key file (`diskferry keygen`); clients serve only its holder
    #[arg(long, env = "DISKFERRY_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Ask for an unencrypted transport after authentication (the client must allow it too);
    /// only for trusted links
    #[arg(long)]
    plaintext: bool,
    /// If the client goes away mid-job (restarted, network blip), keep reconnecting for this
    /// many seconds and resume
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    reconnect_for: u64,
}

impl ConnArgs {
    /// The server's private key file, or how to give one.
    pub(crate) fn key_file(&self) -> Result<&Path> {
        self.key_file.as_deref().context(
            "the server key is needed to talk to a client: pass --key-file FILE or set DISKFERRY_KEY_FILE (make one with `diskferry keygen FILE`)",
        )
    }

    pub(crate) fn reconnect(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reconnect_for)
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Mode {
    /// files for ext4 and FAT, blocks for NTFS (and for a volume holding a boot loader in its
    /// first sectors), sectors otherwise (per partition)
    Auto,
    /// Recreate each ext4/FAT filesystem with the same identity, file by file (compact; NTFS
    /// gets blocks, and says so)
    Files,
    /// Copy the clusters each filesystem marks used, at their offsets (the exact filesystem)
    Blocks,
    /// The whole disk, every non-zero sector at its own offset (an exact clone)
    Sectors,
}

impl From<Mode> for DiskMode {
    fn from(m: Mode) -> DiskMode {
        match m {
            Mode::Auto => DiskMode::Auto,
            Mode::Files => DiskMode::Files,
            Mode::Blocks => DiskMode::Blocks,
            Mode::Sectors => DiskMode::Sectors,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ProgressKind {
    /// A bar on a terminal (nothing otherwise)
    Bar,
    /// One JSON object per line on stderr (phase, done, total, rate, eta_s)
    Json,
    /// Nothing
    None,
}

/// Output piped into a reader that stops early (`diskferry inspect … | head`, `grep -q`) ends
/// the program quietly, as a closed pipe ends other command-line tools, instead of a panic
/// message from `println!`.
fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.to_string();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141); // 128 + SIGPIPE, what a shell reports for a closed pipe
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(args) => logging::init_daemon(args.log_format),
        _ => logging::init_command(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if closed_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            let text = error_chain(&e);
            eprintln!("diskferry: error: {text}");
            if text.contains("No space left on device") {
                eprintln!(
                    "diskferry: the disk holding the output is full: free space there or write the output elsewhere"
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// Whether the command failed only because its reader closed stdout (`| head`, `| grep -q`).
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, skipping causes whose text the message already includes (our
/// library errors embed their source so they read well on their own, too).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { file, public } => keygen(&file, public),
        Command::Demo { dir, size_mib } => demo::run(dir, size_mib),
        Command::Serve(args) => serve::run(&args),
        Command::Deploy(args) => deploy::run(&args),
        Command::Live(args) => live::run(&args),
        Command::Customize(args) => customize::run(&args),
        Command::Machines { daemon } => machines::list(&daemon),
        Command::Machine { command, daemon } => machines::machine(&daemon, &command),
        Command::Info { image, json } => images::info(&image, json),
        Command::Create {
            out,
            size,
            format,
            vhdx_block_size,
            sector_size,
            force,
        } => {
            let format = capture::image_format(format, vhdx_block_size.as_deref(), &out)?;
            images::create(&out, &size, format, sector_size, force)
        }
        Command::Convert { input, out, output } => images::convert(
            &input,
            &out,
            output.options(output.format_for(&out)?),
            output.progress,
            output.follow_backing,
        ),
        Command::Overlay { base, out, force } => images::overlay(&base, &out, force),
        Command::Commit {
            overlay,
            keep,
            force,
            progress,
        } => chain::commit(&overlay, keep, force, progress),
        Command::Rebase {
            overlay,
            onto,
            progress,
        } => chain::rebase(&overlay, &onto, progress),
        Command::Mkfs {
            fs,
            out,
            from,
            size,
            label,
            uuid,
            force,
        } => mkfs::mkfs(mkfs::MkfsArgs {
            fs,
            out: &out,
            from: &from,
            size: size.as_deref(),
            label,
            uuid,
            force,
        }),
        Command::Disks { addr, conn } => disks(&addr, &conn),
        Command::Inspect {
            source,
            json,
            follow_backing,
            conn,
        } => browse::inspect(&source, follow_backing, &conn, json),
        Command::Ls {
            target,
            path,
            long,
            recursive,
        } => browse::ls(&target, &path, long, recursive),
        Command::Cat { target, path } => browse::cat(&target, &path),
        Command::Get { target, path, dest } => browse::get(&target, &path, &dest),
        Command::Capture(args) => capture::run(args),
        Command::Export(args) => export::run(&args),
        Command::VmConfig(args) => vm::run(&args),
        Command::Verify {
            a,
            b,
            follow_backing,
            conn,
        } => {
            let rt = runtime()?;
            let open = |s: &str| -> Result<Arc<dyn diskferry_blockdev::BlockDevice>> {
                let spec = SourceSpec::parse(s);
                let opts = match &spec {
                    SourceSpec::Remote { .. } => Some(session(&conn)?),
                    SourceSpec::Local(_) => None,
                };
                open_source(
                    &spec,
                    rt.handle(),
                    opts.as_ref(),
                    follow_backing,
                    conn.reconnect(),
                )
                .with_context(|| format!("cannot open {s}"))
            };
            capture::verify_and_report(&open(&a)?, &open(&b)?)
        }
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub(crate) fn session(conn: &ConnArgs) -> Result<SessionOptions> {
    let mut opts = SessionOptions::controller(StaticKey::from_file(conn.key_file()?)?);
    opts.plaintext = conn.plaintext;
    Ok(opts)
}

fn keygen(file: &Path, public_only: bool) -> Result<()> {
    let key = if public_only {
        StaticKey::from_file(file)?
    } else {
        let key = StaticKey::create_file(file).with_context(|| {
            format!(
                "cannot create key file {} (it must not exist yet)",
                file.display()
            )
        })?;
        eprintln!(
            "wrote a new server key to {} (keep it private); its public key, for --server-key:",
            file.display()
        );
        key
    };
    println!("{}", key.public());
    Ok(())
}

fn disks(addr: &str, conn: &ConnArgs) -> Result<()> {
    let opts = session(conn)?;
    let rt = runtime()?;
    let list = rt.block_on(async {
        let c = Connection::connect(addr, &opts).await?;
        anyhow::Ok(c.list_disks().await?)
    })?;
    print_disks(&list);
    Ok(())
}

/// Accepts the two logical sector sizes disks and images use.
fn parse_sector_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("{s} is not a logical sector size: use 512 or 4096")),
    }
}

/// A progress bar when asked for and stderr is a terminal; silence otherwise.
pub(crate) fn progress_for(kind: ProgressKind) -> Box<dyn Progress> {
    match (kind, TerminalBar::if_terminal()) {
        (ProgressKind::Bar, Some(bar)) => Box::new(bar),
        (ProgressKind::Json, _) => Box::new(diskferry_imaging::progress::JsonLines::default()),
        _ => Box::new(Silent),
    }
}

/// Prints a client's disks as a table.
fn print_disks(list: &[DiskInfo]) {
    let w = list.iter().map(|d| d.name.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<w$} {:>10} {:>8} {:>8} {:<24} {:<20} FLAGS",
        "NAME", "SIZE", "LOGICAL", "PHYSICAL", "MODEL", "SERIAL"
    );
    for d in list {
        let mut flags = Vec::new();
        if d.read_only {
            flags.push("ro");
        }
        if d.rotational {
            flags.push("rotational");
        }
        println!(
            "{:<w$} {:>10} {:>8} {:>8} {:<24} {:<20} {}",
            d.name,
            human_bytes(d.size),
            d.logical_sector,
            d.physical_sector,
            d.model,
            d.serial,
            flags.join(",")
        );
    }
}
