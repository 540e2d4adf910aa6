//! The offset engine: which offset of each partition may be committed.
//!
//! Kafka settles offsets, not messages. Every backend feeds this module the offsets it delivers and the
//! settles the handlers make; this module alone decides what gets committed.
//!
//! # Invariant (SPEC 3.1)
//!
//! For each partition, with `D` the set of offsets delivered since the partition was assigned and `S ⊆ D`
//! the ones settled by ack or reject:
//!
//! ```text
//! watermark = min { o ∈ D \ S }            if some delivered offset is unsettled
//!           = 1 + max D                     otherwise (None if D is empty)
//! ```
//!
//! So every delivered offset below the watermark is settled, the watermark never passes an unsettled
//! offset whatever the completion order, and offsets that were never delivered (gaps left by compaction
//! or transaction markers) do not hold it back. A nack leaves its offset in `D \ S`, so nothing at or
//! after it is committed until it is redelivered and settled. The watermark never decreases: settled
//! offsets stay settled, and a new delivery below the watermark is reported as [`Delivery::Stale`]
//! instead of being tracked again.
//!
//! Representation: `pending` holds the delivered offsets at or above `floor` with their state, sorted by
//! offset; settled entries at the front are folded into `floor` eagerly, so the first entry, when present,
//! is unsettled and the watermark is read in O(1). Kafka delivers a partition's offsets in increasing
//! order, so a delivery is a push at the back and most settles hit the front: O(1) on the hot path,
//! O(log n) to find an offset in the middle, O(n) only to insert one out of order (which needs a seek).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

/// A partition of a topic.
///
/// ```
/// let tp = ferrostream::TopicPartition::new("orders", 3);
/// assert_eq!(tp.to_string(), "orders[3]");
/// ```
#[derive(Debug, Clone, Eq, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic partition.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl PartialEq for TopicPartition {
    fn eq(&self, other: &Self) -> bool {
        // The records of one partition share one name: pointer equality spares comparing the strings on
        // every map lookup of the hot path.
        self.partition == other.partition && (Arc::ptr_eq(&self.topic, &other.topic) || self.topic == other.topic)
    }
}

impl std::hash::Hash for TopicPartition {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // By value, as equality is (pointer equality is only its fast path), but not all of it: the name's
        // length and its first and last eight bytes. The engine looks partitions up several times per
        // message, and hashing whole names cost more than the rest of those lookups; names that differ
        // only in their middle just share a hash.
        let name = self.topic.as_bytes();
        let word = |bytes: &[u8]| {
            let mut w = [0u8; 8];
            w[..bytes.len()].copy_from_slice(bytes);
            u64::from_le_bytes(w)
        };
        let (head, tail) = match name.len() {
            n if n >= 8 => (word(&name[..8]), word(&name[n - 8..])),
            _ => (word(name), 0),
        };
        state.write_usize(name.len());
        state.write_u64(head);
        state.write_u64(tail);
        state.write_i32(self.partition);
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// Partitions (or partitions with an offset each) as log fields show them: `orders[0], orders[1]` or
/// `orders[0]@12, orders[1]@7`.
pub(crate) struct Shown<'a, T>(pub(crate) &'a [T]);

