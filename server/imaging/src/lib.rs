//! The imaging core: capture (source → image), deploy (image → disk), verify, inspect, the
//! sources a job reads from and the progress events it reports. Every front end (the CLI, the
//! web jobs) calls this crate; none of them decides how a disk is copied.

pub mod boot_entry;
pub mod chunkmap;
pub mod compat;
pub mod inspect;
pub mod jobs;
pub mod live;
pub mod multicast;
pub mod pipeline;
pub mod progress;
pub mod ranges;
pub mod skeleton;
pub mod source;
pub mod units;
pub mod vmconfig;

pub use jobs::{capture, deploy, CaptureJobError, CaptureOptions, CaptureOutcome, CaptureSummary};
