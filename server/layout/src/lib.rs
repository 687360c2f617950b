//! Named on-disk layouts shared by the readers and writers of every format: the field-table
//! mechanism ([`field`]), little-endian integers at offsets ([`le`]) and the one [`Guid`]. No
//! I/O. The tables themselves live beside each format's reader and writer (for example
//! `diskferry_vdisk::vhdx::ondisk`, `diskferry_partition::ondisk`, `diskferry_fs::fat::ondisk`).
#![forbid(unsafe_code)]

pub mod field;
mod guid;
pub mod le;

pub use guid::Guid;
