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
/// again, and whatever state made it trap goes with it.
pub struct WasmSink {
    plugin: Arc<Plugin>,
    idle: Mutex<Vec<Instance>>,
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
        tracing::info!(
            sink = %plugin.name(),
            plugin = %plugin.config().plugin.display(),
            sha256 = %plugin.hash,
            "wasm sink ready",
        );
        Self {
            plugin,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take_idle(&self) -> Option<Instance> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put_idle(&self, instance: Instance) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(instance);
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

fn to_outcome(r: Result<(), bindings::DeliveryError>) -> Outcome {
    match r {
        Ok(()) => Ok(()),
        Err(bindings::DeliveryError::Retryable(hint)) => {
            Err(DeliveryError::retryable(crate::plugin::own_words(&hint.message))
                .with_retry_after(hint.retry_after_ms.map(Duration::from_millis)))
        }
        Err(bindings::DeliveryError::Permanent(msg)) => Err(DeliveryError::permanent(crate::plugin::own_words(&msg))),
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
        Ok(results) if results.len() == n => (results.into_iter().map(to_outcome).collect(), Some(instance)),
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
        let instances = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        if instances.is_empty() {
            return;
        }
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
        tracing::debug!(sink = %self.plugin.name(), "wasm sink closed");
    }
}
