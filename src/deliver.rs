//! The delivery engine: one worker per sink claims due deliveries, hands them
//! to the sink in batches, and records each outcome through the one shared
//! retry policy.
//!
//! Workers never hold deliveries in memory beyond an attempt: the store is
//! the queue, and claims are leases, so a crash at any point means those
//! deliveries run again (at least once; the delivery key lets the sink drop
//! the repeat).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use expeditor_api::{Delivery, DeliveryError, Outcome, Sink, delivery_key};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, SinkCommon, SinkKind};
use crate::metrics::{AttemptOutcome, Metrics};
use crate::pipeline::{Wake, rebuild};
use crate::store::{Claimed, Completed, Completion, Store, now_ms};

/// Longest a worker sleeps without looking at the store: other instances
/// sharing a store add work without waking us.
const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct Engine {
    notifies: Arc<HashMap<String, Arc<Notify>>>,
    tracker: TaskTracker,
    completions: Option<mpsc::Sender<(String, Completion)>>,
    /// This engine's own stop signal: a child of the daemon's, so a reload
    /// can retire one engine while the daemon runs on.
    stop: CancellationToken,
    health: EngineHealth,
}

/// Whether every sink worker of an engine is still running (`/readyz`).
#[derive(Clone, Debug)]
pub struct EngineHealth {
    live: Arc<AtomicUsize>,
    expected: usize,
}

