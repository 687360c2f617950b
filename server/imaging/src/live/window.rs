//! Where a live system goes on the disk: the range its pinned file covers (from the file's
//! first byte on the disk to its last), and the blocks inside that range the file does not
//! own — the running system's other data and metadata — which the new filesystem lists as
//! bad and never touches.

use diskferry_protocol::DiskRun;

/// Less of the range than this (percent) owned by the file, and the free space is too
/// scattered for a live system.
pub const MIN_COVERAGE_PERCENT: u64 = 90;

/// The new filesystem's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Disk offset of the filesystem's first byte (the file's lowest byte on the disk).
    pub start: u64,
    /// Bytes, whole blocks.
    pub len: u64,
    pub block: u64,
    /// Blocks (first, count), counted from `start`, that the file does not own.
    pub bad: Vec<(u64, u64)>,
}

impl Window {
    /// Bytes of the range the file owns.
    pub fn own(&self) -> u64 {
        self.len - self.bad.iter().map(|b| b.1).sum::<u64>() * self.block
    }
}

/// Why the file's map cannot hold a live system.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("the live file has no bytes on the disk")]
    Empty,
    #[error("the live file is scattered over {span} bytes of the disk and owns only {own} of them ({percent}%, at least {MIN_COVERAGE_PERCENT}% needed): the free space is too fragmented; free or defragment space, or ask for a smaller --live-size")]
    Scattered { span: u64, own: u64, percent: u64 },
}

/// The window the runs of a live file make, in `block`-byte blocks: every block not wholly
/// inside a run is bad.
pub fn window(runs: &[DiskRun], block: u64) -> Result<Window, WindowError> {
    let mut sorted: Vec<DiskRun> = runs.iter().copied().filter(|r| r.len > 0).collect();
    if sorted.iter().any(|r| r.offset.checked_add(r.len).is_none()) {
        return Err(WindowError::Empty);
    }
    sorted.sort_by_key(|r| r.offset);
    let first = sorted.first().ok_or(WindowError::Empty)?;
    let start = first.offset;
    let end = sorted
        .iter()
        .map(|r| r.offset + r.len)
        .max()
        .unwrap_or(start);
    let blocks = (end - start) / block;
    let mut bad: Vec<(u64, u64)> = Vec::new();
    let mut add = |from: u64, to: u64| {
        if from >= to {
            return;
        }
        match bad.last_mut() {
            Some(last) if last.0 + last.1 >= from => last.1 = last.1.max(to - last.0),
            _ => bad.push((from, to - from)),
        }
    };
    // Walk the runs in disk order; `owned` is where the owned bytes reach so far.
    let mut owned = start;
    for r in &sorted {
        if r.offset > owned {
            add(
                (owned - start) / block,
                (r.offset - start).div_ceil(block).min(blocks),
            );
        }
        owned = owned.max(r.offset + r.len);
    }
    // A last partial block is not part of the window at all.
    let window = Window {
        start,
        len: blocks * block,
        block,
        bad,
    };
    let own = window.own();
    let percent = (u128::from(own) * 100 / u128::from(window.len.max(1))) as u64;
    if window.len == 0 || percent < MIN_COVERAGE_PERCENT {
        return Err(WindowError::Scattered {
            span: end - start,
            own,
            percent,
        });
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offset: u64, len: u64) -> DiskRun {
        DiskRun { offset, len }
    }

    #[test]
    fn one_run_is_a_window_without_bad_blocks() {
        let w = window(&[run(1 << 20, 64 << 20)], 4096).unwrap();
        assert_eq!((w.start, w.len, w.bad.clone()), (1 << 20, 64 << 20, vec![]));
        assert_eq!(w.own(), 64 << 20);
    }

    #[test]
    fn gaps_between_runs_in_any_order_become_bad_blocks() {
        // File order differs from disk order; a 2-block gap and a 1-block gap.
        let runs = [
            run(1_000_000 * 4096, 500 * 4096),
            run(1_000_502 * 4096, 400 * 4096),
            run(999_000 * 4096, 1000 * 4096),
            run(1_000_903 * 4096, 97 * 4096),
        ];
        let w = window(&runs, 4096).unwrap();
        assert_eq!(w.start, 999_000 * 4096);
        assert_eq!(w.len, 2000 * 4096);
        assert_eq!(w.bad, vec![(1500, 2), (1902, 1)]);
        assert_eq!(w.own(), 1997 * 4096);
    }

    #[test]
    fn runs_off_the_block_grid_make_the_blocks_they_half_cover_bad() {
        // 1 KiB filesystem blocks under a 4 KiB-block window.
        let runs = [run(0, 8192 + 1024), run(8192 + 2048, 1 << 20)];
        let w = window(&runs, 4096).unwrap();
        assert_eq!(w.bad, vec![(2, 1)]);
    }

    #[test]
    fn a_scattered_file_is_refused() {
        let runs: Vec<DiskRun> = (0..100).map(|i| run(i * 8192, 4096)).collect();
        let e = window(&runs, 4096).unwrap_err();
        assert!(
            matches!(e, WindowError::Scattered { percent: 50, .. }),
            "{e}"
        );
        assert_eq!(window(&[], 4096), Err(WindowError::Empty));
    }
}
