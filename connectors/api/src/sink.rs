//! The contract between the delivery engine and a sink.
//!
//! The engine claims due deliveries, hands a sink a batch of at most
//! [`Sink::max_batch`] of them and records one [`Outcome`] per delivery. A sink
//! never sleeps or retries by itself: it only says whether a failure is worth
//! another attempt, and the engine's [`crate::RetryPolicy`] decides when.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{Event, Reads};

/// One attempt to hand one event to one sink.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Stable for (source, event id, sink) across every attempt and replay:
    /// the sink's own dedupe handle (`Idempotency-Key`, `insertId`, `Message-ID`).
    pub key: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub event: Arc<Event>,
}

/// What became of one delivery.
pub type Outcome = Result<(), DeliveryError>;

/// Why a delivery failed, and whether trying again could help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    /// Short, human and free of secrets: it is stored and shown by the CLI.
    pub message: String,
    pub retryable: bool,
    /// What the sink asked for (`Retry-After`, Slack's rate limit), if anything.
    pub retry_after: Option<Duration>,
    /// The service behind the sink asked for that wait, not just for this
    /// event (an HTTP 429 or 503 with `Retry-After`, Slack's rate limit):
    /// the engine then starts no attempt to the sink until it is up, so the
    /// other deliveries do not spend their attempts on the same answer.
    pub holds_sink: bool,
}

impl DeliveryError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            retry_after: None,
            holds_sink: false,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            retry_after: None,
            holds_sink: false,
        }
    }

    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// `retry_after` as the whole sink's wait (see [`DeliveryError::holds_sink`]).
    pub fn holding_sink(mut self, after: Option<Duration>) -> Self {
        self.holds_sink = after.is_some();
        self.with_retry_after(after)
    }

    /// No answer within the sink's timeout: worth another attempt.
    pub fn timed_out(timeout: Duration) -> Self {
        Self::retryable(format!("timed out after {timeout:?}"))
    }
}

/// [`Sink::deliver`] for sinks that take one delivery per call
/// (`max_batch` 1): sends each in turn, one outcome per delivery.
pub async fn one_by_one<'a, F, Fut>(batch: &'a [Delivery], mut send: F) -> Vec<Outcome>
where
    F: FnMut(&'a Delivery) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let mut outcomes = Vec::with_capacity(batch.len());
    for delivery in batch {
        outcomes.push(send(delivery).await);
    }
    outcomes
}

/// A destination for events.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The most deliveries one [`Sink::deliver`] call takes (BigQuery: 500).
    fn max_batch(&self) -> usize {
        1
    }

    /// How long the engine may hold a batch smaller than [`Sink::max_batch`]
    /// while it waits for more due deliveries to fill it (BigQuery's
    /// `batch.linger`). Zero (the default): send what is due at once.
    fn linger(&self) -> Duration {
        Duration::ZERO
    }

    /// What of each delivery's event this sink reads. An event rebuilt from
    /// the store for a sink that reads less than [`Reads::All`] carries only
    /// that much (a `null` payload, or no views), which saves parsing or
    /// converting the body for every delivery. The default is all.
    fn reads(&self) -> Reads {
        Reads::All
    }

    /// Delivers a batch and returns exactly one outcome per delivery, in order.
    async fn deliver(&self, batch: &[Delivery]) -> Vec<Outcome>;

    /// Called once when the sink is retired (shutdown or reload), after its
    /// last `deliver` has returned.
    async fn close(&self) {}
}

/// The delivery key for (source, event id, sink): 32 hex characters, valid as
/// an HTTP header value, a BigQuery `insertId` and a `Message-ID` local part
/// whatever bytes the vendor put in its event id.
pub fn delivery_key(source: &str, event_id: &str, sink: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [source, event_id, sink] {
        // Length-prefix each part so ("a:b","c") and ("a","b:c") differ.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_key_is_stable_and_distinct() {
        let a = delivery_key("crumb", "evt_1", "kds");
        assert_eq!(a, delivery_key("crumb", "evt_1", "kds"));
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, delivery_key("crumb", "evt_1", "loyalty"));
        assert_ne!(a, delivery_key("crave", "evt_1", "kds"));
        assert_ne!(delivery_key("a:b", "c", "s"), delivery_key("a", "b:c", "s"));
    }
}
