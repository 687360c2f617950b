//! The diskferry imaging server library: block devices (local and remote), and the jobs that
//! move sectors between them. The `diskferry` binary is a thin CLI over this.

pub mod agents;
pub mod blockdev;
pub mod catalog;
pub mod fs;
pub mod inspect;
pub mod le;
pub mod partition;
pub mod pipeline;
pub mod progress;
pub mod source;
pub mod tftp;
pub mod units;
pub mod vdisk;
