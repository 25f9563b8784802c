//! The store's contract, written once against `Arc<dyn Store>` and run on
//! every backend (`store_tests!` below instantiates each test per backend as
//! `store::tests::<test>::<backend>`).
//!
//! Every time the store sees comes from the test (`received_at`, `now`,
//! `finished_at`), counted from the fixed instant [`T0`], so nothing here
//! sleeps or depends on the clock; the exceptions are the two SQLite-only
//! lock tests, which hold a lock from another connection and wait on the
//! writer's busy timeout.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tempfile::TempDir;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::*;

/// An arbitrary fixed "now" (2023-11-14T22:13:20Z), in Unix milliseconds.
const T0: i64 = 1_700_000_000_000;
const SECOND: i64 = 1_000;
const HOUR: i64 = 3_600 * SECOND;
const DAY: i64 = 24 * HOUR;
const LEASE: Duration = Duration::from_secs(30);
const LEASE_MS: i64 = 30 * SECOND;
/// Larger than any number of rows a test creates.
const ALL: usize = 10_000;

// ---------------------------------------------------------------------------
// Backends

/// A fresh, empty SQLite store in its own directory; the directory lives as
/// long as the returned guard.
fn sqlite() -> (Arc<dyn Store>, TempDir) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store = SqliteStore::open(dir.path()).expect("open the SQLite store");
    (Arc::new(store), dir)
}

/// The PostgreSQL server the tests may use: a URL whose user may create
/// databases (`.ci/run` sets it). Unset: the PostgreSQL tests pass without
/// running, after saying so on stderr.
const POSTGRES_URL_VAR: &str = "EXPEDITOR_TEST_POSTGRES_URL";

/// A fresh database on the test server, dropped when the guard goes (also
/// when the test panics), whoever is still connected.
struct TestDatabase {
    server: tokio_postgres::Config,
    name: String,
}

impl TestDatabase {
    /// `None` when [`POSTGRES_URL_VAR`] is unset.
    async fn create() -> Option<TestDatabase> {
        let url = match std::env::var(POSTGRES_URL_VAR) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    // Straight to the stream: libtest captures print! and eprint!.
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "skipping PostgreSQL store tests: {POSTGRES_URL_VAR} not set"
                    );
                });
                return None;
            }
        };
        let server =
            super::postgres::parse_url(&url).unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR} is not a usable URL: {e}"));
        let name = format!("expeditor_test_{:016x}", fastrand::u64(..));
        let db = TestDatabase { server, name };
        db.admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {}", db.name))
            .await
            .unwrap_or_else(|e| panic!("cannot create the test database {}: {e:?}", db.name));
        Some(db)
    }

    /// The test database's connection settings.
    fn config(&self) -> tokio_postgres::Config {
        let mut config = self.server.clone();
        config.dbname(&self.name);
        config
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::connect_config(self.config())
            .await
            .expect("open the PostgreSQL store")
    }

    /// A connection to the server's own database (not the test's), for
    /// creating, dropping and cutting off the test database.
    async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) = self
            .server
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR}: {e:?}"));
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Its own thread and runtime: this may run inside (or after) the test's.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let (client, connection) = server.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}: {dropped:?}", self.name);
        }
    }
}

/// Instantiates each test once per backend, as `<test>::<backend>`.
///
/// Every backend must pass every test listed here: `sqlite` on a temporary
/// directory, `postgres` on a fresh database of `EXPEDITOR_TEST_POSTGRES_URL`
/// (which passes without running, with a message on stderr, when the variable
/// is unset). Tests that only make sense for one backend are plain
/// `#[tokio::test]`s further down, named after it.
macro_rules! store_tests {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let (store, _dir) = super::sqlite();
                super::$test(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let Some(db) = super::TestDatabase::create().await else { return };
                let store: std::sync::Arc<dyn super::Store> = std::sync::Arc::new(db.store().await);
                super::$test(store.clone()).await;
                store.close().await;
            }
        }
    )*};
}

store_tests!(
    insert_dedupes_by_source_and_event_id,
    claim_returns_the_event_once_per_sink,
    event_without_sinks_is_stored_and_claims_nothing,
    lease_hides_a_claimed_delivery_until_it_runs_out,
    held_deliveries_are_written_claimed_by_the_inserter,
    delivered_is_never_claimed_again,
    retry_is_claimable_at_its_due_time_with_the_next_attempt,
    any_error_text_is_recorded_with_the_outcomes_beside_it,
    released_claims_run_again_at_once_with_the_same_attempt,
    dead_is_listed_and_never_claimed,
    replay_dead_letters_requeues_them_with_fresh_attempts,
    replay_dead_letters_of_one_sink,
    replay_of_many_dead_letters_goes_in_chunks,
    replay_event_requeues_every_delivery_even_delivered,
    replay_event_to_a_new_sink_adds_a_delivery,
    replay_event_leaves_a_delivery_in_flight_to_its_attempt,
    replay_unknown_event_is_not_found,
    prune_follows_retention,
    prune_never_touches_pending_deliveries,
    claim_returns_earliest_due_first_within_limit,
    concurrent_inserts_are_all_stored,
    events_filters_and_fields,
    deliveries_filters_and_fields,
    deliveries_filter_by_source_type_and_since,
    listings_page_by_cursor_through_ties,
    replay_dead_letters_by_source_type_and_since,
    event_detail_has_payload_deliveries_and_attempt_log,
    queue_stats_count_pending_and_dead_per_sink,
    ping_and_writable_succeed_on_a_working_store,
    a_stale_completion_does_not_overwrite_a_newer_attempt,
    deliveries_written_dead_are_dead_letters_to_replay,
);

// PostgreSQL only (at the end of this file): several instances on one
// database, migrations when they start at once, the database going away and
// coming back, and the message when it cannot be reached at all.
//
// SQLite only (plain tests at the end of this file, not in `store_tests!`):
// - `sqlite_reopen_keeps_everything_and_releases_leases`: releasing every
//   lease at open is right only for a store one process owns; a shared store
//   must leave other live instances' leases alone (they run out instead).
// - `sqlite_insert_is_unavailable_while_the_database_is_locked` and
//   `sqlite_a_briefly_held_lock_is_waited_out`: they lock the database file
//   from a second SQLite connection.
// - `sqlite_a_failing_write_fails_alone`: PostgreSQL's single insert
//   statement skips a sink named twice instead of failing part way.
// - `sqlite_a_failed_fsync_refuses_every_write_until_reopened`: the fsync
//   of the WAL is SQLite's store's own (PostgreSQL does its own).

// ---------------------------------------------------------------------------
// Helpers

