//! The load generator: a corpus of distinct, signed vendor events, and the
//! workers that send them over keep-alive HTTP/1.1 connections, flat out
//! (closed loop) or at a fixed rate (open loop).
//!
//! Every event is sent at most once per run, so each request is a new event:
//! a duplicate would take expeditor's cheaper dedupe path and flatter it.
//!
//! In open loop, request `i` is due at `start + i / rate`, and its latency is
//! measured from that moment, not from when a connection was free to send
//! it: when the target falls behind, the wait counts (no coordinated
//! omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

pub const CRUMB_SECRET: &str = "bench-crumb-secret";
pub const CRAVE_SECRET: &str = "bench-crave-secret";

/// One request waits at most this long for its answer (Crave gives up after
/// 10 s, CrumbPOS after 30 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Order events of each vendor, in rotation.
const CRUMB_TYPES: &[&str] = &["order.created", "order.updated"];
const CRAVE_TYPES: &[&str] = &["order.created", "order.confirmed", "order.ready", "order.completed"];

/// Nanoseconds since the process's time origin. The load generator's send
/// times and the sink server's receipt times share it, so they compare.
pub fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Crumb,
    Crave,
}

impl Vendor {
    /// The source name in the generated config (`/webhooks/<name>`).
    pub fn source(self) -> &'static str {
        match self {
            Vendor::Crumb => "crumb",
            Vendor::Crave => "crave",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Vendor::Crumb => "crumbpos",
            Vendor::Crave => "crave",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Vendor::Crumb => "/webhooks/crumb",
            Vendor::Crave => "/webhooks/crave",
        }
    }

    fn signature_header(self) -> HeaderName {
        match self {
            Vendor::Crumb => expeditor::verify::CRUMB_SIGNATURE,
            Vendor::Crave => expeditor::verify::CRAVE_SIGNATURE,
        }
    }
}

/// The event id of corpus entry `i`; [`index_of`] reverses it.
///
/// Vendors' ids are opaque and in no useful order, so consecutive entries get
/// ids spread at random over the whole key space (a bijection of `i`, in
/// hex): each insert lands on its own page of the store's dedupe index, as it
/// does in production. Counting ids (`evt_00000001`, ...) would all land at
/// the index's end and flatter the store.
pub fn event_id(i: usize) -> String {
    format!("evt_{:016x}", scatter(i as u64))
}

pub fn index_of(id: &str) -> Option<usize> {
    let hex = id.strip_prefix("evt_")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(|y| unscatter(y) as usize)
}

/// Two rounds of multiply (by an odd number: a bijection of u64) and fold.
fn scatter(i: u64) -> u64 {
    fold(fold(i.wrapping_mul(K1)).wrapping_mul(K2))
}

fn unscatter(y: u64) -> u64 {
    fold(fold(y).wrapping_mul(K2_INV)).wrapping_mul(K1_INV)
}

/// The high half into the low; undoes itself.
fn fold(x: u64) -> u64 {
    x ^ (x >> 32)
}

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xBF58_476D_1CE4_E5B9;
const K1_INV: u64 = inverse(K1);
const K2_INV: u64 = inverse(K2);

/// The inverse of an odd `k` mod 2^64 (each Newton step doubles the correct bits).
const fn inverse(k: u64) -> u64 {
    let mut inv = k;
    let mut step = 0;
    while step < 6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(k.wrapping_mul(inv)));
        step += 1;
    }
    inv
}

pub struct Event {
    pub vendor: Vendor,
    body: Bytes,
}

/// The N events of a run: even entries CrumbPOS, odd ones Crave.
pub struct Corpus {
    events: Vec<Event>,
}

