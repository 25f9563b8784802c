//! One row of the table: start the target, drive the load, wait for
//! deliveries, stop the target, and check that nothing acknowledged was lost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::expeditor::{Daemon, Routing, Scrape, SinkBody, StoreKind};
use crate::load::{self, Corpus, LoadResult, Pace, Plan, Signed, event_id};
use crate::proc::{self, ProcStats, StallWatch, Stalls};
use crate::servers::{Baseline, SinkServer, SinkState};

/// Give up waiting for deliveries when none arrived for this long...
const DRAIN_STALL: Duration = Duration::from_secs(20);
/// ... or after this long in all.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Baseline,
    /// The baseline that answers only once the body is on disk.
    Durable,
    Ingest,
    EndToEnd,
    FanOut,
}

impl RowKind {
    pub const ALL: [RowKind; 5] = [
        RowKind::Baseline,
        RowKind::Durable,
        RowKind::Ingest,
        RowKind::EndToEnd,
        RowKind::FanOut,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RowKind::Baseline => "baseline",
            RowKind::Durable => "durable",
            RowKind::Ingest => "ingest",
            RowKind::EndToEnd => "e2e",
            RowKind::FanOut => "fanout",
        }
    }

    /// Whether the row runs expeditor (not one of the bench's own servers).
    pub fn is_expeditor(self) -> bool {
        !matches!(self, RowKind::Baseline | RowKind::Durable)
    }

    /// `http` sinks every event is routed to.
    pub fn sinks(self) -> usize {
        match self {
            RowKind::Baseline | RowKind::Durable | RowKind::Ingest => 0,
            RowKind::EndToEnd => 1,
            RowKind::FanOut => 5,
        }
    }
}

impl std::str::FromStr for RowKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RowKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown row {s:?}; expected baseline, durable, ingest, e2e or fanout"))
    }
}

/// What the rows share.
#[derive(Clone)]
pub struct Settings {
    pub connections: usize,
    pub duration: Duration,
    pub expeditor: PathBuf,
    /// Where expeditor's temp dirs (config, store) go; default: the system's.
    pub dir: Option<PathBuf>,
    /// `concurrency` of each sink; default: expeditor's.
    pub sink_concurrency: Option<usize>,
    /// What each sink's body template reads.
    pub sink_body: SinkBody,
    /// Routes with a `when` on the order view.
    pub when: bool,
    pub store: StoreKind,
    /// Events in the store before each expeditor row starts.
    pub preload: usize,
    /// The least time between the durable baseline's fsyncs' starts.
    pub durable_interval: Duration,
    /// Where each row's per-request timeline goes (`--trace`).
    pub trace: Option<PathBuf>,
}

/// Deliveries seen by the sink server for one row.
pub struct Delivered {
    /// Acknowledged events that reached every sink.
    pub events: u64,
    /// Those events per second, first send to last receipt.
    pub rate: f64,
    /// Send (scheduled send, in open loop) to the sink's receipt, per
    /// delivery, in microseconds.
    pub e2e_us: Histogram<u64>,
    /// Acknowledged (event, sink) pairs that never arrived.
    pub missing: u64,
    /// Deliveries received more than once (allowed: at least once).
    pub duplicates: u64,
}

/// The target process during the row.
pub struct Server {
    /// Spawn to `/healthz` 200 (expeditor only).
    pub ready: Option<Duration>,
    /// Resident memory just after ready (expeditor only).
    pub idle_rss: Option<u64>,
    /// Peak resident memory at the end of the row.
    pub peak_rss: u64,
    /// CPU the server used while the load ran, in cores.
    pub cpu_cores: f64,
    /// The same by thread name (expeditor only): is one thread the limit?
    pub threads: Vec<(String, f64)>,
    /// What expeditor's `/metrics` counted while the load ran (its store's
    /// fsyncs, its own ack latency), and how long the load ran.
    pub scraped: Option<(Scrape, Duration)>,
    /// Bytes expeditor wrote to storage while the load ran (SQLite: its WAL
    /// and the checkpoints' copies).
    pub written: Option<u64>,
}