fn sinks(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A CrumbPOS `order.created` received at [`T0`], routed to `sinks`.
fn new_event(id: &str, sinks_: &[&str]) -> NewEvent {
    NewEvent {
        source: "crumb".into(),
        event_id: id.into(),
        kind: "crumbpos".into(),
        event_type: "order.created".into(),
        occurred_at: Some(T0 - 5 * SECOND),
        received_at: T0,
        body: Bytes::from(format!(r#"{{"id":"{id}","type":"order.created"}}"#)),
        sinks: sinks(sinks_),
        held: vec![],
        dead: vec![],
    }
}

/// `new_event`, received at `at` (new deliveries are due when received).
fn event_at(id: &str, sinks_: &[&str], at: i64) -> NewEvent {
    NewEvent {
        received_at: at,
        ..new_event(id, sinks_)
    }
}

async fn insert(store: &dyn Store, event: NewEvent) -> Inserted {
    store.insert(event).await.expect("insert")
}

async fn claim(store: &dyn Store, sink: &str, now: i64) -> Vec<Claimed> {
    store.claim(sink, ALL, LEASE, now).await.expect("claim")
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort_unstable();
    v
}

/// (event id, attempt) of each claim, in the order returned.
fn attempts(claimed: &[Claimed]) -> Vec<(&str, u32)> {
    claimed.iter().map(|c| (c.event.event_id.as_str(), c.attempt)).collect()
}

async fn complete(store: &dyn Store, claimed: &Claimed, finished_at: i64, result: Completed) {
    let done = Completion {
        delivery_id: claimed.delivery_id,
        attempt: claimed.attempt,
        lease_until: claimed.lease_until,
        finished_at,
        result,
    };
    store.complete(vec![done]).await.expect("complete");
}

/// Claims every due delivery of `sink` at `now` and ends each with `result`.
async fn finish_all(store: &dyn Store, sink: &str, now: i64, result: Completed) -> usize {
    let claimed = claim(store, sink, now).await;
    for c in &claimed {
        complete(store, c, now, result.clone()).await;
    }
    claimed.len()
}

fn dead(error: &str) -> Completed {
    Completed::Dead { error: error.into() }
}

async fn deliveries(store: &dyn Store, sink: Option<&str>, status: Option<Status>) -> Vec<DeliveryRow> {
    store
        .deliveries(DeliveryFilter {
            sink: sink.map(str::to_string),
            status,
            limit: ALL,
            ..Default::default()
        })
        .await
        .expect("list deliveries")
}

/// (event id, sink) of each row, sorted.
fn pairs(rows: &[DeliveryRow]) -> Vec<(&str, &str)> {
    sorted(rows.iter().map(|r| (r.event_id.as_str(), r.sink.as_str())).collect())
}

async fn events(store: &dyn Store, source: Option<&str>, event_type: Option<&str>) -> Vec<EventSummary> {
    store
        .events(EventFilter {
            source: source.map(str::to_string),
            event_type: event_type.map(str::to_string),
            limit: ALL,
            ..Default::default()
        })
        .await
        .expect("list events")
}

/// Event ids of a listing, sorted.
fn event_ids(events: &[EventSummary]) -> Vec<&str> {
    sorted(events.iter().map(|e| e.id.as_str()).collect())
}

fn event_target(id: &str, sink: Option<&str>) -> ReplayTarget {
    ReplayTarget::Event {
        source: "crumb".into(),
        id: id.into(),
        sink: sink.map(str::to_string),
    }
}

fn assert_same_event(stored: &StoredEvent, sent: &NewEvent) {
    assert_eq!(stored.source, sent.source);
    assert_eq!(stored.event_id, sent.event_id);
    assert_eq!(stored.kind, sent.kind);
    assert_eq!(stored.event_type, sent.event_type);
    assert_eq!(stored.occurred_at, sent.occurred_at);
    assert_eq!(stored.received_at, sent.received_at);
    assert!(stored.body == sent.body[..], "the body came back changed");
}

// ---------------------------------------------------------------------------
// Insert and dedupe

async fn insert_dedupes_by_source_and_event_id(store: Arc<dyn Store>) {
    let first = new_event("evt_1", &["a"]);
    assert_eq!(insert(&*store, first.clone()).await, Inserted::New(vec![]));

    // The vendor's retry of the same event, even routed differently now,
    // writes nothing: no new delivery, no new body.
    let retry = NewEvent {
        received_at: T0 + SECOND,
        body: Bytes::from_static(b"{\"retried\":true}"),
        sinks: sinks(&["a", "b"]),
        ..first.clone()
    };
    assert_eq!(insert(&*store, retry).await, Inserted::Duplicate);
    assert_eq!(pairs(&deliveries(&*store, None, None).await), [("evt_1", "a")]);
    assert!(claim(&*store, "b", T0 + HOUR).await.is_empty());
    let claimed = claim(&*store, "a", T0 + HOUR).await;
    assert_eq!(attempts(&claimed), [("evt_1", 1)]);
    assert_same_event(&claimed[0].event, &first);

    // Dedupe is per source: the same id from another vendor is another event.
    let other = NewEvent {
        source: "crave".into(),
        kind: "crave".into(),
        ..new_event("evt_1", &["a"])
    };
    assert_eq!(insert(&*store, other.clone()).await, Inserted::New(vec![]));
    assert_eq!(events(&*store, None, None).await.len(), 2);
    assert_eq!(deliveries(&*store, None, None).await.len(), 2);
    let claimed = claim(&*store, "a", T0 + HOUR).await;
    assert_eq!(claimed.len(), 1);
    assert_same_event(&claimed[0].event, &other);
}

async fn claim_returns_the_event_once_per_sink(store: Arc<dyn Store>) {
    // Not UTF-8, with NULs, and large: the body is opaque bytes.
    let body: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let event = NewEvent {
        source: "crave".into(),
        event_id: "ord_9f8e7d".into(),
        kind: "crave".into(),
        event_type: "order.ready".into(),
        occurred_at: Some(T0 - 42),
        received_at: T0,
        body: Bytes::from(body),
        sinks: sinks(&["a", "b"]),
        held: vec![],
        dead: vec![],
    };
    assert_eq!(insert(&*store, event.clone()).await, Inserted::New(vec![]));

    for sink in ["a", "b"] {
        let claimed = claim(&*store, sink, T0).await;
        assert_eq!(claimed.len(), 1, "sink {sink}");
        assert_eq!(claimed[0].sink, sink);
        assert_eq!(claimed[0].attempt, 1);
        assert_same_event(&claimed[0].event, &event);
    }
    assert!(claim(&*store, "c", T0).await.is_empty());

    // An event without an occurred_at keeps it absent.
    let untimed = NewEvent {
        occurred_at: None,
        ..new_event("evt_untimed", &["c"])
    };
    insert(&*store, untimed.clone()).await;
    let claimed = claim(&*store, "c", T0).await;
    assert_eq!(claimed.len(), 1);
    assert_same_event(&claimed[0].event, &untimed);
}

async fn event_without_sinks_is_stored_and_claims_nothing(store: Arc<dyn Store>) {
    assert_eq!(insert(&*store, new_event("evt_1", &[])).await, Inserted::New(vec![]));

    let listed = events(&*store, None, None).await;
    assert_eq!(event_ids(&listed), ["evt_1"]);
    assert!(listed[0].deliveries.is_empty());
    assert!(deliveries(&*store, None, None).await.is_empty());
    assert!(claim(&*store, "a", T0 + HOUR).await.is_empty());
    assert_eq!(store.next_due("a").await.unwrap(), None);
    // It still dedupes.
    assert_eq!(insert(&*store, new_event("evt_1", &["a"])).await, Inserted::Duplicate);
}

// ---------------------------------------------------------------------------
// Leases and completions

async fn lease_hides_a_claimed_delivery_until_it_runs_out(store: Arc<dyn Store>) {
    insert(&*store, event_at("evt_1", &["a"], T0)).await;
    insert(&*store, event_at("evt_2", &["a"], T0 + 1)).await;

    let first = store.claim("a", 1, LEASE, T0 + 1).await.unwrap();
    assert_eq!(attempts(&first), [("evt_1", 1)]);
    // The lease holds one delivery, not the sink: another worker gets the next.
    let second = store.claim("a", 1, LEASE, T0 + 10).await.unwrap();
    assert_eq!(attempts(&second), [("evt_2", 1)]);

    assert!(claim(&*store, "a", T0 + 11).await.is_empty());
    assert!(claim(&*store, "a", T0 + 1 + LEASE_MS - 1).await.is_empty());
    // Only held ones are pending: none falls due by itself (a lease's end
    // is the engine's poll's to find).
    assert_eq!(store.next_due("a").await.unwrap(), None);

    // The worker holding evt_1 died: its lease ran out, so it runs again,
    // as the same attempt (how the first went was never recorded).
    let again = claim(&*store, "a", T0 + 1 + LEASE_MS + 1).await;
    assert_eq!(attempts(&again), [("evt_1", 1)]);
    assert!(again[0].taken_over && !first[0].taken_over && !second[0].taken_over);
    let rows = deliveries(&*store, Some("a"), None).await;
    let evt_1 = rows.iter().find(|r| r.event_id == "evt_1").expect("evt_1's delivery");
    assert_eq!(evt_1.attempts, 1, "{rows:?}");
    assert_eq!(again[0].delivery_id, first[0].delivery_id);
}

/// Ingest may hold some of a new event's deliveries (it starts them itself):
/// they are written already claimed as attempt 1, their ids come back in the
/// order asked, and no claim sees them until their lease runs out or they are
/// given back; the others are pending as usual.
async fn held_deliveries_are_written_claimed_by_the_inserter(store: Arc<dyn Store>) {
    let lease_until = T0 + LEASE_MS;
    let held = |sink: &str| Held {
        sink: sink.into(),
        lease_until,
    };
    let event = NewEvent {
        held: vec![held("c"), held("a")],
        ..new_event("evt_1", &["a", "b", "c"])
    };
    let Inserted::New(ids) = insert(&*store, event.clone()).await else {
        panic!("a new event")
    };
    assert_eq!(ids.len(), 2);
    let rows = deliveries(&*store, None, None).await;
    let id_of = |sink: &str| rows.iter().find(|r| r.sink == sink).expect("a delivery").id;
    assert_eq!(ids, [id_of("c"), id_of("a")]);
    let pending = deliveries(&*store, Some("a"), Some(Status::Pending)).await;
    assert_eq!(pending[0].attempts, 1, "a held delivery is its first attempt");

    assert!(claim(&*store, "a", T0 + 1).await.is_empty());
    assert!(claim(&*store, "c", T0 + 1).await.is_empty());
    assert_eq!(attempts(&claim(&*store, "b", T0 + 1).await), [("evt_1", 1)]);

    // The holder finishes "a" like any claim, and gives "c" back unattempted.
    let finish = |id: i64, result: Completed| Completion {
        delivery_id: id,
        attempt: 1,
        lease_until,
        finished_at: T0 + 2,
        result,
    };
    store
        .complete(vec![
            finish(ids[1], Completed::Delivered),
            finish(ids[0], Completed::Released),
        ])
        .await
        .expect("complete");
    assert_eq!(
        pairs(&deliveries(&*store, None, Some(Status::Delivered)).await),
        [("evt_1", "a")]
    );
    let again = claim(&*store, "c", T0 + 3).await;
    assert_eq!(attempts(&again), [("evt_1", 1)]);
    assert_eq!(again[0].delivery_id, ids[0]);

    // A duplicate holds nothing and returns no ids.
    assert_eq!(insert(&*store, event).await, Inserted::Duplicate);
}

async fn delivered_is_never_claimed_again(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a"])).await;
    let claimed = claim(&*store, "a", T0).await;
    complete(&*store, &claimed[0], T0 + 5, Completed::Delivered).await;

    assert!(claim(&*store, "a", T0 + LEASE_MS + 1).await.is_empty());
    assert!(claim(&*store, "a", T0 + 365 * DAY).await.is_empty());
    assert_eq!(store.next_due("a").await.unwrap(), None);
    let delivered = deliveries(&*store, None, Some(Status::Delivered)).await;
    assert_eq!(pairs(&delivered), [("evt_1", "a")]);
    assert_eq!(delivered[0].attempts, 1);
    assert!(deliveries(&*store, None, Some(Status::Pending)).await.is_empty());
}

/// A worker that stops with claims it never attempted gives them back: they
/// are claimable at once (no waiting out the lease), the unmade attempt is not
/// counted and leaves no trace in the attempt log, and a stale release (the
/// delivery was claimed again meanwhile) changes nothing.
async fn released_claims_run_again_at_once_with_the_same_attempt(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a"])).await;
    let first = claim(&*store, "a", T0).await;
    assert_eq!(attempts(&first), [("evt_1", 1)]);
    complete(&*store, &first[0], T0 + 1, Completed::Released).await;

    let again = claim(&*store, "a", T0 + 2).await;
    assert_eq!(
        attempts(&again),
        [("evt_1", 1)],
        "same attempt number: the first never ran"
    );
    let pending = deliveries(&*store, None, Some(Status::Pending)).await;
    assert_eq!(pending[0].attempts, 1);
    assert_eq!(pending[0].last_error, None);

    // Released again by a worker that no longer holds it: ignored.
    complete(&*store, &first[0], T0 + 3, Completed::Released).await;
    complete(&*store, &again[0], T0 + 4, Completed::Delivered).await;
    assert!(claim(&*store, "a", T0 + 5).await.is_empty());
    let detail = store.event_detail("crumb", "evt_1").await.unwrap();
    let log = &detail.deliveries[0].attempt_log;
    assert_eq!(log.len(), 1, "only the real attempt is logged: {log:?}");
    assert_eq!(deliveries(&*store, None, Some(Status::Delivered)).await[0].attempts, 1);
}

/// Whatever a sink says (a plugin's error may hold a NUL, which PostgreSQL
/// refuses in text, or be very long) is recorded, and does not hold back the
/// outcomes recorded with it.
async fn any_error_text_is_recorded_with_the_outcomes_beside_it(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a", "b"])).await;
    let a = claim(&*store, "a", T0).await;
    let b = claim(&*store, "b", T0).await;
    let end = |c: &Claimed, result: Completed| Completion {
        delivery_id: c.delivery_id,
        attempt: c.attempt,
        lease_until: c.lease_until,
        finished_at: T0 + 1,
        result,
    };
    let long = "x".repeat(MAX_ERROR_CHARS + 10);
    store
        .complete(vec![
            end(&a[0], dead("bad\0byte\nand a new line")),
            end(&b[0], dead(&long)),
        ])
        .await
        .expect("complete");
    let dead_rows = deliveries(&*store, None, Some(Status::Dead)).await;
    let error_of = |sink: &str| {
        dead_rows
            .iter()
            .find(|r| r.sink == sink)
            .and_then(|r| r.last_error.clone())
    };
    assert_eq!(error_of("a").as_deref(), Some("bad byte and a new line"));
    let b_error = error_of("b").expect("b's error");
    assert_eq!(b_error.chars().count(), MAX_ERROR_CHARS + 3, "cut, and said so");
    assert!(b_error.ends_with("..."));
}

async fn retry_is_claimable_at_its_due_time_with_the_next_attempt(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a"])).await;
    let first = claim(&*store, "a", T0).await;
    assert_eq!(attempts(&first), [("evt_1", 1)]);

    // Due before the lease would have run out: completing released the lease.
    let due = T0 + 10 * SECOND;
    let retry = Completed::Retry {
        due_at: due,
        error: "HTTP 503".into(),
    };
    complete(&*store, &first[0], T0 + 100, retry).await;
    assert_eq!(store.next_due("a").await.unwrap(), Some(due));
    assert!(claim(&*store, "a", due - 1).await.is_empty());
    let second = claim(&*store, "a", due).await;
    assert_eq!(attempts(&second), [("evt_1", 2)]);
    assert_eq!(second[0].delivery_id, first[0].delivery_id);

    let due = T0 + HOUR;
    let retry = Completed::Retry {
        due_at: due,
        error: "timed out".into(),
    };
    complete(&*store, &second[0], T0 + 11 * SECOND, retry).await;
    assert_eq!(store.next_due("a").await.unwrap(), Some(due));
    assert!(claim(&*store, "a", due - 1).await.is_empty());
    assert_eq!(attempts(&claim(&*store, "a", due).await), [("evt_1", 3)]);
}

/// A delivery written dead at insert (its route could not decide) is a dead
/// letter like any other: listed with its error, never claimed, and
/// replayed as a first attempt.
async fn deliveries_written_dead_are_dead_letters_to_replay(store: Arc<dyn Store>) {
    let undecided = NewEvent {
        dead: vec![("b".into(), "route \"big\" could not decide: invalid operation".into())],
        ..new_event("evt_1", &["a"])
    };
    insert(&*store, undecided.clone()).await;
    assert_eq!(insert(&*store, undecided).await, Inserted::Duplicate);
    let dead = deliveries(&*store, None, Some(Status::Dead)).await;
    assert_eq!(pairs(&dead), [("evt_1", "b")]);
    assert_eq!(dead[0].attempts, 0);
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("route \"big\" could not decide: invalid operation")
    );
    assert_eq!(
        pairs(&deliveries(&*store, None, Some(Status::Pending)).await),
        [("evt_1", "a")]
    );
    assert!(claim(&*store, "b", T0 + HOUR).await.is_empty());

    let replayed = store
        .replay(
            ReplayTarget::DeadLetters {
                sink: Some("b".into()),
                source: None,
                event_type: None,
                since: None,
            },
            T0 + HOUR,
        )
        .await;
    assert_eq!(replayed, Ok(1));
    assert_eq!(attempts(&claim(&*store, "b", T0 + HOUR).await), [("evt_1", 1)]);
    store.close().await;
}

async fn dead_is_listed_and_never_claimed(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a"])).await;
    let claimed = claim(&*store, "a", T0).await;
    complete(&*store, &claimed[0], T0 + 5, dead("HTTP 400: bad ticket")).await;

    let dead_letters = deliveries(&*store, None, Some(Status::Dead)).await;
    assert_eq!(pairs(&dead_letters), [("evt_1", "a")]);
    assert_eq!(dead_letters[0].attempts, 1);
    assert_eq!(dead_letters[0].last_error.as_deref(), Some("HTTP 400: bad ticket"));
    assert!(claim(&*store, "a", T0 + 365 * DAY).await.is_empty());
    assert_eq!(store.next_due("a").await.unwrap(), None);
    assert!(deliveries(&*store, None, Some(Status::Pending)).await.is_empty());
}

// ---------------------------------------------------------------------------
// Replay

async fn replay_dead_letters_requeues_them_with_fresh_attempts(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a", "b"])).await;
    insert(&*store, new_event("evt_2", &["a"])).await;
    insert(&*store, new_event("evt_3", &["c"])).await;
    assert_eq!(
        store
            .replay(
                ReplayTarget::DeadLetters {
                    sink: None,
                    source: None,
                    event_type: None,
                    since: None
                },
                T0
            )
            .await,
        Ok(0)
    );

    // evt_1 -> a dies on its second attempt, the others on their first.
    let c = claim(&*store, "a", T0).await;
    let evt_1 = c.iter().find(|c| c.event.event_id == "evt_1").unwrap();
    let retry = Completed::Retry {
        due_at: T0 + SECOND,
        error: "HTTP 503".into(),
    };
    complete(&*store, evt_1, T0, retry).await;
    let evt_2 = c.iter().find(|c| c.event.event_id == "evt_2").unwrap();
    complete(&*store, evt_2, T0, dead("HTTP 400")).await;
    assert_eq!(finish_all(&*store, "a", T0 + SECOND, dead("HTTP 400")).await, 1);
    assert_eq!(finish_all(&*store, "b", T0, dead("HTTP 404")).await, 1);
    assert_eq!(finish_all(&*store, "c", T0, Completed::Delivered).await, 1);
    assert_eq!(deliveries(&*store, None, Some(Status::Dead)).await.len(), 3);

    let now = T0 + HOUR;
    assert_eq!(
        store
            .replay(
                ReplayTarget::DeadLetters {
                    sink: None,
                    source: None,
                    event_type: None,
                    since: None
                },
                now
            )
            .await,
        Ok(3)
    );
    assert!(deliveries(&*store, None, Some(Status::Dead)).await.is_empty());
    assert_eq!(store.next_due("a").await.unwrap(), Some(now));
    let a = claim(&*store, "a", now).await;
    assert_eq!(sorted(attempts(&a)), [("evt_1", 1), ("evt_2", 1)]);
    assert_eq!(attempts(&claim(&*store, "b", now).await), [("evt_1", 1)]);
    // Delivered ones are not dead letters.
    assert!(claim(&*store, "c", now).await.is_empty());
}

async fn replay_dead_letters_of_one_sink(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a", "b"])).await;
    finish_all(&*store, "a", T0, dead("HTTP 400")).await;
    finish_all(&*store, "b", T0, dead("HTTP 400")).await;

    let now = T0 + HOUR;
    let target = |sink: &str| ReplayTarget::DeadLetters {
        sink: Some(sink.into()),
        source: None,
        event_type: None,
        since: None,
    };
    assert_eq!(store.replay(target("zzz"), now).await, Ok(0));
    assert_eq!(store.replay(target("a"), now).await, Ok(1));
    assert_eq!(attempts(&claim(&*store, "a", now).await), [("evt_1", 1)]);
    assert!(claim(&*store, "b", now).await.is_empty());
    let still_dead = deliveries(&*store, None, Some(Status::Dead)).await;
    assert_eq!(pairs(&still_dead), [("evt_1", "b")]);
}

/// More dead letters than one statement takes: every one is re-queued,
/// chunk by chunk, and one that died after the replay began is not.
async fn replay_of_many_dead_letters_goes_in_chunks(store: Arc<dyn Store>) {
    let many = 2 * super::REPLAY_CHUNK as usize + 7;
    let mut inserts = tokio::task::JoinSet::new();
    for i in 0..many + 1 {
        let store = store.clone();
        inserts.spawn(async move { insert(&*store, new_event(&format!("evt_{i}"), &["a"])).await });
    }
    inserts.join_all().await;
    let claimed = store.claim("a", many + 1, LEASE, T0).await.unwrap();
    assert_eq!(claimed.len(), many + 1);
    let now = T0 + HOUR;
    let done = claimed
        .iter()
        .enumerate()
        .map(|(i, c)| Completion {
            delivery_id: c.delivery_id,
            attempt: c.attempt,
            lease_until: c.lease_until,
            // The last one dies after the replay's `now`.
            finished_at: if i == many { now + SECOND } else { T0 },
            result: dead("HTTP 400"),
        })
        .collect();
    store.complete(done).await.unwrap();

    let target = ReplayTarget::DeadLetters {
        sink: None,
        source: None,
        event_type: None,
        since: None,
    };
    assert_eq!(store.replay(target, now).await, Ok(many as u64));
    let still_dead = deliveries(&*store, None, Some(Status::Dead)).await;
    assert_eq!(still_dead.len(), 1, "the one that died after `now`");
    assert_eq!(store.claim("a", many + 1, LEASE, now).await.unwrap().len(), many);
}

async fn replay_event_requeues_every_delivery_even_delivered(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a", "b"])).await;
    let a = claim(&*store, "a", T0).await;
    complete(&*store, &a[0], T0, Completed::Delivered).await;
    finish_all(&*store, "b", T0, dead("HTTP 400")).await;
    insert(&*store, new_event("evt_2", &["a"])).await; // pending, untouched

    let now = T0 + HOUR;
    assert_eq!(store.replay(event_target("evt_1", None), now).await, Ok(2));
    let a = claim(&*store, "a", now).await;
    assert_eq!(sorted(attempts(&a)), [("evt_1", 1), ("evt_2", 1)]);
    let b = claim(&*store, "b", now).await;
    assert_eq!(attempts(&b), [("evt_1", 1)]);
    assert_same_event(&b[0].event, &new_event("evt_1", &[]));

    // The history keeps the first delivery and the replayed one.
    let again = a.iter().find(|c| c.event.event_id == "evt_1").unwrap();
    complete(&*store, again, now + SECOND, Completed::Delivered).await;
    let detail = store.event_detail("crumb", "evt_1").await.unwrap();
    let a = detail.deliveries.iter().find(|d| d.delivery.sink == "a").unwrap();
    let log: Vec<_> = a
        .attempt_log
        .iter()
        .map(|l| (l.attempt, l.finished_at, l.outcome.as_str()))
        .collect();
    assert_eq!(log, [(1, T0, "delivered"), (1, now + SECOND, "delivered")]);
}

async fn replay_event_to_a_new_sink_adds_a_delivery(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a"])).await;
    finish_all(&*store, "a", T0, Completed::Delivered).await;

    let now = T0 + HOUR;
    assert_eq!(store.replay(event_target("evt_1", Some("z")), now).await, Ok(1));
    let z = claim(&*store, "z", now).await;
    assert_eq!(attempts(&z), [("evt_1", 1)]);
    assert_same_event(&z[0].event, &new_event("evt_1", &[]));
    // Only the named sink was replayed.
    assert!(claim(&*store, "a", now).await.is_empty());
    assert_eq!(
        pairs(&deliveries(&*store, None, None).await),
        [("evt_1", "a"), ("evt_1", "z")]
    );

    // Naming a sink the event already has re-queues that one.
    assert_eq!(store.replay(event_target("evt_1", Some("a")), now).await, Ok(1));
    assert_eq!(attempts(&claim(&*store, "a", now).await), [("evt_1", 1)]);
    assert_eq!(deliveries(&*store, None, None).await.len(), 2);
}

/// A delivery in flight when its event is replayed is left to its attempt:
/// reset, it would be claimed and sent beside that attempt, and the first
/// outcome recorded would stand for the other's.
async fn replay_event_leaves_a_delivery_in_flight_to_its_attempt(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a", "b"])).await;
    let in_flight = claim(&*store, "a", T0).await;
    assert_eq!(attempts(&in_flight), [("evt_1", 1)]);
    finish_all(&*store, "b", T0, dead("HTTP 400")).await;

    let now = T0 + SECOND; // a's lease runs until T0 + 30 s
    assert_eq!(store.replay(event_target("evt_1", None), now).await, Ok(1), "b only");
    assert!(claim(&*store, "a", now).await.is_empty(), "a is still its attempt's");
    assert_eq!(attempts(&claim(&*store, "b", now).await), [("evt_1", 1)]);
    assert_eq!(store.replay(event_target("evt_1", Some("a")), now).await, Ok(0));
    assert!(claim(&*store, "a", now).await.is_empty());

    // The attempt in flight records its own outcome.
    complete(&*store, &in_flight[0], now + SECOND, Completed::Delivered).await;
    let delivered = deliveries(&*store, Some("a"), Some(Status::Delivered)).await;
    assert_eq!(pairs(&delivered), [("evt_1", "a")]);
    assert_eq!(delivered[0].attempts, 1);

    // Done, it is replayed as any other; so is one whose lease ran out.
    assert_eq!(
        store.replay(event_target("evt_1", Some("a")), now + 2 * SECOND).await,
        Ok(1)
    );
    let again = claim(&*store, "a", now + 2 * SECOND).await;
    assert_eq!(attempts(&again), [("evt_1", 1)]);
    let expired = now + 2 * SECOND + LEASE_MS + 1;
    assert_eq!(store.replay(event_target("evt_1", None), expired).await, Ok(2));
    let replayed = claim(&*store, "a", expired).await;
    assert_eq!(attempts(&replayed), [("evt_1", 1)]);

    // The claim whose lease ran out ends late, with the same attempt number
    // as the replay's claim: it must not stand for the replay's attempt.
    complete(&*store, &again[0], expired + 1, Completed::Delivered).await;
    let pending = deliveries(&*store, Some("a"), Some(Status::Pending)).await;
    assert_eq!(
        pairs(&pending),
        [("evt_1", "a")],
        "the replay's attempt is still its own"
    );
    complete(&*store, &again[0], expired + 1, dead("late")).await;
    assert!(deliveries(&*store, Some("a"), Some(Status::Dead)).await.is_empty());
    // The replay's own claim ends it.
    let retry = Completed::Retry {
        due_at: expired + HOUR,
        error: "HTTP 503".into(),
    };
    complete(&*store, &replayed[0], expired + 2, retry).await;
    let pending = deliveries(&*store, Some("a"), Some(Status::Pending)).await;
    assert_eq!(pending[0].last_error.as_deref(), Some("HTTP 503"));
}

async fn replay_unknown_event_is_not_found(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a"])).await;

    let unknown_id = event_target("nope", None);
    assert_eq!(store.replay(unknown_id, T0).await, Err(StoreError::NotFound));
    let unknown_id_with_sink = event_target("nope", Some("a"));
    assert_eq!(store.replay(unknown_id_with_sink, T0).await, Err(StoreError::NotFound));
    let other_source = ReplayTarget::Event {
        source: "crave".into(),
        id: "evt_1".into(),
        sink: None,
    };
    assert_eq!(store.replay(other_source, T0).await, Err(StoreError::NotFound));
    assert_eq!(pairs(&deliveries(&*store, None, None).await), [("evt_1", "a")]);
}

// ---------------------------------------------------------------------------
// Retention

async fn prune_follows_retention(store: Arc<dyn Store>) {
    let retention = Retention {
        dedupe_window: Duration::from_secs(7 * 24 * 3600),
        keep_delivered: Duration::from_secs(24 * 3600),
        keep_dead_letters: Duration::from_secs(3 * 24 * 3600),
    };
    // Everything received at T0, finished at T0 + 1.
    insert(&*store, new_event("delivered", &["a"])).await;
    insert(&*store, new_event("dead", &["b"])).await;
    insert(&*store, new_event("pending", &["c"])).await;
    insert(&*store, new_event("unrouted", &[])).await;
    finish_all(&*store, "a", T0 + 1, Completed::Delivered).await;
    finish_all(&*store, "b", T0 + 1, dead("HTTP 400")).await;

    // Just before keep_delivered: nothing goes.
    let stats = store.prune(retention, T0 + 1 + DAY - 1).await.unwrap();
    assert_eq!(stats, PruneStats::default());
    assert_eq!(deliveries(&*store, None, None).await.len(), 3);

    // After keep_delivered: the delivered delivery goes, and the events with
    // no deliveries left lose their bodies but keep their dedupe keys.
    let stats = store.prune(retention, T0 + 1 + DAY + 1).await.unwrap();
    let expected = PruneStats {
        deliveries_deleted: 1,
        events_compacted: 2,
        events_deleted: 0,
        more: false,
    };
    assert_eq!(stats, expected);
    assert_eq!(
        pairs(&deliveries(&*store, None, None).await),
        [("dead", "b"), ("pending", "c")]
    );
    for id in ["delivered", "unrouted"] {
        assert_eq!(
            store.replay(event_target(id, None), T0 + 2 * DAY).await,
            Err(StoreError::Pruned)
        );
        assert_eq!(insert(&*store, new_event(id, &["a"])).await, Inserted::Duplicate);
    }

    // Dead letters stay until keep_dead_letters, then go the same way.
    let stats = store.prune(retention, T0 + 1 + 3 * DAY - 1).await.unwrap();
    assert_eq!(stats, PruneStats::default());
    assert_eq!(
        pairs(&deliveries(&*store, None, Some(Status::Dead)).await),
        [("dead", "b")]
    );
    let stats = store.prune(retention, T0 + 1 + 3 * DAY + 1).await.unwrap();
    let expected = PruneStats {
        deliveries_deleted: 1,
        events_compacted: 1,
        events_deleted: 0,
        more: false,
    };
    assert_eq!(stats, expected);
    assert!(deliveries(&*store, None, Some(Status::Dead)).await.is_empty());
    assert_eq!(
        store.replay(event_target("dead", None), T0 + 4 * DAY).await,
        Err(StoreError::Pruned)
    );

    // Dedupe keys last until the dedupe window, then go too.
    let stats = store.prune(retention, T0 + 7 * DAY - 1).await.unwrap();
    assert_eq!(stats, PruneStats::default());
    for id in ["delivered", "dead", "unrouted"] {
        assert_eq!(insert(&*store, new_event(id, &[])).await, Inserted::Duplicate, "{id}");
    }
    let stats = store.prune(retention, T0 + 7 * DAY + 1).await.unwrap();
    let expected = PruneStats {
        deliveries_deleted: 0,
        events_compacted: 0,
        events_deleted: 3,
        more: false,
    };
    assert_eq!(stats, expected);
    assert_eq!(event_ids(&events(&*store, None, None).await), ["pending"]);
    assert_eq!(
        store.replay(event_target("delivered", None), T0 + 8 * DAY).await,
        Err(StoreError::NotFound)
    );
    let later = T0 + 8 * DAY;
    for id in ["delivered", "dead", "unrouted"] {
        assert_eq!(
            insert(&*store, event_at(id, &["d"], later)).await,
            Inserted::New(vec![]),
            "{id}"
        );
    }
    assert_eq!(claim(&*store, "d", later).await.len(), 3);

    // The pending delivery outlived everything, payload intact.
    let c = claim(&*store, "c", T0 + 1000 * DAY).await;
    assert_eq!(attempts(&c), [("pending", 1)]);
    assert_same_event(&c[0].event, &new_event("pending", &[]));
}

async fn prune_never_touches_pending_deliveries(store: Arc<dyn Store>) {
    let keep_nothing = Retention {
        dedupe_window: Duration::ZERO,
        keep_delivered: Duration::ZERO,
        keep_dead_letters: Duration::ZERO,
    };
    insert(&*store, new_event("fresh", &["a"])).await;
    insert(&*store, new_event("leased", &["b"])).await;
    insert(&*store, new_event("retrying", &["c"])).await;
    claim(&*store, "b", T0).await;
    let retry = Completed::Retry {
        due_at: T0 + 900 * DAY,
        error: "HTTP 503".into(),
    };
    finish_all(&*store, "c", T0, retry).await;

    let far = T0 + 1000 * DAY;
    assert_eq!(store.prune(keep_nothing, far).await.unwrap(), PruneStats::default());
    let pending = deliveries(&*store, None, Some(Status::Pending)).await;
    assert_eq!(pairs(&pending), [("fresh", "a"), ("leased", "b"), ("retrying", "c")]);
    // The lease ran out long ago: the same attempt again.
    for (sink, id, attempt) in [("a", "fresh", 1), ("b", "leased", 1), ("c", "retrying", 2)] {
        let c = claim(&*store, sink, far).await;
        assert_eq!(attempts(&c), [(id, attempt)]);
        assert_same_event(&c[0].event, &new_event(id, &[]));
    }
}

// ---------------------------------------------------------------------------
// Ordering and concurrency

async fn claim_returns_earliest_due_first_within_limit(store: Arc<dyn Store>) {
    // New deliveries are due when received: first come, first served.
    insert(&*store, event_at("evt_30", &["a"], T0 + 30)).await;
    insert(&*store, event_at("evt_10", &["a"], T0 + 10)).await;
    insert(&*store, event_at("evt_20", &["a"], T0 + 20)).await;

    let now = T0 + 100;
    let first = store.claim("a", 2, LEASE, now).await.unwrap();
    assert_eq!(attempts(&first), [("evt_10", 1), ("evt_20", 1)]);
    let rest = store.claim("a", 2, LEASE, now).await.unwrap();
    assert_eq!(attempts(&rest), [("evt_30", 1)]);
    assert!(store.claim("a", 2, LEASE, now).await.unwrap().is_empty());

    // Retries order by their own due times.
    for (c, due_at) in [(&first[0], T0 + 250), (&first[1], T0 + 300), (&rest[0], T0 + 200)] {
        let retry = Completed::Retry {
            due_at,
            error: "HTTP 503".into(),
        };
        complete(&*store, c, now, retry).await;
    }
    let later = T0 + 1000;
    let one = store.claim("a", 1, LEASE, later).await.unwrap();
    assert_eq!(attempts(&one), [("evt_30", 2)]);
    let all = claim(&*store, "a", later).await;
    assert_eq!(attempts(&all), [("evt_10", 2), ("evt_20", 2)]);
}

/// The shipped defaults: dedupe 7 days, delivered 1, dead letters 30.
const SHIPPED_RETENTION: Retention = Retention {
    dedupe_window: Duration::from_secs(7 * 24 * 3600),
    keep_delivered: Duration::from_secs(24 * 3600),
    keep_dead_letters: Duration::from_secs(30 * 24 * 3600),
};

/// Events past the dedupe window that still have dead letters (kept longer)
/// are passed by the deletion walk, not read again on every pass; each goes
/// in the pass that prunes its last delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_event_kept_by_its_dead_letter_goes_with_it() {
    let (store, _dir) = sqlite();
    let retention = SHIPPED_RETENTION;
    insert(&*store, new_event("dead", &["b"])).await;
    insert(&*store, new_event("unrouted", &[])).await;
    // More than the walk looks at again behind where it stopped.
    for i in 0..5_000 {
        insert(&*store, new_event(&format!("later_{i}"), &[])).await;
    }
    finish_all(&*store, "b", T0 + 1, dead("HTTP 400")).await;

    let stats = store.prune(retention, T0 + 8 * DAY).await.unwrap();
    assert_eq!(stats.events_deleted, 5_001, "{stats:?}");
    assert!(!stats.more, "the walk is past both");
    assert_eq!(
        store.replay(event_target("unrouted", None), T0 + 8 * DAY).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(insert(&*store, new_event("dead", &["b"])).await, Inserted::Duplicate);
    // The first catch-up starts the day's sweep from the lowest seq again;
    // this pass makes it and leaves the walk past everything.
    store.prune(retention, T0 + 8 * DAY + 60_000).await.unwrap();

    // The dead letter goes after 30 days, and its event with it.
    let stats = store.prune(retention, T0 + 31 * DAY).await.unwrap();
    assert_eq!((stats.deliveries_deleted, stats.events_deleted), (1, 1), "{stats:?}");
    assert_eq!(insert(&*store, new_event("dead", &["b"])).await, Inserted::New(vec![]));
}

/// An event whose `received_at` is far out of seq order (the clock stepped
/// back) is passed by the deletion walk while still too young; the day's
/// sweep from the lowest seq finds it once it is old enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_daily_sweep_deletes_what_the_walk_passed() {
    let (store, _dir) = sqlite();
    let retention = SHIPPED_RETENTION;
    insert(&*store, event_at("late", &[], T0 + 10 * DAY)).await;
    for i in 0..5_000 {
        insert(&*store, new_event(&format!("early_{i}"), &[])).await;
    }
    store.prune(retention, T0 + 8 * DAY).await.unwrap();
    store.prune(retention, T0 + 8 * DAY + 60_000).await.unwrap();
    assert_eq!(
        insert(&*store, event_at("late", &[], T0 + 10 * DAY)).await,
        Inserted::Duplicate
    );
    // Old enough now: the walk is past it, and the day's sweep finds it.
    for minute in 0..3 {
        store.prune(retention, T0 + 18 * DAY + minute * 60_000).await.unwrap();
    }
    assert_eq!(
        store.replay(event_target("late", None), T0 + 18 * DAY).await,
        Err(StoreError::NotFound)
    );
}

/// SQLite only: one write the database refuses part way (a sink named twice
/// breaks the unique delivery key after the event row is in; PostgreSQL's
/// single statement skips the second instead) among many at once: it fails
/// and leaves nothing behind; every other write, in the same commit group or
/// the same open transaction, succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_failing_write_fails_alone() {
    let (store, _dir) = sqlite();
    const N: usize = 300;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let store = store.clone();
        tasks.spawn(async move {
            let id = format!("evt_{i:03}");
            let sinks: &[&str] = if i % 100 == 50 { &["a", "a"] } else { &["a"] };
            (id.clone(), store.insert(new_event(&id, sinks)).await)
        });
    }
    let mut stored = BTreeSet::new();
    let mut failed = BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (id, result) = joined.expect("insert task");
        match result {
            Ok(Inserted::New(_)) => assert!(stored.insert(id)),
            Ok(Inserted::Duplicate) => panic!("{id} was a duplicate"),
            Err(StoreError::Unavailable(_)) => assert!(failed.insert(id)),
            Err(e) => panic!("{id}: unexpected {e:?}"),
        }
    }
    assert_eq!(
        failed,
        BTreeSet::from(["evt_050".to_string(), "evt_150".into(), "evt_250".into()])
    );
    assert_eq!(stored.len(), N - 3);
    only_these_stored(&*store, &stored, "evt_050").await;
}

