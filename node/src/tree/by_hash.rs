//! A cache of values by content hash within a budget, the oldest forgotten first.

use rsyncfs_conflict::Hash;
use std::collections::{HashMap, VecDeque};

/// Values by content hash; each has a weight (bytes, CVs), and the total stays within `max`.
pub struct ByHash<V> {
    by_hash: HashMap<Hash, (V, usize)>,
    order: VecDeque<Hash>,
    weight: usize,
    max: usize,
}

impl<V: Clone> ByHash<V> {
    pub fn new(max: usize) -> ByHash<V> {
        ByHash {
            by_hash: HashMap::new(),
            order: VecDeque::new(),
            weight: 0,
            max,
        }
    }

    /// Keeps `value` (of `weight`) unless it is kept already or heavier than the whole budget.
    pub fn put(&mut self, hash: Hash, value: V, weight: usize) {
        if weight > self.max || self.by_hash.contains_key(&hash) {
            return;
        }
        self.weight += weight;
        self.by_hash.insert(hash, (value, weight));
        self.order.push_back(hash);
        while self.weight > self.max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, w)) = self.by_hash.remove(&old) {
                self.weight -= w;
            }
        }
    }

    /// The weight kept now, and the most that may be kept.
    pub fn weight(&self) -> (usize, usize) {
        (self.weight, self.max)
    }

    pub fn get(&self, hash: &Hash) -> Option<V> {
        self.by_hash.get(hash).map(|(v, _)| v.clone())
    }
}