impl Corpus {
    /// Builds `n` distinct events from expeditor's sample vendor payloads.
    pub fn build(n: usize) -> anyhow::Result<Self> {
        let mut events = Vec::with_capacity(n);
        for i in 0..n {
            let (vendor, types) = if i % 2 == 0 {
                (Vendor::Crumb, CRUMB_TYPES)
            } else {
                (Vendor::Crave, CRAVE_TYPES)
            };
            let event_type = types[(i / 2) % types.len()];
            let value = expeditor::sample::sample_event(vendor.kind(), event_type, &event_id(i), i as u64)
                .with_context(|| format!("no sample {} {event_type} event", vendor.kind()))?;
            let body = Bytes::from(serde_json::to_vec(&value)?);
            events.push(Event { vendor, body });
        }
        Ok(Self { events })
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn get(&self, i: usize) -> &Event {
        &self.events[i]
    }

    /// A typical body (the first event's), for rows the bench writes itself.
    pub fn typical_body(&self) -> &[u8] {
        self.events.first().map_or(&[], |e| &e.body[..])
    }

    pub fn mean_body_len(&self) -> usize {
        let total: usize = self.events.iter().map(|e| e.body.len()).sum();
        total / self.events.len().max(1)
    }
}

/// The corpus signed with the real schemes as of one moment. CrumbPOS signs
/// a timestamp that must be within 5 minutes of the receiver's clock, so
/// each row signs again just before it starts.
pub struct Signed {
    corpus: Arc<Corpus>,
    signatures: Vec<HeaderValue>,
}

impl Signed {
    pub fn new(corpus: Arc<Corpus>, now_unix: i64) -> Self {
        let signatures = corpus
            .events
            .iter()
            .map(|e| {
                let value = match e.vendor {
                    Vendor::Crumb => expeditor::verify::sign_crumbpos(CRUMB_SECRET.as_bytes(), now_unix, &e.body),
                    Vendor::Crave => expeditor::verify::sign_crave(CRAVE_SECRET.as_bytes(), &e.body),
                };
                HeaderValue::try_from(value).expect("signatures are ASCII")
            })
            .collect();
        Self { corpus, signatures }
    }

    pub fn now(corpus: Arc<Corpus>) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Self::new(corpus, now)
    }

    pub fn len(&self) -> usize {
        self.corpus.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Closed loop: each connection sends its next request as soon as the
    /// previous one is answered.
    FlatOut,
    /// Open loop: requests per second, whatever the answers do.
    Rate(f64),
}

impl std::fmt::Display for Pace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pace::FlatOut => f.write_str("flat out"),
            Pace::Rate(r) => write!(f, "{} req/s", crate::report::thousands(*r)),
        }
    }
}

pub struct Plan {
    pub target: SocketAddr,
    pub connections: usize,
    pub pace: Pace,
    /// Events to send: the first `count` of the corpus.
    pub count: usize,
    /// Flat out: stop sending after this long.
    pub duration: Duration,
    /// Where to write each request's timeline (`--trace`).
    pub trace: Option<std::path::PathBuf>,
}

/// What one load run saw.
pub struct LoadResult {
    /// Requests answered (any status).
    pub answered: u64,
    /// Answered 2xx with `"duplicate"` in the body (none expected: every
    /// event is new).
    pub duplicates: u64,
    /// Answers that were not 2xx, by status.
    pub rejected: BTreeMap<u16, u64>,
    /// Connection errors and timeouts.
    pub errors: u64,
    /// Send (or, in open loop, scheduled) to answer, in microseconds.
    pub ack_us: Histogram<u64>,
    /// Open loop: how late the generator sent after the scheduled time, in
    /// microseconds (all connections busy, or the wake-up was late). Part of
    /// `ack_us`; when this is large, the generator, not the target, is slow.
    pub late_us: Histogram<u64>,
    /// Corpus indices answered 2xx: every one must be in the store.
    pub acked: Vec<usize>,
    /// Per corpus index: when latency starts counting (ns, [`now_ns`]); 0 if
    /// the event was never sent.
    pub sent_ns: Vec<u64>,
    pub first_send_ns: u64,
    pub last_answer_ns: u64,
}

impl LoadResult {
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.last_answer_ns.saturating_sub(self.first_send_ns))
    }

    /// Answered requests per second, first send to last answer.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed().as_secs_f64();
        if secs > 0.0 { self.answered as f64 / secs } else { 0.0 }
    }
}

/// A histogram of microseconds from 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

struct Shared {
    signed: Arc<Signed>,
    host: HeaderValue,
    pace: Pace,
    count: usize,
    next: AtomicUsize,
    sent_ns: Vec<AtomicU64>,
    start_ns: u64,
    /// No request is started after this.
    deadline: Instant,
    /// Open loop: one permit per request that is due.
    due: Semaphore,
}

struct WorkerResult {
    answered: u64,
    duplicates: u64,
    rejected: BTreeMap<u16, u64>,
    errors: u64,
    ack_us: Histogram<u64>,
    late_us: Histogram<u64>,
    acked: Vec<usize>,
    last_answer_ns: u64,
    /// (event, due, sent, answered) in ns, when tracing.
    trace: Option<Vec<(usize, u64, u64, u64)>>,
}

impl WorkerResult {
    /// `expected`: about how many requests this worker sends, so that its
    /// lists seldom grow (and copy themselves) while the clock runs; a
    /// worker may take more than its share, so the caller adds headroom.
    fn new(trace: bool, expected: usize) -> Self {
        Self {
            answered: 0,
            duplicates: 0,
            rejected: BTreeMap::new(),
            errors: 0,
            ack_us: histogram(),
            late_us: histogram(),
            acked: Vec::with_capacity(expected),
            last_answer_ns: 0,
            trace: trace.then(|| Vec::with_capacity(expected)),
        }
    }
}