/// `stored` is exactly what the store holds, each with its delivery to `a`,
/// and nothing of the failed write `failed` was kept: the vendor's retry of
/// it is new.
async fn only_these_stored(store: &dyn Store, stored: &BTreeSet<String>, failed: &str) {
    let listed: BTreeSet<_> = events(store, None, None).await.into_iter().map(|e| e.id).collect();
    assert_eq!(&listed, stored);
    let claimed = claim(store, "a", T0).await;
    assert_eq!(claimed.len(), stored.len());
    assert_eq!(insert(store, new_event(failed, &["a"])).await, Inserted::New(vec![]));
}

/// SQLite only: while the syncer is at work, inserts join the open group on
/// their own tasks instead of going through the writer thread. One that
/// fails there (a sink named twice) sends its group back to the writer
/// thread, which runs it one by one: only the failing insert fails, every
/// other is stored once, and none is answered before the fsync that covers
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_inserts_join_the_open_group_during_an_fsync_and_fail_alone_there() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let (syncing, started, synced) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let store = SqliteStore::open_syncing(dir.path(), {
        let (syncing, started, synced) = (syncing.clone(), started.clone(), synced.clone());
        move |wal| {
            Box::new(move || {
                started.fetch_add(1, Ordering::SeqCst);
                syncing.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                let r = wal.sync_data();
                synced.fetch_add(1, Ordering::SeqCst);
                r
            })
        }
    })
    .unwrap();
    let store = Arc::new(store);
    // A burst of inserts while an fsync runs (one started by a first insert):
    // `evt_<i>` for i in `ids`, those in `failing` with a sink named twice.
    let burst = |ids: std::ops::Range<usize>, failing: &'static [usize]| {
        let (store, syncing, started, synced) = (store.clone(), syncing.clone(), started.clone(), synced.clone());
        async move {
            syncing.store(false, Ordering::SeqCst);
            let first = tokio::spawn({
                let store = store.clone();
                let id = format!("first_{}", ids.start);
                async move { store.insert(new_event(&id, &["a"])).await }
            });
            while !syncing.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut tasks = tokio::task::JoinSet::new();
            for i in ids {
                let (store, started, synced) = (store.clone(), started.clone(), synced.clone());
                tasks.spawn(async move {
                    let id = format!("evt_{i:03}");
                    let sinks: &[&str] = if failing.contains(&i) { &["a", "a"] } else { &["a"] };
                    // The fsync that covers it starts after it is made, so
                    // it is not one of these.
                    let before = started.load(Ordering::SeqCst);
                    let result = store.insert(new_event(&id, sinks)).await;
                    (id, result, synced.load(Ordering::SeqCst) > before)
                });
            }
            let (mut stored, mut failed) = (BTreeSet::new(), BTreeSet::new());
            while let Some(joined) = tasks.join_next().await {
                let (id, result, after_an_fsync) = joined.expect("insert task");
                match result {
                    Ok(Inserted::New(_)) => {
                        assert!(after_an_fsync, "{id} was answered before an fsync covered it");
                        assert!(stored.insert(id));
                    }
                    Err(StoreError::Unavailable(_)) => assert!(failed.insert(id)),
                    other => panic!("{id}: unexpected {other:?}"),
                }
            }
            assert_eq!(first.await.unwrap().unwrap(), Inserted::New(vec![]));
            (stored, failed)
        }
    };
    const N: usize = 100;
    let (mut stored, failed) = burst(0..N, &[]).await;
    assert!(failed.is_empty(), "{failed:?}");
    let (joins, failed_joins) = store.joins();
    assert!(
        joins > N as u64 / 2,
        "only {joins} of {N} inserts joined a group directly"
    );
    assert_eq!(failed_joins, 0);

    let (more, failed) = burst(N..2 * N, &[110, 160]).await;
    let (_, failed_joins) = store.joins();
    assert!(failed_joins >= 1, "no insert failed where it joined");
    assert_eq!(failed, BTreeSet::from(["evt_110".to_string(), "evt_160".into()]));
    assert_eq!(more.len(), N - 2);
    stored.extend(more);
    stored.extend(["first_0".to_string(), format!("first_{N}")]);
    only_these_stored(&*store, &stored, "evt_110").await;
}

