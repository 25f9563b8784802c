//! The SQLite store's dedupe keys: which (source, event id) pairs it holds.
//!
//! A B-tree index over event ids puts each new event's key on a random page,
//! so every event costs a page of its own in the WAL and again at the
//! checkpoint, more so once the store outgrows the page cache: with two
//! million events stored, that index was the whole of ingest's slowdown
//! (BENCHMARKS.md). Here, as in a log-structured merge tree, the keys of
//! recent events are held in memory (their durable copy is the event rows
//! themselves, read back on open) and are written out in sorted runs,
//! appended to one table in key order, so each page written is a full page of
//! keys. A run's keys are packed into blocks of a few dozen (prefix-coded,
//! one row each), so sealing, merging and deleting cost a B-tree operation
//! per block rather than per key, and a lookup reads one block. Runs of one
//! level are merged into one of the next, `fan_in` to one, so a store of N
//! keys has O(log N) of them, and an in-memory Bloom filter per run (stored
//! with it) lets a lookup skip the runs that cannot hold the key.
//!
//! Sealing, merging and deleting merged runs are done in chunks inside the
//! writer's transactions, paced by the events stored, so no commit waits for
//! a whole merge. A key's run can outlive its event (pruned): every hit is
//! checked against the event row, and runs whose events are all gone are
//! dropped. An event's `seq` is never used again (see `Seqs`), so a key's
//! seq names its event or nothing. If a transaction rolls back, the in-memory
//! state is read again from what the database holds.

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use super::sqlite::{exec, unavailable};

pub(super) const SCHEMA: &str = "
-- The highest event seq handed out or reserved: seq is never used twice, even
-- once its event is pruned, since a run may still hold it (see `Seqs`).
CREATE TABLE IF NOT EXISTS store_meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedupe_runs (
    id        INTEGER PRIMARY KEY,
    level     INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,     -- the events whose keys it holds: seq in first..=last
    last_seq  INTEGER NOT NULL,
    keys      INTEGER NOT NULL,
    bloom     BLOB NOT NULL
);
-- Every run's keys, in key order, packed into blocks (see `Blocks`); a run's
-- blocks are written in that order, after every older run's, so they fill
-- pages one after another. A block is found by its greatest key. Blocks of a
-- run not in dedupe_runs are left from a merge (or one cut short) and are
-- deleted.
CREATE TABLE IF NOT EXISTS dedupe_blocks (
    run   INTEGER NOT NULL,
    last  BLOB NOT NULL,
    keys  BLOB NOT NULL,
    PRIMARY KEY (run, last)
) WITHOUT ROWID;
";

/// How keys are kept. The store runs on [`Tuning::default`]; tests use small
/// values so that seals and merges happen within a few hundred events.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tuning {
    /// Recent keys are written out as a run once this many have gathered
    /// (memory, and what an open reads back, grow with it).
    pub seal_at: usize,
    /// Runs of one level are merged into one of the next once this many exist.
    pub fan_in: usize,
    /// Rows of sealing, merging and deleting done per event stored, and at
    /// least per commit: each key is written once per level and deleted once
    /// per merge, so this must stay above about twice the levels.
    pub work_per_event: usize,
    pub work_min: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            seal_at: 8192,
            fan_in: 8,
            work_per_event: 12,
            work_min: 256,
        }
    }
}

/// Bits of Bloom filter per key: about 0.5 % false positives per run.
const BITS_PER_KEY: usize = 12;
/// Blocks a merge reads from each input at once.
const FILL: usize = 8;
/// Packed bytes per block at most: with the block's greatest key beside them
/// the row stays within a 4 KiB leaf page (SQLite moves a WITHOUT ROWID row's
/// bytes past about 1,000 to an overflow page, a second page to read).
const BLOCK_BYTES: usize = 900;
/// What deleting one block counts against the upkeep's budget, which is
/// counted in keys: fewer than a block holds (~50 random ids of the form
/// `evt_<16 hex>` in the bench's store), so deleting keeps ahead of writing.
const BLOCK_COST: usize = 16;

/// A key as the memory holds it: source, NUL, event id. Source names never
/// hold a NUL (config allows `[A-Za-z0-9_-]`), so this is unambiguous, and its
/// byte order is SQLite's order of (source, event_id).
fn encode(buf: &mut Vec<u8>, source: &str, event_id: &str) {
    buf.clear();
    buf.extend_from_slice(source.as_bytes());
    buf.push(0);
    buf.extend_from_slice(event_id.as_bytes());
}

/// SipHash-1-3 with fixed keys: stable across builds, since filters are stored.
fn hash(key: &[u8]) -> u64 {
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6578_7065_6469_746f, 0x7220_6465_6475_7065);
    h.write(key);
    h.finish()
}

#[cfg(test)]
fn hash_pair(buf: &mut Vec<u8>, source: &str, event_id: &str) -> u64 {
    encode(buf, source, event_id);
    hash(buf)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = *bytes.get(*at)?;
        *at += 1;
        if shift > 63 {
            return None;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
        shift += 7;
    }
}

