//! `--customize SPEC.toml` on `capture` and `deploy`, and `diskferry customize IMAGE OUT`:
//! the SPEC read and checked before anything is written, the image checked to hold a Linux
//! root to customize, and the changes made printed afterwards.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use diskferry_blockdev::BlockDevice;
use diskferry_customize::{Customization, Spec, TargetHardware};
use diskferry_fs::overlay::TreeTransform;

/// The customization options of `capture`, `deploy` and `customize`.
#[derive(Args, Default)]
pub(crate) struct CustomizeArgs {
    /// Customize the system on the way: a TOML SPEC of hostname, machine_id ("new" or
    /// "empty"), ssh_host_keys ("regenerate" or "keep"), [[network]], [[users]], [[files]]
    /// and first_boot commands (README "Customization"). Applied to each Linux root
    /// partition as it is recreated file by file; the image itself never changes, replaced
    /// files stay beside the new ones as *.diskferry-orig
    #[arg(long, value_name = "SPEC.toml")]
    pub(crate) customize: Option<PathBuf>,
    /// What {name} in the SPEC stands for (a machine's name)
    #[arg(long, value_name = "NAME", requires = "customize")]
    pub(crate) machine_name: Option<String>,
    /// Reconfigure the Linux system for other hardware (P2V, V2P): the storage and network
    /// drivers it needs there added to its initramfs (and to /etc/initramfs-tools/modules or
    /// a dracut conf for later rebuilds), /dev/sdX names in fstab and GRUB's menu turned into
    /// UUIDs, network settings pinned to MAC addresses unpinned
    #[arg(long, value_name = "virtio|ahci|nvme|hyperv|vmware")]
    pub(crate) target_hardware: Option<TargetHardware>,
}

impl CustomizeArgs {
    /// Whether anything is to be customized or reconfigured.
    pub(crate) fn any(&self) -> bool {
        self.customize.is_some() || self.target_hardware.is_some()
    }

    /// The SPEC's text for a server's job (checked here first, so a bad one fails before the
    /// request); the server renders `{name}` for its machine.
    pub(crate) fn spec_text(&self) -> Result<Option<String>> {
        let Some(path) = &self.customize else {
            return Ok(None);
        };
        if self.machine_name.is_some() {
            bail!("--machine-name is for local deploys: the server puts the machine's own name in {{name}}");
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        diskferry_customize::Spec::parse(&text)
            .with_context(|| format!("--customize {}", path.display()))?;
        Ok(Some(text))
    }

    /// The customization for `image`, when one is asked for: the SPEC parsed and rendered,
    /// random material made, and `image` found to hold a Linux root — all before anything is
    /// written.
    pub(crate) fn transform(
        &self,
        image: &Arc<dyn BlockDevice>,
    ) -> Result<Option<Arc<dyn TreeTransform>>> {
        if !self.any() {
            return Ok(None);
        }
        let roots = diskferry_imaging::inspect::linux_roots(image);
        if roots.is_empty() {
            bail!("the image holds no Linux root filesystem (ext2/3/4 with /etc/os-release) to customize or reconfigure");
        }
        let mut c = match &self.customize {
            Some(spec) => Customization::from_file(spec, self.machine_name.as_deref())
                .with_context(|| format!("--customize {}", spec.display()))?,
            None => Customization::new(&Spec::default(), None)?,
        };
        if let Some(hw) = self.target_hardware {
            c = c.with_target_hardware(hw, diskferry_imaging::inspect::filesystem_uuids(image));
        }
        eprintln!(
            "{} (partition {})",
            c.describe(),
            roots
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Some(Arc::new(c)))
    }
}

/// `diskferry customize IMAGE OUT`: a new image of IMAGE with the customization (and
/// reconfiguration) made.
#[derive(Args)]
pub(crate) struct CustomizeCommand {
    /// The image to start from (never written)
    image: PathBuf,
    /// The customized image to write (written as OUT.partial and renamed when complete)
    out: PathBuf,
    #[command(flatten)]
    custom: CustomizeArgs,
    #[command(flatten)]
    output: crate::capture::OutputArgs,
}

pub(crate) fn run(args: &CustomizeCommand) -> Result<()> {
    if !args.custom.any() {
        bail!("say what to do: --customize SPEC.toml, --target-hardware HW, or both");
    }
    let format = args.output.format_for(&args.out)?;
    let (_, image) = diskferry_vdisk::open_image(&args.image, args.output.follow_backing)
        .with_context(|| format!("cannot open the image {}", args.image.display()))?;
    let transform = args.custom.transform(&image)?;
    let options = diskferry_imaging::CaptureOptions {
        output: args.output.options(format),
        mode: diskferry_imaging::pipeline::Mode::Auto,
        size: None,
        verify: true,
        chunk_map: false,
        base: None,
        transform,
    };
    let progress = crate::progress_for(args.output.progress);
    diskferry_imaging::capture(image, &args.out, &options, progress.as_ref())?;
    eprintln!(
        "customized {} into {} ({}); verified against the customized tree",
        args.image.display(),
        args.out.display(),
        format.name()
    );
    Ok(())
}
