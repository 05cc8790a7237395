//! What the admin server reports about the consumer loop, written by the loop itself.
//!
//! Guarantee: lock-free reads and writes (atomics); the loop marks a heartbeat at least
//! once a second while it turns, so a stalled loop shows as a stale heartbeat.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use crate::pipeline::now_millis;

#[derive(Debug, Default)]
pub struct Health {
    heartbeat_ms: AtomicI64,
    assigned_partitions: AtomicUsize,
}

impl Health {
    /// The consumer loop is turning.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_millis(), Ordering::Relaxed);
    }

    /// Milliseconds since the last heartbeat (`None` before the first).
    pub fn since_last_beat_ms(&self) -> Option<i64> {
        match self.heartbeat_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(now_millis() - at),
        }
    }

    /// One consumer of the instance now holds `after` partitions instead of `before`
    /// (the instance's total is the sum over its consumers).
    pub fn assignment_changed(&self, before: usize, after: usize) {
        self.assigned_partitions.fetch_add(after, Ordering::Relaxed);
        self.assigned_partitions
            .fetch_sub(before, Ordering::Relaxed);
    }

    pub fn assigned_partitions(&self) -> usize {
        self.assigned_partitions.load(Ordering::Relaxed)
    }
}