/// Builds a run's blocks from its keys, given in strictly increasing order.
/// A block holds each key as the length it shares with the key before it
/// (none for a block's first), the length of the rest, the rest, and its
/// seq, all lengths and seqs as LEB128 varints. Event ids of one vendor
/// share most of their bytes with their neighbours, so a block holds a few
/// dozen keys.
#[derive(Default)]
struct Blocks {
    bytes: Vec<u8>,
    last: Vec<u8>,
    /// Blocks closed and not yet written: (greatest key, packed keys).
    full: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Blocks {
    fn push(&mut self, key: &[u8], seq: i64) {
        let mut shared = match self.bytes.is_empty() {
            true => 0,
            false => self.last.iter().zip(key).take_while(|(a, b)| a == b).count(),
        };
        // Room for the rest of the key and three varints.
        if !self.bytes.is_empty() && self.bytes.len() + (key.len() - shared) + 20 > BLOCK_BYTES {
            self.close();
            shared = 0;
        }
        put_varint(&mut self.bytes, shared as u64);
        put_varint(&mut self.bytes, (key.len() - shared) as u64);
        self.bytes.extend_from_slice(&key[shared..]);
        put_varint(&mut self.bytes, seq as u64);
        self.last.clear();
        self.last.extend_from_slice(key);
    }

    /// Closes the block being filled (at the end of a run).
    fn close(&mut self) {
        if !self.bytes.is_empty() {
            self.full.push((self.last.clone(), std::mem::take(&mut self.bytes)));
        }
    }

    /// Writes the closed blocks as blocks of run `run`.
    fn write(&mut self, conn: &Connection, run: i64) -> Result<(), StoreError> {
        if self.full.is_empty() {
            return Ok(());
        }
        let mut stmt = conn
            .prepare_cached("INSERT INTO dedupe_blocks (run, last, keys) VALUES (?1, ?2, ?3)")
            .map_err(unavailable)?;
        for (last, keys) in self.full.drain(..) {
            stmt.execute(params![run, last, keys]).map_err(unavailable)?;
        }
        Ok(())
    }
}

/// One block of `keys` (in key order), as (greatest key, packed keys): for
/// tests that write a store's tables from outside.
#[cfg(test)]
pub(super) fn block_of(keys: &[(&str, &str, i64)]) -> (Vec<u8>, Vec<u8>) {
    let mut blocks = Blocks::default();
    let mut key = Vec::new();
    for (source, event_id, seq) in keys {
        encode(&mut key, source, event_id);
        blocks.push(&key, *seq);
    }
    blocks.close();
    blocks.full.pop().unwrap_or_default()
}

/// Reads a block's keys in order; each key in turn is in `key`.
struct BlockKeys<'b> {
    bytes: &'b [u8],
    at: usize,
    key: Vec<u8>,
}

impl<'b> BlockKeys<'b> {
    fn new(bytes: &'b [u8]) -> Self {
        Self {
            bytes,
            at: 0,
            key: Vec::new(),
        }
    }

    /// The next key's seq (the key in `self.key`), or None past the last.
    fn next_seq(&mut self) -> Result<Option<i64>, StoreError> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let corrupt = || unavailable("a stored dedupe block is unreadable");
        let shared = get_varint(self.bytes, &mut self.at).ok_or_else(corrupt)? as usize;
        let len = get_varint(self.bytes, &mut self.at).ok_or_else(corrupt)? as usize;
        let rest = self
            .at
            .checked_add(len)
            .and_then(|end| self.bytes.get(self.at..end))
            .filter(|_| shared <= self.key.len())
            .ok_or_else(corrupt)?;
        self.key.truncate(shared);
        self.key.extend_from_slice(rest);
        self.at += len;
        let seq = get_varint(self.bytes, &mut self.at).ok_or_else(corrupt)?;
        Ok(Some(seq as i64))
    }
}

/// A blocked Bloom filter: a key sets 8 bits in one 256-bit block, one per
/// 32-bit word, so a lookup touches one cache line however large the run.
#[derive(Debug, Clone)]
struct Bloom {
    blocks: Vec<[u32; 8]>,
}

/// Odd multipliers that spread a key's high hash bits over each word.
const SPREAD: [u32; 8] = [
    0x9E37_79B1,
    0x85EB_CA77,
    0xC2B2_AE3D,
    0x27D4_EB2F,
    0x1656_67B1,
    0xD3A2_646D,
    0xFD70_46C5,
    0xB55A_4F09,
];

impl Bloom {
    fn with_capacity(keys: usize) -> Self {
        let blocks = (keys.saturating_mul(BITS_PER_KEY)).div_ceil(256).max(1);
        Self {
            blocks: vec![[0; 8]; blocks],
        }
    }

    /// A filter that holds everything: for a stored filter that cannot be read.
    fn full() -> Self {
        Self {
            blocks: vec![[u32::MAX; 8]],
        }
    }

    fn block(&self, h: u64) -> usize {
        ((h as u32 as u64 * self.blocks.len() as u64) >> 32) as usize
    }

    fn insert(&mut self, h: u64) {
        let b = self.block(h);
        let x = (h >> 32) as u32;
        for (word, spread) in self.blocks[b].iter_mut().zip(SPREAD) {
            *word |= 1 << (x.wrapping_mul(spread) >> 27);
        }
    }

