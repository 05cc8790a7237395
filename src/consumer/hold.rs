//! Delay partitions held until their head record is due (DESIGN.md, "Flow").
//!
//! Guarantee: a partition whose head record is not yet due is paused and remembered
//! with that record's offset; nothing of it is processed or tracked while it is held
//! (records still arriving from it are dropped: they will be fetched again), so its
//! stored offset cannot pass the head record. When the due time comes the partition is
//! sought back to the head record and resumed — never skipped, never busy-polled. Within
//! one assignment a record is held at most once: read again after its release, it is processed whatever
//! its due time now says (a due time bounded from the moment of reading, see
//! `retry::trust`, would otherwise lie ahead again on every read).

use std::collections::HashMap;

use super::tracker::TopicPartition;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    offset: i64,
    due_at: i64,
}

#[derive(Debug, Default)]
pub struct HeldPartitions {
    held: HashMap<TopicPartition, Held>,
    /// The head record each partition was last released for.
    released: HashMap<TopicPartition, i64>,
}

impl HeldPartitions {
    pub fn is_held(&self, tp: &TopicPartition) -> bool {
        self.held.contains_key(tp)
    }

    /// Remembers that `tp` waits for the record at `offset` until `due_at` (epoch ms).
    /// The caller pauses the partition.
    pub fn hold(&mut self, tp: TopicPartition, offset: i64, due_at: i64) {
        self.held.insert(tp, Held { offset, due_at });
    }

    /// The earliest due time of any held partition.
    pub fn next_due(&self) -> Option<i64> {
        self.held.values().map(|h| h.due_at).min()
    }

    /// Removes and returns the partitions due at `now` with the offset to seek back to.
    pub fn take_due(&mut self, now: i64) -> Vec<(TopicPartition, i64)> {
        let due: Vec<TopicPartition> = self
            .held
            .iter()
            .filter(|(_, h)| h.due_at <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        let due: Vec<(TopicPartition, i64)> = due
            .into_iter()
            .filter_map(|tp| self.held.remove(&tp).map(|h| (tp, h.offset)))
            .collect();
        for (tp, offset) in &due {
            self.released.insert(tp.clone(), *offset);
        }
        due
    }

    /// Whether `tp` was already held for the record at `offset`, and released.
    pub fn was_released(&self, tp: &TopicPartition, offset: i64) -> bool {
        self.released.get(tp) == Some(&offset)
    }

    /// Forgets revoked partitions: their next owner finds the head record again.
    pub fn forget(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            self.held.remove(tp);
            self.released.remove(tp);
        }
    }

    /// How many partitions are held.
    pub fn count(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        ("r-250".to_string(), p)
    }

    #[test]
    fn only_due_partitions_are_released_with_their_head_offset() {
        let mut held = HeldPartitions::default();
        held.hold(tp(0), 10, 1_000);
        held.hold(tp(1), 20, 2_000);
        assert_eq!(held.next_due(), Some(1_000));
        assert_eq!(held.take_due(999), vec![]);
        assert_eq!(held.take_due(1_500), vec![(tp(0), 10)]);
        assert!(!held.is_held(&tp(0)));
        assert!(held.is_held(&tp(1)));
        assert_eq!(held.next_due(), Some(2_000));
    }

    #[test]
    fn a_released_head_record_is_known_as_released_until_the_partition_is_revoked() {
        let mut held = HeldPartitions::default();
        held.hold(tp(0), 10, 1_000);
        assert!(!held.was_released(&tp(0), 10));
        held.take_due(1_000);
        assert!(held.was_released(&tp(0), 10));
        assert!(!held.was_released(&tp(0), 11), "only that record");
        held.forget(&[tp(0)]);
        assert!(!held.was_released(&tp(0), 10));
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut held = HeldPartitions::default();
        held.hold(tp(0), 10, 1_000);
        held.forget(&[tp(0)]);
        assert_eq!(held.count(), 0);
        assert_eq!(held.next_due(), None);
    }
}