/// SQLite only: an insert that would join the open group while another
/// process holds the database locked does not wait for that lock on the
/// async task that makes it (a runtime thread would stall for up to the
/// busy limit): it goes to the writer thread, which waits, and is stored
/// once the lock is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_joining_insert_never_waits_for_a_lock_on_its_task() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let syncing = Arc::new(AtomicBool::new(false));
    let store = SqliteStore::open_syncing(dir.path(), {
        let syncing = syncing.clone();
        move |wal| {
            Box::new(move || {
                syncing.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                wal.sync_data()
            })
        }
    })
    .unwrap();
    let store = Arc::new(store);
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.insert(new_event("first", &["a"])).await }
    });
    while !syncing.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The first group is committed and being synced; no transaction is open.
    let other = rusqlite::Connection::open(dir.path().join("expeditor.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let insert = store.insert(new_event("second", &["a"]));
    let mut insert = std::pin::pin!(insert);
    let started = Instant::now();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        std::future::Future::poll(insert.as_mut(), &mut cx).is_pending(),
        "stored while the database was locked"
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "the insert's task waited {:?} for the lock",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(insert.await.unwrap(), Inserted::New(vec![]));
    assert_eq!(first.await.unwrap().unwrap(), Inserted::New(vec![]));
    assert_eq!(store.joins(), (0, 0), "nothing joined while the lock was held");
}

async fn concurrent_inserts_are_all_stored(store: Arc<dyn Store>) {
    const N: usize = 500;
    // Each event twice, from different tasks, all at once: the copies land in
    // the same commit groups and exactly one of each pair is new.
    let mut tasks = tokio::task::JoinSet::new();
    for copy in 0..2 {
        for i in 0..N {
            let store = store.clone();
            tasks.spawn(async move {
                let id = format!("evt_{i:03}");
                (copy, id.clone(), store.insert(new_event(&id, &["a", "b"])).await)
            });
        }
    }
    let mut new = BTreeSet::new();
    let mut duplicates = 0;
    while let Some(joined) = tasks.join_next().await {
        let (_, id, result) = joined.expect("insert task");
        match result.expect("insert") {
            Inserted::New(_) => assert!(new.insert(id.clone()), "{id} was new twice"),
            Inserted::Duplicate => duplicates += 1,
        }
    }
    assert_eq!(new.len(), N);
    assert_eq!(duplicates, N);

    for sink in ["a", "b"] {
        let claimed = claim(&*store, sink, T0).await;
        let ids: BTreeSet<_> = claimed.iter().map(|c| c.event.event_id.clone()).collect();
        assert_eq!(claimed.len(), N, "sink {sink}");
        assert_eq!(ids, new, "sink {sink}");
        assert!(claimed.iter().all(|c| c.attempt == 1));
    }
    assert_eq!(events(&*store, None, None).await.len(), N);
}

// ---------------------------------------------------------------------------
// Listings

async fn events_filters_and_fields(store: Arc<dyn Store>) {
    let typed = |source: &str, kind: &str, id: &str, event_type: &str, sinks_: &[&str], at: i64| NewEvent {
        source: source.into(),
        kind: kind.into(),
        event_type: event_type.into(),
        ..event_at(id, sinks_, at)
    };
    let e1 = typed("crumb", "crumbpos", "evt_1", "order.created", &["a", "b"], T0);
    insert(&*store, e1.clone()).await;
    insert(
        &*store,
        typed("crumb", "crumbpos", "evt_2", "payment.completed", &["a"], T0 + 1),
    )
    .await;
    let e3 = NewEvent {
        occurred_at: None,
        ..typed("crave", "crave", "evt_3", "order.created", &[], T0 + 2)
    };
    insert(&*store, e3).await;
    insert(&*store, typed("crave", "crave", "evt_4", "order.ready", &["b"], T0 + 3)).await;

    assert_eq!(
        event_ids(&events(&*store, None, None).await),
        ["evt_1", "evt_2", "evt_3", "evt_4"]
    );
    assert_eq!(
        event_ids(&events(&*store, Some("crumb"), None).await),
        ["evt_1", "evt_2"]
    );
    assert_eq!(
        event_ids(&events(&*store, None, Some("order.created")).await),
        ["evt_1", "evt_3"]
    );
    assert_eq!(
        event_ids(&events(&*store, Some("crave"), Some("order.created")).await),
        ["evt_3"]
    );
    assert!(events(&*store, Some("nope"), None).await.is_empty());
    assert!(events(&*store, None, Some("order.*")).await.is_empty());

    // The limit keeps the newest.
    let newest = store
        .events(EventFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<_> = newest.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["evt_4", "evt_3"]);

    let a = claim(&*store, "a", T0 + 10).await;
    let evt_1 = a.iter().find(|c| c.event.event_id == "evt_1").unwrap();
    complete(&*store, evt_1, T0 + 20, Completed::Delivered).await;

    let listed = events(&*store, None, None).await;
    let one = listed.iter().find(|e| e.id == "evt_1").unwrap();
    assert_eq!(one.source, e1.source);
    assert_eq!(one.event_type, e1.event_type);
    assert_eq!(one.occurred_at, e1.occurred_at);
    assert_eq!(one.received_at, e1.received_at);
    let mut ds: Vec<_> = one
        .deliveries
        .iter()
        .map(|d| (d.sink.as_str(), d.status, d.attempts))
        .collect();
    ds.sort_unstable_by_key(|d| d.0);
    assert_eq!(ds, [("a", Status::Delivered, 1), ("b", Status::Pending, 0)]);
    let two = listed.iter().find(|e| e.id == "evt_2").unwrap();
    let ds: Vec<_> = two
        .deliveries
        .iter()
        .map(|d| (d.sink.as_str(), d.status, d.attempts))
        .collect();
    assert_eq!(ds, [("a", Status::Pending, 1)], "claimed, not finished");
    let three = listed.iter().find(|e| e.id == "evt_3").unwrap();
    assert_eq!(three.source, "crave");
    assert_eq!(three.occurred_at, None);
    assert!(three.deliveries.is_empty());
}

async fn deliveries_filters_and_fields(store: Arc<dyn Store>) {
    let e2 = NewEvent {
        event_type: "payment.completed".into(),
        ..event_at("evt_2", &["a"], T0 + 1)
    };
    insert(&*store, new_event("evt_1", &["a", "b"])).await;
    insert(&*store, e2).await;
    let a = claim(&*store, "a", T0 + 10).await;
    assert_eq!(attempts(&a), [("evt_1", 1), ("evt_2", 1)]);
    let retry = Completed::Retry {
        due_at: T0 + HOUR,
        error: "HTTP 503".into(),
    };
    complete(&*store, &a[0], T0 + 20, retry).await;
    complete(&*store, &a[1], T0 + 21, dead("HTTP 400: bad ticket")).await;

    // Filters.
    let filtered = async |sink: Option<&str>, status: Option<Status>| deliveries(&*store, sink, status).await;
    assert_eq!(
        pairs(&filtered(None, None).await),
        [("evt_1", "a"), ("evt_1", "b"), ("evt_2", "a")]
    );
    assert_eq!(
        pairs(&filtered(Some("a"), None).await),
        [("evt_1", "a"), ("evt_2", "a")]
    );
    assert_eq!(pairs(&filtered(Some("b"), None).await), [("evt_1", "b")]);
    assert_eq!(pairs(&filtered(Some("zzz"), None).await), []);
    assert_eq!(
        pairs(&filtered(None, Some(Status::Pending)).await),
        [("evt_1", "a"), ("evt_1", "b")]
    );
    assert_eq!(pairs(&filtered(None, Some(Status::Dead)).await), [("evt_2", "a")]);
    assert_eq!(pairs(&filtered(None, Some(Status::Delivered)).await), []);
    assert_eq!(
        pairs(&filtered(Some("a"), Some(Status::Pending)).await),
        [("evt_1", "a")]
    );
    for limit in [1, 2] {
        let limited = store
            .deliveries(DeliveryFilter {
                limit,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(limited.len(), limit);
    }

    // Fields.
    let rows = deliveries(&*store, None, None).await;
    let row = |id: &str, sink: &str| {
        rows.iter()
            .find(|r| r.event_id == id && r.sink == sink)
            .unwrap()
            .clone()
    };
    let keys: BTreeSet<_> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 3, "keys are distinct per (event, sink)");

    let fresh = row("evt_1", "b");
    assert_eq!(fresh.key, expeditor_api::delivery_key("crumb", "evt_1", "b"));
    assert_eq!(fresh.source, "crumb");
    assert_eq!(fresh.event_type, "order.created");
    assert_eq!(fresh.status, Status::Pending);
    assert_eq!(fresh.attempts, 0);
    assert_eq!(fresh.next_attempt_at, Some(T0), "due when received");
    assert_eq!(fresh.last_error, None);

    let retrying = row("evt_1", "a");
    assert_eq!(retrying.id, a[0].delivery_id);
    assert_eq!(retrying.key, expeditor_api::delivery_key("crumb", "evt_1", "a"));
    assert_eq!(retrying.status, Status::Pending);
    assert_eq!(retrying.attempts, 1);
    assert_eq!(retrying.next_attempt_at, Some(T0 + HOUR));
    assert_eq!(retrying.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(retrying.updated_at, T0 + 20);

    let dead_letter = row("evt_2", "a");
    assert_eq!(dead_letter.id, a[1].delivery_id);
    assert_eq!(dead_letter.key, expeditor_api::delivery_key("crumb", "evt_2", "a"));
    assert_eq!(dead_letter.event_type, "payment.completed");
    assert_eq!(dead_letter.status, Status::Dead);
    assert_eq!(dead_letter.attempts, 1);
    assert_eq!(dead_letter.next_attempt_at, None);
    assert_eq!(dead_letter.last_error.as_deref(), Some("HTTP 400: bad ticket"));
    assert_eq!(dead_letter.updated_at, T0 + 21);

    // Delivered on the second attempt.
    let again = claim(&*store, "a", T0 + HOUR).await;
    assert_eq!(attempts(&again), [("evt_1", 2)]);
    complete(&*store, &again[0], T0 + HOUR + 5, Completed::Delivered).await;
    let rows = deliveries(&*store, Some("a"), Some(Status::Delivered)).await;
    assert_eq!(pairs(&rows), [("evt_1", "a")]);
    assert_eq!(rows[0].key, retrying.key);
    assert_eq!(rows[0].attempts, 2);
    assert_eq!(rows[0].next_attempt_at, None);
    assert_eq!(rows[0].updated_at, T0 + HOUR + 5);
}

// ---------------------------------------------------------------------------
// SQLite only

/// SQLite only: this store serves one process, so whatever was claimed when
/// it stopped was not finished and `open` releases those leases at once. A
/// shared store (PostgreSQL) must not do that (another live instance may hold
/// them); there, leases simply run out, which the lease test covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_reopen_keeps_everything_and_releases_leases() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let e1 = new_event("evt_1", &["a", "b"]);
    insert(&*store, e1.clone()).await;
    insert(&*store, event_at("evt_2", &["a"], T0 + 1)).await;
    insert(&*store, new_event("evt_3", &[])).await;
    let leased = store.claim("a", 1, LEASE, T0 + 10).await.unwrap();
    assert_eq!(attempts(&leased), [("evt_1", 1)]);
    assert_eq!(finish_all(&*store, "b", T0 + 10, Completed::Delivered).await, 1);
    drop(store); // no close(): an acknowledged write is already on disk

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    assert_eq!(
        event_ids(&events(&*store, None, None).await),
        ["evt_1", "evt_2", "evt_3"]
    );
    assert_eq!(insert(&*store, e1.clone()).await, Inserted::Duplicate);
    assert_eq!(
        pairs(&deliveries(&*store, None, Some(Status::Delivered)).await),
        [("evt_1", "b")]
    );
    // Well within evt_1's lease, yet claimable: the lease died with the
    // process, and so did its attempt, unrecorded: it runs again as attempt
    // 1, so a crash loop does not use up the attempts of what was claimed.
    let a = claim(&*store, "a", T0 + 11).await;
    assert_eq!(attempts(&a), [("evt_1", 1), ("evt_2", 1)]);
    assert_eq!(a[0].delivery_id, leased[0].delivery_id);
    assert_same_event(&a[0].event, &e1);
    assert!(claim(&*store, "b", T0 + 11).await.is_empty());
}

/// SQLite only: the checkpointer thread copies commits from the WAL into the
/// database file soon after they are made (commits themselves never
/// checkpoint, so no ack waits for one; SQLite's own automatic checkpoint
/// would not have run at all for this little WAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_commits_are_checkpointed_in_the_background() {
    let (store, dir) = sqlite();
    let db = dir.path().join("expeditor.db");
    let before = std::fs::metadata(&db).unwrap().len();
    let body = Bytes::from(vec![b'x'; 2000]);
    for i in 0..200 {
        let event = NewEvent {
            body: body.clone(),
            ..new_event(&format!("evt_{i}"), &["a"])
        };
        insert(&*store, event).await;
    }
    // 200 bodies of 2 kB: at least 400 kB of pages have to reach the file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = std::fs::metadata(&db).unwrap().len();
        if now >= before + 400_000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {now} bytes: nothing was checkpointed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each passive checkpoint is timed for /metrics (just after it returns,
    // so perhaps a moment after the file grew); this small WAL was never
    // long enough to restart.
    let durability = store.durability().expect("SQLite checkpoints itself");
    while checkpoints(&durability, "passive") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no passive checkpoint in /metrics"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(checkpoints(&durability, "restart"), 0);
    store.close().await;
}

/// How many checkpoints of `mode` the store timed, as `/metrics` shows them.
fn checkpoints(durability: &Durability, mode: &str) -> u64 {
    let mut metrics = crate::metrics::Metrics::new();
    metrics.register_durability(durability.clone());
    let text = metrics.render(Some(&[]), &[], &[], 0);
    let series = format!("expeditor_store_checkpoint_duration_seconds_count{{mode=\"{mode}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
        .unwrap_or(0)
}

/// SQLite only: once the WAL passes its restart length, the checkpointer
/// restarts it, so it is written again from its start instead of growing
/// with every commit, even while writes never pause (then SQLite would never
/// restart it by itself: a passive checkpoint cannot catch up with a writer
/// that always has a transaction open). Each restart is timed for /metrics.
/// (The store restarts past 16,384 frames; this one past 64, about 256 kB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_wal_is_restarted_once_long() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_restarting(dir.path(), 64).unwrap());
    let wal = dir.path().join("expeditor.db-wal");
    let durability = store.durability().unwrap();
    // Eight writers without a pause until ten restarts (or 20 s).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let body = Bytes::from(vec![b'x'; 2000]);
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let event = NewEvent {
                        body: body.clone(),
                        ..new_event(&format!("evt_{w}_{n}"), &[])
                    };
                    insert(&*store, event).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut largest = 0;
    while checkpoints(&durability, "restart") < 10 && std::time::Instant::now() < deadline {
        largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut per_writer = Vec::new();
    for w in writers {
        per_writer.push(w.await.unwrap());
    }
    let inserted: usize = per_writer.iter().sum();
    assert!(
        checkpoints(&durability, "restart") >= 10,
        "fewer than 10 restarts in 20 s"
    );
    // The WAL takes ~6 kB per event here (pages, not bytes, with eight
    // events a commit): grown, it would be about three times the bodies
    // written; restarted at about every checkpoint (~25 ms), it is about a
    // tenth of that.
    let written = inserted as u64 * 2000;
    assert!(
        largest < written,
        "WAL grew to {largest} bytes for {inserted} events ({written} bytes of bodies)"
    );
    // Each writer's first event (checkpointed into the database file
    // before the WAL was written over) and last are still there.
    for (w, &n) in per_writer.iter().enumerate() {
        assert!(n > 0, "writer {w} inserted nothing");
        for id in [format!("evt_{w}_0"), format!("evt_{w}_{}", n - 1)] {
            let again = NewEvent {
                body: Bytes::from_static(b"{}"),
                ..new_event(&id, &[])
            };
            assert_eq!(insert(&*store, again).await, Inserted::Duplicate, "{id}");
        }
    }
    store.close().await;
}

/// SQLite only: it locks the database file from a second connection. Waits
/// out the writer's 5 s busy timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_insert_is_unavailable_while_the_database_is_locked() {
    let (store, dir) = sqlite();
    assert_eq!(
        insert(&*store, new_event("before", &["a"])).await,
        Inserted::New(vec![])
    );

    let other = rusqlite::Connection::open(dir.path().join("expeditor.db")).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let blocked = new_event("blocked", &["a"]);
    match store.insert(blocked.clone()).await {
        Err(StoreError::Unavailable(_)) => {}
        result => panic!("expected Unavailable while locked, got {result:?}"),
    }
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);

    assert_eq!(insert(&*store, new_event("after", &["a"])).await, Inserted::New(vec![]));
    assert_eq!(event_ids(&events(&*store, None, None).await), ["after", "before"]);
    let a = claim(&*store, "a", T0).await;
    assert_eq!(sorted(attempts(&a)), [("after", 1), ("before", 1)]);
    // Not stored, so the vendor's retry of it is new, not a duplicate.
    assert_eq!(insert(&*store, blocked).await, Inserted::New(vec![]));
}

/// SQLite only: while another process holds the database locked, a write
/// waits about five seconds and is refused; writes that queued behind that
/// wait are refused with it, not after a wait of their own each (a webhook
/// client would time out on the sum).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_writes_queued_behind_a_lock_wait_are_refused_with_it() {
    use std::time::Instant;
    let (store, dir) = sqlite();
    let other = rusqlite::Connection::open(dir.path().join("expeditor.db")).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let started = Instant::now();
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.insert(new_event("first", &["a"])).await }
    });
    // Well inside the first one's wait: it queues behind it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = store.insert(new_event("second", &["a"])).await;
    let second_after = started.elapsed();
    assert!(matches!(second, Err(StoreError::Unavailable(_))), "second: {second:?}");
    let first = first.await.unwrap();
    assert!(matches!(first, Err(StoreError::Unavailable(_))), "first: {first:?}");
    assert!(
        second_after >= Duration::from_secs(4),
        "refused after {second_after:?}: the lock was not waited for"
    );
    assert!(
        second_after < Duration::from_secs(8),
        "refused after {second_after:?}: it waited a second time"
    );
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    assert_eq!(
        insert(&*store, new_event("second", &["a"])).await,
        Inserted::New(vec![])
    );
}

