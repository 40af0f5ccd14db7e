//! A set of byte ranges, kept sorted, disjoint and coalesced. It records which parts of a stub hold
//! the source's bytes (or bytes the user wrote over them), so it must never claim more than was
//! inserted: every operation here is exact.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet {
    /// Half-open `[start, end)` ranges, sorted by start, non-overlapping, non-adjacent.
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Build from untrusted pairs (a record read from disk): invalid pairs are an error, overlaps
    /// are merged.
    pub fn from_pairs(pairs: &[(u64, u64)]) -> Option<RangeSet> {
        let mut set = RangeSet::new();
        for &(s, e) in pairs {
            if s >= e {
                return None;
            }
            set.insert(s, e);
        }
        Some(set)
    }

    pub fn pairs(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range that ends at or after `start` (could merge), and first that starts after `end`.
        let lo = self.ranges.partition_point(|&(_, e)| e < start);
        let hi = self.ranges.partition_point(|&(s, _)| s <= end);
        if lo == hi {
            self.ranges.insert(lo, (start, end));
            return;
        }
        let new_start = start.min(self.ranges[lo].0);
        let new_end = end.max(self.ranges[hi - 1].1);
        self.ranges.drain(lo + 1..hi);
        self.ranges[lo] = (new_start, new_end);
    }

    /// Drop everything at or beyond `len`.
    pub fn truncate(&mut self, len: u64) {
        self.ranges.retain(|&(s, _)| s < len);
        if let Some(last) = self.ranges.last_mut() {
            last.1 = last.1.min(len);
        }
    }

    pub fn contains(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        self.ranges
            .get(i)
            .is_some_and(|&(s, e)| s <= start && end <= e)
    }

    /// The parts of `[start, end)` not in the set, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cur = start;
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        for &(s, e) in &self.ranges[i..] {
            if s >= end || cur >= end {
                break;
            }
            if s > cur {
                out.push((cur, s.min(end)));
            }
            cur = cur.max(e);
        }
        if cur < end {
            out.push((cur, end));
        }
        out
    }

    /// Total bytes covered below `limit`.
    pub fn covered(&self, limit: u64) -> u64 {
        self.ranges
            .iter()
            .map(|&(s, e)| e.min(limit).saturating_sub(s))
            .sum()
    }

    /// The range holding byte `offset`, if any.
    pub fn range_at(&self, offset: u64) -> Option<(u64, u64)> {
        let i = self.ranges.partition_point(|&(_, e)| e <= offset);
        self.ranges.get(i).copied().filter(|&(s, _)| s <= offset)
    }

    /// The `n` longest ranges (a subset: it claims less, never more).
    pub fn longest(&self, n: usize) -> RangeSet {
        let mut by_len = self.ranges.clone();
        by_len.sort_by_key(|&(s, e)| std::cmp::Reverse(e - s));
        by_len.truncate(n);
        by_len.sort_unstable();
        RangeSet { ranges: by_len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_merges_and_gaps_complement() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30);
        assert_eq!(r.pairs(), &[(10, 40)]);
        r.insert(50, 60);
        assert_eq!(r.gaps(0, 100), vec![(0, 10), (40, 50), (60, 100)]);
        assert!(r.contains(12, 40));
        assert!(!r.contains(12, 41));
        r.truncate(55);
        assert_eq!(r.pairs(), &[(10, 40), (50, 55)]);
        assert_eq!(r.covered(u64::MAX), 35);
        assert!(RangeSet::from_pairs(&[(5, 5)]).is_none());
        let mut many = RangeSet::new();
        for (s, e) in [(0, 2), (10, 15), (20, 21), (30, 34)] {
            many.insert(s, e);
        }
        assert_eq!(many.longest(2).pairs(), &[(10, 15), (30, 34)]);
        assert_eq!(many.longest(9).pairs(), many.pairs());
    }

    proptest! {
        /// The set agrees with a bitmap model for any sequence of inserts and truncates.
        #[test]
        fn matches_bitmap_model(ops in prop::collection::vec((0u64..200, 0u64..60, any::<bool>()), 0..40)) {
            let mut set = RangeSet::new();
            let mut model = vec![false; 300];
            for (a, len, is_trunc) in ops {
                if is_trunc {
                    set.truncate(a);
                    for b in model.iter_mut().skip(a as usize) { *b = false; }
                } else {
                    set.insert(a, a + len);
                    for b in &mut model[a as usize..(a + len) as usize] { *b = true; }
                }
                let pairs = set.pairs();
                for w in pairs.windows(2) { prop_assert!(w[0].1 < w[1].0); }
                for (i, &bit) in model.iter().enumerate() {
                    prop_assert_eq!(set.contains(i as u64, i as u64 + 1), bit);
                }
                let gaps = set.gaps(0, 300);
                let gap_bytes: u64 = gaps.iter().map(|(s, e)| e - s).sum();
                prop_assert_eq!(gap_bytes, model.iter().filter(|b| !**b).count() as u64);
            }
        }
    }
}
