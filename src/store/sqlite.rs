//! The embedded store: one SQLite file in WAL mode; every ack waits for an fsync of the WAL.
//!
//! One write connection commits in groups: every operation that arrived
//! while the previous group was being made durable goes into one
//! transaction, and one fsync. If one operation fails, the group is rolled
//! back and each runs in a transaction of its own, so it does not fail its
//! neighbours. Under load, many acks share an fsync; when idle, an ack waits
//! for just one. Reads (listings) use a second connection and never block
//! the writer.
//!
//! Durability is pipelined: commits use `synchronous=NORMAL` (SQLite writes
//! the WAL but does not fsync it), and a syncer thread fsyncs the WAL file
//! and only then answers the group. While that fsync runs, the next group
//! gathers in the open transaction, and the syncer commits it as the fsync
//! ends (once a least interval since the last fsync began is up, unless the
//! group is already full): an operation waits
//! for the rest of one fsync and then its own. While the syncer is at work,
//! an insert joins the open transaction on the task that makes it; other
//! operations, and an insert while the store is idle, go through a writer
//! thread that also begins the first group (see `Core`). An ack still
//! means the event is on disk. If an fsync ever fails, the store refuses
//! every write from then on (the page cache can no longer be trusted to
//! hold what was written): expeditor answers 503 and /readyz fails until
//! it is restarted.
//!
//! Checkpoints (copying the WAL into the database file, with its own fsync)
//! run on a third connection in a thread of their own, so a commit, and
//! every ack waiting on it, never pays for one.
//!
//! Which (source, event id) pairs are stored is not an index of `events`
//! (a random page per event) but sorted runs the writer keeps up: see
//! `dedupe.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::dedupe::{self, Dedupe, Tuning};
use super::*;
use crate::throttle::LogThrottle;

/// Operations the writer takes from its queue at once: between batches it
/// looks whether the syncer is idle, so it can hand it the open transaction.
const MAX_BATCH: usize = 1024;
/// Pending inserts a task applies for others before it leaves the rest to
/// the writer thread (see `Core::drain`).
const DRAIN_ON_A_TASK: usize = 32;
/// The same for the syncer, between its commit and its fsync: the inserts
/// that came during the commit, a few at most.
const DRAIN_ON_THE_SYNCER: usize = 8;
/// Bodies above this size go to the writer thread rather than joining on a
/// task: their pages could overflow SQLite's cache, and spilling them is
/// disk I/O.
const JOIN_MAX_BODY: usize = 64 * 1024;
/// Rows a prune statement touches at once, so pruning never holds the write
/// lock for long.
const PRUNE_CHUNK: i64 = 5000;
/// How long the checkpointer lets commits gather before it copies them. Each
/// copy ends with an fsync of the database file, and a WAL fsync issued
/// meanwhile waits behind its writes: small copies keep that wait short. On
/// the bench VM at 18,000 req/s, WAL fsyncs that met a checkpoint had a p99
/// of 1.8 – 3.3 ms at 25 ms and 3.8 – 9.4 ms at 100 ms (0.5 ms with none),
/// and a fifth to a third as many acks took over 5 ms (BENCHMARKS.md,
/// session 19).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(25);
/// WAL frames (pages) past which the checkpointer also restarts the WAL,
/// briefly holding the writer, so the file stays bounded under a load that
/// never pauses: 16,384 frames are 64 MiB.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// The schema's version (`PRAGMA user_version`). 0, the first, kept the
/// dedupe keys in a UNIQUE (source, event_id) index of `events`; 1 keeps them
/// in runs (see `dedupe.rs`), and events' seq is never reused
/// (`AUTOINCREMENT`); 2 hands out seqs from the writer (`store_meta`) and
/// drops the index on `received_at` alone (pruning bisects seqs), so an older
/// expeditor, which would let SQLite pick seqs, must not write to it. A store
/// of schema 1 keeps its `AUTOINCREMENT` table (harmless, slower). 3 packs
/// the runs' keys into blocks (`dedupe_blocks`, a row per few dozen keys
/// instead of `dedupe_keys`, a row per key): an older store's runs are
/// dropped on upgrade and written again from its events at open. 4 drops the
/// index of events that still have a body (compaction walks seqs instead),
/// which an older expeditor's pruning would need.
pub(super) const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,    -- from the writer, never reused (dedupe.rs: Seqs)
    source      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    type        TEXT NOT NULL,
    occurred_at INTEGER,
    received_at INTEGER NOT NULL,
    body        BLOB                -- NULL once compacted: the row is then only a dedupe key
);
-- No index on received_at alone: events come in nearly in received_at order
-- by seq, so pruning finds its boundary by seq (`received_from`), and each
-- commit writes one index fewer (a sixth of its pages).
DROP INDEX IF EXISTS events_received;
-- No index of events that still have a body either (schema 4): compaction
-- walks seqs from where its last pass stopped (`compact`), and an event that
-- still had deliveries then loses its body when they are pruned. The index
-- took an entry per insert and a fifth of the WAL frames each commit wrote.
DROP INDEX IF EXISTS events_uncompacted;
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    event_seq   INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    sink        TEXT NOT NULL,
    state       INTEGER NOT NULL,   -- 0 pending, 1 delivered, 2 dead
    attempts    INTEGER NOT NULL DEFAULT 0,
    due_at      INTEGER NOT NULL,
    lease_until INTEGER,
    last_error  TEXT,
    updated_at  INTEGER NOT NULL,
    UNIQUE (event_seq, sink)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (sink, due_at) WHERE state = 0;
-- One partial index per finished state instead of one over (state,
-- updated_at): a delivery is written once into the one its outcome needs
-- (pruning finds delivered ones by age, dead letters by sink and age),
-- where the full index took an entry at insert and a move at completion.
-- Pending deliveries are in deliveries_due already.
DROP INDEX IF EXISTS deliveries_state;
CREATE INDEX IF NOT EXISTS deliveries_delivered ON deliveries (updated_at) WHERE state = 1;
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (sink, updated_at) WHERE state = 2;
-- Pruning finds old dead letters of every sink by age alone (schema 4): by
-- (sink, updated_at) it read every dead letter kept, each pass, holding the
-- writer. Only deliveries that die write it.
CREATE INDEX IF NOT EXISTS deliveries_dead_age ON deliveries (updated_at) WHERE state = 2;
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    outcome     TEXT NOT NULL,      -- retry | dead | delivered (a delivered delivery's last
                                    -- attempt is on its row; a row here is from a replay or an older store)
    error       TEXT
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (delivery_id);
";

enum Op {
    Insert(NewEvent, oneshot::Sender<Result<Inserted, StoreError>>),
    Claim {
        sink: String,
        limit: usize,
        lease_until: i64,
        now: i64,
        reply: oneshot::Sender<Result<Vec<Claimed>, StoreError>>,
    },
    Complete(Vec<Completion>, oneshot::Sender<Result<(), StoreError>>),
    Replay(ReplayTarget, i64, oneshot::Sender<Result<u64, StoreError>>),
    Prune(Retention, i64, oneshot::Sender<Result<PruneStats, StoreError>>),
    /// A write that changes nothing but still has a page to commit and sync
    /// (`Store::writable`): an empty transaction writes nothing, so it
    /// succeeds on a full disk.
    Probe(oneshot::Sender<Result<(), StoreError>>),
    /// Commit what came before, checkpoint, and stop.
    Close(oneshot::Sender<()>),
    /// Work waits for the writer thread under the writer's lock: a group
    /// that failed where it joined (a wake-up, not a request).
    Wake,
}

pub struct SqliteStore {
    writer: mpsc::UnboundedSender<Op>,
    core: Arc<Core>,
    reader: Arc<Mutex<Connection>>,
    durability: Durability,
}

/// What the store's handle, its writer thread and its syncer share: the
/// write connection, and the inserts waiting for it.
///
/// An insert joins the open group on the task that makes it, not through
/// the writer thread, whenever the syncer is busy (and so will commit the
/// group itself as its fsync ends): under load an insert then costs no
/// thread a wake-up, and the group is ready to commit the moment the
/// fsync is done. An insert that finds the connection in use leaves
/// itself in `pending` for whoever holds it to apply once it lets go
/// (`drain`), so no task ever waits for the lock. Everything else (claims,
/// completions, pruning, an insert while the store is idle or in trouble)
/// goes through the writer thread, which may wait for locks and disks.
struct Core {
    /// `None` once the writer thread has closed the store (or could not
    /// start its syncer).
    writer: Mutex<Option<Writer>>,
    pending: Mutex<std::collections::VecDeque<Op>>,
    /// The writer thread's queue, for what cannot join a group directly.
    queue: mpsc::WeakUnboundedSender<Op>,
    /// An fsync failed: nothing is written any more.
    broken: AtomicBool,
    /// How many writes the open transaction holds, for the syncer to read.
    gathered: AtomicUsize,
    /// Inserts that joined a group directly, not through the writer
    /// thread's queue, and inserts that failed where they joined (tests
    /// check that these paths ran).
    #[cfg(test)]
    joins: [std::sync::atomic::AtomicU64; 2],
}

/// Whether an insert joined the open group. (Only ever returned, never
/// kept: the size of `No` costs nothing.)
#[allow(clippy::large_enum_variant)]
enum Joined {
    Yes,
    /// It failed there, and its group went back to the writer thread to be
    /// run one by one, which must be woken for it.
    Failed,
    /// Not here: for the writer thread.
    No(Op),
}

