//! Prometheus metrics, served at the admin listener's `/metrics`.
//!
//! Naming convention (Prometheus' own, as in Vector's instrumentation spec):
//! - every name starts with `expeditor_`;
//! - counters end in `_total` (the encoder adds it), units are suffixes
//!   (`_seconds`), never prefixes;
//! - labels have low cardinality: configured source and sink names, and
//!   fixed outcome/reason words. Never event ids, URLs, or anything a
//!   client controls (an unknown source is counted without its name).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::store::{Durability, SinkQueue};

/// What became of a webhook request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RequestOutcome {
    accepted,
    duplicate,
    unauthorized,
    invalid,
    too_large,
    timeout,
    unsupported_media_type,
    unavailable,
    unknown_source,
    not_found,
    method_not_allowed,
}

/// What became of a delivery attempt.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AttemptOutcome {
    delivered,
    retry,
    dead,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source: String,
    pub outcome: RequestOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    pub source: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub sink: String,
    pub outcome: AttemptOutcome,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the daemon keeps. One instance, shared through `Arc`.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub verification_failures: Family<VerifyLabels, Counter>,
    pub ack_duration: HistogramFamily<SourceLabels>,
    pub events_routed: Family<SourceLabels, Counter>,
    pub events_unrouted: Family<SourceLabels, Counter>,
    pub deliveries: Family<DeliveryLabels, Counter>,
    pub attempt_duration: HistogramFamily<SinkLabels>,
    pending: Family<SinkLabels, Gauge>,
    concurrency_limit: Family<SinkLabels, Gauge>,
    dead_letters: Family<SinkLabels, Gauge>,
    oldest_pending_age: Family<SinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    reloads: Family<ReloadLabels, Counter>,
    /// One scrape at a time: each clears the queue gauges and fills them
    /// again, and an overlapping one would write out the cleared families.
    scrape: std::sync::Mutex<()>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub outcome: &'static str,
}

fn ack_buckets() -> Histogram {
    // 0.1 ms .. ~3.3 s: acks are meant to take milliseconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 16,
    ))
}

