//! The shared store: PostgreSQL, for several expeditor instances behind a
//! load balancer (`[store] url = "postgres://..."`).
//!
//! Same tables and the same semantics as the SQLite store; what changes is
//! who may be running next to us. Every instance inserts into one dedupe
//! table (`ON CONFLICT (source, event_id) DO NOTHING`: the second copy of an
//! event waits for the first one's transaction and then writes nothing), and
//! claims from one delivery queue with `FOR UPDATE SKIP LOCKED` plus a lease
//! (`lease_until`): a claim is visible to every instance, and a dead
//! instance's claims are taken over by the others once their leases run out.
//! Nothing is released at start, since other instances may be alive.
//!
//! Every operation is one transaction on a pooled connection; the hot ones
//! (insert, claim, complete) are one statement each, so one round trip.
//! Inserts are also grouped here: those that arrive while [`INSERT_BATCHES`]
//! statements are already running go into the next one, a statement and a
//! commit for all of them (the server's own cost per transaction was what
//! limited ingest); alone, an insert is its own statement at once.
//!
//! Connection loss, refused connections and server errors are
//! [`StoreError::Unavailable`]; the pool drops dead connections and opens new
//! ones when the server is back.
//!
//! Connections are plain TCP or a Unix socket (`NoTls`): a URL asking for
//! `sslmode=require` is refused by [`parse_url`] until TLS support is added.

use std::collections::HashMap;
use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Config as PgConfig, NoTls};

use super::*;

/// Connections per instance. Several instances share the server's
/// `max_connections` (100 by default).
const POOL_SIZE: usize = 16;
/// How long an operation waits for a pooled connection, or for a new one.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for a URL without `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds every operation (insert, claim, complete, next_due, and the admin
/// API's reads), so a hung server or a silent link turns into 503s instead
/// of requests that never end. An insert that times out may still commit:
/// the vendor's retry is then a duplicate, and the event is delivered, so
/// nothing acknowledged is lost.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for a replay or a pruning pass, which run a chunked statement
/// after another and may take longer on a large store.
const LONG_OP_TIMEOUT: Duration = Duration::from_secs(300);
/// Rows a prune statement touches at once.
const PRUNE_CHUNK: i64 = 5000;
/// Insert statements running at once; the rest of the pool serves claims,
/// completions and the admin API.
const INSERT_BATCHES: usize = 6;
/// Events one insert statement takes at most.
const MAX_INSERT_BATCH: usize = 256;
/// Body bytes one insert statement takes at most (beyond its first event):
/// a statement's message must stay far below PostgreSQL's 1 GB limit, which
/// 256 bodies of a few MiB each (`server.max_body` has no ceiling) would
/// pass, and six of them at once within both sides' memory.
pub(super) const MAX_INSERT_BYTES: usize = 8 << 20;
/// Key of the advisory lock that serializes migrations ("expedito").
const MIGRATION_LOCK: i64 = 0x6578_7065_6469_746f;
/// Key of the advisory lock between pruning events (exclusive) and
/// replaying one (shared): a pruning statement's snapshot must be taken
/// after any replay that adds a delivery to an event has committed, or it
/// would see the event without deliveries and delete or compact it under
/// the new delivery ("exp-prun").
pub(super) const PRUNE_REPLAY_LOCK: i64 = 0x6578_702d_7072_756e;

/// Schema migrations, applied in order at start; `schema_version` records how
/// many have run. Append only: never edit a migration that has shipped.
pub(super) const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE events (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text NOT NULL,
    event_id    text NOT NULL,
    kind        text NOT NULL,
    type        text NOT NULL,
    occurred_at bigint,
    received_at bigint NOT NULL,
    body        bytea,              -- NULL once compacted: the row is then only a dedupe key
    UNIQUE (source, event_id)
);
CREATE INDEX events_received ON events (received_at);
CREATE TABLE deliveries (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_seq   bigint NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    sink        text NOT NULL,
    state       integer NOT NULL,   -- 0 pending, 1 delivered, 2 dead
    attempts    integer NOT NULL DEFAULT 0,
    due_at      bigint NOT NULL,
    lease_until bigint,
    last_error  text,
    updated_at  bigint NOT NULL,
    UNIQUE (event_seq, sink)
);
CREATE INDEX deliveries_due ON deliveries (sink, due_at) WHERE state = 0;
CREATE INDEX deliveries_state ON deliveries (state, updated_at);
CREATE TABLE attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    finished_at bigint NOT NULL,
    outcome     text NOT NULL,      -- delivered | retry | dead
    error       text
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
",
    "
-- Compaction looks only at events that still have a body.
CREATE INDEX events_uncompacted ON events (received_at) WHERE body IS NOT NULL;
",
];

/// One statement: the event, and its deliveries only if the event is new
/// (those with a lease in `$9` written already claimed, as attempt 1).
/// Returns no row for a duplicate; otherwise a row per held delivery (its
/// id and sink), or one row with NULLs when none is held.
const INSERT: &str = "
WITH e AS (
    INSERT INTO events (source, event_id, kind, type, occurred_at, received_at, body)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING seq
), d AS (
    INSERT INTO deliveries (event_seq, sink, state, attempts, due_at, lease_until, last_error, updated_at)
    SELECT e.seq, s.sink, s.state, CASE WHEN s.lease IS NULL THEN 0 ELSE 1 END, $6, s.lease, s.error, $6
    FROM e CROSS JOIN unnest($8::text[], $9::bigint[], $10::integer[], $11::text[]) AS s (sink, lease, state, error)
    ON CONFLICT (event_seq, sink) DO NOTHING
    RETURNING id, sink, lease_until
)
SELECT e.seq, d.id, d.sink FROM e LEFT JOIN d ON d.lease_until IS NOT NULL";

