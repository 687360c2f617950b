//! Reads arbitrary bytes as a disk's partition table (MBR with extended partitions, GPT with
//! its backup) and inspects it: never a panic, a hang or a runaway allocation.
//! Run: `cd server/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run partition_table -- -max_len=1048576`
#![no_main]

use std::sync::Arc;

use diskferry_blockdev::{BlockDevice, MemoryDevice};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::read_only(data.to_vec()));
    if let Ok(table) = diskferry_partition::read_table(&*dev) {
        let copy: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(data.len()));
        let _ = diskferry_partition::write_table(&*copy, &table);
    }
    let _ = diskferry_imaging::inspect::inspect(&dev);
});
