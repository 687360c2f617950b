//! `inspect`, `ls`, `cat` and `get`: looking inside a disk (remote, local or an image) without
//! mounting it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use diskferry_blockdev::BlockDevice;
use diskferry_fs::{self as fs, FileKind, Filesystem, Metadata, NodeId, Timestamp};
use diskferry_imaging::inspect::{self, DiskReport};
use diskferry_imaging::source::{open_source, SourceSpec};

use crate::extract::Dir;
use crate::human_bytes;
use crate::ConnArgs;

/// Where to look: a disk and, inside it, a partition.
#[derive(Args)]
pub struct Target {
    /// DISK@HOST:PORT (a client's disk), a local file or block device, or an image
    /// (qcow2, VHDX, VHD, VMDK)
    source: String,
    /// Partition number, as in the table (from 1) [default: the only or first readable one]
    #[arg(short = 'p', long = "partition", value_name = "N")]
    partition: Option<u32>,
    /// Read a local qcow2 overlay through its backing file(s) (never done implicitly)
    #[arg(long)]
    follow_backing: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

/// An opened source; the runtime stays alive as long as a remote disk is in use.
struct Opened {
    disk: Arc<dyn BlockDevice>,
    _rt: tokio::runtime::Runtime,
}

fn open_disk(source: &str, follow_backing: bool, conn: &ConnArgs) -> Result<Opened> {
    let spec = SourceSpec::parse(source);
    let rt = crate::runtime()?;
    let session = match &spec {
        SourceSpec::Remote { .. } => Some(crate::session(conn)?),
        SourceSpec::Local(_) => None,
    };
    let disk = open_source(
        &spec,
        rt.handle(),
        session.as_ref(),
        follow_backing,
        conn.reconnect(),
    )
    .with_context(|| format!("cannot open {source}"))?;
    Ok(Opened { disk, _rt: rt })
}

impl Target {
    /// The filesystem of the chosen partition.
    fn open(&self) -> Result<(Opened, Box<dyn Filesystem>)> {
        let opened = open_disk(&self.source, self.follow_backing, &self.conn)?;
        let (_, vols) = inspect::volumes(&opened.disk)?;
        let describe = || {
            vols.iter()
                .map(|(p, d)| {
                    let kind = fs::detect(&**d).map_or("unreadable", |k| k.name());
                    format!("{} ({kind})", p.number)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let dev = match self.partition {
            Some(n) => vols
                .iter()
                .find(|(p, _)| p.number == n)
                .map(|(_, d)| Arc::clone(d))
                .with_context(|| {
                    format!(
                        "no partition {n} on {}; it has: {}",
                        self.source,
                        describe()
                    )
                })?,
            None => vols
                .iter()
                .find(|(_, d)| fs::detect(&**d).is_ok_and(|k| k.readable()))
                .map(|(_, d)| Arc::clone(d))
                .with_context(|| {
                    format!(
                        "no readable filesystem on {}; volumes: {}",
                        self.source,
                        describe()
                    )
                })?,
        };
        let fs = fs::open(dev)?;
        Ok((opened, fs))
    }
}

pub fn inspect(source: &str, follow_backing: bool, conn: &ConnArgs, json: bool) -> Result<()> {
    let opened = open_disk(source, follow_backing, conn)?;
    let report = inspect::inspect(&opened.disk)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &DiskReport) {
    println!("disk size:      {} ({} bytes)", human_bytes(r.size), r.size);
    println!("partition table: {}", r.table);
    if let Some(g) = &r.disk_guid {
        println!("disk GUID:      {g}");
    }
    if let Some(s) = &r.mbr_signature {
        println!("MBR signature:  {s}");
    }
    println!("boots with:     {}", r.firmware.summary());
    if !r.firmware.evidence.is_empty() {
        println!("                ({})", r.firmware.evidence.join("; "));
    }
    for w in &r.warnings {
        println!("warning:        {w}");
    }
    println!();
    println!(
        "{:>3}  {:>12}  {:>10}  {:<22} {:<9} {:<16} {:>10}  UUID",
        "#", "START", "SIZE", "TYPE", "FS", "LABEL", "USED"
    );
    for p in &r.partitions {
        println!(
            "{:>3}  {:>12}  {:>10}  {:<22} {:<9} {:<16} {:>10}  {}",
            p.number,
            p.start,
            human_bytes(p.size),
            p.type_name,
            p.filesystem,
            p.label.as_deref().unwrap_or("-"),
            p.used_bytes.map_or("-".into(), human_bytes),
            p.uuid.as_deref().unwrap_or("-"),
        );
        if let Some(os) = &p.os {
            if let Some(name) = os.pretty_name.as_ref().or(os.name.as_ref()) {
                println!("       OS: {name} ({})", os.family);
            }
            if let Some(h) = &os.hostname {
                println!("       hostname: {h}");
            }
            if !os.kernels.is_empty() {
                println!("       kernels: {}", os.kernels.join(", "));
            }
            if !os.bootloaders.is_empty() {
                println!("       boot: {}", os.bootloaders.join(", "));
            }
            if let Some(sys) = &os.system {
                print_system(sys);
            }
        }
        if let Some(note) = &p.note {
            println!("       note: {note}");
        }
    }
}

/// A Linux system's hardware-dependent configuration, under its partition's line.
fn print_system(sys: &diskferry_customize::SystemReport) {
    let list = |l: &[String]| {
        if l.is_empty() {
            "-".to_string()
        } else {
            l.join(" ")
        }
    };
    for r in &sys.initramfs {
        match &r.error {
            Some(e) => println!("       initramfs {}: unreadable: {e}", r.path),
            None => println!(
                "       initramfs {} ({}, {}): storage {}; network {}",
                r.path,
                r.builder,
                r.compression,
                list(&r.storage_drivers),
                list(&r.network_drivers),
            ),
        }
        println!(
            "       kernel {}: storage built in {}; {} network modules ({} with --json)",
            r.kernel,
            list(&r.builtin_storage),
            r.network_modules.len(),
            if r.network_modules.is_empty() {
                "none"
            } else {
                "listed"
            },
        );
    }
    let pinned = if sys.mac_pinned.is_empty() {
        "not pinned to MAC addresses".to_string()
    } else {
        format!("pinned to MAC addresses in {}", sys.mac_pinned.join(", "))
    };
    println!("       network: {}, {pinned}", sys.network_tool);
    let root = |r: &Option<String>| r.clone().unwrap_or_else(|| "-".into());
    println!(
        "       root named by: fstab {}, boot menu {}",
        root(&sys.root_in_fstab),
        root(&sys.root_in_boot_menu)
    );
}

/// `ls`: a directory's entries (or one file), long format with `-l`, recursive with `-R`.
pub fn ls(target: &Target, path: &str, long: bool, recursive: bool) -> Result<()> {
    let (_opened, fs) = target.open()?;
    let node = fs.lookup(path)?;
    let meta = fs.metadata(node)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if meta.kind != FileKind::Dir {
        print_entry(&mut out, &*fs, path, &meta, long)?;
        return Ok(out.flush()?);
    }
    let mut errors = 0;
    if recursive {
        fs::tree::walk(
            &*fs,
            node,
            &mut |rel, e| {
                let meta = fs.metadata(e.node)?;
                print_entry(&mut out, &*fs, rel, &meta, long).map_err(io_to_fs)
            },
            &mut |p, e| {
                errors += 1;
                eprintln!("diskferry: {p}: {e}");
            },
        )?;
    } else {
        let mut entries = fs.read_dir(node)?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for e in entries {
            match fs.metadata(e.node) {
                Ok(meta) => print_entry(&mut out, &*fs, &e.name_lossy(), &meta, long)?,
                Err(err) => {
                    errors += 1;
                    eprintln!("diskferry: {}: {err}", e.name_lossy());
                }
            }
        }
    }
    out.flush()?;
    if errors > 0 {
        bail!("{errors} entries could not be read");
    }
    Ok(())
}

fn io_to_fs(e: std::io::Error) -> fs::FsError {
    fs::FsError::Io(diskferry_blockdev::BlockError::Io {
        op: "write",
        offset: None,
        device: "stdout".into(),
        source: e,
    })
}

fn print_entry(
    out: &mut impl Write,
    fs: &dyn Filesystem,
    name: &str,
    m: &Metadata,
    long: bool,
) -> std::io::Result<()> {
    if !long {
        return writeln!(out, "{name}");
    }
    let target = if m.kind == FileKind::Symlink {
        fs.read_link(m.node)
            .map(|t| format!(" -> {}", String::from_utf8_lossy(&t)))
            .unwrap_or_default()
    } else {
        String::new()
    };
    let size = match m.device {
        Some((major, minor)) => format!("{major}, {minor}"),
        None => m.size.to_string(),
    };
    writeln!(
        out,
        "{}{} {:>3} {:>5} {:>5} {:>12} {} {name}{target}",
        m.kind.letter(),
        fs::mode_string(m.mode),
        m.links,
        m.uid,
        m.gid,
        size,
        m.mtime.map_or("-".into(), Timestamp::utc_string),
    )
}

/// `cat`: a file's bytes to stdout (symbolic links followed inside the filesystem).
pub fn cat(target: &Target, path: &str) -> Result<()> {
    let (_opened, fs) = target.open()?;
    let node = fs.resolve(path)?;
    let meta = fs.metadata(node)?;
    if meta.kind != FileKind::File {
        bail!("{path} is a {}, not a file", meta.kind.name());
    }
    let mut out = std::io::stdout().lock();
    copy_out(&*fs, node, meta.size, &mut out)?;
    Ok(out.flush()?)
}

pub(crate) fn copy_out(
    fs: &dyn Filesystem,
    node: NodeId,
    size: u64,
    out: &mut impl Write,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = fs.read_at(node, at, &mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// `get`: copies a file or a whole tree out, keeping modes, times and (as root) owners. Names
/// from the image never choose where files land (see [`crate::extract`]).
pub fn get(target: &Target, path: &str, dest: &Path) -> Result<()> {
    let (_opened, fs) = target.open()?;
    let node = fs.lookup(path)?;
    let meta = fs.metadata(node)?;
    if meta.kind != FileKind::Dir {
        return get_one(&*fs, &meta, path, dest);
    }
    let root = Dir::destination(dest)?;
    // Each directory made so far, by node: the checked names that lead to it from DEST.
    let mut made: HashMap<NodeId, Vec<OsString>> = HashMap::from([(node, Vec::new())]);
    let mut order: Vec<(NodeId, Metadata)> = Vec::new();
    let mut failures = 0u64;
    let mut fail = |what: &dyn std::fmt::Display| {
        failures += 1;
        eprintln!("diskferry: {what}");
    };
    // One bounded walk; a file's bytes count against the volume's budget, so links to one
    // large file cannot fill the destination without end.
    let limits = fs::tree::Limits::for_volume(fs.info().total_bytes);
    let mut walk = fs::tree::Walk::new(&*fs, node, limits);
    while let Some(item) = walk.next() {
        let (rel, e) = match item {
            Ok(found) => found,
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                fail(&e);
                continue;
            }
        };
        // Below a directory that was refused or not made: nothing (its failure is reported).
        let Some(at) = made.get(&walk.parent()).cloned() else {
            continue;
        };
        let meta = fs.metadata(e.node)?;
        if meta.kind == FileKind::File {
            walk.charge_bytes(meta.size)?;
        }
        let parent = root.open_below(&at)?;
        match put(&*fs, &parent, &e.name, &meta) {
            Ok(Some(name)) => {
                let mut names = at;
                names.push(name);
                made.insert(e.node, names);
                order.push((e.node, meta));
            }
            Ok(None) => {}
            Err(err) => fail(&format_args!("{rel}: {err:#}")),
        }
    }
    // Directory modes and times last, deepest first, once nothing more is written into them.
    for (dir, meta) in order.iter().rev() {
        root.open_below(&made[dir])?.finish(meta)?;
    }
    root.finish(&meta)?;
    if failures > 0 {
        bail!("{failures} entries could not be copied");
    }
    Ok(())
}

/// Writes one entry into `parent`; a directory's checked name when one was made.
fn put(
    fs: &dyn Filesystem,
    parent: &Dir,
    name: &[u8],
    meta: &Metadata,
) -> Result<Option<OsString>> {
    match meta.kind {
        FileKind::Dir => parent.make_dir(name).map(Some),
        FileKind::File => parent.write_file(name, fs, meta).map(|()| None),
        FileKind::Symlink => {
            let target = fs.read_link(meta.node)?;
            parent.write_symlink(name, &target, meta).map(|()| None)
        }
        other => {
            eprintln!(
                "diskferry: {}: a {} is not copied out",
                String::from_utf8_lossy(name),
                other.name()
            );
            Ok(None)
        }
    }
}

/// `get` of one file or link: into DEST, or into the directory DEST under its own name.
fn get_one(fs: &dyn Filesystem, meta: &Metadata, path: &str, dest: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let (dir, name) = if dest.is_dir() {
        let name = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("file");
        (dest.to_path_buf(), name.as_bytes().to_vec())
    } else {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
        let name = dest.file_name().context("DEST names no file")?;
        (
            parent.map_or_else(|| Path::new(".").to_path_buf(), Path::to_path_buf),
            name.as_bytes().to_vec(),
        )
    };
    let dir = Dir::destination(&dir)?;
    put(fs, &dir, &name, meta).map(|_| ())
}