impl Core {
    /// A holder that panicked may have left half an operation in the open
    /// transaction: from then on the store refuses every write, as after a
    /// failed fsync.
    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Option<Writer>> {
        self.writer.lock().unwrap_or_else(|e| {
            self.broken.store(true, Ordering::Release);
            e.into_inner()
        })
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Op>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies pending inserts, at most `limit` of them, if the write
    /// connection is free; if it is not, its holder does (every holder calls
    /// this once it has let go, and a pending insert is pushed before its
    /// maker calls this, so none is left behind). Past the limit the writer
    /// thread is woken to take the rest, so a task (or the syncer, whose
    /// fsync waits meanwhile) spends little time on other requests' inserts.
    fn drain(&self, limit: usize) {
        let mut applied = 0;
        loop {
            if self.lock_pending().is_empty() {
                return;
            }
            if applied >= limit {
                self.forward(Op::Wake);
                return;
            }
            let mut guard = match self.writer.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::WouldBlock) => return,
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    self.broken.store(true, Ordering::Release);
                    e.into_inner()
                }
            };
            let mut wake = false;
            // One at a time, oldest first: nothing is allocated to hold them.
            while applied < limit {
                let Some(op) = self.lock_pending().pop_front() else {
                    break;
                };
                applied += 1;
                let joined = match guard.as_mut() {
                    Some(w) if !self.broken.load(Ordering::Acquire) => w.join(op),
                    _ => Joined::No(op),
                };
                #[cfg(test)]
                if !matches!(joined, Joined::No(_)) {
                    self.joins[matches!(joined, Joined::Failed) as usize].fetch_add(1, Ordering::Relaxed);
                }
                match joined {
                    Joined::Yes => {}
                    Joined::Failed => wake = true,
                    Joined::No(op) => self.forward(op),
                }
            }
            if let Some(w) = guard.as_ref() {
                self.gathered.store(w.gathered(), Ordering::Release);
            }
            drop(guard);
            if wake {
                self.forward(Op::Wake);
            }
        }
    }

    /// Hands an operation to the writer thread, or refuses it if that has
    /// stopped.
    fn forward(&self, op: Op) {
        match self.queue.upgrade() {
            Some(queue) => {
                if let Err(e) = queue.send(op) {
                    fail(e.0, &unavailable("store is closed"));
                }
            }
            None => fail(op, &unavailable("store is closed")),
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Waits for a lock held by another connection of this process (the
/// checkpointer's, the writer's), for up to [`BUSY_LIMIT`]. SQLite's own
/// busy timeout sleeps 1, 2, 5, 10 ms and more between tries, so a writer
/// that met a lock held for one millisecond would lose ten; this tries again
/// every 100 µs at first. The limit is time, not a count of sleeps: on a
/// busy machine a 1 ms sleep can take two. A task of the async runtime
/// never waits (`WAIT_FOR_LOCKS`).
fn busy(tries: i32) -> bool {
    if !WAIT_FOR_LOCKS.get() {
        return false;
    }
    thread_local! {
        static WAITING_SINCE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    let since = WAITING_SINCE.with(|since| {
        if tries == 0 || since.get().is_none() {
            since.set(Some(std::time::Instant::now()));
        }
        since.get().unwrap_or_else(std::time::Instant::now)
    });
    let pause = if tries < 100 {
        Duration::from_micros(100)
    } else {
        Duration::from_millis(1)
    };
    std::thread::sleep(pause);
    since.elapsed() < BUSY_LIMIT
}

thread_local! {
    /// False while a task of the async runtime writes (`Writer::join`): it
    /// must not sleep for a lock, and leaves the insert to the writer thread
    /// instead.
    static WAIT_FOR_LOCKS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Lock waits off on this thread while it lives (`WAIT_FOR_LOCKS`).
struct NoWait;

impl NoWait {
    fn new() -> Self {
        WAIT_FOR_LOCKS.set(false);
        NoWait
    }
}

impl Drop for NoWait {
    fn drop(&mut self) {
        WAIT_FOR_LOCKS.set(true);
    }
}

/// How long an operation waits for another process's lock on the database
/// before it is refused (and a webhook answered 503).
const BUSY_LIMIT: Duration = Duration::from_secs(5);

pub(super) fn open_connection(file: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(file)?;
    conn.busy_handler(Some(busy))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsync'd at every commit, so an ack survives power loss
    // (the writer switches to NORMAL once open: its sync thread fsyncs).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The checkpointer thread checkpoints; commits never do.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // One plan per statement, whatever is bound: otherwise SQLite plans a
    // statement again whenever the value bound to its `LIMIT` changes, and a
    // claim's limit is the room in its sink's queue, different nearly every
    // time (about 200,000 instructions each: a tenth of the writer's in e2e).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(conn)
}

/// The files the store keeps in its folder (`store.path`): no file sink
/// may write one (`check`), and `check` warns of those it cannot write.
pub const FILES: [&str; 5] = [
    "expeditor.db",
    "expeditor.db-wal",
    "expeditor.db-shm",
    "expeditor.db-journal",
    "expeditor.lock",
];

/// Makes the store's folder, with its missing parents, closed to other
/// users (`0750`): the events hold customers' names and addresses, and
/// SQLite makes its files as the umask says (`0644` by default). A folder
/// that exists is left as it is.
pub fn create_folder(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir)
}

/// Takes the store directory for this process alone (`expeditor.lock`, an
/// exclusive `flock`, released when the process dies): the writer's memory of
/// recent dedupe keys is the only one, so a second process on the same file
/// would store duplicates. Waits up to [`BUSY_LIMIT`] for a previous owner
/// that is still finishing (a restart).
fn lock_store(dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = dir.join("expeditor.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
    let since = std::time::Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if since.elapsed() < BUSY_LIMIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(unavailable(format!(
                    "{} is in use by another expeditor process; an embedded store serves one \
                     (run several instances on a PostgreSQL store)",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(unavailable(format!("cannot lock {}: {e}", path.display())));
            }
        }
    }
}

/// Creates the schema, or brings a store written by an older expeditor up to
/// this one's.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(unavailable)?;
    if version > SCHEMA_VERSION {
        return Err(unavailable(format!(
            "it was written by a newer expeditor (schema {version}; this one knows up to {SCHEMA_VERSION})"
        )));
    }
    let has_events: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'events')",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    let create = format!("{SCHEMA}{}PRAGMA user_version = {SCHEMA_VERSION};", dedupe::SCHEMA);
    if version == 1 {
        tracing::info!(
            "upgrading the store to schema {SCHEMA_VERSION}: expeditor hands out event seqs, and one index goes"
        );
    }
    if (1..=2).contains(&version) {
        tracing::info!("upgrading the store to schema {SCHEMA_VERSION}: dedupe keys are packed into blocks");
    }
    if (1..=3).contains(&version) {
        tracing::info!(
            "upgrading the store to schema {SCHEMA_VERSION}: the index of events with a body goes; \
             the next pruning walks the stored events once"
        );
    }
    // Schema 1 needs only `store_meta` and the index dropped, both in the
    // schema; schemas 1 and 2 drop their runs of a row per key (a key whose
    // event is gone counts for nothing, so the events alone say what the runs
    // held, and the open writes them again).
    if version >= 1 || !has_events {
        let drop_old_runs = match version {
            1 | 2 => "DROP TABLE IF EXISTS dedupe_keys; DELETE FROM dedupe_runs;",
            _ => "",
        };
        return conn
            .execute_batch(&format!("BEGIN IMMEDIATE; {create} {drop_old_runs} COMMIT;"))
            .map_err(unavailable);
    }
    // Schema 0: events is rebuilt without its UNIQUE index (SQLite cannot drop
    // one). Foreign keys are off meanwhile, so dropping the old table leaves the
    // deliveries that point at its rows; the open then writes their keys as a run.
    tracing::info!("upgrading the store to schema {SCHEMA_VERSION}: dedupe keys move out of the events table");
    conn.pragma_update(None, "foreign_keys", "OFF").map_err(unavailable)?;
    let upgraded = conn.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         CREATE TABLE events_v1 (
             seq INTEGER PRIMARY KEY, source TEXT NOT NULL, event_id TEXT NOT NULL,
             kind TEXT NOT NULL, type TEXT NOT NULL, occurred_at INTEGER, received_at INTEGER NOT NULL, body BLOB);
         INSERT INTO events_v1 (seq, source, event_id, kind, type, occurred_at, received_at, body)
             SELECT seq, source, event_id, kind, type, occurred_at, received_at, body FROM events;
         DROP TABLE events;
         ALTER TABLE events_v1 RENAME TO events;
         {create}
         COMMIT;"
    ));
    if upgraded.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.pragma_update(None, "foreign_keys", "ON").map_err(unavailable)?;
    upgraded.map_err(|e| unavailable(format!("cannot upgrade the schema: {e}")))
}

impl SqliteStore {
    /// Opens (creating if needed) the store under `dir`, and releases leases
    /// a previous run left: this store serves one process, so whatever that
    /// process had claimed was not finished.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(
            dir,
            |wal| Box::new(move || wal.sync_data()),
            Tuning::default(),
            WAL_RESTART_FRAMES,
            MIN_SYNC_INTERVAL,
        )
    }

    /// `open` with small dedupe runs, so tests see seals and merges.
    #[cfg(test)]
    pub(super) fn open_tuned(dir: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        Self::open_with(
            dir,
            |wal| Box::new(move || wal.sync_data()),
            tuning,
            WAL_RESTART_FRAMES,
            MIN_SYNC_INTERVAL,
        )
    }

    /// `open`, restarting the WAL once it passes `frames` frames, so tests
    /// see restarts after a few hundred kilobytes.
    #[cfg(test)]
    pub(super) fn open_restarting(dir: &Path, frames: i64) -> Result<Self, StoreError> {
        Self::open_with(
            dir,
            |wal| Box::new(move || wal.sync_data()),
            Tuning::default(),
            frames,
            MIN_SYNC_INTERVAL,
        )
    }

    /// `open`, with the fsync of the WAL made by `sync` from the WAL file (the
    /// tests make it fail, as a failing disk would).
    #[cfg(test)]
    pub(super) fn open_syncing(dir: &Path, sync: impl FnOnce(std::fs::File) -> SyncWal) -> Result<Self, StoreError> {
        Self::open_paced(dir, MIN_SYNC_INTERVAL, sync)
    }

    /// `open_syncing`, with fsyncs paced `interval` apart instead of
    /// [`MIN_SYNC_INTERVAL`], so tests can tell a paced fsync from one that
    /// was not on any machine.
    #[cfg(test)]
    pub(super) fn open_paced(
        dir: &Path,
        interval: Duration,
        sync: impl FnOnce(std::fs::File) -> SyncWal,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, sync, Tuning::default(), WAL_RESTART_FRAMES, interval)
    }

    /// Inserts that joined a group directly so far, and inserts that failed
    /// where they joined.
    #[cfg(test)]
    pub(super) fn joins(&self) -> (u64, u64) {
        let [joined, failed] = &self.core.joins;
        (joined.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    }

    fn open_with(
        dir: &Path,
        sync: impl FnOnce(std::fs::File) -> SyncWal,
        tuning: Tuning,
        restart_at: i64,
        interval: Duration,
    ) -> Result<Self, StoreError> {
        create_folder(dir).map_err(|e| unavailable(format!("cannot create store directory {}: {e}", dir.display())))?;
        let lock = lock_store(dir)?;
        let file: PathBuf = dir.join("expeditor.db");
        let conn = open_connection(&file).map_err(|e| unavailable(format!("cannot open {}: {e}", file.display())))?;
        migrate(&conn).map_err(|e| unavailable(format!("cannot open {}: {e}", file.display())))?;
        let released = conn
            .execute(
                // `state = 0` lets this read the small pending index, not every
                // delivery the store remembers.
                // Their attempts ended with the process, unrecorded: not
                // counted (a claim counts one as it leases), so a crash
                // loop does not spend every prefetched delivery's attempts.
                "UPDATE deliveries SET lease_until = NULL, attempts = MAX(attempts - 1, 0)
                 WHERE state = 0 AND lease_until IS NOT NULL",
                [],
            )
            .map_err(unavailable)?;
        if released > 0 {
            tracing::info!(
                deliveries = released,
                "released deliveries claimed before the last stop; they run again"
            );
        }
        dedupe::cover(&conn, tuning)?;
        let dedupe = Dedupe::load(&conn, tuning)?;
        // Reading the runs' filters filled the page cache with pages no commit
        // needs: megabytes of idle memory for a big store.
        let _ = conn.execute_batch("PRAGMA shrink_memory");
        // The syncer's fsync makes commits durable, not SQLite's (see above).
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(unavailable)?;
        // Every statement the writer runs stays prepared: rusqlite keeps 16,
        // fewer than ingest, delivery and the dedupe upkeep use between them,
        // and one evicted is parsed and planned again when next needed.
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
        let wal_file = dir.join("expeditor.db-wal");
        let wal = std::fs::File::open(&wal_file)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", wal_file.display())))?;
        let sync_wal = sync(wal);
        let reader = open_connection(&file).map_err(unavailable)?;
        let checkpointer = open_connection(&file).map_err(unavailable)?;
        let durability = Durability::default();
        let (committed, commits) = std::sync::mpsc::sync_channel(1);
        let timings = durability.checkpoints.clone();
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, commits, restart_at, timings))
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let core = Arc::new(Core {
            writer: Mutex::new(Some(Writer {
                conn,
                dedupe,
                open: None,
                committed: Vec::new(),
                last_group: 0,
                syncing: false,
                redo: Vec::new(),
                commit_failures: LogThrottle::new(Duration::from_secs(1)),
            })),
            pending: Mutex::default(),
            queue: tx.downgrade(),
            broken: AtomicBool::new(false),
            gathered: AtomicUsize::new(0),
            #[cfg(test)]
            joins: Default::default(),
        });
        let wal = WalSync {
            sync: sync_wal,
            durability: durability.clone(),
            interval,
        };
        {
            let core = core.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer_loop(core, lock, rx, committed, wal))
                .map_err(unavailable)?;
        }
        Ok(Self {
            writer: tx,
            core,
            reader: Arc::new(Mutex::new(reader)),
            durability,
        })
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(make(tx)).map_err(|_| unavailable("store is closed"))?;
        rx.await.map_err(|_| unavailable("store writer stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| unavailable("reader poisoned"))?;
            f(&conn)
        })
        .await
        .map_err(unavailable)?
    }
}

