//! Which packets of a session a receiver still lacks: an interval set of missing sequence
//! numbers, bounded in the number of intervals.
//!
//! It starts as one interval `[0, total)`; in-order arrivals shrink its front, a loss leaves a
//! gap (one more interval). The bound: once `max_ranges` intervals exist, a packet that would
//! split one (arrive in the middle of a missing interval) is still written but stays counted as
//! missing, so it is asked for and written again later — wasteful but correct, and memory is
//! `O(max_ranges)` whatever the sender does.

use std::collections::BTreeMap;

/// What marking a packet received did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// It was missing and is now held.
    New,
    /// It was already held (a repair another receiver asked for, or a duplicate).
    Duplicate,
    /// It was missing and stays so: marking it would exceed the interval bound.
    Deferred,
}

/// Missing sequence numbers as `start → end` (exclusive) intervals.
#[derive(Debug)]
pub struct MissingSet {
    ranges: BTreeMap<u64, u64>,
    missing: u64,
    max_ranges: usize,
}

impl MissingSet {
    /// All of `0..total` missing; at most `max_ranges` (≥ 1) intervals kept.
    pub fn new(total: u64, max_ranges: usize) -> MissingSet {
        let mut ranges = BTreeMap::new();
        if total > 0 {
            ranges.insert(0, total);
        }
        MissingSet {
            ranges,
            missing: total,
            max_ranges: max_ranges.max(1),
        }
    }

    /// Packets still missing.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    /// Intervals currently held.
    pub fn intervals(&self) -> usize {
        self.ranges.len()
    }

    /// Marks `seq` received.
    pub fn take(&mut self, seq: u64) -> Taken {
        let Some((&start, &end)) = self.ranges.range(..=seq).next_back() else {
            return Taken::Duplicate;
        };
        if end <= seq {
            return Taken::Duplicate;
        }
        match (start == seq, end == seq + 1) {
            (true, true) => {
                self.ranges.remove(&start);
            }
            (true, false) => {
                self.ranges.remove(&start);
                self.ranges.insert(seq + 1, end);
            }
            (false, true) => {
                self.ranges.insert(start, seq);
            }
            (false, false) => {
                if self.ranges.len() >= self.max_ranges {
                    return Taken::Deferred;
                }
                self.ranges.insert(start, seq);
                self.ranges.insert(seq + 1, end);
            }
        }
        self.missing -= 1;
        Taken::New
    }

    /// Missing intervals overlapping `from..limit`, clipped to it, in order.
    pub fn ranges_in(&self, from: u64, limit: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        // The interval holding `from` may start before it.
        let first = self
            .ranges
            .range(..=from)
            .next_back()
            .filter(|(_, &e)| e > from)
            .map(|(&s, _)| s)
            .unwrap_or(from);
        self.ranges
            .range(first..limit.max(first))
            .map(move |(&s, &e)| (s.max(from), e.min(limit)))
            .filter(|(s, e)| s < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(m: &MissingSet) -> Vec<(u64, u64)> {
        m.ranges_in(0, u64::MAX).collect()
    }

    #[test]
    fn in_order_arrivals_shrink_the_front_and_losses_leave_gaps() {
        let mut m = MissingSet::new(10, 100);
        assert_eq!(m.take(0), Taken::New);
        assert_eq!(m.take(1), Taken::New);
        assert_eq!(m.take(3), Taken::New); // 2 lost
        assert_eq!(m.take(6), Taken::New); // 4, 5 lost
        assert_eq!(all(&m), vec![(2, 3), (4, 6), (7, 10)]);
        assert_eq!(m.missing(), 6);
        assert_eq!(m.take(3), Taken::Duplicate);
        assert_eq!(m.take(11), Taken::Duplicate);
        assert_eq!(m.take(2), Taken::New);
        assert_eq!(m.take(5), Taken::New);
        assert_eq!(all(&m), vec![(4, 5), (7, 10)]);
        for s in [4, 9, 8, 7] {
            assert_eq!(m.take(s), Taken::New);
        }
        assert_eq!(m.missing(), 0);
        assert_eq!(m.intervals(), 0);
    }

    #[test]
    fn ranges_in_clips_to_the_window() {
        let mut m = MissingSet::new(100, 100);
        for s in (0..100).step_by(10) {
            m.take(s);
        }
        let got: Vec<_> = m.ranges_in(15, 32).collect();
        assert_eq!(got, vec![(15, 20), (21, 30), (31, 32)]);
        assert_eq!(m.ranges_in(50, 50).count(), 0);
        assert_eq!(m.ranges_in(99, 1000).collect::<Vec<_>>(), vec![(99, 100)]);
        assert_eq!(m.ranges_in(95, 1000).collect::<Vec<_>>(), vec![(95, 100)]);
    }

    #[test]
    fn the_interval_bound_defers_instead_of_growing() {
        let mut m = MissingSet::new(1000, 4);
        // Every other packet: each arrival would split the tail interval.
        let mut deferred = 0;
        for s in (1..1000).step_by(2) {
            if m.take(s) == Taken::Deferred {
                deferred += 1;
            }
        }
        assert!(m.intervals() <= 4, "{} intervals", m.intervals());
        assert!(deferred > 0);
        // Whatever was deferred is still reported missing, and the set still completes.
        let total_missing = m.missing();
        assert_eq!(
            all(&m).iter().map(|(s, e)| e - s).sum::<u64>(),
            total_missing
        );
        for s in 0..1000 {
            m.take(s);
        }
        assert_eq!(m.missing(), 0);
    }

    #[test]
    fn random_arrivals_match_a_model() {
        let total = 5000u64;
        let mut m = MissingSet::new(total, 1 << 20);
        let mut model = vec![false; total as usize];
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = (x >> 33) % (total + 10);
            let expect = if s < total && !model[s as usize] {
                model[s as usize] = true;
                Taken::New
            } else {
                Taken::Duplicate
            };
            assert_eq!(m.take(s), expect);
        }
        let mut from_model = Vec::new();
        for (i, held) in model.iter().enumerate() {
            if !held {
                match from_model.last_mut() {
                    Some((_, e)) if *e == i as u64 => *e += 1,
                    _ => from_model.push((i as u64, i as u64 + 1)),
                }
            }
        }
        assert_eq!(all(&m), from_model);
    }
}
