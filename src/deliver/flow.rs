//! How fast a sink's attempts go out: how many are in flight at once
//! (`concurrency`), and how often one may start (`rate_limit`).
//!
//! An adaptive limit (the default) is additive increase, multiplicative
//! decrease, driven by how the sink answers, as TCP's congestion control is
//! by the network: a sink that answers as fast with one more request in
//! flight gets one more; one that slows down, or says so (429, 5xx, a
//! timeout), gets a tenth fewer. On a fast sink the limit climbs to where
//! throughput stops growing; a fixed default caps a sink at `limit /
//! round trip` whatever it could take, and on the bench VM that, not the
//! CPU, set e2e's sustained rate (BENCHMARKS.md).
//!
//! "Slows down" means a round trip of over twice the running mean: a sink
//! in trouble. A rise that comes gradually (a sink that only queues what
//! it gets) moves the mean with it and the limit creeps up to its most,
//! [`Concurrency::ADAPTIVE_MAX`], which bounds it. A sharp slowdown, and
//! every failure that is worth a retry, brings the limit down within a
//! round trip.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Concurrency, RateLimit};

/// How an attempt went, as far as its sink's load is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The sink answered (delivered, or refused for good) after this long.
    Answered(Duration),
    /// Retryable failure: overloaded, down, or too slow. Less, for now.
    PushedBack,
}

/// Share of the limit kept when the sink pushes back or slows down.
const DECREASE: f64 = 0.9;
/// Weight of the newest window in the running round trip.
const SMOOTHING: f64 = 0.4;
/// A window whose mean round trip is past this many times the running one
/// is a sink in trouble, not noise or a little queueing.
const SLOWDOWN: f64 = 2.0;
/// Bounds of a window (one usual round trip long, so each decision sees the
/// effect of the last).
const WINDOW_MIN: Duration = Duration::from_millis(1);
const WINDOW_MAX: Duration = Duration::from_secs(1);

/// The adaptive limit's state between decisions.
#[derive(Debug)]
struct Aimd {
    window_start: Instant,
    rtt_sum: Duration,
    answers: u32,
    pushed_back: bool,
    /// Every slot was at work during this window: only then does one
    /// more say anything.
    full: bool,
    /// Running mean round trip, in seconds.
    usual: Option<f64>,
}

impl Aimd {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            rtt_sum: Duration::ZERO,
            answers: 0,
            pushed_back: false,
            full: false,
            usual: None,
        }
    }

    /// Takes one attempt's signal; at a window's end returns the new limit.
    fn observe(&mut self, signal: Signal, limit: usize, now: Instant) -> Option<usize> {
        match signal {
            Signal::Answered(rtt) => {
                self.rtt_sum += rtt;
                self.answers += 1;
            }
            Signal::PushedBack => self.pushed_back = true,
        }
        let window = match self.usual {
            Some(mean) => Duration::from_secs_f64(mean),
            None => self.rtt_sum / self.answers.max(1),
        }
        .clamp(WINDOW_MIN, WINDOW_MAX);
        if now.duration_since(self.window_start) < window {
            return None;
        }
        let mean = (self.answers > 0).then(|| (self.rtt_sum / self.answers).as_secs_f64());
        let slower = match (mean, self.usual) {
            (Some(m), Some(usual)) => m > SLOWDOWN * usual,
            _ => false,
        };
        let next = if self.pushed_back || slower {
            ((limit as f64 * DECREASE) as usize).max(1)
        } else if self.full {
            limit + 1
        } else {
            limit
        };
        if let Some(m) = mean {
            self.usual = Some(self.usual.map_or(m, |usual| usual + SMOOTHING * (m - usual)));
        }
        *self = Self {
            usual: self.usual,
            ..Self::new(now)
        };
        Some(next)
    }
}

#[derive(Debug)]
struct State {
    /// Slots taken, and those of them at work (`Slot::in_use`).
    in_flight: usize,
    working: usize,
    limit: usize,
    adaptive: Option<Aimd>,
    /// No attempt starts before this: the sink asked everyone to wait.
    held_until: Option<Instant>,
}

/// Attempts in flight for one sink, under its `concurrency`.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    freed: Notify,
}

