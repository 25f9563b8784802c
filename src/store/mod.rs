//! Durable state: events (also the dedupe keys) and their deliveries.
//!
//! The [`Store`] trait is what ingest, the delivery engine and the admin API
//! use; the embedded SQLite store implements it, and a shared PostgreSQL
//! store can, because nothing here relies on in-process locks: deliveries are
//! claimed with leases that expire, so a crashed worker's claims run again.
//!
//! Times are Unix milliseconds.
//!
//! Two backends: [`sqlite::SqliteStore`] (embedded, one instance) and
//! [`postgres::PostgresStore`] (shared by several instances); [`open`] picks
//! the one `[store]` configures.

mod dedupe;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

/// An event to store, with the sinks routing chose for it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub event_id: String,
    pub kind: String,
    pub event_type: String,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
    /// The raw body exactly as received and verified.
    pub body: Bytes,
    pub sinks: Vec<String>,
    /// Sinks (other than `sinks`) whose deliveries are written dead at once,
    /// each with its error: a route whose `when` failed could not say
    /// whether it wanted the event, and a dead letter keeps it to replay.
    pub dead: Vec<(String, String)>,
    /// Of `sinks`, those whose first attempt this process makes itself, from
    /// the event it still holds in memory: their deliveries are written
    /// already claimed (attempt 1, leased), so no claim has to find them.
    pub held: Vec<Held>,
}

/// A delivery written already claimed by the process that stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub sink: String,
    pub lease_until: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored; the ids of the [`NewEvent::held`] deliveries, in that order.
    New(Vec<i64>),
    /// (source, event id) was already stored: nothing was written.
    Duplicate,
}

/// A stored event, as the delivery engine needs it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub source: String,
    pub event_id: String,
    pub kind: String,
    pub event_type: String,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
    pub body: Vec<u8>,
}

/// A delivery claimed by this process until its lease runs out.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery_id: i64,
    pub sink: String,
    /// The attempt this claim is: 1 for the first.
    pub attempt: u32,
    /// Its last holder's lease ran out before that attempt was recorded
    /// (the holder died mid-attempt, or could not reach the store): this
    /// claim is the same attempt again.
    pub taken_over: bool,
    /// When the lease runs out; with the id, it names this claim alone (a
    /// later claim of the same delivery has a later lease).
    pub lease_until: i64,
    pub event: StoredEvent,
    /// The event as sinks see it, when the claimer still held it from
    /// ingest (then `event.body` is empty); otherwise rebuilt from the body.
    pub prepared: Option<std::sync::Arc<expeditor_api::Event>>,
}

#[derive(Debug, Clone)]
pub enum Completed {
    Delivered,
    Retry {
        due_at: i64,
        error: String,
    },
    Dead {
        error: String,
    },
    /// Claimed but never attempted (the worker stopped first): the lease is
    /// given back and the attempt not counted, as if it was never claimed.
    Released,
}

/// The most of an attempt's error a store keeps (characters).
pub const MAX_ERROR_CHARS: usize = 2000;

/// An attempt's error as stored: one line, without control characters
/// (PostgreSQL refuses a NUL in text, and a refused row would hold back the
/// whole group of outcomes recorded with it), and at most
/// [`MAX_ERROR_CHARS`]. A sink's message is mostly its own, but a plugin's
/// is whatever the plugin says.
pub fn stored_error(error: &str) -> std::borrow::Cow<'_, str> {
    expeditor_api::message::one_line(error, MAX_ERROR_CHARS)
}

/// The end of one attempt. It is recorded only while its claim is still the
/// delivery's current one: the same attempt number and the same lease. The
/// number alone is not enough, since a replay starts the count again: an
/// outcome that comes after its lease ran out, a replay and a new claim
/// would otherwise stand for the new attempt.
#[derive(Debug, Clone)]
pub struct Completion {
    pub delivery_id: i64,
    pub attempt: u32,
    /// The claim's lease ([`Claimed::lease_until`]), which names it alone.
    pub lease_until: i64,
    pub finished_at: i64,
    pub result: Completed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Delivered,
    Dead,
}

