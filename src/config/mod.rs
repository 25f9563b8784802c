//! Loading and validating `config.toml`.
//!
//! Validation is pure and complete before anything starts: [`load`] returns
//! either a [`Config`] that the daemon builds from without re-checking, or
//! every problem found, each naming the file, line, column and key. `${VAR}`
//! is resolved from the environment; an unset variable is an error, never "".

/// `Cx::sink_common` on the keys every raw sink type has.
macro_rules! sink_common {
    ($loader:expr, $key:expr, $raw:expr) => {
        $loader.sink_common(
            $key,
            $raw.concurrency.as_ref(),
            $raw.rate_limit.as_ref(),
            $raw.timeout.as_ref(),
            $raw.retry.as_ref(),
        )
    };
}

mod bigquery;
mod email;
mod raw;
mod slack;
mod wasm;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use expeditor_api::{Escape, RetryPolicy, TemplateSet};
use expeditor_file::FileSinkConfig;
use expeditor_http::HttpSinkConfig;
use serde::Deserialize;
use serde::de::IntoDeserializer;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::normalize::{FieldPath, Normalizer};
use crate::route::{Glob, Route, Router};
use crate::verify::{CraveVerifier, CrumbPosVerifier, Encoding, HmacVerifier, Secret, SignedPayload, Verify};
use raw::*;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column, when the problem has a place in the file.
    pub position: Option<(usize, usize)>,
    /// Dotted key path (`sinks.kds.url`), empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with a config file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub sources: BTreeMap<String, Arc<Source>>,
    pub sinks: BTreeMap<String, SinkSpec>,
    pub router: Router,
    /// `[[tests]]`, run by `expeditor test`.
    pub tests: Vec<TestCase>,
}

/// One of the config's own test cases: an event, and exactly the sinks its
/// routes must choose for it.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub source: String,
    pub event: TestEvent,
    pub sinks: BTreeSet<String>,
}

/// Where a test case's event comes from.
#[derive(Debug, Clone)]
pub enum TestEvent {
    /// A sample of this type for the source's vendor (`expeditor send`'s).
    Sample(String),
    /// The vendor's JSON body, read from this file.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// How long SIGTERM waits for requests and attempts in flight.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub dedupe_window: Duration,
    pub keep_delivered: Duration,
    pub keep_dead_letters: Duration,
}

/// Where events and deliveries are kept (`store.path` or `store.url`).
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// Embedded SQLite: the database is `<path>/expeditor.db`.
    Sqlite { path: PathBuf },
    /// Shared PostgreSQL. The URL may hold a password, so it is a [`Secret`]:
    /// `Debug` hides it, and [`fmt::Display`] shows only `host:port/db`.
    Postgres { url: Secret },
}

impl PartialEq for StoreBackend {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StoreBackend::Sqlite { path: a }, StoreBackend::Sqlite { path: b }) => a == b,
            (StoreBackend::Postgres { url: a }, StoreBackend::Postgres { url: b }) => a.expose() == b.expose(),
            _ => false,
        }
    }
}

impl fmt::Display for StoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreBackend::Sqlite { path } => write!(f, "{}", path.display()),
            StoreBackend::Postgres { url } => {
                let url = std::str::from_utf8(url.expose()).unwrap_or_default();
                match crate::store::postgres::parse_url(url) {
                    Ok(config) => write!(f, "postgres://{}", crate::store::postgres::target(&config)),
                    Err(_) => f.write_str("postgres://(invalid URL)"),
                }
            }
        }
    }
}

/// A configured webhook source (`[sources.NAME]`, served at `/webhooks/NAME`).
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub scheme: Scheme,
    pub normalizer: Normalizer,
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self.scheme {
            Scheme::CrumbPos(_) => "crumbpos",
            Scheme::Crave(_) => "crave",
            Scheme::Hmac(_) => "hmac",
        }
    }

    pub fn verifier(&self) -> &dyn Verify {
        match &self.scheme {
            Scheme::CrumbPos(v) => v,
            Scheme::Crave(v) => v,
            Scheme::Hmac(v) => v,
        }
    }
}

/// The signature scheme of a source, with its secrets.
#[derive(Debug)]
pub enum Scheme {
    CrumbPos(CrumbPosVerifier),
    Crave(CraveVerifier),
    Hmac(HmacVerifier),
}

/// What every sink has, whatever its type.
#[derive(Debug, Clone, Copy)]
pub struct SinkCommon {
    pub concurrency: Concurrency,
    /// The most attempts that may start in a period (`rate_limit`).
    pub rate_limit: Option<RateLimit>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// How many attempts of a sink may be in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// `concurrency = N`: never more than N.
    Fixed(usize),
    /// `"adaptive"`, the default: starts at [`Concurrency::ADAPTIVE_START`]
    /// and rises while the sink answers as fast as before, falls when it
    /// slows down or pushes back (429, 5xx, timeouts), never past
    /// [`Concurrency::ADAPTIVE_MAX`] (`deliver::flow`).
    Adaptive,
}

impl Concurrency {
    /// Where an adaptive limit starts: the fixed default of earlier versions.
    pub const ADAPTIVE_START: usize = 8;
    /// The most an adaptive limit reaches.
    pub const ADAPTIVE_MAX: usize = 32;

    /// The most attempts that may ever be in flight at once.
    pub fn most(self) -> usize {
        match self {
            Concurrency::Fixed(n) => n,
            Concurrency::Adaptive => Concurrency::ADAPTIVE_MAX,
        }
    }
}

/// `rate_limit = "50/s"`: at most `count` attempts start in any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    /// Attempts start at least this far apart, which keeps every window
    /// of `per` (not only whole periods from some start) within `count`.
    pub fn spacing(self) -> Duration {
        // Rounded up: `"3/s"` must not fit a fourth start into a second.
        let nanos = self.per.as_nanos().div_ceil(u128::from(self.count));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

#[derive(Debug)]
pub struct SinkSpec {
    pub name: String,
    pub common: SinkCommon,
    pub kind: SinkKind,
}

pub enum SinkKind {
    Http(HttpSinkConfig),
    File(FileSinkConfig),
    Slack(expeditor_slack::SlackSinkConfig),
    Email(expeditor_email::EmailSinkConfig),
    BigQuery(expeditor_bigquery::BigQuerySinkConfig),
    /// Loaded and checked at config load (`init` included); building the sink
    /// only makes instances of it.
    Wasm(Arc<expeditor_wasm::Plugin>),
}

impl fmt::Debug for SinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The http config holds resolved headers (tokens): say only the type.
        f.write_str(match self {
            SinkKind::Http(_) => "Http",
            SinkKind::File(_) => "File",
            SinkKind::Slack(_) => "Slack",
            SinkKind::Email(_) => "Email",
            SinkKind::BigQuery(_) => "BigQuery",
            SinkKind::Wasm(_) => "Wasm",
        })
    }
}

impl SinkKind {
    /// The sink's compiled templates (a wasm sink has none).
    pub fn templates(&self) -> Option<&Arc<expeditor_api::Templates>> {
        match self {
            SinkKind::Http(c) => Some(&c.templates),
            SinkKind::File(c) => Some(&c.templates),
            SinkKind::Slack(c) => Some(&c.templates),
            SinkKind::Email(c) => Some(&c.templates),
            SinkKind::BigQuery(c) => Some(&c.templates),
            SinkKind::Wasm(_) => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::Http(_) => "http",
            SinkKind::File(_) => "file",
            SinkKind::Slack(_) => "slack",
            SinkKind::Email(_) => "email",
            SinkKind::BigQuery(_) => "bigquery",
            SinkKind::Wasm(_) => "wasm",
        }
    }
}

/// The longest `batch.linger`: deliveries wait in a claimed lease while a
/// batch fills, so it stays short.
const MAX_LINGER: Duration = Duration::from_secs(10);
/// The largest `server.max_body`: webhooks are kilobytes, and each body in
/// flight is held whole.
const MAX_BODY_LIMIT: usize = 64 << 20;
/// The longest a sink's `timeout` may be.
const MAX_SINK_TIMEOUT: Duration = Duration::from_secs(3600);
const SINK_TYPES: &str = "http, file, wasm, slack, email, bigquery";
const SOURCE_KINDS: &str = "crumbpos, crave, hmac";

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read(path)?;
    parse(path, &text, &|name| std::env::var(name).ok())
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            position: None,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])
    })
}