/// Which run of a row this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Flat out (or at `--rate`): the most it acknowledges.
    Max,
    /// In open loop at half of the flat-out run's rate, for the latency targets.
    Half,
    /// In open loop at the highest rate at which delivery kept up (see
    /// `keeps_up`): the sustained rate of a row with sinks.
    Sustained,
    /// The baseline flat out once more, right after ingest's flat-out run:
    /// this VM's speed moves by a quarter within minutes (BENCHMARKS.md), so
    /// one baseline run minutes before ingest is a shaky yardstick. Ratios
    /// use the mean of the runs before and after ingest.
    Again,
    /// Flat out with `SATURATING` times the connections, baseline and ingest
    /// only: each server's capacity. At the table's C the bare server keeps
    /// both vCPUs busy, but ingest, each request waiting out a group commit,
    /// leaves CPU idle (BENCHMARKS.md, "What limits each row now").
    Saturated,
}

/// How many times the table's connections the `Saturated` runs use.
pub const SATURATING: usize = 4;

pub struct Row {
    pub kind: RowKind,
    pub pace: Pace,
    pub run: Run,
    pub connections: usize,
    pub load: LoadResult,
    pub delivered: Option<Delivered>,
    pub server: Server,
    /// CPU this bench process used while the load ran, in cores.
    pub bench_cpu_cores: f64,
    /// CPU everything else on the machine used meanwhile, in cores: other
    /// work disturbs the figures.
    pub other_cpu_cores: f64,
    /// Moments the whole machine stood still while the load ran.
    pub stalls: Stalls,
    /// Acknowledged events not in the store (expeditor rows).
    pub missing_in_store: usize,
    /// Everything that makes this run fail: loss, non-2xx, unclean exit.
    pub problems: Vec<String>,
}

impl Row {
    pub fn label(&self) -> String {
        label(self.kind, self.run)
    }

    /// Whether delivery kept up with this open-loop run's rate: the events
    /// reached every sink at 97 % of the rate or more, first send to last
    /// receipt (so a backlog left when sending stopped counts against it),
    /// and nothing was lost or refused. A run at a rate its ingest cannot
    /// take also fails here (it sends late, and the rate falls).
    pub fn keeps_up(&self) -> bool {
        match (self.pace, &self.delivered) {
            (Pace::Rate(rate), Some(d)) => self.problems.is_empty() && d.rate >= 0.97 * rate,
            _ => false,
        }
    }

    /// The most this row's target sustained: acks per second for baseline
    /// and ingest, delivered events per second when events go to sinks.
    pub fn max_rate(&self) -> f64 {
        match &self.delivered {
            Some(d) => d.rate,
            None => self.load.rate(),
        }
    }
}

/// CPU counters of the server, this process and the machine.
#[derive(Clone, Copy)]
struct Cpu {
    server: ProcStats,
    bench: ProcStats,
    machine: Duration,
}

impl Cpu {
    fn now(server: Option<ProcStats>) -> Self {
        Self {
            server: server.unwrap_or_default(),
            bench: ProcStats::me().unwrap_or_default(),
            machine: proc::machine_busy().unwrap_or_default(),
        }
    }

    /// (server, bench, other) in cores over `wall`.
    fn since(&self, before: &Cpu, wall: Duration) -> (f64, f64, f64) {
        let server = cores(self.server.cpu.saturating_sub(before.server.cpu), wall);
        let bench = cores(self.bench.cpu.saturating_sub(before.bench.cpu), wall);
        let machine = cores(self.machine.saturating_sub(before.machine), wall);
        (server, bench, (machine - server - bench).max(0.0))
    }
}

fn cores(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        cpu.as_secs_f64() / wall.as_secs_f64()
    }
}

fn label(kind: RowKind, run: Run) -> String {
    match (kind, run) {
        (_, Run::Max) => kind.name().to_string(),
        // The machine's floors for the ingest latency target.
        (RowKind::Baseline | RowKind::Durable, Run::Half) => format!("{} @ ingest 50%", kind.name()),
        (_, Run::Half) => format!("{} @ 50%", kind.name()),
        (_, Run::Sustained) => format!("{} sustained", kind.name()),
        (_, Run::Again) => format!("{} after ingest", kind.name()),
        (_, Run::Saturated) => format!("{} saturated", kind.name()),
    }
}