impl Status {
    fn code(self) -> i64 {
        match self {
            Status::Pending => 0,
            Status::Delivered => 1,
            Status::Dead => 2,
        }
    }

    fn from_code(code: i64) -> Self {
        match code {
            1 => Status::Delivered,
            2 => Status::Dead,
            _ => Status::Pending,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Dead => "dead",
        }
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(Status::Pending),
            "delivered" => Ok(Status::Delivered),
            "dead" => Ok(Status::Dead),
            _ => Err(format!("unknown status {s:?}; expected pending, delivered or dead")),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub source: Option<String>,
    pub event_type: Option<String>,
    /// Received at or after (Unix ms).
    pub since: Option<i64>,
    /// Only events older than this seq: the next page after one that ended
    /// with it (a page is newest first).
    pub before: Option<i64>,
    pub limit: usize,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub sink: Option<String>,
    pub status: Option<Status>,
    pub source: Option<String>,
    pub event_type: Option<String>,
    /// Last changed at or after (Unix ms).
    pub since: Option<i64>,
    /// Only rows after this (updated_at, id) in the listing's order (newest
    /// first): the next page after one that ended with it.
    pub before: Option<(i64, i64)>,
    pub limit: usize,
}

/// One attempt of a delivery, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub attempt: u32,
    #[serde(serialize_with = "time")]
    pub finished_at: i64,
    /// `delivered`, `retry` or `dead`.
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    pub delivery: DeliveryRow,
    pub attempt_log: Vec<AttemptRow>,
}

/// Everything about one event: for `expeditor events show`.
#[derive(Debug, Clone, Serialize)]
pub struct EventDetail {
    pub source: String,
    pub id: String,
    pub kind: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(serialize_with = "opt_time")]
    pub occurred_at: Option<i64>,
    #[serde(serialize_with = "time")]
    pub received_at: i64,
    /// The raw body as received; `None` once compacted by retention.
    pub payload: Option<String>,
    pub deliveries: Vec<DeliveryDetail>,
}

/// The delivery queue of one sink, for gauges and reload reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkQueue {
    pub sink: String,
    pub pending: u64,
    pub dead: u64,
    /// When the event behind the oldest pending delivery was received.
    pub oldest_pending_received_at: Option<i64>,
}

impl SinkQueue {
    /// Folds one row of a count by (sink, state), ordered by sink, into
    /// `queues`: pending (state 0) with its oldest event's time, or dead.
    pub(crate) fn add_count(queues: &mut Vec<SinkQueue>, sink: String, pending: bool, count: i64, oldest: Option<i64>) {
        if queues.last().is_none_or(|q| q.sink != sink) {
            queues.push(SinkQueue {
                sink,
                ..Default::default()
            });
        }
        let q = queues.last_mut().expect("pushed above");
        let count = count.max(0) as u64;
        if pending {
            q.pending = count;
            q.oldest_pending_received_at = oldest;
        } else {
            q.dead = count;
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliverySummary {
    pub sink: String,
    pub status: Status,
    pub attempts: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    /// The store's order of receipt: where the next page starts.
    #[serde(skip)]
    pub seq: i64,
    pub source: String,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(serialize_with = "opt_time")]
    pub occurred_at: Option<i64>,
    #[serde(serialize_with = "time")]
    pub received_at: i64,
    pub deliveries: Vec<DeliverySummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub key: String,
    pub source: String,
    pub event_id: String,
    pub event_type: String,
    pub sink: String,
    pub status: Status,
    pub attempts: u32,
    /// When the next attempt is due (pending deliveries only).
    #[serde(serialize_with = "opt_time")]
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "time")]
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayTarget {
    /// Dead letters, all or those matching the filters.
    DeadLetters {
        sink: Option<String>,
        source: Option<String>,
        event_type: Option<String>,
        since: Option<i64>,
    },
    /// One event's deliveries (to one sink, added if the event never had it).
    Event {
        source: String,
        id: String,
        sink: Option<String>,
    },
}

/// For the log: `dead letters of sink kds, source crave` or `event
/// crave:evt_1, sink kds`.
impl std::fmt::Display for ReplayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, filters) = match self {
            ReplayTarget::DeadLetters {
                sink,
                source,
                event_type,
                since,
            } => (
                "dead letters".to_owned(),
                [
                    sink.as_ref().map(|s| format!("sink {s}")),
                    source.as_ref().map(|s| format!("source {s}")),
                    event_type.as_ref().map(|t| format!("type {t}")),
                    since.map(|t| format!("since {t} ms")),
                ],
            ),
            ReplayTarget::Event { source, id, sink } => (
                format!("event {source}:{id}"),
                [sink.as_ref().map(|s| format!("sink {s}")), None, None, None],
            ),
        };
        f.write_str(&what)?;
        for filter in filters.iter().flatten() {
            write!(f, ", {filter}")?;
        }
        Ok(())
    }
}

