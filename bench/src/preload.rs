//! `--preload N`: a store that already holds N events, as one that has run
//! for a week does, so a row shows whether ingest and claiming slow down as
//! the store grows.
//!
//! The events are spread over the last 7 days (the default dedupe window):
//! those of the last day keep their body and have one delivered delivery per
//! sink with its attempt; older ones are compacted to dedupe keys, as
//! pruning leaves them. Their ids are random, in the corpus's format, so
//! the run's events land among them in the dedupe keys. Written straight
//! into the tables expeditor created and left empty (the schema is
//! expeditor's; the bench follows it), in one transaction; SQLite's dedupe
//! keys are then written by one more start of expeditor (it does that for
//! events it finds without them).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// Where the preloaded events sit in time.
struct Spread {
    /// received_at of the newest (a minute ago).
    newest: i64,
    /// Milliseconds between consecutive events.
    step: i64,
    /// Events younger than this keep their body and deliveries (a little
    /// under a day, so pruning does not race the row for them).
    fresh: i64,
}

impl Spread {
    fn new(n: usize) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        Self {
            newest: now - 60_000,
            // Stay inside the week so nothing is due for deletion either.
            step: ((WEEK_MS - 2 * 3_600_000) / n.max(1) as i64).max(1),
            fresh: DAY_MS - 3_600_000,
        }
    }
}

pub fn sqlite(db: &std::path::Path, n: usize, body: &[u8], sinks: &[String]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let spread = Spread::new(n);
    let mut conn = rusqlite::Connection::open(db).with_context(|| format!("cannot open {}", db.display()))?;
    let tx = conn.transaction()?;
    // Oldest first, so seqs follow arrival as expeditor hands them out.
    tx.execute(
        "WITH RECURSIVE n(i) AS (SELECT ?1 - 1 UNION ALL SELECT i - 1 FROM n WHERE i > 0)
         INSERT INTO events (source, event_id, kind, type, occurred_at, received_at, body)
         SELECT 'crumb', 'evt_' || lower(hex(randomblob(8))), 'crumbpos', 'order.created', ?2 - i * ?3, ?2 - i * ?3,
                CASE WHEN i * ?3 < ?4 THEN ?5 END
         FROM n",
        rusqlite::params![n as i64, spread.newest, spread.step, spread.fresh, body],
    )?;
    // Where pruning's compaction walk stopped: at the first event with a body.
    tx.execute(
        "INSERT OR REPLACE INTO store_meta (name, value)
         SELECT 'compacted_to', COALESCE(MIN(seq), 0) FROM events WHERE body IS NOT NULL",
        [],
    )?;
    for sink in sinks {
        tx.execute(
            "INSERT INTO deliveries (event_seq, sink, state, attempts, due_at, updated_at)
             SELECT seq, ?1, 1, 1, received_at, received_at + 50 FROM events
             WHERE body IS NOT NULL",
            [sink],
        )?;
    }
    // No attempt rows: the SQLite store keeps a delivered delivery's last
    // attempt on its row alone.
    tx.commit()?;
    Ok(started.elapsed())
}

pub async fn postgres(
    client: &tokio_postgres::Client,
    n: usize,
    body: &[u8],
    sinks: &[String],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let spread = Spread::new(n);
    client.batch_execute("BEGIN").await?;
    // Oldest first, as for SQLite: seqs follow arrival.
    client
        .execute(
            "INSERT INTO events (source, event_id, kind, type, occurred_at, received_at, body)
             SELECT 'crumb', 'evt_' || left(md5(i::text), 16), 'crumbpos', 'order.created',
                    $2::bigint - i * $3::bigint, $2::bigint - i * $3::bigint,
                    CASE WHEN i * $3::bigint < $4::bigint THEN $5::bytea END
             FROM generate_series($1::bigint - 1, 0::bigint, -1::bigint) AS i",
            &[&(n as i64), &spread.newest, &spread.step, &spread.fresh, &body],
        )
        .await?;
    for sink in sinks {
        client
            .execute(
                "INSERT INTO deliveries (event_seq, sink, state, attempts, due_at, updated_at)
                 SELECT seq, $1, 1, 1, received_at, received_at + 50 FROM events
                 WHERE body IS NOT NULL",
                &[sink],
            )
            .await?;
    }
    client
        .execute(
            "INSERT INTO attempts (delivery_id, attempt, finished_at, outcome)
             SELECT id, 1, updated_at, 'delivered' FROM deliveries",
            &[],
        )
        .await?;
    client.batch_execute("COMMIT").await?;
    // A store that has run for a week has been vacuumed and analyzed by
    // autovacuum long since (its hint bits set, its planner statistics
    // current), and its pages are checkpointed: without this the row would
    // measure the aftermath of writing a gigabyte in one transaction (the
    // checkpoint it forces, and a full-page image in the WAL for every page
    // first touched after it), not the store's size.
    client.batch_execute("VACUUM ANALYZE").await?;
    client.batch_execute("CHECKPOINT").await?;
    Ok(started.elapsed())
}