    fn may_contain(&self, h: u64) -> bool {
        let x = (h >> 32) as u32;
        self.blocks[self.block(h)]
            .iter()
            .zip(SPREAD)
            .all(|(word, spread)| word & (1 << (x.wrapping_mul(spread) >> 27)) != 0)
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.blocks.iter().flatten().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(32) {
            return None;
        }
        let blocks = bytes
            .chunks_exact(32)
            .map(|block| {
                let mut words = [0u32; 8];
                for (w, b) in words.iter_mut().zip(block.chunks_exact(4)) {
                    *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                words
            })
            .collect();
        Some(Self { blocks })
    }
}

/// A sealed run of keys.
#[derive(Debug)]
struct Run {
    id: i64,
    level: u32,
    first_seq: i64,
    last_seq: i64,
    keys: i64,
    bloom: Bloom,
    /// An input of a merge in progress (neither merged again nor dropped).
    merging: bool,
}

/// Recent keys being written out as a run: looked up here until it is live.
struct Seal {
    out: i64,
    /// Sorted by key.
    keys: Vec<(Box<[u8]>, i64)>,
    written: usize,
    blocks: Blocks,
    bloom: Bloom,
}

struct Merge {
    out: i64,
    level: u32,
    inputs: Vec<Input>,
    first_seq: i64,
    last_seq: i64,
    /// Keys of older events than the oldest stored are of pruned events: dropped.
    oldest_event: i64,
    written: i64,
    blocks: Blocks,
    bloom: Bloom,
}

/// One run a merge reads, in key order, [`FILL`] blocks at a time.
struct Input {
    run: i64,
    /// The greatest key of the last block read (empty: none read yet; every
    /// key is greater, since a source name is never empty).
    after: Vec<u8>,
    buf: VecDeque<(Box<[u8]>, i64)>,
    exhausted: bool,
}

impl Input {
    fn fill(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let mut stmt = conn
            .prepare_cached("SELECT last, keys FROM dedupe_blocks WHERE run = ?1 AND last > ?2 ORDER BY last LIMIT ?3")
            .map_err(unavailable)?;
        let mut rows = stmt
            .query(params![self.run, &self.after[..], FILL as i64])
            .map_err(unavailable)?;
        let mut blocks = 0;
        while let Some(row) = rows.next().map_err(unavailable)? {
            let last = row.get_ref(0).and_then(|v| Ok(v.as_blob()?)).map_err(unavailable)?;
            let keys = row.get_ref(1).and_then(|v| Ok(v.as_blob()?)).map_err(unavailable)?;
            let mut block = BlockKeys::new(keys);
            while let Some(seq) = block.next_seq()? {
                self.buf.push_back((block.key.as_slice().into(), seq));
            }
            self.after.clear();
            self.after.extend_from_slice(last);
            blocks += 1;
        }
        self.exhausted = blocks < FILL;
        Ok(())
    }
}

/// Recent keys: looked up and added once per event. foldhash rather than
/// the std SipHash (keyed per process all the same; the keys are event ids
/// that passed signature verification).
type Recent = HashMap<Box<[u8]>, i64, foldhash::fast::RandomState>;

/// The dedupe keys as the writer holds them.
pub(super) struct Dedupe {
    tuning: Tuning,
    /// Keys of the events stored after the newest run: encoded key → seq.
    recent: Recent,
    sealing: Option<Seal>,
    /// Live runs, oldest events first.
    runs: Vec<Run>,
    merges: Vec<Merge>,
    /// Runs whose rows are left to delete.
    garbage: Vec<i64>,
    next_run: i64,
    /// Events stored since the last [`Dedupe::work`]: they pace it.
    stored: usize,
    /// Set when the memory could not be read back after a rollback: lookups
    /// try again, and fail until it can.
    stale: bool,
    seqs: Seqs,
    scratch: Vec<u8>,
}

/// Event seqs, handed out by the writer rather than by SQLite. A run's key
/// names its event by seq, and a hit counts only if that event still exists,
/// so a seq must never return for another event after its own was pruned.
/// `AUTOINCREMENT` guarantees that by rewriting `sqlite_sequence` on every
/// insert: a B-tree update per event and a WAL page per commit (9 % of the
/// frames at 12 events a commit). Here a block of seqs is reserved in
/// `store_meta` at a time, in the transaction that first uses it; a
/// rollback reads the reservation back, and seqs reserved and not used are
/// skipped.
struct Seqs {
    next: i64,
    /// Every seq up to this one may have been used.
    reserved: i64,
}

/// Seqs reserved at once: one `store_meta` write per this many events.
const SEQ_BLOCK: i64 = 4096;

impl Seqs {
    /// Above the reservation, every event, and every key a run holds (and
    /// `sqlite_sequence`, for a table created with `AUTOINCREMENT`); events
    /// written by something other than the writer (the bench's preload, an
    /// upgrade) are counted too.
    fn load(conn: &Connection, sealed: i64) -> Result<Self, StoreError> {
        let mut high: i64 = conn
            .query_row(
                "SELECT MAX(COALESCE((SELECT value FROM store_meta WHERE name = 'seq'), 0),
                            COALESCE((SELECT MAX(seq) FROM events), 0), ?1)",
                [sealed],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        let autoincrement: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'sqlite_sequence')",
                [],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        if autoincrement {
            let counted: Option<i64> = conn
                .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'events'", [], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(unavailable)?;
            high = high.max(counted.unwrap_or(0));
        }
        Ok(Self {
            next: high.saturating_add(1),
            reserved: high,
        })
    }

    fn next(&mut self, conn: &Connection) -> Result<i64, StoreError> {
        if self.next > self.reserved {
            let reserved = self.next.saturating_add(SEQ_BLOCK - 1);
            conn.prepare_cached("INSERT OR REPLACE INTO store_meta (name, value) VALUES ('seq', ?1)")
                .and_then(|mut s| s.execute([reserved]))
                .map_err(unavailable)?;
            self.reserved = reserved;
        }
        let seq = self.next;
        self.next += 1;
        Ok(seq)
    }
}