/// How long things are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub dedupe_window: Duration,
    pub keep_delivered: Duration,
    pub keep_dead_letters: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub deliveries_deleted: u64,
    pub events_compacted: u64,
    pub events_deleted: u64,
    /// The pass stopped at its limit with events still to look at, though it
    /// may have changed nothing (SQLite walks seqs for compaction): call again.
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not read or commit (disk full, I/O error, closed).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A caller's own limit on waiting for the store ran out (the admin
    /// API's): slow or hung, said as such rather than as an outage.
    #[error("no answer from the store within {0:?}")]
    TimedOut(std::time::Duration),
    #[error("no such event")]
    NotFound,
    /// The event was delivered and compacted: only its dedupe key is left.
    #[error("the event's payload has been pruned")]
    Pruned,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new event and one pending delivery per sink (the held ones
    /// already claimed), in one durable transaction; returns only once it is
    /// on disk.
    async fn insert(&self, event: NewEvent) -> Result<Inserted, StoreError>;

    /// Claims up to `limit` due deliveries of `sink` for `lease`.
    async fn claim(&self, sink: &str, limit: usize, lease: Duration, now: i64) -> Result<Vec<Claimed>, StoreError>;

    /// Records the ends of attempts (and releases their leases).
    async fn complete(&self, done: Vec<Completion>) -> Result<(), StoreError>;

    /// When the next delivery of `sink` that no one holds falls due, if any
    /// is pending: the first entry of the due index, whatever the store's
    /// size. Leased ones are left out (finding the earliest lease would read
    /// every pending row): a lease that runs out is found by the engine's
    /// poll, at most a second later.
    async fn next_due(&self, sink: &str) -> Result<Option<i64>, StoreError>;

    async fn events(&self, filter: EventFilter) -> Result<Vec<EventSummary>, StoreError>;

    async fn deliveries(&self, filter: DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError>;

    /// One event with its payload, deliveries and every recorded attempt.
    async fn event_detail(&self, source: &str, id: &str) -> Result<EventDetail, StoreError>;

    /// Pending and dead deliveries per sink (sinks with neither are omitted).
    async fn queue_stats(&self) -> Result<Vec<SinkQueue>, StoreError>;

    /// Whether the store takes transactions now.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether this process's part of the store works: the systemd watchdog
    /// pings only while it does, so a wedged SQLite writer gets expeditor
    /// restarted. A PostgreSQL server that is down fails `ping` but not
    /// this: a restart would not bring the server back (and a start that
    /// cannot reach it fails), while the running daemon reconnects by
    /// itself; readiness and the 503s say meanwhile that it is away.
    async fn alive(&self) -> Result<(), StoreError> {
        self.ping().await
    }

    /// Whether a write would reach the disk now (readiness): unlike `ping`,
    /// a full disk fails this, though restarting would not fix that.
    async fn writable(&self) -> Result<(), StoreError> {
        self.ping().await
    }

    /// Makes deliveries due again with a fresh attempt budget; returns how many.
    async fn replay(&self, target: ReplayTarget, now: i64) -> Result<u64, StoreError>;

    /// Deletes what retention no longer needs.
    async fn prune(&self, retention: Retention, now: i64) -> Result<PruneStats, StoreError>;

    /// Finishes queued writes and closes.
    async fn close(&self);

    /// The store's own fsyncs, where it makes writes durable itself
    /// (SQLite); `None` where the database server does (PostgreSQL).
    fn durability(&self) -> Option<Durability> {
        None
    }
}

/// What each fsync of the store's log took, and how many writes it made
/// durable: where an ack's wait goes, and disk stalls as they happen
/// (`/metrics`). Handles onto the same counters the store updates.
#[derive(Clone, Debug)]
pub struct Durability {
    /// Seconds per fsync.
    pub syncs: prometheus_client::metrics::histogram::Histogram,
    /// Writes (inserts, delivery outcomes, claims, ...) answered after an
    /// fsync; per fsync, the group commit's size.
    pub operations: prometheus_client::metrics::counter::Counter,
    /// Seconds per checkpoint of the log into the database file, by mode:
    /// `passive` (about every 25 ms under load; no commit waits for it, but
    /// its fsync of the database file shares the disk with the log's) and
    /// `restart` (when the log is long: the writer waits while it finishes;
    /// its time includes its own wait for the writer's lock).
    pub checkpoints: Checkpoints,
}

/// Checkpoint timings by mode (see [`Durability::checkpoints`]).
pub type Checkpoints =
    prometheus_client::metrics::family::Family<CheckpointLabels, prometheus_client::metrics::histogram::Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CheckpointLabels {
    pub mode: &'static str,
}

impl Default for Durability {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        Self {
            // 50 µs .. ~1.6 s: a healthy fsync takes a fraction of a
            // millisecond; a stalling disk, hundreds.
            syncs: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            operations: Default::default(),
            // 100 µs .. ~3.3 s: a checkpoint copies up to megabytes and
            // fsyncs the database file.
            checkpoints: Checkpoints::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 2.0, 16))),
        }
    }
}

