//! The sink: instances reused across deliveries, calls run off the async
//! runtime, and a fresh instance after any trap.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use expeditor_api::{Delivery, DeliveryError, Outcome, Sink};

use crate::bindings::{self, Event};
use crate::plugin::{CallFailed, Instance, Plugin};

/// A `type = "wasm"` sink.
///
/// Each concurrent delivery (up to the sink's `concurrency`) takes an idle
/// instance, or makes one (`init` included, tens of microseconds with the
/// pooling allocator), and puts it back when the call returned normally. An
/// instance that trapped is dropped with its memory: it cannot be entered
/// again, and whatever state made it trap goes with it. An instance left
/// idle for a minute is let go (its `shutdown` called), so the
/// memory a rush took is given back when it is over.
pub struct WasmSink {
    plugin: Arc<Plugin>,
    idle: Arc<Mutex<IdlePool>>,
    retire_after: Duration,
    /// Held (shared) by a sweep while it retires instances, so `close`
    /// (exclusive) waits for their `shutdown` too.
    retiring: Arc<tokio::sync::RwLock<()>>,
}

/// How long an instance may sit unused before it is let go.
pub(crate) const IDLE_RETIRE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct IdlePool {
    /// Most recently used last: deliveries take from the end, so a quiet
    /// sink keeps reusing one warm instance and the others grow old.
    instances: Vec<(Instance, Instant)>,
    /// A task is on its way to retire the old ones.
    sweeping: bool,
}

impl std::fmt::Debug for WasmSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmSink")
            .field("plugin", &self.plugin)
            .finish_non_exhaustive()
    }
}

impl WasmSink {
    /// A sink on a loaded plugin ([`Plugin::load`]).
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self::retiring_after(plugin, IDLE_RETIRE)
    }

    /// [`WasmSink::new`] with another idle time than a minute: for
    /// tests, which cannot wait a minute.
    #[doc(hidden)]
    pub fn retiring_after(plugin: Arc<Plugin>, retire_after: Duration) -> Self {
        tracing::info!(
            sink = %plugin.name(),
            plugin = %plugin.config().plugin.display(),
            sha256 = %plugin.hash,
            "wasm sink ready",
        );
        Self {
            plugin,
            idle: Arc::default(),
            retire_after,
            retiring: Arc::default(),
        }
    }

    /// Instances waiting for a delivery.
    #[doc(hidden)]
    pub fn idle_instances(&self) -> usize {
        lock(&self.idle).instances.len()
    }

    fn take_idle(&self) -> Option<Instance> {
        lock(&self.idle).instances.pop().map(|(instance, _)| instance)
    }

    /// Puts an instance back, and makes sure a sweep will come by for it.
    fn put_idle(&self, instance: Instance) {
        let mut pool = lock(&self.idle);
        pool.instances.push((instance, Instant::now()));
        if !pool.sweeping
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            pool.sweeping = true;
            runtime.spawn(sweep(
                Arc::downgrade(&self.idle),
                self.plugin.clone(),
                self.retire_after,
                self.retiring.clone(),
            ));
        }
    }
}

fn lock(idle: &Mutex<IdlePool>) -> std::sync::MutexGuard<'_, IdlePool> {
    idle.lock().unwrap_or_else(|e| e.into_inner())
}

/// Retires the instances idle for `retire_after`, for as long as there are
/// idle ones to watch; ends with the sink (`close` takes them all first).
async fn sweep(
    idle: std::sync::Weak<Mutex<IdlePool>>,
    plugin: Arc<Plugin>,
    retire_after: Duration,
    retiring: Arc<tokio::sync::RwLock<()>>,
) {
    let mut wait = retire_after;
    loop {
        tokio::time::sleep(wait).await;
        // Before taking any out: `close` then either finds them in the
        // pool or waits for their `shutdown` here.
        let retiring = retiring.clone().read_owned().await;
        let Some(idle) = idle.upgrade() else { return };
        let (old, done): (Vec<Instance>, bool) = {
            let mut pool = lock(&idle);
            let now = Instant::now();
            let fresh_from = pool
                .instances
                .iter()
                .position(|(_, since)| now.duration_since(*since) < retire_after)
                .unwrap_or(pool.instances.len());
            let old = pool.instances.drain(..fresh_from).map(|(i, _)| i).collect();
            match pool.instances.first() {
                // The oldest left is the next to grow old; a second at least,
                // so a steady trickle does not wake this for each one.
                Some((_, since)) => {
                    wait = retire_after
                        .saturating_sub(now.duration_since(*since))
                        .max(retire_after.min(Duration::from_secs(1)));
                }
                None => pool.sweeping = false,
            }
            (old, pool.instances.is_empty())
        };
        drop(idle);
        if !old.is_empty() {
            tracing::debug!(sink = %plugin.name(), instances = old.len(), "idle plugin instances let go");
            // All at once, as `close` does, so one that waits for it keeps
            // its bound.
            let deadline = plugin.deadline();
            let mut retired = tokio::task::JoinSet::new();
            for instance in old {
                let plugin = plugin.clone();
                retired.spawn_blocking(move || plugin.shutdown(instance, deadline));
            }
            while let Some(done) = retired.join_next().await {
                if let Err(e) = done {
                    tracing::error!(sink = %plugin.name(), error = %e, "plugin shutdown failed in the host");
                }
            }
        }
        drop(retiring);
        if done {
            return;
        }
    }
}