/// Checkpoints after commits, at most every [`CHECKPOINT_EVERY`], until the
/// writer goes (it checkpoints one last time itself). Once the WAL holds more
/// than `restart_at` frames it is restarted, so it is overwritten from its
/// start rather than growing. Each checkpoint's time goes to `timings`.
fn checkpoint_loop(conn: Connection, commits: std::sync::mpsc::Receiver<()>, restart_at: i64, timings: Checkpoints) {
    let timed = |mode: &'static str, sql: &str| {
        let started = std::time::Instant::now();
        let frames = conn.query_row(sql, [], |r| r.get::<_, i64>(1));
        timings
            .get_or_create(&CheckpointLabels { mode })
            .observe(started.elapsed().as_secs_f64());
        frames
    };
    while commits.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_EVERY);
        // PASSIVE: copies what it can without waiting for anyone.
        match timed("passive", "PRAGMA wal_checkpoint(PASSIVE)") {
            Ok(frames) if frames > restart_at => {
                // The writer waits (busy timeout) while the rest is copied and the
                // WAL starts over from its beginning.
                if let Err(e) = timed("restart", "PRAGMA wal_checkpoint(RESTART)") {
                    tracing::warn!(error = %e, "store checkpoint (restart) failed; retried after the next commit");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store checkpoint failed; retried after the next commit"),
        }
    }
}

/// Committed operations and what they produced, waiting for the fsync that
/// makes them durable before they are answered.
type Unsynced = Vec<(Op, Done)>;

/// Makes what was written to the WAL durable (`File::sync_data`).
pub(super) type SyncWal = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// How the syncer makes the WAL durable, and where it reports each fsync.
struct WalSync {
    sync: SyncWal,
    durability: Durability,
    /// The least time from one fsync's start to the next's (`MIN_SYNC_INTERVAL`).
    interval: Duration,
}

/// Fsyncs the WAL for each committed group, answers it, and commits the
/// next: once its interval ([`MIN_SYNC_INTERVAL`]) since the last fsync's
/// start is up, or at once if the open transaction already holds
/// [`FULL_GROUP`] writes (`gathered`). It commits that group itself, so no
/// other thread's wake-up stands between one fsync and the next; with
/// nothing to commit it goes idle (`syncing` false) until the writer thread
/// hands it a group.
fn sync_loop(
    mut wal: WalSync,
    groups: std::sync::mpsc::Receiver<Unsynced>,
    core: Arc<Core>,
    checkpoint_due: std::sync::mpsc::SyncSender<()>,
) {
    /// If the syncer panics, nothing would commit the open group again, and
    /// its writes would wait forever: the store refuses them, and every
    /// write after, until expeditor is restarted.
    struct OnPanic(Arc<Core>);
    impl Drop for OnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.broken.store(true, Ordering::Release);
                if let Some(w) = self.0.lock_writer().as_mut() {
                    w.abandon(&unavailable("store sync thread stopped; restart expeditor"));
                    w.syncing = false;
                }
            }
        }
    }
    let _on_panic = OnPanic(core.clone());
    let mut next = None;
    loop {
        let batch = match next.take() {
            Some(batch) => batch,
            None => match groups.recv() {
                Ok(batch) => batch,
                Err(_) => return,
            },
        };
        let started = std::time::Instant::now();
        let synced = if core.broken.load(Ordering::Acquire) {
            Err(unavailable(DISK_FAILED))
        } else {
            let synced = (wal.sync)();
            let took = started.elapsed();
            wal.durability.syncs.observe(took.as_secs_f64());
            if took > SLOW_COMMIT {
                tracing::warn!(took_ms = took.as_millis() as u64, "slow store fsync");
            }
            synced.map_err(|e| {
                core.broken.store(true, Ordering::Release);
                tracing::error!(error = %e, "store fsync failed; refusing writes until expeditor is restarted");
                unavailable(DISK_FAILED)
            })
        };
        if synced.is_ok() {
            wal.durability.operations.inc_by(batch.len() as u64);
        }
        for (op, done) in batch {
            answer(op, done, synced.as_ref().err());
        }
        if started.elapsed() < wal.interval
            && core.gathered.load(Ordering::Acquire) < FULL_GROUP
            && let Some(rest) = wal.interval.checked_sub(started.elapsed())
        {
            std::thread::sleep(rest);
        }
        {
            let mut guard = core.lock_writer();
            if let Some(w) = guard.as_mut() {
                if core.broken.load(Ordering::Acquire) {
                    w.abandon(&unavailable(DISK_FAILED));
                    w.syncing = false;
                } else if w.commit() {
                    next = Some(std::mem::take(&mut w.committed));
                    // Full means a checkpoint is already due: nothing to add.
                    let _ = checkpoint_due.try_send(());
                } else {
                    w.syncing = false;
                }
                core.gathered.store(w.gathered(), Ordering::Release);
            }
        }
        core.drain(DRAIN_ON_THE_SYNCER);
    }
}

/// Statements the writer keeps prepared (about 30 distinct ones are in use).
const WRITER_STATEMENTS: usize = 64;