/// [`INSERT`] for several events at once, one array element each (`$8` –
/// `$10`: every delivery, with its event's position, counted from 1). A key
/// twice in the batch is stored once, with the first one's deliveries. Keys
/// are inserted in key order, as in every batch, so two batches with keys in
/// common (a retry beside its original, another instance's) wait for each
/// other rather than deadlock.
/// Returns a row per new event and held delivery (or NULLs when it holds
/// none), with the event's key; a duplicate has no row.
const INSERT_MANY: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bytea[])
        WITH ORDINALITY AS t (source, event_id, kind, type, occurred_at, received_at, body, n)
), e AS (
    INSERT INTO events (source, event_id, kind, type, occurred_at, received_at, body)
    SELECT source, event_id, kind, type, occurred_at, received_at, body FROM input ORDER BY source, event_id, n
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING seq, source, event_id
), first AS (
    SELECT DISTINCT ON (source, event_id) n, source, event_id, received_at FROM input ORDER BY source, event_id, n
), d AS (
    INSERT INTO deliveries (event_seq, sink, state, attempts, due_at, lease_until, last_error, updated_at)
    SELECT e.seq, s.sink, s.state, CASE WHEN s.lease IS NULL THEN 0 ELSE 1 END, f.received_at, s.lease, s.error,
           f.received_at
    FROM unnest($8::bigint[], $9::text[], $10::bigint[], $11::integer[], $12::text[]) AS s (n, sink, lease, state, error)
    JOIN first f ON f.n = s.n
    JOIN e ON e.source = f.source AND e.event_id = f.event_id
    ON CONFLICT (event_seq, sink) DO NOTHING
    RETURNING id, event_seq, sink, lease_until
)
SELECT e.seq, e.source, e.event_id, d.id, d.sink FROM e LEFT JOIN d ON d.event_seq = e.seq AND d.lease_until IS NOT NULL";

/// Locks due, unleased deliveries other transactions have not locked, leases
/// them and counts the attempt, and returns them with their events. A lease
/// run out is taken over as the same attempt: its holder died before it
/// could record how it went, so it is not counted twice.
const CLAIM: &str = "
WITH c AS (
    SELECT id, lease_until IS NOT NULL AS taken_over FROM deliveries
    WHERE sink = $1 AND state = 0 AND due_at <= $2 AND (lease_until IS NULL OR lease_until <= $2)
    ORDER BY due_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), u AS (
    UPDATE deliveries d SET lease_until = $4,
        attempts = GREATEST(d.attempts + CASE WHEN d.lease_until IS NULL THEN 1 ELSE 0 END, 1)
    FROM c WHERE d.id = c.id
    RETURNING d.id, d.attempts, d.event_seq, d.due_at
)
SELECT u.id, u.attempts, e.source, e.event_id, e.kind, e.type, e.occurred_at, e.received_at, e.body, c.taken_over
FROM u JOIN c ON c.id = u.id JOIN events e ON e.seq = u.event_seq
ORDER BY u.due_at, u.id";

/// Ends attempts: only the holder of a delivery's current attempt may end it
/// (`state = 0`, the same attempt and lease), and each ending is logged.
const COMPLETE: &str = "
WITH done AS (
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::integer[], $4::bigint[], $5::text[], $6::bigint[], $7::text[],
                         $8::bigint[])
        AS t (id, attempt, state, due_at, error, finished_at, outcome, lease_until)
), updated AS (
    UPDATE deliveries d
    SET state = done.state, due_at = COALESCE(done.due_at, d.due_at), lease_until = NULL,
        attempts = CASE WHEN done.outcome = 'released' THEN d.attempts - 1 ELSE d.attempts END,
        last_error = CASE WHEN done.outcome = 'released' THEN d.last_error ELSE done.error END,
        updated_at = CASE WHEN done.outcome = 'released' THEN d.updated_at ELSE done.finished_at END
    FROM done
    WHERE d.id = done.id AND d.state = 0 AND d.attempts = done.attempt AND d.lease_until = done.lease_until
    RETURNING d.id, done.attempt, done.finished_at, done.outcome, done.error
)
INSERT INTO attempts (delivery_id, attempt, finished_at, outcome, error)
SELECT id, attempt, finished_at, outcome, error FROM updated WHERE outcome <> 'released'";

const REQUEUE: &str = "UPDATE deliveries SET state = 0, attempts = 0, due_at = $1, lease_until = NULL, updated_at = $1";

pub struct PostgresStore {
    pool: Pool,
    /// `host:port/dbname`, for messages: never the password.
    target: String,
    /// To the task that groups inserts into statements.
    inserts: mpsc::Sender<PendingInsert>,
}

/// An insert waiting for its statement, and who waits for its answer.
type PendingInsert = (NewEvent, oneshot::Sender<Result<Inserted, StoreError>>);

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Parses and checks a `store.url`. The error never contains the password.
pub fn parse_url(url: &str) -> Result<PgConfig, String> {
    let url = url.trim();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// URL, e.g. \"postgres://expeditor@db.internal/expeditor\"".into());
    }
    let config: PgConfig = url
        .parse()
        .map_err(|e: tokio_postgres::Error| redact(&format!("invalid PostgreSQL URL: {}", describe(&e)), url))?;
    if config.get_ssl_mode() == SslMode::Require {
        return Err("sslmode=require is not supported yet (no TLS to PostgreSQL); \
                    use a Unix socket or a trusted network with sslmode=disable or prefer"
            .into());
    }
    if config.get_hosts().is_empty() {
        return Err("names no host; write e.g. postgres://user@host/db, or ?host=/run/postgresql for a socket".into());
    }
    Ok(config)
}

