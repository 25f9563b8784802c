//! The one retry policy every sink shares.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `retry = { max_attempts, initial, max }` of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; then the delivery is a dead letter.
    pub max_attempts: u32,
    /// Delay before the second attempt; it doubles after each failure.
    pub initial: Duration,
    /// Cap on any delay, a sink's `Retry-After` included.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// A sink's requested wait (`Retry-After`) within `initial` and `max`:
    /// never so long it outlives the policy, never so short a busy sink
    /// spends every attempt within moments.
    pub fn bounded(&self, after: Duration) -> Duration {
        after.max(self.initial).min(self.max)
    }

    /// The delay before the next attempt after `attempts_made` failed ones, or
    /// `None` when attempts are used up. A sink's `retry_after` wins over the
    /// backoff (it knows its own load) but never beyond `max`, nor under
    /// `initial`: a `Retry-After: 0`, or a date already past, would otherwise
    /// spend every attempt within moments and make a dead letter of a sink
    /// that is only busy.
    pub fn next_delay(&self, attempts_made: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        if let Some(after) = retry_after {
            return Some(self.bounded(after));
        }
        let exp = attempts_made.saturating_sub(1).min(32);
        let backoff = self.initial.saturating_mul(1u32 << exp.min(31)).min(self.max);
        // "Equal jitter": half fixed, half random, so retries of a burst spread
        // out but never come back sooner than half the backoff.
        let half = backoff / 2;
        let jitter = Duration::from_nanos(fastrand::u64(0..=half.as_nanos().min(u64::MAX as u128) as u64));
        Some(half + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let p = policy();
        for (made, full) in [(1, 1), (2, 2), (3, 4), (4, 8)] {
            for _ in 0..100 {
                let d = p.next_delay(made, None).unwrap();
                let full = Duration::from_secs(full);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {made}: {d:?} not in [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
        let big = RetryPolicy { max_attempts: 100, ..p };
        assert!(big.next_delay(60, None).unwrap() <= Duration::from_secs(10));
    }

    #[test]
    fn attempts_run_out() {
        assert_eq!(policy().next_delay(5, None), None);
        assert_eq!(policy().next_delay(6, Some(Duration::from_secs(1))), None);
    }

    #[test]
    fn retry_after_is_honoured_within_max() {
        let p = policy();
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(7))),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(700))),
            Some(Duration::from_secs(10))
        );
        // Not sooner than `initial`, however soon the sink asks.
        assert_eq!(p.next_delay(3, Some(Duration::ZERO)), Some(Duration::from_secs(1)));
        assert_eq!(
            p.next_delay(1, Some(Duration::from_millis(300))),
            Some(Duration::from_secs(1))
        );
        let tight = RetryPolicy {
            initial: Duration::from_secs(20),
            ..p
        };
        assert_eq!(tight.next_delay(1, Some(Duration::ZERO)), Some(Duration::from_secs(10)));
    }
}
