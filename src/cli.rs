//! Command line: the daemon (`run`), config validation (`check`) and its
//! own test cases (`test`), a vendor
//! "send test webhook" button (`send`), and the operator commands that talk
//! to a running daemon through its admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::config::{self, AdminConfig, Config, Scheme};

/// `println!` for the commands' output. A reader that stops reading (`|
/// head`) ends the output quietly, as for any Unix tool, where `println!`
/// panics on the closed pipe; the command still ends with its own exit
/// code (`expeditor test | head -1` fails when a case does).
macro_rules! out {
    ($($arg:tt)*) => {
        write_out(format_args!($($arg)*))
    };
}

/// The reader of stdout has gone: nothing more is written.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn write_out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(line).and_then(|()| stdout.write_all(b"\n"));
    drop(stdout);
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => STDOUT_CLOSED.store(true, Ordering::Relaxed),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "expeditor",
    version,
    about = "Receives signed restaurant webhooks, stores them durably and fans them out to sinks"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "config.toml", env = "EXPEDITOR_CONFIG")]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run,
    /// Validate the configuration without starting anything.
    Check,
    /// Run the configuration's own test cases (`[[tests]]`): each event is
    /// read and routed as a webhook would be, and must reach exactly the
    /// sinks the case names.
    Test,
    /// Sign a realistic sample event of a source's vendor and POST it.
    Send {
        /// The source (`[sources.NAME]`) whose kind and secret to use.
        source: String,
        /// The event type, e.g. order.created.
        event_type: String,
        /// Where to post; default: this config's ingest listener.
        #[arg(long)]
        url: Option<String>,
        /// The event id; default: a fresh one.
        #[arg(long)]
        id: Option<String>,
    },
    /// List recent events, or show one (`events show SOURCE:ID`).
    #[command(args_conflicts_with_subcommands = true)]
    Events {
        #[command(subcommand)]
        action: Option<EventsAction>,
        /// Only from this source (`[sources.NAME]`).
        #[arg(long)]
        source: Option<String>,
        /// Only of this event type, exactly (e.g. order.created).
        #[arg(long = "type")]
        event_type: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// List deliveries.
    Deliveries {
        /// Only to this sink (`[sinks.NAME]`).
        #[arg(long)]
        sink: Option<String>,
        /// pending, delivered or dead
        #[arg(long)]
        status: Option<String>,
        /// Only from this source (`[sources.NAME]`).
        #[arg(long)]
        source: Option<String>,
        /// Only of this event type, exactly (e.g. order.created).
        #[arg(long = "type")]
        event_type: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// List dead letters: deliveries that failed for good.
    DeadLetters {
        /// Only to this sink (`[sinks.NAME]`).
        #[arg(long)]
        sink: Option<String>,
        /// Only from this source (`[sources.NAME]`).
        #[arg(long)]
        source: Option<String>,
        /// Only of this event type, exactly (e.g. order.created).
        #[arg(long = "type")]
        event_type: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Deliver again: dead letters (all, or filtered), or one event.
    #[command(group = clap::ArgGroup::new("what").required(true).args(["dead_letters", "event"]))]
    Replay {
        /// Replay dead letters (all, or those matching --sink/--source/--type/--since).
        #[arg(long)]
        dead_letters: bool,
        /// Replay one event, SOURCE:ID.
        #[arg(long)]
        event: Option<String>,
        /// Only to this sink.
        #[arg(long)]
        sink: Option<String>,
        // Dead-letter filters: with --event they would be dropped unsaid
        // (a bool flag is always "present" to `requires`), so they conflict.
        /// Only dead letters of events from this source.
        #[arg(long, requires = "dead_letters", conflicts_with = "event")]
        source: Option<String>,
        /// Only dead letters of this event type, exactly.
        #[arg(long = "type", requires = "dead_letters", conflicts_with = "event")]
        event_type: Option<String>,
        /// Dead-lettered at or after: a duration ago ("2h") or an RFC 3339 time.
        #[arg(long, requires = "dead_letters", conflicts_with = "event")]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsAction {
    /// One event: its payload and every delivery attempt with its error.
    Show {
        /// SOURCE:ID, e.g. crumb:evt_abc123
        event: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// At most this many rows (1 to 10000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub limit: u64,
    /// Only since: a duration ago ("1h", "2d") or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// The next page: the cursor a listing as long as --limit ends with.
    #[arg(long, value_name = "CURSOR")]
    pub before: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn load_config(cli: &Cli) -> Result<Config, ExitCode> {
    config::load(&cli.config).map_err(|errors| say_errors(cli, &errors))
}

/// Prints a config's errors and their count on stderr.
fn say_errors(cli: &Cli, errors: &config::ConfigErrors) -> ExitCode {
    eprintln!("{errors}");
    eprintln!("{}: {} error(s)", cli.config.display(), errors.0.len());
    ExitCode::FAILURE
}

/// Only `[server]` and `[sources]` of the config, for `send`
/// ([`config::load_sources`]).
pub fn load_sources(cli: &Cli) -> Result<config::SendConfig, ExitCode> {
    config::load_sources(&cli.config).map_err(|errors| say_errors(cli, &errors))
}

/// Only `[admin]` of the config, for the commands that talk to a running
/// daemon ([`config::load_admin`]).
pub fn load_admin(cli: &Cli) -> Result<AdminConfig, ExitCode> {
    config::load_admin(&cli.config).map_err(|errors| say_errors(cli, &errors))
}

pub fn check(cli: &Cli) -> ExitCode {
    match load_config(cli) {
        Ok(cfg) => {
            for warning in path_warnings(&cfg).into_iter().chain(route_warnings(&cfg)) {
                eprintln!("warning: {warning}");
            }
            out!(
                "{}: ok ({} sources, {} sinks, {} routes)",
                cli.config.display(),
                cfg.sources.len(),
                cfg.sinks.len(),
                cfg.router.routes().len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// A route's event pattern that matches no event type its sources' vendors
/// send (a typo such as `order.craeted` routes nothing, silently). Warnings,
/// not errors: a vendor may send types its guide does not list yet. A route
/// that takes an `hmac` source, whose types are anyone's, is not judged.
fn route_warnings(cfg: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    for route in cfg.router.routes() {
        let Some(patterns) = &route.events else { continue };
        let kinds: Vec<&str> = cfg
            .sources
            .iter()
            .filter(|(name, _)| route.sources.as_ref().is_none_or(|s| s.contains(name)))
            .map(|(_, source)| source.kind())
            .collect();
        if kinds.is_empty() || kinds.contains(&"hmac") {
            continue;
        }
        let mut types: Vec<&str> = kinds
            .iter()
            .filter_map(|k| crate::sample::event_types(k))
            .flatten()
            .copied()
            .collect();
        types.sort_unstable();
        types.dedup();
        for pattern in patterns {
            if !types.iter().any(|t| pattern.matches(t)) {
                warnings.push(format!(
                    "route {:?}: events {:?} matches no event type its sources send ({}); a typo?",
                    route.name,
                    pattern.as_str(),
                    types.join(", ")
                ));
            }
        }
    }
    warnings
}

/// What the daemon will create or write that it could not, as far as this
/// process can tell: the store's folder and each file sink's file. Warnings,
/// not errors: `check` may run as another user than the daemon (a CI job,
/// root before a deploy), and the daemon creates what is missing.
fn path_warnings(cfg: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if let config::StoreBackend::Sqlite { path } = &cfg.store.backend {
        // The folder, and the database's files if they are there already
        // (say, left by a run as root).
        let files = crate::store::sqlite::FILES.map(|f| path.join(f));
        let why = unusable(path, true).or_else(|| files.iter().find_map(|f| unusable_file(f)));
        if let Some(why) = why {
            warnings.push(format!("[store] path {}: {why}", path.display()));
        }
    }
    for (name, sink) in &cfg.sinks {
        if let config::SinkKind::File(f) = &sink.kind
            && let Some(why) = unusable(&f.path, false)
        {
            warnings.push(format!("[sinks.{name}] path {}: {why}", f.path.display()));
        }
    }
    warnings
}

/// Why an existing file could not be opened to read and write, if so.
fn unusable_file(path: &std::path::Path) -> Option<String> {
    use rustix::fs::{Access, access};
    match access(path, Access::READ_OK | Access::WRITE_OK) {
        Err(rustix::io::Errno::NOENT) | Ok(()) => None,
        Err(e) => Some(format!("this user cannot read and write {} ({e})", path.display())),
    }
}

/// Why `path` (a folder if `folder`, else a file to append to) could not be
/// created or written by this user, if it could not.
fn unusable(path: &std::path::Path, folder: bool) -> Option<String> {
    use rustix::fs::{Access, access};
    match std::fs::metadata(path) {
        Ok(m) if folder && !m.is_dir() => Some("exists and is not a folder".into()),
        Ok(m) if !folder && m.is_dir() => Some("is a folder, not a file".into()),
        Ok(_) if folder => access(path, Access::WRITE_OK | Access::EXEC_OK)
            .err()
            .map(|e| format!("this user cannot write to it ({e})")),
        // A file sink reads its last line at open and makes the file anew
        // after a rotation, so its folder must take new files too.
        Ok(_) => unusable_file(path).or_else(|| {
            let folder = std::path::absolute(path).ok()?.parent()?.to_path_buf();
            access(&folder, Access::WRITE_OK | Access::EXEC_OK).err().map(|e| {
                format!(
                    "this user cannot create files in {} ({e}): the file could not be made anew after a rotation",
                    folder.display()
                )
            })
        }),
        Err(e) if missing(&e) => {
            // Created with its missing parents: the nearest that exists must
            // be a folder this user may create in.
            let path = std::path::absolute(path).ok()?;
            let mut up = path.parent();
            while let Some(dir) = up {
                match std::fs::metadata(dir) {
                    Ok(m) if !m.is_dir() => {
                        return Some(format!("cannot be created: {} is not a folder", dir.display()));
                    }
                    Ok(_) => {
                        return access(dir, Access::WRITE_OK | Access::EXEC_OK)
                            .err()
                            .map(|e| format!("cannot be created: this user cannot write to {} ({e})", dir.display()));
                    }
                    Err(e) if missing(&e) => up = dir.parent(),
                    Err(e) => return Some(format!("cannot be created: {}: {e}", dir.display())),
                }
            }
            None
        }
        Err(e) => Some(format!("cannot be read: {e}")),
    }
}

/// Not there: missing, or under a file (which the walk up then names).
fn missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// `expeditor test`: the config's `[[tests]]`, each event read by its source
/// (signatures aside) and routed as a webhook would be; the routes must
/// choose exactly the sinks the case names, and each chosen sink's
/// templates must render for it. Exit 1 if the config is invalid
/// or any case fails.
pub fn test(cli: &Cli) -> ExitCode {
    let cfg = match load_config(cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cfg.tests.is_empty() {
        out!("{}: no [[tests]] to run", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let mut failed = 0;
    for case in &cfg.tests {
        match run_case(&cfg, case) {
            Ok(()) => out!("ok    {}", case.name),
            Err(why) => {
                failed += 1;
                out!("FAIL  {}: {why}", case.name);
            }
        }
    }
    out!("{} passed, {failed} failed", cfg.tests.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_case(cfg: &Config, case: &config::TestCase) -> Result<(), String> {
    let src = cfg
        .sources
        .get(&case.source)
        .ok_or_else(|| format!("no source named {:?}", case.source))?;
    let body = match &case.event {
        config::TestEvent::Sample(event_type) => {
            let sample = crate::sample::for_source(src, event_type, "evt_config_test", 0)
                .ok_or_else(|| format!("no sample {event_type:?} event for kind {}", src.kind()))?;
            serde_json::to_vec(&sample).map_err(|e| e.to_string())?
        }
        config::TestEvent::File(path) => {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
        }
    };
    let normalized = src
        .normalizer
        .normalize(&body)
        .map_err(|e| format!("the source refuses the event: {e}"))?;
    let event = std::sync::Arc::new(crate::pipeline::event(
        &src.name,
        src.kind(),
        &normalized.id,
        &normalized.event_type,
        normalized.occurred_at.map(|t| t.as_millisecond()),
        crate::store::now_ms(),
        normalized.payload(),
        normalized.views.clone(),
    ));
    let decision = cfg
        .router
        .route(&src.name, &normalized.event_type, || cfg.router.context(&event));
    if let Some((route, error)) = decision.when_errors.first() {
        return Err(format!("route {route:?}: its when failed: {error}"));
    }
    let chose: std::collections::BTreeSet<String> = decision.sinks.into_iter().collect();
    if chose != case.sinks {
        let list = |s: &std::collections::BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
        return Err(format!(
            "{} {:?}: expected sinks [{}], the routes chose [{}]",
            src.name,
            normalized.event_type,
            list(&case.sinks),
            list(&chose)
        ));
    }
    // Each chosen sink's templates, rendered for this event as its delivery
    // would: an error here would be a dead letter.
    for sink in &chose {
        let templates = cfg.sinks.get(sink).and_then(|s| s.kind.templates());
        if let Some(error) = templates.and_then(|t| t.render_all(&event).into_iter().next()) {
            return Err(format!("sink {sink:?} cannot render this event: {}", error.message));
        }
    }
    Ok(())
}

/// The URL to reach a listener from this machine (`0.0.0.0` -> loopback).
fn local_url(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", std::net::SocketAddr::new(ip, addr.port()))
}

/// `through_proxies`: for `send` to another machine. Never for the admin
/// API: it is this machine's (a proxy's loopback is not), and its token
/// must not go to a third party in clear text.
fn client(through_proxies: bool) -> anyhow::Result<reqwest::Client> {
    let builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    let builder = if through_proxies { builder } else { builder.no_proxy() };
    Ok(builder.build()?)
}

pub async fn send(
    cfg: &config::SendConfig,
    source: &str,
    event_type: &str,
    url: Option<String>,
    id: Option<String>,
) -> anyhow::Result<bool> {
    let Some(src) = cfg.sources.get(source) else {
        let known = cfg.sources.keys().cloned().collect::<Vec<_>>().join(", ");
        bail!(
            "no source named {source:?} in {} (configured: {known})",
            cfg.file.display()
        );
    };
    if id.as_deref().is_some_and(|id| id.trim().is_empty()) {
        bail!("--id must not be empty");
    }
    let id = id.unwrap_or_else(|| format!("evt_test_{:016x}", fastrand::u64(..)));
    let Some(payload) = crate::sample::for_source(src, event_type, &id, fastrand::u64(..1000)) else {
        let known = match src.kind() {
            "crumbpos" => crate::sample::CRUMBPOS_EVENTS.join(", "),
            "crave" => crate::sample::CRAVE_EVENTS.join(", "),
            _ => String::from("any"),
        };
        bail!(
            "no sample for {event_type:?} events of kind {}; known: {known}",
            src.kind()
        );
    };
    let body = serde_json::to_vec(&payload)?;
    // A body the source cannot read (`check` refuses fields one inside
    // another, which leave none): said here, not as the daemon's 400.
    if let Err(e) = src.normalizer.normalize(&body) {
        // Only an hmac source places the fields where its config says.
        let hint = match src.kind() {
            "hmac" => "; check its id_field, type_field and time_field",
            _ => "",
        };
        bail!("cannot build a sample event that source {source:?} reads ({e}){hint}");
    }
    let now = crate::store::now_ms() / 1000;
    let url = url.unwrap_or_else(|| format!("{}/webhooks/{source}", local_url(cfg.server.listen)));
    // A proxy's loopback is not this machine's: those go direct.
    let host = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned));
    let loopback = host.is_some_and(|h| {
        let h = h.trim_start_matches('[').trim_end_matches(']');
        h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    });
    let mut req = client(!loopback)?.post(&url).header("content-type", "application/json");
    match &src.scheme {
        Scheme::CrumbPos(v) => {
            let secret = v.secrets.first().context("source has no secret")?;
            req = req.header(
                "Crumb-Signature",
                crate::verify::sign_crumbpos(secret.expose(), now, &body),
            );
        }
        Scheme::Crave(v) => {
            let secret = v.secrets.first().context("source has no secret")?;
            req = req.header("X-Crave-Signature", crate::verify::sign_crave(secret.expose(), &body));
        }
        Scheme::Hmac(v) => {
            let secret = v.secrets.first().context("source has no secret")?;
            for (name, value) in v.sign(secret.expose(), Some(now), &body) {
                req = req.header(name, value);
            }
        }
    }
    let resp = req
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    // The answer on stdout when the event was taken; a refusal on stderr,
    // where a script's error handling (and a terminal's red) looks.
    if status.is_success() {
        out!("HTTP {}", status.as_u16());
        out!("{text}");
    } else {
        eprintln!("error: {url} answered HTTP {}", status.as_u16());
        eprintln!("{text}");
    }
    Ok(status.is_success())
}

/// A client of the running daemon's admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(admin: &AdminConfig) -> anyhow::Result<Self> {
        Ok(Self {
            base: local_url(admin.listen),
            token: admin
                .token
                .as_ref()
                .map(|t| String::from_utf8_lossy(t.expose()).into_owned()),
            http: client(false)?,
        })
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = match req.send().await {
            Ok(resp) => resp,
            // Connected, but no answer in time: the daemon runs and is
            // stuck (a slow store alone gets a 503 within 10 s).
            Err(e) if e.is_timeout() && !e.is_connect() => {
                return Err(
                    anyhow::Error::new(e).context(format!("the admin API at {} did not answer within 30 s", self.base))
                );
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot reach the admin API at {} (is `expeditor run` running?)",
                    self.base
                )));
            }
        };
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .context("the admin API answered with something that is not JSON")?;
        if !status.is_success() {
            let msg = body.get("error").and_then(Value::as_str).unwrap_or("error");
            bail!("admin API: HTTP {}: {msg}", status.as_u16());
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str, query: &[(&str, Option<&str>)]) -> anyhow::Result<Value> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))?;
        for (k, v) in query {
            if let Some(v) = v {
                url.query_pairs_mut().append_pair(k, v);
            }
        }
        self.call(self.http.get(url)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

pub async fn list(cfg: &AdminConfig, command: &Command) -> anyhow::Result<()> {
    let admin = AdminClient::new(cfg)?;
    match command {
        Command::Events {
            action: Some(EventsAction::Show { event, json }),
            ..
        } => {
            let (source, id) = split_event_ref(event)?;
            let path = format!("/api/events/{}/{}", encode_segment(source), encode_segment(id));
            let v = admin.get(&path, &[]).await?;
            if *json {
                out!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_event_detail(&v["event"]);
            }
        }
        Command::Events {
            action: None,
            source,
            event_type,
            list,
        } => {
            let limit = list.limit.to_string();
            let v = admin
                .get(
                    "/api/events",
                    &[
                        ("source", source.as_deref()),
                        ("type", event_type.as_deref()),
                        ("since", list.since.as_deref()),
                        ("before", list.before.as_deref()),
                        ("limit", Some(&limit)),
                    ],
                )
                .await?;
            if list.json {
                out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let rows = v["events"].as_array().cloned().unwrap_or_default();
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|e| {
                    let deliveries = e["deliveries"]
                        .as_array()
                        .map(|ds| {
                            ds.iter()
                                .map(|d| format!("{}:{}", s(&d["sink"]), s(&d["status"])))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    vec![
                        s(&e["received_at"]),
                        s(&e["source"]),
                        s(&e["id"]),
                        s(&e["type"]),
                        // Unrouted, or its deliveries pruned by retention.
                        if deliveries.is_empty() {
                            "(no deliveries)".into()
                        } else {
                            deliveries
                        },
                    ]
                })
                .collect();
            print_table(&["RECEIVED", "SOURCE", "ID", "TYPE", "DELIVERIES"], &table);
            say_if_cut(rows.len(), &v["next"]);
        }
        Command::Deliveries {
            sink,
            status,
            source,
            event_type,
            list,
        } => {
            let limit = list.limit.to_string();
            let v = admin
                .get(
                    "/api/deliveries",
                    &[
                        ("sink", sink.as_deref()),
                        ("status", status.as_deref()),
                        ("source", source.as_deref()),
                        ("type", event_type.as_deref()),
                        ("since", list.since.as_deref()),
                        ("before", list.before.as_deref()),
                        ("limit", Some(&limit)),
                    ],
                )
                .await?;
            print_deliveries(&v, list.json)?;
            if !list.json {
                say_if_cut(v["deliveries"].as_array().map_or(0, Vec::len), &v["next"]);
            }
        }
        Command::DeadLetters {
            sink,
            source,
            event_type,
            list,
        } => {
            let limit = list.limit.to_string();
            let v = admin
                .get(
                    "/api/dead-letters",
                    &[
                        ("sink", sink.as_deref()),
                        ("source", source.as_deref()),
                        ("type", event_type.as_deref()),
                        ("since", list.since.as_deref()),
                        ("before", list.before.as_deref()),
                        ("limit", Some(&limit)),
                    ],
                )
                .await?;
            print_deliveries(&v, list.json)?;
            if !list.json {
                say_if_cut(v["deliveries"].as_array().map_or(0, Vec::len), &v["next"]);
            }
        }
        Command::Replay {
            dead_letters,
            event,
            sink,
            source,
            event_type,
            since,
        } => {
            let body = if *dead_letters {
                serde_json::json!({ "dead_letters": true, "sink": sink, "source": source, "type": event_type, "since": since })
            } else {
                let (source, id) = split_event_ref(event.as_deref().unwrap_or_default())?;
                serde_json::json!({ "event": { "source": source, "id": id }, "sink": sink })
            };
            let v = admin.post("/api/replay", &body).await?;
            match v["replayed"].as_u64() {
                Some(n) => out!("replayed {n} deliveries"),
                None => out!(
                    "replay still running in the daemon (its log says when it is done); `expeditor dead-letters` shows what is left"
                ),
            }
        }
        _ => unreachable!("only listing commands come here"),
    }
    Ok(())
}

fn split_event_ref(event: &str) -> anyhow::Result<(&str, &str)> {
    match event.split_once(':') {
        Some((source, id)) if !source.is_empty() && !id.is_empty() => Ok((source, id)),
        _ => bail!("expected SOURCE:ID, e.g. crumb:evt_abc123, not {event:?}"),
    }
}

/// Percent-encodes a path segment (event ids are the vendor's bytes).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print_event_detail(e: &Value) {
    out!("event     {}:{}", s(&e["source"]), s(&e["id"]));
    out!("type      {} ({})", s(&e["type"]), s(&e["kind"]));
    out!("occurred  {}", s(&e["occurred_at"]));
    out!("received  {}", s(&e["received_at"]));
    out!("");
    // The body as the vendor sent it: parsed and printed again, a number
    // past a float's precision or a `1.10` would read as another value.
    match e["payload"].as_str() {
        Some(p) => out!("{p}"),
        None => out!("(payload pruned by retention)"),
    }
    let deliveries = e["deliveries"].as_array().cloned().unwrap_or_default();
    if deliveries.is_empty() {
        // Retention prunes deliveries on schedules of their own (delivered,
        // dead), before the payload or with it: which it was is not known.
        out!("\nno deliveries: no route took this event, or retention pruned them");
    }
    for d in deliveries {
        out!("");
        out!(
            "delivery to {}: {} after {} attempt(s), key {}",
            s(&d["sink"]),
            s(&d["status"]),
            d["attempts"],
            s(&d["key"])
        );
        if d["status"] == "pending" {
            out!("  next attempt at {}", s(&d["next_attempt_at"]));
        }
        for a in d["attempt_log"].as_array().cloned().unwrap_or_default() {
            let error = a["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
            out!(
                "  #{} {} {}{}",
                a["attempt"],
                s(&a["finished_at"]),
                s(&a["outcome"]),
                error
            );
        }
    }
}

/// A table as long as `--limit` may have more rows behind it: the API
/// then gives the next page's cursor, said on stderr, so the table itself
/// stays clean for a pipe.
fn say_if_cut(shown: usize, next: &Value) {
    if let Some(next) = next.as_str() {
        eprintln!("({shown} shown; there may be more: the next page with --before {next})");
    }
}

fn print_deliveries(v: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        out!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let rows = v["deliveries"].as_array().cloned().unwrap_or_default();
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|d| {
            vec![
                s(&d["updated_at"]),
                s(&d["sink"]),
                format!("{}:{}", s(&d["source"]), s(&d["event_id"])),
                s(&d["event_type"]),
                s(&d["status"]),
                d["attempts"].to_string(),
                s(&d["last_error"]),
            ]
        })
        .collect();
    print_table(
        &["UPDATED", "SINK", "EVENT", "TYPE", "STATUS", "ATTEMPTS", "LAST ERROR"],
        &table,
    );
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        out!("(none)");
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}