/// Runs a statement that returns no rows (`BEGIN`, `COMMIT`), prepared once:
/// `execute_batch` would parse it again for every group.
pub(super) fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// The least time from one fsync's start to the next's. Under moderate load
/// an fsync takes a fraction of a millisecond, and starting the next one at
/// once gives groups of one or two events: each commit rewrites the same
/// table and index tail pages, and each fsync costs the kernel (and the
/// host) work of its own, so CPU per event grows as the load falls. With
/// 64 clients in a closed loop the interval is also most of an ack's wait,
/// so it is a trade: on the bench VM 1 ms cut CPU and the half-rate tail on
/// a slow disk (session 5), and on a fast one (fsync ~0.3 ms) 0.5 ms gave
/// ~16 % more flat-out ingest than 1 ms with delivery throughput even, while
/// none at all cost a sixth of fan-out throughput (BENCHMARKS.md). Sparse
/// events (more than the interval apart) never wait for it, and neither does
/// a [`FULL_GROUP`].
pub(super) const MIN_SYNC_INTERVAL: Duration = Duration::from_micros(500);

/// Writes in the open transaction that make it worth its fsync at once: the
/// interval exists to gather a group, and once one has gathered while the
/// last fsync ran, waiting out the interval only lengthens every ack in it.
/// On the bench VM, flat-out ingest +3.5 – 5.5 % (10 of 11 alternating
/// pairs), the half-rate tail and delivery even (BENCHMARKS.md, session 20).
/// Under moderate load fewer than this arrive during an fsync, and the
/// interval still paces the fsyncs.
pub(super) const FULL_GROUP: usize = 8;

const DISK_FAILED: &str = "the store's disk failed to sync; restart expeditor once the disk is fixed";

/// The write connection and the operations it holds between arrival and
/// answer: applied in the open transaction, or committed and waiting for
/// the syncer.
struct Writer {
    conn: Connection,
    dedupe: Dedupe,
    /// Applied in the open transaction (`BEGIN` done, no `COMMIT` yet).
    open: Option<Unsynced>,
    /// Committed, not yet handed to the syncer.
    committed: Unsynced,
    /// How many operations the last committed group held.
    last_group: usize,
    /// The syncer is at work: it commits the open transaction when its
    /// fsync ends, so an insert may join it directly (`join`).
    syncing: bool,
    /// A group that failed where an insert joined it, rolled back, for the
    /// writer thread to run again one by one.
    redo: Vec<Op>,
    /// A full disk fails every group: a line a second, not one per group.
    commit_failures: LogThrottle,
}

fn writer_loop(
    core: Arc<Core>,
    // Held until the last write is done: the next open of the store waits for it.
    lock: std::fs::File,
    mut rx: mpsc::UnboundedReceiver<Op>,
    checkpoint_due: std::sync::mpsc::SyncSender<()>,
    wal: WalSync,
) {
    // The writer hands a group over only while the syncer is idle (after
    // that the syncer commits the next itself), so one slot is all the
    // channel needs.
    let (to_syncer, groups) = std::sync::mpsc::sync_channel::<Unsynced>(1);
    let syncer = {
        let (core, checkpoint_due) = (core.clone(), checkpoint_due.clone());
        std::thread::Builder::new()
            .name("store-sync".into())
            .spawn(move || sync_loop(wal, groups, core, checkpoint_due))
    };
    let syncer = match syncer {
        Ok(handle) => handle,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the store's sync thread");
            core.lock_writer().take();
            core.drain(usize::MAX);
            while let Some(op) = rx.blocking_recv() {
                fail(op, &unavailable("store sync thread did not start"));
            }
            return;
        }
    };
    let mut ops = Vec::with_capacity(MAX_BATCH);
    let mut closed = None;
    while let Some(op) = rx.blocking_recv() {
        ops.push(op);
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        ops.retain(|op| !matches!(op, Op::Wake));
        if let Some(i) = ops.iter().position(|op| matches!(op, Op::Close(_))) {
            // Everything queued after the close is refused, as if it came later.
            for op in ops.drain(i + 1..) {
                fail(op, &unavailable("store is closed"));
            }
            if let Some(Op::Close(reply)) = ops.pop() {
                closed = Some(reply);
            }
        }
        {
            let mut guard = core.lock_writer();
            let Some(w) = guard.as_mut() else { break };
            if core.broken.load(Ordering::Acquire) {
                w.abandon(&unavailable(DISK_FAILED));
                for op in ops.drain(..) {
                    fail(op, &unavailable(DISK_FAILED));
                }
            } else if let Err(err) = {
                w.redo();
                w.apply(&mut ops)
            } {
                // The database stayed locked for the whole busy wait: what queued
                // behind it has waited too, and is refused with it rather than
                // after a wait of its own. Only what was queued when the wait
                // ended, and all answered after it is taken: a write sent in reply
                // to one of these answers is not refused with them.
                for _ in 0..rx.len() {
                    match rx.try_recv() {
                        Ok(Op::Close(reply)) => {
                            closed = Some(reply);
                            break;
                        }
                        Ok(op) => ops.push(op),
                        Err(_) => break,
                    }
                }
                // So have the inserts left for the lock's holder meanwhile.
                ops.extend(core.lock_pending().drain(..));
                for op in ops.drain(..) {
                    fail(op, &err);
                }
            }
            if closed.is_none() && !w.syncing && w.commit() {
                w.syncing = true;
                // The syncer lives as long as this loop; if it died, dropping the
                // group here answers each operation "store writer stopped".
                let _ = to_syncer.send(std::mem::take(&mut w.committed));
                // Full means a checkpoint is already due: nothing to add.
                let _ = checkpoint_due.try_send(());
            }
            core.gathered.store(w.gathered(), Ordering::Release);
        }
        core.drain(usize::MAX);
        if closed.is_some() {
            break;
        }
    }
    // From here inserts go to the queue, which refuses them once closed.
    let mut w = core.lock_writer().take();
    core.drain(usize::MAX);
    if let Some(w) = w.as_mut() {
        if core.broken.load(Ordering::Acquire) {
            w.abandon(&unavailable(DISK_FAILED));
        } else {
            w.redo();
        }
        // Everything applied is committed and answered before the close is
        // (the syncer has taken whatever came before, or committed it itself;
        // if it has yet to take the last hand-off, this waits for it).
        if w.commit() {
            let _ = to_syncer.send(std::mem::take(&mut w.committed));
        }
    }
    drop(checkpoint_due);
    drop(to_syncer);
    let _ = syncer.join();
    rx.close();
    while let Ok(op) = rx.try_recv() {
        fail(op, &unavailable("store is closed"));
    }
    if let Some(w) = w {
        // Fold the WAL into the database so the next start has nothing to replay.
        let _ = w.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    }
    drop(lock);
    if let Some(reply) = closed {
        let _ = reply.send(());
    }
}

/// A commit slower than this is logged: every ack in it waited that long.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

impl Writer {
    /// Applies operations to the open transaction, beginning one if needed.
    /// If one fails, the transaction is rolled back and everything in it runs
    /// again one by one (no savepoint per operation on the common path; they
    /// cost a third of the writer's time), so only the failing one fails.
    /// `Err` if no transaction could begin (the database stayed locked):
    /// then `ops` are left for the caller to refuse.
    fn apply(&mut self, ops: &mut Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            // IMMEDIATE: take the write lock up front. A deferred transaction that
            // reads before it writes (claims do) cannot wait for a lock held by
            // another connection; SQLite fails it at once instead of using the
            // busy timeout, and every operation in the group with it.
            if let Err(e) = exec(&self.conn, "BEGIN IMMEDIATE") {
                // The caller refuses `ops`, with what queued behind them.
                return Err(unavailable(e));
            }
            // As big as the last group, so it does not grow (and copy every
            // operation it holds) again and again while the fsync runs.
            self.open = Some(Vec::with_capacity(ops.len().max(self.last_group)));
        }
        let open = self.open.as_mut().expect("a transaction is open");
        let mut inserts = Inserts::default();
        let mut ops = ops.drain(..);
        for op in ops.by_ref() {
            let d = run(&self.conn, &mut self.dedupe, &op, &mut inserts);
            if d.failed() {
                drop(inserts);
                let mut again = self.roll_back(op);
                again.extend(ops);
                self.dedupe.reload(&self.conn);
                self.one_by_one(again);
                return Ok(());
            }
            open.push((op, d));
        }
        Ok(())
    }

    /// An insert into the open group, made by whoever holds the write
    /// connection when it arrives, most often the task that inserts (see
    /// `Core`): only while the syncer is at work, so that it commits the
    /// group, and never waiting for a lock (the writer thread does that).
    /// A failure rolls the group back and sends it to the writer thread
    /// (`redo`), with the rereading of the dedupe state: that is not for a
    /// task of the async runtime.
    fn join(&mut self, op: Op) -> Joined {
        let joins = match &op {
            Op::Insert(ev, _) => ev.body.len() <= JOIN_MAX_BODY,
            _ => false,
        };
        if !joins || !self.syncing || !self.redo.is_empty() || self.dedupe.is_stale() {
            return Joined::No(op);
        }
        // Its `BEGIN` may not sleep for a lock here: busy, it goes to the
        // writer thread, which waits.
        let _no_wait = NoWait::new();
        if self.open.is_none() {
            if exec(&self.conn, "BEGIN IMMEDIATE").is_err() {
                return Joined::No(op);
            }
            self.open = Some(Vec::with_capacity(self.last_group.max(1)));
        }
        let open = self.open.as_mut().expect("a transaction is open");
        let mut inserts = Inserts::default();
        let d = run(&self.conn, &mut self.dedupe, &op, &mut inserts);
        drop(inserts);
        if d.failed() {
            self.redo = self.roll_back(op);
            self.dedupe.forget();
            return Joined::Failed;
        }
        open.push((op, d));
        Joined::Yes
    }

    /// Runs again, one by one, a group that failed where an insert joined
    /// it, after reading the dedupe state back (keeping the runs' filters).
    fn redo(&mut self) {
        if self.redo.is_empty() {
            return;
        }
        if self.dedupe.is_stale() {
            self.dedupe.reload(&self.conn);
        }
        let redo = std::mem::take(&mut self.redo);
        self.one_by_one(redo);
    }

    /// Rolls the open transaction back after `failed` failed in it: its
    /// operations and `failed`, to run again one by one (the dedupe state
    /// must be read back before they do).
    fn roll_back(&mut self, failed: Op) -> Vec<Op> {
        if let Err(e) = self.conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "store rollback failed");
        }
        let mut again: Vec<Op> = self.open.take().into_iter().flatten().map(|(op, _)| op).collect();
        again.push(failed);
        again
    }

    /// Writes in the open transaction.
    fn gathered(&self) -> usize {
        self.open.as_ref().map_or(0, Vec::len)
    }

    /// Runs each operation in a transaction of its own, after a group failed
    /// and was rolled back.
    fn one_by_one(&mut self, ops: Vec<Op>) {
        tracing::debug!(
            operations = ops.len(),
            "store group failed; running its operations one by one"
        );
        for op in ops {
            match alone(&mut self.conn, &mut self.dedupe, &op) {
                Done::Failed(e) => {
                    self.dedupe.reload(&self.conn);
                    answer(op, Done::Failed(e), None)
                }
                d => self.committed.push((op, d)),
            }
        }
    }

    /// Commits the open transaction. True if anything waits for an fsync.
    fn commit(&mut self) -> bool {
        if let Some(open) = self.open.take() {
            let started = std::time::Instant::now();
            self.dedupe.work(&self.conn);
            match exec(&self.conn, "COMMIT") {
                Ok(()) => {
                    self.last_group = open.len();
                    if self.committed.is_empty() {
                        self.committed = open;
                    } else {
                        self.committed.extend(open);
                    }
                }
                Err(e) => {
                    if let Some(held_back) = self.commit_failures.pass_now() {
                        tracing::error!(error = %e, held_back, "store commit failed; nothing in this group is acknowledged");
                    }
                    let _ = self.conn.execute_batch("ROLLBACK");
                    self.dedupe.reload(&self.conn);
                    let err = unavailable(e);
                    for (op, _) in open {
                        fail(op, &err);
                    }
                }
            }
            if started.elapsed() > SLOW_COMMIT {
                tracing::warn!(took_ms = started.elapsed().as_millis() as u64, "slow store commit");
            }
        }
        !self.committed.is_empty()
    }

    /// Fails everything not yet handed to the syncer, and a group waiting
    /// to be run again.
    fn abandon(&mut self, err: &StoreError) {
        if let Some(open) = self.open.take() {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.dedupe.reload(&self.conn);
            for (op, _) in open {
                fail(op, err);
            }
        }
        for (op, _) in self.committed.drain(..) {
            fail(op, err);
        }
        for op in self.redo.drain(..) {
            fail(op, err);
        }
    }
}

