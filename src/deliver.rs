//! The delivery engine: one worker per sink claims due deliveries, hands them
//! to the sink in batches, and records each outcome through the one shared
//! retry policy.
//!
//! The store is the queue, and claims are leases, so a crash at any point
//! means those deliveries run again (at least once; the delivery key lets
//! the sink drop the repeat). A worker holds in memory only a bounded queue
//! of claims it is about to attempt. Ingest puts a new event's deliveries
//! there directly when there is room ([`Handoff`]): they are written already
//! claimed, and the event it has just normalized goes with them, so the
//! common case needs no claim and no second parse.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use expeditor_api::{Delivery, DeliveryError, Event, Outcome, Reads, Sink, delivery_key};
use tokio::sync::{Notify, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Concurrency, Config, SinkCommon, SinkKind};
use crate::metrics::{AttemptOutcome, Metrics, SinkMetrics};
use crate::pipeline::rebuild;
use crate::store::{Claimed, Completed, Completion, Held, Store, StoredEvent, now_ms};

mod flow;
#[cfg(test)]
mod tests;

use flow::{Limiter, Pace, Signal, Slot};

/// Longest a worker sleeps without looking at the store: other instances
/// sharing a store add work without waking us.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How many rounds of attempts (`concurrency` batches each) a worker keeps
/// claimed ahead, so a claim's store round trip never leaves the sink idle.
const PREFETCH_ROUNDS: usize = 2;
/// Lease left after an attempt's timeout, to record its outcome.
const LEASE_MARGIN_MS: i64 = 10_000;
/// How often claims waiting for a slot are looked at for their lease.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The least a worker keeps claimed ahead.
const MIN_PREFETCH: usize = 64;
/// The most an adaptive sink keeps claimed ahead, unless a fixed default
/// of [`Concurrency::ADAPTIVE_START`] would have kept more.
const MAX_ADAPTIVE_PREFETCH: usize = 1024;

/// How many claims a worker keeps ahead: every attempt at once twice over.
/// An adaptive sink of large batches (a file, BigQuery) keeps no more than
/// it did at the fixed default: its limit rarely needs to climb far. A
/// rate-limited sink keeps no more than can start within half a `lease`,
/// so claims do not go stale waiting for their turn (and be given back
/// and claimed again).
fn prefetch_depth(common: &SinkCommon, max_batch: usize, lease: Duration) -> usize {
    let rounds = |n: usize| PREFETCH_ROUNDS.saturating_mul(n).saturating_mul(max_batch);
    let depth = match common.concurrency {
        Concurrency::Fixed(n) => rounds(n),
        Concurrency::Adaptive => {
            rounds(Concurrency::ADAPTIVE_MAX).min(rounds(Concurrency::ADAPTIVE_START).max(MAX_ADAPTIVE_PREFETCH))
        }
    }
    .max(MIN_PREFETCH);
    match common.rate_limit {
        Some(rate) => {
            let starts = ((lease / 2).as_nanos() / rate.spacing().as_nanos().max(1)).max(1);
            depth.min(usize::try_from(starts).unwrap_or(usize::MAX).saturating_mul(max_batch))
        }
        None => depth,
    }
}

pub struct Engine {
    handoff: Arc<Handoff>,
    tracker: TaskTracker,
    completions: Option<mpsc::Sender<(String, Completion)>>,
    /// This engine's own stop signal: a child of the daemon's, so a reload
    /// can retire one engine while the daemon runs on.
    stop: CancellationToken,
    health: EngineHealth,
    turns: Arc<Turns>,
    in_flight: Arc<InFlight>,
}

/// Which engine's worker may attempt deliveries to a sink: one at a time
/// per sink name, shared by an engine and the one a reload starts after it.
/// The new worker begins once the old one's attempts in flight have ended,
/// so the two never go past the sink's `concurrency` together (the wait is
/// at most the old sink's timeout). The turn also carries when the next
/// attempt may start under `rate_limit`, so the new worker keeps the old
/// one's spacing.
#[derive(Default)]
struct Turns(std::sync::Mutex<HashMap<String, Turn>>);

/// One sink's turn: when its next attempt may start, if it is paced.
type Turn = Arc<tokio::sync::Mutex<Option<tokio::time::Instant>>>;

