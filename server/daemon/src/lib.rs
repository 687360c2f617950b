//! The imaging daemon's services behind `diskferry serve`: the catalog (SQLite), the agent
//! port where dial-back machines register, and read-only TFTP for legacy PXE.

pub mod agents;
pub mod catalog;
pub mod tftp;
