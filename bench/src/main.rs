//! expeditor-bench: how fast expeditor acknowledges and delivers webhooks,
//! against what this machine can do (a bare hyper server), in one run.
//!
//! # Layout
//!
//! - [`load`]: the corpus of signed vendor events, and the load generator:
//!   C keep-alive connections, flat out or at a fixed rate, HDR histograms.
//! - [`servers`]: the baseline server (a separate process: this binary's
//!   hidden `baseline-server` subcommand) and the sink server expeditor
//!   delivers to (in this process, recording each event's arrival).
//! - [`expeditor`]: the daemon under test: generated config, start-to-ready
//!   time, SIGTERM, and its store read back afterwards.
//! - [`rows`]: one table row: target up, load, drain, stop, loss check.
//! - [`report`]: the markdown table and the targets.
//! - [`proc`]: memory and CPU from `/proc`, and signals.
//!
//! See BENCHMARKS.md at the repository root for the figures and how to
//! reproduce them.

mod expeditor;
mod load;
mod preload;
mod proc;
mod report;
mod rows;
mod servers;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::expeditor::{SinkBody, StoreKind};
use crate::load::{Corpus, Pace};
use crate::rows::{Row, RowKind, Run, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "expeditor-bench",
    about = "Load-tests expeditor against a bare hyper server on this machine and prints one table",
    after_help = "Rows: baseline (bare hyper server), durable (the same, answering once the body is fdatasync'd to \
                  a file next to where expeditor's store goes, in groups), ingest (verify, dedupe, durable store; routes choose no sink), \
                  e2e (every event to one http sink), fanout (to five). Right after ingest's flat-out run the baseline \
                  runs once more, and ratios are to the mean of its two runs (this VM's speed drifts); then both \
                  run flat out with four times the connections (saturated: each server's capacity; their ratio \
                  is to each other). After each \
                  flat-out expeditor row, the same \
                  row runs again in open loop at half the rate it reached, for the latency targets. After e2e and \
                  fanout, open-loop runs first search for the highest rate at which delivery keeps up (the sustained \
                  rate), and their half-rate run is at half of that.\n\
                  Exits non-zero if an acknowledged event is missing from the store or a sink, a request is not \
                  answered 2xx, or expeditor does not exit 0 on SIGTERM."
)]
struct Cli {
    /// Distinct events to build; each row sends each at most once.
    #[arg(long)]
    events: Option<usize>,
    /// Concurrent keep-alive connections.
    #[arg(long)]
    connections: Option<usize>,
    /// Flat out: stop sending after this long. At a rate: send for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Send at this many requests per second (open loop) instead of flat out;
    /// the half-rate runs are then skipped.
    #[arg(long)]
    rate: Option<f64>,
    /// Rows to run, comma-separated: baseline, durable, ingest, e2e, fanout.
    #[arg(long, value_delimiter = ',', default_value = "baseline,durable,ingest,e2e,fanout")]
    rows: Vec<RowKind>,
    /// The expeditor binary.
    #[arg(long, default_value = "target/release/expeditor")]
    expeditor: PathBuf,
    /// Where expeditor's store goes (a temp dir inside this directory): the
    /// disk whose fsync every ack waits for. Default: the system temp dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run expeditor on PostgreSQL instead of its embedded SQLite store: a
    /// fresh database per row on this server, e.g.
    /// `postgres://postgres@127.0.0.1:5432/postgres`.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// Fill the store with this many events (a week of them, as pruning
    /// leaves it) before each expeditor row: does a big store slow it down?
    #[arg(long, default_value_t = 0)]
    preload: usize,
    /// `concurrency` of each http sink in the generated config. Default:
    /// expeditor's own default, as a user gets it.
    #[arg(long)]
    sink_concurrency: Option<usize>,
    /// Each http sink's body: `id` (`{ id = "{{ event.id }}" }`, the
    /// table's) or `kds` (config.toml's KDS ticket, which reads the order
    /// view).
    #[arg(long, value_enum, default_value = "id")]
    sink_body: SinkBody,
    /// Route with a `when` on the order view, evaluated for every order
    /// event: for ingest a route whose `when` holds for none (still no
    /// deliveries), for e2e and fanout the route to the sinks (it holds for
    /// every order of the corpus).
    #[arg(long)]
    when: bool,
    /// The least time between the durable baseline's fsyncs' starts. 0: the
    /// next group is synced the moment the last fsync returns (the most it
    /// can ack flat out); expeditor's store waits 0.5 ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    durable_interval: Duration,
    /// Write each row's requests to DIR/<row>.csv: connection, event, and
    /// when it was due, sent and answered (ms from the load's start), to see
    /// in which moments a tail forms.
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// Skip the open-loop runs at half of each row's maximum rate.
    #[arg(long)]
    no_half_rate: bool,
    /// Skip the search for e2e's and fanout's sustained rate (four open-loop
    /// runs each).
    #[arg(long)]
    no_sustained: bool,
    /// Skip the baseline's and ingest's flat-out runs with four times the
    /// connections (each server's capacity, beside the table's C).
    #[arg(long)]
    no_saturated: bool,
    /// A few seconds for CI: 1000 events, 8 connections, no half-rate runs
    /// (the options above override).
    #[arg(long)]
    smoke: bool,
    #[command(subcommand)]
    command: Option<Hidden>,
}

