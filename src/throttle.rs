//! Log lines that anyone can set off many times a second, let through at
//! most once a period with a count of those held back.
//!
//! A flood of identical rejections (bad signatures from whoever reaches the
//! port, a full disk under a vendor's retries) would otherwise write a line
//! per request: it buries every other line, and under systemd it uses up
//! journald's rate limit for the whole service, so the lines that matter are
//! the ones dropped. The metrics still count every request.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One kind of log line (e.g. one source's signature failures).
#[derive(Debug)]
pub struct LogThrottle {
    period_ms: u64,
    /// When the next line may go out (ms on [`LogThrottle::pass_now`]'s
    /// clock); 0 at first.
    next_ms: AtomicU64,
    /// Lines held back since the last one that went out.
    held: AtomicU64,
}

impl LogThrottle {
    pub const fn new(period: Duration) -> Self {
        Self {
            period_ms: period.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// [`LogThrottle::pass`] on a monotonic clock (ms since the first call
    /// in this process), which a wall-clock step cannot stop.
    pub fn pass_now(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        self.pass(START.get_or_init(Instant::now).elapsed().as_millis() as u64)
    }

    /// `Some(n)`: log this one now, saying that `n` were held back since the
    /// last line; `None`: hold it back (it is counted).
    pub fn pass(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(self.period_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_period_and_the_rest_counted() {
        let t = LogThrottle::new(Duration::from_secs(1));
        assert_eq!(t.pass(10_000), Some(0), "the first goes out at once");
        for now in [10_000, 10_001, 10_999] {
            assert_eq!(t.pass(now), None);
        }
        assert_eq!(t.pass(11_000), Some(3), "a period later, with the three held back");
        assert_eq!(t.pass(11_500), None);
        assert_eq!(t.pass(60_000), Some(1), "after a quiet spell, at once");
        assert_eq!(t.pass(60_000), None);
    }

    #[test]
    fn concurrent_callers_let_one_line_through_and_count_the_rest() {
        let t = std::sync::Arc::new(LogThrottle::new(Duration::from_secs(60)));
        let passed: u64 = (0..8)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..1000).filter(|_| t.pass(5_000).is_some()).count() as u64)
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(passed, 1);
        assert_eq!(t.pass(65_000), Some(7_999));
    }
}
