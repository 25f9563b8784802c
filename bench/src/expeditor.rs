//! expeditor under test: the real binary (`expeditor run`) with a generated
//! config in a temp dir, its start-to-ready time and memory, a clean stop
//! with SIGTERM, and what its store holds afterwards.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load::{CRAVE_SECRET, CRUMB_SECRET};
use crate::preload;
use crate::proc::{self, ProcStats};

/// Which store expeditor runs on.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// The embedded SQLite file, in the row's temp dir.
    Sqlite,
    /// A fresh database per row on this PostgreSQL server (the URL names any
    /// database the bench may connect to, to create and drop its own).
    Postgres { server: String },
}

/// The row's own PostgreSQL database, dropped when the row is done.
struct PgDatabase {
    server: String,
    name: String,
    url: String,
}

impl PgDatabase {
    async fn create(server: &str) -> anyhow::Result<Self> {
        let name = format!(
            "expeditor_bench_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let url = with_database(server, &name)?;
        connect(server)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("cannot create the database {name}"))?;
        Ok(Self {
            server: server.to_string(),
            name,
            url,
        })
    }

    async fn drop_database(&self) {
        let dropped = async {
            connect(&self.server)
                .await?
                .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .await?;
            Ok::<_, anyhow::Error>(())
        };
        if let Err(e) = dropped.await {
            eprintln!("could not drop the bench database {}: {e:#}", self.name);
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// `url` with its database (the path) replaced by `db`.
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!("--postgres must be a postgres:// URL");
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or_default();
    Ok(match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    })
}

const READY_LIMIT: Duration = Duration::from_secs(30);
/// SIGTERM drains in-flight work; this is far more than it should need.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// Where routing sends the events.
#[derive(Debug, Clone, Copy)]
pub enum Routing {
    /// A route that matches no event type: routing runs, nothing is
    /// delivered. With `when`, also a route for every order event whose
    /// `when` (on the order view) holds for none: a condition evaluated for
    /// each order, as a user's router has.
    Nowhere { when: bool },
    /// Every event to `sinks` `http` sinks at the sink server (`/s1`..),
    /// each with `concurrency` attempts in flight (expeditor's default if
    /// `None`).
    Sinks {
        addr: SocketAddr,
        sinks: usize,
        concurrency: Option<usize>,
        body: SinkBody,
        /// The route to the sinks has a `when` on the order view (that
        /// holds for every order of the corpus).
        when: bool,
    },
}

/// What each http sink's `[sinks.X.body]` template reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkBody {
    /// `{ id = "{{ event.id }}" }`: the event's envelope only.
    Id,
    /// The KDS ticket of `config.toml`'s example (the order view: id,
    /// location, channel, priority, items; the event's time), as a user's
    /// kitchen display gets it, and the event's id (the sink server's key).
    Kds,
}

impl SinkBody {
    fn toml(self) -> &'static str {
        match self {
            SinkBody::Id => "id = \"{{ event.id }}\"\n",
            SinkBody::Kds => concat!(
                "id = \"{{ event.id }}\"\n",
                "order_id = \"{{ order.id }}\"\n",
                "location_id = \"{{ order.location_id }}\"\n",
                "channel = \"{{ order.channel }}\"\n",
                "priority = \"{{ 'high' if order.channel == 'delivery' else 'normal' }}\"\n",
                "items = \"{{ order.items }}\"\n",
                "placed_at = \"{{ event.occurred_at }}\"\n",
            ),
        }
    }
}

pub struct Daemon {
    /// `None` once stopped; dropping a running daemon kills it.
    child: Option<Child>,
    dir: Option<TempDir>,
    database: Option<PgDatabase>,
    pub ingest: SocketAddr,
    admin: SocketAddr,
    /// Spawn until `GET /healthz` answered 200.
    pub ready: Duration,
    /// Resident memory just after ready.
    pub idle: ProcStats,
}

/// A histogram from `/metrics` (Prometheus text exposition), summed over its
/// label sets: the bench reads expeditor's own view of a row's work.
#[derive(Debug, Clone, Default)]
pub struct Scraped {
    pub count: f64,
    pub sum: f64,
    /// Upper bound (s) and how many observations were at most that.
    buckets: Vec<(f64, f64)>,
}

impl Scraped {
    /// The histogram `name`; `None` if the exposition has no `name_count`.
    fn parse(metrics: &str, name: &str) -> Option<Self> {
        Self::parse_where(metrics, name, "")
    }

