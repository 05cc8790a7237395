//! Per-partition in-flight tracking: which offsets were received and are not yet
//! durable, and so how far the partition's offset may be stored.
//!
//! Guarantee: the position offered for storing is always the contiguous done prefix —
//! the lowest offset still in flight, or one past the highest received when none is —
//! so a stored offset never passes a record whose effect is not durable. Partitions are
//! forgotten on revoke; completions that arrive for them afterwards are ignored
//! (abandoned: the next owner redelivers them, and the writes are idempotent). Each
//! assignment of a partition is a new generation: a record received before a revoke is
//! never taken for one of a later assignment of the same partition, even when this
//! member is given the partition back and fetches the same offsets again.

use std::collections::{BTreeSet, HashMap};

/// (topic, partition)
pub type TopicPartition = (String, i32);

#[derive(Debug, Default)]
struct PartitionState {
    /// Which assignment of the partition this is.
    generation: u64,
    in_flight: BTreeSet<i64>,
    /// One past the highest offset received.
    received_up_to: i64,
    /// The last position offered for storing.
    stored: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> i64 {
        self.in_flight
            .first()
            .copied()
            .unwrap_or(self.received_up_to)
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
    /// The generation the next new partition state gets.
    next_generation: u64,
}

impl OffsetTracker {
    /// A record was received and is now in flight; returns the generation of the
    /// partition's assignment it belongs to.
    pub fn begin(&mut self, tp: &TopicPartition, offset: i64) -> u64 {
        let generation = self.next_generation;
        // The first record's offset is where this assignment started: nothing before it
        // needs storing.
        let state = self
            .partitions
            .entry(tp.clone())
            .or_insert_with(|| PartitionState {
                generation,
                stored: Some(offset),
                ..PartitionState::default()
            });
        if state.generation == generation {
            self.next_generation += 1;
        }
        state.in_flight.insert(offset);
        state.received_up_to = state.received_up_to.max(offset + 1);
        state.generation
    }

    /// Whether a record received in `generation` still belongs to the partition's
    /// current assignment.
    pub fn is_current(&self, tp: &TopicPartition, generation: u64) -> bool {
        self.partitions
            .get(tp)
            .is_some_and(|state| state.generation == generation)
    }

    /// A record's effect is durable. Returns the new position to store when it moved.
    pub fn complete(&mut self, tp: &TopicPartition, offset: i64, generation: u64) -> Option<i64> {
        let state = self.partitions.get_mut(tp)?;
        if state.generation != generation || !state.in_flight.remove(&offset) {
            return None;
        }
        let position = state.position();
        if state.stored.is_some_and(|stored| stored >= position) {
            return None;
        }
        state.stored = Some(position);
        Some(position)
    }

    /// Forgets the partitions (revoked); returns how many records were in flight there.
    pub fn revoke(&mut self, tps: &[TopicPartition]) -> usize {
        tps.iter()
            .filter_map(|tp| self.partitions.remove(tp))
            .map(|state| state.in_flight.len())
            .sum()
    }

    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.partitions.contains_key(tp)
    }

    /// Records in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
    }

    /// One past the highest offset received on a partition: where fetching must go on
    /// from (`None` when nothing was received since it was assigned).
    pub fn next_offset(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp).map(|s| s.received_up_to)
    }

    /// The lowest offset in flight of a partition, if any.
    #[cfg(test)]
    fn oldest_in_flight(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp)?.in_flight.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        ("t".to_string(), p)
    }

    #[test]
    fn position_never_passes_an_offset_still_in_flight() {
        let mut t = OffsetTracker::default();
        let mut g = 0;
        for offset in 10..15 {
            g = t.begin(&tp(0), offset);
        }
        // 11..14 finish first: 10 still in flight, so nothing may be stored.
        for offset in [11, 12, 14, 13] {
            assert_eq!(t.complete(&tp(0), offset, g), None);
        }
        assert_eq!(t.complete(&tp(0), 10, g), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn position_moves_to_the_next_gap() {
        let mut t = OffsetTracker::default();
        let mut g = 0;
        for offset in [0, 1, 2] {
            g = t.begin(&tp(0), offset);
        }
        assert_eq!(t.complete(&tp(0), 0, g), Some(1));
        assert_eq!(t.complete(&tp(0), 2, g), None);
        assert_eq!(t.oldest_in_flight(&tp(0)), Some(1));
        assert_eq!(t.next_offset(&tp(0)), Some(3));
        assert_eq!(t.complete(&tp(0), 1, g), Some(3));
        assert_eq!(t.next_offset(&tp(1)), None);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.begin(&tp(0), 5);
        let g1 = t.begin(&tp(1), 7);
        assert_eq!(t.complete(&tp(1), 7, g1), Some(8));
        assert_eq!(t.oldest_in_flight(&tp(0)), Some(5));
    }

    #[test]
    fn completions_after_revoke_are_ignored() {
        let mut t = OffsetTracker::default();
        let g = t.begin(&tp(0), 1);
        t.begin(&tp(0), 2);
        assert_eq!(t.revoke(&[tp(0)]), 2);
        assert!(!t.is_assigned(&tp(0)));
        assert_eq!(t.complete(&tp(0), 1, g), None);
    }

    #[test]
    fn a_record_from_before_a_revoke_is_not_taken_for_the_same_offset_fetched_again() {
        let mut t = OffsetTracker::default();
        let before = t.begin(&tp(0), 1);
        t.revoke(&[tp(0)]);
        // Given back and fetched again from the committed offset.
        let again = t.begin(&tp(0), 1);
        assert_ne!(before, again);
        assert!(!t.is_current(&tp(0), before));
        assert!(t.is_current(&tp(0), again));
        assert_eq!(t.complete(&tp(0), 1, before), None);
        assert_eq!(
            t.in_flight(),
            1,
            "the old completion took the new record's place"
        );
        assert_eq!(t.complete(&tp(0), 1, again), Some(2));
    }

    #[test]
    fn a_completion_twice_or_unknown_offset_changes_nothing() {
        let mut t = OffsetTracker::default();
        let g = t.begin(&tp(0), 1);
        t.begin(&tp(0), 2);
        assert_eq!(t.complete(&tp(0), 1, g), Some(2));
        assert_eq!(t.complete(&tp(0), 1, g), None);
        assert_eq!(t.complete(&tp(0), 99, g), None);
        assert_eq!(t.oldest_in_flight(&tp(0)), Some(2));
    }
}