/// The row's load against `target`: flat out, every event once; at a rate,
/// as many as the duration takes.
fn plan(target: std::net::SocketAddr, pace: Pace, settings: &Settings, corpus_len: usize, label: &str) -> Plan {
    let count = match pace {
        Pace::FlatOut => corpus_len,
        Pace::Rate(r) => ((r * settings.duration.as_secs_f64()).ceil() as usize).clamp(1, corpus_len),
    };
    Plan {
        target,
        connections: settings.connections,
        pace,
        count,
        duration: settings.duration,
        trace: settings
            .trace
            .as_ref()
            .map(|dir| dir.join(format!("{}.csv", label.replace([' ', '@', '%'], "_")))),
    }
}

fn load_problems(row: &str, load: &LoadResult, problems: &mut Vec<String>) {
    for (status, n) in &load.rejected {
        problems.push(format!("{row}: {n} requests answered {status}"));
    }
    if load.errors > 0 {
        problems.push(format!(
            "{row}: {} requests failed (connection error or timeout)",
            load.errors
        ));
    }
    if load.duplicates > 0 {
        problems.push(format!("{row}: {} new events answered as duplicates", load.duplicates));
    }
}

/// Before a row starts: the disk's writes of the rows before it (their
/// stores, and the deletion of those) are flushed now, not into this row's
/// first fsyncs.
async fn settle_disk() {
    let _ = tokio::task::spawn_blocking(rustix::fs::sync).await;
}

/// The baseline or the durable baseline (`kind`); `Run::Half`: at ingest's
/// half rate, for comparison.
pub async fn baseline(
    kind: RowKind,
    corpus: &Arc<Corpus>,
    pace: Pace,
    run: Run,
    settings: &Settings,
) -> anyhow::Result<Row> {
    settle_disk().await;
    let server = Baseline::start(
        kind == RowKind::Durable,
        settings.dir.as_deref(),
        settings.durable_interval,
    )?;
    // Signed now (CrumbPOS signatures carry the time), before the clock starts.
    let signed = Arc::new(Signed::now(corpus.clone()));
    let plan = plan(server.addr, pace, settings, corpus.len(), &label(kind, run));
    let before = Cpu::now(server.stats());
    let watch = StallWatch::start()?;
    let started = Instant::now();
    let load = load::run(signed, plan).await?;
    let wall = started.elapsed();
    let stalls = watch.stop();
    let after = Cpu::now(server.stats());
    let (server_cpu, bench_cpu, other_cpu) = after.since(&before, wall);
    server.stop().await;
    let mut problems = Vec::new();
    load_problems(&label(kind, run), &load, &mut problems);
    Ok(Row {
        kind,
        pace,
        run,
        connections: settings.connections,
        load,
        delivered: None,
        server: Server {
            ready: None,
            idle_rss: None,
            peak_rss: after.server.peak_rss,
            cpu_cores: server_cpu,
            threads: Vec::new(),
            scraped: None,
            written: None,
        },
        bench_cpu_cores: bench_cpu,
        other_cpu_cores: other_cpu,
        stalls,
        missing_in_store: 0,
        problems,
    })
}