impl Turns {
    fn of(&self, sink: &str) -> Turn {
        let mut turns = self.0.lock().unwrap_or_else(|e| e.into_inner());
        turns.entry(sink.to_owned()).or_default().clone()
    }
}

/// Whether every sink worker of an engine is still running (`/readyz`).
#[derive(Clone, Debug)]
pub struct EngineHealth {
    live: Arc<AtomicUsize>,
    expected: usize,
    /// Each sink's concurrency limit, read when `/metrics` is scraped: the
    /// engine that is current reports, not one a reload retired.
    limits: Arc<Vec<(String, Arc<Limiter>)>>,
}

impl EngineHealth {
    pub fn running(&self) -> bool {
        self.live.load(Ordering::Relaxed) == self.expected
    }

    /// Where each sink's concurrency limit stands now.
    pub fn concurrency_limits(&self) -> Vec<(String, usize)> {
        self.limits.iter().map(|(sink, l)| (sink.clone(), l.limit())).collect()
    }
}

/// Counts a worker as live while it exists.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Builds the sink a spec describes.
pub async fn build_sink(kind: &SinkKind, client: &expeditor_http::Client) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(match kind {
        SinkKind::Http(cfg) => Arc::new(expeditor_http::HttpSink::new(cfg.clone(), client.clone())),
        SinkKind::File(cfg) => Arc::new(expeditor_file::FileSink::open(cfg.clone()).await?),
        SinkKind::Slack(cfg) => Arc::new(expeditor_slack::SlackSink::new(cfg.clone())?),
        SinkKind::Email(cfg) => Arc::new(expeditor_email::EmailSink::new(cfg.clone()).map_err(anyhow::Error::msg)?),
        SinkKind::BigQuery(cfg) => {
            Arc::new(expeditor_bigquery::BigQuerySink::new(cfg.clone()).map_err(anyhow::Error::msg)?)
        }
        // The plugin was loaded (and its `init` judged the config) when the
        // config was; a reloaded config carries a freshly loaded plugin.
        SinkKind::Wasm(plugin) => Arc::new(expeditor_wasm::WasmSink::new(plugin.clone())),
    })
}

impl Engine {
    /// Builds every configured sink and starts one worker per sink. Fails,
    /// starting nothing, if a sink cannot be built. An engine a reload
    /// replaces is passed as `after`: each sink's new worker waits for the
    /// old one of that name to finish its attempts in flight ([`Turns`]).
    pub async fn start(
        config: &Config,
        store: Arc<dyn Store>,
        client: expeditor_http::Client,
        metrics: Arc<Metrics>,
        parent: &CancellationToken,
        after: Option<&Engine>,
    ) -> anyhow::Result<Self> {
        let stop = parent.child_token();
        let turns = after.map(|e| e.turns.clone()).unwrap_or_default();
        let tracker = TaskTracker::new();
        let mut notifies = HashMap::new();
        let mut sinks = Vec::new();
        for (name, spec) in &config.sinks {
            let sink = build_sink(&spec.kind, &client)
                .await
                .map_err(|e| e.context(format!("cannot start sink {name}")))?;
            notifies.insert(name.clone(), Arc::new(Notify::new()));
            sinks.push((name.clone(), spec.common, sink));
        }
        let notifies = Arc::new(notifies);
        let (tx, rx) = mpsc::channel(4096);
        tracker.spawn(record_completions(rx, store.clone(), notifies.clone()));
        let live = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(InFlight::default());
        let expected = sinks.len();
        let mut limits = Vec::new();
        let mut hot = HashMap::new();
        for (name, common, sink) in sinks {
            let max_batch = sink.max_batch().max(1);
            // Long enough for the attempt and its recording; after that another
            // worker may take the delivery over. A claim that waited in the queue
            // until too little of its lease is left is given back, not attempted.
            let lease = common.timeout * 2 + Duration::from_secs(30);
            let depth = prefetch_depth(&common, max_batch, lease);
            let limiter = Limiter::new(common.concurrency);
            limits.push((name.clone(), limiter.clone()));
            let (queue_tx, queue_rx) = mpsc::unbounded_channel();
            let sink_queue = HotSink {
                slots: Arc::new(Semaphore::new(depth)),
                queue: queue_tx,
                lease,
                reads: sink.reads(),
            };
            hot.insert(name.clone(), sink_queue.clone());
            let worker = Worker {
                name: name.clone(),
                sink,
                common,
                limiter,
                store: store.clone(),
                notify: notifies[&name].clone(),
                completions: tx.clone(),
                metrics: SinkMetrics::new(metrics.clone(), &name),
                in_flight: in_flight.clone(),
            };
            let live = LiveGuard::new(&live);
            let stop = stop.clone();
            let queue = Queue {
                hot: sink_queue,
                rx: queue_rx,
                depth,
                max_batch,
            };
            let turn = turns.of(&name);
            tracker.spawn(async move {
                let _live = live;
                // Stopped while waiting, the worker still runs, briefly: it
                // gives back what ingest queued for it and closes its sink.
                let turn = tokio::select! {
                    t = turn.lock_owned() => Some(t),
                    _ = stop.cancelled() => None,
                };
                worker.run(queue, stop, turn).await;
            });
        }
        let health = EngineHealth {
            live,
            expected,
            limits: Arc::new(limits),
        };
        let handoff = Arc::new(Handoff { sinks: hot, notifies });
        Ok(Self {
            handoff,
            tracker,
            completions: Some(tx),
            stop,
            health,
            turns,
            in_flight,
        })
    }