/// Runs `load` (which returns how many events it inserted) on a store whose
/// WAL fsyncs, paced `interval` apart and each taking at least `fsync_takes`,
/// are recorded: when each started, and how many operations were durable by
/// then (the last entry is the end). Checks that every insert was made
/// durable and counted, and that a reopened store holds them all.
async fn record_fsyncs<F, Fut>(interval: Duration, fsync_takes: Duration, load: F) -> Vec<(std::time::Instant, u64)>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    use std::sync::{Mutex, OnceLock};
    let dir = tempfile::tempdir().unwrap();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let durability = Arc::new(OnceLock::<crate::store::Durability>::new());
    let store = SqliteStore::open_paced(dir.path(), interval, {
        let (starts, durability) = (starts.clone(), durability.clone());
        move |wal| {
            Box::new(move || {
                let durable = durability.get().map_or(0, |d| d.operations.get());
                starts.lock().unwrap().push((std::time::Instant::now(), durable));
                std::thread::sleep(fsync_takes);
                wal.sync_data()
            })
        }
    })
    .unwrap();
    let _ = durability.set(store.durability().unwrap());
    let store: Arc<dyn Store> = Arc::new(store);
    let total = load(store.clone()).await;
    // Every insert was made durable by one of those fsyncs, and counted so.
    assert_eq!(store.durability().unwrap().operations.get(), total);
    let mut starts = starts.lock().unwrap().clone();
    starts.push((std::time::Instant::now(), total));
    drop(store);
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    assert_eq!(events(&*store, None, None).await.len() as u64, total);
    starts
}

/// `writers` concurrent writers, each inserting `each` events one after
/// another (a closed loop: a writer waits for its ack before the next).
async fn closed_loop(store: Arc<dyn Store>, writers: usize, each: usize) -> u64 {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            for e in 0..each {
                let id = format!("w{w}-e{e}");
                assert_eq!(insert(&*store, new_event(&id, &["a"])).await, Inserted::New(vec![]));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    (writers * each) as u64
}

/// Long enough that an fsync (even on a loaded CI disk) never takes it: an
/// fsync that starts sooner after the last was not paced.
const TEST_INTERVAL: Duration = Duration::from_millis(20);
/// The syncer measures from just before it calls the hook; allow for the gap
/// between its clock reading and the hook's.
const LEAST_APART: Duration = Duration::from_micros(19_900);

/// SQLite only: under a load lighter than a full group, fsyncs start at least
/// their interval (`MIN_SYNC_INTERVAL`) apart, so each covers what the
/// writers sent meanwhile instead of one event; each is acknowledged only
/// after the fsync that covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_fsyncs_start_at_least_the_interval_apart() {
    // Fewer writers than a full group: never that many writes wait.
    let writers = super::sqlite::FULL_GROUP - 2;
    let starts = record_fsyncs(TEST_INTERVAL, Duration::ZERO, |store| closed_loop(store, writers, 8)).await;
    let fsyncs = starts.len() - 1;
    assert!(fsyncs >= 2, "{fsyncs} fsyncs");
    assert!(fsyncs < writers * 8, "an fsync per event: {fsyncs}");
    for pair in starts[..fsyncs].windows(2) {
        let apart = pair[1].0 - pair[0].0;
        assert!(
            apart >= LEAST_APART,
            "fsyncs {apart:?} apart; expected at least {LEAST_APART:?}"
        );
    }
}

/// SQLite only: under heavy load a group that has gathered `FULL_GROUP`
/// writes while the last fsync ran does not wait out the interval: fsyncs
/// then come sooner than the interval apart, and each that does covers a
/// full group.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_full_group_does_not_wait_for_the_interval() {
    // Events keep arriving in bursts (an open loop: 50 about every
    // millisecond, for 40 bursts) while each fsync takes 5 ms, so a full
    // group gathers during most of them. On a machine busy with other tests
    // the first few bursts may come late, so a full group first finds the
    // syncer asleep; the load lasts long enough that later ones do not.
    let arrivals = |store: Arc<dyn Store>| async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..2000 {
            let store = store.clone();
            tasks.spawn(async move {
                let id = format!("e{i}");
                assert_eq!(insert(&*store, new_event(&id, &["a"])).await, Inserted::New(vec![]));
            });
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        2000
    };
    let starts = record_fsyncs(TEST_INTERVAL, Duration::from_millis(5), arrivals).await;
    let fsyncs = starts.len() - 1;
    let mut early = 0;
    // starts[i].1 is what was durable when fsync i began, so fsync i covered
    // starts[i + 1].1 - starts[i].1 operations.
    for i in 1..fsyncs {
        let apart = starts[i].0 - starts[i - 1].0;
        let group = starts[i + 1].1 - starts[i].1;
        if apart < LEAST_APART {
            early += 1;
            assert!(
                group >= super::sqlite::FULL_GROUP as u64,
                "an fsync {apart:?} after the last covered {group} writes"
            );
        }
    }
    assert!(early > 0, "no fsync of {fsyncs} came sooner than the interval");
}

/// SQLite only: the disk fails an fsync of the WAL (injected where the syncer
/// calls `sync_data`). The write waiting for it is not acknowledged, and every
/// write after it is refused too, even once the disk works again: the page
/// cache can no longer be trusted, so the store says so (503 and a failing
/// `/readyz` upstream) until expeditor is restarted. Reopened, the store holds
/// everything that was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_failed_fsync_refuses_every_write_until_reopened() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let store = SqliteStore::open_syncing(dir.path(), {
        let failing = failing.clone();
        move |wal| {
            Box::new(move || {
                if failing.load(Ordering::SeqCst) {
                    Err(std::io::Error::other("Input/output error (injected)"))
                } else {
                    wal.sync_data()
                }
            })
        }
    })
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    assert_eq!(
        insert(&*store, new_event("before", &["a"])).await,
        Inserted::New(vec![])
    );
    // `/metrics` counts the fsync and the write it made durable.
    let durability = store.durability().expect("SQLite syncs its own log");
    let synced = durability.operations.get();
    assert!(synced >= 1, "{synced} writes synced");

    failing.store(true, Ordering::SeqCst);
    let refused = |r: Result<(), StoreError>| match r {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains("disk failed to sync"), "{m}");
            assert!(
                !m.contains("injected"),
                "the OS error goes to the log, not to clients: {m}"
            );
        }
        other => panic!("expected the disk failure, got {other:?}"),
    };
    refused(store.insert(new_event("unsynced", &["a"])).await.map(drop));

    failing.store(false, Ordering::SeqCst); // the disk answers again; the store does not trust it
    refused(store.insert(new_event("after", &["a"])).await.map(drop));
    refused(store.ping().await);
    refused(store.alive().await);
    refused(store.writable().await);
    refused(store.claim("a", ALL, LEASE, T0).await.map(drop));
    refused(store.replay(event_target("before", None), T0).await.map(drop));
    // Reads still answer (the listings help whoever investigates).
    assert!(event_ids(&events(&*store, None, None).await).contains(&"before"));
    // A write the disk did not sync is not counted as durable.
    assert_eq!(durability.operations.get(), synced);
    drop(store);

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let listed = events(&*store, None, None).await;
    let ids = event_ids(&listed);
    assert!(ids.contains(&"before"), "{ids:?}");
    assert!(!ids.contains(&"after"), "{ids:?}");
    // The unacknowledged one may or may not have reached the disk; the
    // vendor's retry of it is taken either way, never refused or lost.
    assert!(store.insert(new_event("unsynced", &["a"])).await.is_ok());
    assert!(store.ping().await.is_ok());
    store.close().await;
}

/// SQLite only: `writable` commits a page (so a full disk fails it), where
/// `ping`'s empty transaction writes nothing; another connection's
/// `data_version` tells whether anything was committed.
#[tokio::test]
async fn sqlite_writable_commits_a_page_and_ping_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let other = rusqlite::Connection::open(dir.path().join("expeditor.db")).unwrap();
    let version = || -> i64 { other.query_row("PRAGMA data_version", [], |r| r.get(0)).unwrap() };
    let before = version();
    store.ping().await.unwrap();
    assert_eq!(version(), before, "an empty transaction commits nothing");
    store.writable().await.unwrap();
    let after = version();
    assert_ne!(after, before, "the probe committed a write");
    // And changed nothing: the schema version is what it was.
    let schema: i64 = other.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(schema, super::sqlite::SCHEMA_VERSION);
    store.close().await;
}

/// SQLite only: a lock held by another connection for less than the writer's
/// busy timeout (5 s) is waited out by every kind of write, not only by
/// inserts. Holds the lock for a moment, the one other wait in this suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_briefly_held_lock_is_waited_out() {
    let (store, dir) = sqlite();
    insert(&*store, new_event("evt_1", &["a"])).await;
    finish_all(&*store, "a", T0, dead("HTTP 400")).await;
    insert(&*store, new_event("evt_2", &["a"])).await;

    let other = rusqlite::Connection::open(dir.path().join("expeditor.db")).unwrap();
    let hold = |other: rusqlite::Connection| {
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            other.execute_batch("COMMIT").unwrap();
            other
        })
    };

    let holder = hold(other);
    let claimed = store.claim("a", ALL, LEASE, T0).await;
    let other = holder.join().unwrap();
    assert_eq!(attempts(&claimed.expect("claim")), [("evt_2", 1)]);

    let holder = hold(other);
    let replayed = store.replay(event_target("evt_1", Some("b")), T0).await;
    let other = holder.join().unwrap();
    assert_eq!(replayed, Ok(1));

    let holder = hold(other);
    let inserted = store.insert(new_event("evt_3", &["a"])).await;
    holder.join().unwrap();
    assert_eq!(inserted, Ok(Inserted::New(vec![])));
}

// ---------------------------------------------------------------------------
// Listings, replay filters, detail, stats (operations: issue 5)

fn crave_event(id: &str, sinks_: &[&str], event_type: &str, at: i64) -> NewEvent {
    NewEvent {
        source: "crave".into(),
        kind: "crave".into(),
        event_type: event_type.into(),
        ..event_at(id, sinks_, at)
    }
}