/// One operation in a transaction of its own.
fn alone(conn: &mut Connection, dedupe: &mut Dedupe, op: &Op) -> Done {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return Done::Failed(unavailable(e)),
    };
    let mut inserts = Inserts::default();
    let d = run(&tx, dedupe, op, &mut inserts);
    drop(inserts);
    if d.failed() {
        return d; // dropping the transaction rolls it back
    }
    match tx.commit() {
        Ok(()) => d,
        Err(e) => Done::Failed(unavailable(e)),
    }
}

fn fail(op: Op, err: &StoreError) {
    answer(op, Done::Failed(err.clone()), None);
}

/// What an operation produced, until its commit is known.
enum Done {
    Inserted(Inserted),
    Claimed(Vec<Claimed>),
    Completed,
    Replayed(u64),
    Pruned(PruneStats),
    Closed,
    /// An answer that wrote nothing (no such event for a replay).
    Refused(StoreError),
    /// The database failed the operation part way: its transaction must go.
    Failed(StoreError),
}

impl Done {
    fn failed(&self) -> bool {
        matches!(self, Done::Failed(_))
    }
}

/// Runs one operation inside the group's transaction.
fn run<'c>(t: &'c Connection, dedupe: &mut Dedupe, op: &Op, inserts: &mut Inserts<'c>) -> Done {
    let refused_or_failed = |e: StoreError| match e {
        StoreError::Unavailable(_) => Done::Failed(e),
        other => Done::Refused(other),
    };
    match op {
        Op::Insert(ev, _) => insert(t, dedupe, ev, inserts).map_or_else(refused_or_failed, Done::Inserted),
        Op::Claim {
            sink,
            limit,
            lease_until,
            now,
            ..
        } => claim(t, sink, *limit, *lease_until, *now).map_or_else(refused_or_failed, Done::Claimed),
        Op::Complete(done, _) => complete(t, done).map_or_else(refused_or_failed, |()| Done::Completed),
        Op::Replay(target, now, _) => replay(t, dedupe, target, *now).map_or_else(refused_or_failed, Done::Replayed),
        Op::Prune(retention, now, _) => prune(t, dedupe, *retention, *now).map_or_else(refused_or_failed, Done::Pruned),
        // The schema version rewritten as it is: SQLite writes the header
        // page out again even when a pragma sets the value it already has.
        Op::Probe(_) => t
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(unavailable)
            .map_or_else(refused_or_failed, |()| Done::Completed),
        Op::Close(_) | Op::Wake => Done::Closed,
    }
}

/// Answers an operation: with what it produced, or the commit's error.
fn answer(op: Op, done: Done, commit_error: Option<&StoreError>) {
    fn send<T>(to: oneshot::Sender<Result<T, StoreError>>, r: Result<T, StoreError>, commit: Option<&StoreError>) {
        let _ = to.send(match commit {
            Some(e) => Err(e.clone()),
            None => r,
        });
    }
    let done = match done {
        Done::Refused(e) | Done::Failed(e) => Err(e),
        d => Ok(d),
    };
    macro_rules! reply {
        ($to:expr, $pat:pat => $v:expr) => {
            send(
                $to,
                match done {
                    Err(e) => Err(e),
                    Ok($pat) => Ok($v),
                    Ok(_) => Err(unavailable("store answered the wrong operation")),
                },
                commit_error,
            )
        };
    }
    match op {
        Op::Insert(_, to) => reply!(to, Done::Inserted(i) => i),
        Op::Claim { reply: to, .. } => reply!(to, Done::Claimed(c) => c),
        Op::Complete(_, to) => reply!(to, Done::Completed => ()),
        Op::Replay(_, _, to) => reply!(to, Done::Replayed(n) => n),
        Op::Prune(_, _, to) => reply!(to, Done::Pruned(p) => p),
        Op::Probe(to) => reply!(to, Done::Completed => ()),
        Op::Close(to) => {
            let _ = to.send(());
        }
        Op::Wake => {}
    }
}

/// The statements every insert runs, prepared once per batch of operations
/// instead of fetched from rusqlite's cache per event (which hashes the SQL
/// text and reorders its list each time: about 6 % of the writer's
/// instructions, by callgrind).
#[derive(Default)]
struct Inserts<'c> {
    event: Option<rusqlite::CachedStatement<'c>>,
    delivery: Option<rusqlite::CachedStatement<'c>>,
    dead: Option<rusqlite::CachedStatement<'c>>,
}

/// The statement in `slot`, prepared (from rusqlite's cache) on first use.
fn prepared<'s, 'c>(
    slot: &'s mut Option<rusqlite::CachedStatement<'c>>,
    t: &'c Connection,
    sql: &str,
) -> Result<&'s mut rusqlite::CachedStatement<'c>, StoreError> {
    if slot.is_none() {
        *slot = Some(t.prepare_cached(sql).map_err(unavailable)?);
    }
    Ok(slot.as_mut().expect("prepared above"))
}

fn insert<'c>(
    t: &'c Connection,
    dedupe: &mut Dedupe,
    ev: &NewEvent,
    inserts: &mut Inserts<'c>,
) -> Result<Inserted, StoreError> {
    if dedupe.find(t, &ev.source, &ev.event_id)?.is_some() {
        return Ok(Inserted::Duplicate);
    }
    let seq = dedupe.next_seq(t)?;
    let stmt = prepared(
        &mut inserts.event,
        t,
        "INSERT INTO events (seq, source, event_id, kind, type, occurred_at, received_at, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    stmt.execute(params![
        seq,
        ev.source,
        ev.event_id,
        ev.kind,
        ev.event_type,
        ev.occurred_at,
        ev.received_at,
        &ev.body[..]
    ])
    .map_err(unavailable)?;
    dedupe.add(&ev.source, &ev.event_id, seq);
    if !ev.dead.is_empty() {
        let stmt = prepared(
            &mut inserts.dead,
            t,
            "INSERT INTO deliveries (event_seq, sink, state, attempts, due_at, last_error, updated_at)
             VALUES (?1, ?2, 2, 0, ?3, ?4, ?3)",
        )?;
        for (sink, error) in &ev.dead {
            stmt.execute(params![seq, sink, ev.received_at, error])
                .map_err(unavailable)?;
        }
    }
    if ev.sinks.is_empty() {
        return Ok(Inserted::New(Vec::new()));
    }
    let stmt = prepared(
        &mut inserts.delivery,
        t,
        "INSERT INTO deliveries (event_seq, sink, state, attempts, due_at, lease_until, updated_at)
         VALUES (?1, ?2, 0, ?3, ?4, ?5, ?4)",
    )?;
    let mut held = vec![0; ev.held.len()];
    for sink in &ev.sinks {
        let h = ev.held.iter().position(|h| &h.sink == sink);
        let lease_until = h.map(|i| ev.held[i].lease_until);
        stmt.execute(params![seq, sink, h.is_some() as i64, ev.received_at, lease_until])
            .map_err(unavailable)?;
        if let Some(i) = h {
            held[i] = t.last_insert_rowid();
        }
    }
    Ok(Inserted::New(held))
}

