//! The imaging daemon's services behind `diskferry serve`: the catalog (SQLite), the agent
//! port where dial-back machines register, jobs (captures and deploys run through the imaging
//! crate, with their progress and logs), NBD exports of the captures (`exports`), and
//! read-only TFTP for legacy PXE, what a network-booting machine should boot (`netboot`), and
//! Wake-on-LAN (`wake`) for jobs that wait for their machine. No HTTP here: the web crate is a
//! front end over these.

pub mod agents;
pub mod catalog;
pub mod compat;
pub mod enrollment;
pub mod exports;
pub mod joblog;
pub mod jobs;
pub mod netboot;
pub mod tftp;
pub mod wake;