/// Removes the URL's password from a message, should a parser ever echo it.
fn redact(message: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => message.replace(p, "***"),
        None => message.to_string(),
    }
}

/// `host:port/dbname` (hosts and ports as configured), without user or
/// password.
pub fn target(config: &PgConfig) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(h) if h.contains(':') => format!("[{h}]:{port}"),
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(dir) => format!("{}:{port}", dir.display()),
            }
        })
        .collect();
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{}/{db}", hosts.join(","))
}

/// What a driver error says, with the server's message when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
    }
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn pool_message(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => describe(e),
        PoolError::Timeout(_) => "timed out waiting for a database connection".into(),
        PoolError::Closed => "store is closed".into(),
        other => other.to_string(),
    }
}

fn db_error(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(&e))
}

/// Opens each pooled connection on the runtime that opened the store, and
/// runs it there. Opened for a call made on another runtime (webhooks have
/// one of their own, `ingest::Workers`), a connection would live on that
/// one and break when it stops, while the pool still lends it out.
struct OnStoreRuntime(tokio::runtime::Handle);

type Opened = Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>;

impl deadpool_postgres::Connect for OnStoreRuntime {
    fn connect(&self, config: &PgConfig) -> std::pin::Pin<Box<dyn Future<Output = Opened> + Send + '_>> {
        let (config, runtime) = (config.clone(), self.0.clone());
        Box::pin(async move {
            match runtime.spawn(open_connection(config.clone())).await {
                Ok(opened) => opened,
                // That runtime is stopping (and expeditor with it): here.
                Err(_) => open_connection(config).await,
            }
        })
    }
}

/// A connection, and the task on the current runtime that runs it.
async fn open_connection(config: PgConfig) -> Opened {
    let (client, connection) = config.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL store connection failed");
        }
    });
    Ok((client, task))
}

impl PostgresStore {
    /// Connects to `url` and applies pending migrations. Fails at once when
    /// the database cannot be reached, naming it (never the password).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_config(parse_url(url).map_err(StoreError::Unavailable)?).await
    }

    pub async fn connect_config(mut config: PgConfig) -> Result<Self, StoreError> {
        let target = target(&config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("expeditor");
        }
        let manager = Manager::from_connect(
            config,
            OnStoreRuntime(tokio::runtime::Handle::current()),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the connection pool: {e}")))?;
        let (inserts, queue) = mpsc::channel(4096);
        tokio::spawn(group_inserts(pool.clone(), queue));
        let store = Self { pool, target, inserts };
        let mut client = store.pool.get().await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to the PostgreSQL store at {}: {}",
                store.target,
                pool_message(&e)
            ))
        })?;
        refuse_unless_utf8(&client, &store.target).await?;
        warn_of_clock_skew(&client, &store.target).await;
        migrate(&mut client).await.map_err(|e| {
            StoreError::Unavailable(format!("cannot prepare the PostgreSQL store at {}: {e}", store.target))
        })?;
        // Server settings that break a promise or a store's upkeep: one warning each.
        let settings = client
            .query_one(
                "SELECT current_setting('synchronous_commit'), current_setting('autovacuum')",
                &[],
            )
            .await;
        if let Ok(row) = settings {
            if row.try_get::<_, String>(0).is_ok_and(|v| v == "off") {
                tracing::warn!(
                    store = %store.target,
                    "synchronous_commit is off on this server: an acknowledged event can be lost in a crash; \
                     set it to on for expeditor's role or database"
                );
            }
            if row.try_get::<_, String>(1).is_ok_and(|v| v == "off") {
                tracing::warn!(
                    store = %store.target,
                    "autovacuum is off on this server: rows that pruning deletes and that deliveries \
                     leave behind are never reclaimed, so the tables grow without bound and claims slow; \
                     turn it on, or VACUUM expeditor's tables regularly"
                );
            }
        }
        Ok(store)
    }

    /// `host:port/dbname`.
    pub fn target(&self) -> &str {
        &self.target
    }

    #[cfg(test)]
    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        pooled(&self.pool).await
    }

    #[cfg(test)]
    pub(super) fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// A transaction, read committed whatever the server's or the role's
/// default: the guard between pruning and replay (an advisory lock, then
/// fresh reads) and the rechecks of `SKIP LOCKED` assume each statement
/// sees what committed before it, which a repeatable-read snapshot taken
/// before the lock would not. Set per transaction, not as a startup
/// option, so connection poolers (PgBouncer) take it.
pub(super) async fn begin(client: &mut Object) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
}

/// A difference between this machine's clock and the server's worth a
/// warning: well under a lease (the sink timeout twice, plus 30 s).
const CLOCK_SKEW_WARNING_MS: i64 = 5_000;

/// Event ids, payloads and sink errors are any Unicode: a database in
/// another encoding would refuse some of them for good (an event answered
/// 503 at every retry, an outcome never recorded).
async fn refuse_unless_utf8(client: &Object, target: &str) -> Result<(), StoreError> {
    let encoding: String = client
        .query_one("SELECT current_setting('server_encoding')", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot read the PostgreSQL store's encoding at {target}: {}",
                describe(&e)
            ))
        })?;
    if encoding != "UTF8" {
        return Err(StoreError::Unavailable(format!(
            "the PostgreSQL store's database at {target} is encoded {encoding}; expeditor needs UTF8 \
             (CREATE DATABASE ... ENCODING 'UTF8')"
        )));
    }
    Ok(())
}

/// Instances sharing a store compare leases written by each other's clocks:
/// one far off would take over deliveries still in flight elsewhere, or
/// leave a crashed instance's for too long.
async fn warn_of_clock_skew(client: &Object, target: &str) {
    if let Some(skew) = clock_skew(client, now_ms).await
        && skew > CLOCK_SKEW_WARNING_MS
    {
        tracing::warn!(
            store = %target,
            skew_ms = skew,
            "this machine's clock and the PostgreSQL server's differ by more than 5 s: instances sharing \
             a store compare delivery leases by their own clocks, so keep every machine's clock in sync (NTP)"
        );
    }
}