fn exists(conn: &Connection, seq: i64) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE seq = ?1)")
        .and_then(|mut s| s.query_row([seq], |r| r.get(0)))
        .map_err(unavailable)
}

/// The seq run `run` holds for `key`: one block read, found by its greatest key.
fn probe(conn: &Connection, run: i64, key: &[u8]) -> Result<Option<i64>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT keys FROM dedupe_blocks WHERE run = ?1 AND last >= ?2 ORDER BY last LIMIT 1")
        .map_err(unavailable)?;
    let mut rows = stmt.query(params![run, key]).map_err(unavailable)?;
    let Some(row) = rows.next().map_err(unavailable)? else {
        return Ok(None);
    };
    let mut block = BlockKeys::new(row.get_ref(0).and_then(|v| Ok(v.as_blob()?)).map_err(unavailable)?);
    while let Some(seq) = block.next_seq()? {
        match block.key[..].cmp(key) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Ok(Some(seq)),
            std::cmp::Ordering::Greater => break,
        }
    }
    Ok(None)
}

fn register(conn: &Connection, run: &Run) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO dedupe_runs (id, level, first_seq, last_seq, keys, bloom) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            run.id,
            run.level,
            run.first_seq,
            run.last_seq,
            run.keys,
            run.bloom.to_bytes()
        ])
    })
    .map(drop)
    .map_err(unavailable)
}

/// The newest event a run holds the key of; later events' keys are recent.
fn sealed_through(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("SELECT COALESCE(MAX(last_seq), 0) FROM dedupe_runs", [], |r| r.get(0))
        .map_err(unavailable)
}

/// The stored event with this key, from what the database holds alone (for
/// readers without the writer's memory). Run inside one transaction, so a
/// merge that finishes meanwhile cannot hide the key.
pub(super) fn find_stored(conn: &Connection, source: &str, event_id: &str) -> Result<Option<i64>, StoreError> {
    let sealed = sealed_through(conn)?;
    let recent = conn
        .prepare_cached(
            "SELECT seq FROM events WHERE seq > ?1 AND source = ?2 AND event_id = ?3 ORDER BY seq DESC LIMIT 1",
        )
        .and_then(|mut s| s.query_row(params![sealed, source, event_id], |r| r.get(0)).optional())
        .map_err(unavailable)?;
    if recent.is_some() {
        return Ok(recent);
    }
    let runs: Vec<i64> = conn
        .prepare_cached("SELECT id FROM dedupe_runs ORDER BY last_seq DESC")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(unavailable)?;
    let mut key = Vec::new();
    encode(&mut key, source, event_id);
    for run in runs {
        if let Some(seq) = probe(conn, run, &key)?
            && exists(conn, seq)?
        {
            return Ok(Some(seq));
        }
    }
    Ok(None)
}

/// The level a run of `keys` keys belongs to: the first whose runs are as large.
fn level_for(tuning: Tuning, keys: usize) -> u32 {
    let mut level = 0;
    let mut size = tuning.seal_at.max(1);
    while size < keys && level < 16 {
        size = size.saturating_mul(tuning.fan_in.max(2));
        level += 1;
    }
    level
}

/// On open: if more events than a seal holds have no run (a store written by
/// an older expeditor, or one filled from outside), writes their keys as one
/// run now, sorted by SQLite, rather than reading them all into memory.
pub(super) fn cover(conn: &Connection, tuning: Tuning) -> Result<(), StoreError> {
    let sealed = sealed_through(conn)?;
    let (count, first, last): (i64, Option<i64>, Option<i64>) = conn
        .query_row(
            "SELECT COUNT(*), MIN(seq), MAX(seq) FROM events WHERE seq > ?1",
            [sealed],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(unavailable)?;
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(());
    };
    if (count as usize) <= 2 * tuning.seal_at {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let tx = conn.unchecked_transaction().map_err(unavailable)?;
    let run: i64 = tx
        .query_row(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM dedupe_runs), 0), COALESCE((SELECT MAX(run) FROM dedupe_blocks), 0)) + 1",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    let mut bloom = Bloom::with_capacity(count as usize);
    let mut blocks = Blocks::default();
    let mut key = Vec::new();
    let mut keys: i64 = 0;
    {
        // Newest first within a key: if one was stored twice, its live event wins.
        let mut stmt = tx
            .prepare("SELECT source, event_id, seq FROM events WHERE seq > ?1 ORDER BY source, event_id, seq DESC")
            .map_err(unavailable)?;
        let mut rows = stmt.query([sealed]).map_err(unavailable)?;
        while let Some(row) = rows.next().map_err(unavailable)? {
            let source = row.get_ref(0).and_then(|v| Ok(v.as_str()?)).map_err(unavailable)?;
            let event_id = row.get_ref(1).and_then(|v| Ok(v.as_str()?)).map_err(unavailable)?;
            let seq: i64 = row.get(2).map_err(unavailable)?;
            encode(&mut key, source, event_id);
            if keys > 0 && key[..] <= blocks.last[..] {
                if key == blocks.last {
                    continue;
                }
                return Err(unavailable("the events' keys did not come in key order"));
            }
            bloom.insert(hash(&key));
            blocks.push(&key, seq);
            keys += 1;
            if blocks.full.len() >= 256 {
                blocks.write(&tx, run)?;
            }
        }
    }
    blocks.close();
    blocks.write(&tx, run)?;
    register(
        &tx,
        &Run {
            id: run,
            level: level_for(tuning, keys as usize),
            first_seq: first,
            last_seq: last,
            keys,
            bloom,
            merging: false,
        },
    )?;
    tx.commit().map_err(unavailable)?;
    tracing::info!(
        keys,
        took_ms = started.elapsed().as_millis() as u64,
        "wrote the dedupe keys of events stored without them as one run"
    );
    Ok(())
}