pub async fn expeditor(
    kind: RowKind,
    corpus: &Arc<Corpus>,
    pace: Pace,
    run: Run,
    settings: &Settings,
) -> anyhow::Result<Row> {
    settle_disk().await;
    let label = label(kind, run);
    let sink_server = match kind.sinks() {
        0 => None,
        n => Some(SinkServer::start(n, corpus.len()).await?),
    };
    let routing = match &sink_server {
        None => Routing::Nowhere { when: settings.when },
        Some(s) => Routing::Sinks {
            addr: s.addr,
            sinks: kind.sinks(),
            concurrency: settings.sink_concurrency,
            body: settings.sink_body,
            when: settings.when,
        },
    };
    let daemon = Daemon::start(
        &settings.expeditor,
        settings.dir.as_deref(),
        &settings.store,
        routing,
        (settings.preload > 0).then(|| (settings.preload, corpus.typical_body())),
    )
    .await?;
    let signed = Arc::new(Signed::now(corpus.clone()));
    let plan = plan(daemon.ingest, pace, settings, corpus.len(), &label);
    // Scraped outside the CPU window: rendering /metrics queries the store,
    // which is not the load's work.
    let scraped_before = daemon.scrape().await;
    let written_before = daemon.written();
    let before = Cpu::now(daemon.stats());
    let threads_before = daemon.threads();
    let watch = StallWatch::start()?;
    let started = Instant::now();
    let load = load::run(signed, plan).await?;
    let wall = started.elapsed();
    let stalls = watch.stop();
    let (server_cpu, bench_cpu, other_cpu) = Cpu::now(daemon.stats()).since(&before, wall);
    let threads = daemon
        .threads()
        .into_iter()
        .map(|(name, cpu)| {
            let spent = cpu.saturating_sub(threads_before.get(&name).copied().unwrap_or_default());
            (name, cores(spent, wall))
        })
        .filter(|(_, c)| *c >= 0.01)
        .collect();
    // Outside the CPU window, as above.
    let written = daemon
        .written()
        .zip(written_before)
        .map(|(after, before)| after.saturating_sub(before));
    let scraped = Some((daemon.scrape().await.since(&scraped_before), wall));
    let mut problems = Vec::new();
    load_problems(&label, &load, &mut problems);

    let delivered = match &sink_server {
        Some(s) => {
            drain(&s.state, &load.acked).await;
            Some(delivered(&s.state, &load))
        }
        None => None,
    };
    let peak_rss = daemon.stats().map_or(0, |s| s.peak_rss);
    let (ready, idle_rss) = (daemon.ready, daemon.idle.rss);
    let stopped = daemon.stop().await?;
    if let Some(s) = sink_server {
        let unknown = s.state.unknown.load(std::sync::atomic::Ordering::Relaxed);
        if unknown > 0 {
            problems.push(format!(
                "{label}: the sink server got {unknown} requests it could not place"
            ));
        }
        s.stop();
    }
    let warnings = stopped.warnings();
    if !warnings.is_empty() {
        eprintln!(
            "{label}: expeditor logged {} warnings or errors; the first:",
            warnings.len()
        );
        for w in warnings.iter().take(20) {
            eprintln!("  {w}");
        }
    }
    if !stopped.clean {
        problems.push(format!(
            "{label}: expeditor did not exit 0 after SIGTERM ({}); its log ends:\n{}",
            stopped.how,
            stopped.log_tail()
        ));
    }

    // Every acknowledged event must be in the store.
    let store = stopped.store().await?;
    let missing_in_store = load
        .acked
        .iter()
        .filter(|&&i| {
            let source = corpus.get(i).vendor.source();
            !store.events.contains(&format!("{source}:{}", event_id(i)))
        })
        .count();
    if missing_in_store > 0 {
        problems.push(format!(
            "{label}: {missing_in_store} acknowledged events are not in the store"
        ));
    }
    if let Some(d) = &delivered {
        if d.missing > 0 {
            problems.push(format!(
                "{label}: {} acknowledged deliveries never reached their sink (waited up to {DRAIN_STALL:?} without progress)",
                d.missing
            ));
        }
        if store.dead > 0 {
            problems.push(format!("{label}: {} deliveries are dead letters", store.dead));
        }
    }
    Ok(Row {
        kind,
        pace,
        run,
        connections: settings.connections,
        load,
        delivered,
        server: Server {
            ready: Some(ready),
            idle_rss: Some(idle_rss),
            peak_rss,
            cpu_cores: server_cpu,
            threads,
            scraped,
            written,
        },
        bench_cpu_cores: bench_cpu,
        other_cpu_cores: other_cpu,
        stalls,
        missing_in_store,
        problems,
    })
}

