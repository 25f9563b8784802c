//! From verified bytes to a durable event: the part of ingest that does not
//! know about HTTP (so the benchmark and `expeditor test` can drive it too).

use std::cell::{Cell, OnceCell};
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use expeditor_api::{Event, EventMeta, Views};
use http::HeaderMap;

use crate::config::{Config, Source};
use crate::deliver::Handoff;
use crate::ingest::Limits;
use crate::metrics::{Metrics, SourceLabels};
use crate::normalize::{Json, NormalizeError, Normalizer};
use crate::store::{Inserted, NewEvent, Store, StoreError, StoredEvent, format_time, now_ms};
use crate::verify::VerifyError;

pub enum Accepted {
    New(String),
    Duplicate(String),
}

pub enum Rejected {
    Verification(VerifyError),
    Invalid(NormalizeError),
    Store(StoreError),
}

pub struct Pipeline {
    config: Arc<Config>,
    sources: HashMap<String, Arc<Source>>,
    store: Arc<dyn Store>,
    handoff: Arc<Handoff>,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, handoff: Arc<Handoff>, metrics: Arc<Metrics>) -> Self {
        let sources = config.sources.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Self {
            config,
            sources,
            store,
            handoff,
            metrics,
        }
    }

    pub fn source(&self, name: &str) -> Option<Arc<Source>> {
        self.sources.get(name).cloned()
    }

    pub fn limits(&self) -> Limits {
        let s = &self.config.server;
        Limits {
            max_body: s.max_body,
            header_timeout: s.header_timeout,
            body_timeout: s.body_timeout,
            max_connections: s.max_connections,
        }
    }

    /// Verifies, normalizes, routes and stores one webhook. `Ok` means the
    /// event is on disk (or was already).
    pub async fn accept(&self, source: &Source, headers: &HeaderMap, body: Bytes) -> Result<Accepted, Rejected> {
        let received_at = now_ms();
        let verified = source
            .verifier()
            .verify(headers, &body, received_at / 1000)
            .map_err(Rejected::Verification)?;
        let n = source
            .normalizer
            .normalize(verified.body())
            .map_err(Rejected::Invalid)?;
        let occurred_at = n.occurred_at.map(|t| t.as_millisecond());
        // What sinks see (the event with its payload as a `Value`), built at
        // most once and only if needed: a route with a `when` reads it, and
        // held deliveries carry it to their sinks, so nothing parses the body
        // again. Most events need neither.
        let (id, event_type) = (n.id, n.event_type);
        let (decision, hand_off) = {
            let (document, views) = (Cell::new(Some(n.document)), Cell::new(Some(n.views)));
            let prepared = OnceCell::new();
            let prepare = || {
                prepared.get_or_init(|| {
                    event(
                        &source.name,
                        source.kind(),
                        &id,
                        &event_type,
                        occurred_at,
                        received_at,
                        document.take().map(Json::into_value).unwrap_or_default(),
                        views.take().unwrap_or_default(),
                    )
                })
            };
            let decision = self
                .config
                .router
                .route(&source.name, &event_type, || self.config.router.context(prepare()));
            let reservation = self.handoff.reserve(&decision.sinks, received_at);
            if !reservation.held.is_empty() {
                prepare();
            }
            // Held deliveries go out with the event; without one, none are held.
            let hand_off = prepared
                .into_inner()
                .filter(|_| !reservation.held.is_empty())
                .map(|prepared| (reservation, prepared));
            (decision, hand_off)
        };
        for (route, error) in &decision.when_errors {
            tracing::warn!(source = %source.name, event_id = %id, route = %route, %error, "route condition failed to evaluate; route not taken");
        }
        let sinks = decision.sinks;
        let new = NewEvent {
            source: source.name.clone(),
            event_id: id,
            kind: source.kind().to_string(),
            event_type,
            occurred_at,
            received_at,
            body,
            sinks,
            held: hand_off.as_ref().map(|(r, _)| r.held.clone()).unwrap_or_default(),
        };
        let (id, event_type, sinks) = (new.event_id.clone(), new.event_type.clone(), new.sinks.clone());
        let inserted = if let Some((reservation, prepared)) = hand_off {
            // Its own task: once stored, the held deliveries must reach their
            // queues even if the client hangs up and this request is dropped.
            let store = self.store.clone();
            let handoff = self.handoff.clone();
            let stored = StoredEvent {
                source: new.source.clone(),
                event_id: new.event_id.clone(),
                kind: new.kind.clone(),
                event_type: new.event_type.clone(),
                occurred_at,
                received_at,
                body: Vec::new(),
            };
            let task = tokio::spawn(async move {
                let sinks = new.sinks.clone();
                let inserted = store.insert(new).await?;
                if let Inserted::New(ids) = &inserted {
                    let give_back = handoff.start(reservation, ids, &sinks, &stored, Arc::new(prepared));
                    if !give_back.is_empty()
                        && let Err(e) = store.complete(give_back).await
                    {
                        // Stored and acknowledged all the same: they run when the lease ends.
                        tracing::warn!(error = %e, "cannot give back deliveries of a retired engine");
                    }
                }
                Ok(inserted)
            });
            match task.await {
                Ok(r) => r.map_err(Rejected::Store)?,
                Err(e) => {
                    return Err(Rejected::Store(StoreError::Unavailable(format!(
                        "store task failed: {e}"
                    ))));
                }
            }
        } else {
            let inserted = self.store.insert(new).await.map_err(Rejected::Store)?;
            if inserted != Inserted::Duplicate {
                self.handoff.wake(&sinks);
            }
            inserted
        };
        match inserted {
            Inserted::New(_) => {
                let labels = SourceLabels {
                    source: source.name.clone(),
                };
                if sinks.is_empty() {
                    self.metrics.events_unrouted.get_or_create(&labels).inc();
                    // Debug, not info: a source whose routes take a few types sends
                    // many that none takes; the counter above shows them.
                    tracing::debug!(source = %source.name, event_id = %id, %event_type, "event stored; no route takes it");
                } else {
                    self.metrics.events_routed.get_or_create(&labels).inc();
                    tracing::debug!(source = %source.name, event_id = %id, %event_type, sinks = ?sinks, "event stored");
                }
                Ok(Accepted::New(id))
            }
            Inserted::Duplicate => {
                tracing::debug!(source = %source.name, event_id = %id, "duplicate event dropped");
                Ok(Accepted::Duplicate(id))
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn event(
    source: &str,
    kind: &str,
    id: &str,
    event_type: &str,
    occurred_at: Option<i64>,
    received_at: i64,
    payload: serde_json::Value,
    views: Views,
) -> Event {
    Event {
        event: EventMeta {
            id: id.to_string(),
            source: source.to_string(),
            kind: kind.to_string(),
            event_type: event_type.to_string(),
            occurred_at: occurred_at.map(format_time),
            received_at: format_time(received_at),
        },
        payload,
        views,
    }
}

/// Rebuilds what sinks see from a stored event. Normalization is a pure
/// function of the kind and the raw body, so the views are recomputed rather
/// than stored.
pub fn rebuild(stored: &StoredEvent) -> Result<Event, String> {
    let normalizer = match stored.kind.as_str() {
        "crumbpos" => Some(Normalizer::CrumbPos),
        "crave" => Some(Normalizer::Crave),
        _ => None,
    };
    let (payload, views) = match normalizer {
        Some(n) => {
            let n = n
                .normalize(&stored.body)
                .map_err(|e| format!("stored event cannot be normalized: {e}"))?;
            (n.document.into_value(), n.views)
        }
        None => (
            serde_json::from_slice(&stored.body).map_err(|_| "stored event is not JSON".to_string())?,
            Views::default(),
        ),
    };
    Ok(event(
        &stored.source,
        &stored.kind,
        &stored.event_id,
        &stored.event_type,
        stored.occurred_at,
        stored.received_at,
        payload,
        views,
    ))
}