    /// The same, only its series whose labels include `label` (`mode="restart"`).
    fn parse_where(metrics: &str, name: &str, label: &str) -> Option<Self> {
        // `name_suffix 3` or `name_suffix{labels} 3`: the labels and the value.
        let series = |suffix: &str| {
            let prefix = format!("{name}{suffix}");
            metrics
                .lines()
                .filter_map(move |l| {
                    let rest = l.strip_prefix(prefix.as_str())?;
                    let (labels, value) = match rest.strip_prefix('{') {
                        Some(r) => r.split_once("} ")?,
                        None => ("", rest.strip_prefix(' ')?),
                    };
                    Some((labels.to_owned(), value.trim().parse::<f64>().ok()?))
                })
                .filter(|(labels, _)| label.is_empty() || labels.split(',').any(|l| l == label))
                .collect::<Vec<_>>()
        };
        let counts = series("_count");
        if counts.is_empty() {
            return None;
        }
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for (labels, n) in series("_bucket") {
            let Some(le) = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\"")?.strip_suffix('"')?.parse::<f64>().ok())
            else {
                continue;
            };
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, total)) => *total += n,
                None => buckets.push((le, n)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Self {
            count: counts.iter().map(|(_, n)| n).sum(),
            sum: series("_sum").iter().map(|(_, n)| n).sum(),
            buckets,
        })
    }

    /// What was observed between `before` and this.
    pub fn since(&self, before: &Self) -> Self {
        let earlier = |le: f64| before.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, n)| *n);
        Self {
            count: self.count - before.count,
            sum: self.sum - before.sum,
            buckets: self.buckets.iter().map(|&(le, n)| (le, n - earlier(le))).collect(),
        }
    }

    /// The histogram's bound on the largest observation, in seconds
    /// (infinite if past the last bucket); `None` without observations.
    pub fn slowest(&self) -> Option<f64> {
        // The last observation's rank lands at its bucket's upper bound.
        self.quantile(1.0)
    }

    /// The `q` quantile, in seconds, interpolated linearly inside its bucket
    /// as Prometheus's `histogram_quantile` does (so only as fine as the
    /// buckets); infinite if past the last bucket, `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, n) in &self.buckets {
            if n >= rank {
                if le.is_infinite() {
                    return Some(f64::INFINITY);
                }
                let within = n - below;
                let share = if within > 0.0 { (rank - below) / within } else { 1.0 };
                return Some(lower + (le - lower) * share);
            }
            (lower, below) = (le, n);
        }
        Some(f64::INFINITY)
    }
}

/// The store's fsyncs (`expeditor_store_sync_duration_seconds`), the
/// writes they made durable (`expeditor_store_synced_operations_total`) and
/// its checkpoints (`expeditor_store_checkpoint_duration_seconds`, passive
/// and restarts; none until the first).
#[derive(Debug, Clone, Default)]
pub struct StoreSyncs {
    pub syncs: Scraped,
    pub operations: f64,
    pub passive: Scraped,
    pub restarts: Scraped,
}

impl StoreSyncs {
    /// `None` if a series is missing (PostgreSQL exports neither).
    fn parse(metrics: &str) -> Option<Self> {
        let operations = metrics.lines().find_map(|l| {
            l.strip_prefix("expeditor_store_synced_operations_total ")?
                .trim()
                .parse::<f64>()
                .ok()
        })?;
        let checkpoints = |mode: &str| {
            let label = format!("mode=\"{mode}\"");
            Scraped::parse_where(metrics, "expeditor_store_checkpoint_duration_seconds", &label).unwrap_or_default()
        };
        Some(Self {
            syncs: Scraped::parse(metrics, "expeditor_store_sync_duration_seconds")?,
            operations,
            passive: checkpoints("passive"),
            restarts: checkpoints("restart"),
        })
    }

    pub fn since(&self, before: &Self) -> Self {
        Self {
            syncs: self.syncs.since(&before.syncs),
            operations: self.operations - before.operations,
            passive: self.passive.since(&before.passive),
            restarts: self.restarts.since(&before.restarts),
        }
    }
}

/// What expeditor's `/metrics` says about a row: its store's fsyncs and its
/// own ack latency (`expeditor_ack_duration_seconds`: from the handler's
/// start to the answer, without the time a request waited in the socket or
/// for a worker, which the generator's figure includes).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub syncs: Option<StoreSyncs>,
    pub acks: Option<Scraped>,
}

