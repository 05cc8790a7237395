//! Degraded mode: when Redis fails, write under the unique indexes alone, and probe
//! Redis now and then until it answers again.
//!
//! Guarantee: a Redis that is down or hung costs at most one failed lock attempt per
//! probe interval (not one per record), the switch to and from degraded mode is logged
//! once each way and gauged (`im_ingest_redis_degraded`), and locking resumes by itself
//! with the first probe that succeeds. No data guarantee depends on this: the unique
//! indexes alone prevent duplicates.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether a Redis error means Redis could not be reached or did not answer in time —
/// what degraded mode is for — as opposed to an error Redis answered with (a script's
/// error on one corrupted key), which says nothing about the others.
pub fn is_unreachable(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Healthy,
    /// Redis failed; the next lock attempt (a probe) is allowed at `next_probe`.
    Degraded {
        next_probe: Instant,
    },
}

#[derive(Debug)]
pub struct RedisHealth {
    state: Mutex<State>,
    probe_interval: Duration,
}

impl RedisHealth {
    pub fn new(probe_interval: Duration) -> Self {
        Self {
            state: Mutex::new(State::Healthy),
            probe_interval,
        }
    }

    /// Whether to try the lock now: always when healthy; when degraded, once per probe
    /// interval (the caller that gets `true` is the probe).
    pub fn should_try_lock(&self, now: Instant) -> bool {
        let mut state = self.state.lock().expect("redis health lock poisoned");
        match *state {
            State::Healthy => true,
            State::Degraded { next_probe } if now >= next_probe => {
                *state = State::Degraded {
                    next_probe: now + self.probe_interval,
                };
                true
            }
            State::Degraded { .. } => false,
        }
    }

    pub fn is_degraded(&self) -> bool {
        matches!(
            *self.state.lock().expect("redis health lock poisoned"),
            State::Degraded { .. }
        )
    }

    /// A lock command failed (connection refused, timeout, …).
    pub fn record_failure(&self, now: Instant, error: &redis::RedisError) {
        let mut state = self.state.lock().expect("redis health lock poisoned");
        if *state == State::Healthy {
            tracing::warn!(%error, probe_interval_ms = self.probe_interval.as_millis() as u64,
                "Redis unavailable: degraded mode, writing under the unique indexes without the user lock");
            metrics::gauge!("im_ingest_redis_degraded").set(1.0);
        }
        *state = State::Degraded {
            next_probe: now + self.probe_interval,
        };
    }

    /// A lock command succeeded.
    pub fn record_success(&self) {
        let mut state = self.state.lock().expect("redis health lock poisoned");
        if *state != State::Healthy {
            tracing::info!("Redis answers again: locking resumed");
            metrics::gauge!("im_ingest_redis_degraded").set(0.0);
            *state = State::Healthy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> redis::RedisError {
        redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn healthy_always_tries_the_lock() {
        let health = RedisHealth::new(Duration::from_secs(1));
        let now = Instant::now();
        assert!(health.should_try_lock(now));
        assert!(health.should_try_lock(now));
        assert!(!health.is_degraded());
    }

    #[test]
    fn degraded_probes_once_per_interval_and_recovers_on_success() {
        let health = RedisHealth::new(Duration::from_secs(1));
        let start = Instant::now();
        health.record_failure(start, &failure());
        assert!(health.is_degraded());
        assert!(!health.should_try_lock(start + Duration::from_millis(500)));
        // One probe when the interval has passed, and only one.
        assert!(health.should_try_lock(start + Duration::from_millis(1_000)));
        assert!(!health.should_try_lock(start + Duration::from_millis(1_001)));
        health.record_failure(start + Duration::from_millis(1_100), &failure());
        assert!(!health.should_try_lock(start + Duration::from_millis(2_000)));
        assert!(health.should_try_lock(start + Duration::from_millis(2_100)));
        health.record_success();
        assert!(!health.is_degraded());
        assert!(health.should_try_lock(start + Duration::from_millis(2_101)));
    }
}