impl Limiter {
    pub fn new(concurrency: Concurrency) -> Arc<Self> {
        let (limit, adaptive) = match concurrency {
            Concurrency::Fixed(n) => (n, None),
            Concurrency::Adaptive => (Concurrency::ADAPTIVE_START, Some(Aimd::new(Instant::now()))),
        };
        Arc::new(Self {
            state: Mutex::new(State {
                in_flight: 0,
                working: 0,
                limit,
                adaptive,
                held_until: None,
            }),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for room for one more attempt, and for a hold to end. (One
    /// task waits here: the sink's dispatcher.)
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            let freed = self.freed.notified();
            match self.take() {
                Ok(slot) => return slot,
                // Looked at again after: a later answer may have moved it on.
                Err(Some(until)) => tokio::time::sleep_until(until).await,
                Err(None) => freed.await,
            }
        }
    }

    /// Room for one more attempt if there is some now, and no hold.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.take().ok()
    }

    /// A slot, or why not: the hold's end, or `None` for no room.
    fn take(self: &Arc<Self>) -> Result<Slot, Option<Instant>> {
        let mut s = self.lock();
        match s.held_until {
            Some(until) if until > Instant::now() => return Err(Some(until)),
            Some(_) => s.held_until = None,
            None => {}
        }
        if s.in_flight >= s.limit {
            return Err(None);
        }
        s.in_flight += 1;
        Ok(Slot {
            limiter: self.clone(),
            working: false,
            signal: None,
        })
    }

    /// Until when no attempt may start, if a hold is on.
    pub fn held_until(&self) -> Option<Instant> {
        self.lock().held_until.filter(|&until| until > Instant::now())
    }

    /// Starts no attempt before `until` (a sink's `Retry-After`); a later
    /// hold already in place stays.
    pub fn hold(&self, until: Instant) {
        let mut s = self.lock();
        s.held_until = Some(s.held_until.map_or(until, |h| h.max(until)));
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    fn finish(&self, working: bool, signal: Option<Signal>) {
        let mut s = self.lock();
        s.in_flight -= 1;
        if working {
            s.working -= 1;
        }
        let State { limit, adaptive, .. } = &mut *s;
        if let (Some(a), Some(signal)) = (adaptive.as_mut(), signal)
            && let Some(next) = a.observe(signal, *limit, Instant::now())
        {
            *limit = next.min(Concurrency::ADAPTIVE_MAX);
        }
        drop(s);
        self.freed.notify_one();
    }
}

/// Room for one attempt; gives it back when dropped.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<Limiter>,
    working: bool,
    signal: Option<Signal>,
}

impl Slot {
    /// The slot's attempt is starting. (The dispatcher takes a slot before
    /// it has work for it; only slots at work say the limit was reached.)
    pub fn in_use(&mut self) {
        if self.working {
            return;
        }
        self.working = true;
        let mut s = self.limiter.lock();
        s.working += 1;
        if s.working >= s.limit
            && let Some(a) = s.adaptive.as_mut()
        {
            a.full = true;
        }
    }

    /// How the attempt went; the limit learns it when the slot is dropped.
    /// (A slot dropped without a report, e.g. an attempt with nothing to
    /// send, frees its room and tells the limit nothing.)
    pub fn report(&mut self, signal: Signal) {
        self.signal = Some(signal);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.finish(self.working, self.signal.take());
    }
}

/// Starts a sink's attempts no closer together than its `rate_limit`
/// allows: never more than its count in any window of its period. (Timers
/// fire up to a millisecond late and that is not made up for, so a fast
/// limit comes out a little under its count, never over.)
#[derive(Debug)]
pub struct Pace {
    spacing: Duration,
    next: Instant,
}

impl Pace {
    /// Pacing from now, or from `from` when that is later: where a worker
    /// this one took over from left off, but no further off than this
    /// limit's own spacing (a reload that loosens the limit is not held to
    /// the old one's).
    pub fn new(limit: RateLimit, from: Option<Instant>) -> Self {
        let now = Instant::now();
        let spacing = limit.spacing();
        Self {
            spacing,
            next: from.map_or(now, |f| f.min(now + spacing).max(now)),
        }
    }

    /// When the next attempt may start.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Waits until the next attempt may start.
    pub async fn ready(&self) {
        tokio::time::sleep_until(self.next).await;
    }

