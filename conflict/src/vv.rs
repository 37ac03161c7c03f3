//! Version vectors and dots: what a replica has seen of each node's writes.

use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// The identity of one write: the node that made it and that node's counter at the time.
///
/// Counters come from one per-node sequence that is never reused (the node reserves blocks of it
/// durably), so a dot names exactly one write across all paths and all time.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Dot {
    pub node: NodeId,
    pub counter: u64,
}

/// How two version vectors relate.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum Causality {
    Equal,
    /// The left one has seen everything the right one has, and more.
    Dominates,
    /// The right one has seen everything the left one has, and more.
    Dominated,
    Concurrent,
}

/// node -> highest counter seen, kept sorted by node with no zero entries, so that equal vectors
/// are equal byte for byte.
#[derive(Clone, Default, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct VersionVector(Vec<(NodeId, u64)>);

impl VersionVector {
    pub fn new() -> VersionVector {
        VersionVector(Vec::new())
    }

    /// The vector that has seen exactly the writes of `dot.node` up to `dot.counter`.
    pub fn from_dot(dot: Dot) -> VersionVector {
        let mut vv = VersionVector::new();
        vv.add(dot);
        vv
    }

    pub fn get(&self, node: &NodeId) -> u64 {
        match self.0.binary_search_by(|(n, _)| n.cmp(node)) {
            Ok(i) => self.0[i].1,
            Err(_) => 0,
        }
    }

    /// True when the write `dot` is in this vector's causal past.
    pub fn covers(&self, dot: &Dot) -> bool {
        self.get(&dot.node) >= dot.counter
    }

    /// Raises the entry of `dot.node` to at least `dot.counter`.
    pub fn add(&mut self, dot: Dot) {
        if dot.counter == 0 {
            return;
        }
        match self.0.binary_search_by(|(n, _)| n.cmp(&dot.node)) {
            Ok(i) => self.0[i].1 = self.0[i].1.max(dot.counter),
            Err(i) => self.0.insert(i, (dot.node, dot.counter)),
        }
    }

    /// The least vector that has seen everything both have seen.
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut out = Vec::with_capacity(self.0.len().max(other.0.len()));
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&(na, ca)), Some(&&(nb, cb))) => match na.cmp(&nb) {
                    Ordering::Less => {
                        out.push((na, ca));
                        a.next();
                    }
                    Ordering::Greater => {
                        out.push((nb, cb));
                        b.next();
                    }
                    Ordering::Equal => {
                        out.push((na, ca.max(cb)));
                        a.next();
                        b.next();
                    }
                },
                (Some(&&e), None) => {
                    out.push(e);
                    a.next();
                }
                (None, Some(&&e)) => {
                    out.push(e);
                    b.next();
                }
                (None, None) => break,
            }
        }
        VersionVector(out)
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let (mut greater, mut less) = (false, false);
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&(na, ca)), Some(&&(nb, cb))) => match na.cmp(&nb) {
                    Ordering::Less => {
                        greater = true;
                        a.next();
                    }
                    Ordering::Greater => {
                        less = true;
                        b.next();
                    }
                    Ordering::Equal => {
                        greater |= ca > cb;
                        less |= ca < cb;
                        a.next();
                        b.next();
                    }
                },
                (Some(_), None) => {
                    greater = true;
                    a.next();
                }
                (None, Some(_)) => {
                    less = true;
                    b.next();
                }
                (None, None) => break,
            }
            if greater && less {
                return Causality::Concurrent;
            }
        }
        match (greater, less) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::Dominated,
            (true, true) => Causality::Concurrent,
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Dot> + '_ {
        self.0.iter().map(|&(node, counter)| Dot { node, counter })
    }

    /// True when the vector is in canonical form: sorted, no duplicates, no zero counters.
    /// Vectors decoded from a peer must pass this before use.
    pub fn is_canonical(&self) -> bool {
        self.0.iter().all(|(_, c)| *c > 0) && self.0.windows(2).all(|w| w[0].0 < w[1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(u64, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for &(n, c) in entries {
            v.add(Dot {
                node: NodeId::from_index(n),
                counter: c,
            });
        }
        v
    }

    #[test]
    fn compare_and_merge() {
        let a = vv(&[(1, 3), (2, 1)]);
        let b = vv(&[(1, 2), (2, 1)]);
        let c = vv(&[(1, 1), (3, 4)]);
        assert_eq!(a.compare(&a), Causality::Equal);
        assert_eq!(a.compare(&b), Causality::Dominates);
        assert_eq!(b.compare(&a), Causality::Dominated);
        assert_eq!(a.compare(&c), Causality::Concurrent);
        let m = a.merge(&c);
        assert_eq!(m, vv(&[(1, 3), (2, 1), (3, 4)]));
        assert_eq!(m.compare(&a), Causality::Dominates);
        assert_eq!(m.compare(&c), Causality::Dominates);
        assert!(m.is_canonical());
        assert!(m.covers(&Dot {
            node: NodeId::from_index(3),
            counter: 4
        }));
        assert!(!m.covers(&Dot {
            node: NodeId::from_index(3),
            counter: 5
        }));
        assert_eq!(VersionVector::new().compare(&a), Causality::Dominated);
    }
}