/// Reads only `[admin]` of a config file: what the CLI's admin commands
/// (`events`, `deliveries`, `dead-letters`, `replay`) need to reach a running
/// daemon. The rest is not judged and its `${VAR}`s are not read, so an
/// operator's shell needs no webhook or sink secret (under systemd those
/// live in the service's environment file), and no plugin is loaded.
pub fn load_admin(path: &Path) -> Result<AdminConfig, ConfigErrors> {
    let text = read(path)?;
    parse_admin(path, &text, &|name| std::env::var(name).ok())
}

/// [`load_admin`] on config text.
pub fn parse_admin(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<AdminConfig, ConfigErrors> {
    let (mut cx, doc) = parsed(path, text, env)?;
    let admin = match doc.get_ref().get("admin") {
        None => None,
        Some(v) => {
            let Some(admin) = cx.typed::<Spanned<RawAdmin>>(v, "admin") else {
                return Err(ConfigErrors(cx.errors));
            };
            Some(admin)
        }
    };
    match cx.admin(admin.as_ref()) {
        Some(admin) if cx.errors.is_empty() => Ok(admin),
        _ => Err(ConfigErrors(cx.errors)),
    }
}

/// What `expeditor send` needs of a config: where the daemon listens and
/// the sources, to sign a sample as each vendor would.
#[derive(Debug)]
pub struct SendConfig {
    pub file: PathBuf,
    pub server: ServerConfig,
    pub sources: BTreeMap<String, Arc<Source>>,
}

/// Reads only `[server]` and `[sources]` of a config file, for `expeditor
/// send`: a developer signing a sample needs the source's secret, not the
/// sinks' tokens or the store's password, so the rest is not judged and its
/// `${VAR}`s are not read (the whole file must still be valid TOML of the
/// config's shape).
pub fn load_sources(path: &Path) -> Result<SendConfig, ConfigErrors> {
    let text = read(path)?;
    parse_sources(path, &text, &|name| std::env::var(name).ok())
}

/// [`load_sources`] on config text.
pub fn parse_sources(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SendConfig, ConfigErrors> {
    let (mut cx, doc) = parsed(path, text, env)?;
    let raw = cx.sections(&doc);
    let server = cx.server(raw.server.as_ref());
    let mut sources = BTreeMap::new();
    for (name, src) in &raw.sources {
        if let Some(source) = cx.source(name, src) {
            sources.insert(name.clone(), Arc::new(source));
        }
    }
    match server {
        Some(server) if cx.errors.is_empty() => Ok(SendConfig {
            file: path.to_path_buf(),
            server,
            sources,
        }),
        _ => Err(ConfigErrors(cx.errors)),
    }
}

/// The context that checks `text`, and its TOML document; a syntax error
/// is the only error then.
fn parsed<'a>(
    path: &Path,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
) -> Result<(Cx<'a>, Spanned<DeTable<'a>>), ConfigErrors> {
    let mut cx = Cx {
        file: path.display().to_string(),
        text,
        env,
        errors: Vec::new(),
        plugin_cache: None,
    };
    match DeTable::parse(text) {
        Ok(doc) => Ok((cx, doc)),
        Err(e) => {
            cx.toml_error("", e);
            Err(ConfigErrors(cx.errors))
        }
    }
}

/// Whether binding both addresses would fail: the same port on the same
/// address, or on an unspecified one that takes it too (`0.0.0.0` every IPv4
/// address; `[::]` every IPv6 one, and IPv4 too unless this machine sets
/// `net.ipv6.bindv6only`). Port 0 is a new port for each.
fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let v6_takes_v4 = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() == "0");
    let covers = |wild: std::net::IpAddr, other: std::net::IpAddr| {
        wild.is_unspecified() && (wild.is_ipv4() == other.is_ipv4() || (wild.is_ipv6() && v6_takes_v4))
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// Validates config text; `env` resolves `${VAR}` (the process environment in
/// production, a map in tests).
pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let (mut cx, doc) = parsed(path, text, env)?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let raw = cx.sections(&doc);

    let server = cx.server(raw.server.as_ref());
    let admin = cx.admin(raw.admin.as_ref());
    if let (Some(server), Some(admin)) = (&server, &admin)
        && listeners_clash(server.listen, admin.listen)
    {
        // At admin.listen, or at server.listen when admin's is the default.
        let span = raw
            .admin
            .as_ref()
            .and_then(|a| a.get_ref().listen.as_ref())
            .or_else(|| raw.server.as_ref().and_then(|s| s.get_ref().listen.as_ref()))
            .map_or(0..0, |l| l.span());
        cx.error_at(
            span,
            "admin.listen",
            format!(
                "{} takes server.listen's port too ({}); each listener needs its own port",
                admin.listen, server.listen
            ),
        );
    }
    let store = cx.store(raw.store.as_ref(), &base_dir);
    cx.plugin_cache = store.as_ref().and_then(wasm::plugin_cache);
    let mut sources = BTreeMap::new();
    for (name, src) in &raw.sources {
        if let Some(source) = cx.source(name, src) {
            sources.insert(name.clone(), Arc::new(source));
        }
    }
    if let Some(store) = &store {
        cx.tolerances_within(&raw, &sources, store.dedupe_window);
    }
    let mut sinks = BTreeMap::new();
    if let Some(table) = doc.get_ref().get("sinks") {
        match table.get_ref() {
            DeValue::Table(table) => {
                for (name, value) in table.iter() {
                    if let Some(sink) = cx.sink(name.get_ref(), value, &base_dir) {
                        sinks.insert(name.get_ref().to_string(), sink);
                    }
                }
            }
            _ => cx.error_at(table.span(), "sinks", "must be a table of sinks: [sinks.NAME]"),
        }
    }
    // As the kernel would find them: `./o.jsonl` and `sub/../o.jsonl` are
    // one file.
    let mut file_paths: BTreeMap<PathBuf, &str> = BTreeMap::new();
    let store_dir = match store.as_ref().map(|s| &s.backend) {
        Some(StoreBackend::Sqlite { path }) => Some(lexical(path)),
        _ => None,
    };
    for (name, sink) in &sinks {
        let SinkKind::File(f) = &sink.kind else { continue };
        let span = || {
            doc.get_ref()
                .get("sinks")
                .and_then(|t| t.get_ref().get(name.as_str()))
                .and_then(|t| t.get_ref().get("path"))
                .map_or(0..0, |p| p.span())
        };
        let key = format!("sinks.{name}.path");
        if let Some(other) = file_paths.insert(lexical(&f.path), name) {
            cx.error_at(
                span(),
                &key,
                format!("sinks {other} and {name} write the same file; give each file sink its own path"),
            );
        }
        // Appending lines to the store's database (or cutting a "torn"
        // last line off it at start) would corrupt every event in it.
        let path = lexical(&f.path);
        if let Some(dir) = &store_dir
            && (dir.starts_with(&path)
                || (path.parent() == Some(dir.as_path())
                    && path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| crate::store::sqlite::FILES.contains(&n))))
        {
            cx.error_at(
                span(),
                &key,
                format!(
                    "{} ({}); give the file sink a path of its own",
                    if path == *dir {
                        "is the store's own folder"
                    } else if dir.starts_with(&path) {
                        "is a folder that holds the store's"
                    } else {
                        "is the store's own file"
                    },
                    dir.display()
                ),
            );
        }
    }
    let wasm_instances: usize = sinks
        .values()
        .filter(|s| matches!(s.kind, SinkKind::Wasm(_)))
        .map(|s| s.common.concurrency.most())
        .sum();
    if wasm_instances > expeditor_wasm::MAX_SINK_INSTANCES {
        let span = doc.get_ref().get("sinks").map_or(0..0, |t| t.span());
        cx.error_at(
            span,
            "sinks",
            format!(
                "the wasm sinks together may keep at most {} plugin instances (one per delivery in flight: \
                 its concurrency, {} for \"adaptive\"); these take {wasm_instances}. Lower a wasm sink's concurrency",
                expeditor_wasm::MAX_SINK_INSTANCES,
                Concurrency::ADAPTIVE_MAX
            ),
        );
    }
    // Routes are checked against every declared name, so one broken sink
    // is reported once, not again by each route that names it.
    let declared_sources: BTreeSet<String> = match doc.get_ref().get("sources").map(|t| t.get_ref()) {
        Some(DeValue::Table(t)) => t.iter().map(|(k, _)| k.get_ref().to_string()).collect(),
        _ => BTreeSet::new(),
    };
    let declared_sinks: BTreeSet<String> = match doc.get_ref().get("sinks").map(|t| t.get_ref()) {
        Some(DeValue::Table(t)) => t.iter().map(|(k, _)| k.get_ref().to_string()).collect(),
        _ => BTreeSet::new(),
    };
    let router = cx.router(&raw.routes, &declared_sources, &declared_sinks);
    let tests = cx.tests(&raw.tests, &sources, &declared_sources, &declared_sinks, &base_dir);

    if !cx.errors.is_empty() {
        return Err(ConfigErrors(cx.errors));
    }
    Ok(Config {
        file: path.to_path_buf(),
        server: server.expect("no errors means a server section"),
        admin: admin.expect("no errors means an admin section"),
        store: store.expect("no errors means a store section"),
        sources,
        sinks,
        router: router.expect("no errors means a router"),
        tests,
    })
}

