//! `expeditor run`: opens the store, binds the listeners, starts the delivery
//! engine, and then serves signals:
//!
//! - SIGHUP re-reads the config file. A valid one replaces sources, routes
//!   and sinks atomically (new requests see all of the new config, none see
//!   half); pending deliveries stay in the store and the new sink workers
//!   pick them up. An invalid one is refused, logged, and the old config
//!   keeps running. Listener addresses, their limits and the store change
//!   only at a restart: a reload keeps them and applies the rest.
//! - SIGTERM/SIGINT stop in order, within `server.shutdown_timeout`: stop
//!   accepting, finish requests in flight, finish attempts in flight, record
//!   their outcomes, close the store. Work cut off by the bound is not lost:
//!   unacknowledged requests are retried by the vendor, and unfinished
//!   deliveries run again at the next start.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config};
use crate::deliver::Engine;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::state::{Current, Shared};
use crate::store::{Retention, Store, now_ms};
use crate::{admin, ingest, systemd};

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// A start that failed on what a restart does not mend: a sink that cannot
/// open what its config names (a file sink's file under a read-only or
/// foreign folder, a key file), or a store folder that cannot be made.
/// `run` exits 78 for it, as for a config that does not load, so systemd
/// does not start it again every 2 s to fail the same way.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct NotMendedByRestart(pub anyhow::Error);