impl fmt::Display for Shown<'_, TopicPartition> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, tp) in self.0.iter().enumerate() {
            write!(f, "{}{tp}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

impl fmt::Display for Shown<'_, (TopicPartition, i64)> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (tp, offset)) in self.0.iter().enumerate() {
            write!(f, "{}{tp}@{offset}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

/// How a delivered offset relates to what the partition already knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Never seen: dispatch it.
    Fresh,
    /// Seen and still unsettled (redelivered after a nack, or after a seek): dispatch it unless it is
    /// still running.
    Unsettled,
    /// Seen and already settled (e.g. acked while an earlier offset was nacked): do not dispatch again.
    Settled,
    /// Below the watermark: settled long ago; do not dispatch again.
    Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Unsettled,
    Settled,
}

/// The settled/unsettled offsets of one partition (see the module invariant).
///
/// ```
/// use ferrostream::offset::PartitionOffsets;
/// let mut p = PartitionOffsets::default();
/// for o in 10..13 {
///     p.deliver(o);
/// }
/// p.settle(11);                        // a later offset completes first
/// assert_eq!(p.watermark(), Some(10)); // ...but 10 is unsettled, so nothing past it is committable
/// p.settle(10);
/// assert_eq!(p.watermark(), Some(12));
/// p.settle(12);
/// assert_eq!(p.watermark(), Some(13));
/// ```
#[derive(Debug, Clone, Default)]
pub struct PartitionOffsets {
    /// Every delivered offset below `floor` is settled. `None` until the first delivery.
    floor: Option<i64>,
    /// Delivered offsets `>= floor`, sorted, each once; the first entry, if any, is `Unsettled`.
    pending: VecDeque<(i64, Slot)>,
    /// The highest delivered offset.
    high: Option<i64>,
}

impl PartitionOffsets {
    /// Records that `offset` was delivered and says whether it should be dispatched.
    pub fn deliver(&mut self, offset: i64) -> Delivery {
        match self.floor {
            Some(floor) if offset < floor => return Delivery::Stale,
            None => self.floor = Some(offset),
            Some(_) => {}
        }
        self.high = Some(self.high.map_or(offset, |h| h.max(offset)));
        match self.find(offset) {
            Ok(i) => match self.pending[i].1 {
                Slot::Unsettled => Delivery::Unsettled,
                Slot::Settled => Delivery::Settled,
            },
            Err(i) => {
                self.pending.insert(i, (offset, Slot::Unsettled));
                Delivery::Fresh
            }
        }
    }

    /// Where `offset` is in `pending` (`Ok`), or where it would go (`Err`). The back and the front are
    /// checked first: new deliveries go to the back, in-order settles hit the front.
    fn find(&self, offset: i64) -> Result<usize, usize> {
        match (self.pending.front(), self.pending.back()) {
            (None, _) | (_, None) => Err(0),
            (_, Some(&(last, _))) if offset > last => Err(self.pending.len()),
            (Some(&(first, _)), _) if offset == first => Ok(0),
            _ => self.pending.binary_search_by_key(&offset, |&(o, _)| o),
        }
    }

    /// Marks a delivered offset settled by ack or reject. Returns true when the watermark moved.
    /// Settling an offset that was never delivered, or twice, changes nothing.
    pub fn settle(&mut self, offset: i64) -> bool {
        match self.find(offset) {
            Ok(i) if self.pending[i].1 == Slot::Unsettled => self.pending[i].1 = Slot::Settled,
            _ => return false,
        }
        let mut moved = false;
        while let Some(&(o, Slot::Settled)) = self.pending.front() {
            self.pending.pop_front();
            self.floor = Some(o + 1);
            moved = true;
        }
        moved
    }

    /// The offset that may be committed: see the module invariant.
    pub fn watermark(&self) -> Option<i64> {
        match self.pending.front() {
            Some(&(o, _)) => Some(o),
            None => self.high.map(|h| h + 1),
        }
    }

    /// True when `offset` was delivered and is not settled.
    pub fn is_unsettled(&self, offset: i64) -> bool {
        self.find(offset).is_ok_and(|i| self.pending[i].1 == Slot::Unsettled)
    }

    /// How many delivered offsets are unsettled.
    pub fn unsettled_count(&self) -> usize {
        self.pending.iter().filter(|(_, s)| *s == Slot::Unsettled).count()
    }
}

/// The offsets of every partition a consumer owns, and what has been committed of them.
///
/// Each assignment of a partition is a new *generation*: commits are taken stamped with theirs, and the
/// broker's answer to a commit counts only for the generation it was taken from. A commit of an earlier
/// assignment that ends after the partition was assigned again (a rebalance that revoked nothing, e.g.
/// after a rebalance error) is never credited to the new one.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    parts: rustc_hash::FxHashMap<TopicPartition, Tracked>,
    /// The last generation given out.
    generation: u64,
}

#[derive(Debug, Default)]
struct Tracked {
    offsets: PartitionOffsets,
    /// The last offset handed to the broker for commit.
    requested: Option<i64>,
    /// The last offset the broker confirmed.
    confirmed: Option<i64>,
    /// Which assignment this is.
    generation: u64,
}

