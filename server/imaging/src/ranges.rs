//! Sorted, disjoint byte ranges: union, intersection and difference (a multicast deploy
//! splits what each disk must hold into what is sent and what is zeroed; verification joins
//! the ranges it compares).

use std::ops::Range;

/// `ranges` sorted and joined where they overlap or touch; empty ones dropped.
pub fn normalize(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The parts of `a` also in `b` (both normalized).
pub fn intersect(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let start = a[i].start.max(b[j].start);
        let end = a[i].end.min(b[j].end);
        if start < end {
            out.push(start..end);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The parts of `a` not in `b` (both normalized).
pub fn subtract(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut at = r.start;
        while j < b.len() && b[j].end <= at {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < r.end {
            if b[k].start > at {
                out.push(at..b[k].start);
            }
            at = at.max(b[k].end);
            k += 1;
        }
        if at < r.end {
            out.push(at..r.end);
        }
    }
    out
}

/// Total bytes in `ranges`.
pub fn bytes(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_intersection_and_difference() {
        let a = normalize(vec![10..20, 0..5, 4..8, 30..30, 20..25]);
        assert_eq!(a, vec![0..8, 10..25]);
        let b = normalize(vec![6..12, 24..40]);
        assert_eq!(intersect(&a, &b), vec![6..8, 10..12, 24..25]);
        assert_eq!(subtract(&a, &b), vec![0..6, 12..24]);
        assert_eq!(subtract(&b, &a), vec![8..10, 25..40]);
        assert_eq!(bytes(&a), 23);
        assert_eq!(subtract(&a, &[]), a);
        assert!(intersect(&a, &[]).is_empty());
    }
}