    /// The claims whose attempts are running (see [`InFlight`]).
    pub fn in_flight(&self) -> Arc<InFlight> {
        self.in_flight.clone()
    }

    pub fn health(&self) -> EngineHealth {
        self.health.clone()
    }

    /// Tells the workers to stop claiming; see [`Engine::stopped`].
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// What ingest uses to start the deliveries of the events it stores, and
    /// what wakes the workers when deliveries are due again (a replay).
    pub fn handoff(&self) -> Arc<Handoff> {
        self.handoff.clone()
    }

    /// Stops the workers, waits for their attempts in flight to finish and
    /// for every outcome to be recorded.
    pub async fn stopped(mut self) {
        self.stop.cancel();
        self.completions.take();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The claims whose attempts are running. A stop that cuts them off gives
/// their leases back ([`Engine::in_flight`]): on a store other instances
/// share, nothing else frees them before the lease ends, and the deliveries
/// would wait that long (twice the sink's timeout and 30 s) to run again.
#[derive(Default)]
pub struct InFlight(std::sync::Mutex<HashMap<i64, (u32, i64)>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (u32, i64)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a batch's claims until the guard is dropped (its outcomes are
    /// queued, or the attempt is cut off).
    fn enter(self: &Arc<Self>, batch: &[Claimed]) -> InFlightGuard {
        let mut claims = self.lock();
        for c in batch {
            claims.insert(c.delivery_id, (c.attempt, c.lease_until));
        }
        InFlightGuard {
            registry: self.clone(),
            ids: batch.iter().map(|c| c.delivery_id).collect(),
        }
    }

    /// Completions that give every claim still in flight back, unattempted.
    pub fn released(&self, at: i64) -> Vec<Completion> {
        self.lock()
            .iter()
            .map(|(&delivery_id, &(attempt, lease_until))| Completion {
                delivery_id,
                attempt,
                lease_until,
                finished_at: at,
                result: Completed::Released,
            })
            .collect()
    }
}

struct InFlightGuard {
    registry: Arc<InFlight>,
    ids: Vec<i64>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut claims = self.registry.lock();
        for id in &self.ids {
            claims.remove(id);
        }
    }
}

/// Gives a claim back unattempted: only while it is still the current claim.
fn released(c: &Claimed, at: i64) -> Completion {
    Completion {
        delivery_id: c.delivery_id,
        attempt: c.attempt,
        lease_until: c.lease_until,
        finished_at: at,
        result: Completed::Released,
    }
}

/// A worker's queue of claims about to be attempted, and its bound.
struct Queue {
    /// The sending side, shared with ingest's [`Handoff`].
    hot: HotSink,
    rx: mpsc::UnboundedReceiver<Claimed>,
    depth: usize,
    max_batch: usize,
}

/// What fills a worker's queue: its claimer, and ingest through [`Handoff`].
#[derive(Clone)]
struct HotSink {
    /// Room left in the queue: the claimer and ingest take it, the
    /// dispatcher gives it back as it starts attempts.
    slots: Arc<Semaphore>,
    queue: mpsc::UnboundedSender<Claimed>,
    /// How long a claim is leased for.
    lease: Duration,
    /// What the sink reads of an event (`Sink::reads`).
    reads: Reads,
}

/// Lets ingest put the deliveries of a new event straight into the sink
/// workers' queues, with the event it has already normalized, instead of
/// leaving them for a claim to find and rebuild. Only when a queue has room:
/// otherwise the delivery is written pending and claimed as usual.
pub struct Handoff {
    sinks: HashMap<String, HotSink>,
    notifies: Arc<HashMap<String, Arc<Notify>>>,
}

/// Room taken in sink queues for one event's first attempts. Dropped
/// unused (duplicate, store error, request gone), it gives the room back.
pub struct Reservation {
    permits: Vec<OwnedSemaphorePermit>,
    /// What the store writes already claimed, in the order of `permits`.
    pub held: Vec<Held>,
    /// The most any held sink reads of the event it is handed.
    pub reads: Reads,
}

impl Handoff {
    /// Takes room for the first attempt of every sink in `sinks` whose queue
    /// has some now.
    pub fn reserve(&self, sinks: &[String], now: i64) -> Reservation {
        let mut r = Reservation {
            permits: Vec::new(),
            held: Vec::new(),
            reads: Reads::Meta,
        };
        for sink in sinks {
            let Some(hot) = self.sinks.get(sink) else { continue };
            if let Ok(permit) = hot.slots.clone().try_acquire_owned() {
                r.permits.push(permit);
                r.reads = r.reads.union(hot.reads);
                r.held.push(Held {
                    sink: sink.clone(),
                    lease_until: now.saturating_add(hot.lease.as_millis() as i64),
                });
            }
        }
        r
    }

