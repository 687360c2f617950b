//! Live deploys: a new Linux system written into one pinned file of a running one, whose
//! agent runs inside it with `--live`, then booted once and kept or rolled back.
//!
//! 1. The image's Linux root is picked ([`pick_root`]) and sized ([`default_size`], or as
//!    asked).
//! 2. The agent creates and pins a file of that size and answers its file-to-sector map
//!    (`LivePrepare`).
//! 3. The new filesystem's place is the disk range the file covers ([`window`]): blocks of
//!    the range the file does not own are the running system's, and the new ext4 lists them
//!    as bad (the writer keeps its metadata off them and never writes them; the agent
//!    refuses writes outside the file anyway).
//! 4. The image's root is written there file by file, with the image's identity (UUID,
//!    label, features) and any customization, then read back and compared with the source.
//! 5. The boot is switched ([`boot`]): a partition entry covering the range, and a GRUB menu
//!    entry booted once.
//! 6. After the reboot, [`flow::finish`] commits when the new system's agent answers, or
//!    rolls back when the old one does.
//!
//! If anything fails before the boot is switched, the file is removed again: the running
//! system is as it was.

pub mod agent;
pub mod boot;
pub mod flow;
pub mod loader;
mod padded;
pub mod takeover;
pub mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use diskferry_blockdev::{BlockDevice, SliceDevice};
use diskferry_fs::ext4::write::{suggested_size, write_ext4};
use diskferry_fs::ext4::Ext4;
use diskferry_fs::overlay::TreeTransform;
use diskferry_fs::{self as fs, Filesystem};
use diskferry_protocol::{LiveMap, Reply, Request};
use diskferry_remote::{Connection, Redial};

use crate::inspect;
use crate::pipeline::verify::{compare_trees, VerifyReport};
use crate::progress::Progress;
use crate::source::{open_on_connection, Patience, SourceError};
pub use window::{window, Window, WindowError};

/// Block size of a live root filesystem.
const BLOCK: u64 = 4096;

/// Why a live deploy stopped.
#[derive(Debug, thiserror::Error)]
pub enum LiveDeployError {
    #[error(
        "the image holds no Linux root filesystem (ext2/3/4 with /etc/os-release) to deploy live"
    )]
    NoRoot,
    #[error(
        "the image holds {0} Linux root filesystems (partitions {1}); a live deploy writes one"
    )]
    ManyRoots(usize, String),
    #[error("the image's root filesystem: {0}")]
    Source(String),
    #[error("the agent: {0}")]
    Agent(String),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Open(#[from] SourceError),
    #[error("writing the live system: {0}")]
    Write(String),
    #[error(
        "the live system read back differs from the image ({differences} differences): {first}"
    )]
    Differs { differences: u64, first: String },
    #[error("switching the boot: {0}")]
    Boot(String),
    #[error("the live file is on {actual}, not on {asked}: name that disk")]
    OtherDisk { asked: String, actual: String },
    #[error("the agent is not in live mode: start diskferry-client with --live inside the running system")]
    NotLive,
    #[error("{0}")]
    Timeout(&'static str),
}

/// How to deploy.
#[derive(Default)]
pub struct LiveOptions {
    /// The live file's size; [`default_size`] when not given.
    pub size: Option<u64>,
    /// Customization of the new system (and the files a live deploy adds to it).
    pub transform: Option<Arc<dyn TreeTransform>>,
    /// The disk the user named: the live file must be on it.
    pub disk: Option<String>,
}

/// The agent to deploy through: a connection for its live requests, and how to open its disk
/// (reconnecting as every deploy does).
pub struct LiveTarget<'a> {
    pub rt: &'a tokio::runtime::Handle,
    pub conn: &'a Connection,
    pub redial: Arc<dyn Redial>,
    pub reconnect: Patience,
}

/// What a live deploy wrote.
pub struct LiveWritten {
    /// The image's root partition.
    pub partition: u32,
    pub map: LiveMap,
    pub window: Window,
    /// The new filesystem's UUID.
    pub uuid: String,
    pub verify: VerifyReport,
    pub elapsed: Duration,
    /// The disk, open for writing (through the agent's guard).
    pub disk: Arc<dyn BlockDevice>,
    /// The kernel the new system boots.
    pub kernel: boot::Kernel,
    /// Whether the new system got its own boot loader ([`loader`]), so it can take the disk
    /// over once committed; why not.
    pub own_loader: Result<(), String>,
}

