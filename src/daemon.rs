//! `expeditor run`: opens the store, binds the listeners, starts the delivery
//! engine, and on SIGTERM/SIGINT stops in order: stop accepting, finish
//! requests in flight, finish attempts in flight, record their outcomes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::deliver::Engine;
use crate::ingest;
use crate::pipeline::Pipeline;
use crate::store::sqlite::SqliteStore;
use crate::store::{Retention, Store, now_ms};

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.store.path)
            .with_context(|| format!("cannot open the store at {}", config.store.path.display()))?,
    );
    let ingest_listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on server.listen = {}", config.server.listen))?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("cannot listen on admin.listen = {}", config.admin.listen))?;

    let shutdown = CancellationToken::new();
    // Sinks share one connection pool; redirects are not followed (a 3xx
    // from a webhook sink is a misconfiguration, not a place to resend to).
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;
    let engine = Engine::start(&config, store.clone(), client, shutdown.clone()).await?;
    let pipeline = Arc::new(Pipeline::new(config.clone(), store.clone(), engine.waker()));
    let admin = Arc::new(Admin {
        config: config.clone(),
        store: store.clone(),
        wake: engine.waker(),
    });

    let ingest_task = tokio::spawn(ingest::serve(ingest_listener, pipeline, shutdown.clone()));
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, shutdown.clone()));
    let prune_task = tokio::spawn(prune_loop(config.clone(), store.clone(), shutdown.clone()));
    tracing::info!(
        ingest = %config.server.listen,
        admin = %config.admin.listen,
        store = %config.store.path.display(),
        sources = config.sources.len(),
        sinks = config.sinks.len(),
        routes = config.router.routes().len(),
        "expeditor ready"
    );

    wait_for_signal().await;
    tracing::info!("stopping: finishing requests and deliveries in flight");
    shutdown.cancel();
    let _ = ingest_task.await;
    let _ = admin_task.await;
    let _ = prune_task.await;
    engine.stopped().await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn prune_loop(config: Arc<Config>, store: Arc<dyn Store>, shutdown: CancellationToken) {
    let retention = Retention {
        dedupe_window: config.store.dedupe_window,
        keep_delivered: config.store.keep_delivered,
        keep_dead_letters: config.store.keep_dead_letters,
    };
    let mut next = Duration::from_secs(10);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shutdown.cancelled() => return,
        }
        next = PRUNE_EVERY;
        // Chunked, so one pass never holds the writer for long; repeat while
        // there is more to do.
        for _ in 0..1000 {
            match store.prune(retention, now_ms()).await {
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