    /// After the event is stored: queues the held deliveries (`ids` as the
    /// store returned them) and wakes the claimers of the other sinks.
    /// Returns the claims to give back because their worker has stopped (a
    /// reload retired this engine while the request was in flight): the
    /// caller records them, so the next engine runs them at once rather than
    /// after the lease.
    #[must_use]
    pub fn start(
        &self,
        reservation: Reservation,
        ids: &[i64],
        sinks: &[String],
        event: &StoredEvent,
        prepared: Arc<Event>,
    ) -> Vec<Completion> {
        let Reservation { permits, held, .. } = reservation;
        let mut give_back = Vec::new();
        for ((permit, h), &id) in permits.into_iter().zip(held.iter()).zip(ids) {
            let Some(hot) = self.sinks.get(&h.sink) else { continue };
            // The dispatcher gives the room back when it takes the claim.
            permit.forget();
            let claim = Claimed {
                delivery_id: id,
                sink: h.sink.clone(),
                attempt: 1,
                taken_over: false,
                lease_until: h.lease_until,
                event: event.clone(),
                prepared: Some(prepared.clone()),
            };
            if let Err(unsent) = hot.queue.send(claim) {
                give_back.push(released(&unsent.0, now_ms()));
            }
        }
        let rest: Vec<&String> = sinks.iter().filter(|s| !held.iter().any(|h| &h.sink == *s)).collect();
        self.wake(rest);
        give_back
    }

    /// Wakes the claimers of `sinks`: they have new pending deliveries.
    pub fn wake<'a>(&self, sinks: impl IntoIterator<Item = &'a String>) {
        for sink in sinks {
            if let Some(n) = self.notifies.get(sink) {
                n.notify_one();
            }
        }
    }
}

struct Worker {
    name: String,
    sink: Arc<dyn Sink>,
    common: SinkCommon,
    limiter: Arc<Limiter>,
    store: Arc<dyn Store>,
    notify: Arc<Notify>,
    completions: mpsc::Sender<(String, Completion)>,
    metrics: SinkMetrics,
    in_flight: Arc<InFlight>,
}

