//! A session's packets: the extents to send, cut into packets of at most
//! [`MAX_PAYLOAD`] bytes that never straddle two extents, numbered in order.

use diskferry_protocol::multicast::MAX_PAYLOAD;

use crate::MulticastError;

/// Most extents a session sends (a files-mode partition built on the server has a few per
/// file at worst; a run-length map of a disk far fewer).
pub const MAX_EXTENTS: usize = 1 << 22;

/// The packet numbering of a session.
#[derive(Debug, Clone)]
pub struct Plan {
    /// (disk offset, length, first sequence number), sorted by offset.
    extents: Vec<(u64, u64, u64)>,
    total: u64,
    bytes: u64,
}

impl Plan {
    /// Numbers the packets of `extents` (offset, length) on a disk of `disk_size` bytes.
    /// Extents must be non-empty, in order, not overlapping, and inside the disk.
    pub fn new(extents: &[(u64, u64)], disk_size: u64) -> Result<Plan, MulticastError> {
        if extents.len() > MAX_EXTENTS {
            return Err(MulticastError::Plan(format!(
                "{} extents (at most {MAX_EXTENTS})",
                extents.len()
            )));
        }
        let mut out = Vec::with_capacity(extents.len());
        let (mut seq, mut bytes, mut prev_end) = (0u64, 0u64, 0u64);
        for &(offset, len) in extents {
            let end = offset.checked_add(len).filter(|&e| e <= disk_size);
            if len == 0 || offset < prev_end || end.is_none() {
                return Err(MulticastError::Plan(format!(
                    "extent {offset}+{len} is empty, out of order or beyond the disk ({disk_size} bytes)"
                )));
            }
            out.push((offset, len, seq));
            seq += len.div_ceil(MAX_PAYLOAD as u64);
            bytes += len;
            prev_end = offset + len;
        }
        Ok(Plan {
            extents: out,
            total: seq,
            bytes,
        })
    }

    /// Packets in the session.
    pub fn total_packets(&self) -> u64 {
        self.total
    }

    /// Payload bytes in the session.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The extents, in order, with their first sequence numbers.
    pub fn extents(&self) -> &[(u64, u64, u64)] {
        &self.extents
    }

    /// Packet `seq`'s disk offset and length.
    pub fn packet(&self, seq: u64) -> Option<(u64, usize)> {
        let i = self
            .extents
            .partition_point(|e| e.2 <= seq)
            .checked_sub(1)?;
        let (offset, len, first) = self.extents[i];
        let within = (seq - first).checked_mul(MAX_PAYLOAD as u64)?;
        (within < len).then(|| {
            let n = (len - within).min(MAX_PAYLOAD as u64) as usize;
            (offset + within, n)
        })
    }

    /// Splits `start..end` (sequence numbers) into runs that are contiguous on the disk:
    /// (first seq, disk offset, bytes).
    pub fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let end = end.min(self.total);
        let mut out = Vec::new();
        let mut seq = start;
        while seq < end {
            let i = self.extents.partition_point(|e| e.2 <= seq) - 1;
            let (offset, len, first) = self.extents[i];
            let last = self.extents.get(i + 1).map_or(self.total, |e| e.2).min(end);
            let from = (seq - first) * MAX_PAYLOAD as u64;
            let to = ((last - first) * MAX_PAYLOAD as u64).min(len);
            out.push((seq, offset + from, to - from));
            seq = last;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = MAX_PAYLOAD as u64;

    #[test]
    fn packets_never_straddle_extents() {
        let plan = Plan::new(&[(0, 2 * P + 10), (10 * P, 5), (20 * P, P)], 100 * P).unwrap();
        assert_eq!(plan.total_packets(), 3 + 1 + 1);
        assert_eq!(plan.bytes(), 3 * P + 15);
        assert_eq!(plan.packet(0), Some((0, MAX_PAYLOAD)));
        assert_eq!(plan.packet(2), Some((2 * P, 10)));
        assert_eq!(plan.packet(3), Some((10 * P, 5)));
        assert_eq!(plan.packet(4), Some((20 * P, MAX_PAYLOAD)));
        assert_eq!(plan.packet(5), None);
        assert_eq!(
            plan.runs(1, 5),
            vec![(1, P, P + 10), (3, 10 * P, 5), (4, 20 * P, P)]
        );
        assert_eq!(plan.runs(4, 99), vec![(4, 20 * P, P)]);
    }

    #[test]
    fn bad_extents_are_refused() {
        assert!(Plan::new(&[(0, 0)], 10).is_err());
        assert!(Plan::new(&[(5, 10)], 10).is_err());
        assert!(Plan::new(&[(0, 5), (4, 2)], 10).is_err());
        assert!(Plan::new(&[(u64::MAX, 2)], u64::MAX).is_err());
        assert_eq!(Plan::new(&[], 10).unwrap().total_packets(), 0);
    }
}