    /// An attempt starts now: the next may start a spacing later.
    pub fn start(&mut self) {
        self.next = Instant::now().max(self.next) + self.spacing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn adaptive() -> Arc<Limiter> {
        Limiter::new(Concurrency::Adaptive)
    }

    /// Runs `rounds` windows in which the limit is filled and every attempt
    /// answers after `rtt(limit)`, with time paused: returns the limits seen.
    async fn drive(limiter: &Arc<Limiter>, rounds: usize, rtt: impl Fn(usize) -> Duration) -> Vec<usize> {
        let mut seen = Vec::new();
        for _ in 0..rounds {
            let limit = limiter.limit();
            let mut slots = Vec::new();
            for _ in 0..limit {
                let mut slot = limiter.acquire().await;
                slot.in_use();
                slots.push(slot);
            }
            let took = rtt(limit);
            tokio::time::advance(took).await;
            for mut slot in slots {
                slot.report(Signal::Answered(took));
            }
            seen.push(limiter.limit());
        }
        seen
    }

    /// A hold keeps every slot back until it ends, however much room there
    /// is; a shorter hold does not cut a longer one short.
    #[tokio::test(start_paused = true)]
    async fn a_hold_starts_nothing_until_it_ends() {
        let limiter = Limiter::new(Concurrency::Fixed(4));
        let start = Instant::now();
        limiter.hold(start + 2000 * MS);
        limiter.hold(start + 500 * MS);
        let slot = limiter.acquire().await;
        assert_eq!(Instant::now() - start, 2000 * MS);
        drop(slot);
        // Moved on while a dispatcher waits: it waits for the later end.
        let waiting = tokio::spawn({
            let limiter = limiter.clone();
            async move {
                let _slot = limiter.acquire().await;
                Instant::now()
            }
        });
        limiter.hold(Instant::now() + 1000 * MS);
        tokio::time::advance(10 * MS).await;
        limiter.hold(Instant::now() + 3000 * MS);
        let got = waiting.await.unwrap();
        assert_eq!(got - start, 2000 * MS + 3010 * MS);
        // Once past, slots come at once.
        let before = Instant::now();
        drop(limiter.acquire().await);
        assert_eq!(Instant::now(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_limit_climbs_while_the_sink_answers_as_fast_and_stops_at_the_most() {
        let limiter = adaptive();
        assert_eq!(limiter.limit(), Concurrency::ADAPTIVE_START);
        let seen = drive(&limiter, 100, |_| 2 * MS).await;
        assert_eq!(seen[0], Concurrency::ADAPTIVE_START + 1, "{seen:?}");
        assert!(
            seen.windows(2).all(|w| w[1] >= w[0]),
            "never falls at a steady round trip: {seen:?}"
        );
        assert_eq!(limiter.limit(), Concurrency::ADAPTIVE_MAX, "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_limit_settles_below_where_the_sink_slows_down_sharply() {
        let limiter = adaptive();
        // A sink that takes 16 at once in 2 ms and queues the rest for 20.
        let rtt = |n: usize| if n <= 16 { 2 * MS } else { 20 * MS };
        let seen = drive(&limiter, 300, rtt).await;
        let settled = &seen[100..];
        assert!(
            settled.iter().all(|&l| (12..=18).contains(&l)),
            "stays near 16: {settled:?}"
        );
        assert!(settled.iter().any(|&l| l > 16), "probes above it: {settled:?}");
        assert!(
            settled.iter().filter(|&&l| l <= 16).count() > settled.len() / 2,
            "and mostly stays under: {settled:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_limit_creeps_up_under_gradual_queueing_as_far_as_its_most() {
        let limiter = adaptive();
        // Past 16, each more in flight adds a quarter of a millisecond: a
        // rise too gradual to tell from the round trip's own drift, which the
        // most bounds (the module's doc).
        let rtt = |n: usize| 2 * MS + (n.saturating_sub(16) as u32) * MS / 4;
        let seen = drive(&limiter, 300, rtt).await;
        assert!(seen.iter().all(|&l| l <= Concurrency::ADAPTIVE_MAX), "{seen:?}");
        assert_eq!(seen[299], Concurrency::ADAPTIVE_MAX, "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_cuts_an_adaptive_limit_by_a_tenth_down_to_one() {
        let limiter = adaptive();
        drive(&limiter, 40, |_| 2 * MS).await;
        let high = limiter.limit();
        assert_eq!(high, Concurrency::ADAPTIVE_MAX);
        let mut slot = limiter.acquire().await;
        tokio::time::advance(3 * MS).await;
        slot.report(Signal::PushedBack);
        drop(slot);
        assert_eq!(limiter.limit(), (high as f64 * 0.9) as usize);
        for _ in 0..100 {
            let mut slot = limiter.acquire().await;
            tokio::time::advance(5 * MS).await;
            slot.report(Signal::PushedBack);
        }
        assert_eq!(limiter.limit(), 1);
        // And climbs again once the sink recovers.
        drive(&limiter, 5, |_| 2 * MS).await;
        assert_eq!(limiter.limit(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_limit_does_not_climb_when_it_is_not_reached() {
        let limiter = adaptive();
        for _ in 0..50 {
            let mut slot = limiter.acquire().await;
            slot.in_use();
            tokio::time::advance(2 * MS).await;
            slot.report(Signal::Answered(2 * MS));
        }
        assert_eq!(limiter.limit(), Concurrency::ADAPTIVE_START);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_limit_holds_whatever_the_sink_does_and_acquire_waits_for_room() {
        let limiter = Limiter::new(Concurrency::Fixed(2));
        assert_eq!(limiter.limit(), 2);
        drive(&limiter, 20, |_| MS).await;
        let mut a = limiter.acquire().await;
        a.report(Signal::PushedBack);
        drop(a);
        assert_eq!(limiter.limit(), 2);
        let (a, _b) = (limiter.acquire().await, limiter.acquire().await);
        let third = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await }
        });
        tokio::time::advance(10 * MS).await;
        assert!(!third.is_finished(), "a third waits while two are in flight");
        drop(a);
        let third = tokio::time::timeout(Duration::from_secs(1), third).await;
        assert!(third.is_ok(), "and gets the room freed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_limit_is_not_reached_by_a_slot_still_waiting_for_work() {
        let limiter = adaptive();
        for _ in 0..50 {
            // The dispatcher's next slot, taken while it waits for work, and
            // 7 at work: 8 taken, 7 working.
            let waiting = limiter.acquire().await;
            let mut working = Vec::new();
            for _ in 0..7 {
                let mut slot = limiter.acquire().await;
                slot.in_use();
                working.push(slot);
            }
            tokio::time::advance(2 * MS).await;
            for mut slot in working {
                slot.report(Signal::Answered(2 * MS));
            }
            drop(waiting);
        }
        assert_eq!(limiter.limit(), Concurrency::ADAPTIVE_START);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pace_spaces_starts_by_the_rate_limit() {
        let mut pace = Pace::new(
            RateLimit {
                count: 5,
                per: Duration::from_secs(1),
            },
            None,
        );
        let start = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..6 {
            pace.ready().await;
            pace.start();
            starts.push(start.elapsed());
        }
        let ms: Vec<u128> = starts.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [0, 200, 400, 600, 800, 1000]);
        // An idle pace gives no burst: after a long pause, one at once and
        // the next a whole spacing later, counted from when the first
        // actually started (work may come long after its turn).
        tokio::time::advance(Duration::from_secs(10)).await;
        pace.ready().await;
        tokio::time::advance(Duration::from_millis(70)).await;
        pace.start();
        let first = Instant::now();
        pace.ready().await;
        assert_eq!(first.elapsed(), Duration::from_millis(200));

        // A pace taking over keeps the spacing of the one it follows.
        pace.start();
        let handed_over = Instant::now();
        let next = Pace::new(
            RateLimit {
                count: 5,
                per: Duration::from_secs(1),
            },
            Some(pace.next()),
        );
        next.ready().await;
        assert_eq!(handed_over.elapsed(), Duration::from_millis(200));

        // Taking over from a slower limit waits one of its own spacings at most.
        let mut hourly = Pace::new(
            RateLimit {
                count: 1,
                per: Duration::from_secs(3600),
            },
            None,
        );
        hourly.start();
        let handed_over = Instant::now();
        let faster = Pace::new(
            RateLimit {
                count: 10,
                per: Duration::from_secs(1),
            },
            Some(hourly.next()),
        );
        faster.ready().await;
        assert_eq!(handed_over.elapsed(), Duration::from_millis(100));
    }
}