/// A failed start as [`NotMendedByRestart`] unless its cause is one a
/// restart may outlast: an I/O error such as a full disk or too many open
/// files. Anything else (a path that cannot exist or be written, a
/// certificate that does not load) is the setup's.
fn setup_or_not(e: anyhow::Error) -> anyhow::Error {
    use std::io::ErrorKind::*;
    let setup = e
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .is_none_or(|io| {
            matches!(
                io.kind(),
                PermissionDenied
                    | ReadOnlyFilesystem
                    | NotADirectory
                    | IsADirectory
                    | AlreadyExists
                    | NotFound
                    | InvalidInput
            )
        });
    if setup { NotMendedByRestart(e).into() } else { e }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers first: from here on SIGTERM means "stop cleanly" and SIGHUP
    // "reload", never the default action (exit), even in the instant after
    // READY=1 when systemd or a script may already send one.
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let config = Arc::new(config);
    // The store's folder first: one that cannot be made or written (read
    // only, another user's, a file in the way) is a setup problem.
    if let crate::config::StoreBackend::Sqlite { path } = &config.store.backend {
        let usable = crate::store::sqlite::create_folder(path).and_then(|()| {
            rustix::fs::access(path, rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK).map_err(Into::into)
        });
        if let Err(e) = usable {
            return Err(setup_or_not(
                anyhow::Error::new(e).context(format!("cannot use the store's folder {}", path.display())),
            ));
        }
    }
    // PostgreSQL: connects now and fails fast when the database is unreachable.
    // A stop signal is heard meanwhile: a schema upgrade, or another
    // instance's migration lock, may take long, and systemd extends the
    // stop timeout as long as the start's.
    let store: Arc<dyn Store> = {
        let _starting = crate::systemd::Starting::new("opening the store");
        tokio::select! {
            opened = crate::store::open(&config.store.backend) => opened?,
            _ = stop_signal(&mut term, &mut int) => {
                tracing::info!("stop signal while the store was opening; stopped");
                return Ok(());
            }
        }
    };
    let ingest_workers = ingest::Workers::start(ingest::Workers::per_cpu()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot start the ingest threads; serving webhooks on the main runtime");
        ingest::Workers::none()
    });
    let ingest_listener = std::net::TcpListener::bind(config.server.listen)
        .and_then(|l| ingest_workers.adopt(l))
        .with_context(|| format!("cannot listen on server.listen = {}", config.server.listen))?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on admin.listen = {}", config.admin.listen))?;

    let shutdown = CancellationToken::new();
    let mut metrics = Metrics::new();
    if let Some(durability) = store.durability() {
        metrics.register_durability(durability);
    }
    let metrics = Arc::new(metrics);
    // The http sinks share one connection pool; redirects are not followed
    // (a 3xx from a webhook sink is a misconfiguration, not a place to
    // resend to).
    let client = expeditor_http::Client::from_env().context("cannot build the HTTP client")?;
    if client.is_proxied() {
        tracing::info!("http sinks send through the proxy the environment names");
    }
    let var = |name: &str| std::env::var_os(name);
    for problem in expeditor_http::proxy_problems(var)
        .into_iter()
        .chain(expeditor_http::tls_problems(var))
    {
        tracing::warn!("{problem}");
    }
    let engine = Engine::start(&config, store.clone(), client.clone(), metrics.clone(), &shutdown, None)
        .await
        .map_err(setup_or_not)?;
    let detached = TaskTracker::new();
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(current(&config, &store, &engine, &metrics, &detached)),
        store: store.clone(),
        metrics: metrics.clone(),
        detached,
        ready_probe: tokio::sync::Mutex::new(None),
    });

    let limits = shared.current.load().pipeline.limits();
    let ingest_task = tokio::spawn(ingest::serve(
        ingest_workers,
        ingest_listener,
        shared.clone(),
        limits,
        shutdown.clone(),
    ));
    let admin_task = tokio::spawn(admin::serve(admin_listener, shared.clone(), shutdown.clone()));
    let prune_task = tokio::spawn(prune_loop(shared.clone(), shutdown.clone()));
    let watchdog_task = tokio::spawn(systemd::watchdog(shared.clone(), shutdown.clone()));
    tracing::info!(
        ingest = %config.server.listen,
        admin = %config.admin.listen,
        store = %config.store.backend,
        sources = config.sources.len(),
        sinks = config.sinks.len(),
        routes = config.router.routes().len(),
        "expeditor ready"
    );
    systemd::ready(&summary(&config));

    let mut engine = engine;
    // Engines a reload replaced, finishing their attempts in flight. Not
    // awaited in the loop: a stop signal must be heard while they finish
    // (up to a sink's timeout), and the stop bound covers them too.
    let retiring = TaskTracker::new();
    loop {
        tokio::select! {
            _ = stop_signal(&mut term, &mut int) => break,
            _ = hup.recv() => {
                systemd::reloading();
                // Loading may take a while (each plugin's `init`, up to its
                // sink's timeout): a stop signal meanwhile abandons it.
                let path = config.file.clone();
                let loading = tokio::task::spawn_blocking(move || config::load(&path));
                let loaded = tokio::select! {
                    loaded = loading => loaded,
                    _ = stop_signal(&mut term, &mut int) => {
                        tracing::info!("reload abandoned: stopping");
                        break;
                    }
                };
                let (running, note) = reload(&config.file, loaded, engine, &shared, &client, &shutdown, &retiring).await;
                engine = running;
                // A refusal stays in `systemctl status` until the next reload.
                let summary = summary(&shared.current.load().config);
                systemd::ready(&note.map_or(summary.clone(), |n| format!("{summary}; {n}")));
            }
        }
    }

    let bound = shared.current.load().config.server.shutdown_timeout;
    let in_flight = engine.in_flight();
    tracing::info!(bound = ?bound, "stopping: finishing requests and deliveries in flight");
    systemd::stopping();
    shutdown.cancel();
    let drained = tokio::time::timeout(bound, async {
        let _ = ingest_task.await;
        let _ = admin_task.await;
        let _ = prune_task.await;
        let _ = watchdog_task.await;
        engine.stopped().await;
        retiring.close();
        retiring.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            bound = ?bound,
            "stop bound reached with work in flight; unacknowledged requests will be retried by the vendors, \
             unfinished deliveries run again at the next start"
        );
        // Their leases given back: on a shared store, another instance (or
        // this one, restarted) takes them at once, not when the lease ends.
        let cut = in_flight.released(crate::store::now_ms());
        if !cut.is_empty() {
            let n = cut.len();
            match tokio::time::timeout(Duration::from_secs(3), store.complete(cut)).await {
                Ok(Ok(())) => tracing::info!(deliveries = n, "gave back the leases of the attempts cut off"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not give back the leases of the attempts cut off"),
                Err(_) => tracing::warn!("could not give back the leases of the attempts cut off in time"),
            }
        }
    }
    // Bounded too: a wedged store must not hold the exit.
    if tokio::time::timeout(Duration::from_secs(5), store.close())
        .await
        .is_err()
    {
        tracing::warn!("store did not close in time");
    }
    tracing::info!("stopped");
    Ok(())
}

