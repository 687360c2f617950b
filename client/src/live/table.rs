//! The one exception to "writes only inside the live file": the partition table, which must
//! gain an entry for the live system (and lose it on rollback). A write is a table write
//! when it is whole sectors of
//! - sector 0 with its boot code (bytes 0..440) unchanged and the 0x55AA signature, or,
//! - on a GPT disk (sector 0 holds a protective 0xEE entry), the primary header and entry
//!   array (from the second sector, 16 KiB of entries) or the backup array and header at
//!   the end of the disk.
//!
//! Boot code, boot loaders in the gap after the MBR, extended boot records and every byte of
//! every partition stay out of reach.

/// Bytes of GPT entries (128 entries of 128 bytes).
const GPT_ENTRIES: u64 = 128 * 128;
/// Bytes of MBR boot code.
const BOOT_CODE: usize = 440;

/// Whether `data` at `offset` is a partition-table write on a disk of `size` bytes and
/// `sector`-byte sectors whose sector 0 is now `sector0`.
pub fn is_table_write(offset: u64, data: &[u8], sector0: &[u8], size: u64, sector: u64) -> bool {
    let len = data.len() as u64;
    if len == 0
        || !offset.is_multiple_of(sector)
        || !len.is_multiple_of(sector)
        || sector0.len() < 512
    {
        return false;
    }
    let mut from = offset;
    if offset == 0 {
        // The boot code stays, and so does what the disk is: a sector 0 that added or dropped
        // a protective entry would open (or hide) the GPT areas below.
        let keeps_code = data.len() >= 512
            && data[..BOOT_CODE] == sector0[..BOOT_CODE]
            && data[510..512] == [0x55, 0xAA]
            && is_gpt(&data[..512]) == is_gpt(sector0);
        if !keeps_code {
            return false;
        }
        from = sector;
    }
    let end = offset + len;
    if from >= end {
        return true;
    }
    let primary = (sector, 2 * sector + GPT_ENTRIES);
    let backup = (size.saturating_sub(sector + GPT_ENTRIES), size);
    let within = |(a, b): (u64, u64)| a <= from && end <= b;
    is_gpt(sector0) && (within(primary) || within(backup))
}

/// Whether sector 0 is a GPT's protective MBR.
fn is_gpt(sector0: &[u8]) -> bool {
    sector0[510..512] == [0x55, 0xAA] && (0..4).any(|i| sector0[446 + 16 * i + 4] == 0xEE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(gpt: bool) -> Vec<u8> {
        let mut s: Vec<u8> = (0..512).map(|i| (i % 200) as u8).collect();
        s[446..510].fill(0);
        s[446 + 4] = if gpt { 0xEE } else { 0x83 };
        s[510] = 0x55;
        s[511] = 0xAA;
        s
    }

    const SIZE: u64 = 1 << 30;

    #[test]
    fn sector_0_may_change_its_table_but_not_its_boot_code() {
        let now = mbr(false);
        let mut new = now.clone();
        new[446 + 16 * 2 + 4] = 0x83;
        assert!(is_table_write(0, &new, &now, SIZE, 512));
        let mut protective = now.clone();
        protective[446 + 16 * 2 + 4] = 0xEE;
        assert!(
            !is_table_write(0, &protective, &now, SIZE, 512),
            "an MBR cannot be turned into a GPT to reach the sectors after it"
        );
        new[10] ^= 1;
        assert!(
            !is_table_write(0, &new, &now, SIZE, 512),
            "boot code changed"
        );
        let mut unsigned = now.clone();
        unsigned[511] = 0;
        assert!(!is_table_write(0, &unsigned, &now, SIZE, 512));
        // An MBR disk's next sectors hold GRUB's core image: never a table write.
        assert!(!is_table_write(512, &[0; 512], &now, SIZE, 512));
        assert!(!is_table_write(
            0,
            &[now.clone(), vec![0; 512]].concat(),
            &now,
            SIZE,
            512
        ));
    }

    #[test]
    fn a_gpt_s_headers_and_arrays_are_table_writes_and_nothing_past_them() {
        let now = mbr(true);
        assert!(
            is_table_write(512, &[0; 512], &now, SIZE, 512),
            "primary header"
        );
        assert!(
            is_table_write(1024, &vec![0; 16384], &now, SIZE, 512),
            "primary array"
        );
        assert!(is_table_write(
            0,
            &vec![0x55; 34 * 512]
                .iter()
                .enumerate()
                .map(|(i, b)| if i < 512 { now[i] } else { *b })
                .collect::<Vec<_>>(),
            &now,
            SIZE,
            512
        ));
        assert!(
            !is_table_write(34 * 512, &[0; 512], &now, SIZE, 512),
            "the first partition's area"
        );
        assert!(
            is_table_write(SIZE - 33 * 512, &vec![0; 33 * 512], &now, SIZE, 512),
            "backup"
        );
        assert!(!is_table_write(SIZE - 34 * 512, &[0; 512], &now, SIZE, 512));
        assert!(
            !is_table_write(513, &[0; 512], &now, SIZE, 512),
            "not whole sectors"
        );
    }
}
