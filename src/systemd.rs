//! systemd integration: `Type=notify` readiness, status lines and the
//! watchdog. Every call is a no-op when not run by systemd (`NOTIFY_SOCKET`
//! unset), so the daemon behaves the same in a terminal.

use std::sync::Arc;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// While alive, asks systemd every few seconds for more time to start
/// (`EXTEND_TIMEOUT_USEC`), saying what it waits for: opening the store can
/// take minutes once, when it upgrades a big store's schema, and a start
/// killed at `TimeoutStartSec` would roll that back and begin again forever.
pub struct Starting {
    /// Dropped with the guard: the thread's wait ends at once.
    _done: std::sync::mpsc::Sender<()>,
}

/// How often a [`Starting`] asks, and for how much more time each time.
const EXTEND_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const EXTEND_BY_USEC: u32 = 30_000_000;

impl Starting {
    pub fn new(what: &'static str) -> Self {
        let (done, waiting) = std::sync::mpsc::channel::<()>();
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            let spawned = std::thread::Builder::new().name("start-timeout".into()).spawn(move || {
                loop {
                    send(&[
                        NotifyState::ExtendTimeoutUsec(EXTEND_BY_USEC),
                        NotifyState::Status(what),
                    ]);
                    // Nothing is ever sent: the wait times out, or ends when the guard goes.
                    if waiting.recv_timeout(EXTEND_EVERY) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                        break;
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the thread that extends systemd's start timeout");
            }
        }
        Self { _done: done }
    }
}

pub fn reloading() {
    let now = sd_notify::NotifyState::monotonic_usec_now().ok();
    match now {
        Some(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the configuration"),
        ]),
        None => send(&[
            NotifyState::Reloading,
            NotifyState::Status("reloading the configuration"),
        ]),
    }
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing work in flight"),
    ]);
}

/// Pings the watchdog at half its interval, but only while the daemon is
/// healthy: its store works (`Store::alive`: the SQLite writer commits; a
/// PostgreSQL server being away is not the process's fault) and every sink
/// worker runs. A wedged process (stuck writer, dead workers) stops pinging
/// and systemd restarts it.
pub async fn watchdog(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = interval / 2;
    tracing::info!(interval = ?interval, "systemd watchdog enabled");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let store_ok = matches!(tokio::time::timeout(every, shared.store.alive()).await, Ok(Ok(())));
        let workers_ok = shared.current.load().engine.running();
        if store_ok && workers_ok {
            send(&[NotifyState::Watchdog]);
        } else {
            tracing::error!(store_ok, workers_ok, "unhealthy: not pinging the systemd watchdog");
        }
    }
}