fn summary(config: &Config) -> String {
    format!(
        "serving {} sources, {} sinks, {} routes on {}",
        config.sources.len(),
        config.sinks.len(),
        config.router.routes().len(),
        config.server.listen
    )
}

fn current(
    config: &Arc<Config>,
    store: &Arc<dyn Store>,
    engine: &Engine,
    metrics: &Arc<Metrics>,
    detached: &TaskTracker,
) -> Current {
    Current {
        config: config.clone(),
        pipeline: Arc::new(Pipeline::new(
            config.clone(),
            store.clone(),
            engine.handoff(),
            metrics.clone(),
            detached.clone(),
        )),
        handoff: engine.handoff(),
        engine: engine.health(),
    }
}

/// SIGTERM or SIGINT, whichever comes first.
async fn stop_signal(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Applies the config file anew, or keeps the running one. Returns the
/// engine that is running afterwards; one it replaced finishes its attempts
/// in flight on `retiring`. `loaded` is the file as `config::load` read it.
async fn reload(
    file: &Path,
    loaded: Result<Result<Config, config::ConfigErrors>, tokio::task::JoinError>,
    old_engine: Engine,
    shared: &Arc<Shared>,
    client: &expeditor_http::Client,
    shutdown: &CancellationToken,
    retiring: &TaskTracker,
) -> (Engine, Option<String>) {
    let old = shared.current.load_full();
    let refuse = |why: String| {
        tracing::error!(file = %file.display(), "reload refused, the running configuration stays: {why}");
        shared.metrics.reload(false);
        Some(format!("reload refused: {}", why.lines().next().unwrap_or("")))
    };
    let mut new = match loaded {
        Ok(Ok(c)) => c,
        Ok(Err(errors)) => return (old_engine, refuse(errors.to_string())),
        Err(e) => return (old_engine, refuse(format!("loading failed: {e}"))),
    };
    // What is bound or opened at start stays as it is; the rest of the
    // file is applied, and the log says what waits for a restart.
    let restart = keep_fixed(&old.config, &mut new);
    // `check` judged the token against the file's admin.listen; the one
    // that stays bound is what it must guard.
    if let Some(why) = admin_unguarded(&new) {
        return (old_engine, refuse(why));
    }
    if !restart.is_empty() {
        tracing::warn!(
            keys = %restart.join(", "),
            "changed in the file, applied at the next restart; the rest of the configuration is reloaded"
        );
    }
    let new = Arc::new(new);
    let engine = match Engine::start(
        &new,
        shared.store.clone(),
        client.clone(),
        shared.metrics.clone(),
        shutdown,
        Some(&old_engine),
    )
    .await
    {
        Ok(e) => e,
        Err(e) => return (old_engine, refuse(format!("{e:#}"))),
    };
    shared.current.store(Arc::new(current(
        &new,
        &shared.store,
        &engine,
        &shared.metrics,
        &shared.detached,
    )));
    // The old workers finish their attempts in flight and stop, in the
    // background; the new ones claim everything else (the store's leases keep
    // them from doubling up).
    retiring.spawn(old_engine.stopped());
    shared.metrics.reload(true);
    tracing::info!(
        sources = new.sources.len(),
        sinks = new.sinks.len(),
        routes = new.router.routes().len(),
        "configuration reloaded"
    );
    report_orphans(shared, &new).await;
    let note = (!restart.is_empty()).then(|| format!("{} changed: applied at the next restart", restart.join(", ")));
    (engine, note)
}

/// Why a config leaves the admin API open: no token while it listens
/// beyond loopback (the rule `check` applies to the file's own address).
fn admin_unguarded(config: &Config) -> Option<String> {
    let admin = &config.admin;
    (admin.token.is_none() && !admin.listen.ip().is_loopback()).then(|| {
        format!(
            "admin.token is required while admin.listen ({}, kept until a restart) is not a loopback address",
            admin.listen
        )
    })
}

/// Puts the running values of what only a restart can change (listeners,
/// their limits, the store) back into a reloaded config, and names the keys
/// whose values differed.
fn keep_fixed(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if new.$($field).+ != running.$($field).+ {
                changed.push($key);
                new.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!("server.listen", server.listen);
    keep!("server.max_body", server.max_body);
    keep!("server.header_timeout", server.header_timeout);
    keep!("server.body_timeout", server.body_timeout);
    keep!("server.max_connections", server.max_connections);
    keep!("admin.listen", admin.listen);
    keep!("store.path/store.url", store.backend);
    changed
}

/// Pending deliveries of sinks the config no longer has are kept, and said.
async fn report_orphans(shared: &Shared, config: &Config) {
    let Ok(queues) = shared.store.queue_stats().await else {
        return;
    };
    for q in queues
        .iter()
        .filter(|q| q.pending > 0 && !config.sinks.contains_key(&q.sink))
    {
        tracing::warn!(
            sink = %q.sink,
            pending = q.pending,
            "sink is no longer configured; its pending deliveries are kept and resume if it comes back"
        );
    }
}

async fn prune_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut next = Duration::from_secs(10);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shutdown.cancelled() => return,
        }
        next = PRUNE_EVERY;
        let store = &shared.current.load().config.store;
        let retention = Retention {
            dedupe_window: store.dedupe_window,
            keep_delivered: store.keep_delivered,
            keep_dead_letters: store.keep_dead_letters,
        };
        // Chunked, so one pass never holds the writer for long; repeat while
        // there is more to do.
        for _ in 0..1000 {
            match shared.store.prune(retention, now_ms()).await {
                Ok(stats) if stats == Default::default() => break,
                Ok(stats) => tracing::info!(?stats, "pruned"),
                Err(e) => {
                    tracing::warn!(error = %e, "pruning failed");
                    break;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(admin: &str) -> Config {
        let text = format!(
            "[admin]\n{admin}\n[store]\npath = \"data\"\n[sources.crumb]\nkind = \"crumbpos\"\nsecrets = [\"s\"]\n"
        );
        config::parse(Path::new("config.toml"), &text, &|_| None).expect("a valid config")
    }

    /// A reload that moves admin.listen to loopback and drops the token in
    /// the same edit keeps the old address, so it must keep a token too.
    #[test]
    fn a_reload_cannot_leave_the_kept_admin_address_without_a_token() {
        let running = parse("listen = \"0.0.0.0:9090\"\ntoken = \"t0ken\"");
        let mut new = parse("listen = \"127.0.0.1:9090\"");
        assert!(admin_unguarded(&new).is_none(), "the file alone is valid");
        assert_eq!(keep_fixed(&running, &mut new), ["admin.listen"]);
        let why = admin_unguarded(&new).expect("refused");
        assert!(why.contains("0.0.0.0:9090"), "{why}");

        let mut with_token = parse("listen = \"127.0.0.1:9090\"\ntoken = \"t0ken\"");
        keep_fixed(&running, &mut with_token);
        assert!(admin_unguarded(&with_token).is_none());
    }
}