impl Dedupe {
    /// Reads the runs and the recent keys from the database.
    pub(super) fn load(conn: &Connection, tuning: Tuning) -> Result<Self, StoreError> {
        Self::load_keeping(conn, tuning, Vec::new())
    }

    /// `load`, taking the filters of `known` runs that are still live as they
    /// are (a run never changes once written) instead of reading them again.
    fn load_keeping(conn: &Connection, tuning: Tuning, mut known: Vec<Run>) -> Result<Self, StoreError> {
        let listed: Vec<(i64, u32, i64, i64, i64)> = conn
            .prepare("SELECT id, level, first_seq, last_seq, keys FROM dedupe_runs ORDER BY last_seq")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                    .collect()
            })
            .map_err(unavailable)?;
        let mut runs = Vec::with_capacity(listed.len());
        for (id, level, first_seq, last_seq, keys) in listed {
            let same = known.iter().position(|r| {
                (r.id, r.level, r.first_seq, r.last_seq, r.keys) == (id, level, first_seq, last_seq, keys)
            });
            let bloom = match same {
                Some(i) => known.swap_remove(i).bloom,
                None => conn
                    .prepare_cached("SELECT bloom FROM dedupe_runs WHERE id = ?1")
                    .and_then(|mut s| {
                        // Borrowed from SQLite's row: a big run's filter is megabytes.
                        s.query_row([id], |r| Ok(Bloom::from_bytes(r.get_ref(0)?.as_blob()?)))
                    })
                    .map_err(unavailable)?
                    .unwrap_or_else(|| {
                        tracing::warn!("a dedupe run's filter is unreadable; every lookup reads that run");
                        Bloom::full()
                    }),
            };
            runs.push(Run {
                id,
                level,
                first_seq,
                last_seq,
                keys,
                bloom,
                merging: false,
            });
        }
        runs.sort_by_key(|r| r.last_seq);
        let sealed = runs.last().map_or(0, |r| r.last_seq);
        // Every run with blocks (one index seek each) that is not live.
        let mut garbage = Vec::new();
        let mut after = i64::MIN;
        let mut next_run = runs.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        loop {
            let run: Option<i64> = conn
                .prepare_cached("SELECT run FROM dedupe_blocks WHERE run > ?1 ORDER BY run LIMIT 1")
                .and_then(|mut s| s.query_row([after], |r| r.get(0)).optional())
                .map_err(unavailable)?;
            let Some(run) = run else { break };
            if !runs.iter().any(|r| r.id == run) {
                garbage.push(run);
            }
            next_run = next_run.max(run + 1);
            after = run;
        }
        let mut recent = Recent::default();
        let mut buf = Vec::new();
        {
            let mut stmt = conn
                .prepare("SELECT seq, source, event_id FROM events WHERE seq > ?1")
                .map_err(unavailable)?;
            let mut rows = stmt.query([sealed]).map_err(unavailable)?;
            while let Some(row) = rows.next().map_err(unavailable)? {
                let seq: i64 = row.get(0).map_err(unavailable)?;
                let source = row.get_ref(1).and_then(|v| Ok(v.as_str()?)).map_err(unavailable)?;
                let event_id = row.get_ref(2).and_then(|v| Ok(v.as_str()?)).map_err(unavailable)?;
                encode(&mut buf, source, event_id);
                // Rows come in seq order: a key stored twice keeps its newest event.
                recent.insert(buf.clone().into_boxed_slice(), seq);
            }
        }
        Ok(Self {
            tuning,
            recent,
            sealing: None,
            runs,
            merges: Vec::new(),
            garbage,
            next_run,
            stored: 0,
            stale: false,
            scratch: Vec::new(),
            seqs: Seqs::load(conn, sealed)?,
        })
    }

    /// After a rollback: whatever the memory gained in the transaction is
    /// gone from the database, so it is read again from there.
    pub(super) fn reload(&mut self, conn: &Connection) {
        match Self::load_keeping(conn, self.tuning, std::mem::take(&mut self.runs)) {
            Ok(fresh) => *self = fresh,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the dedupe keys back after a rollback; storing events waits until they can be");
                self.stale = true;
            }
        }
    }

    /// After a rollback, leaves the rereading to the next use (on the
    /// writer thread: see `Writer::join`).
    pub(super) fn forget(&mut self) {
        self.stale = true;
    }

    /// Whether the memory must be read back before its next use.
    pub(super) fn is_stale(&self) -> bool {
        self.stale
    }

    /// Reads the state back if a reload failed: nothing may use memory the
    /// database no longer matches (a merge it rolled back, keys of inserts it
    /// rolled back).
    fn fresh(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.stale {
            *self = Self::load(conn, self.tuning)?;
        }
        Ok(())
    }

    /// The seq of the next event: above every seq any event has had.
    pub(super) fn next_seq(&mut self, conn: &Connection) -> Result<i64, StoreError> {
        self.fresh(conn)?;
        self.seqs.next(conn)
    }

    /// The stored event with this key, if any.
    pub(super) fn find(&mut self, conn: &Connection, source: &str, event_id: &str) -> Result<Option<i64>, StoreError> {
        self.fresh(conn)?;
        encode(&mut self.scratch, source, event_id);
        if let Some(&seq) = self.recent.get(&self.scratch[..])
            && exists(conn, seq)?
        {
            return Ok(Some(seq));
        }
        if let Some(seal) = &self.sealing
            && let Ok(i) = seal.keys.binary_search_by(|(k, _)| k[..].cmp(&self.scratch[..]))
            && exists(conn, seal.keys[i].1)?
        {
            return Ok(Some(seal.keys[i].1));
        }
        let h = hash(&self.scratch);
        for run in self.runs.iter().rev() {
            if run.bloom.may_contain(h)
                && let Some(seq) = probe(conn, run.id, &self.scratch)?
                && exists(conn, seq)?
            {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }

    /// Records the key of an event just stored as `seq`.
    pub(super) fn add(&mut self, source: &str, event_id: &str, seq: i64) {
        encode(&mut self.scratch, source, event_id);
        self.recent.insert(self.scratch.clone().into_boxed_slice(), seq);
        self.stored += 1;
    }

    /// Whether a seal, a merge or a deletion is due or under way: most commits
    /// have none, and skip the savepoint.
    fn has_work(&self) -> bool {
        self.sealing.is_some()
            || !self.merges.is_empty()
            || !self.garbage.is_empty()
            || self.recent.len() >= self.tuning.seal_at
    }

    /// Does a share of the sealing, merging and deleting, inside the writer's
    /// open transaction. A failure undoes the share (to a savepoint) and reads
    /// the state back, without failing the transaction's operations.
    pub(super) fn work(&mut self, conn: &Connection) {
        if self.fresh(conn).is_err() || !self.has_work() {
            // Nothing owed: the events stored so far paced nothing.
            self.stored = 0;
            return;
        }
        let mut budget = self.tuning.work_min.saturating_add(
            self.tuning
                .work_per_event
                .saturating_mul(std::mem::take(&mut self.stored)),
        );
        let done = exec(conn, "SAVEPOINT dedupe_work")
            .map_err(unavailable)
            .and_then(|()| self.work_within(conn, &mut budget))
            .and_then(|()| exec(conn, "RELEASE dedupe_work").map_err(unavailable));
        if let Err(e) = done {
            tracing::warn!(error = %e, "writing dedupe runs failed; started again later");
            let _ = conn.execute_batch("ROLLBACK TO dedupe_work; RELEASE dedupe_work");
            self.reload(conn);
        }
    }

    fn work_within(&mut self, conn: &Connection, budget: &mut usize) -> Result<(), StoreError> {
        if self.sealing.is_none() && self.recent.len() >= self.tuning.seal_at {
            self.freeze();
        }
        if let Some(seal) = &mut self.sealing {
            let n = (*budget).min(seal.keys.len() - seal.written);
            for (key, seq) in &seal.keys[seal.written..seal.written + n] {
                seal.blocks.push(key, *seq);
                seal.bloom.insert(hash(key));
            }
            seal.written += n;
            *budget -= n;
            let finished = seal.written == seal.keys.len();
            if finished {
                seal.blocks.close();
            }
            seal.blocks.write(conn, seal.out)?;
            if finished {
                let seal = self.sealing.take().expect("sealing");
                let run = Run {
                    id: seal.out,
                    level: 0,
                    first_seq: seal.keys.iter().map(|k| k.1).min().unwrap_or(0),
                    last_seq: seal.keys.iter().map(|k| k.1).max().unwrap_or(0),
                    keys: seal.keys.len() as i64,
                    bloom: seal.bloom,
                    merging: false,
                };
                register(conn, &run)?;
                self.runs.push(run);
                self.schedule(conn)?;
            }
        }
        while *budget > 0 {
            let Some(i) = (0..self.merges.len()).min_by_key(|&i| self.merges[i].level) else {
                break;
            };
            if self.step_merge(conn, i, budget)? {
                self.finish_merge(conn, i)?;
                self.schedule(conn)?;
            }
        }
        while *budget > 0
            && let Some(&run) = self.garbage.last()
        {
            // Up to the budget's block of the run, or the rest of it.
            let blocks = (*budget / BLOCK_COST).max(1);
            let n = conn
                .prepare_cached(
                    "DELETE FROM dedupe_blocks WHERE run = ?1 AND last <=
                     (SELECT last FROM dedupe_blocks WHERE run = ?1 ORDER BY last LIMIT 1 OFFSET ?2)",
                )
                .and_then(|mut s| s.execute(params![run, (blocks - 1) as i64]))
                .map_err(unavailable)?;
            if n == 0 {
                let rest = conn
                    .prepare_cached("DELETE FROM dedupe_blocks WHERE run = ?1")
                    .and_then(|mut s| s.execute([run]))
                    .map_err(unavailable)?;
                *budget = budget.saturating_sub(rest.saturating_mul(BLOCK_COST));
                self.garbage.pop();
            } else {
                *budget = budget.saturating_sub(n.saturating_mul(BLOCK_COST));
            }
        }
        Ok(())
    }

    /// Moves the recent keys into a seal (they are still looked up there).
    fn freeze(&mut self) {
        let mut keys: Vec<(Box<[u8]>, i64)> = std::mem::take(&mut self.recent).into_iter().collect();
        keys.sort_unstable();
        self.sealing = Some(Seal {
            out: self.next_run,
            bloom: Bloom::with_capacity(keys.len()),
            keys,
            written: 0,
            blocks: Blocks::default(),
        });
        self.next_run += 1;
    }

    /// Starts a merge for every level that has `fan_in` runs not merging.
    fn schedule(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let fan_in = self.tuning.fan_in.max(2);
        loop {
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for run in self.runs.iter().filter(|r| !r.merging) {
                *counts.entry(run.level).or_default() += 1;
            }
            let Some(level) = counts.iter().filter(|(_, n)| **n >= fan_in).map(|(l, _)| *l).min() else {
                return Ok(());
            };
            let oldest_event: Option<i64> = conn
                .query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0))
                .map_err(unavailable)?;
            let mut inputs = Vec::new();
            let (mut first_seq, mut last_seq, mut keys) = (i64::MAX, i64::MIN, 0usize);
            // Runs are in event order: the oldest of the level go first.
            for run in self
                .runs
                .iter_mut()
                .filter(|r| !r.merging && r.level == level)
                .take(fan_in)
            {
                run.merging = true;
                first_seq = first_seq.min(run.first_seq);
                last_seq = last_seq.max(run.last_seq);
                keys += run.keys.max(0) as usize;
                inputs.push(Input {
                    run: run.id,
                    after: Vec::new(),
                    buf: VecDeque::new(),
                    exhausted: false,
                });
            }
            self.merges.push(Merge {
                out: self.next_run,
                level: level + 1,
                inputs,
                first_seq,
                last_seq,
                oldest_event: oldest_event.unwrap_or(i64::MAX),
                written: 0,
                blocks: Blocks::default(),
                bloom: Bloom::with_capacity(keys),
            });
            self.next_run += 1;
        }
    }

    /// Merges keys into the output until the budget is spent; true once done.
    fn step_merge(&mut self, conn: &Connection, i: usize, budget: &mut usize) -> Result<bool, StoreError> {
        let m = &mut self.merges[i];
        let mut done = false;
        while *budget > 0 {
            for input in &mut m.inputs {
                if input.buf.is_empty() && !input.exhausted {
                    input.fill(conn)?;
                }
            }
            let Some(first) = (0..m.inputs.len())
                .filter(|&j| !m.inputs[j].buf.is_empty())
                .min_by(|&a, &b| m.inputs[a].buf[0].0.cmp(&m.inputs[b].buf[0].0))
            else {
                done = true;
                break;
            };
            let (key, mut seq) = m.inputs[first].buf.pop_front().expect("not empty");
            // The same key in another run (stored again after its event was
            // pruned): one key, for the newest event.
            for input in &mut m.inputs {
                if input.buf.front().is_some_and(|(k, _)| *k == key) {
                    let (_, other) = input.buf.pop_front().expect("front");
                    seq = seq.max(other);
                }
            }
            *budget -= 1;
            if seq < m.oldest_event {
                continue;
            }
            m.bloom.insert(hash(&key));
            m.written += 1;
            m.blocks.push(&key, seq);
        }
        if done {
            m.blocks.close();
        }
        m.blocks.write(conn, m.out)?;
        Ok(done)
    }

    /// Makes a finished merge's output live in place of its inputs.
    /// (If this fails part way, `work` undoes it and reads the state back.)
    fn finish_merge(&mut self, conn: &Connection, i: usize) -> Result<(), StoreError> {
        let m = self.merges.remove(i);
        let run = Run {
            id: m.out,
            level: m.level,
            first_seq: m.first_seq,
            last_seq: m.last_seq,
            keys: m.written,
            bloom: m.bloom,
            merging: false,
        };
        register(conn, &run)?;
        let mut delete = conn
            .prepare_cached("DELETE FROM dedupe_runs WHERE id = ?1")
            .map_err(unavailable)?;
        let inputs: Vec<i64> = m.inputs.iter().map(|input| input.run).collect();
        for input in &inputs {
            delete.execute([input]).map_err(unavailable)?;
        }
        self.runs.retain(|r| !inputs.contains(&r.id));
        self.garbage.extend(inputs);
        let at = self.runs.partition_point(|r| r.last_seq < run.last_seq);
        self.runs.insert(at, run);
        Ok(())
    }

    /// Drops runs whose events are all gone (pruned); returns how many. Never
    /// the newest, which marks where the recent keys begin.
    pub(super) fn drop_empty_runs(&mut self, conn: &Connection) -> Result<u64, StoreError> {
        self.fresh(conn)?;
        let newest = self.runs.last().map(|r| r.id);
        let mut dropped = Vec::new();
        for run in self.runs.iter().filter(|r| !r.merging && Some(r.id) != newest) {
            let any: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE seq BETWEEN ?1 AND ?2)")
                .and_then(|mut s| s.query_row([run.first_seq, run.last_seq], |r| r.get(0)))
                .map_err(unavailable)?;
            if !any {
                conn.prepare_cached("DELETE FROM dedupe_runs WHERE id = ?1")
                    .and_then(|mut s| s.execute([run.id]))
                    .map_err(unavailable)?;
                dropped.push(run.id);
            }
        }
        self.runs.retain(|r| !dropped.contains(&r.id));
        let n = dropped.len() as u64;
        self.garbage.extend(dropped);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloom_holds_what_it_was_given_and_rarely_more() {
        let mut buf = Vec::new();
        let mut bloom = Bloom::with_capacity(10_000);
        for i in 0..10_000 {
            bloom.insert(hash_pair(&mut buf, "crumb", &format!("evt_{i}")));
        }
        for i in 0..10_000 {
            assert!(bloom.may_contain(hash_pair(&mut buf, "crumb", &format!("evt_{i}"))));
        }
        let false_positives = (10_000..110_000)
            .filter(|i| bloom.may_contain(hash_pair(&mut buf, "crumb", &format!("evt_{i}"))))
            .count();
        assert!(false_positives < 1_000, "{false_positives} false positives in 100,000");
        let again = Bloom::from_bytes(&bloom.to_bytes()).expect("round trip");
        assert_eq!(again.blocks, bloom.blocks);
        assert!(Bloom::from_bytes(&[1, 2, 3]).is_none());
    }

    #[test]
    fn encoded_keys_sort_as_sqlite_sorts_source_then_event_id() {
        let pairs = [("a", "z"), ("ab", "a"), ("a", "\u{0}x"), ("b", ""), ("a", "")];
        let encode_all = |pairs: &[(&str, &str)]| -> Vec<Vec<u8>> {
            pairs
                .iter()
                .map(|(s, e)| {
                    let mut buf = Vec::new();
                    encode(&mut buf, s, e);
                    buf
                })
                .collect()
        };
        let mut encoded = encode_all(&pairs);
        encoded.sort();
        // SQLite's BINARY collation compares bytes, as Rust's str ordering does.
        let mut sorted = pairs.to_vec();
        sorted.sort();
        let sorted_then_encoded = encode_all(&sorted);
        assert_eq!(encoded, sorted_then_encoded);
    }

    /// Keys in key order, as a run holds them: neighbours that share long
    /// prefixes, some that share nothing, ids long enough to fill a block
    /// alone, and seqs up to the largest.
    fn run_keys() -> Vec<(Vec<u8>, i64)> {
        let mut keys: Vec<(Vec<u8>, i64)> = (0..2_000)
            .map(|i| (format!("crave\0evt_{:08x}", i * 7919), i64::from(i) * 1_000_003))
            .chain([
                ("a\0".to_string(), 1),
                (format!("b\0{}", "x".repeat(1_500)), i64::MAX),
                (format!("b\0{}y", "x".repeat(1_500)), 0),
                ("crumb\0\u{e9}v\u{e9}nement".to_string(), 42),
            ])
            .map(|(k, seq)| (k.into_bytes(), seq))
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn blocks_give_back_every_key_and_seq_in_order() {
        let keys = run_keys();
        let mut blocks = Blocks::default();
        for (key, seq) in &keys {
            blocks.push(key, *seq);
        }
        blocks.close();
        assert!(blocks.full.len() > 20, "{} blocks", blocks.full.len());
        let mut read = Vec::new();
        for (last, bytes) in &blocks.full {
            // Small enough to stay in a leaf page, unless one key alone is not.
            assert!(
                bytes.len() <= BLOCK_BYTES || last.len() > BLOCK_BYTES - 20,
                "{}",
                bytes.len()
            );
            let mut block = BlockKeys::new(bytes);
            let mut greatest = Vec::new();
            while let Some(seq) = block.next_seq().unwrap() {
                greatest = block.key.clone();
                read.push((block.key.clone(), seq));
            }
            assert_eq!(&greatest, last, "a block is found by its greatest key");
        }
        assert_eq!(read, keys);
    }

    #[test]
    fn a_damaged_block_is_an_error_not_a_panic() {
        let mut blocks = Blocks::default();
        for (key, seq) in run_keys().iter().take(30) {
            blocks.push(key, *seq);
        }
        blocks.close();
        let good = &blocks.full[0].1;
        let mut damaged = vec![good[..good.len() / 2].to_vec(), vec![0xff; 12], vec![5, 200, 1]];
        damaged.push({
            let mut b = good.clone();
            b[0] = 9; // shares more than the (empty) key before it
            b
        });
        for bytes in damaged {
            let mut block = BlockKeys::new(&bytes);
            let outcome = std::iter::from_fn(|| block.next_seq().transpose()).find(Result::is_err);
            assert!(outcome.is_some(), "{bytes:?} read without an error");
        }
    }

    #[test]
    fn probes_find_each_key_of_a_written_run_and_nothing_else() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let keys = run_keys();
        let mut blocks = Blocks::default();
        for (key, seq) in &keys {
            blocks.push(key, *seq);
        }
        blocks.close();
        blocks.write(&conn, 7).unwrap();
        for (key, seq) in &keys {
            assert_eq!(probe(&conn, 7, key).unwrap(), Some(*seq), "{key:?}");
            assert_eq!(probe(&conn, 8, key).unwrap(), None, "another run");
            let mut missing = key.clone();
            missing.push(b'0');
            assert_eq!(probe(&conn, 7, &missing).unwrap(), None, "{missing:?}");
        }
        assert_eq!(probe(&conn, 7, b"zzz\0past the last").unwrap(), None);
        assert_eq!(probe(&conn, 7, b"0\0before the first").unwrap(), None);
    }

    #[test]
    fn levels_grow_by_fan_in() {
        let t = Tuning {
            seal_at: 10,
            fan_in: 4,
            ..Tuning::default()
        };
        assert_eq!(level_for(t, 1), 0);
        assert_eq!(level_for(t, 10), 0);
        assert_eq!(level_for(t, 11), 1);
        assert_eq!(level_for(t, 160), 2);
        assert_eq!(level_for(t, 161), 3);
    }
}