/// The event as the plugin sees it (`event` in `plugins/wit`).
fn to_wit(d: &Delivery) -> Event {
    let e = &d.event;
    Event {
        id: e.event.id.clone(),
        source: e.event.source.clone(),
        kind: e.event.kind.clone(),
        event_type: e.event.event_type.clone(),
        occurred_at: e.event.occurred_at.clone(),
        received_at: e.event.received_at.clone(),
        attempt: d.attempt,
        delivery_key: d.key.clone(),
        payload: json(&e.payload),
        order: e.views.order.as_ref().map(json),
        payment: e.views.payment.as_ref().map(json),
        stock: e.views.stock.as_ref().map(json),
    }
}

/// JSON text of one of our own values (they always serialize).
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

fn to_outcome(r: Result<(), bindings::DeliveryError>, secrets: &[String]) -> Outcome {
    match r {
        Ok(()) => Ok(()),
        Err(bindings::DeliveryError::Retryable(hint)) => Err(DeliveryError::retryable(crate::plugin::own_words(
            &hint.message,
            secrets,
        ))
        .with_retry_after(hint.retry_after_ms.map(Duration::from_millis))),
        Err(bindings::DeliveryError::Permanent(msg)) => {
            Err(DeliveryError::permanent(crate::plugin::own_words(&msg, secrets)))
        }
    }
}

/// Runs one batch on `instance` (or a new one, `init` included) by
/// `deadline`: the outcomes, and the instance when it may be used again.
fn run(
    plugin: &Plugin,
    instance: Option<Instance>,
    events: Vec<Event>,
    deadline: Instant,
) -> (Vec<Outcome>, Option<Instance>) {
    let n = events.len();
    let all = |e: DeliveryError| vec![Err(e); n];
    let mut instance = match instance {
        Some(i) => i,
        None => match plugin.instantiate(deadline) {
            Ok(i) => i,
            Err(e) => {
                let msg = e.message();
                tracing::warn!(sink = %plugin.name(), error = %msg, "cannot start a plugin instance");
                return (all(DeliveryError::retryable(msg)), None);
            }
        },
    };
    match plugin.deliver(&mut instance, &events, deadline) {
        Ok(results) if results.len() == n => (
            results
                .into_iter()
                .map(|r| to_outcome(r, &plugin.config().secrets))
                .collect(),
            Some(instance),
        ),
        Ok(results) => {
            let msg = format!("plugin answered {} results for {n} events", results.len());
            tracing::error!(sink = %plugin.name(), "{msg}");
            (all(DeliveryError::retryable(msg)), Some(instance))
        }
        Err(CallFailed(msg)) => {
            tracing::warn!(sink = %plugin.name(), error = %msg, "plugin instance dropped; the next delivery gets a fresh one");
            (all(DeliveryError::retryable(msg)), None)
        }
    }
}

#[async_trait::async_trait]
impl Sink for WasmSink {
    fn max_batch(&self) -> usize {
        self.plugin.config().max_batch
    }

    async fn deliver(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let events: Vec<Event> = batch.iter().map(to_wit).collect();
        let instance = self.take_idle();
        let plugin = self.plugin.clone();
        // From here, so a wait for a blocking thread counts against it too.
        let deadline = plugin.deadline();
        // A call blocks its thread while the plugin computes (up to its CPU
        // limit), which must not stall the runtime's workers.
        match tokio::task::spawn_blocking(move || run(&plugin, instance, events, deadline)).await {
            Ok((outcomes, instance)) => {
                if let Some(instance) = instance {
                    self.put_idle(instance);
                }
                outcomes
            }
            Err(e) => {
                tracing::error!(sink = %self.plugin.name(), error = %e, "plugin call panicked in the host");
                vec![Err(DeliveryError::retryable("plugin call failed in the host")); batch.len()]
            }
        }
    }

    /// The shutdown contract: every instance's `shutdown` is called (under
    /// the usual limits), then the instances are dropped. All at once, each
    /// on a blocking thread of its own with the whole sink timeout: however
    /// many there are, a stop keeps its bound.
    async fn close(&self) {
        let instances: Vec<Instance> = std::mem::take(&mut lock(&self.idle).instances)
            .into_iter()
            .map(|(instance, _)| instance)
            .collect();
        let deadline = self.plugin.deadline();
        let mut closing = tokio::task::JoinSet::new();
        for instance in instances {
            let plugin = self.plugin.clone();
            closing.spawn_blocking(move || plugin.shutdown(instance, deadline));
        }
        while let Some(closed) = closing.join_next().await {
            if let Err(e) = closed {
                tracing::error!(sink = %self.plugin.name(), error = %e, "plugin shutdown failed in the host");
            }
        }
        // And those a sweep is letting go meanwhile (started before this,
        // so within the same bound).
        let _all_retired = self.retiring.write().await;
        tracing::debug!(sink = %self.plugin.name(), "wasm sink closed");
    }
}