/// The deliveries a claim takes, oldest first: due, unleased or with a lease
/// run out, with the attempt each is now: the next one, or, where a lease
/// ran out, the same one again (its holder died before it could record how
/// it went).
pub(super) const CLAIM: &str =
    "SELECT d.id, MAX(d.attempts + (d.lease_until IS NULL), 1), e.source, e.event_id, e.kind, e.type, e.occurred_at, e.received_at, e.body,
            d.lease_until IS NOT NULL
     FROM deliveries d JOIN events e ON e.seq = d.event_seq
     WHERE d.sink = ?1 AND d.state = 0 AND d.due_at <= ?2
       AND (d.lease_until IS NULL OR d.lease_until <= ?2)
     ORDER BY d.due_at LIMIT ?3";

fn claim(t: &Connection, sink: &str, limit: usize, lease_until: i64, now: i64) -> Result<Vec<Claimed>, StoreError> {
    let mut select = t.prepare_cached(CLAIM).map_err(unavailable)?;
    let rows = select
        .query_map(params![sink, now, limit as i64], |r| {
            Ok(Claimed {
                delivery_id: r.get(0)?,
                sink: sink.to_string(),
                attempt: r.get::<_, u32>(1)?,
                taken_over: r.get(9)?,
                lease_until,
                event: StoredEvent {
                    source: r.get(2)?,
                    event_id: r.get(3)?,
                    kind: r.get(4)?,
                    event_type: r.get(5)?,
                    occurred_at: r.get(6)?,
                    received_at: r.get(7)?,
                    body: r.get::<_, Option<Vec<u8>>>(8)?.unwrap_or_default(),
                },
                prepared: None,
            })
        })
        .map_err(unavailable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unavailable)?;
    let mut lease = t
        .prepare_cached(
            "UPDATE deliveries SET lease_until = ?2, attempts = MAX(attempts + (lease_until IS NULL), 1)
             WHERE id = ?1",
        )
        .map_err(unavailable)?;
    for c in &rows {
        lease
            .execute(params![c.delivery_id, lease_until])
            .map_err(unavailable)?;
    }
    Ok(rows)
}

fn complete(t: &Connection, done: &[Completion]) -> Result<(), StoreError> {
    let mut update = t
        .prepare_cached(
            "UPDATE deliveries SET state = ?2, due_at = COALESCE(?3, due_at), lease_until = NULL,
             last_error = ?4, updated_at = ?5 WHERE id = ?1 AND state = 0 AND attempts = ?6 AND lease_until = ?7",
        )
        .map_err(unavailable)?;
    let mut log = t
        .prepare_cached(
            "INSERT INTO attempts (delivery_id, attempt, finished_at, outcome, error) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(unavailable)?;
    let mut release = t
        .prepare_cached(
            "UPDATE deliveries SET lease_until = NULL, attempts = attempts - 1
             WHERE id = ?1 AND state = 0 AND attempts = ?2 AND lease_until = ?3",
        )
        .map_err(unavailable)?;
    for c in done {
        let (state, due, error, outcome) = match &c.result {
            Completed::Delivered => (Status::Delivered, None, None, "delivered"),
            Completed::Retry { due_at, error } => (Status::Pending, Some(*due_at), Some(stored_error(error)), "retry"),
            Completed::Dead { error } => (Status::Dead, None, Some(stored_error(error)), "dead"),
            Completed::Released => {
                release
                    .execute(params![c.delivery_id, c.attempt, c.lease_until])
                    .map_err(unavailable)?;
                continue;
            }
        };
        let n = update
            .execute(params![
                c.delivery_id,
                state.code(),
                due,
                error,
                c.finished_at,
                c.attempt,
                c.lease_until
            ])
            .map_err(unavailable)?;
        // Only the holder of the current claim (attempt and lease) may finish
        // it: a completion that arrives after its lease ran out and the
        // delivery was claimed again (or replayed, or pruned) must not
        // overwrite the newer state.
        // The last attempt of a delivered delivery is on its row already
        // (attempts, updated_at, no error): it gets no log row of its own, a
        // table and index insert fewer for nearly every delivery (see
        // `attempt_log`; a replay writes it out before it resets the row).
        if n > 0 && !matches!(c.result, Completed::Delivered) {
            log.execute(params![c.delivery_id, c.attempt, c.finished_at, outcome, error])
                .map_err(unavailable)?;
        }
    }
    Ok(())
}

fn replay(t: &Connection, dedupe: &mut Dedupe, target: &ReplayTarget, now: i64) -> Result<u64, StoreError> {
    const REQUEUE: &str =
        "UPDATE deliveries SET state = 0, attempts = 0, due_at = ?1, lease_until = NULL, updated_at = ?1";
    match target {
        ReplayTarget::DeadLetters {
            sink,
            source,
            event_type,
            since,
        } => {
            // Dead letters always still have their payload: compaction only
            // touches events with no deliveries left. At most a chunk per
            // call (see `REPLAY_CHUNK`); those dead-lettered after `now`
            // (a replay's own, if the sink is still down) are not taken. A
            // source or type is looked up per dead letter (by seq), never
            // by a walk of the events: this holds the writer.
            let n = t
                .execute(
                    &format!(
                        "{REQUEUE} WHERE id IN (SELECT d.id FROM deliveries d JOIN events e ON e.seq = d.event_seq
                         WHERE d.state = 2 AND (?2 IS NULL OR d.sink = ?2) AND (?5 IS NULL OR d.updated_at >= ?5)
                         AND d.updated_at <= ?1
                         AND (?3 IS NULL OR e.source = ?3) AND (?4 IS NULL OR e.type = ?4)
                         LIMIT ?6)"
                    ),
                    params![now, sink, source, event_type, since, REPLAY_CHUNK as i64],
                )
                .map_err(unavailable)?;
            Ok(n as u64)
        }
        ReplayTarget::Event { source, id, sink } => {
            let Some(seq) = dedupe.find(t, source, id)? else {
                return Err(StoreError::NotFound);
            };
            let has_body: bool = t
                .query_row("SELECT body IS NOT NULL FROM events WHERE seq = ?1", [seq], |r| {
                    r.get(0)
                })
                .map_err(unavailable)?;
            if !has_body {
                return Err(StoreError::Pruned);
            }
            // A delivery in flight (pending, its lease running) is left to its
            // attempt: reset, it would be claimed and sent beside it, and the
            // first attempt's outcome would then stand for the second's. The
            // delivered attempts this resets live only on their rows: log
            // them first, so the history keeps them.
            t.execute(
                "INSERT INTO attempts (delivery_id, attempt, finished_at, outcome, error)
                 SELECT d.id, d.attempts, d.updated_at, 'delivered', NULL FROM deliveries d
                 WHERE d.event_seq = ?1 AND (?2 IS NULL OR d.sink = ?2) AND d.state = 1
                   AND NOT EXISTS (SELECT 1 FROM attempts a
                                   WHERE a.delivery_id = d.id AND a.attempt = d.attempts AND a.outcome = 'delivered'
                                     AND a.finished_at = d.updated_at)",
                params![seq, sink],
            )
            .map_err(unavailable)?;
            let n = match sink {
                Some(s) => t
                    .execute(
                        "INSERT INTO deliveries (event_seq, sink, state, due_at, updated_at) VALUES (?1, ?2, 0, ?3, ?3)
                         ON CONFLICT (event_seq, sink) DO UPDATE SET state = 0, attempts = 0, due_at = ?3,
                         lease_until = NULL, updated_at = ?3
                         WHERE NOT (deliveries.state = 0 AND COALESCE(deliveries.lease_until, 0) > ?3)",
                        params![seq, s, now],
                    )
                    .map_err(unavailable)?,
                None => t
                    .execute(
                        &format!(
                            "{REQUEUE} WHERE event_seq = ?2 AND NOT (state = 0 AND COALESCE(lease_until, 0) > ?1)"
                        ),
                        params![now, seq],
                    )
                    .map_err(unavailable)?,
            };
            Ok(n as u64)
        }
    }
}

/// A delivery's attempts: the logged ones, then, for a delivered delivery,
/// its last attempt from the row itself (`complete` logs no row for it; a
/// store written before that did, with the row's attempt number and time,
/// and then it is not added twice; a replay's logged copy of an earlier
/// delivery has an earlier time).
fn attempt_log(delivery: &DeliveryRow, mut logged: Vec<AttemptRow>) -> Vec<AttemptRow> {
    let delivered = delivery.status == Status::Delivered;
    if delivered
        && !logged
            .iter()
            .any(|a| a.attempt == delivery.attempts && a.outcome == "delivered" && a.finished_at == delivery.updated_at)
    {
        logged.push(AttemptRow {
            attempt: delivery.attempts,
            finished_at: delivery.updated_at,
            outcome: "delivered".into(),
            error: None,
        });
    }
    logged
}