/// How far the server's clock is from `local`'s, in milliseconds (the
/// query's own round trip not counted).
pub(super) async fn clock_skew(client: &Object, local: impl Fn() -> i64) -> Option<i64> {
    let before = local();
    let row = client
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[])
        .await
        .ok()?;
    let after = local();
    let server: i64 = row.try_get(0).ok()?;
    Some(if server < before {
        before - server
    } else {
        server.saturating_sub(after)
    })
}

/// A connection from the pool (which bounds the wait itself).
async fn pooled(pool: &Pool) -> Result<Object, StoreError> {
    pool.get().await.map_err(|e| StoreError::Unavailable(pool_message(&e)))
}

/// Applies the migrations this database has not seen, under an advisory lock
/// held until commit, so instances starting at once take turns and only the
/// first one migrates.
async fn migrate(client: &mut Object) -> Result<(), String> {
    let tx = begin(client).await.map_err(|e| describe(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| describe(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| describe(&e))?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await
        .map_err(|e| describe(&e))?
        .get(0);
    let known = MIGRATIONS.len();
    if current as usize > known {
        return Err(format!(
            "its schema is version {current}, newer than this expeditor knows ({known}); upgrade expeditor"
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i32 + 1;
        tx.batch_execute(sql)
            .await
            .map_err(|e| format!("migration {version}: {}", describe(&e)))?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&version])
            .await
            .map_err(|e| describe(&e))?;
        tracing::info!(version, "store schema migrated");
    }
    tx.commit().await.map_err(|e| describe(&e))
}

/// Bounds an operation by [`OP_TIMEOUT`].
async fn bounded<T>(op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(OP_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| Err(no_answer(OP_TIMEOUT)))
}

fn no_answer(limit: Duration) -> StoreError {
    StoreError::Unavailable(format!("no answer within {limit:?}"))
}

/// Runs an operation on a pooled connection, the wait for one included,
/// within [`OP_TIMEOUT`]. A connection whose operation it cuts off is
/// [`abandon`]ed, not given back.
async fn on_connection<T>(
    pool: &Pool,
    op: impl AsyncFnOnce(&mut Object) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    within(pool, OP_TIMEOUT, op).await
}

/// [`on_connection`] within `limit`.
pub(super) async fn within<T>(
    pool: &Pool,
    limit: Duration,
    op: impl AsyncFnOnce(&mut Object) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let deadline = tokio::time::Instant::now() + limit;
    let client = tokio::time::timeout_at(deadline, pooled(pool))
        .await
        .unwrap_or_else(|_| Err(no_answer(limit)))?;
    // Abandoned unless the operation ends: also when the caller stops
    // waiting first (a readiness probe's shorter limit drops this future).
    let mut lent = Lent(Some(client));
    let outcome = tokio::time::timeout_at(deadline, op(lent.0.as_mut().expect("lent above"))).await;
    match outcome {
        Ok(result) => {
            // Done with it: back to the pool.
            drop(lent.0.take());
            result
        }
        Err(_) => Err(no_answer(limit)),
    }
}

/// A connection lent to one operation: [`abandon`]ed when dropped still
/// holding it, that is, when the operation did not end.
struct Lent(Option<Object>);

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            abandon(client);
        }
    }
}

/// Takes a connection whose operation was cut off out of the pool and
/// closes it, asking the server to cancel what it ran. Given back, it would
/// be lent to the next operation while its query may still be stuck behind
/// a hung server or a silent link, and that one would wait as long again:
/// leases would run out and deliveries be sent twice. The pool opens a
/// fresh one when it needs it.
fn abandon(client: Object) {
    let cancel = client.cancel_token();
    // Dropping the connection stops its task and closes the socket.
    drop(Object::take(client));
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, cancel.cancel_query(NoTls)).await;
        });
    }
}

/// The columns [`delivery_row`] reads.
const DELIVERY_COLUMNS: &str = "SELECT d.id, e.source, e.event_id, e.type, d.sink, d.state, d.attempts, d.due_at,
    d.last_error, d.updated_at";

fn delivery_row(r: &tokio_postgres::Row) -> DeliveryRow {
    let source: String = r.get(1);
    let event_id: String = r.get(2);
    let sink: String = r.get(4);
    let status = status(r.get(5));
    DeliveryRow {
        id: r.get(0),
        key: expeditor_api::delivery_key(&source, &event_id, &sink),
        source,
        event_id,
        event_type: r.get(3),
        sink,
        status,
        attempts: attempts(r.get(6)),
        next_attempt_at: (status == Status::Pending).then(|| r.get(7)),
        last_error: r.get(8),
        updated_at: r.get(9),
    }
}

fn status(code: i32) -> Status {
    Status::from_code(code.into())
}

fn attempts(n: i32) -> u32 {
    n.max(0) as u32
}

/// Takes inserts from the queue into statements: at most [`INSERT_BATCHES`]
/// at once, each with everything that queued while all of them were busy.
async fn group_inserts(pool: Pool, mut queue: mpsc::Receiver<PendingInsert>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(INSERT_BATCHES));
    // Taken from the queue, but past the last batch's byte limit: it starts the next.
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut bytes = first.0.body.len();
        let mut batch = vec![first];
        while batch.len() < MAX_INSERT_BATCH {
            match queue.try_recv() {
                Ok(pending) if bytes + pending.0.body.len() > MAX_INSERT_BYTES => {
                    carried = Some(pending);
                    break;
                }
                Ok(pending) => {
                    bytes += pending.0.body.len();
                    batch.push(pending);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            insert_batch(&pool, batch).await;
            drop(slot);
        });
    }
}

