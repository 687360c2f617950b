//! Builds the e2e tests' GRUB-booted Debian disk (the cached debootstrap, a marker unit that
//! prints `DISKFERRY-MARKER` lines and powers off) and moves it to the path given, for
//! benchmarks: `cargo run -p diskferry-e2e --example installer_disk -- OUT.raw`.

fn main() {
    let out = std::env::args_os()
        .nth(1)
        .expect("usage: installer_disk OUT.raw");
    let work = tempfile::tempdir().expect("a temporary directory");
    let disk = diskferry_e2e::debian::installer_disk(work.path());
    std::fs::rename(&disk.disk, &out)
        .or_else(|_| std::fs::copy(&disk.disk, &out).map(drop))
        .expect("moving the disk out");
}
