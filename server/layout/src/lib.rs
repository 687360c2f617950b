//! Named on-disk layouts shared by the readers and writers of every format: little-endian
//! fields at offsets, GUIDs in their mixed-endian on-disk form. No I/O.
#![forbid(unsafe_code)]

pub mod le;