impl Scrape {
    fn parse(metrics: &str) -> Self {
        Self {
            syncs: StoreSyncs::parse(metrics),
            acks: Scraped::parse(metrics, "expeditor_ack_duration_seconds"),
        }
    }

    /// What happened between `before` and this. The store's series must be
    /// in both. The ack histogram has no series at all until the first ack
    /// (its label is the source), so one missing before counts from zero.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            syncs: self.syncs.as_ref().zip(before.syncs.as_ref()).map(|(a, b)| a.since(b)),
            acks: self
                .acks
                .as_ref()
                .map(|a| a.since(before.acks.as_ref().unwrap_or(&Scraped::default()))),
        }
    }
}

/// How a run ended.
pub struct Stopped {
    /// Exited 0 after SIGTERM, within the limit.
    pub clean: bool,
    pub how: String,
    pub dir: TempDir,
    database: Option<PgDatabase>,
}

impl Daemon {
    /// Runs `bin` with its config and store in a new temp dir under `parent`
    /// (the system's temp dir if `None`): the disk the store fsyncs to.
    pub async fn start(
        bin: &Path,
        parent: Option<&Path>,
        store: &StoreKind,
        routing: Routing,
        preload: Option<(usize, &[u8])>,
    ) -> anyhow::Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("expeditor-bench-");
        let dir = match parent {
            Some(p) => builder.tempdir_in(p),
            None => builder.tempdir(),
        }
        .context("cannot create a temp dir for expeditor")?;
        let ingest = free_addr()?;
        let admin = free_addr()?;
        let database = match store {
            StoreKind::Sqlite => None,
            StoreKind::Postgres { server } => Some(PgDatabase::create(server).await?),
        };
        let store_line = match &database {
            None => format!("path = \"{}\"", dir.path().join("data").display()),
            Some(db) => format!("url = \"{}\"", db.url),
        };
        let config = config(ingest, admin, &store_line, routing);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        if let Some((n, body)) = preload {
            // expeditor creates its schema; then the bench fills it.
            let (mut child, _) = spawn_ready(bin, &config_path, dir.path(), admin).await?;
            proc::terminate(&child)?;
            match proc::wait_for(&mut child, STOP_LIMIT).await? {
                Some(status) if status.success() => {}
                other => bail!("expeditor did not stop cleanly before the preload: {other:?}"),
            }
            let sinks = routing.sink_names();
            let took = match &database {
                None => preload::sqlite(&dir.path().join("data").join("expeditor.db"), n, body, &sinks)?,
                Some(db) => preload::postgres(&connect(&db.url).await?, n, body, &sinks).await?,
            };
            eprintln!("preloaded {n} events in {:.1}s", took.as_secs_f64());
            // A start writes the dedupe keys of events it finds without them
            // (SQLite) as a run; a store that ran for a week has its runs, so
            // that start is not the one measured.
            if database.is_none() {
                let (mut child, ready) = spawn_ready(bin, &config_path, dir.path(), admin).await?;
                proc::terminate(&child)?;
                match proc::wait_for(&mut child, STOP_LIMIT).await? {
                    Some(status) if status.success() => {}
                    other => bail!("expeditor did not stop cleanly after the preload: {other:?}"),
                }
                eprintln!("wrote their dedupe keys in {:.1}s", ready.as_secs_f64());
            }
        }
        let (child, ready) = spawn_ready(bin, &config_path, dir.path(), admin).await?;
        let idle = ProcStats::read(child.id()).context("cannot read expeditor's /proc status")?;
        Ok(Self {
            child: Some(child),
            dir: Some(dir),
            database,
            ingest,
            admin,
            ready,
            idle,
        })
    }

    /// `/metrics` so far; empty if the scrape fails.
    pub async fn scrape(&self) -> Scrape {
        get(self.admin, "/metrics", Duration::from_secs(5))
            .await
            .map_or_else(Scrape::default, |text| Scrape::parse(&text))
    }

    pub fn stats(&self) -> Option<ProcStats> {
        ProcStats::read(self.child.as_ref()?.id())
    }

    /// Bytes written to storage so far.
    pub fn written(&self) -> Option<u64> {
        proc::written(self.child.as_ref()?.id())
    }

    /// CPU time so far by thread name.
    pub fn threads(&self) -> std::collections::BTreeMap<String, Duration> {
        self.child.as_ref().map(|c| proc::threads(c.id())).unwrap_or_default()
    }

    /// SIGTERM, and waits for the exit.
    pub async fn stop(mut self) -> anyhow::Result<Stopped> {
        let mut child = self.child.take().expect("running until stopped");
        let dir = self.dir.take().expect("kept until stopped");
        let database = self.database.take();
        if let Err(e) = proc::terminate(&child) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow::Error::from(e).context("cannot send SIGTERM to expeditor"));
        }
        let (clean, how) = match proc::wait_for(&mut child, STOP_LIMIT).await {
            Ok(Some(status)) => (status.success(), status.to_string()),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                (false, format!("still running {STOP_LIMIT:?} after SIGTERM; killed"))
            }
        };
        Ok(Stopped {
            clean,
            how,
            dir,
            database,
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Stopped {
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// The warnings and errors expeditor logged (slow commits, failures).
    pub fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("expeditor.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_string)
            .collect()
    }

    /// What the store holds, read after the stop (and the row's PostgreSQL
    /// database dropped).
    pub async fn store(&self) -> anyhow::Result<StoreContents> {
        match &self.database {
            None => StoreContents::read(&self.dir.path().join("data").join("expeditor.db")),
            Some(db) => {
                let contents = StoreContents::read_postgres(&db.url).await;
                db.drop_database().await;
                contents
            }
        }
    }
}

/// The store's events, and how many deliveries are dead letters.
pub struct StoreContents {
    /// `source:event_id`.
    pub events: HashSet<String>,
    pub dead: u64,
}

impl StoreContents {
    fn read(db: &PathBuf) -> anyhow::Result<Self> {
        use rusqlite::{Connection, OpenFlags};
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {}", db.display()))?;
        let mut events = HashSet::new();
        let mut stmt = conn.prepare("SELECT source, event_id FROM events")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let source: String = row.get(0)?;
            let id: String = row.get(1)?;
            events.insert(format!("{source}:{id}"));
        }
        // state: 0 pending, 1 delivered, 2 dead.
        let dead: i64 = conn.query_row("SELECT COUNT(*) FROM deliveries WHERE state = 2", [], |r| r.get(0))?;
        Ok(Self {
            events,
            dead: dead as u64,
        })
    }

    async fn read_postgres(url: &str) -> anyhow::Result<Self> {
        let client = connect(url).await?;
        let events = client
            .query("SELECT source, event_id FROM events", &[])
            .await?
            .iter()
            .map(|r| format!("{}:{}", r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        let dead: i64 = client
            .query_one("SELECT COUNT(*) FROM deliveries WHERE state = 2", &[])
            .await?
            .get(0);
        Ok(Self {
            events,
            dead: dead as u64,
        })
    }
}

impl Routing {
    /// The sinks of the generated config.
    fn sink_names(&self) -> Vec<String> {
        match self {
            Routing::Nowhere { .. } => vec!["unused".to_string()],
            Routing::Sinks { sinks, .. } => (1..=*sinks).map(|k| format!("s{k}")).collect(),
        }
    }
}

fn config(ingest: SocketAddr, admin: SocketAddr, store_line: &str, routing: Routing) -> String {
    let mut c = format!(
        r#"# Generated by expeditor-bench.
[server]
listen = "{ingest}"

[admin]
listen = "{admin}"

[store]
{store_line}

[sources.crumb]
kind = "crumbpos"
secrets = ["{CRUMB_SECRET}"]

[sources.crave]
kind = "crave"
secrets = ["{CRAVE_SECRET}"]
"#
    );
    match routing {
        Routing::Nowhere { when } => {
            c.push_str(
                r#"
# Never called: the only route matches no event type.
[sinks.unused]
type = "http"
url = "http://127.0.0.1:9/unused"

[[routes]]
name = "nowhere"
events = ["never.happens"]
sinks = ["unused"]
"#,
            );
            if when {
                c.push_str(
                    r#"
[[routes]]
name = "huge orders"
events = ["order.*"]
when = "order.total_cents > 100000000"
sinks = ["unused"]
"#,
                );
            }
        }
        Routing::Sinks {
            addr,
            sinks,
            concurrency,
            body,
            when,
        } => {
            let names: Vec<String> = (1..=sinks).map(|k| format!("s{k}")).collect();
            let concurrency = concurrency.map(|n| format!("concurrency = {n}\n")).unwrap_or_default();
            for name in &names {
                c.push_str(&format!(
                    r#"
[sinks.{name}]
type = "http"
url = "http://{addr}/{name}"
{concurrency}
[sinks.{name}.body]
{}"#,
                    body.toml()
                ));
            }
            let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            c.push_str(&format!(
                r#"
[[routes]]
name = "orders"
events = ["order.*"]
{}sinks = [{}]
"#,
                match when {
                    true => "when = \"order.id != ''\"\n",
                    false => "",
                },
                list.join(", ")
            ));
        }
    }
    c
}

/// Runs `bin` until `GET /healthz` answers 200; the time that took.
async fn spawn_ready(bin: &Path, config: &Path, dir: &Path, admin: SocketAddr) -> anyhow::Result<(Child, Duration)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("expeditor.log"))?;
    let started = Instant::now();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("run")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    loop {
        if healthz(admin).await {
            return Ok((child, started.elapsed()));
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "expeditor exited before it was ready ({status}); its log:\n{}",
                log_tail(dir)
            );
        }
        if started.elapsed() > READY_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "expeditor was not ready after {READY_LIMIT:?}; its log:\n{}",
                log_tail(dir)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A free 127.0.0.1 port for expeditor to bind: bound to learn it, then
/// released. Taken below the kernel's ephemeral range when there is room,
/// since a port from `bind(0)` can be handed at once to one of the
/// generator's outgoing connections before expeditor binds it.
fn free_addr() -> anyhow::Result<SocketAddr> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if let Some(span) = ephemeral_low.checked_sub(LOWEST).filter(|&s| s > 1_000) {
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = LOWEST + (start + n) % span;
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
                return Ok(listener.local_addr()?);
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// One `GET` on a fresh connection within `limit`: the body of a 200,
/// else `None`.
async fn get(admin: SocketAddr, path: &str, limit: Duration) -> Option<String> {
    let attempt = async {
        let mut stream = TcpStream::connect(admin).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(limit, attempt).await.ok()?.ok()?;
    let text = String::from_utf8(response).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    // Chunked or not, the sample lines are what is looked for.
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// One `GET /healthz` on a fresh connection; true on 200.
async fn healthz(admin: SocketAddr) -> bool {
    get(admin, "/healthz", Duration::from_secs(1)).await.is_some()
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("expeditor.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::{Scrape, Scraped, StoreSyncs};

    #[test]
    fn store_syncs_are_read_from_the_exposition() {
        let exposition = |count: u64, slow: u64| {
            format!(
                "# TYPE expeditor_store_sync_duration_seconds histogram\n\
                 expeditor_store_sync_duration_seconds_sum 0.5\n\
                 expeditor_store_sync_duration_seconds_count {count}\n\
                 expeditor_store_sync_duration_seconds_bucket{{le=\"0.0004\"}} {}\n\
                 expeditor_store_sync_duration_seconds_bucket{{le=\"0.0512\"}} {count}\n\
                 expeditor_store_sync_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
                 # TYPE expeditor_store_synced_operations counter\n\
                 expeditor_store_synced_operations_total {}\n",
                count - slow,
                count * 30
            )
        };
        let before = StoreSyncs::parse(&exposition(400, 0)).unwrap();
        assert_eq!((before.syncs.count, before.operations), (400.0, 12000.0));
        assert_eq!(before.syncs.slowest(), Some(0.0004));
        // 600 more, one of them slower than 0.4 ms.
        let d = StoreSyncs::parse(&exposition(1000, 1)).unwrap().since(&before);
        assert_eq!((d.syncs.count, d.operations), (600.0, 18000.0));
        assert_eq!(d.syncs.slowest(), Some(0.0512));
        assert_eq!(Scraped::default().slowest(), None);
        // No checkpoint yet: none counted, and none since.
        assert_eq!((d.passive.count, d.restarts.count), (0.0, 0.0));
        assert_eq!(d.restarts.slowest(), None);
        // PostgreSQL exports none of them.
        assert!(StoreSyncs::parse("expeditor_dead_letters{sink=\"a\"} 0\n").is_none());
    }

    /// Two sources' ack histograms, as expeditor renders them: `n1` and `n2`
    /// acks within 1 ms, `slow` more within 4 ms (all from the second source).
    fn acks(n1: u64, n2: u64, slow: u64) -> String {
        let mut text = String::from("# TYPE expeditor_ack_duration_seconds histogram\n");
        for (source, fast, slow) in [("crumb", n1, 0), ("crave", n2, slow)] {
            let all = fast + slow;
            text.push_str(&format!(
                "expeditor_ack_duration_seconds_sum{{source=\"{source}\"}} 0.25\n\
                 expeditor_ack_duration_seconds_count{{source=\"{source}\"}} {all}\n\
                 expeditor_ack_duration_seconds_bucket{{le=\"0.001\",source=\"{source}\"}} {fast}\n\
                 expeditor_ack_duration_seconds_bucket{{source=\"{source}\",le=\"0.004\"}} {all}\n\
                 expeditor_ack_duration_seconds_bucket{{le=\"+Inf\",source=\"{source}\"}} {all}\n"
            ));
        }
        text
    }

    #[test]
    fn ack_latency_is_summed_over_sources_and_interpolated() {
        let before = Scrape::parse(&acks(10, 10, 0));
        let a = before.acks.as_ref().unwrap();
        assert_eq!((a.count, a.sum), (20.0, 0.5));
        assert!(before.syncs.is_none(), "no store series in this exposition");
        // Then 590 + 390 more within 1 ms and 20 within 4 ms: of the 1,000
        // acks since, the 980th is the last within 1 ms, so p98 is that
        // bucket's bound, p99 (rank 990) half-way through the next bucket's
        // 20, and p49 (rank 490) half-way through the first.
        let d = Scrape::parse(&acks(600, 400, 20)).since(&before);
        let d = d.acks.unwrap();
        assert_eq!(d.count, 1000.0);
        let close = |q: f64, expected: f64| {
            let got = d.quantile(q).unwrap();
            assert!((got - expected).abs() < 1e-12, "p{q}: {got}, not {expected}");
        };
        close(0.98, 0.001);
        close(0.99, 0.0025);
        close(0.49, 0.0005);
        assert_eq!(d.slowest(), Some(0.004));
        assert_eq!(Scraped::default().quantile(0.99), None);
        // Before the first ack the family has no series: all are counted.
        let first = Scrape::parse(&acks(600, 400, 20)).since(&Scrape::parse(""));
        assert_eq!(first.acks.map(|a| a.count), Some(1020.0));
    }

    #[test]
    fn checkpoints_are_told_apart_by_mode() {
        let exposition = |passive: u64, restarts: u64| {
            let mut text = String::from(
                "expeditor_store_sync_duration_seconds_sum 0.5\n\
                 expeditor_store_sync_duration_seconds_count 100\n\
                 expeditor_store_sync_duration_seconds_bucket{le=\"+Inf\"} 100\n\
                 expeditor_store_synced_operations_total 3000\n",
            );
            for (mode, n, slow) in [("passive", passive, 0.0032), ("restart", restarts, 0.0128)] {
                text.push_str(&format!(
                    "expeditor_store_checkpoint_duration_seconds_sum{{mode=\"{mode}\"}} 0.1\n\
                     expeditor_store_checkpoint_duration_seconds_count{{mode=\"{mode}\"}} {n}\n\
                     expeditor_store_checkpoint_duration_seconds_bucket{{le=\"0.0016\",mode=\"{mode}\"}} 0\n\
                     expeditor_store_checkpoint_duration_seconds_bucket{{le=\"{slow}\",mode=\"{mode}\"}} {n}\n\
                     expeditor_store_checkpoint_duration_seconds_bucket{{le=\"+Inf\",mode=\"{mode}\"}} {n}\n"
                ));
            }
            text
        };
        let before = StoreSyncs::parse(&exposition(10, 1)).unwrap();
        let d = StoreSyncs::parse(&exposition(110, 3)).unwrap().since(&before);
        assert_eq!((d.passive.count, d.restarts.count), (100.0, 2.0));
        assert_eq!(d.passive.slowest(), Some(0.0032));
        assert_eq!(d.restarts.slowest(), Some(0.0128));
    }

    #[test]
    fn a_quantile_past_the_last_bucket_is_unbounded() {
        let text = "expeditor_ack_duration_seconds_count{source=\"a\"} 10\n\
                    expeditor_ack_duration_seconds_bucket{source=\"a\",le=\"0.001\"} 5\n\
                    expeditor_ack_duration_seconds_bucket{source=\"a\",le=\"+Inf\"} 10\n";
        let acks = Scraped::parse(text, "expeditor_ack_duration_seconds").unwrap();
        assert_eq!(acks.quantile(0.99), Some(f64::INFINITY));
        assert_eq!(acks.quantile(0.5), Some(0.001));
        // A name that is only a prefix of another series is not that series.
        assert!(Scraped::parse(text, "expeditor_ack_duration").is_none());
    }
}