impl Worker {
    /// Claims and attempts until `shutdown`, in two loops: a claimer keeps a
    /// small queue of claimed deliveries topped up, and the dispatcher starts
    /// attempts from it as permits free up. So the store round trip of the
    /// next claim overlaps the attempts of the last one instead of idling the
    /// sink between them. The sink's `turn` is given up once no attempt is
    /// in flight, before the sink is closed (closing may take a while, e.g. a
    /// plugin's `shutdown`, and attempts nothing).
    async fn run(
        self,
        queue: Queue,
        shutdown: CancellationToken,
        mut turn: Option<OwnedMutexGuard<Option<tokio::time::Instant>>>,
    ) {
        let this = Arc::new(self);
        let Queue {
            hot:
                HotSink {
                    slots,
                    queue: tx,
                    lease,
                    ..
                },
            rx,
            depth,
            max_batch,
        } = queue;
        let stop_claiming = shutdown.child_token();
        let claimer = tokio::spawn(
            this.clone()
                .claim_loop(slots.clone(), tx, depth, lease, stop_claiming.clone()),
        );
        let paced_from = turn.as_deref().copied().flatten();
        let next_start = this
            .clone()
            .dispatch_loop(slots, rx, max_batch, shutdown, paced_from)
            .await;
        stop_claiming.cancel();
        let _ = claimer.await;
        if let Some(turn) = turn.as_mut() {
            **turn = next_start;
        }
        drop(turn);
        this.sink.close().await;
    }

