//! Jobs that move data between block devices: capture (source → image) today; deploy and
//! verify join later. Jobs are synchronous and run on blocking threads, reporting through
//! [`crate::progress::Progress`].

pub mod capture;
mod output;
mod writer;
mod zero;

pub use capture::{capture_sectors, CaptureError, CaptureStats, OutputOptions};
pub use output::{OutputError, PartialOutput};
pub use writer::{SparseWriter, WriteStats};
pub use zero::{is_zero, nonzero_runs};
