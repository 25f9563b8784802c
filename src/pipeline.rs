//! From verified bytes to a durable event: the part of ingest that does not
//! know about HTTP (so the benchmark and `expeditor test` can drive it too).

use std::cell::{Cell, OnceCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use expeditor_api::{Event, EventMeta, Reads, Views};
use http::HeaderMap;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Source};
use crate::deliver::Handoff;
use crate::ingest::Limits;
use crate::metrics::{Metrics, SourceMetrics};
use crate::normalize::{Json, NormalizeError, Normalizer};
use crate::store::{Inserted, NewEvent, Store, StoreError, StoredEvent, format_time, now_ms};
use crate::throttle::LogThrottle;
use crate::verify::VerifyError;

/// A configured source, with its metrics series at hand.
pub struct Intake {
    pub source: Arc<Source>,
    pub metrics: SourceMetrics,
    /// This source's rejection log lines (see [`crate::throttle`]).
    pub rejections: Rejections,
}

/// A line a second at most per source and kind of rejection; a refused
/// event with an id, a line per id.
#[derive(Debug)]
pub struct Rejections {
    pub verification: LogThrottle,
    pub unavailable: LogThrottle,
    /// Refused events without an id to name.
    pub invalid: LogThrottle,
    pub invalid_ids: NamedOnce,
}

impl Default for Rejections {
    fn default() -> Self {
        const EVERY: Duration = Duration::from_secs(1);
        Self {
            verification: LogThrottle::new(EVERY),
            unavailable: LogThrottle::new(EVERY),
            invalid: LogThrottle::new(EVERY),
            invalid_ids: NamedOnce::default(),
        }
    }
}

/// The event ids a line was written for lately. Every refused event is
/// named once (its id is what to resend from the vendor's dashboard), but
/// one signed body sent again and again (Crave signs no time, so a captured
/// one stays valid) is one line, not one a request.
#[derive(Debug, Default)]
pub struct NamedOnce {
    seen: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl NamedOnce {
    /// How long an id stays seen: longer than the vendors' retries are apart
    /// at first, so a retry storm is a line each ten minutes.
    const FOR: Duration = Duration::from_secs(600);
    /// Ids remembered at most; past that, the old ones are forgotten first.
    const MOST: usize = 4096;

    /// Whether `id` was not named lately (and is now).
    pub fn first(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if seen.get(id).is_some_and(|at| now.duration_since(*at) < Self::FOR) {
            return false;
        }
        if seen.len() >= Self::MOST {
            seen.retain(|_, at| now.duration_since(*at) < Self::FOR);
            if seen.len() >= Self::MOST {
                seen.clear();
            }
        }
        seen.insert(id.to_owned(), now);
        true
    }
}

pub enum Accepted {
    New(String),
    Duplicate(String),
}

pub enum Rejected {
    Verification(VerifyError),
    /// Verified, but not an event that can be stored; with the body, from
    /// which its log line reads the event id (only if one is written).
    Invalid {
        error: NormalizeError,
        body: Bytes,
    },
    Store(StoreError),
}

pub struct Pipeline {
    config: Arc<Config>,
    sources: HashMap<String, Intake>,
    store: Arc<dyn Store>,
    handoff: Arc<Handoff>,
    /// Where a hand-off that must outlive its request runs (see `Shared::detached`).
    detached: TaskTracker,
}

impl Pipeline {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        handoff: Arc<Handoff>,
        metrics: Arc<Metrics>,
        detached: TaskTracker,
    ) -> Self {
        let sources = config
            .sources
            .iter()
            .map(|(name, source)| {
                let intake = Intake {
                    source: source.clone(),
                    metrics: SourceMetrics::new(metrics.clone(), name),
                    rejections: Rejections::default(),
                };
                (name.clone(), intake)
            })
            .collect();
        Self {
            config,
            sources,
            store,
            handoff,
            detached,
        }
    }

