//! NACK repair planning: what receivers asked for, turned into sends.
//!
//! Requests gather between batches; a batch splits them at every boundary and looks at who
//! wants each piece: two or more receivers → one multicast, one receiver → a unicast to it.
//! Neighbouring pieces with the same target merge. The queue is bounded in packets; a request
//! that does not fit is dropped (the receiver asks again next round).

use std::collections::BTreeMap;

/// Where a repair goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Multicast,
    Unicast(u16),
}

/// One repair send: packets `start..end` to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    pub start: u64,
    pub end: u64,
    pub target: Target,
}

/// Requests waiting for the next batch.
#[derive(Debug)]
pub struct RepairQueue {
    requests: Vec<(u64, u64, u16)>,
    packets: u64,
    max_packets: u64,
    refused: u64,
}

impl RepairQueue {
    pub fn new(max_packets: u64) -> RepairQueue {
        RepairQueue {
            requests: Vec::new(),
            packets: 0,
            max_packets,
            refused: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Requests refused because the queue was full.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Queues `start..end` for `receiver`, clipped to `total` packets.
    pub fn request(&mut self, receiver: u16, start: u64, end: u64, total: u64) {
        let end = end.min(total);
        if start >= end {
            return;
        }
        if self.packets + (end - start) > self.max_packets {
            self.refused += 1;
            return;
        }
        self.packets += end - start;
        self.requests.push((start, end, receiver));
    }

    /// Takes every queued request, keeping only receivers `live` says are still served, and
    /// returns the sends in sequence order.
    pub fn batch(&mut self, live: impl Fn(u16) -> bool) -> Vec<Repair> {
        let requests = std::mem::take(&mut self.requests);
        self.packets = 0;
        // Sweep: +1 at a start, -1 at an end, per receiver.
        let mut events: Vec<(u64, i32, u16)> = Vec::with_capacity(requests.len() * 2);
        for (start, end, r) in requests.into_iter().filter(|r| live(r.2)) {
            events.push((start, 1, r));
            events.push((end, -1, r));
        }
        events.sort_unstable();
        let mut active: BTreeMap<u16, u32> = BTreeMap::new();
        let mut out: Vec<Repair> = Vec::new();
        let mut i = 0;
        while i < events.len() {
            let at = events[i].0;
            while i < events.len() && events[i].0 == at {
                let (_, delta, r) = events[i];
                let count = active.entry(r).or_insert(0);
                if delta > 0 {
                    *count += 1;
                } else {
                    *count -= 1;
                    if *count == 0 {
                        active.remove(&r);
                    }
                }
                i += 1;
            }
            let Some(&(next, _, _)) = events.get(i) else {
                break;
            };
            let target = match active.len() {
                0 => continue,
                1 => Target::Unicast(*active.keys().next().expect("one")),
                _ => Target::Multicast,
            };
            match out.last_mut() {
                Some(last) if last.end == at && last.target == target => last.end = next,
                _ => out.push(Repair {
                    start: at,
                    end: next,
                    target,
                }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64, target: Target) -> Repair {
        Repair { start, end, target }
    }

    #[test]
    fn shared_ranges_are_multicast_and_single_ones_unicast() {
        let mut q = RepairQueue::new(1000);
        q.request(1, 0, 10, 100);
        q.request(2, 5, 15, 100);
        q.request(3, 50, 60, 100);
        q.request(3, 55, 58, 100); // the same receiver twice is still one receiver
        let got = q.batch(|_| true);
        assert_eq!(
            got,
            vec![
                r(0, 5, Target::Unicast(1)),
                r(5, 10, Target::Multicast),
                r(10, 15, Target::Unicast(2)),
                r(50, 60, Target::Unicast(3)),
            ]
        );
        assert!(q.is_empty());
        assert!(q.batch(|_| true).is_empty());
    }

    #[test]
    fn dropped_receivers_and_overflow_are_left_out() {
        let mut q = RepairQueue::new(20);
        q.request(1, 0, 10, 100);
        q.request(2, 0, 10, 100);
        q.request(3, 0, 10, 100); // over the bound
        q.request(4, 90, 200, 100); // clipped to the total, then over the bound
        assert_eq!(q.refused(), 2);
        assert_eq!(q.batch(|id| id != 2), vec![r(0, 10, Target::Unicast(1))]);
        q.request(5, 95, 200, 100);
        assert_eq!(q.batch(|_| true), vec![r(95, 100, Target::Unicast(5))]);
    }
}