type Connection = SendRequest<Full<Bytes>>;

async fn connect(target: SocketAddr) -> anyhow::Result<Connection> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("cannot connect to {target}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends the plan's events and waits for every answer (or its timeout).
pub async fn run(signed: Arc<Signed>, plan: Plan) -> anyhow::Result<LoadResult> {
    let count = plan.count.min(signed.len());
    let connections = plan.connections.max(1);
    // Connections are opened before the clock starts: setting them up is not
    // what is measured.
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(connect(plan.target).await?);
    }
    // So are the workers' records: two histograms of ~180 KB each per
    // connection, zeroed on creation. Made inside the clock, their page
    // faults kept the generator from sending on time for its first
    // 15 - 40 ms and showed as expeditor's cold start (session 19).
    let per_connection = count.div_ceil(connections) * 5 / 4;
    let records: Vec<WorkerResult> = (0..connections)
        .map(|_| WorkerResult::new(plan.trace.is_some(), per_connection))
        .collect();
    let sent_ns = (0..count).map(|_| AtomicU64::new(0)).collect();
    let start = Instant::now();
    let start_ns = now_ns();
    let sending_for = match plan.pace {
        Pace::FlatOut => plan.duration,
        // Open loop ends when the last request is due; the margin lets a
        // target that fell behind catch up, within bounds.
        Pace::Rate(r) => Duration::from_secs_f64(count as f64 / r) + Duration::from_secs(30),
    };
    let shared = Arc::new(Shared {
        signed,
        host: HeaderValue::try_from(plan.target.to_string())?,
        pace: plan.pace,
        count,
        next: AtomicUsize::new(0),
        sent_ns,
        start_ns,
        deadline: start + sending_for,
        due: Semaphore::new(0),
    });
    let stop_pacer = Arc::new(AtomicBool::new(false));
    let pacer = match plan.pace {
        Pace::Rate(rate) => Some(spawn_pacer(
            shared.clone(),
            rate,
            connections,
            start,
            stop_pacer.clone(),
        )?),
        Pace::FlatOut => None,
    };

    let mut workers = tokio::task::JoinSet::new();
    for (conn, record) in conns.into_iter().zip(records) {
        workers.spawn(worker(shared.clone(), plan.target, conn, record));
    }
    let mut results = Vec::with_capacity(connections);
    let hard_stop = tokio::time::Instant::from_std(shared.deadline + REQUEST_TIMEOUT + Duration::from_secs(5));
    loop {
        match tokio::time::timeout_at(hard_stop, workers.join_next()).await {
            Ok(Some(r)) => results.push(r.context("load worker panicked")?),
            Ok(None) => break,
            Err(_) => {
                eprintln!("  load: workers still busy at the time limit; stopping them");
                workers.abort_all();
                break;
            }
        }
    }
    stop_pacer.store(true, Ordering::Relaxed);
    if let Some(p) = pacer {
        let _ = p.join();
    }

    let mut out = LoadResult {
        answered: 0,
        duplicates: 0,
        rejected: BTreeMap::new(),
        errors: 0,
        ack_us: histogram(),
        late_us: histogram(),
        acked: Vec::new(),
        sent_ns: shared.sent_ns.iter().map(|t| t.load(Ordering::Relaxed)).collect(),
        first_send_ns: start_ns,
        last_answer_ns: start_ns,
    };
    if let Some(path) = &plan.trace {
        write_trace(path, start_ns, &results).with_context(|| format!("cannot write {}", path.display()))?;
    }
    for r in results {
        out.answered += r.answered;
        out.duplicates += r.duplicates;
        out.errors += r.errors;
        for (status, n) in r.rejected {
            *out.rejected.entry(status).or_default() += n;
        }
        out.ack_us.add(&r.ack_us).expect("same histogram bounds");
        out.late_us.add(&r.late_us).expect("same histogram bounds");
        out.acked.extend(r.acked);
        out.last_answer_ns = out.last_answer_ns.max(r.last_answer_ns);
    }
    // Requests never answered (aborted at the time limit) are errors too.
    let started = shared.next.load(Ordering::Relaxed).min(count) as u64;
    out.errors += started.saturating_sub(out.answered + out.errors);
    out.acked.sort_unstable();
    Ok(out)
}

