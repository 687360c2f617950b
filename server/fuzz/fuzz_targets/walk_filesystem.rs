//! Opens arbitrary bytes as whatever filesystem their signature names (ext2/3/4, FAT, NTFS)
//! and walks it: metadata, link targets, xattrs, the first bytes of every file, the allocation
//! map. Every input must end in data or clear errors — never a panic, a hang or a runaway
//! allocation.
//! Run: `cd server/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run walk_filesystem -- -max_len=1048576`
//! (seed it with small images: `mkfs.ext4 -b 1024`, `mkfs.vfat`, `mkntfs` on a few hundred KiB).
#![no_main]

use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_fs as fs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Panics inside third-party parsers are caught at our boundary (and become errors); only
    // panics that escape it should count as crashes, so the abort-on-panic hook is replaced.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(data.to_vec()));
    let Ok(fs) = fs::open(dev) else { return };
    let _ = fs.info();
    let _ = fs.allocation_map();
    let mut visited = 0;
    let mut buf = vec![0u8; 4096];
    let _ = fs::tree::walk(
        &*fs,
        fs.root(),
        &mut |_, e| {
            visited += 1;
            if visited > 2000 {
                return Err(fs::FsError::Unsupported("enough".into()));
            }
            if let Ok(m) = fs.metadata(e.node) {
                if m.kind == fs::FileKind::File {
                    let _ = fs.read_at(e.node, 0, &mut buf);
                    let _ = fs.data_ranges(e.node);
                }
            }
            let _ = fs.read_link(e.node);
            let _ = fs.xattrs(e.node);
            let _ = fs.security_descriptor(e.node);
            Ok(())
        },
        &mut |_, _| {},
    );
});