/// A row of `SELECT d.id, e.source, e.event_id, e.type, d.sink, d.state,
/// d.attempts, d.due_at, d.last_error, d.updated_at`.
fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
    let source: String = r.get(1)?;
    let event_id: String = r.get(2)?;
    let sink: String = r.get(4)?;
    let status = Status::from_code(r.get(5)?);
    Ok(DeliveryRow {
        id: r.get(0)?,
        key: expeditor_api::delivery_key(&source, &event_id, &sink),
        source,
        event_id,
        event_type: r.get(3)?,
        sink,
        status,
        attempts: r.get(6)?,
        next_attempt_at: (status == Status::Pending).then(|| r.get(7)).transpose()?,
        last_error: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

fn prune(t: &Connection, dedupe: &mut Dedupe, r: Retention, now: i64) -> Result<PruneStats, StoreError> {
    let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
    let delivered_cutoff = now.saturating_sub(ms(r.keep_delivered));
    let dead_cutoff = now.saturating_sub(ms(r.keep_dead_letters));
    let dedupe_cutoff = now.saturating_sub(ms(r.dedupe_window.max(r.keep_delivered)));
    let mut stats = PruneStats::default();
    // Deliveries go first; each event whose last one went, and that is past
    // keep_delivered, loses its body now: compaction's walk may have passed it.
    let mut emptied: Vec<i64> = Vec::new();
    // The states are literals: only then can SQLite use their partial indexes.
    let finished = [(PRUNE_DELIVERED, delivered_cutoff), (PRUNE_DEAD, dead_cutoff)];
    for (sql, cutoff) in finished {
        let mut delete = t.prepare_cached(sql).map_err(unavailable)?;
        let seqs = delete
            .query_map(params![cutoff, PRUNE_CHUNK], |r| r.get::<_, i64>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<i64>>>())
            .map_err(unavailable)?;
        stats.deliveries_deleted += seqs.len() as u64;
        emptied.extend(seqs);
    }
    emptied.sort_unstable();
    emptied.dedup();
    // Past the dedupe window too, it goes whole: the deletion walk below
    // may have passed it while it still had deliveries.
    let mut delete_one = t.prepare_cached(DELETE_ONE).map_err(unavailable)?;
    let mut compact_one = t.prepare_cached(COMPACT_ONE).map_err(unavailable)?;
    for seq in emptied {
        let deleted = delete_one.execute(params![seq, dedupe_cutoff]).map_err(unavailable)? as u64;
        stats.events_deleted += deleted;
        if deleted == 0 {
            stats.events_compacted += compact_one
                .execute(params![seq, delivered_cutoff])
                .map_err(unavailable)? as u64;
        }
    }
    let (compacted, more_compact) = compact(t, delivered_cutoff)?;
    stats.events_compacted += compacted;
    let (deleted, more_delete) = delete_walk(t, dedupe_cutoff, now)?;
    stats.events_deleted += deleted;
    stats.more = more_compact || more_delete;
    if stats.events_deleted > 0 {
        dedupe.drop_empty_runs(t)?;
    }
    Ok(stats)
}

/// Deletes up to `?2` delivered deliveries finished before `?1`, found by
/// age in their partial index, and says whose events they were.
pub(super) const PRUNE_DELIVERED: &str = "DELETE FROM deliveries WHERE id IN
     (SELECT id FROM deliveries WHERE state = 1 AND updated_at < ?1 LIMIT ?2)
     RETURNING event_seq";
/// The same for dead letters.
pub(super) const PRUNE_DEAD: &str = "DELETE FROM deliveries WHERE id IN
     (SELECT id FROM deliveries WHERE state = 2 AND updated_at < ?1 LIMIT ?2)
     RETURNING event_seq";

/// Drops the body of event `?1` if it was received before `?2` and has no
/// deliveries left (its seq is in no delivery: the UNIQUE index's prefix).
const COMPACT_ONE: &str = "UPDATE events SET body = NULL
     WHERE seq = ?1 AND body IS NOT NULL AND received_at < ?2
       AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = ?1)";

/// Deletes event `?1` if it was received before `?2` (past the dedupe
/// window) and has no deliveries left.
const DELETE_ONE: &str = "DELETE FROM events
     WHERE seq = ?1 AND received_at < ?2
       AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = ?1)";

/// Deletes events past the dedupe window with no deliveries, walking seqs
/// from where the last pass stopped (`deleted_to`), as [`compact`] does.
/// One that still has deliveries is passed, not looked at again on every
/// pass: dead letters are kept longer than the dedupe window, and a walk
/// from the lowest seq read every such event each pass, holding the writer
/// (1M of them: 0.3 s a pass). It goes when its last delivery is pruned
/// (`DELETE_ONE`). Once a day, having caught up, it starts again from the
/// lowest seq: an event whose `received_at` is out of seq order by more than
/// the overlap (the clock stepped back) is passed while still too young, and
/// this finds it. Returns how many went, and whether the walk is behind.
fn delete_walk(t: &Connection, cutoff: i64, now: i64) -> Result<(u64, bool), StoreError> {
    const SWEEP_EVERY: i64 = 24 * 3600 * 1000;
    let walked = walk_seqs(
        t,
        "deleted_to",
        "DELETE FROM events
         WHERE seq >= ?1 AND seq < ?2 AND received_at < ?3
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq)",
        cutoff,
    )?;
    if !walked.behind && now.saturating_sub(meta(t, "deleted_swept_at")?) >= SWEEP_EVERY {
        // From the lowest seq again at the next pass.
        set_meta(t, "deleted_to", 0)?;
        set_meta(t, "deleted_swept_at", now)?;
    }
    Ok((walked.changed, walked.behind))
}

/// What a pass of [`walk_seqs`] did.
struct Walked {
    /// Rows its statement changed.
    changed: u64,
    /// It stopped short of the boundary.
    behind: bool,
}

/// Runs `sql` (`?1`..`?2` a span of seqs, `?3` the cutoff) over the seqs of
/// events received before `cutoff`, from where the last pass stopped (the
/// `store_meta` value `cursor`; a new one starts at the lowest seq) less
/// [`COMPACT_OVERLAP`]: at most [`COMPACT_PASS`] seqs a pass, stopping
/// after the span in which [`PRUNE_CHUNK`] rows changed (so up to twice
/// that). The cursor only ever moves forward.
fn walk_seqs(t: &Connection, cursor: &str, sql: &str, cutoff: i64) -> Result<Walked, StoreError> {
    let from = meta(t, cursor)?;
    let Some((lowest, _)) = seq_range(t)? else {
        return Ok(Walked {
            changed: 0,
            behind: false,
        });
    };
    let boundary = received_from(t, cutoff)?;
    // Seqs are never reused: below the lowest stored one there is nothing to walk.
    let mut at = from.saturating_sub(COMPACT_OVERLAP).max(lowest);
    let stop = boundary.min(at.saturating_add(COMPACT_PASS));
    let mut walk = t.prepare_cached(sql).map_err(unavailable)?;
    let mut changed = 0u64;
    while at < stop && changed < PRUNE_CHUNK as u64 {
        let end = stop.min(at.saturating_add(COMPACT_SPAN));
        changed += walk.execute(params![at, end, cutoff]).map_err(unavailable)? as u64;
        at = end;
    }
    // Never back: `at` is below `from` only by the overlap not yet walked again.
    if at > from {
        set_meta(t, cursor, at)?;
    }
    Ok(Walked {
        changed,
        behind: at < boundary,
    })
}