fn attempt_buckets() -> Histogram {
    // 1 ms .. ~65 s: sinks are remote and have timeouts of seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("expeditor");
        let requests = Family::default();
        registry.register(
            "webhook_requests",
            "Webhook requests by source and outcome",
            requests.clone(),
        );
        let verification_failures = Family::default();
        registry.register(
            "verification_failures",
            "Webhook signature verification failures by source and reason",
            verification_failures.clone(),
        );
        let ack_duration: HistogramFamily<SourceLabels> = Family::new_with_constructor(ack_buckets);
        registry.register_with_unit(
            "ack_duration",
            "Time from request to acknowledgement (200: accepted or duplicate)",
            Unit::Seconds,
            ack_duration.clone(),
        );
        let events_routed = Family::default();
        registry.register(
            "events_routed",
            "New events that at least one route took",
            events_routed.clone(),
        );
        let events_unrouted = Family::default();
        registry.register(
            "events_unrouted",
            "New events that no route took (stored, delivered nowhere)",
            events_unrouted.clone(),
        );
        let deliveries = Family::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts by sink and outcome",
            deliveries.clone(),
        );
        let attempt_duration: HistogramFamily<SinkLabels> = Family::new_with_constructor(attempt_buckets);
        registry.register_with_unit(
            "delivery_attempt_duration",
            "Duration of delivery attempts",
            Unit::Seconds,
            attempt_duration.clone(),
        );
        let pending = Family::default();
        registry.register(
            "deliveries_pending",
            "Deliveries waiting to be made, by sink",
            pending.clone(),
        );
        let concurrency_limit = Family::default();
        registry.register(
            "sink_concurrency_limit",
            "Attempts a sink may have in flight at once (an adaptive limit moves with the sink's answers)",
            concurrency_limit.clone(),
        );
        let dead_letters = Family::default();
        registry.register(
            "dead_letters",
            "Dead-lettered deliveries, by sink",
            dead_letters.clone(),
        );
        let oldest_pending_age = Family::default();
        registry.register_with_unit(
            "oldest_pending_delivery_age",
            "Age of the event behind the oldest pending delivery, by sink",
            Unit::Seconds,
            oldest_pending_age.clone(),
        );
        let reloads = Family::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome (applied, refused)",
            reloads.clone(),
        );
        Self {
            registry,
            requests,
            verification_failures,
            ack_duration,
            events_routed,
            events_unrouted,
            deliveries,
            attempt_duration,
            pending,
            concurrency_limit,
            dead_letters,
            oldest_pending_age,
            reloads,
            scrape: std::sync::Mutex::new(()),
        }
    }

    /// Adds the store's fsyncs (a store that makes its writes durable
    /// itself; see [`crate::store::Store::durability`]).
    pub fn register_durability(&mut self, d: Durability) {
        self.registry.register_with_unit(
            "store_sync_duration",
            "Time each fsync of the store's write-ahead log took (every ack waits for one)",
            Unit::Seconds,
            d.syncs,
        );
        self.registry.register(
            "store_synced_operations",
            "Store writes made durable by those fsyncs (divided by their count: writes per group commit)",
            d.operations,
        );
        self.registry.register_with_unit(
            "store_checkpoint_duration",
            "Time each checkpoint of the store's write-ahead log into its database file took, by mode (passive: in the background; restart: writes wait while it finishes)",
            Unit::Seconds,
            d.checkpoints,
        );
    }

    /// Counts a request that names no configured source (its name is the
    /// client's, not a label); a source's own go through [`SourceMetrics`].
    pub fn request(&self, source: &str, outcome: RequestOutcome) {
        self.requests
            .get_or_create(&RequestLabels {
                source: source.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ReloadLabels { outcome }).inc();
    }

    /// Renders the text exposition, with the queue gauges taken from `queues`
    /// (read from the store at scrape time, so they are right across
    /// restarts and instances). `sinks` are the configured sinks: they get a
    /// zero when their queue is empty.
    /// `limits`: each sink's concurrency limit now, from the engine that is
    /// current (a sink a reload removed has none).
    /// The scrape's text. `queues` is `None` when the store could not be
    /// read: the queue gauges are then left out (not reported as zero), and
    /// everything counted in memory is still there, as an outage is when
    /// it is most wanted.
    pub fn render(
        &self,
        queues: Option<&[SinkQueue]>,
        sinks: &[String],
        limits: &[(String, usize)],
        now_ms: i64,
    ) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.clear();
        self.concurrency_limit.clear();
        for (sink, limit) in limits {
            let l = SinkLabels { sink: sink.clone() };
            self.concurrency_limit.get_or_create(&l).set(*limit as i64);
        }
        self.dead_letters.clear();
        self.oldest_pending_age.clear();
        let Some(queues) = queues else {
            return self.encode();
        };
        for sink in sinks {
            let l = SinkLabels { sink: sink.clone() };
            self.pending.get_or_create(&l).set(0);
            self.dead_letters.get_or_create(&l).set(0);
            self.oldest_pending_age.get_or_create(&l).set(0.0);
        }
        for q in queues {
            let l = SinkLabels { sink: q.sink.clone() };
            self.pending.get_or_create(&l).set(q.pending as i64);
            self.dead_letters.get_or_create(&l).set(q.dead as i64);
            let age = q
                .oldest_pending_received_at
                .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
            self.oldest_pending_age.get_or_create(&l).set(age);
        }
        self.encode()
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts one in `family`'s series `labels`, kept in `cell` after its first
/// lookup. No cell (an outcome added past a handle's array): looked up each
/// time, counted all the same.
fn count<L: Clone + std::hash::Hash + Eq>(
    cell: Option<&OnceLock<Counter>>,
    family: &Family<L, Counter>,
    labels: impl Fn() -> L,
) {
    match cell {
        Some(cell) => cell.get_or_init(|| family.get_or_create(&labels()).clone()).inc(),
        None => family.get_or_create(&labels()).inc(),
    };
}

/// One source's ingest series, each looked up in its family once, on first
/// use (so /metrics shows the same series as before), then kept: a
/// `Family` lookup per request clones the label, hashes it and takes the
/// family's lock, three times for every accepted webhook.
pub struct SourceMetrics {
    metrics: Arc<Metrics>,
    source: String,
    requests: [OnceLock<Counter>; REQUEST_OUTCOMES],
    ack_duration: OnceLock<Histogram>,
    routed: OnceLock<Counter>,
    unrouted: OnceLock<Counter>,
}

/// How many [`RequestOutcome`]s there are (`method_not_allowed` is the last).
const REQUEST_OUTCOMES: usize = RequestOutcome::method_not_allowed as usize + 1;

impl SourceMetrics {
    pub fn new(metrics: Arc<Metrics>, source: &str) -> Self {
        Self {
            metrics,
            source: source.to_string(),
            requests: std::array::from_fn(|_| OnceLock::new()),
            ack_duration: OnceLock::new(),
            routed: OnceLock::new(),
            unrouted: OnceLock::new(),
        }
    }

    fn labels(&self) -> SourceLabels {
        SourceLabels {
            source: self.source.clone(),
        }
    }

    pub fn request(&self, outcome: RequestOutcome) {
        let labels = || RequestLabels {
            source: self.source.clone(),
            outcome,
        };
        count(self.requests.get(outcome as usize), &self.metrics.requests, labels);
    }

    pub fn ack(&self, took: Duration) {
        self.ack_duration
            .get_or_init(|| self.metrics.ack_duration.get_or_create(&self.labels()).clone())
            .observe(took.as_secs_f64());
    }

    /// A new event stored: taken by at least one route, or by none.
    pub fn stored(&self, routed: bool) {
        let (cell, family) = match routed {
            true => (&self.routed, &self.metrics.events_routed),
            false => (&self.unrouted, &self.metrics.events_unrouted),
        };
        count(Some(cell), family, || self.labels());
    }

    /// Rare (an attack or a misconfigured secret): looked up each time.
    pub fn verification_failure(&self, reason: &'static str) {
        let labels = VerifyLabels {
            source: self.source.clone(),
            reason,
        };
        self.metrics.verification_failures.get_or_create(&labels).inc();
    }
}

/// One sink's attempt series, looked up once each (see [`SourceMetrics`]).
pub struct SinkMetrics {
    metrics: Arc<Metrics>,
    sink: String,
    attempts: [OnceLock<Counter>; ATTEMPT_OUTCOMES],
    duration: OnceLock<Histogram>,
}

const ATTEMPT_OUTCOMES: usize = AttemptOutcome::dead as usize + 1;

impl SinkMetrics {
    pub fn new(metrics: Arc<Metrics>, sink: &str) -> Self {
        Self {
            metrics,
            sink: sink.to_string(),
            attempts: std::array::from_fn(|_| OnceLock::new()),
            duration: OnceLock::new(),
        }
    }

    /// One delivery's attempt and how it ended (a batch of 500 rows is 500).
    pub fn attempt(&self, outcome: AttemptOutcome) {
        let labels = || DeliveryLabels {
            sink: self.sink.clone(),
            outcome,
        };
        count(self.attempts.get(outcome as usize), &self.metrics.deliveries, labels);
    }

    /// How long one call to the sink took: once per batch, however many
    /// deliveries it carried.
    pub fn attempt_took(&self, duration: Duration) {
        self.duration
            .get_or_init(|| {
                let labels = SinkLabels {
                    sink: self.sink.clone(),
                };
                self.metrics.attempt_duration.get_or_create(&labels).clone()
            })
            .observe(duration.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scrapes that overlap each write out every queue gauge: one never
    /// sees the families another has just cleared.
    #[test]
    fn overlapping_scrapes_each_have_every_series() {
        let m = Arc::new(Metrics::new());
        let sinks = vec!["kds".to_owned()];
        let scrapers: Vec<_> = (0..4)
            .map(|_| {
                let (m, sinks) = (m.clone(), sinks.clone());
                std::thread::spawn(move || {
                    (0..2000)
                        .filter(|_| {
                            let out = m.render(Some(&[]), &sinks, &[("kds".to_owned(), 8)], 0);
                            !(out.contains("expeditor_deliveries_pending{sink=\"kds\"} 0")
                                && out.contains("expeditor_sink_concurrency_limit{sink=\"kds\"} 8"))
                        })
                        .count()
                })
            })
            .collect();
        let missing: usize = scrapers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(missing, 0, "scrapes without a queue gauge");
    }

    #[test]
    fn names_follow_the_convention() {
        let mut m = Metrics::new();
        let durability = Durability::default();
        m.register_durability(durability.clone());
        durability.syncs.observe(0.0004);
        durability.operations.inc_by(12);
        durability
            .checkpoints
            .get_or_create(&crate::store::CheckpointLabels { mode: "restart" })
            .observe(0.003);
        let m = Arc::new(m);
        let crumb = SourceMetrics::new(m.clone(), "crumb");
        crumb.request(RequestOutcome::accepted);
        crumb.request(RequestOutcome::accepted);
        crumb.request(RequestOutcome::duplicate);
        crumb.verification_failure("mismatch");
        crumb.ack(Duration::from_millis(2));
        crumb.stored(true);
        crumb.stored(false);
        crumb.stored(false);
        m.request("", RequestOutcome::unknown_source);
        let kds = SinkMetrics::new(m.clone(), "kds");
        kds.attempt(AttemptOutcome::delivered);
        kds.attempt(AttemptOutcome::retry);
        kds.attempt_took(Duration::from_millis(12));
        let queues = [SinkQueue {
            sink: "kds".into(),
            pending: 3,
            dead: 1,
            oldest_pending_received_at: Some(1_000),
        }];
        let text = m.render(
            Some(&queues),
            &["kds".into(), "slack".into()],
            &[("kds".into(), 12)],
            11_000,
        );
        for line in [
            "expeditor_webhook_requests_total{source=\"crumb\",outcome=\"accepted\"} 2",
            "expeditor_webhook_requests_total{source=\"crumb\",outcome=\"duplicate\"} 1",
            "expeditor_webhook_requests_total{source=\"\",outcome=\"unknown_source\"} 1",
            "expeditor_events_routed_total{source=\"crumb\"} 1",
            "expeditor_events_unrouted_total{source=\"crumb\"} 2",
            "expeditor_delivery_attempts_total{sink=\"kds\",outcome=\"retry\"} 1",
            "expeditor_delivery_attempt_duration_seconds_count{sink=\"kds\"} 1",
            "expeditor_verification_failures_total{source=\"crumb\",reason=\"mismatch\"} 1",
            "expeditor_ack_duration_seconds_count{source=\"crumb\"} 1",
            "expeditor_delivery_attempts_total{sink=\"kds\",outcome=\"delivered\"} 1",
            "expeditor_deliveries_pending{sink=\"kds\"} 3",
            "expeditor_deliveries_pending{sink=\"slack\"} 0",
            "expeditor_dead_letters{sink=\"kds\"} 1",
            "expeditor_oldest_pending_delivery_age_seconds{sink=\"kds\"} 10.0",
            "expeditor_sink_concurrency_limit{sink=\"kds\"} 12",
            "expeditor_store_sync_duration_seconds_count 1",
            "expeditor_store_synced_operations_total 12",
            "expeditor_store_checkpoint_duration_seconds_count{mode=\"restart\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("expeditor_sink_concurrency_limit{sink=\"slack\"}"),
            "only what the engine reports: {text}"
        );
        // A later scrape with the sink gone (a reload removed it) drops it.
        let text = m.render(Some(&queues), &["slack".into()], &[], 12_000);
        assert!(!text.contains("expeditor_sink_concurrency_limit{"), "{text}");
        for l in text
            .lines()
            .filter(|l| l.starts_with("# TYPE") && l.ends_with("counter"))
        {
            assert!(!l.contains("_total_total"), "{l}");
        }
        // The store unreadable: no queue gauge is made up, the rest is served.
        let text = m.render(None, &["kds".into(), "slack".into()], &[("kds".into(), 12)], 13_000);
        assert!(!text.contains("expeditor_deliveries_pending{"), "{text}");
        assert!(!text.contains("expeditor_dead_letters{"), "{text}");
        assert!(
            text.contains("expeditor_sink_concurrency_limit{sink=\"kds\"} 12"),
            "{text}"
        );
        assert!(text.contains("expeditor_store_synced_operations_total 12"), "{text}");
    }
}
