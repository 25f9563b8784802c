//! Prometheus metrics, served at the admin listener's `/metrics`.
//!
//! Naming convention (Prometheus' own, as in Vector's instrumentation spec):
//! - every name starts with `expeditor_`;
//! - counters end in `_total` (the encoder adds it), units are suffixes
//!   (`_seconds`), never prefixes;
//! - labels have low cardinality: configured source and sink names, and
//!   fixed outcome/reason words. Never event ids, URLs, or anything a
//!   client controls (an unknown source is counted without its name).

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
    dead_letters: Family<SinkLabels, Gauge>,
    oldest_pending_age: Family<SinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    reloads: Family<ReloadLabels, Counter>,
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
            "Time from request to acknowledgement of accepted webhooks",
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
            dead_letters,
            oldest_pending_age,
            reloads,
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

    pub fn attempt(&self, sink: &str, outcome: AttemptOutcome, duration: Duration, count: u64) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                sink: sink.to_string(),
                outcome,
            })
            .inc_by(count);
        self.attempt_duration
            .get_or_create(&SinkLabels { sink: sink.to_string() })
            .observe(duration.as_secs_f64());
    }

    /// Renders the text exposition, with the queue gauges taken from `queues`
    /// (read from the store at scrape time, so they are right across
    /// restarts and instances). `sinks` are the configured sinks: they get a
    /// zero when their queue is empty.
    pub fn render(&self, queues: &[SinkQueue], sinks: &[String], now_ms: i64) -> String {
        self.pending.clear();
        self.dead_letters.clear();
        self.oldest_pending_age.clear();
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
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        m.request("crumb", RequestOutcome::accepted);
        m.verification_failures
            .get_or_create(&VerifyLabels {
                source: "crumb".into(),
                reason: "mismatch",
            })
            .inc();
        m.ack_duration
            .get_or_create(&SourceLabels { source: "crumb".into() })
            .observe(0.002);
        m.attempt("kds", AttemptOutcome::delivered, Duration::from_millis(12), 1);
        let queues = [SinkQueue {
            sink: "kds".into(),
            pending: 3,
            dead: 1,
            oldest_pending_received_at: Some(1_000),
        }];
        let text = m.render(&queues, &["kds".into(), "slack".into()], 11_000);
        for line in [
            "expeditor_webhook_requests_total{source=\"crumb\",outcome=\"accepted\"} 1",
            "expeditor_verification_failures_total{source=\"crumb\",reason=\"mismatch\"} 1",
            "expeditor_ack_duration_seconds_count{source=\"crumb\"} 1",
            "expeditor_delivery_attempts_total{sink=\"kds\",outcome=\"delivered\"} 1",
            "expeditor_deliveries_pending{sink=\"kds\"} 3",
            "expeditor_deliveries_pending{sink=\"slack\"} 0",
            "expeditor_dead_letters{sink=\"kds\"} 1",
            "expeditor_oldest_pending_delivery_age_seconds{sink=\"kds\"} 10.0",
            "expeditor_store_sync_duration_seconds_count 1",
            "expeditor_store_synced_operations_total 12",
            "expeditor_store_checkpoint_duration_seconds_count{mode=\"restart\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for l in text
            .lines()
            .filter(|l| l.starts_with("# TYPE") && l.ends_with("counter"))
        {
            assert!(!l.contains("_total_total"), "{l}");
        }
    }
}