#[derive(Debug, Subcommand)]
enum Hidden {
    /// The baseline server; run by the bench itself.
    #[command(hide = true)]
    BaselineServer {
        /// Be the durable baseline, its journal in this directory.
        #[arg(long)]
        journal: Option<PathBuf>,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        sync_interval: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Hidden::BaselineServer { journal, sync_interval }) = &cli.command {
        return servers::baseline_main(journal.as_deref(), *sync_interval);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the rows and prints the table; false if anything was lost or failed.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let events = cli.events.unwrap_or(if cli.smoke { 1_000 } else { 200_000 });
    let mut settings = Settings {
        connections: cli.connections.unwrap_or(if cli.smoke { 8 } else { 64 }),
        duration: cli.duration.unwrap_or(if cli.smoke {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(10)
        }),
        expeditor: cli.expeditor.clone(),
        dir: cli.dir.clone(),
        sink_concurrency: cli.sink_concurrency,
        sink_body: cli.sink_body,
        when: cli.when,
        preload: cli.preload,
        durable_interval: cli.durable_interval,
        trace: cli.trace.clone(),
        store: match &cli.postgres {
            Some(server) => StoreKind::Postgres { server: server.clone() },
            None => StoreKind::Sqlite,
        },
    };
    let half_rate = !cli.no_half_rate && !cli.smoke && cli.rate.is_none();
    let search_sustained = !cli.no_sustained && !cli.smoke && cli.rate.is_none();
    let pace = cli.rate.map_or(Pace::FlatOut, Pace::Rate);
    if cli.rows.iter().any(|r| r.is_expeditor()) {
        if !settings.expeditor.is_file() {
            anyhow::bail!(
                "no expeditor binary at {} (build it with `cargo build --release -p expeditor`, or pass --expeditor)",
                settings.expeditor.display()
            );
        }
        // expeditor runs in its temp dir: a relative path would not resolve there.
        settings.expeditor = std::fs::canonicalize(&settings.expeditor)?;
    }

    let version = if cli.rows.iter().any(|r| r.is_expeditor()) {
        std::process::Command::new(&settings.expeditor)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    eprintln!("machine: {}", proc::machine_summary());
    eprintln!(
        "target: {} ({version}) on {}",
        settings.expeditor.display(),
        match &cli.postgres {
            Some(_) => "PostgreSQL",
            None => "SQLite",
        }
    );
    if let Some(dir) = &cli.trace {
        std::fs::create_dir_all(dir)?;
    }
    let built = Instant::now();
    let corpus = Arc::new(Corpus::build(events)?);
    eprintln!(
        "built {} events (mean body {} bytes) in {:.1}s; {} connections, {}, up to {:?} per row",
        corpus.len(),
        corpus.mean_body_len(),
        built.elapsed().as_secs_f64(),
        settings.connections,
        pace,
        settings.duration,
    );

    // The first flat-out row of a run was usually the slower of the bare
    // baseline's two (4 of 5 tables in session 24, by up to a fifth), which
    // flattered the ratios to their mean: the machine warms up (the
    // generator's first touch of its corpus and connections, caches, the
    // CPU's clock) in whatever row comes first. A short unreported run of
    // the bare server takes that (it ran slower than the first row after
    // it in 2 of 3 tries).
    if pace == Pace::FlatOut && !cli.smoke {
        let warm = Settings {
            duration: std::time::Duration::from_secs(2),
            ..settings.clone()
        };
        let row = rows::baseline(RowKind::Baseline, &corpus, pace, Run::Max, &warm).await?;
        eprintln!(
            "warm-up (not in the table): {} req/s",
            report::thousands(row.load.rate())
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    // Loss or refusals in the sustained search's runs that are not in the table.
    let mut probe_problems: Vec<String> = Vec::new();
    for kind in RowKind::ALL.into_iter().filter(|k| cli.rows.contains(k)) {
        let row = match kind {
            RowKind::Baseline | RowKind::Durable => rows::baseline(kind, &corpus, pace, Run::Max, &settings).await?,
            _ => rows::expeditor(kind, &corpus, pace, Run::Max, &settings).await?,
        };
        progress(&row);
        let mut half = (half_rate && kind.is_expeditor()).then(|| row.max_rate() / 2.0);
        let search = (search_sustained && kind.sinks() > 0).then(|| (row.max_rate(), row.load.rate()));
        rows.push(row);
        if kind == RowKind::Ingest && pace == Pace::FlatOut && !cli.smoke && cli.rows.contains(&RowKind::Baseline) {
            let again = rows::baseline(RowKind::Baseline, &corpus, pace, Run::Again, &settings).await?;
            progress(&again);
            rows.push(again);
            if !cli.no_saturated {
                let saturating = Settings {
                    connections: settings.connections * rows::SATURATING,
                    ..settings.clone()
                };
                let run = Run::Saturated;
                let baseline = rows::baseline(RowKind::Baseline, &corpus, pace, run, &saturating).await?;
                progress(&baseline);
                rows.push(baseline);
                let ingest = rows::expeditor(RowKind::Ingest, &corpus, pace, run, &saturating).await?;
                progress(&ingest);
                // "Half of expeditor's own maximum rate": its maximum is the
                // higher of the two flat-out runs.
                half = half.map(|h| h.max(ingest.max_rate() / 2.0));
                rows.push(ingest);
            }
        }
        if let Some((delivered, acked)) = search {
            let (best, problems) = sustained(kind, &corpus, delivered, acked, &settings).await?;
            probe_problems.extend(problems);
            // "At half that rate": half of what delivery sustained, when a
            // rate kept up; the flat-out delivered rate counts the drain.
            if let Some(b) = best.as_ref().filter(|b| b.keeps_up()) {
                half = half.map(|_| offered(b.pace) / 2.0);
            }
            rows.extend(best);
        }
        if let Some(rate) = half {
            if rate < 1.0 {
                eprintln!("{}: no rate to halve; skipping its half-rate run", kind.name());
                continue;
            }
            let row = rows::expeditor(kind, &corpus, Pace::Rate(rate), Run::Half, &settings).await?;
            progress(&row);
            rows.push(row);
            // What the bench's own servers' latency is at the same rate: the
            // floors for the ingest latency target on this machine.
            for floor in [RowKind::Baseline, RowKind::Durable] {
                if kind == RowKind::Ingest && cli.rows.contains(&floor) {
                    let row = rows::baseline(floor, &corpus, Pace::Rate(rate), Run::Half, &settings).await?;
                    progress(&row);
                    rows.push(row);
                }
            }
        }
    }

    println!("{}", report::table(&rows));
    let targets = report::targets(&rows);
    if cli.smoke {
        println!("Smoke run: too short (and usually a debug build) to judge the targets; see BENCHMARKS.md.\n");
    } else if !targets.is_empty() {
        println!("{targets}");
    }
    let problems: Vec<&String> = rows.iter().flat_map(|r| &r.problems).chain(&probe_problems).collect();
    if problems.is_empty() {
        println!("Nothing lost: every acknowledged event is in the store and reached every sink it was routed to.");
        Ok(true)
    } else {
        println!("FAILED:");
        for p in problems {
            println!("- {p}");
        }
        Ok(false)
    }
}

/// Open-loop runs of a row with sinks in the sustained search.
const PROBES: usize = 4;

/// The highest open-loop rate at which delivery keeps up (`Row::keeps_up`).
/// The first run is at what the flat-out run delivered (`delivered`); that
/// figure includes draining the backlog after sending stopped, with the CPU
/// to delivery alone, so it is often more than delivery sustains while
/// ingest runs too (session 13: 0.55 – 0.99 of it). Until a run keeps up,
/// each next one is a quarter slower; after that, each halves the interval
/// between the fastest that kept up and the slowest that fell behind (at
/// most `acked`, what the flat-out run acknowledged: delivery cannot keep
/// up beyond what ingest takes). Returns the fastest run that kept up
/// (else the slowest tried) for the table, and the problems (loss,
/// refusals) of the runs left out of it.
async fn sustained(
    kind: RowKind,
    corpus: &Arc<Corpus>,
    delivered: f64,
    acked: f64,
    settings: &Settings,
) -> anyhow::Result<(Option<Row>, Vec<String>)> {
    if delivered < 1.0 {
        eprintln!(
            "{}: nothing delivered flat out; no sustained rate to search",
            kind.name()
        );
        return Ok((None, Vec::new()));
    }
    let mut kept: Option<Row> = None;
    let mut behind: Option<Row> = None;
    let mut problems = Vec::new();
    let (mut low, mut high) = (None::<f64>, acked.max(delivered));
    let mut rate = delivered;
    for _ in 0..PROBES {
        let row = rows::expeditor(kind, corpus, Pace::Rate(rate), Run::Sustained, settings).await?;
        progress(&row);
        let ok = row.keeps_up();
        eprintln!(
            "{}: delivery {} at {} events/s",
            row.label(),
            if ok { "kept up" } else { "fell behind" },
            report::thousands(rate)
        );
        let replaced = if ok {
            low = Some(rate);
            kept.replace(row)
        } else {
            high = high.min(rate);
            match &behind {
                Some(b) if offered(b.pace) <= rate => Some(row),
                _ => behind.replace(row),
            }
        };
        problems.extend(replaced.into_iter().flat_map(|r| r.problems));
        rate = match low {
            Some(low) => (low + high) / 2.0,
            None => rate * 0.75,
        };
    }
    let best = match kept {
        Some(k) => {
            problems.extend(behind.into_iter().flat_map(|r| r.problems));
            k
        }
        None => match behind {
            Some(b) => b,
            None => return Ok((None, problems)),
        },
    };
    Ok((Some(best), problems))
}

fn offered(pace: Pace) -> f64 {
    match pace {
        Pace::Rate(rate) => rate,
        Pace::FlatOut => f64::INFINITY,
    }
}

/// Seconds from a histogram as milliseconds, or past its last bucket.
fn bound(seconds: f64, how: &str) -> String {
    if seconds.is_finite() {
        format!("{how} {:.1} ms", seconds * 1000.0)
    } else {
        "over the histogram's last bound".to_owned()
    }
}

fn progress(row: &Row) {
    let mut line = format!(
        "{}: {} answered in {:.1}s ({} req/s, p99 ack {:.2} ms)",
        row.label(),
        row.load.answered,
        row.load.elapsed().as_secs_f64(),
        report::thousands(row.load.rate()),
        row.load.ack_us.value_at_quantile(0.99) as f64 / 1000.0,
    );
    if let Pace::Rate(_) = row.pace {
        line.push_str(&format!(
            ", sent late p99 {:.2} ms",
            row.load.late_us.value_at_quantile(0.99) as f64 / 1000.0
        ));
    }
    line.push_str(&format!("; {}", report::stalls(&row.stalls)));
    if !row.server.threads.is_empty() {
        let threads: Vec<String> = row
            .server
            .threads
            .iter()
            .map(|(name, c)| format!("{name} {:.0}%", c * 100.0))
            .collect();
        line.push_str(&format!("; expeditor threads (% of a core): {}", threads.join(", ")));
    }
    let scraped = row.server.scraped.as_ref();
    if let Some((acks, p99)) = scraped
        .and_then(|(s, _)| s.acks.as_ref())
        .and_then(|a| Some((a, a.quantile(0.99)?)))
    {
        line.push_str(&format!(
            "; expeditor's own ack p99 {} ({} acks in its histogram)",
            bound(p99, "≈"),
            report::thousands(acks.count),
        ));
    }
    if let Some((syncs, wall)) = scraped.and_then(|(s, wall)| Some((s.syncs.as_ref()?, wall)))
        && let Some(slowest) = syncs.syncs.slowest()
    {
        let fsyncs = &syncs.syncs;
        line.push_str(&format!(
            "; store: {} fsyncs/s of {:.1} writes each, {:.2} ms on average, the slowest {}",
            report::thousands(fsyncs.count / wall.as_secs_f64()),
            syncs.operations / fsyncs.count,
            fsyncs.sum / fsyncs.count * 1000.0,
            bound(slowest, "≤"),
        ));
        for (what, c) in [
            ("passive checkpoints", &syncs.passive),
            ("WAL restarts", &syncs.restarts),
        ] {
            if let Some(slowest) = c.slowest() {
                line.push_str(&format!(", {} {what} (slowest {})", c.count, bound(slowest, "≤")));
            }
        }
    }
    if let Some(bytes) = row.server.written
        && row.load.answered > 0
    {
        line.push_str(&format!(
            "; {:.1} KB written to disk per request",
            bytes as f64 / row.load.answered as f64 / 1000.0
        ));
    }
    if let Some(d) = &row.delivered {
        line.push_str(&format!(
            "; {} delivered ({} events/s, p99 e2e {:.1} ms, {} received twice)",
            d.events,
            report::thousands(d.rate),
            d.e2e_us.value_at_quantile(0.99) as f64 / 1000.0,
            d.duplicates,
        ));
    }
    eprintln!("{line}");
}