/// Opens the configured store: the SQLite file under `store.path`, or the
/// PostgreSQL database at `store.url` (connected now, migrated if needed).
/// Errors name the file or `host:port/db`, never a password.
pub async fn open(backend: &crate::config::StoreBackend) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    use crate::config::StoreBackend;
    let message = |e: StoreError| match e {
        StoreError::Unavailable(m) => m,
        other => other.to_string(),
    };
    Ok(match backend {
        StoreBackend::Sqlite { path } => {
            // Off the async workers (a schema upgrade may take a while), so
            // the caller can stop waiting for it.
            let at = path.clone();
            let opened = tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&at))
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the store at {}: {e}", path.display()))?;
            std::sync::Arc::new(
                opened.map_err(|e| anyhow::anyhow!("cannot open the store at {}: {}", path.display(), message(e)))?,
            )
        }
        StoreBackend::Postgres { url } => {
            let url = std::str::from_utf8(url.expose()).unwrap_or_default();
            std::sync::Arc::new(
                postgres::PostgresStore::connect(url)
                    .await
                    .map_err(|e| anyhow::anyhow!(message(e)))?,
            )
        }
    })
}

/// Dead letters a replay re-queues per statement: each chunk is its own
/// commit, so acks go on between them.
pub(crate) const REPLAY_CHUNK: u64 = 5000;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn format_time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

fn time<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*ms))
}

fn opt_time<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_time(*ms)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests;