/// (event, sink) pairs acknowledged but not yet received.
fn missing(state: &SinkState, acked: &[usize]) -> u64 {
    state
        .sinks
        .iter()
        .map(|r| acked.iter().filter(|&&i| r.first(i).is_none()).count() as u64)
        .sum()
}

/// Waits until every acknowledged event reached every sink, or deliveries
/// stall, or the time limit.
async fn drain(state: &SinkState, acked: &[usize]) {
    let started = Instant::now();
    let mut last = u64::MAX;
    let mut progress_at = Instant::now();
    loop {
        let left = missing(state, acked);
        if left == 0 {
            return;
        }
        if left < last {
            last = left;
            progress_at = Instant::now();
        }
        if progress_at.elapsed() > DRAIN_STALL || started.elapsed() > DRAIN_LIMIT {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn delivered(state: &SinkState, load: &LoadResult) -> Delivered {
    let mut e2e_us = load::histogram();
    let mut events = 0u64;
    let mut missing = 0u64;
    let mut last_ns = load.first_send_ns;
    for &i in &load.acked {
        let sent = load.sent_ns[i];
        let mut everywhere = true;
        for r in &state.sinks {
            match r.first(i) {
                Some(at) => {
                    e2e_us.saturating_record((at.saturating_sub(sent) / 1000).max(1));
                    last_ns = last_ns.max(at);
                }
                None => {
                    everywhere = false;
                    missing += 1;
                }
            }
        }
        if everywhere {
            events += 1;
        }
    }
    let secs = Duration::from_nanos(last_ns.saturating_sub(load.first_send_ns)).as_secs_f64();
    Delivered {
        events,
        rate: if secs > 0.0 { events as f64 / secs } else { 0.0 },
        e2e_us,
        missing,
        duplicates: state.sinks.iter().map(|r| r.duplicates()).sum(),
    }
}

/// A row with the given rate (`answered` in one second) and nothing else
/// measured, for the tests of what is computed from rows.
#[cfg(test)]
pub fn test_row(kind: RowKind, run: Run, pace: Pace, answered: u64, delivered_rate: Option<f64>) -> Row {
    Row {
        kind,
        pace,
        run,
        connections: 64,
        load: LoadResult {
            answered,
            duplicates: 0,
            rejected: Default::default(),
            errors: 0,
            ack_us: load::histogram(),
            late_us: load::histogram(),
            acked: Vec::new(),
            sent_ns: Vec::new(),
            first_send_ns: 0,
            last_answer_ns: 1_000_000_000,
        },
        delivered: delivered_rate.map(|rate| Delivered {
            events: 0,
            rate,
            e2e_us: load::histogram(),
            missing: 0,
            duplicates: 0,
        }),
        server: Server {
            ready: None,
            idle_rss: None,
            peak_rss: 0,
            cpu_cores: 0.0,
            threads: Vec::new(),
            scraped: None,
            written: None,
        },
        bench_cpu_cores: 0.0,
        other_cpu_cores: 0.0,
        stalls: Stalls::default(),
        missing_in_store: 0,
        problems: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pace: Pace, delivered_rate: Option<f64>, problems: Vec<String>) -> Row {
        Row {
            problems,
            ..test_row(RowKind::EndToEnd, Run::Sustained, pace, 0, delivered_rate)
        }
    }

    #[test]
    fn delivery_keeps_up_at_97_percent_of_the_rate_and_no_less() {
        assert!(row(Pace::Rate(1000.0), Some(980.0), vec![]).keeps_up());
        assert!(row(Pace::Rate(1000.0), Some(970.0), vec![]).keeps_up());
        assert!(!row(Pace::Rate(1000.0), Some(960.0), vec![]).keeps_up());
        // Loss or refusals never keep up, however fast.
        assert!(!row(Pace::Rate(1000.0), Some(1000.0), vec!["lost".into()]).keeps_up());
        // Only an open-loop run with sinks has a rate to keep up with.
        assert!(!row(Pace::FlatOut, Some(1000.0), vec![]).keeps_up());
        assert!(!row(Pace::Rate(1000.0), None, vec![]).keeps_up());
    }
}