async fn deliveries_filter_by_source_type_and_since(store: Arc<dyn Store>) {
    insert(&*store, event_at("evt_old", &["a"], T0)).await;
    insert(&*store, crave_event("evt_crave", &["a"], "order.ready", T0 + HOUR)).await;
    insert(&*store, event_at("evt_new", &["a"], T0 + HOUR)).await;
    let list = |f: DeliveryFilter| {
        let store = store.clone();
        async move {
            let rows = store.deliveries(DeliveryFilter { limit: ALL, ..f }).await.unwrap();
            sorted(rows.into_iter().map(|r| r.event_id).collect::<Vec<_>>())
        }
    };
    assert_eq!(
        list(DeliveryFilter {
            source: Some("crave".into()),
            ..Default::default()
        })
        .await,
        ["evt_crave"]
    );
    assert_eq!(
        list(DeliveryFilter {
            event_type: Some("order.created".into()),
            ..Default::default()
        })
        .await,
        ["evt_new", "evt_old"]
    );
    assert_eq!(
        list(DeliveryFilter {
            since: Some(T0 + HOUR),
            ..Default::default()
        })
        .await,
        ["evt_crave", "evt_new"]
    );
    let events = store
        .events(EventFilter {
            since: Some(T0 + 1),
            limit: ALL,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sorted(event_ids(&events)), ["evt_crave", "evt_new"]);
}

/// Paging by `before` lists every row once, in the order of one whole
/// listing, though many rows share an `updated_at` (one commit wrote them).
async fn listings_page_by_cursor_through_ties(store: Arc<dyn Store>) {
    for i in 0..7 {
        insert(&*store, event_at(&format!("evt_p{i}"), &["a", "b"], T0)).await;
    }
    let whole = store
        .deliveries(DeliveryFilter {
            limit: ALL,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(whole.len(), 14);
    assert!(
        whole.windows(2).any(|w| w[0].updated_at == w[1].updated_at),
        "ties to page through"
    );
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .deliveries(DeliveryFilter {
                before,
                limit: 3,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        before = Some((last.updated_at, last.id));
        paged.extend(page.iter().map(|r| r.id));
        assert!(paged.len() <= whole.len(), "pages repeat rows: {paged:?}");
    }
    assert_eq!(paged, whole.iter().map(|r| r.id).collect::<Vec<_>>());

    let whole = events(&*store, None, None).await;
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .events(EventFilter {
                before,
                limit: 2,
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        before = Some(last.seq);
        paged.extend(page.into_iter().map(|e| e.id));
        assert!(paged.len() <= whole.len(), "pages repeat events: {paged:?}");
    }
    assert_eq!(paged, whole.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
    assert_eq!(paged.len(), 7);
}

async fn replay_dead_letters_by_source_type_and_since(store: Arc<dyn Store>) {
    insert(&*store, event_at("evt_1", &["a"], T0)).await;
    insert(&*store, crave_event("evt_2", &["a"], "order.ready", T0)).await;
    insert(&*store, crave_event("evt_3", &["a"], "order.created", T0)).await;
    for c in claim(&*store, "a", T0).await {
        let at = if c.event.event_id == "evt_3" { T0 + HOUR } else { T0 };
        complete(&*store, &c, at, dead("HTTP 400")).await;
    }
    let target = |source: Option<&str>, event_type: Option<&str>, since: Option<i64>| ReplayTarget::DeadLetters {
        sink: None,
        source: source.map(Into::into),
        event_type: event_type.map(Into::into),
        since,
    };
    let now = T0 + 2 * HOUR;
    assert_eq!(
        store
            .replay(target(Some("crave"), Some("order.ready"), None), now)
            .await,
        Ok(1)
    );
    assert_eq!(store.replay(target(None, None, Some(T0 + HOUR)), now).await, Ok(1));
    let pending = deliveries(&*store, None, Some(Status::Pending)).await;
    assert_eq!(pairs(&pending), [("evt_2", "a"), ("evt_3", "a")]);
    assert_eq!(
        pairs(&deliveries(&*store, None, Some(Status::Dead)).await),
        [("evt_1", "a")]
    );
}

async fn event_detail_has_payload_deliveries_and_attempt_log(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a", "b"])).await;
    let c = claim(&*store, "a", T0).await.remove(0);
    complete(
        &*store,
        &c,
        T0 + SECOND,
        Completed::Retry {
            due_at: T0 + 2 * SECOND,
            error: "HTTP 503".into(),
        },
    )
    .await;
    let c = claim(&*store, "a", T0 + 2 * SECOND).await.remove(0);
    complete(&*store, &c, T0 + 3 * SECOND, Completed::Delivered).await;

    let d = store.event_detail("crumb", "evt_1").await.unwrap();
    assert_eq!(
        (d.source.as_str(), d.id.as_str(), d.kind.as_str()),
        ("crumb", "evt_1", "crumbpos")
    );
    assert_eq!(d.payload.as_deref(), Some(r#"{"id":"evt_1","type":"order.created"}"#));
    assert_eq!(d.deliveries.len(), 2);
    let a = d.deliveries.iter().find(|x| x.delivery.sink == "a").unwrap();
    assert_eq!(a.delivery.status, Status::Delivered);
    let log: Vec<_> = a
        .attempt_log
        .iter()
        .map(|l| (l.attempt, l.outcome.as_str(), l.error.as_deref()))
        .collect();
    assert_eq!(log, [(1, "retry", Some("HTTP 503")), (2, "delivered", None)]);
    let b = d.deliveries.iter().find(|x| x.delivery.sink == "b").unwrap();
    assert_eq!((b.delivery.status, b.attempt_log.len()), (Status::Pending, 0));
    assert_eq!(
        store.event_detail("crumb", "nope").await.unwrap_err(),
        StoreError::NotFound
    );
}

async fn queue_stats_count_pending_and_dead_per_sink(store: Arc<dyn Store>) {
    assert_eq!(store.queue_stats().await.unwrap(), []);
    insert(&*store, event_at("evt_1", &["a", "b"], T0)).await;
    insert(&*store, event_at("evt_2", &["a"], T0 + HOUR)).await;
    insert(&*store, event_at("evt_3", &["c"], T0)).await;
    finish_all(&*store, "c", T0, dead("HTTP 400")).await;
    // A sink with both: one line, both counts.
    insert(&*store, event_at("evt_4", &["c"], T0 + HOUR)).await;
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(
        stats,
        [
            SinkQueue {
                sink: "a".into(),
                pending: 2,
                dead: 0,
                oldest_pending_received_at: Some(T0)
            },
            SinkQueue {
                sink: "b".into(),
                pending: 1,
                dead: 0,
                oldest_pending_received_at: Some(T0)
            },
            SinkQueue {
                sink: "c".into(),
                pending: 1,
                dead: 1,
                oldest_pending_received_at: Some(T0 + HOUR)
            },
        ]
    );
}

async fn ping_and_writable_succeed_on_a_working_store(store: Arc<dyn Store>) {
    assert_eq!(store.ping().await, Ok(()));
    assert_eq!(store.writable().await, Ok(()));
}

async fn a_stale_completion_does_not_overwrite_a_newer_attempt(store: Arc<dyn Store>) {
    insert(&*store, new_event("evt_1", &["a"])).await;
    let first = claim(&*store, "a", T0).await.remove(0);
    // The lease runs out; another worker claims and delivers, as the same
    // attempt (the first never recorded how it went) under its own lease.
    let second = claim(&*store, "a", T0 + LEASE_MS + 1).await.remove(0);
    assert_eq!(second.attempt, 1);
    assert_ne!(second.lease_until, first.lease_until);
    complete(&*store, &second, T0 + LEASE_MS + 2, Completed::Delivered).await;
    // The first worker finally reports a failure: it must change nothing.
    complete(&*store, &first, T0 + LEASE_MS + 3, dead("late")).await;
    let rows = deliveries(&*store, None, None).await;
    assert_eq!(
        (rows[0].status, rows[0].attempts, rows[0].last_error.as_deref()),
        (Status::Delivered, 1, None)
    );
    let log = &store.event_detail("crumb", "evt_1").await.unwrap().deliveries[0].attempt_log;
    assert_eq!(log.len(), 1, "the stale completion is not logged either");
}

// ---------------------------------------------------------------------------
// PostgreSQL only

/// Two instances on one database share the dedupe table and the queue:
/// concurrent claims get disjoint deliveries, a new instance releases nobody's
/// leases, an expired lease is taken over, and the old holder's late
/// completion is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_instances_share_dedupe_queue_and_leases() {
    let Some(db) = TestDatabase::create().await else { return };
    let a: Arc<dyn Store> = Arc::new(db.store().await);
    let b: Arc<dyn Store> = Arc::new(db.store().await);

    // Dedupe across instances, the retry racing the original.
    const N: usize = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        for store in [a.clone(), b.clone()] {
            tasks.spawn(async move { store.insert(new_event(&format!("evt_{i:03}"), &["s"])).await });
        }
    }
    let mut new = 0;
    while let Some(r) = tasks.join_next().await {
        if r.unwrap().expect("insert") == Inserted::New(vec![]) {
            new += 1;
        }
    }
    assert_eq!(new, N, "each event is new exactly once across instances");

    // Both instances claim at once, in small bites: nothing is claimed twice.
    let mut claimers = tokio::task::JoinSet::new();
    for store in [a.clone(), b.clone(), a.clone(), b.clone()] {
        claimers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = store.claim("s", 7, LEASE, T0).await.expect("claim");
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|c| c.event.event_id));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = claimers.join_next().await {
        all.extend(r.unwrap());
    }
    assert_eq!(all.len(), N, "every delivery claimed once");
    assert_eq!(
        all.iter().collect::<BTreeSet<_>>().len(),
        N,
        "no delivery claimed twice"
    );

    // A third instance starting up leaves the live leases alone.
    let c: Arc<dyn Store> = Arc::new(db.store().await);
    assert!(claim(&*c, "s", T0 + 1).await.is_empty());

    // The lease runs out (its holder died): another instance takes over, as
    // the same attempt (the first never recorded how it went); the first
    // holder's late completion changes nothing.
    insert(&*a, event_at("late", &["t"], T0)).await;
    let first = claim(&*a, "t", T0).await;
    let second = claim(&*b, "t", T0 + LEASE_MS).await;
    assert_eq!(attempts(&second), [("late", 1)]);
    complete(&*a, &first[0], T0 + LEASE_MS + 1, Completed::Delivered).await;
    let row = deliveries(&*c, Some("t"), None).await;
    assert_eq!((row[0].status, row[0].attempts), (Status::Pending, 1));
    complete(&*b, &second[0], T0 + LEASE_MS + 2, dead("HTTP 400")).await;
    let row = deliveries(&*c, Some("t"), None).await;
    assert_eq!((row[0].status, row[0].attempts), (Status::Dead, 1));
    // After a recorded attempt, the next claim is the next attempt.
    insert(&*a, event_at("again", &["t"], T0)).await;
    let one = claim(&*a, "t", T0 + LEASE_MS + 3).await;
    complete(
        &*a,
        &one[0],
        T0 + LEASE_MS + 4,
        Completed::Retry {
            due_at: T0 + LEASE_MS + 5,
            error: "HTTP 500".into(),
        },
    )
    .await;
    assert_eq!(attempts(&claim(&*b, "t", T0 + LEASE_MS + 5).await), [("again", 2)]);
    for store in [a, b, c] {
        store.close().await;
    }
}

/// Pruning an event that has no deliveries waits for a replay in progress,
/// which may be adding one: a prune statement that started first would see
/// the event without it and delete it, the new delivery with it, or
/// compact its body away. (The replay's transaction holds the lock shared.)
#[tokio::test(flavor = "multi_thread")]
async fn postgres_pruning_events_waits_for_a_replay_in_progress() {
    let Some(db) = TestDatabase::create().await else { return };
    let store: Arc<dyn Store> = Arc::new(db.store().await);
    insert(&*store, new_event("evt_1", &[])).await;
    let keep_nothing = Retention {
        dedupe_window: Duration::ZERO,
        keep_delivered: Duration::ZERO,
        keep_dead_letters: Duration::ZERO,
    };

    let (replay, connection) = db.config().connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    replay
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock_shared({})",
            super::postgres::PRUNE_REPLAY_LOCK
        ))
        .await
        .expect("a replay's lock");
    let pruning = tokio::spawn({
        let store = store.clone();
        async move { store.prune(keep_nothing, T0 + DAY).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pruning.is_finished(), "pruning went ahead of the replay");
    assert!(store.event_detail("crumb", "evt_1").await.is_ok());

    replay.batch_execute("COMMIT").await.expect("commit");
    let stats = pruning.await.unwrap().expect("prune");
    assert_eq!(stats.events_deleted, 1, "{stats:?}");
    store.close().await;
}

/// Inserts that arrive together share a statement and a commit, and each
/// is still answered as if it were alone: a key twice in a batch is new
/// once, a held delivery gets its own id, and an event the server refuses
/// fails alone, not with the others in its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_grouped_inserts_answer_each_event_as_if_alone() {
    let Some(db) = TestDatabase::create().await else { return };
    let store: Arc<dyn Store> = Arc::new(db.store().await);
    const KEYS: usize = 300;
    let event = |i: usize| NewEvent {
        held: match i % 3 {
            0 => vec![Held {
                sink: "held".into(),
                lease_until: T0 + LEASE_MS,
            }],
            _ => vec![],
        },
        ..new_event(&format!("evt_{i:04}"), &["held", "queued"])
    };
    // Every key twice, all at once.
    let mut tasks = tokio::task::JoinSet::new();
    for i in (0..KEYS).chain(0..KEYS) {
        let (store, ev) = (store.clone(), event(i));
        tasks.spawn(async move { (i, store.insert(ev).await.expect("insert")) });
    }
    let mut new = std::collections::BTreeMap::new();
    let mut duplicates = 0;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            (i, Inserted::New(held)) => assert!(new.insert(i, held).is_none(), "evt_{i:04} new twice"),
            (_, Inserted::Duplicate) => duplicates += 1,
        }
    }
    assert_eq!(
        (new.len(), duplicates),
        (KEYS, KEYS),
        "each key new once, then a duplicate"
    );
    let rows = deliveries(&*store, None, None).await;
    assert_eq!(rows.len(), 2 * KEYS, "two deliveries per event, none for its duplicate");
    for (i, held) in &new {
        let id = format!("evt_{i:04}");
        let row = rows
            .iter()
            .find(|r| r.event_id == id && r.sink == "held")
            .expect("the held sink's delivery");
        if i % 3 == 0 {
            assert_eq!((held.as_slice(), row.attempts), ([row.id].as_slice(), 1), "{id}");
        } else {
            assert_eq!((held.as_slice(), row.attempts), ([].as_slice(), 0), "{id}");
        }
    }
    // The rows one statement inserted share its transaction id (`xmin`).
    let (client, connection) = db.config().connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let commits: i64 = client
        .query_one("SELECT count(DISTINCT xmin::text) FROM events", &[])
        .await
        .expect("count transactions")
        .get(0);
    assert!(
        commits <= (KEYS / 4) as i64,
        "{commits} transactions for {KEYS} events arriving together: the inserts were not grouped"
    );

    // A NUL in a text column is refused by the server: only that event fails.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = store.clone();
        tasks.spawn(async move {
            (
                format!("late_{i:02}"),
                store.insert(new_event(&format!("late_{i:02}"), &["queued"])).await,
            )
        });
    }
    let bad = store.clone();
    tasks.spawn(async move { ("bad".to_string(), bad.insert(new_event("bad\0id", &["queued"])).await) });
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            (id, r) if id == "bad" => assert!(r.is_err(), "the server stored a NUL: {r:?}"),
            (id, r) => assert_eq!(r.expect("stored beside a refused event"), Inserted::New(vec![]), "{id}"),
        }
    }
    assert_eq!(deliveries(&*store, None, None).await.len(), 2 * KEYS + 50);
    store.close().await;
}

/// Big events arriving together are grouped only up to a byte limit per
/// statement: 256 bodies of a few MiB in one would pass PostgreSQL's 1 GB
/// message limit, and the server would drop the connection and every event
/// in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_grouped_inserts_stay_under_a_byte_limit() {
    let Some(db) = TestDatabase::create().await else { return };
    let store: Arc<dyn Store> = Arc::new(db.store().await);
    const BODY: usize = 1 << 20;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let store = store.clone();
        let event = NewEvent {
            body: Bytes::from(vec![b'x'; BODY]),
            ..new_event(&format!("big_{i:02}"), &["s"])
        };
        tasks.spawn(async move { store.insert(event).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().expect("stored"), Inserted::New(vec![]));
    }
    let (client, connection) = db.config().connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let largest: i64 = client
        .query_one(
            "SELECT max(bytes)::bigint FROM (SELECT sum(octet_length(body)) AS bytes FROM events GROUP BY xmin::text) t",
            &[],
        )
        .await
        .expect("bytes per transaction")
        .get(0);
    assert!(
        largest as usize <= super::postgres::MAX_INSERT_BYTES,
        "{largest} body bytes in one statement"
    );
    store.close().await;
}

/// A pooled connection opened for a call made on another runtime (as
/// webhooks' calls are, on ingest's) lives on the store's: it still works
/// once that runtime has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_connection_opened_from_another_runtime_outlives_it() {
    let Some(db) = TestDatabase::create().await else { return };
    let store = Arc::new(db.store().await);
    // The pool's one connection is taken: the other runtime's call opens one.
    let held = store.client().await.unwrap();
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let opened = other.spawn({
        let store = store.clone();
        async move { store.client().await.unwrap() }
    });
    let client = opened.await.unwrap();
    tokio::task::spawn_blocking(move || other.shutdown_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
    let rows = client
        .simple_query("SELECT 1")
        .await
        .expect("the connection outlived its caller's runtime");
    assert!(!rows.is_empty());
    drop((client, held));
    store.close().await;
}

/// An operation stuck on the server, as behind a hung one or a silent link.
async fn stuck(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    client
        .simple_query("SELECT pg_sleep(30) -- cut off")
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok(())
}

/// A connection whose operation was cut off (a hung server, a silent link)
/// is closed and its query cancelled, not lent to the next operation, which
/// would wait behind it as long again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_connection_cut_off_mid_query_is_closed_not_lent_again() {
    let Some(db) = TestDatabase::create().await else { return };
    let store = db.store().await;
    let pool = store.pool();
    let before = pool.status().size;
    assert!(before >= 1, "the store keeps the connection it opened with");
    let started = Instant::now();
    let cut = super::postgres::within(pool, Duration::from_millis(300), stuck).await;
    assert!(cut.unwrap_err().to_string().contains("no answer"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(pool.status().size, before - 1, "taken out of the pool");
    let admin = db.admin().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query LIKE '%-- cut off' AND state = 'active'",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server still runs the query it was cut off in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The store carries on with a fresh connection.
    store.ping().await.unwrap();

    // The same when the caller stops waiting first (a readiness probe's
    // own, shorter limit): the connection is not given back mid-query.
    let before = pool.status().size;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        super::postgres::within(pool, Duration::from_secs(30), stuck),
    )
    .await;
    assert!(gave_up.is_err());
    assert_eq!(pool.status().size, before - 1, "taken out of the pool");
    store.ping().await.unwrap();
    store.close().await;
}

/// Instances starting at once take turns on the migration lock: one
/// migrates, the others find the schema current.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_starts_migrate_once() {
    let Some(db) = TestDatabase::create().await else { return };
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let config = db.config();
        starts.spawn(async move { PostgresStore::connect_config(config).await });
    }
    let mut stores = Vec::new();
    while let Some(r) = starts.join_next().await {
        stores.push(r.unwrap().expect("every instance starts"));
    }
    let (client, connection) = db.config().connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all: Vec<i32> = (1..=super::postgres::MIGRATIONS.len() as i32).collect();
    assert_eq!(versions, all, "each migration recorded once");
    // A schema from a newer expeditor is refused, not guessed at.
    client
        .batch_execute("INSERT INTO schema_version (version) VALUES (99)")
        .await
        .unwrap();
    let err = PostgresStore::connect_config(db.config()).await.unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
    for store in stores {
        store.close().await;
    }
}

/// The database goes away (connections terminated, new ones refused): every
/// operation is Unavailable, nothing half-written; when it is back, the same
/// store works again with everything intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_unavailable_while_the_database_is_gone() {
    let Some(db) = TestDatabase::create().await else { return };
    let store: Arc<dyn Store> = Arc::new(db.store().await);
    insert(&*store, new_event("before", &["a"])).await;
    let admin = db.admin().await;
    // Two statements: the refusal is committed before the terminations.
    admin
        .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = '{}'",
            db.name
        ))
        .await
        .unwrap();

    let gone = new_event("while_gone", &["a"]);
    for _ in 0..3 {
        match store.insert(gone.clone()).await {
            Err(StoreError::Unavailable(_)) => {}
            other => panic!("insert while the database is gone: {other:?}"),
        }
    }
    assert!(matches!(
        store.claim("a", ALL, LEASE, T0).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));
    assert_eq!(
        store.alive().await,
        Ok(()),
        "the server is away, not our part of the store"
    );

    admin
        .batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name))
        .await
        .unwrap();
    // Connections the pool still holds from before are found dead and
    // replaced; give it a few tries.
    for i in 0.. {
        match store.ping().await {
            Ok(()) => break,
            Err(e) if i < 20 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not come back: {e}"),
        }
    }
    assert_eq!(
        insert(&*store, gone).await,
        Inserted::New(vec![]),
        "the refused insert left nothing"
    );
    assert_eq!(insert(&*store, new_event("before", &["a"])).await, Inserted::Duplicate);
    let a = claim(&*store, "a", T0).await;
    assert_eq!(sorted(attempts(&a)), [("before", 1), ("while_gone", 1)]);
    store.close().await;
}

/// A database (or role) whose default is repeatable read still runs the
/// store's transactions read committed: the guard between pruning and
/// replay depends on it. Set per transaction (every store transaction
/// begins through `begin`), not per session.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_transactions_are_read_committed_whatever_the_default() {
    let Some(db) = TestDatabase::create().await else { return };
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
            db.name
        ))
        .await
        .unwrap();
    let isolation = async |client: &tokio_postgres::Client| -> String {
        let row = client.query_one("SHOW transaction_isolation", &[]).await.unwrap();
        row.get(0)
    };
    let (plain, connection) = db.config().connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    assert_eq!(isolation(&plain).await, "repeatable read", "the database's default");

    let store = db.store().await;
    let mut pooled = store.client().await.unwrap();
    let tx = super::postgres::begin(&mut pooled).await.unwrap();
    let row = tx.query_one("SHOW transaction_isolation", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "read committed", "the store's transactions");
    tx.rollback().await.unwrap();
    assert_eq!(
        isolation(&pooled).await,
        "repeatable read",
        "no session setting, which poolers refuse"
    );

    // The clock check the store warns by: this machine and the server
    // agree; a clock a minute ahead is seen as such.
    let skew = super::postgres::clock_skew(&pooled, now_ms).await.unwrap();
    assert!(skew < 1_000, "{skew} ms");
    let skew = super::postgres::clock_skew(&pooled, || now_ms() + 60_000)
        .await
        .unwrap();
    assert!((59_000..61_000).contains(&skew), "{skew} ms");
}