/// Validation context: the text (for line numbers), the environment, and
/// the errors found so far.
struct Cx<'a> {
    file: String,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
    /// Where `wasm` sinks keep compiled plugins (under the store's path).
    plugin_cache: Option<PathBuf>,
}

impl Cx<'_> {
    /// `[[tests]]`: each names a configured source, sinks that are declared,
    /// and either a sample event type the source's vendor sends or a body
    /// file (read when the tests run).
    fn tests(
        &mut self,
        raw: &[Spanned<RawTest>],
        sources: &BTreeMap<String, Arc<Source>>,
        declared_sources: &BTreeSet<String>,
        declared_sinks: &BTreeSet<String>,
        base_dir: &Path,
    ) -> Vec<TestCase> {
        let mut tests = Vec::new();
        for (i, t) in raw.iter().enumerate() {
            let key = format!("tests[{i}]");
            let r = t.get_ref();
            let mut ok = true;
            let source = r.source.get_ref().clone();
            // A declared source with errors of its own has been reported;
            // saying it does not exist too would mislead.
            if !sources.contains_key(&source) {
                ok = false;
            }
            if !declared_sources.contains(&source) {
                self.error_at(
                    r.source.span(),
                    &format!("{key}.source"),
                    format!("no source named {source:?}"),
                );
                ok = false;
            }
            for sink in r.sinks.get_ref() {
                if !declared_sinks.contains(sink.get_ref()) {
                    self.error_at(
                        sink.span(),
                        &format!("{key}.sinks"),
                        format!("no sink named {:?}", sink.get_ref()),
                    );
                    ok = false;
                }
            }
            let event = match (&r.event, &r.body) {
                (Some(e), None) => {
                    let kind = sources.get(&source).map(|s| s.kind());
                    let known = kind.and_then(crate::sample::event_types);
                    if let Some(types) = known
                        && !types.is_empty()
                        && !types.contains(&e.get_ref().as_str())
                    {
                        self.error_at(
                            e.span(),
                            &format!("{key}.event"),
                            format!(
                                "no sample {:?} event for this source's kind; known: {}",
                                e.get_ref(),
                                types.join(", ")
                            ),
                        );
                        ok = false;
                    }
                    TestEvent::Sample(e.get_ref().clone())
                }
                // Read by `expeditor test` only: a fixture left out of a
                // deployment must not keep the daemon from starting.
                (None, Some(b)) => TestEvent::File(base_dir.join(b.get_ref())),
                (Some(_), Some(_)) => {
                    self.error_at(
                        t.span(),
                        &key,
                        "takes event (a sample's type) or body (a JSON file), not both",
                    );
                    continue;
                }
                (None, None) => {
                    self.error_at(
                        t.span(),
                        &key,
                        "needs either event (a sample's type) or body (a JSON file)",
                    );
                    continue;
                }
            };
            if ok {
                tests.push(TestCase {
                    name: r.name.get_ref().clone(),
                    source,
                    event,
                    sinks: r.sinks.get_ref().iter().map(|s| s.get_ref().clone()).collect(),
                });
            }
        }
        tests
    }

    /// 1-based line and column of a byte offset, the column in characters
    /// as an editor counts them (`—` or `é` earlier on the line is one).
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    fn error_at(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let position = Some(self.position(span.start));
        self.errors.push(ConfigError {
            file: self.file.clone(),
            position,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// A batching sink's `batch.linger`: up to 10s, deliveries wait in the
    /// batch meanwhile.
    fn linger(&mut self, s: Option<&Str>, key: &str) -> Option<Duration> {
        let linger = self.duration(s, key, Duration::ZERO)?;
        if let Some(s) = s
            && linger > MAX_LINGER
        {
            self.error_at(
                s.span(),
                key,
                "must be at most 10s: deliveries wait in the batch meanwhile",
            );
            return None;
        }
        Some(linger)
    }

    fn toml_error(&mut self, key: &str, e: toml::de::Error) {
        let position = e.span().map(|s| self.position(s.start));
        self.errors.push(ConfigError {
            file: self.file.clone(),
            position,
            key: key.to_string(),
            message: without_literals(e.message().trim()),
        });
    }

    /// Resolves `${VAR}` in a string value.
    fn resolve(&mut self, s: &Str, key: &str) -> Option<String> {
        self.resolve_with(s, key, false)
    }

    /// Resolves `${VAR}` in a string that is then compiled as a template
    /// ([`interpolate_with`]).
    fn resolve_template(&mut self, s: &Str, key: &str) -> Option<String> {
        self.resolve_with(s, key, true)
    }

    fn resolve_with(&mut self, s: &Str, key: &str, template: bool) -> Option<String> {
        match interpolate_with(s.get_ref(), self.env, template) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.error_at(s.span(), key, msg);
                None
            }
        }
    }

    fn duration(&mut self, s: Option<&Str>, key: &str, default: Duration) -> Option<Duration> {
        let Some(s) = s else { return Some(default) };
        let v = self.resolve(s, key)?;
        match humantime::parse_duration(v.trim()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error_at(
                    s.span(),
                    key,
                    format!("invalid duration {v:?} ({e}); write e.g. \"30s\", \"5m\", \"7d\""),
                );
                None
            }
        }
    }

    /// [`Self::duration`], refused under `least` (with `why`): a time limit
    /// of zero would fail every request, not none.
    fn duration_at_least(
        &mut self,
        s: Option<&Str>,
        key: &str,
        default: Duration,
        least: Duration,
        why: &str,
    ) -> Option<Duration> {
        let d = self.duration(s, key, default)?;
        if d < least {
            let span = s.map_or(0..0, |s| s.span());
            self.error_at(
                span,
                key,
                format!("must be at least {}: {why}", humantime::format_duration(least)),
            );
            return None;
        }
        Some(d)
    }

    fn size(&mut self, s: Option<&Str>, key: &str, default: usize) -> Option<usize> {
        let Some(s) = s else { return Some(default) };
        let v = self.resolve(s, key)?;
        match v.trim().parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() > 0 && b.as_u64() <= usize::MAX as u64 => Some(b.as_u64() as usize),
            _ => {
                self.error_at(
                    s.span(),
                    key,
                    format!("invalid size {v:?}; write e.g. \"1MiB\", \"512KiB\""),
                );
                None
            }
        }
    }

    fn int(&mut self, v: Option<&Spanned<i64>>, key: &str, default: i64, range: Range<i64>) -> Option<i64> {
        let Some(v) = v else { return Some(default) };
        if range.contains(v.get_ref()) {
            Some(*v.get_ref())
        } else {
            self.error_at(
                v.span(),
                key,
                format!("must be between {} and {}", range.start, range.end - 1),
            );
            None
        }
    }

    fn concurrency(&mut self, v: Option<&Spanned<RawConcurrency>>, key: &str) -> Option<Concurrency> {
        let Some(v) = v else { return Some(Concurrency::Adaptive) };
        match v.get_ref() {
            RawConcurrency::Fixed(n) if (1..=1024).contains(n) => Some(Concurrency::Fixed(*n as usize)),
            RawConcurrency::Named(name) if name == "adaptive" => Some(Concurrency::Adaptive),
            _ => {
                self.error_at(v.span(), key, "must be between 1 and 1024, or \"adaptive\"");
                None
            }
        }
    }

    /// `"<count>/<period>"`: a unit (`s`, `min`, `h`) or a duration (`10s`).
    fn rate_limit(&mut self, s: &Str, key: &str) -> Option<RateLimit> {
        let v = self.resolve(s, key)?;
        let parsed = v.split_once('/').and_then(|(count, per)| {
            let count = count.trim().parse::<u32>().ok().filter(|c| *c > 0)?;
            let per = match per.trim() {
                "s" | "sec" | "second" => Duration::from_secs(1),
                "m" | "min" | "minute" => Duration::from_secs(60),
                "h" | "hour" => Duration::from_secs(3600),
                other => humantime::parse_duration(other).ok()?,
            };
            let rate = RateLimit { count, per };
            // Under a millisecond apart is under the timers' resolution.
            (per <= Duration::from_secs(86_400) && rate.spacing() >= Duration::from_millis(1)).then_some(rate)
        });
        if parsed.is_none() {
            self.error_at(
                s.span(),
                key,
                format!(
                    "invalid rate {v:?}; write \"<count>/<period>\", e.g. \"50/s\", \"1000/min\" or \"5/10s\" (at most 1000 a second, a period of at most a day)"
                ),
            );
        }
        parsed
    }

    fn addr(&mut self, s: Option<&Str>, key: &str, default: &str) -> Option<SocketAddr> {
        let (v, span) = match s {
            Some(s) => (self.resolve(s, key)?, s.span()),
            None => return default.parse().ok(),
        };
        match v.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error_at(
                    span,
                    key,
                    format!("invalid address {v:?}; write IP:PORT, e.g. \"0.0.0.0:8080\""),
                );
                None
            }
        }
    }

    fn server(&mut self, raw: Option<&Spanned<RawServer>>) -> Option<ServerConfig> {
        let r = raw.map(Spanned::get_ref);
        let listen = self.addr(r.and_then(|r| r.listen.as_ref()), "server.listen", "0.0.0.0:8080");
        let max_body = self.size(r.and_then(|r| r.max_body.as_ref()), "server.max_body", 1 << 20);
        // A body is read whole, before its signature can be checked, by
        // anyone who reaches the port: its size bounds what one request
        // may make the daemon hold.
        if let (Some(size), Some(raw)) = (max_body, r.and_then(|r| r.max_body.as_ref()))
            && size > MAX_BODY_LIMIT
        {
            self.error_at(
                raw.span(),
                "server.max_body",
                "must be at most 64MiB: every request's body is held in memory before its signature is checked",
            );
        }
        let header_timeout = self.duration_at_least(
            r.and_then(|r| r.header_timeout.as_ref()),
            "server.header_timeout",
            Duration::from_secs(10),
            Duration::from_secs(1),
            "a vendor's request headers must have time to arrive",
        );
        let body_timeout = self.duration_at_least(
            r.and_then(|r| r.body_timeout.as_ref()),
            "server.body_timeout",
            Duration::from_secs(10),
            Duration::from_secs(1),
            "a vendor's request body must have time to arrive",
        );
        let max_connections = self.int(
            r.and_then(|r| r.max_connections.as_ref()),
            "server.max_connections",
            1024,
            1..1_000_001,
        );
        let shutdown_raw = r.and_then(|r| r.shutdown_timeout.as_ref());
        let shutdown_timeout = self
            .duration(shutdown_raw, "server.shutdown_timeout", Duration::from_secs(25))
            .and_then(|d| {
                // Zero drains nothing (work in flight runs again at the next
                // start), which one may mean; past an hour, systemd (its unit's
                // TimeoutStopSec) or the operator kills it first.
                if d > Duration::from_secs(3600) {
                    self.error_at(
                        shutdown_raw.map_or(0..0, |s| s.span()),
                        "server.shutdown_timeout",
                        "must be at most 1h; raise the unit's TimeoutStopSec with it",
                    );
                    return None;
                }
                Some(d)
            });
        Some(ServerConfig {
            listen: listen?,
            max_body: max_body?,
            header_timeout: header_timeout?,
            body_timeout: body_timeout?,
            max_connections: max_connections? as usize,
            shutdown_timeout: shutdown_timeout?,
        })
    }

    fn admin(&mut self, raw: Option<&Spanned<RawAdmin>>) -> Option<AdminConfig> {
        let r = raw.map(Spanned::get_ref);
        let listen = self.addr(r.and_then(|r| r.listen.as_ref()), "admin.listen", "127.0.0.1:9090")?;
        let token = match r.and_then(|r| r.token.as_ref()) {
            Some(t) => {
                let v = self.resolve(t, "admin.token")?;
                if v.trim().is_empty() {
                    self.error_at(t.span(), "admin.token", "is empty");
                    return None;
                }
                // What a Bearer header can carry and the admin API reads back
                // as sent; anything else would pass here and never match.
                if v.trim() != v || !v.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                    self.error_at(
                        t.span(),
                        "admin.token",
                        "must be printable ASCII, without spaces at either end",
                    );
                    return None;
                }
                Some(Secret::new(v))
            }
            None => None,
        };
        if token.is_none() && !listen.ip().is_loopback() {
            let span = raw.map_or(0..0, |r| r.span());
            self.error_at(
                span,
                "admin.token",
                format!("is required when admin.listen ({listen}) is not a loopback address"),
            );
            return None;
        }
        Some(AdminConfig { listen, token })
    }

    fn store(&mut self, raw: Option<&Spanned<RawStore>>, base: &Path) -> Option<StoreConfig> {
        let r = raw.map(Spanned::get_ref);
        let backend = match (r.and_then(|r| r.path.as_ref()), r.and_then(|r| r.url.as_ref())) {
            (Some(_), Some(url)) => {
                self.error_at(
                    url.span(),
                    "store.url",
                    "cannot be set together with store.path: set path for the embedded SQLite store, \
                     or url for a shared PostgreSQL store",
                );
                None
            }
            (None, Some(u)) => match self.resolve(u, "store.url") {
                // The form only: whether the database answers is `run`'s to find out.
                Some(v) => match crate::store::postgres::parse_url(&v) {
                    Ok(_) => Some(StoreBackend::Postgres { url: Secret::new(v) }),
                    Err(msg) => {
                        self.error_at(u.span(), "store.url", msg);
                        None
                    }
                },
                None => None,
            },
            (Some(p), None) => match self.resolve(p, "store.path") {
                Some(v) if v.trim().is_empty() => {
                    self.error_at(p.span(), "store.path", "is empty");
                    None
                }
                Some(v) => Some(StoreBackend::Sqlite { path: base.join(v) }),
                None => None,
            },
            (None, None) => Some(StoreBackend::Sqlite {
                path: base.join("data"),
            }),
        };
        let day = Duration::from_secs(86_400);
        let dedupe_window = self.duration(r.and_then(|r| r.dedupe_window.as_ref()), "store.dedupe_window", 7 * day);
        let keep_delivered = self.duration(r.and_then(|r| r.keep_delivered.as_ref()), "store.keep_delivered", day);
        let keep_dead_letters = self.duration(
            r.and_then(|r| r.keep_dead_letters.as_ref()),
            "store.keep_dead_letters",
            30 * day,
        );
        let dedupe_window = dedupe_window?;
        // The longest vendor retry horizon (Crave, about 5.3 h) must be covered,
        // or a late retry is delivered twice.
        if dedupe_window < Duration::from_secs(6 * 3600)
            && let Some(s) = r.and_then(|r| r.dedupe_window.as_ref())
        {
            self.error_at(
                s.span(),
                "store.dedupe_window",
                "must be at least 6h: vendors retry for up to about 5.3 hours (Crave)",
            );
        }
        Some(StoreConfig {
            backend: backend?,
            dedupe_window,
            keep_delivered: keep_delivered?,
            keep_dead_letters: keep_dead_letters?,
        })
    }

    /// A signed time older than the tolerance is refused, and a repeated
    /// event id within the dedupe window is dropped: a tolerance past the
    /// window would let a captured request be replayed, and taken as new,
    /// once its id is forgotten.
    fn tolerances_within(&mut self, raw: &RawConfig, sources: &BTreeMap<String, Arc<Source>>, window: Duration) {
        for (name, source) in sources {
            let tolerance = match &source.scheme {
                Scheme::CrumbPos(v) => v.tolerance,
                Scheme::Hmac(v) if v.timestamp_header.is_some() => v.tolerance,
                _ => continue,
            };
            if tolerance > window
                && let Some(t) = raw.sources.get(name).and_then(|r| r.get_ref().tolerance.as_ref())
            {
                self.error_at(
                    t.span(),
                    &format!("sources.{name}.tolerance"),
                    format!(
                        "must not be longer than store.dedupe_window ({}): a request replayed once its event id is \
                         forgotten would be taken as a new event",
                        humantime::format_duration(window)
                    ),
                );
            }
        }
    }

    fn source(&mut self, name: &str, raw: &Spanned<RawSource>) -> Option<Source> {
        let key = format!("sources.{name}");
        if !valid_name(name) {
            self.error_at(
                raw.span(),
                &key,
                "source names may use letters, digits, '-' and '_' (they are URL paths)",
            );
        }
        let r = raw.get_ref();
        let mut secrets = Vec::new();
        if r.secrets.get_ref().is_empty() {
            self.error_at(r.secrets.span(), &format!("{key}.secrets"), "needs at least one secret");
        }
        for (i, s) in r.secrets.get_ref().iter().enumerate() {
            let k = format!("{key}.secrets[{i}]");
            if let Some(v) = self.resolve(s, &k) {
                if v.is_empty() {
                    self.error_at(s.span(), &k, "is empty");
                } else {
                    secrets.push(Secret::new(v));
                }
            }
        }
        let tolerance = self.duration_at_least(
            r.tolerance.as_ref(),
            &format!("{key}.tolerance"),
            Duration::from_secs(300),
            Duration::from_secs(1),
            "a signed time is already some time old when it arrives",
        );
        let kind = r.kind.get_ref().as_str();
        let hmac_only = [
            ("header", &r.header),
            ("encoding", &r.encoding),
            ("prefix", &r.prefix),
            ("timestamp_header", &r.timestamp_header),
            ("signed", &r.signed),
            ("id_field", &r.id_field),
            ("type_field", &r.type_field),
            ("time_field", &r.time_field),
        ];
        if kind != "hmac" {
            for (k, v) in hmac_only {
                if let Some(v) = v {
                    self.error_at(
                        v.span(),
                        &format!("{key}.{k}"),
                        format!("is only valid for kind = \"hmac\", not \"{kind}\""),
                    );
                }
            }
        }
        if kind == "crave" && r.tolerance.is_some() {
            let span = r.tolerance.as_ref().map_or(0..0, |t| t.span());
            self.error_at(
                span,
                &format!("{key}.tolerance"),
                "Crave signs no timestamp, so there is no tolerance to set",
            );
        }
        if kind == "hmac" && r.tolerance.is_some() && r.timestamp_header.is_none() {
            let span = r.tolerance.as_ref().map_or(0..0, |t| t.span());
            self.error_at(
                span,
                &format!("{key}.tolerance"),
                "has no effect without timestamp_header (the header that carries the signed time)",
            );
        }
        let (scheme, normalizer) = match kind {
            "crumbpos" => (
                Scheme::CrumbPos(CrumbPosVerifier {
                    secrets,
                    tolerance: tolerance?,
                }),
                Normalizer::CrumbPos,
            ),
            "crave" => (Scheme::Crave(CraveVerifier { secrets }), Normalizer::Crave),
            "hmac" => self.hmac_source(&key, raw, secrets, tolerance?)?,
            other => {
                self.error_at(
                    r.kind.span(),
                    &format!("{key}.kind"),
                    format!("unknown source kind {other:?}; expected one of {SOURCE_KINDS}"),
                );
                return None;
            }
        };
        Some(Source {
            name: name.to_string(),
            scheme,
            normalizer,
        })
    }

    fn hmac_source(
        &mut self,
        key: &str,
        raw: &Spanned<RawSource>,
        secrets: Vec<Secret>,
        tolerance: Duration,
    ) -> Option<(Scheme, Normalizer)> {
        let r = raw.get_ref();
        let header = match &r.header {
            Some(h) => self.header_name(h, &format!("{key}.header")),
            None => {
                self.error_at(
                    raw.span(),
                    &format!("{key}.header"),
                    "is required for kind = \"hmac\" (e.g. \"X-Signature\")",
                );
                None
            }
        };
        let timestamp_header = match &r.timestamp_header {
            Some(h) => Some(self.header_name(h, &format!("{key}.timestamp_header"))?),
            None => None,
        };
        // Headers HTTP itself sets or the listener reads: a vendor's
        // signature or time is never in them, and every webhook would fail.
        for (name, h, raw_h) in [
            ("header", header.as_ref(), r.header.as_ref()),
            (
                "timestamp_header",
                timestamp_header.as_ref(),
                r.timestamp_header.as_ref(),
            ),
        ] {
            if let (Some(h), Some(raw_h)) = (h, raw_h)
                && HTTP_OWN_HEADERS.contains(&h.as_str())
            {
                self.error_at(
                    raw_h.span(),
                    &format!("{key}.{name}"),
                    format!("{h} is a header of HTTP itself, not one a vendor signs with; name the vendor's header"),
                );
            }
        }
        if let (Some(h), Some(t), Some(raw_t)) =
            (header.as_ref(), timestamp_header.as_ref(), r.timestamp_header.as_ref())
            && h == t
        {
            self.error_at(
                raw_t.span(),
                &format!("{key}.timestamp_header"),
                "is the signature's header too; the signed time comes in a header of its own (a vendor that puts \
                 both in one header needs a kind of its own, as crumbpos)",
            );
        }
        let encoding = match r.encoding.as_ref().map(|e| (e.get_ref().as_str(), e.span())) {
            None | Some(("hex", _)) => Some(Encoding::Hex),
            Some(("base64", _)) => Some(Encoding::Base64),
            Some((other, span)) => {
                self.error_at(
                    span,
                    &format!("{key}.encoding"),
                    format!("unknown encoding {other:?}; expected hex or base64"),
                );
                None
            }
        };
        let prefix = match &r.prefix {
            Some(p) => Some(self.resolve(p, &format!("{key}.prefix"))?),
            None => None,
        };
        let default_signed = if timestamp_header.is_some() {
            "{timestamp}.{body}"
        } else {
            "{body}"
        };
        let signed_src = r.signed.as_ref().map_or(default_signed, |s| s.get_ref().as_str());
        let signed = match SignedPayload::parse(signed_src) {
            Ok(s) => {
                let span = r.signed.as_ref().map_or(raw.span(), |s| s.span());
                if s.uses_timestamp() && timestamp_header.is_none() {
                    self.error_at(
                        span,
                        &format!("{key}.signed"),
                        "uses {timestamp} but no timestamp_header is set",
                    );
                } else if !s.uses_timestamp() && timestamp_header.is_some() {
                    // The tolerance would judge a time anyone can rewrite:
                    // a replayed request passes with a fresh header.
                    self.error_at(
                        span,
                        &format!("{key}.signed"),
                        "does not include {timestamp}, so the time in timestamp_header is not signed and a \
                         replayed request passes the tolerance with a fresh one; sign it as the vendor does \
                         (e.g. \"{timestamp}.{body}\") or remove timestamp_header",
                    );
                }
                Some(s)
            }
            Err(e) => {
                let span = r.signed.as_ref().map_or(raw.span(), |s| s.span());
                self.error_at(span, &format!("{key}.signed"), e);
                None
            }
        };
        let mut field = |f: &Option<Str>, name: &str, default: Option<&str>| -> Option<Option<FieldPath>> {
            let (text, span) = match f {
                Some(f) => (f.get_ref().as_str(), f.span()),
                None => match default {
                    Some(d) => (d, raw.span()),
                    None => return Some(None),
                },
            };
            match FieldPath::parse(text) {
                Ok(p) => Some(Some(p)),
                Err(e) => {
                    self.error_at(span, &format!("{key}.{name}"), e);
                    None
                }
            }
        };
        let id_field = field(&r.id_field, "id_field", Some("id"));
        let type_field = field(&r.type_field, "type_field", Some("type"));
        let time_field = field(&r.time_field, "time_field", None);
        // One inside another: the outer must be a text or number and hold
        // the inner at once, so no body has both and every webhook is a 400.
        let named = [
            ("id_field", id_field.as_ref().and_then(Option::as_ref), &r.id_field),
            (
                "type_field",
                type_field.as_ref().and_then(Option::as_ref),
                &r.type_field,
            ),
            (
                "time_field",
                time_field.as_ref().and_then(Option::as_ref),
                &r.time_field,
            ),
        ];
        for (outer, outer_path, _) in &named {
            for (inner, inner_path, inner_raw) in &named {
                if let (Some(o), Some(i)) = (outer_path, inner_path)
                    && o.holds(i)
                {
                    let span = inner_raw.as_ref().map_or(raw.span(), |f| f.span());
                    self.error_at(
                        span,
                        &format!("{key}.{inner}"),
                        format!("{i} lies inside {outer} ({o}), which must be a text or a number: no body has both"),
                    );
                }
            }
        }
        let verifier = HmacVerifier {
            secrets,
            header: header?,
            encoding: encoding?,
            prefix,
            timestamp_header,
            signed: signed?,
            tolerance,
        };
        let normalizer = Normalizer::Hmac {
            id_field: id_field??,
            type_field: type_field??,
            time_field: time_field?,
        };
        Some((Scheme::Hmac(verifier), normalizer))
    }

    fn header_name(&mut self, h: &Str, key: &str) -> Option<http::HeaderName> {
        match http::HeaderName::from_bytes(h.get_ref().trim().as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                self.error_at(
                    h.span(),
                    key,
                    format!("{:?} is not a valid HTTP header name", h.get_ref()),
                );
                None
            }
        }
    }

    fn sink(&mut self, name: &str, value: &Spanned<DeValue<'_>>, base: &Path) -> Option<SinkSpec> {
        let key = format!("sinks.{name}");
        if !valid_name(name) {
            self.error_at(value.span(), &key, "sink names may use letters, digits, '-' and '_'");
        }
        let DeValue::Table(table) = value.get_ref() else {
            self.error_at(value.span(), &key, "must be a table: [sinks.NAME]");
            return None;
        };
        let Some(ty) = table.get("type") else {
            self.error_at(
                value.span(),
                &format!("{key}.type"),
                format!("is required; one of {SINK_TYPES}"),
            );
            return None;
        };
        let ty_name = ty.get_ref().as_str().unwrap_or("").to_string();
        let body = table.get("body");
        match ty_name.as_str() {
            "http" => {
                let r: RawHttpSink = self.typed(value, &key)?;
                let common = sink_common!(self, &key, r);
                let mut set = TemplateSet::new();
                // `sinks.NAME.url`; not a body's `url` member.
                set.escape_values(Escape::Url, |name| {
                    name.ends_with(".url") && name.matches('.').count() == 2
                });
                // HTTP's methods (but CONNECT and TRACE, which no delivery
                // can mean); any other string is a valid token to HTTP
                // (`PSOT`) and would only be refused by the server, at every
                // delivery.
                let method = match &r.method {
                    Some(m) => match m.get_ref().trim().to_ascii_uppercase().as_str() {
                        "POST" => Some(http::Method::POST),
                        "PUT" => Some(http::Method::PUT),
                        "PATCH" => Some(http::Method::PATCH),
                        "DELETE" => Some(http::Method::DELETE),
                        "GET" => Some(http::Method::GET),
                        "HEAD" => Some(http::Method::HEAD),
                        "OPTIONS" => Some(http::Method::OPTIONS),
                        _ => {
                            self.error_at(
                                m.span(),
                                &format!("{key}.method"),
                                "must be an HTTP method: POST, PUT, PATCH, DELETE, GET, HEAD or OPTIONS",
                            );
                            None
                        }
                    },
                    None => Some(http::Method::POST),
                };
                // The URL is a template, so `${VAR}` values in it are quoted
                // as text (a `{{` in a secret is not template code, and its
                // error would echo the secret); its fixed start is read from
                // the plain text.
                let url = self.resolve_template(&r.url, &format!("{key}.url")).and_then(|u| {
                    let plain = interpolate_with(r.url.get_ref(), self.env, false).unwrap_or_default();
                    let static_part = plain.split("{{").next().unwrap_or("");
                    if !(static_part.starts_with("http://") || static_part.starts_with("https://")) {
                        self.error_at(
                            r.url.span(),
                            &format!("{key}.url"),
                            "must start with http:// or https://",
                        );
                        return None;
                    }
                    // `user:password@` in the URL is never sent (no client
                    // turns it into a header here), so every delivery would
                    // meet a 401: say so, without repeating the URL.
                    let authority = static_part
                        .split_once("://")
                        .map_or("", |(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""));
                    if authority.contains('@') {
                        self.error_at(
                            r.url.span(),
                            &format!("{key}.url"),
                            "has credentials (user:password@), which are not sent; \
                             put them in headers instead, e.g. Authorization = \"Basic ${VAR}\"",
                        );
                        return None;
                    }
                    self.template(&mut set, &format!("{key}.url"), &u, r.url.span())
                });
                let mut headers = Vec::new();
                // Each header as the config spells it, to name it back.
                let mut spelled: Vec<(http::HeaderName, &str)> = Vec::new();
                for (hname, hval) in &r.headers {
                    let hkey = format!("{key}.headers.{hname}");
                    let n = match expeditor_http::header_name(hname) {
                        Ok(n) => n,
                        Err(msg) => {
                            self.error_at(hval.span(), &hkey, msg);
                            continue;
                        }
                    };
                    let Some(v) = self.resolve_template(hval, &hkey) else {
                        continue;
                    };
                    // What every delivery sends as it is, a value without
                    // template syntax or a `${VAR}` value in any: one no
                    // request can carry (a newline, say from an env file)
                    // would dead-letter them all. Not quoted: it may be a
                    // secret.
                    let literal = !["{{", "{%", "{#"].iter().any(|t| v.contains(t));
                    let unsendable = |text: &str| text.chars().any(|c| c.is_ascii_control() && c != '\t');
                    if (literal && http::HeaderValue::from_str(&v).is_err())
                        || env_values(hval.get_ref(), self.env).iter().any(|v| unsendable(v))
                    {
                        self.error_at(
                            hval.span(),
                            &hkey,
                            "is not a valid header value: it holds a control character such as a newline",
                        );
                        continue;
                    }
                    // Header names are case-insensitive: two keys that
                    // differ only in case would be one header, the other's
                    // value (a token, say) silently dropped.
                    if let Some((_, other)) = spelled.iter().find(|(h, _)| *h == n) {
                        self.error_at(
                            hval.span(),
                            &hkey,
                            format!("names the same header as {other:?} (header names ignore case); keep one"),
                        );
                        continue;
                    }
                    spelled.push((n.clone(), hname.as_str()));
                    if let Some(t) = self.template(&mut set, &hkey, &v, hval.span()) {
                        headers.push((n, t));
                    }
                }
                let body = match body {
                    Some(b) => Some(self.structured(&mut set, &format!("{key}.body"), b)?),
                    None => None,
                };
                let common = common?;
                Some(SinkSpec {
                    name: name.to_string(),
                    common,
                    kind: SinkKind::Http(HttpSinkConfig {
                        name: name.to_string(),
                        method: method?,
                        url: url?,
                        headers,
                        body,
                        timeout: common.timeout,
                        templates: set.finish(),
                    }),
                })
            }
            "wasm" => self.wasm_sink(name, &key, value, base),
            "slack" => self.slack_sink(name, &key, value),
            "email" => self.email_sink(name, &key, value, base),
            "bigquery" => self.bigquery_sink(name, &key, value, base),
            "file" => {
                let r: RawFileSink = self.typed(value, &key)?;
                let common = sink_common!(self, &key, r);
                let path = self.resolve(&r.path, &format!("{key}.path"));
                let bkey = format!("{key}.batch");
                let b = r.batch.as_ref().map(Spanned::get_ref);
                let max_batch = self.int(
                    b.and_then(|b| b.max_rows.as_ref()),
                    &format!("{bkey}.max_rows"),
                    FileSinkConfig::DEFAULT_MAX_BATCH as i64,
                    1..FileSinkConfig::MAX_BATCH_LIMIT as i64 + 1,
                );
                let linger = self.linger(b.and_then(|b| b.linger.as_ref()), &format!("{bkey}.linger"));
                let path = path?;
                if path.trim().is_empty() {
                    self.error_at(
                        r.path.span(),
                        &format!("{key}.path"),
                        "is empty; e.g. \"data/events.jsonl\"",
                    );
                    return None;
                }
                let mut set = TemplateSet::new();
                let body = match body {
                    Some(b) => Some(self.structured(&mut set, &format!("{key}.body"), b)?),
                    None => None,
                };
                Some(SinkSpec {
                    name: name.to_string(),
                    common: common?,
                    kind: SinkKind::File(FileSinkConfig {
                        name: name.to_string(),
                        path: base.join(path),
                        body,
                        templates: set.finish(),
                        max_batch: max_batch? as usize,
                        linger: linger?,
                    }),
                })
            }
            other => {
                self.error_at(
                    ty.span(),
                    &format!("{key}.type"),
                    format!("unknown sink type {other:?}; expected one of {SINK_TYPES}"),
                );
                None
            }
        }
    }

    /// The file's sections, each read on its own: a mistake in one (a
    /// typo'd key, a number where text belongs) is reported under its key
    /// path, and the others are still read and checked. A section that
    /// cannot be read is left out; so are all routes (or test cases) when
    /// one cannot, so that no later one is checked under another's index.
    fn sections(&mut self, doc: &Spanned<DeTable<'_>>) -> RawConfig {
        const SECTIONS: [&str; 7] = ["server", "admin", "store", "sources", "sinks", "routes", "tests"];
        let doc = doc.get_ref();
        for (name, value) in doc.iter() {
            if !SECTIONS.contains(&name.get_ref().as_ref()) {
                self.error_at(
                    name.span().start..value.span().end.max(name.span().end),
                    name.get_ref(),
                    format!("is not a section of the config; they are {}", SECTIONS.join(", ")),
                );
            }
        }
        let server = doc.get("server").and_then(|v| self.typed(v, "server"));
        let admin = doc.get("admin").and_then(|v| self.typed(v, "admin"));
        let store = doc.get("store").and_then(|v| self.typed(v, "store"));
        let mut sources = BTreeMap::new();
        if let Some(table) = doc.get("sources") {
            match table.get_ref() {
                DeValue::Table(t) => {
                    for (name, value) in t.iter() {
                        let key = format!("sources.{}", name.get_ref());
                        if let Some(source) = self.typed(value, &key) {
                            sources.insert(name.get_ref().to_string(), source);
                        }
                    }
                }
                _ => self.error_at(table.span(), "sources", "must be a table of sources: [sources.NAME]"),
            }
        }
        let routes = self.array_of(doc.get("routes"), "routes", "[[routes]]");
        let tests = self.array_of(doc.get("tests"), "tests", "[[tests]]");
        RawConfig {
            server,
            admin,
            store,
            sources,
            routes,
            tests,
        }
    }

    /// `[[NAME]]` entries, all of them or none (see `sections`).
    fn array_of<T: for<'de> Deserialize<'de>>(
        &mut self,
        value: Option<&Spanned<DeValue<'_>>>,
        key: &str,
        form: &str,
    ) -> Vec<T> {
        let Some(value) = value else { return Vec::new() };
        let DeValue::Array(items) = value.get_ref() else {
            self.error_at(value.span(), key, format!("must be a list of tables: {form}"));
            return Vec::new();
        };
        let read: Vec<Option<T>> = items
            .iter()
            .enumerate()
            .map(|(i, v)| self.typed(v, &format!("{key}[{i}]")))
            .collect();
        read.into_iter().collect::<Option<Vec<T>>>().unwrap_or_default()
    }

    fn typed<T: for<'de> Deserialize<'de>>(&mut self, value: &Spanned<DeValue<'_>>, key: &str) -> Option<T> {
        match T::deserialize(value.clone().into_deserializer()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.toml_error(key, e);
                None
            }
        }
    }

    fn template(
        &mut self,
        set: &mut TemplateSet,
        key: &str,
        source: &str,
        span: Range<usize>,
    ) -> Option<expeditor_api::TemplateId> {
        match set.text(key, source) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error_at(span, key, format!("invalid template: {}", e.message));
                None
            }
        }
    }

    /// A `body`/`row` table: resolves `${VAR}`s, converts to JSON and
    /// compiles each string leaf.
    fn structured(
        &mut self,
        set: &mut TemplateSet,
        key: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Option<expeditor_api::Structured> {
        let json = self.json_value_as(key, value, true)?;
        match set.structured(key, &json) {
            Ok(s) => Some(s),
            Err(errors) => {
                for e in errors {
                    // The message starts with the leaf's key path: point at the leaf.
                    let (leaf, detail) = e.message.split_once(": ").unwrap_or(("", &e.message));
                    let span = leaf
                        .strip_prefix(key)
                        .and_then(|rest| find_span(value, rest))
                        .unwrap_or_else(|| value.span());
                    self.error_at(span, leaf, format!("invalid template: {detail}"));
                }
                None
            }
        }
    }

    fn json_value(&mut self, key: &str, value: &Spanned<DeValue<'_>>) -> Option<serde_json::Value> {
        self.json_value_as(key, value, false)
    }

    /// What the `${VAR}`s in a TOML value's strings resolve to, at any depth.
    fn secrets_in(&self, value: &Spanned<DeValue<'_>>) -> Vec<String> {
        match value.get_ref() {
            DeValue::String(s) => env_values(s, self.env),
            DeValue::Array(list) => list.iter().flat_map(|v| self.secrets_in(v)).collect(),
            DeValue::Table(t) => t.values().flat_map(|v| self.secrets_in(v)).collect(),
            _ => Vec::new(),
        }
    }

    /// A TOML value as JSON, `${VAR}`s resolved; as templates' sources
    /// ([`interpolate_with`]) if `templates`.
    fn json_value_as(&mut self, key: &str, value: &Spanned<DeValue<'_>>, templates: bool) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        Some(match value.get_ref() {
            DeValue::String(s) => match interpolate_with(s, self.env, templates) {
                Ok(v) => J::String(v),
                Err(msg) => {
                    self.error_at(value.span(), key, msg);
                    return None;
                }
            },
            DeValue::Integer(i) => match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
                Ok(n) => J::from(n),
                Err(_) => {
                    self.error_at(value.span(), key, "integer out of range");
                    return None;
                }
            },
            DeValue::Float(f) => match f
                .as_str()
                .replace('_', "")
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
            {
                Some(n) => J::Number(n),
                None => {
                    self.error_at(value.span(), key, "float cannot be written as JSON");
                    return None;
                }
            },
            DeValue::Boolean(b) => J::Bool(*b),
            DeValue::Datetime(d) => J::String(d.to_string()),
            DeValue::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    out.push(self.json_value_as(&format!("{key}[{i}]"), item, templates)?);
                }
                J::Array(out)
            }
            DeValue::Table(t) => {
                let mut out = serde_json::Map::new();
                for (k, v) in t.iter() {
                    out.insert(
                        k.get_ref().to_string(),
                        self.json_value_as(&format!("{key}.{}", k.get_ref()), v, templates)?,
                    );
                }
                J::Object(out)
            }
        })
    }

    fn sink_common(
        &mut self,
        key: &str,
        concurrency: Option<&Spanned<RawConcurrency>>,
        rate_limit: Option<&Str>,
        timeout: Option<&Str>,
        retry: Option<&Spanned<RawRetry>>,
    ) -> Option<SinkCommon> {
        let concurrency = self.concurrency(concurrency, &format!("{key}.concurrency"));
        let rate_limit = match rate_limit {
            None => Some(None),
            Some(r) => self.rate_limit(r, &format!("{key}.rate_limit")).map(Some),
        };
        let timeout_raw = timeout;
        let timeout = self.duration(timeout, &format!("{key}.timeout"), Duration::from_secs(10));
        let default = RetryPolicy::default();
        let retry = match retry {
            None => Some(default),
            Some(r) => {
                let rk = format!("{key}.retry");
                let rr = r.get_ref();
                let max_attempts = self.int(
                    rr.max_attempts.as_ref(),
                    &format!("{rk}.max_attempts"),
                    10,
                    1..1_000_001,
                );
                let initial = self.duration(rr.initial.as_ref(), &format!("{rk}.initial"), default.initial);
                let max = self.duration(rr.max.as_ref(), &format!("{rk}.max"), default.max);
                match (max_attempts, initial, max) {
                    (Some(a), Some(i), Some(m)) if i <= m => Some(RetryPolicy {
                        max_attempts: a as u32,
                        initial: i,
                        max: m,
                    }),
                    (Some(_), Some(i), Some(m)) => {
                        let max = match rr.max {
                            Some(_) => format!("max ({})", humantime::format_duration(m)),
                            None => format!("max (by default {})", humantime::format_duration(m)),
                        };
                        self.error_at(
                            r.span(),
                            &rk,
                            format!(
                                "initial ({}) must not be longer than {max}",
                                humantime::format_duration(i)
                            ),
                        );
                        None
                    }
                    _ => None,
                }
            }
        };
        let timeout = timeout?;
        if timeout.is_zero() || timeout > MAX_SINK_TIMEOUT {
            // Zero is only ever written: the default is 10s. A claim's lease
            // is twice the timeout, and an hour is far past any sink's.
            let span = timeout_raw.map_or(0..0, |t| t.span());
            let msg = if timeout.is_zero() {
                "must be longer than 0s"
            } else {
                "must be at most 1h"
            };
            self.error_at(span, &format!("{key}.timeout"), msg);
            return None;
        }
        Some(SinkCommon {
            concurrency: concurrency?,
            rate_limit: rate_limit?,
            timeout,
            retry: retry?,
        })
    }

    fn router(
        &mut self,
        raw: &[Spanned<RawRoute>],
        sources: &BTreeSet<String>,
        sinks: &BTreeSet<String>,
    ) -> Option<Router> {
        let mut set = TemplateSet::new();
        let mut routes = Vec::new();
        let mut names = BTreeSet::new();
        let mut ok = true;
        for (i, r) in raw.iter().enumerate() {
            let rr = r.get_ref();
            let name = rr
                .name
                .as_ref()
                .map_or_else(|| format!("routes[{i}]"), |n| n.get_ref().clone());
            let key = format!("routes[{i}]");
            if !names.insert(name.clone()) {
                let span = rr.name.as_ref().map_or(r.span(), |n| n.span());
                self.error_at(
                    span,
                    &format!("{key}.name"),
                    format!("route name {name:?} is used twice"),
                );
                ok = false;
            }
            // An empty list matches nothing: a route that never fires, with
            // no word of it. Leaving the key out is what means "all".
            for (field, list) in [("sources", &rr.sources), ("events", &rr.events)] {
                if list.as_ref().is_some_and(Vec::is_empty) {
                    self.error_at(
                        r.span(),
                        &format!("{key}.{field}"),
                        format!("is empty, so the route never matches; leave {field} out to match all"),
                    );
                    ok = false;
                }
            }
            let mut route_sources = None;
            if let Some(list) = &rr.sources {
                let mut names = Vec::new();
                for (j, s) in list.iter().enumerate() {
                    if sources.contains(s.get_ref()) {
                        names.push(s.get_ref().clone());
                    } else {
                        let known = sources.iter().cloned().collect::<Vec<_>>().join(", ");
                        self.error_at(
                            s.span(),
                            &format!("{key}.sources[{j}]"),
                            format!("no source named {:?} (configured: {known})", s.get_ref()),
                        );
                        ok = false;
                    }
                }
                route_sources = Some(names);
            }
            let mut events = None;
            if let Some(list) = &rr.events {
                let mut globs = Vec::new();
                for (j, e) in list.iter().enumerate() {
                    match Glob::new(e.get_ref()) {
                        Ok(g) => globs.push(g),
                        Err(msg) => {
                            self.error_at(e.span(), &format!("{key}.events[{j}]"), msg);
                            ok = false;
                        }
                    }
                }
                events = Some(globs);
            }
            let when = match &rr.when {
                Some(w) => match set.expression(&format!("{key}.when"), w.get_ref()) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.error_at(
                            w.span(),
                            &format!("{key}.when"),
                            format!("invalid expression: {}", e.message),
                        );
                        ok = false;
                        None
                    }
                },
                None => None,
            };
            if rr.sinks.get_ref().is_empty() {
                self.error_at(rr.sinks.span(), &format!("{key}.sinks"), "names no sink");
                ok = false;
            }
            let mut route_sinks = Vec::new();
            for (j, s) in rr.sinks.get_ref().iter().enumerate() {
                if sinks.contains(s.get_ref()) {
                    route_sinks.push(s.get_ref().clone());
                } else {
                    let known = sinks.iter().cloned().collect::<Vec<_>>().join(", ");
                    self.error_at(
                        s.span(),
                        &format!("{key}.sinks[{j}]"),
                        format!("no sink named {:?} (configured: {known})", s.get_ref()),
                    );
                    ok = false;
                }
            }
            routes.push(Route {
                name,
                sources: route_sources,
                events,
                when,
                sinks: route_sinks,
            });
        }
        ok.then(|| Router::new(routes, set.finish()))
    }
}