    /// Claims as many deliveries as the queue has room for whenever it has
    /// any; sleeps until ingest wakes it, the next retry is due, or the idle
    /// poll when the store has nothing due.
    async fn claim_loop(
        self: Arc<Self>,
        slots: Arc<Semaphore>,
        queue: mpsc::UnboundedSender<Claimed>,
        depth: usize,
        lease: Duration,
        stop: CancellationToken,
    ) {
        loop {
            // First: a worker stopped before it began claims nothing.
            if stop.is_cancelled() {
                return;
            }
            // Nothing is attempted while the sink holds; a claim taken now
            // would only wait out its lease.
            if let Some(until) = self.limiter.held_until() {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            let room = tokio::select! {
                p = slots.acquire_many(1) => p.expect("semaphore is never closed"),
                _ = stop.cancelled() => return,
            };
            room.forget();
            let mut want = 1;
            while want < depth {
                match slots.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        want += 1;
                    }
                    Err(_) => break,
                }
            }
            let claimed = match self.store.claim(&self.name, want, lease, now_ms()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(sink = %self.name, error = %e, "cannot claim deliveries");
                    slots.add_permits(want);
                    tokio::select! {
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            let got = claimed.len();
            slots.add_permits(want - got);
            // Each of these had a holder that stopped mid-attempt (a crash, an
            // instance gone) and runs again as the same attempt: a delivery
            // that keeps coming back here may be what stops its holders.
            for c in claimed.iter().filter(|c| c.taken_over) {
                tracing::warn!(
                    sink = %self.name,
                    source = %c.event.source,
                    event_id = %c.event.event_id,
                    attempt = c.attempt,
                    "delivery taken over: its last holder's lease ran out mid-attempt; it runs again as the same attempt"
                );
            }
            for c in claimed {
                if let Err(unsent) = queue.send(c) {
                    // The dispatcher has stopped: give the claim back.
                    self.release(vec![unsent.0]).await;
                }
            }
            if got == want {
                continue; // likely more due: claim again as soon as there is room
            }
            // Nothing more due now. A wake-up that came during the claim is
            // kept by the Notify, so none is missed.
            let wait = match self.store.next_due(&self.name).await {
                Ok(Some(due)) => Duration::from_millis((due - now_ms()).clamp(1, IDLE_POLL.as_millis() as i64) as u64),
                _ => IDLE_POLL,
            };
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Starts an attempt per batch as permits allow; a sink's `linger` holds
    /// a batch smaller than `max_batch` for up to that long to fill it.
    /// Stops at shutdown: attempts in flight finish, queued claims are given
    /// back. A `rate_limit` paces from `paced_from` (where the worker before
    /// this one left off); returns when the next attempt may start.
    ///
    /// While no attempt can start (every slot busy with a slow sink, or a
    /// `Retry-After` hold), claims wait; every [`SWEEP_EVERY`] those too
    /// close to their lease's end are given back. Left in the queue, a
    /// lapsed claim would be claimed again, by this worker too, while this
    /// one may still start it: the same attempt twice.
    async fn dispatch_loop(
        self: Arc<Self>,
        slots: Arc<Semaphore>,
        mut queue: mpsc::UnboundedReceiver<Claimed>,
        max_batch: usize,
        shutdown: CancellationToken,
        paced_from: Option<tokio::time::Instant>,
    ) -> Option<tokio::time::Instant> {
        let limiter = self.limiter.clone();
        let mut pace = self.common.rate_limit.map(|limit| Pace::new(limit, paced_from));
        let linger = self.sink.linger();
        let in_flight = TaskTracker::new();
        // Claims taken off the queue while they waited, oldest first.
        let mut waiting: VecDeque<Claimed> = VecDeque::new();
        // One timer, reset only when it fires: a full limit is the common
        // case of a busy sink, and a fresh timer for each wait would cost
        // every batch a trip through the runtime's timer wheel.
        let sweep = tokio::time::sleep(SWEEP_EVERY);
        tokio::pin!(sweep);
        let mut batch: Vec<Claimed> = Vec::with_capacity(max_batch);
        'dispatch: loop {
            // Checked first: `select!` picks among ready branches at random,
            // and a worker stopped before it began must not start anything.
            if shutdown.is_cancelled() {
                break;
            }
            let mut slot = match limiter.try_acquire() {
                Some(slot) => slot,
                None => loop {
                    tokio::select! {
                        s = limiter.acquire() => break s,
                        _ = &mut sweep => {
                            self.sweep(&mut queue, &mut waiting, &slots).await;
                            sweep.as_mut().reset(tokio::time::Instant::now() + SWEEP_EVERY);
                        }
                        _ = shutdown.cancelled() => break 'dispatch,
                    }
                },
            };
            // A rate limit's turn comes before the claims are taken, so none
            // waits for it past the lease check below.
            if let Some(pace) = pace.as_ref() {
                tokio::select! {
                    _ = pace.ready() => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            while batch.len() < max_batch
                && let Some(c) = waiting.pop_front()
            {
                batch.push(c);
            }
            // Topped up from the queue, so a batching sink's batches stay
            // full after a wait.
            while batch.len() < max_batch
                && !batch.is_empty()
                && let Ok(c) = queue.try_recv()
            {
                batch.push(c);
            }
            if batch.is_empty() {
                tokio::select! {
                    n = queue.recv_many(&mut batch, max_batch) => if n == 0 { break },
                    _ = shutdown.cancelled() => break,
                }
            }
            if !linger.is_zero() && batch.len() < max_batch {
                let deadline = tokio::time::Instant::now() + linger;
                while batch.len() < max_batch {
                    let room = max_batch - batch.len();
                    tokio::select! {
                        n = queue.recv_many(&mut batch, room) => if n == 0 { break },
                        _ = tokio::time::sleep_until(deadline) => break,
                        // Shutdown sends what is held at once.
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            // The sink asked for a wait while this slot waited for work: the
            // batch waits with the rest.
            if limiter.held_until().is_some() {
                for c in batch.drain(..).rev() {
                    waiting.push_front(c);
                }
                continue;
            }
            // An attempt must end (timeout) and be recorded within the lease.
            let (fresh, stale) = self.split_stale(std::mem::take(&mut batch));
            slots.add_permits(fresh.len() + stale.len());
            if !stale.is_empty() {
                self.release(stale).await;
            }
            // Looked at again: giving back may have waited on the store.
            let (fresh, stale) = self.split_stale(fresh);
            if !stale.is_empty() {
                self.release(stale).await;
            }
            if fresh.is_empty() {
                continue;
            }
            if let Some(pace) = pace.as_mut() {
                pace.start();
            }
            slot.in_use();
            let this = self.clone();
            in_flight.spawn(async move {
                this.attempt(fresh, slot).await;
            });
            batch.reserve(max_batch);
        }
        // Claimed but never started: give them back so they run at once
        // elsewhere or after the restart, not after the lease.
        queue.close();
        batch.extend(waiting);
        while let Ok(c) = queue.try_recv() {
            batch.push(c);
        }
        if !batch.is_empty() {
            self.release(batch).await;
        }
        // Attempts in flight finish (each is bounded by the sink timeout).
        in_flight.close();
        in_flight.wait().await;
        pace.map(|p| p.next())
    }

    /// Claims that can still be attempted and recorded within their lease,
    /// and those that cannot.
    fn split_stale(&self, claims: Vec<Claimed>) -> (Vec<Claimed>, Vec<Claimed>) {
        let must_start_by = now_ms() + self.common.timeout.as_millis() as i64 + LEASE_MARGIN_MS;
        if claims.iter().all(|c| c.lease_until >= must_start_by) {
            return (claims, Vec::new());
        }
        claims.into_iter().partition(|c| c.lease_until >= must_start_by)
    }

    /// Takes what the queue holds into `waiting` and gives back the claims
    /// too close to their lease's end, making room for them to be claimed
    /// again (afresh, as the count of attempts goes back down).
    async fn sweep(
        &self,
        queue: &mut mpsc::UnboundedReceiver<Claimed>,
        waiting: &mut VecDeque<Claimed>,
        slots: &Semaphore,
    ) {
        while let Ok(c) = queue.try_recv() {
            waiting.push_back(c);
        }
        let (fresh, stale) = self.split_stale(std::mem::take(waiting).into());
        *waiting = fresh.into();
        if !stale.is_empty() {
            slots.add_permits(stale.len());
            self.release(stale).await;
        }
    }

    async fn release(&self, claims: Vec<Claimed>) {
        let finished_at = now_ms();
        for c in claims {
            let completion = released(&c, finished_at);
            let _ = self.completions.send((self.name.clone(), completion)).await;
        }
    }

    /// Runs one batch in `slot`, and tells the slot how the sink answered.
    async fn attempt(&self, batch: Vec<Claimed>, mut slot: Slot) {
        let _in_flight = self.in_flight.enter(&batch);
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        for c in &batch {
            let event = match &c.prepared {
                Some(event) => Ok(event.clone()),
                None => rebuild(&c.event, self.sink.reads()).map(Arc::new),
            };
            match event {
                Ok(event) => {
                    deliveries.push(Delivery {
                        key: delivery_key(&c.event.source, &c.event.event_id, &self.name),
                        attempt: c.attempt,
                        event,
                    });
                    outcomes.push(None);
                }
                Err(e) => outcomes.push(Some(Err(DeliveryError::permanent(e)))),
            }
        }
        let started = Instant::now();
        let mut signal = None;
        if !deliveries.is_empty() {
            // A backstop: sinks enforce their own timeout, which reports better.
            let limit = self.common.timeout + Duration::from_millis(500);
            let results = match tokio::time::timeout(limit, self.sink.deliver(&deliveries)).await {
                Ok(r) if r.len() == deliveries.len() => r,
                Ok(r) => {
                    tracing::error!(sink = %self.name, expected = deliveries.len(), got = r.len(), "sink returned the wrong number of outcomes");
                    vec![Err(DeliveryError::retryable("sink returned no outcome for this delivery")); deliveries.len()]
                }
                Err(_) => vec![Err(DeliveryError::timed_out(self.common.timeout)); deliveries.len()],
            };
            signal = Some(if results.iter().any(|r| matches!(r, Err(e) if e.retryable)) {
                Signal::PushedBack
            } else {
                Signal::Answered(started.elapsed())
            });
            self.hold_if_asked(&results);
            let mut results = results.into_iter();
            for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                *outcome = results.next();
            }
        }
        // The room stays taken until the outcomes are queued for the store
        // (below), so a store that falls behind holds attempts back too.
        if let Some(signal) = signal {
            slot.report(signal);
        }
        let finished_at = now_ms();
        self.metrics.attempt_took(started.elapsed());
        for (c, outcome) in batch.into_iter().zip(outcomes) {
            let outcome = outcome.unwrap_or_else(|| Err(DeliveryError::retryable("no outcome")));
            let result = self.judge(&c, outcome, finished_at);
            let label = match result {
                Completed::Delivered => AttemptOutcome::delivered,
                Completed::Retry { .. } => AttemptOutcome::retry,
                Completed::Dead { .. } => AttemptOutcome::dead,
                Completed::Released => continue,
            };
            self.metrics.attempt(label);
            let completion = Completion {
                delivery_id: c.delivery_id,
                attempt: c.attempt,
                lease_until: c.lease_until,
                finished_at,
                result,
            };
            // The receiver lives until every worker has stopped.
            let _ = self.completions.send((self.name.clone(), completion)).await;
        }
    }

    /// When the sink's service asked for a wait (`Retry-After` on a 429 or
    /// 503, Slack's rate limit), no attempt to it starts until then, within
    /// the retry policy's bounds as for the delivery that was told: the
    /// others would only spend attempts on the same answer.
    fn hold_if_asked(&self, results: &[Outcome]) {
        let asked = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter(|e| e.retryable && e.holds_sink)
            .filter_map(|e| e.retry_after)
            .max();
        if let Some(after) = asked {
            let wait = self.common.retry.bounded(after);
            tracing::info!(sink = %self.name, wait = ?wait, "the sink asked to wait; no attempt starts until then");
            self.limiter.hold(tokio::time::Instant::now() + wait);
        }
    }

    /// Applies the retry policy to one outcome.
    fn judge(&self, c: &Claimed, outcome: Outcome, now: i64) -> Completed {
        let ids = (&c.event.source, &c.event.event_id, &self.name, c.attempt);
        // A sink's message may be a plugin's own words: one bounded line in
        // the log, so it cannot forge lines or flood the journal (the store
        // keeps its own bounded copy).
        let logged = |m| expeditor_api::message::one_line(m, LOGGED_ERROR_CHARS);
        match outcome {
            Ok(()) => {
                tracing::debug!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, "delivered");
                Completed::Delivered
            }
            Err(e) if e.retryable => match self.common.retry.next_delay(c.attempt, e.retry_after) {
                Some(delay) => {
                    tracing::info!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, error = %logged(&e.message), retry_in = ?delay, "delivery failed; will retry");
                    Completed::Retry {
                        due_at: now + delay.as_millis() as i64,
                        error: e.message,
                    }
                }
                None => {
                    tracing::warn!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, error = %logged(&e.message), "delivery failed; attempts used up, dead-lettered");
                    Completed::Dead {
                        error: format!("{} (gave up after {} attempts)", e.message, c.attempt),
                    }
                }
            },
            Err(e) => {
                tracing::warn!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, error = %logged(&e.message), "delivery failed permanently; dead-lettered");
                Completed::Dead { error: e.message }
            }
        }
    }
}

/// Failed tries of a group of outcomes before the store is asked whether it
/// takes writes at all.
const TRIES_BEFORE_SPLIT: u32 = 3;
/// The most of a sink's error message a log line carries.
const LOGGED_ERROR_CHARS: usize = 500;

/// Records a group of outcomes, trying again while the store is down: an
/// outcome that is not recorded is redone after its lease runs out, which
/// is safe but wasteful. If the group keeps failing while the store takes
/// other writes, one of its outcomes is what the store refuses, and it
/// must not hold back the rest (and every outcome after them) for ever:
/// each is then tried alone, and one that still fails is left to its lease.
async fn record(store: &dyn Store, mut done: Vec<Completion>, closed: impl Fn() -> bool) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0;
    loop {
        let Err(e) = store.complete(done.clone()).await else {
            return;
        };
        failures += 1;
        if failures >= TRIES_BEFORE_SPLIT && store.writable().await.is_ok() {
            let mut refused = Vec::new();
            for c in std::mem::take(&mut done) {
                if let Err(e) = store.complete(vec![c.clone()]).await {
                    refused.push((c, e));
                }
            }
            if refused.is_empty() {
                return;
            }
            // Still taking writes: these are the store's refusals, not an
            // outage that began meanwhile.
            if store.writable().await.is_ok() {
                for (c, e) in refused {
                    tracing::error!(
                        delivery = c.delivery_id,
                        attempt = c.attempt,
                        error = %e,
                        "the store refuses this delivery's outcome; the delivery runs again when its lease ends"
                    );
                }
                return;
            }
            done = refused.into_iter().map(|(c, _)| c).collect();
            failures = 0;
            continue;
        }
        tracing::error!(error = %e, "cannot record delivery outcomes; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if closed() && backoff >= Duration::from_secs(5) {
            tracing::error!("giving up recording outcomes at shutdown; those deliveries will run again");
            return;
        }
    }
}

/// Records outcomes in groups (one store commit for many), and wakes a sink's
/// worker when a retry was scheduled so it can sleep until exactly then.
async fn record_completions(
    mut rx: mpsc::Receiver<(String, Completion)>,
    store: Arc<dyn Store>,
    notifies: Arc<HashMap<String, Arc<Notify>>>,
) {
    let mut buf = Vec::new();
    while rx.recv_many(&mut buf, 1024).await > 0 {
        let mut retried: Vec<String> = Vec::new();
        let mut done = Vec::with_capacity(buf.len());
        for (sink, c) in buf.drain(..) {
            if matches!(c.result, Completed::Retry { .. }) && !retried.contains(&sink) {
                retried.push(sink);
            }
            done.push(c);
        }
        record(&*store, done, || rx.is_closed()).await;
        for sink in retried {
            if let Some(n) = notifies.get(&sink) {
                n.notify_one();
            }
        }
    }
}
