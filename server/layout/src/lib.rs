//! Named on-disk layouts shared by the readers and writers of every format: field tables
//! ([`field`]), little-endian integers at offsets ([`le`]) and the one [`Guid`]. No I/O.
#![forbid(unsafe_code)]

pub mod field;
mod guid;
pub mod le;

pub use guid::Guid;
