//! The end-to-end scenarios, one module per area, linked into one test binary (`e2e`) so the
//! suite pays for one link instead of eighteen. Each scenario runs the real `diskferry` and
//! `diskferry-client` binaries and judges the result with tools nobody here wrote. Run one
//! area with a filter, e.g. `cargo nextest run -p diskferry-e2e -E 'test(/^pxe_vm::/)'`.

mod attacks;
mod boot_entry;
mod capture_modes;
mod compat;
mod customize;
mod deploy;
mod dial_back;
mod export;
mod fleet;
mod fs_loops;
mod get_safety;
mod hardware;
mod images_cli;
mod incremental;
mod inspect;
mod live;
mod live_vm;
mod mkfs_ext4;
mod mkfs_fat;
mod multicast;
mod partition_write;
mod pxe_vm;
mod qcow2_overlay;
mod qcow2_read;
mod qcow2_write;
mod real_machine;
mod reconfigure;
mod tftp;
mod uefi_fallback;
mod vhdx_log;
mod vhdx_read;
mod web_api;
mod web_browser;
mod web_security;
mod web_tls;
mod wire;
