//! Opens arbitrary bytes as a VMDK image and reads from it: every input must end in an image
//! or a clear error, never a panic or a runaway allocation.
//! Run: `cd server/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run open_vmdk`.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use diskferry_vdisk::vmdk::Vmdk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(data.to_vec()));
    let Ok(image) = Vmdk::open(file, Path::new("fuzz.vmdk")) else { return };
    let size = image.size();
    let mut buf = vec![0u8; 256 << 10];
    for offset in [0, size / 3, size.saturating_sub(buf.len() as u64)] {
        let n = (size - offset.min(size)).min(buf.len() as u64) as usize;
        let _ = image.read_at(&mut buf[..n], offset);
    }
    let _ = image.block_status(0, 64 << 20);
});
