//! Jobs that move data between block devices: capture (source → image: whole-disk sectors in
//! [`capture`], partition by partition in [`disk`]), [`deploy`] (image → disk) and [`verify`]. Jobs
//! are synchronous and run on blocking threads, reporting through
//! [`crate::progress::Progress`].

pub mod capture;
pub mod delta;
pub mod deploy;
mod deploy_edits;
pub mod disk;
pub mod incremental;
mod output;
pub(crate) mod partition_copy;
mod plan;
pub mod reuse;
pub mod verify;
mod writer;

pub use capture::{capture_sectors, CaptureError, CaptureStats, OutputOptions};
pub use deploy::{deploy_disk, DeployError, DeployHow, DeployReport};
pub use disk::{capture_disk, DiskCapture, DiskReport, Mode, PartitionReport};
pub use incremental::{capture_overlay, Base, IncrementalError, IncrementalStats};
pub use output::{partial_path_for, OutputError, PartialOutput};
pub use reuse::Previous;
pub use writer::{SparseWriter, WriteStats};