/// Inserts a batch in one statement and answers each of its events. If the
/// statement fails (nothing of it is committed), each event is inserted on
/// its own, so one the server refuses fails alone.
async fn insert_batch(pool: &Pool, batch: Vec<PendingInsert>) {
    let fail_all = |batch: Vec<PendingInsert>, e: StoreError| {
        for (_, to) in batch {
            let _ = to.send(Err(e.clone()));
        }
    };
    let client = match pooled(pool).await {
        Ok(client) => client,
        Err(e) => return fail_all(batch, e),
    };
    if batch.len() > 1 {
        let events: Vec<&NewEvent> = batch.iter().map(|(ev, _)| ev).collect();
        let failed = match tokio::time::timeout(OP_TIMEOUT, insert_many(&client, &events)).await {
            Ok(Ok(answers)) => {
                for ((_, to), answer) in batch.into_iter().zip(answers) {
                    let _ = to.send(Ok(answer));
                }
                return;
            }
            // The server refused something in it (a data exception, a
            // constraint, a limit): find what, one by one. Not on a timeout,
            // cancellation or shutdown, which would only repeat per event.
            Ok(Err(e))
                if e.code()
                    .is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.code().starts_with(class))) =>
            {
                tracing::debug!(events = batch.len(), error = %describe(&e), "grouped insert refused; inserting one by one");
                None
            }
            // Lost or hung: one by one would only wait as long again for each.
            Ok(Err(e)) => Some(db_error(e)),
            Err(_) => {
                abandon(client);
                return fail_all(batch, no_answer(OP_TIMEOUT));
            }
        };
        if let Some(e) = failed {
            return fail_all(batch, e);
        }
    }
    let mut batch = batch.into_iter();
    while let Some((ev, to)) = batch.next() {
        match tokio::time::timeout(OP_TIMEOUT, insert_one(&client, &ev)).await {
            Ok(answer) => {
                let _ = to.send(answer);
            }
            Err(_) => {
                abandon(client);
                let _ = to.send(Err(no_answer(OP_TIMEOUT)));
                return fail_all(batch.collect(), no_answer(OP_TIMEOUT));
            }
        }
    }
}

/// A row's held delivery: its id and sink, or NULLs when none is held.
type HeldRow = (Option<i64>, Option<String>);

/// Which of `ev`'s held deliveries (by position) got which id.
fn held_ids(ev: &NewEvent, rows: impl Iterator<Item = HeldRow>) -> Vec<i64> {
    let mut held = vec![0; ev.held.len()];
    for (id, sink) in rows {
        let (Some(id), Some(sink)) = (id, sink) else { continue };
        if let Some(i) = ev.held.iter().position(|h| h.sink == sink) {
            held[i] = id;
        }
    }
    held
}

/// Each delivery `ev` is stored with: its sink, its lease (a held one's) and
/// its state and error: pending (0), or dead (2) at once with why.
fn deliveries(ev: &NewEvent) -> impl Iterator<Item = (&str, Option<i64>, i32, Option<&str>)> + '_ {
    let pending = ev.sinks.iter().map(|sink| {
        let lease = ev.held.iter().find(|h| &h.sink == sink).map(|h| h.lease_until);
        (sink.as_str(), lease, 0, None)
    });
    let dead = ev
        .dead
        .iter()
        .map(|(sink, error)| (sink.as_str(), None, 2, Some(error.as_str())));
    pending.chain(dead)
}