/// A database in another encoding would refuse some event ids and sink
/// errors for good: it is refused at start, before anything is created.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_refuses_a_database_not_in_utf8() {
    let Some(db) = TestDatabase::create().await else { return };
    let admin = db.admin().await;
    admin
        .batch_execute(&format!("DROP DATABASE {}", db.name))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
            db.name
        ))
        .await
        .unwrap();
    let Err(err) = PostgresStore::connect_config(db.config()).await else {
        panic!("a LATIN1 database was taken");
    };
    let err = err.to_string();
    assert!(err.contains("is encoded LATIN1; expeditor needs UTF8"), "{err}");

    let (plain, connection) = db.config().connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let tables: i64 = plain
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "nothing was created");
}

/// Needs no server: a refused connection fails `connect` at once, naming
/// host, port and database but never the password.
#[tokio::test]
async fn postgres_unreachable_names_the_target_not_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://expeditor:hunter2-pw@127.0.0.1:{port}/orders");
    let err = PostgresStore::connect(&url).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "cannot connect to the PostgreSQL store at 127.0.0.1:{port}/orders"
        )),
        "{err}"
    );
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

// ---------------------------------------------------------------------------
// SQLite dedupe runs (src/store/dedupe.rs), with runs small enough that a few
// hundred events seal, merge and delete many of them.

const TINY: super::dedupe::Tuning = super::dedupe::Tuning {
    seal_at: 8,
    fan_in: 3,
    work_per_event: 12,
    work_min: 16,
};

fn tiny(dir: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open_tuned(dir, TINY).expect("open the SQLite store"))
}

fn db(dir: &TempDir) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.path().join("expeditor.db")).expect("open the database")
}

/// (live runs, their highest level, rows of runs that are not live).
fn runs(dir: &TempDir) -> (i64, i64, i64) {
    db(dir)
        .query_row(
            "SELECT (SELECT COUNT(*) FROM dedupe_runs), (SELECT COALESCE(MAX(level), -1) FROM dedupe_runs),
                    (SELECT COUNT(*) FROM dedupe_blocks WHERE run NOT IN (SELECT id FROM dedupe_runs))",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("read the runs")
}

/// Commits with nothing in them until the store has deleted every run it no
/// longer needs (each commit does a little of that work).
async fn settle(store: &dyn Store, dir: &TempDir) {
    for _ in 0..2_000 {
        if runs(dir).2 == 0 {
            return;
        }
        store.ping().await.expect("ping");
    }
    panic!("merged runs were never deleted: {:?}", runs(dir));
}

/// Against a model: new events, vendor retries of stored and of pruned
/// events, pruning as time passes, and reopening (closed, or dropped as a
/// crash would leave it) in between. Every answer is the model's, the runs
/// reach several levels, and what merges leave behind is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dedupe_runs_match_a_model_across_merges_prunes_and_reopens() {
    dedupe_runs_match_a_model(TINY, HOUR).await;
}

/// The same with shares of work of more than `KEYS_PER_INSERT` keys, so
/// seals and merges write keys many to a statement as well as one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dedupe_runs_match_a_model_when_keys_are_written_many_at_once() {
    // Seals of 36 keys and shares of at least 40: both write 32 keys to a
    // statement and the rest one by one. A longer window keeps enough keys
    // alive for runs of level 2.
    let tuning = super::dedupe::Tuning {
        seal_at: 36,
        fan_in: 2,
        work_per_event: 12,
        work_min: 40,
    };
    dedupe_runs_match_a_model(tuning, 2 * HOUR).await;
}

/// `window`: the dedupe window, in ms.
async fn dedupe_runs_match_a_model(tuning: super::dedupe::Tuning, window: i64) {
    let dir = tempfile::tempdir().unwrap();
    let open = |dir: &std::path::Path| -> Arc<dyn Store> {
        Arc::new(SqliteStore::open_tuned(dir, tuning).expect("open the SQLite store"))
    };
    let mut store = open(dir.path());
    let mut rng = fastrand::Rng::with_seed(7);
    let retention = Retention {
        dedupe_window: Duration::from_millis(window as u64),
        keep_delivered: Duration::ZERO,
        keep_dead_letters: Duration::ZERO,
    };
    // id → received_at, for the events the store should hold.
    let mut live: std::collections::BTreeMap<String, i64> = Default::default();
    let mut ever: Vec<String> = Vec::new();
    let mut now = T0;
    let mut highest_level = -1;
    let mut reopened = 0;
    for step in 0..1_500 {
        now += 20 * SECOND;
        match rng.u32(0..100) {
            0..70 => {
                let id = format!("evt_{:016x}", rng.u64(..));
                assert_eq!(
                    insert(&*store, event_at(&id, &[], now)).await,
                    Inserted::New(vec![]),
                    "step {step}"
                );
                live.insert(id.clone(), now);
                ever.push(id);
            }
            70..93 if !ever.is_empty() => {
                let id = ever[rng.usize(..ever.len())].clone();
                let got = insert(&*store, event_at(&id, &[], now)).await;
                match live.entry(id) {
                    std::collections::btree_map::Entry::Occupied(stored) => {
                        assert_eq!(
                            got,
                            Inserted::Duplicate,
                            "step {step}: retry of stored {}",
                            stored.key()
                        );
                    }
                    std::collections::btree_map::Entry::Vacant(pruned) => {
                        assert_eq!(
                            got,
                            Inserted::New(vec![]),
                            "step {step}: retry of pruned {}",
                            pruned.key()
                        );
                        pruned.insert(now);
                    }
                }
            }
            93..97 => {
                store.prune(retention, now).await.expect("prune");
                live.retain(|_, at| *at >= now - window);
            }
            _ => {
                if rng.bool() {
                    store.close().await;
                }
                drop(store);
                store = open(dir.path());
                reopened += 1;
            }
        }
        if step % 50 == 0 {
            highest_level = highest_level.max(runs(&dir).1);
        }
    }
    assert!(reopened > 10, "reopened {reopened} times");
    assert!(highest_level >= 2, "runs reached level {highest_level} only");
    // Every stored event is found by key from the database alone (the admin
    // API's reader), and a pruned one is not.
    for (id, at) in live.iter().step_by(7) {
        let detail = store.event_detail("crumb", id).await.expect("stored event");
        assert_eq!(detail.received_at, *at);
    }
    if let Some(gone) = ever.iter().find(|id| !live.contains_key(*id)) {
        assert_eq!(
            store.event_detail("crumb", gone).await.unwrap_err(),
            StoreError::NotFound
        );
    }
    let listed: BTreeSet<String> = events(&*store, None, None).await.into_iter().map(|e| e.id).collect();
    assert_eq!(listed, live.keys().cloned().collect::<BTreeSet<_>>());
    settle(&*store, &dir).await;
}

/// Many clients send the same events at once, so one commit group holds an
/// event and its duplicates while runs are sealed and merged: each is stored
/// once, and everything else is answered as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_dedupe_runs_store_each_of_concurrent_duplicates_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    const IDS: usize = 300;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..6u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut ids: Vec<usize> = (0..IDS).collect();
            fastrand::Rng::with_seed(client).shuffle(&mut ids);
            let mut new = Vec::new();
            for i in ids {
                if insert(&*store, new_event(&format!("evt_{i:04}"), &["a"])).await != Inserted::Duplicate {
                    new.push(i);
                }
            }
            new
        });
    }
    let mut stored: Vec<usize> = tasks.join_all().await.into_iter().flatten().collect();
    stored.sort_unstable();
    assert_eq!(stored, (0..IDS).collect::<Vec<_>>());
    assert_eq!(claim(&*store, "a", T0).await.len(), IDS);
    assert!(runs(&dir).1 >= 1, "runs were merged: {:?}", runs(&dir));
}

/// The rollback path: a failed write in a group undoes the keys it added in
/// memory too, and only those, with runs being sealed and merged around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_dedupe_runs_forget_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    // Some one at a time first, so runs are sealed and merged before the
    // failures roll groups back; then the rest at once, in groups.
    for i in 0..100 {
        insert(&*store, new_event(&format!("evt_{i:03}"), &["a"])).await;
    }
    assert!(runs(&dir).0 > 0, "no runs before the failures");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 100..300 {
        let store = store.clone();
        tasks.spawn(async move {
            let sinks: &[&str] = if i % 50 == 25 { &["a", "a"] } else { &["a"] };
            store.insert(new_event(&format!("evt_{i:03}"), sinks)).await.is_ok()
        });
    }
    let ok = tasks.join_all().await.into_iter().filter(|ok| *ok).count();
    assert_eq!(ok, 196);
    for i in [125, 175, 225, 275] {
        let id = format!("evt_{i:03}");
        assert_eq!(
            insert(&*store, new_event(&id, &["a"])).await,
            Inserted::New(vec![]),
            "{id}"
        );
    }
    // And nothing stored before a rollback was forgotten by it (the runs'
    // filters are kept across the reload, not read again).
    for i in (0..300).filter(|i| i < &100 || i % 50 != 25) {
        let id = format!("evt_{i:03}");
        assert_eq!(
            insert(&*store, new_event(&id, &["a"])).await,
            Inserted::Duplicate,
            "{id}"
        );
    }
}

/// The schema 0 store (dedupe keys in a UNIQUE index of events), as an older
/// expeditor left it.
const SCHEMA_0: &str = "
CREATE TABLE events (seq INTEGER PRIMARY KEY, source TEXT NOT NULL, event_id TEXT NOT NULL, kind TEXT NOT NULL,
    type TEXT NOT NULL, occurred_at INTEGER, received_at INTEGER NOT NULL, body BLOB, UNIQUE (source, event_id));
CREATE INDEX events_received ON events (received_at);
CREATE INDEX events_uncompacted ON events (received_at) WHERE body IS NOT NULL;
CREATE TABLE deliveries (id INTEGER PRIMARY KEY, event_seq INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    sink TEXT NOT NULL, state INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, due_at INTEGER NOT NULL,
    lease_until INTEGER, last_error TEXT, updated_at INTEGER NOT NULL, UNIQUE (event_seq, sink));
CREATE INDEX deliveries_due ON deliveries (sink, due_at) WHERE state = 0;
CREATE INDEX deliveries_state ON deliveries (state, updated_at);
CREATE TABLE attempts (id INTEGER PRIMARY KEY, delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL, finished_at INTEGER NOT NULL, outcome TEXT NOT NULL, error TEXT);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
";

/// A schema 0 store with `n` events `old_0..`, each with a pending delivery to
/// `a`, the first also delivered to `b` with its attempt.
fn schema_0_store(dir: &TempDir, n: i64) {
    let conn = db(dir);
    conn.execute_batch("PRAGMA journal_mode = WAL").unwrap();
    conn.execute_batch(SCHEMA_0).unwrap();
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 - 1)
         INSERT INTO events (source, event_id, kind, type, received_at, body)
         SELECT 'crumb', 'old_' || i, 'crumbpos', 'order.created', ?2, X'7B7D' FROM n",
        params![n, T0],
    )
    .unwrap();
    conn.execute_batch(&format!(
        "INSERT INTO deliveries (event_seq, sink, state, due_at, updated_at) SELECT seq, 'a', 0, {T0}, {T0} FROM events;
         INSERT INTO deliveries (event_seq, sink, state, attempts, due_at, updated_at) VALUES (1, 'b', 1, 1, {T0}, {T0});
         INSERT INTO attempts (delivery_id, attempt, finished_at, outcome) VALUES (last_insert_rowid(), 1, {T0}, 'delivered');"
    ))
    .unwrap();
}

use rusqlite::params;

/// A store an older expeditor wrote is upgraded on open: its events,
/// deliveries and attempts stay, its events still dedupe (from memory when
/// few, from a run written at open when many), and new events follow them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrades_a_schema_0_store() {
    for n in [5, 100] {
        let dir = tempfile::tempdir().unwrap();
        schema_0_store(&dir, n);
        let store = tiny(dir.path());
        let version: i64 = db(&dir).query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 4);
        assert_eq!(runs(&dir).0, if n > 16 { 1 } else { 0 }, "{n} events");
        for i in 0..n {
            let id = format!("old_{i}");
            assert_eq!(
                insert(&*store, new_event(&id, &["a"])).await,
                Inserted::Duplicate,
                "{id}"
            );
        }
        assert_eq!(insert(&*store, new_event("new", &["a"])).await, Inserted::New(vec![]));
        let pending = claim(&*store, "a", T0).await;
        assert_eq!(pending.len() as i64, n + 1);
        assert_eq!(pending.iter().filter(|c| c.event.event_id == "new").count(), 1);
        let first = store.event_detail("crumb", "old_0").await.unwrap();
        assert_eq!(first.deliveries.len(), 2);
        assert_eq!(first.deliveries[1].attempt_log.len(), 1);
        // The new event's seq follows the old ones, and deleting an event still
        // deletes its deliveries (the foreign key survived the rebuild).
        let conn = db(&dir);
        let seq: i64 = conn
            .query_row("SELECT seq FROM events WHERE event_id = 'new'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seq, n + 1);
        conn.execute_batch("PRAGMA foreign_keys = ON; DELETE FROM events WHERE event_id = 'old_0'")
            .unwrap();
        let orphans: i64 = conn
            .query_row("SELECT COUNT(*) FROM deliveries WHERE event_seq = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(orphans, 0);
    }
}

#[tokio::test]
async fn sqlite_claims_are_planned_once_whatever_their_limit() {
    // A claim's limit is the room in its sink's queue: it changes nearly every
    // time. SQLite plans a statement again when a bound LIMIT changes unless
    // the connection asks for one plan per statement (QPSG).
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    for id in ["a", "b", "c", "d"] {
        insert(&*store, new_event(id, &["a"])).await;
    }
    store.close().await;
    let conn = super::sqlite::open_connection(&dir.path().join("expeditor.db")).unwrap();
    let mut claim = conn.prepare(super::sqlite::CLAIM).unwrap();
    let mut claimed = Vec::new();
    for limit in [1, 3, 2, 64, 1] {
        let ids: Vec<i64> = claim
            .query_map(rusqlite::params!["a", T0 + 1, limit], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        claimed.push(ids.len());
    }
    assert_eq!(claimed, [1, 3, 2, 4, 1], "each claim still honours its limit");
    assert_eq!(claim.get_status(rusqlite::StatementStatus::RePrepare), 0);
}

/// Seqs are never handed out twice: not after the newest events are deleted
/// (a run may still name them), not across a reopen, and not below the
/// `AUTOINCREMENT` counter of a schema-1 store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_never_reuses_an_event_seq() {
    let dir = tempfile::tempdir().unwrap();
    let seq_of = |id: &str| -> i64 {
        db(&dir)
            .query_row("SELECT seq FROM events WHERE event_id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    let store = tiny(dir.path());
    for id in ["a", "b", "c"] {
        assert_eq!(insert(&*store, new_event(id, &[])).await, Inserted::New(vec![]));
    }
    assert_eq!((seq_of("a"), seq_of("b"), seq_of("c")), (1, 2, 3));
    db(&dir)
        .execute_batch("DELETE FROM events WHERE event_id IN ('b', 'c')")
        .unwrap();
    assert_eq!(insert(&*store, new_event("d", &[])).await, Inserted::New(vec![]));
    assert_eq!(seq_of("d"), 4);
    store.close().await;

    db(&dir)
        .execute_batch("DELETE FROM events WHERE event_id = 'd'")
        .unwrap();
    let store = tiny(dir.path());
    assert_eq!(insert(&*store, new_event("e", &[])).await, Inserted::New(vec![]));
    assert!(seq_of("e") > 4, "seq {} handed out again", seq_of("e"));
    store.close().await;

    // As schema 1 left it: no store_meta, and the AUTOINCREMENT counter above
    // every event that is left.
    db(&dir)
        .execute_batch(
            "DROP TABLE store_meta;
             CREATE TABLE counted (x INTEGER PRIMARY KEY AUTOINCREMENT);
             INSERT INTO sqlite_sequence (name, seq) VALUES ('events', 100000);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    let store = tiny(dir.path());
    let version: i64 = db(&dir).query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 4);
    assert_eq!(insert(&*store, new_event("f", &[])).await, Inserted::New(vec![]));
    assert_eq!(seq_of("f"), 100_001);
    for id in ["a", "e", "f"] {
        assert_eq!(insert(&*store, new_event(id, &[])).await, Inserted::Duplicate, "{id}");
    }
    store.close().await;
}

/// A store indexed deliveries by (state, updated_at), an entry per delivery
/// moved at each completion; the open swaps that index for one partial index
/// per finished state, and pruning and the queue's counts still find them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_swaps_the_delivery_state_index_for_partial_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    insert(&*store, event_at("evt_1", &["a"], T0)).await;
    insert(&*store, event_at("evt_2", &["a"], T0)).await;
    insert(&*store, event_at("evt_3", &["b"], T0)).await;
    assert_eq!(finish_all(&*store, "a", T0, Completed::Delivered).await, 2);
    store.close().await;
    db(&dir)
        .execute_batch(
            "DROP INDEX deliveries_delivered; DROP INDEX deliveries_dead;
             CREATE INDEX deliveries_state ON deliveries (state, updated_at);",
        )
        .unwrap();
    let store = tiny(dir.path());
    let indexes: Vec<String> = db(&dir)
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'deliveries' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        indexes,
        [
            "deliveries_dead",
            "deliveries_dead_age",
            "deliveries_delivered",
            "deliveries_due",
            "sqlite_autoindex_deliveries_1"
        ]
    );
    assert_eq!(finish_all(&*store, "b", T0, dead("HTTP 400")).await, 1);
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!((stats[0].sink.as_str(), stats[0].pending, stats[0].dead), ("b", 0, 1));
    let pruned = store
        .prune(
            Retention {
                keep_delivered: Duration::from_secs(3600),
                keep_dead_letters: Duration::from_secs(7 * 86_400),
                dedupe_window: Duration::from_secs(3600),
            },
            T0 + 2 * HOUR,
        )
        .await
        .unwrap();
    assert_eq!(pruned.deliveries_deleted, 2, "the delivered ones, found by their index");
    assert_eq!(deliveries(&*store, None, None).await.len(), 1, "the dead letter stays");
    store.close().await;
}