    pub fn source(&self, name: &str) -> Option<&Intake> {
        self.sources.get(name)
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
    pub async fn accept(&self, intake: &Intake, headers: &HeaderMap, body: Bytes) -> Result<Accepted, Rejected> {
        let source = &*intake.source;
        let received_at = now_ms();
        let verified = source
            .verifier()
            .verify(headers, &body, received_at / 1000)
            .map_err(Rejected::Verification)?;
        let n = source
            .normalizer
            .normalize(verified.body())
            .map_err(|error| Rejected::Invalid {
                error,
                body: body.clone(),
            })?;
        let occurred_at = n.occurred_at.map(|t| t.as_millisecond());
        // What sinks see (the event with its payload as a `Value`), built at
        // most once and only if needed: a route with a `when` reads it, and
        // held deliveries carry it to their sinks, so nothing parses the body
        // again. Most events need neither. The payload is converted only if
        // a reader reads it (the `when`s, or a held sink's templates).
        let (id, event_type) = (n.id, n.event_type);
        let (decision, hand_off) = {
            let (document, views) = (Cell::new(Some(n.document)), Cell::new(Some(n.views)));
            let prepared = OnceCell::new();
            let prepare = |with_payload: bool| {
                prepared.get_or_init(|| {
                    let payload = match with_payload {
                        true => document.take().map(Json::into_value).unwrap_or_default(),
                        false => serde_json::Value::Null,
                    };
                    Arc::new(event(
                        &source.name,
                        source.kind(),
                        &id,
                        &event_type,
                        occurred_at,
                        received_at,
                        payload,
                        views.take().unwrap_or_default(),
                    ))
                })
            };
            let router = &self.config.router;
            let decision = router.route(&source.name, &event_type, || {
                router.context(prepare(router.reads().payload()))
            });
            let reservation = self.handoff.reserve(&decision.sinks, received_at);
            let held_read_payload = reservation.reads.payload();
            if !reservation.held.is_empty() {
                prepare(held_read_payload);
            }
            // Held deliveries go out with the event; without one, none are held.
            let hand_off = prepared
                .into_inner()
                .filter(|_| !reservation.held.is_empty())
                .map(|mut prepared| {
                    // Built for `when`s that did not read the payload; a held sink does.
                    if held_read_payload && let Some(document) = document.take() {
                        // The `when`s' context, which shared it, is gone.
                        Arc::make_mut(&mut prepared).payload = document.into_value();
                    }
                    (reservation, prepared)
                });
            (decision, hand_off)
        };
        let when_errors = decision.when_errors;
        let sinks = decision.sinks;
        let dead = decision.undecided;
        let new = NewEvent {
            source: source.name.clone(),
            event_id: id,
            kind: source.kind().to_string(),
            event_type,
            occurred_at,
            received_at,
            body,
            sinks,
            dead,
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
            let task = self.detached.spawn(async move {
                let sinks = new.sinks.clone();
                let inserted = store.insert(new).await?;
                if let Inserted::New(ids) = &inserted {
                    let give_back = handoff.start(reservation, ids, &sinks, &stored, prepared);
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
                // Said once, for the event stored: a vendor's retry of it is
                // a duplicate, and its routing counts for nothing.
                for (route, error) in &when_errors {
                    tracing::warn!(source = %source.name, event_id = %id, route = %route, %error, "route condition failed to evaluate; its sinks (other routes aside) get a dead letter, to replay once it is fixed");
                }
                // Routed when a route took it, or could not say (dead letters).
                intake.metrics.stored(!sinks.is_empty() || !when_errors.is_empty());
                if sinks.is_empty() {
                    // Debug, not info: a source whose routes take a few types sends
                    // many that none takes; the counter above shows them.
                    tracing::debug!(source = %source.name, event_id = %id, %event_type, "event stored; no route takes it");
                } else {
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

/// The event as routes and sinks see it, times formatted as the store's.
/// Also what `expeditor test` routes, so its `when`s see the same event.
#[allow(clippy::too_many_arguments)]
pub fn event(
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

/// Rebuilds what sinks see from a stored event, as much of it as `reads`
/// says the sink reads. Normalization is a pure function of the kind and the
/// raw body, so the views are recomputed rather than stored; a sink that
/// reads only the event's metadata gets no payload (`null`) and no views,
/// and its deliveries parse nothing; one that reads the views and not the
/// payload gets a `null` payload (the body is parsed, not converted).
pub fn rebuild(stored: &StoredEvent, reads: Reads) -> Result<Event, String> {
    let normalizer = match stored.kind.as_str() {
        "crumbpos" => Some(Normalizer::CrumbPos),
        "crave" => Some(Normalizer::Crave),
        _ => None,
    };
    let (payload, views) = match (reads, normalizer) {
        (Reads::Meta, _) | (Reads::MetaAndViews, None) => (serde_json::Value::Null, Views::default()),
        (Reads::All | Reads::MetaAndViews, Some(n)) => {
            let n = n
                .normalize(&stored.body)
                .map_err(|e| format!("stored event cannot be normalized: {e}"))?;
            let payload = match reads.payload() {
                true => n.document.into_value(),
                false => serde_json::Value::Null,
            };
            (payload, n.views)
        }
        (Reads::MetaAndPayload, _) | (Reads::All, None) => (
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_event_is_named_once_per_id() {
        let named = NamedOnce::default();
        assert!(named.first("evt_1"));
        assert!(!named.first("evt_1"), "sent again: no second line");
        assert!(named.first("evt_2"));
        // Many ids: the oldest are forgotten, never a line lost for a new one.
        for i in 0..(NamedOnce::MOST + 10) {
            assert!(named.first(&format!("evt_many_{i}")));
        }
    }

    const CRUMB_ORDER: &str = include_str!("../tests/fixtures/crumbpos-order-created.json");

    fn stored(kind: &str) -> StoredEvent {
        StoredEvent {
            source: "crumb".into(),
            event_id: "evt_1".into(),
            kind: kind.into(),
            event_type: "order.created".into(),
            occurred_at: Some(1_700_000_000_000),
            received_at: 1_700_000_001_000,
            body: CRUMB_ORDER.as_bytes().to_vec(),
        }
    }

    /// A sink gets as much of the stored event as it reads; what it gets is
    /// the same as the whole rebuild's.
    #[test]
    fn rebuild_gives_what_the_sink_reads() {
        let all = rebuild(&stored("crumbpos"), Reads::All).unwrap();
        let body: serde_json::Value = serde_json::from_str(CRUMB_ORDER).unwrap();
        assert_eq!(all.payload, body);
        assert!(all.views.order.is_some(), "an order's view");

        let payload = rebuild(&stored("crumbpos"), Reads::MetaAndPayload).unwrap();
        assert_eq!(payload.event, all.event);
        assert_eq!(payload.payload, all.payload);
        assert_eq!(payload.views, Views::default(), "views are not computed");

        let views = rebuild(&stored("crumbpos"), Reads::MetaAndViews).unwrap();
        assert_eq!(views.event, all.event);
        assert_eq!(views.views, all.views, "the same views");
        assert_eq!(views.payload, serde_json::Value::Null, "the payload is not converted");

        let meta = rebuild(&stored("crumbpos"), Reads::Meta).unwrap();
        assert_eq!(meta.event, all.event);
        assert_eq!(meta.event.id, "evt_1");
        assert_eq!(meta.event.event_type, "order.created");
        assert_eq!(meta.payload, serde_json::Value::Null, "the body is not parsed");
        assert_eq!(meta.views, Views::default());

        // A generic HMAC source has no normalizer: the payload, never views.
        let hmac = rebuild(&stored("hmac"), Reads::All).unwrap();
        assert_eq!(hmac.payload, body);
        assert_eq!(hmac.views, Views::default());
        let hmac = rebuild(&stored("hmac"), Reads::MetaAndViews).unwrap();
        assert_eq!(hmac.payload, serde_json::Value::Null);
        assert_eq!(hmac.views, Views::default());
    }

    #[test]
    fn rebuild_of_a_body_that_is_not_json_fails_only_for_a_reader_of_it() {
        let mut broken = stored("crumbpos");
        broken.body = b"{not json".to_vec();
        assert!(rebuild(&broken, Reads::All).is_err());
        assert!(
            rebuild(&broken, Reads::MetaAndViews).is_err(),
            "views need the body normalized"
        );
        assert!(rebuild(&broken, Reads::MetaAndPayload).is_err());
        assert!(rebuild(&broken, Reads::Meta).is_ok());
    }
}