impl EngineHealth {
    pub fn running(&self) -> bool {
        self.live.load(Ordering::Relaxed) == self.expected
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
pub async fn build_sink(kind: &SinkKind, client: &reqwest::Client) -> anyhow::Result<Arc<dyn Sink>> {
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
    /// starting nothing, if a sink cannot be built.
    pub async fn start(
        config: &Config,
        store: Arc<dyn Store>,
        client: reqwest::Client,
        metrics: Arc<Metrics>,
        parent: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let stop = parent.child_token();
        let tracker = TaskTracker::new();
        let mut notifies = HashMap::new();
        let mut sinks = Vec::new();
        for (name, spec) in &config.sinks {
            let sink = build_sink(&spec.kind, &client)
                .await
                .map_err(|e| anyhow::anyhow!("cannot start sink {name}: {e}"))?;
            notifies.insert(name.clone(), Arc::new(Notify::new()));
            sinks.push((name.clone(), spec.common, sink));
        }
        let notifies = Arc::new(notifies);
        let (tx, rx) = mpsc::channel(4096);
        tracker.spawn(record_completions(rx, store.clone(), notifies.clone()));
        let health = EngineHealth {
            live: Arc::new(AtomicUsize::new(0)),
            expected: sinks.len(),
        };
        for (name, common, sink) in sinks {
            let worker = Worker {
                name: name.clone(),
                sink,
                common,
                store: store.clone(),
                notify: notifies[&name].clone(),
                completions: tx.clone(),
                metrics: metrics.clone(),
            };
            let live = LiveGuard::new(&health.live);
            let stop = stop.clone();
            tracker.spawn(async move {
                let _live = live;
                worker.run(stop).await;
            });
        }
        Ok(Self {
            notifies,
            tracker,
            completions: Some(tx),
            stop,
            health,
        })
    }

    pub fn health(&self) -> EngineHealth {
        self.health.clone()
    }

    /// Tells the workers to stop claiming; see [`Engine::stopped`].
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// A handle ingest calls after committing new deliveries.
    pub fn waker(&self) -> Wake {
        let notifies = self.notifies.clone();
        Arc::new(move |sinks: &[String]| {
            for s in sinks {
                if let Some(n) = notifies.get(s) {
                    n.notify_one();
                }
            }
        })
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

struct Worker {
    name: String,
    sink: Arc<dyn Sink>,
    common: SinkCommon,
    store: Arc<dyn Store>,
    notify: Arc<Notify>,
    completions: mpsc::Sender<(String, Completion)>,
    metrics: Arc<Metrics>,
}

impl Worker {
    async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.common.concurrency));
        let max_batch = this.sink.max_batch().max(1);
        let linger = this.sink.linger();
        // Long enough for the attempt and its recording; after that another
        // worker may take the delivery over.
        let lease = this.common.timeout * 2 + Duration::from_secs(30);
        let in_flight = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.cancelled() => break,
            };
            let want = (1 + permits.available_permits()) * max_batch;
            let claimed = match this.store.claim(&this.name, want, lease, now_ms()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(sink = %this.name, error = %e, "cannot claim deliveries");
                    drop(permit);
                    tokio::select! {
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            if claimed.is_empty() {
                drop(permit);
                let wait = match this.store.next_due(&this.name).await {
                    Ok(Some(due)) => {
                        Duration::from_millis((due - now_ms()).clamp(1, IDLE_POLL.as_millis() as i64) as u64)
                    }
                    _ => IDLE_POLL,
                };
                tokio::select! {
                    _ = this.notify.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let mut claimed = claimed;
            if !linger.is_zero() && max_batch > 1 && claimed.len() < max_batch {
                this.fill(&mut claimed, max_batch, linger, lease, &shutdown).await;
            }
            let mut first = Some(permit);
            let mut batches = claimed.into_iter().peekable();
            while batches.peek().is_some() {
                let batch: Vec<Claimed> = batches.by_ref().take(max_batch).collect();
                let permit = match first.take() {
                    Some(p) => p,
                    None => permits
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore is never closed"),
                };
                let this = this.clone();
                in_flight.spawn(async move {
                    this.attempt(batch).await;
                    drop(permit);
                });
            }
        }
        // Attempts in flight finish (each is bounded by the sink timeout);
        // nothing new is claimed.
        in_flight.close();
        in_flight.wait().await;
        this.sink.close().await;
    }

    /// A sink's `linger`: holds a batch smaller than `max_batch` for up to
    /// `linger`, claiming what else becomes due when ingest wakes the worker,
    /// and once more at the end. Shutdown sends what is held at once.
    async fn fill(
        &self,
        claimed: &mut Vec<Claimed>,
        max_batch: usize,
        linger: Duration,
        lease: Duration,
        shutdown: &CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + linger;
        while claimed.len() < max_batch {
            let last = tokio::select! {
                _ = self.notify.notified() => false,
                _ = tokio::time::sleep_until(deadline) => true,
                _ = shutdown.cancelled() => return,
            };
            match self
                .store
                .claim(&self.name, max_batch - claimed.len(), lease, now_ms())
                .await
            {
                Ok(more) => claimed.extend(more),
                Err(e) => {
                    tracing::warn!(sink = %self.name, error = %e, "cannot claim deliveries");
                    return;
                }
            }
            if last {
                return;
            }
        }
    }

    async fn attempt(&self, batch: Vec<Claimed>) {
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        for c in &batch {
            match rebuild(&c.event) {
                Ok(event) => {
                    deliveries.push(Delivery {
                        key: delivery_key(&c.event.source, &c.event.event_id, &self.name),
                        attempt: c.attempt,
                        event: Arc::new(event),
                    });
                    outcomes.push(None);
                }
                Err(e) => outcomes.push(Some(Err(DeliveryError::permanent(e)))),
            }
        }
        let started = Instant::now();
        if !deliveries.is_empty() {
            // A backstop: sinks enforce their own timeout, which reports better.
            let limit = self.common.timeout + Duration::from_millis(500);
            let results = match tokio::time::timeout(limit, self.sink.deliver(&deliveries)).await {
                Ok(r) if r.len() == deliveries.len() => r,
                Ok(r) => {
                    tracing::error!(sink = %self.name, expected = deliveries.len(), got = r.len(), "sink returned the wrong number of outcomes");
                    vec![Err(DeliveryError::retryable("sink returned no outcome for this delivery")); deliveries.len()]
                }
                Err(_) => {
                    vec![
                        Err(DeliveryError::retryable(format!(
                            "timed out after {:?}",
                            self.common.timeout
                        )));
                        deliveries.len()
                    ]
                }
            };
            let mut results = results.into_iter();
            for slot in outcomes.iter_mut().filter(|o| o.is_none()) {
                *slot = results.next();
            }
        }
        let finished_at = now_ms();
        let elapsed = started.elapsed();
        for (c, outcome) in batch.into_iter().zip(outcomes) {
            let outcome = outcome.unwrap_or_else(|| Err(DeliveryError::retryable("no outcome")));
            let result = self.judge(&c, outcome, finished_at);
            let label = match result {
                Completed::Delivered => AttemptOutcome::delivered,
                Completed::Retry { .. } => AttemptOutcome::retry,
                Completed::Dead { .. } => AttemptOutcome::dead,
            };
            self.metrics.attempt(&self.name, label, elapsed, 1);
            let completion = Completion {
                delivery_id: c.delivery_id,
                attempt: c.attempt,
                finished_at,
                result,
            };
            // The receiver lives until every worker has stopped.
            let _ = self.completions.send((self.name.clone(), completion)).await;
        }
    }

    /// Applies the retry policy to one outcome.
    fn judge(&self, c: &Claimed, outcome: Outcome, now: i64) -> Completed {
        let ids = (&c.event.source, &c.event.event_id, &self.name, c.attempt);
        match outcome {
            Ok(()) => {
                tracing::debug!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, "delivered");
                Completed::Delivered
            }
            Err(e) if e.retryable => match self.common.retry.next_delay(c.attempt, e.retry_after) {
                Some(delay) => {
                    tracing::info!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, error = %e.message, retry_in = ?delay, "delivery failed; will retry");
                    Completed::Retry {
                        due_at: now + delay.as_millis() as i64,
                        error: e.message,
                    }
                }
                None => {
                    tracing::warn!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, error = %e.message, "delivery failed; attempts used up, dead-lettered");
                    Completed::Dead {
                        error: format!("{} (gave up after {} attempts)", e.message, c.attempt),
                    }
                }
            },
            Err(e) => {
                tracing::warn!(source = %ids.0, event_id = %ids.1, sink = %ids.2, attempt = ids.3, error = %e.message, "delivery failed permanently; dead-lettered");
                Completed::Dead { error: e.message }
            }
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
        // Keep trying: an outcome that is not recorded is redone after the
        // lease runs out, which is safe but wasteful.
        let mut backoff = Duration::from_millis(50);
        loop {
            match store.complete(done.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record delivery outcomes; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if rx.is_closed() && backoff >= Duration::from_secs(5) {
                        tracing::error!("giving up recording outcomes at shutdown; those deliveries will run again");
                        break;
                    }
                }
            }
        }
        for sink in retried {
            if let Some(n) = notifies.get(&sink) {
                n.notify_one();
            }
        }
    }
}