/// One line per request: connection, event, and when it was due, sent and
/// answered, in ms from the load's start.
fn write_trace(path: &std::path::Path, start_ns: u64, results: &[WorkerResult]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "connection,event,due_ms,sent_ms,answered_ms")?;
    let ms = |ns: u64| ns.saturating_sub(start_ns) as f64 / 1e6;
    for (c, r) in results.iter().enumerate() {
        for &(i, due, sent, done) in r.trace.iter().flatten() {
            writeln!(f, "{c},{i},{:.3},{:.3},{:.3}", ms(due), ms(sent), ms(done))?;
        }
    }
    f.flush()
}

/// Open loop: a thread (finer-grained than the async timer's 1 ms) that adds
/// one permit per request as it falls due.
fn spawn_pacer(
    shared: Arc<Shared>,
    rate: f64,
    connections: usize,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let handle = std::thread::Builder::new().name("pacer".into()).spawn(move || {
        let mut released = 0usize;
        while released < shared.count && !stop.load(Ordering::Relaxed) {
            let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(shared.count);
            if due > released {
                shared.due.add_permits(due - released);
                released = due;
            }
            let next = start + Duration::from_secs_f64(released as f64 / rate);
            let wait = next.saturating_duration_since(Instant::now());
            std::thread::sleep(wait.clamp(Duration::from_micros(20), Duration::from_millis(10)));
        }
        // Wakes the workers still waiting, so they find nothing left and end.
        shared.due.add_permits(connections);
    })?;
    Ok(handle)
}

async fn worker(shared: Arc<Shared>, target: SocketAddr, mut conn: Connection, mut r: WorkerResult) -> WorkerResult {
    loop {
        if let Pace::Rate(_) = shared.pace {
            match shared.due.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        if Instant::now() >= shared.deadline {
            break;
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= shared.count {
            break;
        }
        let counts_from = match shared.pace {
            Pace::FlatOut => now_ns(),
            Pace::Rate(rate) => shared.start_ns + (i as f64 / rate * 1e9) as u64,
        };
        shared.sent_ns[i].store(counts_from.max(1), Ordering::Relaxed);
        let event = shared.signed.corpus.get(i);
        let signature = shared.signed.signatures[i].clone();
        let request = Request::builder()
            .method(Method::POST)
            .uri(event.vendor.path())
            .header(header::HOST, shared.host.clone())
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(event.vendor.signature_header(), signature)
            .body(Full::new(event.body.clone()))
            .expect("a valid request");
        if let Pace::Rate(_) = shared.pace {
            r.late_us
                .saturating_record((now_ns().saturating_sub(counts_from) / 1000).max(1));
        }
        let sent_ns = now_ns();
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
            conn.ready().await?;
            let response = conn.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        })
        .await;
        let done_ns = now_ns();
        if let Some(trace) = r.trace.as_mut() {
            trace.push((i, counts_from, sent_ns, done_ns));
        }
        match answer {
            Ok(Ok((status, body))) => {
                r.answered += 1;
                r.last_answer_ns = r.last_answer_ns.max(done_ns);
                let us = (done_ns.saturating_sub(counts_from) / 1000).max(1);
                r.ack_us.saturating_record(us);
                if status.is_success() {
                    if body.windows(9).any(|w| w == b"duplicate") {
                        r.duplicates += 1;
                    }
                    r.acked.push(i);
                } else {
                    *r.rejected.entry(status.as_u16()).or_default() += 1;
                }
            }
            Ok(Err(_)) | Err(_) => {
                r.errors += 1;
                // The connection is unusable (or stuck): open another, once.
                match connect(target).await {
                    Ok(c) => conn = c,
                    Err(_) => break,
                }
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_one_line_per_request_in_ms_from_the_start() {
        let result = |trace| WorkerResult {
            trace: Some(trace),
            ..WorkerResult::new(false, 0)
        };
        let start = 1_000_000_000;
        let results = [
            result(vec![(7, start + 1_000_000, start + 1_500_000, start + 3_250_000)]),
            result(vec![(8, start + 2_000_000, start + 2_000_000, start + 112_000_000)]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.csv");
        write_trace(&path, start, &results).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "connection,event,due_ms,sent_ms,answered_ms\n0,7,1.000,1.500,3.250\n1,8,2.000,2.000,112.000\n"
        );
    }

    #[test]
    fn event_ids_are_distinct_scattered_and_reversible() {
        let ids: Vec<String> = (0..10_000).map(event_id).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(index_of(id), Some(i), "{id}");
        }
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Consecutive entries are in no key order: about half the pairs
        // ascend (counting ids: all of them).
        let later = ids.windows(2).filter(|w| w[1] > w[0]).count();
        assert!((4_000..6_000).contains(&later), "{later} of 9,999 ascend");
        assert_eq!(index_of("evt_bench_00000001"), None);
        assert_eq!(index_of("evt_xyz"), None);
    }
}