/// The span of `.a.b[2]` below `value`.
fn find_span(value: &Spanned<DeValue<'_>>, path: &str) -> Option<Range<usize>> {
    if path.is_empty() {
        return Some(value.span());
    }
    if let Some(rest) = path.strip_prefix('[') {
        let (index, rest) = rest.split_once(']')?;
        let DeValue::Array(items) = value.get_ref() else {
            return None;
        };
        return find_span(items.get(index.parse::<usize>().ok()?)?, rest);
    }
    let rest = path.strip_prefix('.')?;
    let end = rest.find(['.', '[']).unwrap_or(rest.len());
    let DeValue::Table(t) = value.get_ref() else {
        return None;
    };
    let (_, child) = t.iter().find(|(k, _)| k.get_ref() == &rest[..end])?;
    find_span(child, &rest[end..])
}

/// Request headers that HTTP or the listener itself uses (lowercase).
const HTTP_OWN_HEADERS: [&str; 11] = [
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// `path` made absolute, with `.` and `..` folded by name (it may not exist
/// yet, so links are not followed): two spellings of one place compare equal.
fn lexical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Replaces `${NAME}` with the variable's value. `$$` is a literal `$`.
#[cfg(test)]
fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    interpolate_with(s, env, false)
}

/// The values of the `${VAR}`s in `s` that are set, read as
/// [`interpolate_with`] reads them.
fn env_values(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let values = std::cell::RefCell::new(Vec::new());
    let _ = interpolate_with(
        s,
        &|name| {
            let value = env(name);
            values.borrow_mut().extend(value.clone());
            value
        },
        false,
    );
    values.into_inner()
}