/// A schema 2 store kept a run's keys a row each (`dedupe_keys`): on upgrade
/// those runs go, the open writes the events' keys again as blocks, and every
/// stored event still dedupes while new ones are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_upgrades_a_schema_2_store_to_dedupe_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    for i in 0..60 {
        insert(&*store, new_event(&format!("old_{i}"), &[])).await;
    }
    store.close().await;
    db(&dir)
        .execute_batch(
            "DROP TABLE dedupe_blocks;
             DELETE FROM dedupe_runs;
             CREATE TABLE dedupe_keys (
                 run INTEGER NOT NULL, source TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL,
                 PRIMARY KEY (run, source, event_id)) WITHOUT ROWID;
             INSERT INTO dedupe_runs (id, level, first_seq, last_seq, keys, bloom) VALUES (1, 0, 1, 60, 60, x'');
             INSERT INTO dedupe_keys (run, source, event_id, seq) SELECT 1, source, event_id, seq FROM events;
             PRAGMA user_version = 2;",
        )
        .unwrap();
    let store = tiny(dir.path());
    let conn = db(&dir);
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 4);
    let old_table: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE name = 'dedupe_keys')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!old_table, "the row-per-key table is dropped");
    let blocks: i64 = conn
        .query_row("SELECT COUNT(*) FROM dedupe_blocks", [], |r| r.get(0))
        .unwrap();
    assert!(blocks > 0, "the open wrote the events' keys as blocks");
    for i in 0..60 {
        let id = format!("old_{i}");
        assert_eq!(insert(&*store, new_event(&id, &[])).await, Inserted::Duplicate, "{id}");
    }
    for i in 0..40 {
        let id = format!("new_{i}");
        assert_eq!(
            insert(&*store, new_event(&id, &[])).await,
            Inserted::New(vec![]),
            "{id}"
        );
    }
    settle(&*store, &dir).await;
    for id in ["old_0", "old_59", "new_0", "new_39"] {
        assert_eq!(insert(&*store, new_event(id, &[])).await, Inserted::Duplicate, "{id}");
    }
    store.close().await;
}

/// Pruning finds the dedupe window's edge by seq, not by an index on
/// `received_at`: an event received out of seq order (requests in flight
/// together) is never pruned early, and one the edge leaves behind goes once
/// the events around it are old enough too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_prune_by_seq_never_prunes_early() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    let retention = Retention {
        dedupe_window: Duration::from_secs(3600),
        keep_delivered: Duration::ZERO,
        keep_dead_letters: Duration::ZERO,
    };
    // In seq order; d was received before b and c, and stored after them.
    let received = [
        ("a", T0),
        ("b", T0 + 20 * SECOND),
        ("c", T0 + 25 * SECOND),
        ("d", T0),
        ("e", T0 + 30 * SECOND),
    ];
    for (id, at) in received {
        assert_eq!(insert(&*store, event_at(id, &[], at)).await, Inserted::New(vec![]));
    }
    let held = |ids: Vec<&str>| ids.into_iter().map(String::from).collect::<BTreeSet<_>>();
    // The window's edge at T0 + 10 s: a goes; b, c and e are inside it; d is
    // past it but sits after b and c, and waits.
    store.prune(retention, T0 + HOUR + 10 * SECOND).await.unwrap();
    assert_eq!(
        held(event_ids(&events(&*store, None, None).await)),
        held(vec!["b", "c", "d", "e"])
    );
    assert_eq!(
        insert(&*store, event_at("d", &[], T0 + HOUR)).await,
        Inserted::Duplicate
    );
    // At T0 + 26 s: b, c and d go; e stays.
    store.prune(retention, T0 + HOUR + 26 * SECOND).await.unwrap();
    assert_eq!(held(event_ids(&events(&*store, None, None).await)), held(vec!["e"]));
    for id in ["a", "d"] {
        assert_eq!(
            insert(&*store, event_at(id, &[], T0 + 2 * HOUR)).await,
            Inserted::New(vec![]),
            "{id}"
        );
    }
    store.close().await;
}

/// The events whose bodies are gone, by id.
fn compacted(dir: &TempDir) -> Vec<String> {
    db(dir)
        .prepare("SELECT event_id FROM events WHERE body IS NULL ORDER BY event_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// How many stored events still have their body.
fn with_body(dir: &TempDir) -> i64 {
    db(dir)
        .query_row("SELECT COUNT(*) FROM events WHERE body IS NOT NULL", [], |r| r.get(0))
        .unwrap()
}

/// `n` events received at T0, written straight into a closed store: seqs
/// `offset + 1 ..= offset + n`, each body the SQL expression `body` of `i`
/// (1 ..= n).
fn bulk_events(dir: &TempDir, offset: i64, n: i64, body: &str) {
    db(dir)
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n})
             INSERT INTO events (seq, source, event_id, kind, type, occurred_at, received_at, body)
             SELECT {offset} + i, 'crumb', 'bulk_' || ({offset} + i), 'crumbpos', 'order.created', NULL, {T0},
                    {body} FROM n;"
        ))
        .unwrap();
}

/// Bodies kept an hour after delivery; everything else a week.
fn keep_delivered_an_hour() -> Retention {
    Retention {
        dedupe_window: Duration::from_secs(7 * 86_400),
        keep_delivered: Duration::from_secs(3600),
        keep_dead_letters: Duration::from_secs(7 * 86_400),
    }
}

/// Compaction needs no index of events that still have a body: it walks
/// seqs from where its last pass stopped, and an event the walk passed while
/// it still had a delivery loses its body once that delivery is pruned.
/// (Here the walk's look back covers that event too; one far behind it is in
/// `sqlite_compaction_walk_is_bounded_and_resumes_where_it_stopped`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_compaction_walks_seqs_and_comes_back_for_events_it_passed() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    let retention = keep_delivered_an_hour();
    insert(&*store, event_at("routed", &["a"], T0)).await;
    insert(&*store, event_at("unrouted_1", &[], T0)).await;
    insert(&*store, event_at("unrouted_2", &[], T0)).await;
    insert(&*store, event_at("young", &[], T0 + 2 * HOUR)).await;
    let indexes: i64 = db(&dir)
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'index' AND name = 'events_uncompacted'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexes, 0, "no index of uncompacted events");

    // The walk passes `routed` (its delivery is pending) and stops before `young`.
    let stats = store.prune(retention, T0 + HOUR + 1).await.unwrap();
    assert_eq!((stats.events_compacted, stats.more), (2, false), "{stats:?}");
    assert_eq!(compacted(&dir), ["unrouted_1", "unrouted_2"]);

    // Its delivery done and pruned, `routed` goes behind the walk.
    assert_eq!(finish_all(&*store, "a", T0 + HOUR + 2, Completed::Delivered).await, 1);
    let stats = store.prune(retention, T0 + 2 * HOUR + 3).await.unwrap();
    let expected = PruneStats {
        deliveries_deleted: 1,
        events_compacted: 1,
        events_deleted: 0,
        more: false,
    };
    assert_eq!(stats, expected);
    assert_eq!(compacted(&dir), ["routed", "unrouted_1", "unrouted_2"]);
    assert_eq!(
        store.replay(event_target("routed", None), T0 + 3 * HOUR).await,
        Err(StoreError::Pruned)
    );
    // `young` goes once it is old enough, in the next pass.
    let stats = store.prune(retention, T0 + 3 * HOUR + 1).await.unwrap();
    assert_eq!((stats.events_compacted, stats.more), (1, false), "{stats:?}");
    assert_eq!(compacted(&dir), ["routed", "unrouted_1", "unrouted_2", "young"]);
    store.close().await;
}

/// A pass walks a bounded number of seqs and bodies, says when it stopped
/// short (`more`, even having changed nothing: a store upgraded with days of
/// compacted events walks them once), and the next pass goes on from there
/// until every old body is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_compaction_walk_is_bounded_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    store.close().await;
    // 70,000 events received at T0: the first 55,000 compacted already but
    // for the first of all, which waits for a delivery.
    bulk_events(
        &dir,
        0,
        70_000,
        "CASE WHEN i <= 55000 AND i > 1 THEN NULL ELSE x'7b7d' END",
    );
    db(&dir)
        .execute_batch(&format!(
            "INSERT INTO deliveries (event_seq, sink, state, due_at, updated_at) VALUES (1, 'a', 0, {T0}, {T0});"
        ))
        .unwrap();
    let store = tiny(dir.path());
    let retention = keep_delivered_an_hour();
    let first = store.prune(retention, T0 + HOUR + 1).await.unwrap();
    assert_eq!(
        (first.events_compacted, first.more),
        (0, true),
        "a pass walks at most 50,000 seqs: {first:?}"
    );
    let (mut passes, mut total) = (1, 0);
    loop {
        let stats = store.prune(retention, T0 + HOUR + 1).await.unwrap();
        passes += 1;
        total += stats.events_compacted;
        assert!(stats.events_compacted <= 10_000, "a pass is bounded: {stats:?}");
        if !stats.more {
            break;
        }
        assert!(passes < 10, "the walk goes on where it stopped");
    }
    assert_eq!(total, 15_000, "the first waits for its delivery");
    assert!(passes >= 3, "15,000 bodies take more than one pass: {passes}");
    assert_eq!(with_body(&dir), 1);
    let stats = store.prune(retention, T0 + HOUR + 1).await.unwrap();
    assert_eq!(stats, PruneStats::default(), "nothing left to do");

    // The first event, far behind the walk now, goes once its delivery does.
    assert_eq!(finish_all(&*store, "a", T0 + HOUR + 2, Completed::Delivered).await, 1);
    let stats = store.prune(retention, T0 + 2 * HOUR + 3).await.unwrap();
    assert_eq!((stats.deliveries_deleted, stats.events_compacted), (1, 1), "{stats:?}");
    assert_eq!(with_body(&dir), 0);
    store.close().await;
}

/// A store upgraded from schema 3 has no walk position: the walk starts at
/// its lowest seq, not at 0, however high seqs have grown (they are never
/// reused), so the first pass already compacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_compaction_walk_starts_at_the_lowest_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    store.close().await;
    bulk_events(&dir, 3_000_000_000, 1_000, "x'7b7d'");
    let store = tiny(dir.path());
    let stats = store.prune(keep_delivered_an_hour(), T0 + HOUR + 1).await.unwrap();
    assert_eq!((stats.events_compacted, stats.more), (1000, false), "{stats:?}");
    store.close().await;
}

/// Pruning finds old dead letters and delivered deliveries by their age
/// alone: a search of an index, not a read of every one kept (the dead
/// letters' index by sink made each pass read all of them, holding the writer).
#[test]
fn sqlite_prune_finds_finished_deliveries_by_age() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path()).unwrap());
    let conn = super::sqlite::open_connection(&dir.path().join("expeditor.db")).unwrap();
    for (state, sql) in [
        ("delivered", super::sqlite::PRUNE_DELIVERED),
        ("dead", super::sqlite::PRUNE_DEAD),
    ] {
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([1_i64, 10], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let searched = plan
            .iter()
            .any(|step| step.starts_with("SEARCH deliveries USING") && step.contains("updated_at<?"));
        assert!(searched, "state {state}: {plan:?}");
    }
}

/// Pruning's bisect reads the first and last seq from the ends of the table:
/// one SELECT of both MIN and MAX walked every row (and every body), holding
/// the writer, and so every ack, for ~110 ms per pass at 160,000 events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_prune_reads_the_seq_range_without_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny(dir.path());
    for i in 0..200 {
        insert(&*store, new_event(&format!("evt_{i}"), &[])).await;
    }
    store.close().await;
    let conn = super::sqlite::open_connection(&dir.path().join("expeditor.db")).unwrap();
    let mut range = conn.prepare(super::sqlite::SEQ_RANGE).unwrap();
    let (lo, hi): (i64, i64) = range.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!(hi - lo, 199);
    assert_eq!(range.get_status(rusqlite::StatementStatus::FullscanStep), 0);
    assert!(
        range.get_status(rusqlite::StatementStatus::VmStep) < 100,
        "{} steps for 200 events",
        range.get_status(rusqlite::StatementStatus::VmStep)
    );
    // What it replaced walks the table.
    let mut both = conn.prepare("SELECT MIN(seq), MAX(seq) FROM events").unwrap();
    let _: (i64, i64) = both.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert!(both.get_status(rusqlite::StatementStatus::FullscanStep) >= 199);
}

/// A store written by a newer expeditor is refused, not misread.
#[test]
fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    db(&dir).execute_batch("PRAGMA user_version = 5").unwrap();
    let err = SqliteStore::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("newer expeditor"), "{err}");
}

/// Events written into the tables from outside (as the benchmark's preload
/// does) get a run at open, and rows of a run a crash cut short are deleted
/// without being mistaken for keys; new runs number past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_open_covers_foreign_events_and_deletes_leftover_runs() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path()).close().await;
    let conn = db(&dir);
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99)
         INSERT INTO events (source, event_id, kind, type, received_at, body)
         SELECT 'crumb', 'pre_' || i, 'crumbpos', 'order.created', ?1, NULL FROM n",
        [T0],
    )
    .unwrap();
    let (last, keys) = super::dedupe::block_of(&[("crumb", "ghost", 1), ("crumb", "pre_5", 1)]);
    conn.execute(
        "INSERT INTO dedupe_blocks (run, last, keys) VALUES (999, ?1, ?2)",
        rusqlite::params![last, keys],
    )
    .unwrap();
    drop(conn);
    let store = tiny(dir.path());
    assert_eq!(runs(&dir).0, 1);
    assert_eq!(insert(&*store, new_event("pre_42", &[])).await, Inserted::Duplicate);
    assert_eq!(insert(&*store, new_event("ghost", &[])).await, Inserted::New(vec![]));
    for i in 0..40 {
        insert(&*store, new_event(&format!("evt_{i}"), &[])).await;
    }
    settle(&*store, &dir).await;
    let newest: i64 = db(&dir)
        .query_row("SELECT MAX(id) FROM dedupe_runs", [], |r| r.get(0))
        .unwrap();
    assert!(newest > 999, "new runs number past leftovers: {newest}");
    assert_eq!(insert(&*store, new_event("pre_5", &[])).await, Inserted::Duplicate);
}

/// One process per embedded store: a second open of the same directory
/// while the first is alive is refused (after waiting out the lock's limit),
/// and succeeds once the first has closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_open_of_a_store_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = SqliteStore::open(dir.path()).unwrap();
    insert(&first, new_event("evt_1", &[])).await;
    let path = dir.path().to_path_buf();
    let second = tokio::task::spawn_blocking(move || SqliteStore::open(&path).map(drop))
        .await
        .unwrap();
    let err = second.unwrap_err().to_string();
    assert!(err.contains("in use by another expeditor process"), "{err}");
    first.close().await;
    let again = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(insert(&again, new_event("evt_1", &[])).await, Inserted::Duplicate);
}

#[test]
fn replay_targets_read_plainly_in_the_log() {
    let one = ReplayTarget::Event {
        source: "crave".into(),
        id: "evt_1".into(),
        sink: Some("kds".into()),
    };
    assert_eq!(one.to_string(), "event crave:evt_1, sink kds");
    let dead = ReplayTarget::DeadLetters {
        sink: None,
        source: Some("crumb".into()),
        event_type: Some("order.created".into()),
        since: None,
    };
    assert_eq!(dead.to_string(), "dead letters, source crumb, type order.created");
}

/// The folders the store makes are closed to other users: its events hold
/// customers' names and addresses.
#[test]
fn the_store_folder_is_not_open_to_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
    // What a folder made the usual way gets here: under a umask that
    // closes folders already, there is nothing to tell apart.
    std::fs::create_dir(dir.path().join("control")).unwrap();
    if mode(&dir.path().join("control")) & 0o007 == 0 {
        eprintln!("this umask closes new folders to others already; nothing to tell apart");
    }
    let path = dir.path().join("var").join("expeditor");
    let store = SqliteStore::open(&path).unwrap();
    for folder in [dir.path().join("var"), path.clone()] {
        assert_eq!(mode(&folder) & 0o007, 0, "{} is {:o}", folder.display(), mode(&folder));
    }
    drop(store);

    // A folder that is there is left as its owner set it.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(SqliteStore::open(&open).unwrap());
    assert_eq!(mode(&open) & 0o777, 0o755);
}