/// Commits taken from the tracker, each stamped with its partition's generation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Stamped {
    /// What to commit.
    pub(crate) commits: Vec<(TopicPartition, i64)>,
    /// The generation of each commit's partition, in the same order.
    generations: Vec<u64>,
}

impl Stamped {
    pub(crate) fn is_empty(&self) -> bool {
        self.commits.is_empty()
    }

    /// The commits of the partitions `refused` does not name, and those it does.
    pub(crate) fn split(self, refused: impl Fn(&TopicPartition) -> bool) -> (Stamped, Stamped) {
        let (mut ok, mut failed) = (Stamped::default(), Stamped::default());
        for (c, g) in self.commits.into_iter().zip(self.generations) {
            let into = if refused(&c.0) { &mut failed } else { &mut ok };
            into.commits.push(c);
            into.generations.push(g);
        }
        (ok, failed)
    }
}

impl OffsetTracker {
    /// Starts tracking `tp` afresh (a new generation), replacing what an earlier assignment left.
    pub(crate) fn assign(&mut self, tp: TopicPartition) {
        self.generation += 1;
        self.parts.insert(
            tp,
            Tracked {
                generation: self.generation,
                ..Tracked::default()
            },
        );
    }

    /// The tracked partition, when it is still the assignment of `generation`.
    fn current(&mut self, tp: &TopicPartition, generation: u64) -> Option<&mut Tracked> {
        self.parts.get_mut(tp).filter(|t| t.generation == generation)
    }

    pub(crate) fn partitions(&self) -> Vec<TopicPartition> {
        self.parts.keys().cloned().collect()
    }

    /// Per partition: the next offset the consumer takes (past the highest delivered) and the last
    /// offset the broker confirmed as committed.
    pub(crate) fn positions(&self) -> impl Iterator<Item = (&TopicPartition, Option<i64>, Option<i64>)> {
        self.parts
            .iter()
            .map(|(tp, t)| (tp, t.offsets.high.map(|h| h + 1), t.confirmed))
    }

    pub(crate) fn revoke(&mut self, tp: &TopicPartition) {
        self.parts.remove(tp);
    }

    pub(crate) fn partition(&mut self, tp: &TopicPartition) -> Option<&mut PartitionOffsets> {
        self.parts.get_mut(tp).map(|t| &mut t.offsets)
    }

    /// Watermarks that moved past what was last requested, marked as requested.
    pub(crate) fn take_commits(&mut self) -> Stamped {
        let mut out = Stamped::default();
        for (tp, t) in &mut self.parts {
            if let Some(w) = t.offsets.watermark()
                && t.requested.is_none_or(|r| w > r)
            {
                t.requested = Some(w);
                out.commits.push((tp.clone(), w));
                out.generations.push(t.generation);
            }
        }
        out
    }

    /// Has the partition's watermark committed again at the next commit, even where it did not move (a
    /// commit that carries news in its metadata).
    pub(crate) fn request_again(&mut self, tp: &TopicPartition) {
        if let Some(t) = self.parts.get_mut(tp) {
            t.requested = None;
        }
    }