/// The image's one Linux root: its partition number and filesystem.
pub fn pick_root(image: &Arc<dyn BlockDevice>) -> Result<(u32, Arc<Ext4>), LiveDeployError> {
    let (_, volumes) =
        inspect::volumes(image).map_err(|e| LiveDeployError::Source(e.to_string()))?;
    let mut roots: Vec<(u32, Arc<Ext4>)> = volumes
        .into_iter()
        .filter_map(|(p, dev)| {
            let ext = Ext4::open(dev).ok()?;
            fs::is_linux_root(&ext).then(|| (p.number, Arc::new(ext)))
        })
        .collect();
    match roots.len() {
        0 => Err(LiveDeployError::NoRoot),
        1 => Ok(roots.remove(0)),
        n => Err(LiveDeployError::ManyRoots(
            n,
            roots
                .iter()
                .map(|r| r.0.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// The live file's size when none is asked for: half again what the tree needs (room for the
/// new system to run), whole MiB.
pub fn default_size(root: &dyn Filesystem) -> Result<u64, LiveDeployError> {
    let (data, entries) = fs::tree::space_needed(root).map_err(LiveDeployError::Source)?;
    Ok((suggested_size(data, entries) * 3 / 2).next_multiple_of(1 << 20))
}

/// Writes the image's root into a live file of the agent's running system and reads it
/// back; the boot is not switched yet ([`boot::switch`]). On failure the file is removed.
pub fn write(
    image: &Arc<dyn BlockDevice>,
    target: &LiveTarget<'_>,
    opts: &LiveOptions,
    progress: &dyn Progress,
) -> Result<LiveWritten, LiveDeployError> {
    let started = Instant::now();
    let (partition, source) = pick_root(image)?;
    let size = match opts.size {
        Some(s) => s.next_multiple_of(BLOCK),
        None => default_size(&*source)?,
    };
    let map = prepare(target.conn, size)?;
    let written = write_into(&map, &source, target, opts, progress);
    if written.is_err() {
        // Nothing of the running system changed but the file: give its space back.
        let _ = target.conn.call_blocking(Request::LiveRemove);
    }
    let Written {
        window,
        uuid,
        verify,
        disk,
        kernel,
        own_loader,
    } = written?;
    Ok(LiveWritten {
        partition,
        map,
        window,
        uuid,
        verify,
        elapsed: started.elapsed(),
        disk,
        kernel,
        own_loader,
    })
}

/// Zeroes every block of the window the file owns (the agent zeroes them itself): what the
/// running system left in its free space must neither show through the new filesystem
/// (blocks the writer leaves unwritten because they are zeros, the rest of a file's last
/// block) nor be taken for another filesystem's signature.
fn zero_owned(slice: &dyn BlockDevice, window: &Window) -> Result<(), LiveDeployError> {
    let mut at = 0;
    let bad = window
        .bad
        .iter()
        .map(|&(b, n)| (b * window.block, n * window.block));
    for (from, len) in bad.chain(std::iter::once((window.len, 0))) {
        if from > at {
            slice
                .write_zeroes(at, from - at)
                .map_err(|e| LiveDeployError::Write(format!("zeroing the live file: {e}")))?;
        }
        at = from + len;
    }
    Ok(())
}

/// Asks the agent for a pinned file of `size` bytes.
pub fn prepare(conn: &Connection, size: u64) -> Result<LiveMap, LiveDeployError> {
    match conn.call_blocking(Request::LivePrepare { size }) {
        Ok(Reply::LiveMap(map)) => Ok(map),
        Ok(Reply::Error { message, .. }) => Err(LiveDeployError::Agent(message)),
        Ok(other) => Err(LiveDeployError::Agent(format!(
            "unexpected answer {other:?}"
        ))),
        Err(e) => Err(LiveDeployError::Agent(e.to_string())),
    }
}

struct Written {
    window: Window,
    uuid: String,
    verify: VerifyReport,
    disk: Arc<dyn BlockDevice>,
    kernel: boot::Kernel,
    own_loader: Result<(), String>,
}

fn write_into(
    map: &LiveMap,
    source: &Arc<Ext4>,
    target: &LiveTarget<'_>,
    opts: &LiveOptions,
    progress: &dyn Progress,
) -> Result<Written, LiveDeployError> {
    if let Some(asked) = opts.disk.as_ref().filter(|d| **d != map.disk) {
        return Err(LiveDeployError::OtherDisk {
            asked: asked.clone(),
            actual: map.disk.clone(),
        });
    }
    let window = window(&map.runs, BLOCK)?;
    let disk = open_on_connection(
        target.rt,
        target.conn,
        &map.disk,
        true,
        Arc::clone(&target.redial),
        target.reconnect.clone(),
    )?;
    let uuid = fs::Filesystem::info(&**source).uuid;
    let host = boot::check_host(&disk, &window, &uuid)?;
    let slice: Arc<dyn BlockDevice> = Arc::new(
        SliceDevice::new(Arc::clone(&disk), window.start, window.len)
            .map_err(|e| LiveDeployError::Write(e.to_string()))?,
    );
    zero_owned(&*slice, &window)?;
    let slice: Arc<dyn BlockDevice> = Arc::new(padded::SectorWrites::new(slice));
    let root: Arc<dyn Filesystem> = Arc::clone(source) as Arc<dyn Filesystem>;
    let tree: Arc<dyn Filesystem> = match &opts.transform {
        Some(t) => match t
            .apply(0, Arc::clone(&root))
            .map_err(|e| LiveDeployError::Source(e.to_string()))?
        {
            Some((overlay, _)) => Arc::new(overlay),
            None => root,
        },
        None => root,
    };
    let kernel = boot::kernel(&*tree);
    let (tree, own_loader) = with_own_loader(tree, host.as_deref(), &kernel, &uuid);
    let counters = Arc::new(fs::WriteCounters::default());
    let mut ext4 = source.format_options();
    // The window's bad blocks are counted in BLOCK-sized blocks: the writer must use them.
    ext4.block_size = BLOCK;
    ext4.bad_blocks = window.bad.clone();
    ext4.counters = Some(Arc::clone(&counters));
    progress.start(
        "writing the live system",
        fs::Filesystem::info(&**source).used_bytes,
    );
    write_ext4(Arc::clone(&slice), &*tree, &ext4)
        .map_err(|e| LiveDeployError::Write(e.to_string()))?;
    progress.finish();
    let (files, _) = counters.get();
    progress.files(files, files);
    let written = Ext4::open(Arc::clone(&slice))
        .map_err(|e| LiveDeployError::Write(format!("reading it back: {e}")))?;
    let mut verify = VerifyReport::default();
    compare_trees(&*tree, &written, "live root", &mut verify);
    if verify.differences > 0 || verify.files_compared == 0 {
        return Err(LiveDeployError::Differs {
            differences: verify.differences.max(1),
            first: verify
                .listed
                .first()
                .cloned()
                .unwrap_or_else(|| "nothing was compared".into()),
        });
    }
    let info = fs::Filesystem::info(&written);
    // The partition covers the filesystem, not a short last group the writer left out: a
    // later resize2fs must not grow into blocks of the window it never owned.
    let window = Window {
        len: info.total_bytes.min(window.len),
        ..window
    };
    Ok(Written {
        window,
        uuid: info.uuid,
        verify,
        disk,
        kernel,
        own_loader,
    })
}

/// Whether a live system has its own boot loader; why not.
type OwnLoader = Result<(), String>;

/// `tree` with its own boot loader ([`loader`]) when the running system's (`host`) can be
/// copied; else `tree` as it is, and why not.
fn with_own_loader(
    tree: Arc<dyn Filesystem>,
    host: Option<&dyn Filesystem>,
    kernel: &boot::Kernel,
    uuid: &str,
) -> (Arc<dyn Filesystem>, OwnLoader) {
    let kit = match host.map(loader::kit) {
        Some(Ok(kit)) => kit,
        Some(Err(why)) => return (tree, Err(why)),
        None => {
            let why = "the running system's filesystem cannot be read here".to_string();
            return (tree, Err(why));
        }
    };
    let menu = loader::menu(&kit, kernel, uuid, &loader::system_name(&*tree));
    match loader::add(Arc::clone(&tree), &kit, menu) {
        Ok(with) => (Arc::new(with), Ok(())),
        // The image's /boot or /boot/grub is not a plain directory, say: it deploys as it is.
        Err(e) => (
            tree,
            Err(format!("adding GRUB's files to the new system: {e}")),
        ),
    }
}

/// What a live agent says of itself (the `live` part of its identity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveState {
    /// The token the running kernel was booted with: a live system that came up.
    pub token: Option<String>,
    /// The pinned live file's size, when one is.
    pub pinned: Option<u64>,
    /// How the agent is reached: `("listen", bound address)` or `("connect", server)`.
    pub endpoint: Option<(String, String)>,
    /// The running kernel's boot id: a new one after every boot.
    pub boot: Option<String>,
    /// The `root=` the running kernel was booted with (`UUID=…`).
    pub root: Option<String>,
}

/// Asks the agent what it is; `Err(NotLive)` when it is not in live mode.
pub fn state(conn: &Connection) -> Result<LiveState, LiveDeployError> {
    let doc = match conn.call_blocking(Request::Identify) {
        Ok(Reply::Identity(doc)) => doc,
        Ok(other) => {
            return Err(LiveDeployError::Agent(format!(
                "unexpected answer {other:?}"
            )))
        }
        Err(e) => return Err(LiveDeployError::Agent(e.to_string())),
    };
    parse_state(&doc)
}

/// The `live` part of an identity document.
pub fn parse_state(doc: &str) -> Result<LiveState, LiveDeployError> {
    let v: serde_json::Value =
        serde_json::from_str(doc).map_err(|e| LiveDeployError::Agent(format!("identity: {e}")))?;
    let live = v
        .get("live")
        .filter(|l| l.is_object())
        .ok_or(LiveDeployError::NotLive)?;
    let endpoint = ["listen", "connect"]
        .iter()
        .find_map(|how| Some((how.to_string(), live[*how].as_str()?.to_string())));
    Ok(LiveState {
        token: live["token"].as_str().map(str::to_string),
        pinned: live["pinned"].as_u64(),
        endpoint,
        boot: live["boot"].as_str().map(str::to_string),
        root: live["root"].as_str().map(str::to_string),
    })
}

/// The map of the file the agent has pinned, if it has one (`LivePrepare` of size 0).
pub fn pinned_map(conn: &Connection) -> Result<Option<LiveMap>, LiveDeployError> {
    match state(conn)?.pinned {
        Some(_) => prepare(conn, 0).map(Some),
        None => Ok(None),
    }
}
