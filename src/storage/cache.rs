//! The tail cache: recently written log bytes kept in memory so that consumers at the
//! tail are served without a disk read.
//!
//! One `TailCache` per shard holds a byte budget (`tail_cache_bytes_per_shard`) shared by
//! all its partitions, whatever their number; each partition keeps its cached ranges in a
//! `PartitionCache`. When a group-commit round is durable, the bytes it appended are
//! copied once into an immutable `Bytes` and inserted; the oldest ranges of the shard are
//! evicted first. A fetch whose range lies inside one cached range is answered with a
//! slice of it: no disk read and no copy at all, per message or per fetch. `Bytes` rather
//! than the aligned chunk itself, because a fetch's answer may travel to another shard
//! (it must be `Send`) and must outlive the chunk's reuse.
//!
//! Only durable bytes are ever inserted, so the cache never shows more than a read from
//! disk would.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::{Rc, Weak};

use bytes::Bytes;

/// Cached ranges of one partition: (segment base offset, offset of the range's first
/// batch) -> whole batches from there. Every range starts on a batch boundary, since a
/// round appends whole batches.
#[derive(Default)]
pub struct PartitionCache {
    ranges: RefCell<BTreeMap<(u64, u64), Bytes>>,
}

impl PartitionCache {
    /// The cached range of a segment whose first batch is the last one at or before
    /// `offset`: where a walk to `offset` can start. The range may end before `offset`.
    pub fn lookup(&self, segment_base: u64, offset: u64) -> Option<Bytes> {
        let ranges = self.ranges.borrow();
        let (&(segment, _), bytes) = ranges.range(..=(segment_base, offset)).next_back()?;
        (segment == segment_base).then(|| bytes.clone())
    }

    /// Up to `count_max` ranges of a segment in offset order, starting with the one
    /// `lookup` would return.
    pub fn ranges_from(
        &self,
        segment_base: u64,
        offset: u64,
        count_max: usize,
    ) -> Vec<(u64, Bytes)> {
        let ranges = self.ranges.borrow();
        let start = ranges
            .range(..=(segment_base, offset))
            .next_back()
            .filter(|((segment, _), _)| *segment == segment_base)
            .map_or(offset, |((_, first), _)| *first);
        ranges
            .range((segment_base, start)..(segment_base, u64::MAX))
            .take(count_max)
            .map(|((_, first), bytes)| (*first, bytes.clone()))
            .collect()
    }

    /// Forgets every range of a segment (retention deleted it).
    pub fn drop_segment(&self, segment_base: u64) {
        self.ranges
            .borrow_mut()
            .retain(|(segment, _), _| *segment != segment_base);
    }

    pub fn clear(&self) {
        self.ranges.borrow_mut().clear();
    }

    #[cfg(test)]
    pub fn range_count(&self) -> usize {
        self.ranges.borrow().len()
    }
}

struct Inserted {
    partition: Weak<PartitionCache>,
    key: (u64, u64),
    length: usize,
}

/// The shard's budget and eviction order.
pub struct TailCache {
    bytes_max: usize,
    bytes_used: Cell<usize>,
    order: RefCell<VecDeque<Inserted>>,
}

impl TailCache {
    pub fn new(bytes_max: usize) -> Rc<TailCache> {
        Rc::new(TailCache {
            bytes_max,
            bytes_used: Cell::new(0),
            order: RefCell::new(VecDeque::new()),
        })
    }

    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    pub fn bytes_used(&self) -> usize {
        self.bytes_used.get()
    }

    /// Caches `bytes`, whole batches of a segment starting with the one at
    /// `first_offset`, evicting the shard's oldest ranges to stay within the budget.
    /// Ranges larger than the whole budget are not cached.
    pub fn insert(
        &self,
        partition: &Rc<PartitionCache>,
        segment_base: u64,
        first_offset: u64,
        bytes: Bytes,
    ) {
        let length = bytes.len();
        if length == 0 || length > self.bytes_max {
            return;
        }
        let mut order = self.order.borrow_mut();
        while self.bytes_used.get() + length > self.bytes_max {
            let oldest = order
                .pop_front()
                .expect("bytes in use belong to inserted ranges");
            self.bytes_used.set(self.bytes_used.get() - oldest.length);
            // A partition that was closed already freed its ranges.
            if let Some(owner) = oldest.partition.upgrade() {
                owner.ranges.borrow_mut().remove(&oldest.key);
            }
        }
        partition
            .ranges
            .borrow_mut()
            .insert((segment_base, first_offset), bytes);
        order.push_back(Inserted {
            partition: Rc::downgrade(partition),
            key: (segment_base, first_offset),
            length,
        });
        self.bytes_used.set(self.bytes_used.get() + length);
        assert!(
            self.bytes_used.get() <= self.bytes_max,
            "the tail cache stays within its budget"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_come_from_one_range_and_the_budget_evicts_the_oldest_first() {
        let cache = TailCache::new(100);
        let first = Rc::new(PartitionCache::default());
        let second = Rc::new(PartitionCache::default());
        // Offsets 0.. in the first range, 10.. in the second.
        cache.insert(&first, 0, 0, Bytes::from(vec![1u8; 40]));
        cache.insert(&first, 0, 10, Bytes::from(vec![2u8; 40]));
        assert_eq!(first.lookup(0, 0).unwrap(), vec![1u8; 40]);
        assert_eq!(first.lookup(0, 9).unwrap(), vec![1u8; 40]);
        assert_eq!(first.lookup(0, 10).unwrap(), vec![2u8; 40]);
        assert_eq!(
            first.lookup(0, 1_000).unwrap(),
            vec![2u8; 40],
            "the walk decides"
        );
        assert!(first.lookup(7, 20).is_none(), "another segment");
        // 80 + 40 > 100: the oldest range (of any partition) goes.
        cache.insert(&second, 0, 0, Bytes::from(vec![3u8; 40]));
        assert!(first.lookup(0, 5).is_none());
        assert!(first.lookup(0, 15).is_some());
        assert_eq!(cache.bytes_used(), 80);
        // Too large for the whole budget: not cached, nothing evicted.
        cache.insert(&second, 0, 10, Bytes::from(vec![4u8; 101]));
        assert_eq!(cache.bytes_used(), 80);
        // A dropped partition's ranges still count until evicted, then free cleanly.
        drop(first);
        cache.insert(&second, 0, 10, Bytes::from(vec![5u8; 60]));
        assert_eq!(cache.bytes_used(), 100);
        assert_eq!(second.range_count(), 2);
    }
}