    /// The current watermarks of the given partitions (for the final commit on revoke or shutdown),
    /// whether or not they were requested already.
    pub(crate) fn watermarks<'a>(
        &self,
        tps: impl IntoIterator<Item = &'a TopicPartition>,
    ) -> Vec<(TopicPartition, i64)> {
        tps.into_iter()
            .filter_map(|tp| {
                let t = self.parts.get(tp)?;
                let w = t.offsets.watermark()?;
                (t.confirmed.is_none_or(|c| w > c)).then(|| (tp.clone(), w))
            })
            .collect()
    }

    /// Records the broker's confirmation of a commit, for the partitions still in the assignment it was
    /// taken from.
    pub(crate) fn confirm(&mut self, taken: &Stamped) {
        for ((tp, o), g) in taken.commits.iter().zip(&taken.generations) {
            if let Some(t) = self.current(tp, *g) {
                t.confirmed = Some(t.confirmed.map_or(*o, |c| c.max(*o)));
            }
        }
    }

    /// A failed commit: ask again next time (in the assignment it was taken from).
    pub(crate) fn commit_failed(&mut self, taken: &Stamped) {
        for ((tp, _), g) in taken.commits.iter().zip(&taken.generations) {
            if let Some(t) = self.current(tp, *g) {
                t.requested = t.confirmed;
            }
        }
    }

    pub(crate) fn confirmed(&self, tp: &TopicPartition) -> Option<i64> {
        self.parts.get(tp).and_then(|t| t.confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The SPEC 3.1 formula, computed from scratch.
    fn reference(delivered: &BTreeSet<i64>, settled: &BTreeSet<i64>) -> Option<i64> {
        let unsettled = delivered.difference(settled).next().copied();
        unsettled.or_else(|| delivered.last().map(|h| h + 1))
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Deliver the next offset of the log (or redeliver from the rewind point).
        Deliver,
        /// Settle (ack/reject) the n-th unsettled delivered offset.
        Settle(usize),
        /// Nack the n-th unsettled delivered offset: rewind delivery to it.
        Nack(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Deliver),
            3 => any::<usize>().prop_map(Op::Settle),
            1 => any::<usize>().prop_map(Op::Nack),
        ]
    }

    proptest! {
        /// Equal partitions hash alike, however their names were built (equality's pointer fast path must
        /// not leak into the hash), and a map keyed by many partitions finds each.
        #[test]
        fn partitions_hash_by_value_and_maps_find_each(
            names in proptest::collection::btree_set("[a-c]{0,20}", 1..30),
            partitions in 1i32..4,
        ) {
            use std::hash::BuildHasher as _;
            let state = std::collections::hash_map::RandomState::new();
            let mut map = std::collections::HashMap::with_hasher(state.clone());
            for (i, name) in names.iter().enumerate() {
                for p in 0..partitions {
                    let tp = TopicPartition::new(name.as_str(), p);
                    let again = TopicPartition::new(String::from(name.as_str()), p);
                    prop_assert_eq!(&tp, &again);
                    prop_assert_eq!(state.hash_one(&tp), state.hash_one(&again));
                    map.insert(tp, (i, p));
                }
            }
            prop_assert_eq!(map.len(), names.len() * partitions as usize);
            for (i, name) in names.iter().enumerate() {
                for p in 0..partitions {
                    prop_assert_eq!(map.get(&TopicPartition::new(name.as_str(), p)), Some(&(i, p)));
                }
            }
        }
    }

    proptest! {
        /// Random settle orders with nacks and redelivery: the watermark always equals the SPEC formula,
        /// never passes an unsettled offset, never decreases, and reaches the end once all is settled.
        #[test]
        fn watermark_never_passes_an_unsettled_offset(
            gaps in proptest::collection::vec(1i64..3, 1..60),
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            // The log's offsets, with gaps as compaction or transaction markers leave.
            let log: Vec<i64> = gaps.iter().scan(100i64, |o, g| { *o += g; Some(*o) }).collect();
            let mut p = PartitionOffsets::default();
            let mut delivered = BTreeSet::new();
            let mut settled = BTreeSet::new();
            let mut cursor = 0usize;
            let mut last = None;
            for op in ops {
                match op {
                    Op::Deliver => {
                        if cursor < log.len() {
                            let o = log[cursor];
                            cursor += 1;
                            let d = p.deliver(o);
                            let expected = if settled.contains(&o) {
                                if reference(&delivered, &settled).is_some_and(|w| o < w) {
                                    Delivery::Stale
                                } else {
                                    Delivery::Settled
                                }
                            } else if delivered.contains(&o) {
                                Delivery::Unsettled
                            } else {
                                Delivery::Fresh
                            };
                            prop_assert_eq!(d, expected);
                            delivered.insert(o);
                        }
                    }
                    Op::Settle(n) | Op::Nack(n) => {
                        let unsettled: Vec<i64> = delivered.difference(&settled).copied().collect();
                        if unsettled.is_empty() { continue; }
                        let o = unsettled[n % unsettled.len()];
                        if matches!(op, Op::Settle(_)) {
                            p.settle(o);
                            settled.insert(o);
                        } else {
                            // Seek back: delivery resumes at o.
                            cursor = log.iter().position(|x| *x == o).unwrap();
                        }
                    }
                }
                let w = p.watermark();
                prop_assert_eq!(w, reference(&delivered, &settled));
                if let Some(w) = w {
                    for u in delivered.difference(&settled) {
                        prop_assert!(w <= *u, "watermark {} passed unsettled {}", w, u);
                    }
                }
                prop_assert!(last <= w, "watermark went back from {:?} to {:?}", last, w);
                last = w;
            }
            // Settle everything left: the watermark reaches one past the highest delivered offset.
            for o in delivered.difference(&settled).copied().collect::<Vec<_>>() {
                p.settle(o);
            }
            prop_assert_eq!(p.watermark(), delivered.last().map(|h| h + 1));
        }
    }

    #[test]
    fn an_offset_delivered_out_of_order_is_tracked_in_place() {
        let mut p = PartitionOffsets::default();
        assert_eq!(p.deliver(10), Delivery::Fresh);
        assert_eq!(p.deliver(13), Delivery::Fresh);
        assert_eq!(p.deliver(12), Delivery::Fresh);
        assert_eq!(p.deliver(11), Delivery::Fresh);
        assert_eq!(p.deliver(12), Delivery::Unsettled);
        assert_eq!(p.unsettled_count(), 4);
        p.settle(13);
        p.settle(11);
        assert_eq!(p.watermark(), Some(10));
        p.settle(10);
        assert_eq!(p.watermark(), Some(12), "12 is still unsettled");
        assert_eq!(p.deliver(11), Delivery::Stale);
        assert!(p.is_unsettled(12));
        p.settle(12);
        assert_eq!(p.watermark(), Some(14));
        assert_eq!(p.unsettled_count(), 0);
    }

    #[test]
    fn gaps_do_not_hold_the_watermark_back() {
        let mut p = PartitionOffsets::default();
        p.deliver(5);
        p.deliver(7);
        p.settle(5);
        assert_eq!(p.watermark(), Some(7));
        p.settle(7);
        assert_eq!(p.watermark(), Some(8));
        assert_eq!(p.deliver(6), Delivery::Stale);
    }

    /// A tracker of partition `t[0]` whose offset 0 was delivered and settled.
    fn one_settled() -> (OffsetTracker, TopicPartition) {
        let mut t = OffsetTracker::default();
        let tp = TopicPartition::new("t", 0);
        t.assign(tp.clone());
        let p = t.partition(&tp).unwrap();
        p.deliver(0);
        p.settle(0);
        (t, tp)
    }

    #[test]
    fn tracker_requests_each_watermark_once() {
        let (mut t, tp) = one_settled();
        let taken = t.take_commits();
        assert_eq!(taken.commits, vec![(tp.clone(), 1)]);
        assert!(t.take_commits().is_empty());
        t.commit_failed(&taken);
        let taken = t.take_commits();
        assert_eq!(taken.commits, vec![(tp.clone(), 1)]);
        t.confirm(&taken);
        assert!(t.watermarks([&tp]).is_empty());
    }

    #[test]
    fn a_late_commit_is_not_credited_to_the_next_assignment() {
        let (mut t, tp) = one_settled();
        let late = t.take_commits();
        // Assigned again while that commit is in flight, from the group's committed offset 0.
        t.assign(tp.clone());
        t.partition(&tp).unwrap().deliver(0);
        t.confirm(&late);
        assert_eq!(
            t.confirmed(&tp),
            None,
            "the old assignment's commit confirms nothing of the new one"
        );
        t.commit_failed(&late);
        t.partition(&tp).unwrap().settle(0);
        let taken = t.take_commits();
        assert_eq!(taken.commits, vec![(tp.clone(), 1)]);
        t.commit_failed(&late);
        assert!(
            t.take_commits().is_empty(),
            "the old assignment's failure does not reset what the new one requested"
        );
        t.confirm(&taken);
        assert_eq!(t.confirmed(&tp), Some(1));
    }
}