/// Replaces `${NAME}` with the variable's value; `$$` is a literal `$`. In a
/// string that is compiled as a `template`, a value that holds a character
/// template syntax is made of (`{`, `}`, `%`, `#`; a token may) is quoted in
/// a `raw` block, so it is sent as it is, never run, and never shown in a
/// template error: even a lone `{` at its end would make `{{` with the text
/// after it.
fn interpolate_with(s: &str, env: &dyn Fn(&str) -> Option<String>, template: bool) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').ok_or("unterminated ${...}")?;
            let name = &inner[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("invalid variable name in ${{{name}}}"));
            }
            // The value is never shown: it may be a secret. Empty is as
            // good as unset: a secret left blank in the env file would send
            // `Authorization: Bearer ` and fail every delivery.
            let value = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            if value.is_empty() {
                return Err(format!("environment variable {name} is set but empty"));
            }
            // Where `${` stands in the source: inside a tag, the value is
            // part of an expression (a string literal, most likely), where
            // a raw block cannot go.
            let at = s.len() - rest.len() + i;
            if template && in_tag(s, at) {
                if value.contains(['\'', '"', '\\']) {
                    return Err(format!(
                        "environment variable {name} is used inside {{{{ }}}} or {{% %}} and holds a quote or a backslash, which would end or change the string it is in; use it outside the braces"
                    ));
                }
                out.push_str(&value);
            } else if template && value.contains(['{', '}', '%', '#']) {
                if value.contains("endraw") {
                    return Err(format!(
                        "environment variable {name} holds template syntax and `endraw`, which a template cannot quote"
                    ));
                }
                out.push_str("{% raw %}");
                out.push_str(&value);
                out.push_str("{% endraw %}");
            } else {
                out.push_str(&value);
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether byte `at` of a template's source is inside a tag: `{{ }}`,
/// `{% %}` or `{# #}`.
fn in_tag(source: &str, at: usize) -> bool {
    let mut rest = &source[..at];
    loop {
        let Some(open) = rest.find(['{']) else { return false };
        let after = &rest[open + 1..];
        let close = match after.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            Some('#') => "#}",
            _ => {
                rest = after;
                continue;
            }
        };
        match after[1..].find(close) {
            Some(end) => rest = &after[1 + end + 2..],
            None => return true,
        }
    }
}

/// A parse error's message without the string values it quotes: serde says
/// `invalid type: string "whsec_...", expected a sequence` of a secret
/// written where a list belongs, and that message reaches the terminal and,
/// on a reload, the journal. What the key expected is the useful part.
fn without_literals(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("string \"") {
        let (before, quoted) = rest.split_at(at + "string ".len());
        out.push_str(before.trim_end());
        // Past the closing quote; `\"` inside is escaped (Debug format).
        let mut end = quoted.len();
        let mut escaped = false;
        for (i, c) in quoted.char_indices().skip(1) {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &quoted[end..];
    }
    out.push_str(rest);
    // serde quotes other values in backticks (`integer `12345678``, a
    // numeric secret written without quotes); field names too, which stay.
    for kind in ["integer `", "floating point `", "boolean `", "character `"] {
        while let Some(at) = out.find(kind) {
            let value = at + kind.len();
            let Some(end) = out[value..].find('`') else { break };
            out.replace_range(at + kind.len() - 2..value + end + 1, "");
        }
    }
    out
}

#[cfg(test)]
mod tests;
