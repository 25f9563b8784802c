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
use std::time::Duration;

use expeditor_api::{Delivery, DeliveryError, Outcome, Sink, delivery_key};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, SinkCommon, SinkKind};
use crate::pipeline::{Wake, rebuild};
use crate::store::{Claimed, Completed, Completion, Store, now_ms};

/// Longest a worker sleeps without looking at the store: other instances
/// sharing a store add work without waking us.
const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct Engine {
    notifies: Arc<HashMap<String, Arc<Notify>>>,
    tracker: TaskTracker,
    completions: Option<mpsc::Sender<(String, Completion)>>,
}

/// Builds the sink a spec describes.
pub async fn build_sink(kind: &SinkKind, client: &reqwest::Client) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(match kind {
        SinkKind::Http(cfg) => Arc::new(expeditor_http::HttpSink::new(cfg.clone(), client.clone())),
        SinkKind::File(cfg) => Arc::new(expeditor_file::FileSink::open(cfg.clone()).await?),
    })
}

impl Engine {
    /// Starts one worker per configured sink.
    pub async fn start(
        config: &Config,
        store: Arc<dyn Store>,
        client: reqwest::Client,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
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
        for (name, common, sink) in sinks {
            let worker = Worker {
                name: name.clone(),
                sink,
                common,
                store: store.clone(),
                notify: notifies[&name].clone(),
                completions: tx.clone(),
            };
            tracker.spawn(worker.run(shutdown.clone()));
        }
        Ok(Self {
            notifies,
            tracker,
            completions: Some(tx),
        })
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

    /// Waits for the workers (stopped by the shutdown token) to finish their
    /// attempts in flight and for every outcome to be recorded.
    pub async fn stopped(mut self) {
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
}

impl Worker {
    async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.common.concurrency));
        let max_batch = this.sink.max_batch().max(1);
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
        self_close(&this).await;
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
        for (c, outcome) in batch.into_iter().zip(outcomes) {
            let outcome = outcome.unwrap_or_else(|| Err(DeliveryError::retryable("no outcome")));
            let result = self.judge(&c, outcome, finished_at);
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

async fn self_close(worker: &Worker) {
    worker.sink.close().await;
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
