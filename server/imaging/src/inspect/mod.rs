//! Seeing inside a disk without mounting it: the partition table, what each partition holds
//! (filesystem, label, UUID, space used), and the operating system found in its files
//! (see [`os`]). Everything is read through [`BlockDevice`]s, so the disk may be remote, local
//! or an image.

pub mod firmware;
pub mod os;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use diskferry_blockdev::BlockDevice;
use diskferry_fs::{self as fs, FsKind};
use diskferry_partition::{self as partition, Partition, PartitionTable, Scheme};
pub use os::OsInfo;

/// What `inspect` reports about a disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskReport {
    pub size: u64,
    pub sector_size: u32,
    pub table: String,
    pub disk_guid: Option<String>,
    pub mbr_signature: Option<String>,
    pub partitions: Vec<VolumeReport>,
    pub warnings: Vec<String>,
    /// The firmware types it boots with.
    #[serde(default)]
    pub firmware: diskferry_customize::compat::FirmwareReport,
}

/// One partition (or the whole disk when it has no table).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeReport {
    /// 1-based as in the table; 0 for a whole disk without a table.
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub type_name: String,
    pub type_id: String,
    pub partition_guid: Option<String>,
    pub name: String,
    pub bootable: bool,
    pub filesystem: String,
    pub label: Option<String>,
    pub uuid: Option<String>,
    pub block_size: Option<u32>,
    pub used_bytes: Option<u64>,
    pub os: Option<OsInfo>,
    /// Why the filesystem could not be read, when it could not.
    pub note: Option<String>,
}

/// Partitions of `disk` holding a Linux system's root (what a customization edits).
pub fn linux_roots(disk: &Arc<dyn BlockDevice>) -> Vec<u32> {
    let Ok((_, volumes)) = volumes(disk) else {
        return Vec::new();
    };
    volumes
        .into_iter()
        .filter(|(_, dev)| fs::open(Arc::clone(dev)).is_ok_and(|f| fs::is_linux_root(&*f)))
        .map(|(p, _)| p.number)
        .collect()
}

/// The filesystem UUIDs of `disk`'s partitions, by partition number (what device names in a
/// system's configuration become when it is reconfigured).
pub fn filesystem_uuids(disk: &Arc<dyn BlockDevice>) -> std::collections::BTreeMap<u32, String> {
    // The filesystems' own identity only: a full `inspect` would also analyse each system.
    let Ok((_, volumes)) = volumes(disk) else {
        return Default::default();
    };
    volumes
        .into_iter()
        .filter_map(|(p, dev)| Some((p.number, fs::open(dev).ok()?.info().uuid)))
        .collect()
}

/// A partition and the device that reads it.
pub type Volume = (Partition, Arc<dyn BlockDevice>);

/// The volumes of a disk: each partition, or the whole disk when there is no table.
pub fn volumes(
    disk: &Arc<dyn BlockDevice>,
) -> Result<(PartitionTable, Vec<Volume>), partition::PartitionError> {
    let table = partition::read_table(&**disk)?;
    let mut out = Vec::new();
    if table.scheme == Scheme::None {
        let whole = Partition {
            number: 0,
            start: 0,
            size: disk.size(),
            kind: partition::PartitionType::Mbr(0),
            guid: None,
            name: String::new(),
            attributes: 0,
            bootable: false,
        };
        out.push((whole, Arc::clone(disk)));
    } else {
        for p in &table.partitions {
            let dev: Arc<dyn BlockDevice> =
                Arc::new(partition::open_partition(Arc::clone(disk), p)?);
            out.push((p.clone(), dev));
        }
    }
    Ok((table, out))
}

/// Reads the table, every partition's filesystem and the OS each holds.
pub fn inspect(disk: &Arc<dyn BlockDevice>) -> Result<DiskReport, partition::PartitionError> {
    let (table, vols) = volumes(disk)?;
    let firmware = firmware::firmware(disk, &table, &vols);
    let partitions = vols
        .into_iter()
        .map(|(p, dev)| volume_report(&p, dev))
        .collect();
    Ok(DiskReport {
        size: disk.size(),
        sector_size: table.sector_size,
        table: table.scheme.name().to_string(),
        disk_guid: table.disk_guid.map(|g| g.to_string()),
        mbr_signature: table.mbr_signature.map(|s| format!("{s:08x}")),
        partitions,
        warnings: table.warnings,
        firmware,
    })
}

fn volume_report(p: &Partition, dev: Arc<dyn BlockDevice>) -> VolumeReport {
    let (type_name, type_id) = match (&p.kind, p.number) {
        (_, 0) => ("whole disk".to_string(), String::new()),
        (partition::PartitionType::Mbr(id), _) => (p.type_name(), format!("0x{id:02x}")),
        (partition::PartitionType::Gpt(g), _) => (p.type_name(), g.to_string()),
    };
    let mut report = VolumeReport {
        number: p.number,
        start: p.start,
        size: p.size,
        type_name,
        type_id,
        partition_guid: p.guid.map(|g| g.to_string()),
        name: p.name.clone(),
        bootable: p.bootable,
        filesystem: FsKind::Unknown.name().to_string(),
        label: None,
        uuid: None,
        block_size: None,
        used_bytes: None,
        os: None,
        note: None,
    };
    if partition::is_bios_boot(&p.kind) {
        report.filesystem = "bios-boot".to_string();
        return report;
    }
    let kind = match fs::detect(&*dev) {
        Ok(k) => k,
        Err(e) => {
            report.note = Some(e.to_string());
            return report;
        }
    };
    report.filesystem = kind.name().to_string();
    if !kind.readable() {
        if kind != FsKind::Unknown {
            report.note = Some(format!("{} is not readable by diskferry yet", kind.name()));
        }
        return report;
    }
    match fs::open(dev) {
        Ok(fs) => {
            let fs: Arc<dyn fs::Filesystem> = Arc::from(fs);
            let info = fs.info();
            report.label = Some(info.label);
            report.uuid = Some(info.uuid);
            report.block_size = Some(info.block_size);
            report.used_bytes = Some(info.used_bytes);
            report.os = os::detect(&*fs);
            if let Some(os) = report.os.as_mut().filter(|o| o.family == "linux") {
                os.system = Some(diskferry_customize::analyze(Arc::clone(&fs)));
            }
            let notes: Vec<String> = fs
                .view_notes()
                .into_iter()
                .chain(fs.rebuild_obstacle().map(|why| {
                    format!("a capture copies its used blocks: it cannot be recreated file by file ({why})")
                }))
                .collect();
            report.note = (!notes.is_empty()).then(|| notes.join("; "));
        }
        Err(e) => report.note = Some(e.to_string()),
    }
    report
}