async fn insert_one(client: &Object, ev: &NewEvent) -> Result<Inserted, StoreError> {
    let stmt = client.prepare_cached(INSERT).await.map_err(db_error)?;
    let (mut sinks, mut leased, mut states, mut errors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (sink, lease, state, error) in deliveries(ev) {
        sinks.push(sink);
        leased.push(lease);
        states.push(state);
        errors.push(error);
    }
    let rows = client
        .query(
            &stmt,
            &[
                &ev.source,
                &ev.event_id,
                &ev.kind,
                &ev.event_type,
                &ev.occurred_at,
                &ev.received_at,
                &&ev.body[..],
                &sinks,
                &leased,
                &states,
                &errors,
            ],
        )
        .await
        .map_err(db_error)?;
    if rows.is_empty() {
        return Ok(Inserted::Duplicate);
    }
    Ok(Inserted::New(held_ids(
        ev,
        rows.iter()
            .map(|r| (r.get::<_, Option<i64>>(1), r.get::<_, Option<String>>(2))),
    )))
}

async fn insert_many(client: &Object, events: &[&NewEvent]) -> Result<Vec<Inserted>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(INSERT_MANY).await?;
    let column = |f: fn(&NewEvent) -> &str| events.iter().map(|ev| f(ev)).collect::<Vec<&str>>();
    let (sources, ids) = (column(|ev| &ev.source), column(|ev| &ev.event_id));
    let (kinds, types) = (column(|ev| &ev.kind), column(|ev| &ev.event_type));
    let occurred: Vec<Option<i64>> = events.iter().map(|ev| ev.occurred_at).collect();
    let received: Vec<i64> = events.iter().map(|ev| ev.received_at).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|ev| &ev.body[..]).collect();
    let (mut positions, mut sinks, mut leased) = (Vec::new(), Vec::new(), Vec::new());
    let (mut states, mut errors) = (Vec::new(), Vec::new());
    for (n, ev) in (1i64..).zip(events) {
        for (sink, lease, state, error) in deliveries(ev) {
            positions.push(n);
            sinks.push(sink);
            leased.push(lease);
            states.push(state);
            errors.push(error);
        }
    }
    let rows = client
        .query(
            &stmt,
            &[
                &sources, &ids, &kinds, &types, &occurred, &received, &bodies, &positions, &sinks, &leased, &states,
                &errors,
            ],
        )
        .await?;
    // The new events' held deliveries by key; the first event with a key
    // takes them, and any later one with it is a duplicate.
    let mut stored: HashMap<(String, String), Vec<HeldRow>> = HashMap::new();
    for r in &rows {
        stored
            .entry((r.get(1), r.get(2)))
            .or_default()
            .push((r.get(3), r.get(4)));
    }
    Ok(events
        .iter()
        .map(|ev| match stored.remove(&(ev.source.clone(), ev.event_id.clone())) {
            Some(held) => Inserted::New(held_ids(ev, held.into_iter())),
            None => Inserted::Duplicate,
        })
        .collect())
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert(&self, ev: NewEvent) -> Result<Inserted, StoreError> {
        let closed = || StoreError::Unavailable("store is closed".into());
        bounded(async {
            let (to, answer) = oneshot::channel();
            self.inserts.send((ev, to)).await.map_err(|_| closed())?;
            answer.await.map_err(|_| closed())?
        })
        .await
    }

    async fn claim(&self, sink: &str, limit: usize, lease: Duration, now: i64) -> Result<Vec<Claimed>, StoreError> {
        let lease_until = now.saturating_add(lease.as_millis().min(i64::MAX as u128) as i64);
        let limit = limit.min(i64::MAX as usize) as i64;
        on_connection(&self.pool, async |client| {
            let stmt = client.prepare_cached(CLAIM).await.map_err(db_error)?;
            let rows = client
                .query(&stmt, &[&sink, &now, &limit, &lease_until])
                .await
                .map_err(db_error)?;
            Ok(rows
                .iter()
                .map(|r| Claimed {
                    delivery_id: r.get(0),
                    sink: sink.to_string(),
                    attempt: attempts(r.get(1)),
                    taken_over: r.get(9),
                    lease_until,
                    event: StoredEvent {
                        source: r.get(2),
                        event_id: r.get(3),
                        kind: r.get(4),
                        event_type: r.get(5),
                        occurred_at: r.get(6),
                        received_at: r.get(7),
                        body: r.get::<_, Option<Vec<u8>>>(8).unwrap_or_default(),
                    },
                    prepared: None,
                })
                .collect())
        })
        .await
    }

    async fn complete(&self, done: Vec<Completion>) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let n = done.len();
        let (mut ids, mut tries, mut states) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut leases: Vec<i64> = Vec::with_capacity(n);
        let (mut dues, mut errors, mut finished, mut outcomes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for c in &done {
            let (state, due, error, outcome): (Status, Option<i64>, Option<std::borrow::Cow<str>>, &str) =
                match &c.result {
                    Completed::Delivered => (Status::Delivered, None, None, "delivered"),
                    Completed::Retry { due_at, error } => {
                        (Status::Pending, Some(*due_at), Some(stored_error(error)), "retry")
                    }
                    Completed::Dead { error } => (Status::Dead, None, Some(stored_error(error)), "dead"),
                    Completed::Released => (Status::Pending, None, None, "released"),
                };
            leases.push(c.lease_until);
            ids.push(c.delivery_id);
            tries.push(c.attempt.min(i32::MAX as u32) as i32);
            states.push(state.code() as i32);
            dues.push(due);
            errors.push(error);
            finished.push(c.finished_at);
            outcomes.push(outcome);
        }
        on_connection(&self.pool, async |client| {
            let stmt = client.prepare_cached(COMPLETE).await.map_err(db_error)?;
            client
                .execute(
                    &stmt,
                    &[&ids, &tries, &states, &dues, &errors, &finished, &outcomes, &leases],
                )
                .await
                .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn next_due(&self, sink: &str) -> Result<Option<i64>, StoreError> {
        on_connection(&self.pool, async |client| {
            let stmt = client
                .prepare_cached(
                    "SELECT due_at FROM deliveries WHERE sink = $1 AND state = 0 AND lease_until IS NULL
                     ORDER BY due_at LIMIT 1",
                )
                .await
                .map_err(db_error)?;
            let row = client.query_opt(&stmt, &[&sink]).await.map_err(db_error)?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    async fn events(&self, f: EventFilter) -> Result<Vec<EventSummary>, StoreError> {
        on_connection(&self.pool, async |client| {
            let stmt = client
                .prepare_cached(
                    "SELECT seq, source, event_id, type, occurred_at, received_at FROM events
                     WHERE ($1::text IS NULL OR source = $1) AND ($2::text IS NULL OR type = $2)
                       AND ($4::bigint IS NULL OR received_at >= $4) AND ($5::bigint IS NULL OR seq < $5)
                     ORDER BY seq DESC LIMIT $3",
                )
                .await
                .map_err(db_error)?;
            let limit = f.limit.min(i64::MAX as usize) as i64;
            let rows = client
                .query(&stmt, &[&f.source, &f.event_type, &limit, &f.since, &f.before])
                .await
                .map_err(db_error)?;
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            let mut events: Vec<EventSummary> = rows
                .iter()
                .map(|r| EventSummary {
                    seq: r.get(0),
                    source: r.get(1),
                    id: r.get(2),
                    event_type: r.get(3),
                    occurred_at: r.get(4),
                    received_at: r.get(5),
                    deliveries: Vec::new(),
                })
                .collect();
            if seqs.is_empty() {
                return Ok(events);
            }
            let stmt = client
                .prepare_cached(
                    "SELECT event_seq, sink, state, attempts FROM deliveries WHERE event_seq = ANY($1) ORDER BY id",
                )
                .await
                .map_err(db_error)?;
            let index: HashMap<i64, usize> = seqs.iter().enumerate().map(|(i, s)| (*s, i)).collect();
            for r in client.query(&stmt, &[&seqs]).await.map_err(db_error)? {
                if let Some(&i) = index.get(&r.get::<_, i64>(0)) {
                    events[i].deliveries.push(DeliverySummary {
                        sink: r.get(1),
                        status: status(r.get(2)),
                        attempts: attempts(r.get(3)),
                    });
                }
            }
            Ok(events)
        })
        .await
    }

    async fn deliveries(&self, f: DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        on_connection(&self.pool, async |client| {
            // A status is written into the statement (as SQLite's listing does):
            // a prepared statement's generic plan cannot use `(state, updated_at)`
            // for a state that is only a parameter, and sorted every delivery.
            let state_filter = match f.status {
                Some(status) => format!("d.state = {code} AND $2::integer = {code}", code = status.code()),
                None => "$2::integer IS NULL".to_owned(),
            };
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT d.id, e.source, e.event_id, e.type, d.sink, d.state, d.attempts, d.due_at,
                            d.last_error, d.updated_at
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE ($1::text IS NULL OR d.sink = $1) AND {state_filter}
                       AND ($4::text IS NULL OR e.source = $4) AND ($5::text IS NULL OR e.type = $5)
                       AND ($6::bigint IS NULL OR d.updated_at >= $6)
                       AND ($7::bigint IS NULL OR (d.updated_at, d.id) < ($7, $8::bigint))
                     ORDER BY d.updated_at DESC, d.id DESC LIMIT $3"
                ))
                .await
                .map_err(db_error)?;
            let state = f.status.map(|s| s.code() as i32);
            let limit = f.limit.min(i64::MAX as usize) as i64;
            let (before_at, before_id) = (f.before.map(|b| b.0), f.before.map(|b| b.1));
            let rows = client
                .query(
                    &stmt,
                    &[
                        &f.sink,
                        &state,
                        &limit,
                        &f.source,
                        &f.event_type,
                        &f.since,
                        &before_at,
                        &before_id,
                    ],
                )
                .await
                .map_err(db_error)?;
            Ok(rows.iter().map(delivery_row).collect())
        })
        .await
    }

    async fn event_detail(&self, source: &str, id: &str) -> Result<EventDetail, StoreError> {
        on_connection(&self.pool, async |client| {
            let found = client
                .query_opt(
                    "SELECT seq, kind, type, occurred_at, received_at, body FROM events WHERE source = $1 AND event_id = $2",
                    &[&source, &id],
                )
                .await
                .map_err(db_error)?;
            let Some(event) = found else {
                return Err(StoreError::NotFound);
            };
            let seq: i64 = event.get(0);
            let rows = client
                .query(
                    &format!("{DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.event_seq = $1 ORDER BY d.id"),
                    &[&seq],
                )
                .await
                .map_err(db_error)?;
            let log = client
                .query(
                    "SELECT a.delivery_id, a.attempt, a.finished_at, a.outcome, a.error
                     FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                     WHERE d.event_seq = $1 ORDER BY a.id",
                    &[&seq],
                )
                .await
                .map_err(db_error)?;
            let deliveries = rows
                .iter()
                .map(|r| {
                    let delivery = delivery_row(r);
                    let attempt_log = log
                        .iter()
                        .filter(|a| a.get::<_, i64>(0) == delivery.id)
                        .map(|a| AttemptRow {
                            attempt: attempts(a.get(1)),
                            finished_at: a.get(2),
                            outcome: a.get(3),
                            error: a.get(4),
                        })
                        .collect();
                    DeliveryDetail { delivery, attempt_log }
                })
                .collect();
            let body: Option<Vec<u8>> = event.get(5);
            Ok(EventDetail {
                source: source.to_string(),
                id: id.to_string(),
                kind: event.get(1),
                event_type: event.get(2),
                occurred_at: event.get(3),
                received_at: event.get(4),
                payload: body.map(|b| String::from_utf8_lossy(&b).into_owned()),
                deliveries,
            })
        })
        .await
    }

    async fn queue_stats(&self) -> Result<Vec<SinkQueue>, StoreError> {
        on_connection(&self.pool, async |client| {
            let rows = client
                .query(
                    "SELECT d.sink, d.state, COUNT(*), MIN(e.received_at)
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.state IN (0, 2) GROUP BY d.sink, d.state ORDER BY d.sink",
                    &[],
                )
                .await
                .map_err(db_error)?;
            let mut out: Vec<SinkQueue> = Vec::new();
            for r in &rows {
                SinkQueue::add_count(&mut out, r.get(0), r.get::<_, i32>(1) == 0, r.get(2), r.get(3));
            }
            Ok(out)
        })
        .await
    }

    async fn alive(&self) -> Result<(), StoreError> {
        // The one task of ours between the handlers and the server. Not the
        // pool: a pool that cannot hand out a connection looks the same as a
        // server that is away, and only the latter is common; the 503s and
        // readiness show either.
        if self.inserts.is_closed() {
            return Err(StoreError::Unavailable("the store's insert task has stopped".into()));
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        on_connection(&self.pool, async |client| {
            // A standby answers queries but takes no writes.
            let row = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(db_error)?;
            if row.get::<_, bool>(0) {
                return Err(StoreError::Unavailable(
                    "the PostgreSQL server is a read-only standby".into(),
                ));
            }
            Ok(())
        })
        .await
    }

    async fn replay(&self, target: ReplayTarget, now: i64) -> Result<u64, StoreError> {
        within(&self.pool, LONG_OP_TIMEOUT, async |client| {
            match target {
                ReplayTarget::DeadLetters {
                    sink,
                    source,
                    event_type,
                    since,
                } => {
                    // Dead letters always still have their payload: compaction
                    // only touches events with no deliveries left.
                    // A chunk per statement (see `REPLAY_CHUNK`); those
                    // dead-lettered after `now` are not taken. A source or type
                    // is looked up per dead letter, never by a walk of events.
                    let sql = format!(
                        "{REQUEUE} WHERE id IN (SELECT d.id FROM deliveries d JOIN events e ON e.seq = d.event_seq
                         WHERE d.state = 2 AND ($2::text IS NULL OR d.sink = $2)
                         AND ($5::bigint IS NULL OR d.updated_at >= $5) AND d.updated_at <= $1
                         AND ($3::text IS NULL OR e.source = $3) AND ($4::text IS NULL OR e.type = $4)
                         LIMIT $6 FOR UPDATE OF d SKIP LOCKED)"
                    );
                    let chunk = REPLAY_CHUNK as i64;
                    let mut total = 0;
                    loop {
                        let n = client
                            .execute(&sql, &[&now, &sink, &source, &event_type, &since, &chunk])
                            .await
                            .map_err(db_error)?;
                        total += n;
                        if n < REPLAY_CHUNK {
                            return Ok(total);
                        }
                    }
                }
                ReplayTarget::Event { source, id, sink } => {
                    let tx = begin(client).await.map_err(db_error)?;
                    tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&PRUNE_REPLAY_LOCK])
                        .await
                        .map_err(db_error)?;
                    // FOR SHARE: pruning skips locked events, so it cannot delete
                    // or compact this one while its deliveries are re-queued.
                    let found = tx
                        .query_opt(
                            "SELECT seq, body IS NOT NULL FROM events WHERE source = $1 AND event_id = $2 FOR SHARE",
                            &[&source, &id],
                        )
                        .await
                        .map_err(db_error)?;
                    let Some(row) = found else {
                        return Err(StoreError::NotFound);
                    };
                    let (seq, has_body): (i64, bool) = (row.get(0), row.get(1));
                    if !has_body {
                        return Err(StoreError::Pruned);
                    }
                    let n = match sink {
                        Some(s) => tx
                            .execute(
                                "INSERT INTO deliveries (event_seq, sink, state, due_at, updated_at)
                                 VALUES ($1, $2, 0, $3, $3)
                                 ON CONFLICT (event_seq, sink) DO UPDATE SET state = 0, attempts = 0, due_at = $3,
                                 lease_until = NULL, updated_at = $3
                                 WHERE NOT (deliveries.state = 0 AND COALESCE(deliveries.lease_until, 0) > $3)",
                                &[&seq, &s, &now],
                            )
                            .await
                            .map_err(db_error)?,
                        None => tx
                            // Not a delivery in flight (see the SQLite store's replay).
                            .execute(
                                &format!(
                                    "{REQUEUE} WHERE event_seq = $2 AND NOT (state = 0 AND COALESCE(lease_until, 0) > $1)"
                                ),
                                &[&now, &seq],
                            )
                            .await
                            .map_err(db_error)?,
                    };
                    tx.commit().await.map_err(db_error)?;
                    Ok(n)
                }
            }
        })
        .await
    }

    async fn prune(&self, r: Retention, now: i64) -> Result<PruneStats, StoreError> {
        let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
        let delivered_cutoff = now.saturating_sub(ms(r.keep_delivered));
        let dead_cutoff = now.saturating_sub(ms(r.keep_dead_letters));
        let dedupe_cutoff = now.saturating_sub(ms(r.dedupe_window.max(r.keep_delivered)));
        within(&self.pool, LONG_OP_TIMEOUT, async |client| {
            // One chunk per statement, each its own short transaction; rows other
            // transactions hold (a claim, a completion, a replay) are skipped,
            // not waited for: the next pass gets them.
            let run = async |sql: &str, cutoff: i64| -> Result<u64, StoreError> {
                client.execute(sql, &[&cutoff, &PRUNE_CHUNK]).await.map_err(db_error)
            };
            let mut stats = PruneStats::default();
            stats.deliveries_deleted += run(
                "DELETE FROM deliveries WHERE id IN
                 (SELECT id FROM deliveries WHERE state = 1 AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                delivered_cutoff,
            )
            .await?;
            stats.deliveries_deleted += run(
                "DELETE FROM deliveries WHERE id IN
                 (SELECT id FROM deliveries WHERE state = 2 AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                dead_cutoff,
            )
            .await?;
            // Events without deliveries: each statement after the replays in
            // progress (see PRUNE_REPLAY_LOCK), in a transaction of its own.
            let mut without_deliveries = async |sql: &str, cutoff: i64| -> Result<u64, StoreError> {
                let tx = begin(client).await.map_err(db_error)?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PRUNE_REPLAY_LOCK])
                    .await
                    .map_err(db_error)?;
                let n = tx.execute(sql, &[&cutoff, &PRUNE_CHUNK]).await.map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                Ok(n)
            };
            stats.events_compacted = without_deliveries(
                "UPDATE events SET body = NULL WHERE seq IN
                 (SELECT seq FROM events e WHERE body IS NOT NULL AND received_at < $1
                  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq)
                  LIMIT $2 FOR UPDATE SKIP LOCKED)",
                delivered_cutoff,
            )
            .await?;
            stats.events_deleted = without_deliveries(
                "DELETE FROM events WHERE seq IN
                 (SELECT seq FROM events e WHERE received_at < $1
                  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq)
                  LIMIT $2 FOR UPDATE SKIP LOCKED)",
                dedupe_cutoff,
            )
            .await?;
            Ok(stats)
        })
        .await
    }

    async fn close(&self) {
        // Every acknowledged write is already committed; closing only ends
        // the connections (those in use close when returned). Inserts still
        // queued are answered "unavailable" (not acknowledged); a statement
        // already running finishes and answers.
        self.pool.close();
    }
}