/// A `store_meta` value; 0 when it was never written.
fn meta(t: &Connection, name: &str) -> Result<i64, StoreError> {
    t.prepare_cached("SELECT value FROM store_meta WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
        .map(Option::unwrap_or_default)
        .map_err(unavailable)
}

fn set_meta(t: &Connection, name: &str, value: i64) -> Result<(), StoreError> {
    t.prepare_cached("INSERT OR REPLACE INTO store_meta (name, value) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![name, value]))
        .map(drop)
        .map_err(unavailable)
}

/// Seqs compaction looks at per statement, and per pass at most.
const COMPACT_SPAN: i64 = 5_000;
const COMPACT_PASS: i64 = 50_000;

/// Seqs compaction looks at again on each pass, behind where the last one
/// stopped: events received together may take their seqs out of
/// `received_at` order (`received_from`), so one just below the boundary
/// can still be too young when the walk passes it.
const COMPACT_OVERLAP: i64 = 4_096;

/// Compaction's walk ([`walk_seqs`], cursor `compacted_to`): drops the
/// bodies of events received before `cutoff` that have no deliveries, up to
/// the first event received at or after `cutoff`. An event that still has
/// deliveries when the walk passes it is compacted when they are pruned
/// (`prune`). One that was still too young when passed, and is more than
/// [`COMPACT_OVERLAP`] seqs behind by the next pass (seqs out of
/// `received_at` order by more than that: the clock stepped back), keeps its
/// body until it is deleted at the end of the dedupe window. Returns the
/// bodies dropped and whether the walk stopped short of the boundary.
fn compact(t: &Connection, cutoff: i64) -> Result<(u64, bool), StoreError> {
    let walked = walk_seqs(
        t,
        "compacted_to",
        "UPDATE events SET body = NULL
         WHERE seq >= ?1 AND seq < ?2 AND body IS NOT NULL AND received_at < ?3
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq)",
        cutoff,
    )?;
    Ok((walked.changed, walked.behind))
}

/// The lowest and highest event seq, each read from its end of the table.
/// Not `SELECT MIN(seq), MAX(seq)`: SQLite reads a lone MIN or MAX from the
/// index, but two in one SELECT by walking every row, which held the writer
/// (and every ack) for 110 ms per prune pass with 160,000 events stored.
pub(super) const SEQ_RANGE: &str = "SELECT (SELECT MIN(seq) FROM events), (SELECT MAX(seq) FROM events)";

/// The lowest and highest stored seq ([`SEQ_RANGE`]); `None` with no events.
fn seq_range(t: &Connection) -> Result<Option<(i64, i64)>, StoreError> {
    let (lo, hi): (Option<i64>, Option<i64>) = t
        .prepare_cached(SEQ_RANGE)
        .and_then(|mut range| range.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(unavailable)?;
    Ok(lo.zip(hi))
}

/// The first seq from which events were received at or after `cutoff`, found
/// by bisecting seqs (a few dozen row lookups) rather than by an index that
/// every insert would write. Seqs follow arrival, and `received_at` is taken
/// just before, so the order is the same but for requests in flight
/// together. Where it is not, nothing is pruned early: the caller still
/// checks each event's `received_at`; an older event past the boundary waits
/// for a later prune.
fn received_from(t: &Connection, cutoff: i64) -> Result<i64, StoreError> {
    let Some((mut lo, hi)) = seq_range(t)? else {
        return Ok(0);
    };
    let mut first_at = t
        .prepare_cached("SELECT received_at FROM events WHERE seq >= ?1 ORDER BY seq LIMIT 1")
        .map_err(unavailable)?;
    // The answer is in lo..=hi + 1 (hi + 1: every event is older).
    let mut hi = hi.saturating_add(1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at: Option<i64> = first_at
            .query_row([mid], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        match at {
            Some(at) if at >= cutoff => hi = mid,
            _ => lo = mid + 1,
        }
    }
    Ok(lo)
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, event: NewEvent) -> Result<Inserted, StoreError> {
        // Into the open group on this task if it can (see `Core`).
        let (tx, rx) = oneshot::channel();
        self.core.lock_pending().push_back(Op::Insert(event, tx));
        self.core.drain(DRAIN_ON_A_TASK);
        rx.await.map_err(|_| unavailable("store writer stopped"))?
    }

    async fn claim(&self, sink: &str, limit: usize, lease: Duration, now: i64) -> Result<Vec<Claimed>, StoreError> {
        let lease_until = now.saturating_add(lease.as_millis() as i64);
        let sink = sink.to_string();
        self.submit(|reply| Op::Claim {
            sink,
            limit,
            lease_until,
            now,
            reply,
        })
        .await
    }

    async fn complete(&self, done: Vec<Completion>) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        self.submit(|r| Op::Complete(done, r)).await
    }

    async fn next_due(&self, sink: &str) -> Result<Option<i64>, StoreError> {
        let sink = sink.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT due_at FROM deliveries INDEXED BY deliveries_due
                 WHERE sink = ?1 AND state = 0 AND lease_until IS NULL ORDER BY due_at LIMIT 1",
            )
            .and_then(|mut s| s.query_row([sink], |r| r.get(0)).optional())
            .map_err(unavailable)
        })
        .await
    }

    async fn events(&self, f: EventFilter) -> Result<Vec<EventSummary>, StoreError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT seq, source, event_id, type, occurred_at, received_at FROM events
                     WHERE (?1 IS NULL OR source = ?1) AND (?2 IS NULL OR type = ?2)
                       AND (?4 IS NULL OR received_at >= ?4) AND (?5 IS NULL OR seq < ?5)
                     ORDER BY seq DESC LIMIT ?3",
                )
                .map_err(unavailable)?;
            let events = stmt
                .query_map(
                    params![f.source, f.event_type, f.limit as i64, f.since, f.before],
                    |r| {
                        Ok(EventSummary {
                            seq: r.get(0)?,
                            source: r.get(1)?,
                            id: r.get(2)?,
                            event_type: r.get(3)?,
                            occurred_at: r.get(4)?,
                            received_at: r.get(5)?,
                            deliveries: Vec::new(),
                        })
                    },
                )
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            let mut ds = c
                .prepare_cached("SELECT sink, state, attempts FROM deliveries WHERE event_seq = ?1 ORDER BY id")
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(events.len());
            for mut ev in events {
                ev.deliveries = ds
                    .query_map([ev.seq], |r| {
                        Ok(DeliverySummary {
                            sink: r.get(0)?,
                            status: Status::from_code(r.get(1)?),
                            attempts: r.get(2)?,
                        })
                    })
                    .map_err(unavailable)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(unavailable)?;
                out.push(ev);
            }
            Ok(out)
        })
        .await
    }

    async fn deliveries(&self, f: DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        self.read(move |c| {
            // A status is written into the statement, not bound: only a
            // literal state lets SQLite walk the partial index of delivered
            // ones or of dead letters by age, newest first, and stop at the
            // page's end, where a bound one sorted every delivery stored.
            let state = match f.status {
                Some(status) => format!("d.state = {code} AND ?2 = {code}", code = status.code()),
                None => "?2 IS NULL".to_owned(),
            };
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT d.id, e.source, e.event_id, e.type, d.sink, d.state, d.attempts, d.due_at,
                            d.last_error, d.updated_at
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE (?1 IS NULL OR d.sink = ?1) AND {state}
                       AND (?4 IS NULL OR e.source = ?4) AND (?5 IS NULL OR e.type = ?5)
                       AND (?6 IS NULL OR d.updated_at >= ?6)
                       AND (?7 IS NULL OR d.updated_at < ?7 OR (d.updated_at = ?7 AND d.id < ?8))
                     ORDER BY d.updated_at DESC, d.id DESC LIMIT ?3"
                ))
                .map_err(unavailable)?;
            stmt.query_map(
                params![
                    f.sink,
                    f.status.map(Status::code),
                    f.limit as i64,
                    f.source,
                    f.event_type,
                    f.since,
                    f.before.map(|b| b.0),
                    f.before.map(|b| b.1)
                ],
                delivery_row,
            )
            .map_err(unavailable)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)
        })
        .await
    }

    async fn event_detail(&self, source: &str, id: &str) -> Result<EventDetail, StoreError> {
        let (source, id) = (source.to_string(), id.to_string());
        self.read(move |c| {
            // One snapshot: a merge that finishes meanwhile cannot hide the key.
            let snapshot = c.unchecked_transaction().map_err(unavailable)?;
            let Some(seq) = dedupe::find_stored(&snapshot, &source, &id)? else {
                return Err(StoreError::NotFound);
            };
            let found = c
                .query_row(
                    "SELECT seq, kind, type, occurred_at, received_at, body FROM events WHERE seq = ?1",
                    [seq],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, Option<Vec<u8>>>(5)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)?;
            let Some((seq, kind, event_type, occurred_at, received_at, body)) = found else {
                return Err(StoreError::NotFound);
            };
            let mut ds = c
                .prepare_cached(
                    "SELECT d.id, e.source, e.event_id, e.type, d.sink, d.state, d.attempts, d.due_at,
                            d.last_error, d.updated_at
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.event_seq = ?1 ORDER BY d.id",
                )
                .map_err(unavailable)?;
            let rows = ds
                .query_map([seq], delivery_row)
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            let mut log = c
                .prepare_cached(
                    "SELECT attempt, finished_at, outcome, error FROM attempts WHERE delivery_id = ?1 ORDER BY id",
                )
                .map_err(unavailable)?;
            let mut deliveries = Vec::with_capacity(rows.len());
            for delivery in rows {
                let logged = log
                    .query_map([delivery.id], |r| {
                        Ok(AttemptRow {
                            attempt: r.get(0)?,
                            finished_at: r.get(1)?,
                            outcome: r.get(2)?,
                            error: r.get(3)?,
                        })
                    })
                    .map_err(unavailable)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(unavailable)?;
                let attempt_log = attempt_log(&delivery, logged);
                deliveries.push(DeliveryDetail { delivery, attempt_log });
            }
            Ok(EventDetail {
                source,
                id,
                kind,
                event_type,
                occurred_at,
                received_at,
                payload: body.map(|b| String::from_utf8_lossy(&b).into_owned()),
                deliveries,
            })
        })
        .await
    }

    async fn queue_stats(&self) -> Result<Vec<SinkQueue>, StoreError> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    // One branch per state, so each reads its partial index.
                    "SELECT d.sink, 0, COUNT(*), MIN(e.received_at)
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.state = 0 GROUP BY d.sink
                     UNION ALL
                     SELECT d.sink, 2, COUNT(*), MIN(e.received_at)
                     FROM deliveries d JOIN events e ON e.seq = d.event_seq
                     WHERE d.state = 2 GROUP BY d.sink
                     ORDER BY 1, 2",
                )
                .map_err(unavailable)?;
            let mut out: Vec<SinkQueue> = Vec::new();
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get(3)?,
                    ))
                })
                .map_err(unavailable)?;
            for row in rows {
                let (sink, state, count, oldest): (String, i64, i64, Option<i64>) = row.map_err(unavailable)?;
                SinkQueue::add_count(&mut out, sink, state == 0, count, oldest);
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // An empty group still begins and commits an IMMEDIATE transaction:
        // the writer is alive and takes the write lock. It writes nothing,
        // so a full disk passes this (`writable` reaches the disk).
        self.submit(|r| Op::Complete(Vec::new(), r)).await
    }

    async fn writable(&self) -> Result<(), StoreError> {
        self.submit(Op::Probe).await
    }

    async fn replay(&self, target: ReplayTarget, now: i64) -> Result<u64, StoreError> {
        if !matches!(target, ReplayTarget::DeadLetters { .. }) {
            return self.submit(|r| Op::Replay(target, now, r)).await;
        }
        // A chunk per group commit, so a replay of millions does not hold
        // every ack (and the watchdog's ping) behind one statement.
        let mut total = 0;
        loop {
            let n = self.submit(|r| Op::Replay(target.clone(), now, r)).await?;
            total += n;
            if n < REPLAY_CHUNK {
                return Ok(total);
            }
        }
    }

    async fn prune(&self, retention: Retention, now: i64) -> Result<PruneStats, StoreError> {
        self.submit(|r| Op::Prune(retention, now, r)).await
    }

    fn durability(&self) -> Option<Durability> {
        Some(self.durability.clone())
    }

    async fn close(&self) {
        // Once the writer answers, everything applied before (by it, or by an
        // insert's own task) is committed and synced, the WAL is checkpointed
        // and the write connection is closed; an insert still under way is
        // either among those or refused.
        let (tx, rx) = oneshot::channel();
        if self.writer.send(Op::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}
