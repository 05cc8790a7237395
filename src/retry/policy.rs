//! Where a record goes after its user's lock was found held elsewhere: the next delay
//! topic with a due time, or the dead-letter topic once attempts are used up.
//!
//! Guarantee: pure and deterministic given the random jitter source, so it is unit
//! tested exhaustively. The n-th retry goes to the n-th delay topic (the last one for
//! any further); the due time is the delay jittered upwards by up to `jitter`, shortened
//! to the lock's remaining TTL (jittered the same way) plus a small margin when that is
//! sooner.

use std::time::Duration;

use crate::config::{delay_after, RetrySettings};

/// Added to a lock's remaining TTL so the retry lands just after the lease ends.
pub const TTL_MARGIN: Duration = Duration::from_millis(25);

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub delays: Vec<Duration>,
    /// Deliveries in all, the first included; then the record is dead-lettered.
    pub max_attempts: u32,
    /// Upward jitter as a fraction of the delay (0.2 = up to +20%).
    pub jitter: f64,
}

/// What to do with a record whose delivery number `attempts` just failed on the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    Delay {
        /// The configured (un-jittered) delay: it names the topic.
        delay: Duration,
        /// Deliveries including the coming one (the first delay record carries 2).
        attempts: u32,
        /// How long from now the record becomes due.
        wait: Duration,
    },
    DeadLetter {
        attempts: u32,
    },
}

impl RetryPolicy {
    pub fn from_settings(settings: &RetrySettings) -> Self {
        Self {
            delays: settings
                .delays_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            max_attempts: settings.max_attempts,
            jitter: settings.jitter,
        }
    }

    /// The delay topic name for one configured delay: `<prefix>-<delay ms>`.
    pub fn topic_for(prefix: &str, delay: Duration) -> String {
        format!("{prefix}-{}", delay.as_millis())
    }

    /// Every delay topic, in order.
    pub fn topics(&self, prefix: &str) -> Vec<String> {
        self.delays
            .iter()
            .map(|d| Self::topic_for(prefix, *d))
            .collect()
    }

    /// The configured delay after failed delivery number `attempts` (see
    /// [`delay_after`]).
    fn delay_after(&self, attempts: u32) -> Option<Duration> {
        delay_after(&self.delays, attempts)
    }

    /// `attempts`: deliveries so far, the failed one included (1 for a main-topic record).
    /// `lock_remaining`: the holder's TTL, if known. `unit_random`: a value in [0, 1).
    pub fn next(
        &self,
        attempts: u32,
        lock_remaining: Option<Duration>,
        unit_random: f64,
    ) -> NextStep {
        let delay = match self.delay_after(attempts) {
            Some(delay) if attempts < self.max_attempts => delay,
            _ => return NextStep::DeadLetter { attempts },
        };
        let spread = 1.0 + self.jitter * unit_random.clamp(0.0, 1.0);
        let jittered = delay.mul_f64(spread);
        // The same jitter on a TTL-shortened wait: records waiting for one lock to expire
        // (e.g. the locks of a crashed worker) must not all come due at the same instant
        // on every worker, or all but one conflict again.
        let wait = match lock_remaining.map(|r| r.mul_f64(spread) + TTL_MARGIN) {
            Some(after_lock) if after_lock < jittered => after_lock,
            _ => jittered,
        };
        NextStep::Delay {
            delay,
            attempts: attempts + 1,
            wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            delays: [250, 1000, 4000, 16000].map(Duration::from_millis).to_vec(),
            max_attempts: 5,
            jitter: 0.2,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nth_retry_goes_to_the_nth_delay_topic_then_dead_letter() {
        let p = policy();
        let delays: Vec<_> = (1..5)
            .map(|attempts| match p.next(attempts, None, 0.0) {
                NextStep::Delay {
                    delay,
                    attempts: next,
                    wait,
                } => {
                    assert_eq!(next, attempts + 1);
                    assert_eq!(wait, delay);
                    delay
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [ms(250), ms(1000), ms(4000), ms(16000)]);
        assert_eq!(p.next(5, None, 0.0), NextStep::DeadLetter { attempts: 5 });
    }

    #[test]
    fn jitter_only_lengthens_by_at_most_the_fraction() {
        let p = policy();
        let NextStep::Delay { wait, .. } = p.next(1, None, 0.999_999) else {
            panic!()
        };
        assert!(wait > ms(299) && wait <= ms(300), "{wait:?}");
    }

    #[test]
    fn a_shorter_lock_ttl_shortens_the_wait_and_no_ttl_does_not() {
        let p = policy();
        let NextStep::Delay { delay, wait, .. } = p.next(2, Some(ms(100)), 0.5) else {
            panic!()
        };
        assert_eq!(delay, ms(1000), "the topic stays the configured one");
        // 100 ms jittered like the delay (0.5 × 20% = 110 ms), plus the margin.
        assert_eq!(wait, ms(110) + TTL_MARGIN);
        let NextStep::Delay { wait, .. } = p.next(1, Some(ms(10_000)), 0.0) else {
            panic!()
        };
        assert_eq!(wait, ms(250));
        let NextStep::Delay { wait, .. } = p.next(1, None, 0.0) else {
            panic!()
        };
        assert_eq!(wait, ms(250));
    }

    #[test]
    fn more_attempts_than_delays_reuse_the_last_delay() {
        let p = RetryPolicy {
            max_attempts: 10,
            ..policy()
        };
        let NextStep::Delay { delay, .. } = p.next(7, None, 0.0) else {
            panic!()
        };
        assert_eq!(delay, ms(16000));
    }

    #[test]
    fn topic_names_use_the_configured_delay() {
        assert_eq!(
            policy().topics("im.inbound.retry"),
            [
                "im.inbound.retry-250",
                "im.inbound.retry-1000",
                "im.inbound.retry-4000",
                "im.inbound.retry-16000"
            ]
        );
    }
}
