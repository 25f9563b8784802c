//! The webhook listener: `POST /webhooks/{source}`.
//!
//! Each request goes through limits (size, time, content type), the source's
//! verifier on the raw bytes, normalization, routing, and one durable insert
//! of the event with its deliveries; only then is it acknowledged. Error
//! bodies are short fixed phrases: no internals, secrets or payload.
//!
//! Connections are accepted and served on a runtime of their own
//! ([`Workers`]), apart from the main runtime's delivery and admin API.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::RequestOutcome;
use crate::pipeline::{Accepted, Rejected};
use crate::state::Shared;

pub type Body = Full<Bytes>;

/// Serves the ingest listener on `workers` until `shutdown`, then lets
/// in-flight requests finish (each is bounded by the read timeouts and one
/// store commit), and stops `workers`. `listener` must be theirs
/// ([`Workers::adopt`]). `limits` are fixed for the listener's life
/// (changing them needs a restart).
pub async fn serve(
    workers: Workers,
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    workers.run(accept(listener, shared.clone(), limits, shutdown)).await;
    // Hand-offs of held deliveries run there too, and one can outlive its
    // request (the client hung up): they finish before the runtime stops.
    shared.detached.close();
    shared.detached.wait().await;
    workers.stop().await;
}

/// Accepts connections and serves each on a task of its own, on the
/// runtime it runs on.
async fn accept(listener: TcpListener, shared: Arc<Shared>, limits: Limits, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let stops = Stops::default();
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        // A client that stops taking our answers (its window full) would
        // park the connection with no timer running: hyper reads no next
        // request and bounds no write, so the connection, its permit and a
        // graceful stop would wait for ever. A write stalled this long ends it.
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.header_timeout));
        let stream = Box::pin(stream);
        let shared = shared.clone();
        let stop = stops.open();
        tracker.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared, limits, peer).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { let _ = r; }
                () = stop.requested() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    stops.stop_all();
    tracker.close();
    tracker.wait().await;
}

/// The open connections' stop signals. A connection's task polls its
/// signal at every wake-up (several per request), so that is a flag and a
/// waker slot of its own, lock-free: a `CancellationToken` per connection
/// took its mutex, and its `Notify`'s, at each poll (1 % of expeditor's
/// CPU flat out, BENCHMARKS.md, session 37). The registry's lock is taken
/// only as a connection opens and closes, and once to stop them all.
#[derive(Default, Clone)]
struct Stops {
    open: Arc<std::sync::Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    next: u64,
    signals: std::collections::HashMap<u64, Arc<StopSignal>>,
    /// Set by `stop_all`: a connection opened after it is told at once.
    stopping: bool,
}

#[derive(Default)]
struct StopSignal {
    requested: std::sync::atomic::AtomicBool,
    waker: atomic_waker::AtomicWaker,
}

impl StopSignal {
    fn request(&self) {
        self.requested.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }
}

/// One connection's stop signal; dropping it (the connection is done)
/// takes it out of the registry.
struct Stop {
    id: u64,
    signal: Arc<StopSignal>,
    stops: Stops,
}

impl Stops {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> Stop {
        let signal = Arc::new(StopSignal::default());
        let mut registry = self.lock();
        let id = registry.next;
        registry.next += 1;
        if registry.stopping {
            signal.request();
        } else {
            registry.signals.insert(id, signal.clone());
        }
        drop(registry);
        Stop {
            id,
            signal,
            stops: self.clone(),
        }
    }

    /// Asks every open connection to finish its request in flight and close.
    fn stop_all(&self) {
        let signals: Vec<Arc<StopSignal>> = {
            let mut registry = self.lock();
            registry.stopping = true;
            registry.signals.values().cloned().collect()
        };
        // Woken outside the lock: a connection that closes meanwhile takes it.
        for signal in signals {
            signal.request();
        }
    }
}

impl Stop {
    /// Ready once a stop was requested.
    fn requested(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            // Registered before the flag is read: a request made in between
            // wakes this waker, so it is never missed.
            self.signal.waker.register(cx.waker());
            match self.signal.requested.load(std::sync::atomic::Ordering::Acquire) {
                true => std::task::Poll::Ready(()),
                false => std::task::Poll::Pending,
            }
        })
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        self.stops.lock().signals.remove(&self.id);
    }
}

/// The runtime that accepts and serves webhook connections, a worker per
/// CPU, apart from the main runtime's (delivery, the admin API): a burst of
/// webhooks and a backlog of deliveries no longer queue behind each other
/// on the same workers. On the 2-core bench VM
/// (BENCHMARKS.md, session 27), against one shared runtime, alternating:
/// e2e sustained +16 – 18 %, fan-out sustained +12 – 31 %, flat-out ingest
/// even. Work stealing stays: single-threaded runtimes, one per CPU with
/// each connection fixed to one, did no better, and a thread held up would
/// hold up every connection on it.
pub struct Workers {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Workers {
    /// A worker per CPU this process may use (its cgroup's quota included).
    pub fn per_cpu() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// No runtime of their own: connections are served on the runtime that
    /// calls [`Workers::run`].
    pub fn none() -> Self {
        Workers { runtime: None }
    }

    /// Starts `n` worker threads, named `ingest`.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .thread_name("ingest")
            .enable_all()
            .build()?;
        Ok(Workers { runtime: Some(runtime) })
    }

    /// `listener` on the workers' reactor, so that what it accepts is served there.
    pub fn adopt(&self, listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
        listener.set_nonblocking(true)?;
        let _entered = self.runtime.as_ref().map(|r| r.enter());
        TcpListener::from_std(listener)
    }

    /// Runs `task` on the workers (and, from there, whatever it spawns) until
    /// it ends.
    pub async fn run<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.runtime {
            Some(runtime) => drop(runtime.spawn(task).await),
            None => task.await,
        }
    }

    /// Stops the runtime and waits (a second at most) for its threads to
    /// end; any task still there is dropped.
    pub async fn stop(mut self) {
        if let Some(runtime) = self.runtime.take() {
            let _ = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(1))).await;
        }
    }
}

impl Drop for Workers {
    /// Dropped without `stop` (the listener's task was): a runtime cannot be
    /// dropped, which blocks, on an async worker.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
}

async fn handle(req: Request<Incoming>, shared: &Shared, limits: Limits, peer: SocketAddr) -> Response<Body> {
    let started = std::time::Instant::now();
    let metrics = &shared.metrics;
    let Some(source_name) = req.uri().path().strip_prefix("/webhooks/") else {
        metrics.request("", RequestOutcome::not_found);
        return error(StatusCode::NOT_FOUND, "not found");
    };
    if req.method() != Method::POST {
        metrics.request("", RequestOutcome::method_not_allowed);
        let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    // One snapshot for the whole request: a reload cannot split it.
    let current = shared.current.load_full();
    let pipeline = &current.pipeline;
    let Some(intake) = pipeline.source(source_name) else {
        // The name is the client's, not ours: it is not a metric label.
        metrics.request("", RequestOutcome::unknown_source);
        return error(StatusCode::NOT_FOUND, "unknown source");
    };
    let source = &intake.source;
    let outcome = |o| intake.metrics.request(o);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        outcome(RequestOutcome::too_large);
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    // Every one given: a second, non-JSON type would make the body mean
    // something else to whoever reads it that way.
    if !req
        .headers()
        .get_all(header::CONTENT_TYPE)
        .iter()
        .all(is_json_content_type)
    {
        outcome(RequestOutcome::unsupported_media_type);
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type must be application/json",
        );
    }
    // The signature is over the bytes as sent; a compressed body would
    // fail it or read as junk, and one merely labelled so would be stored
    // as if it were. RFC 9110 answers an unsupported coding with 415 and
    // says which coding is taken.
    let identity = |v: &HeaderValue| {
        v.to_str().is_ok_and(|c| {
            c.split(',')
                .all(|c| c.trim().is_empty() || c.trim().eq_ignore_ascii_case("identity"))
        })
    };
    if !req.headers().get_all(header::CONTENT_ENCODING).iter().all(identity) {
        outcome(RequestOutcome::unsupported_media_type);
        let mut resp = error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content encoding not supported: send the body uncompressed",
        );
        resp.headers_mut()
            .insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        return resp;
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(limits.body_timeout, Limited::new(body, limits.max_body).collect()).await {
        Err(_) => {
            outcome(RequestOutcome::timeout);
            return error(StatusCode::REQUEST_TIMEOUT, "body not received in time");
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            outcome(RequestOutcome::too_large);
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Ok(Err(_)) => {
            outcome(RequestOutcome::invalid);
            return error(StatusCode::BAD_REQUEST, "body could not be read");
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    match pipeline.accept(intake, &parts.headers, body).await {
        Ok(accepted) => {
            let (status, id, o) = match accepted {
                Accepted::New(id) => ("accepted", id, RequestOutcome::accepted),
                Accepted::Duplicate(id) => ("duplicate", id, RequestOutcome::duplicate),
            };
            outcome(o);
            intake.metrics.ack(started.elapsed());
            self::accepted(status, &id)
        }
        // Anyone who reaches the port can set off the first, and a vendor's
        // retries the last while the disk refuses writes: a line a second
        // per source and kind, counting the ones held back (the metrics
        // count all). A refused event between is named once per id: the
        // line says which event to resend from the vendor's dashboard once
        // the cause is fixed, which a line held back would lose.
        Err(Rejected::Verification(reason)) => {
            outcome(RequestOutcome::unauthorized);
            intake.metrics.verification_failure(reason.reason());
            if let Some(held_back) = intake.rejections.verification.pass_now() {
                tracing::warn!(source = %source.name, %peer, reason = reason.reason(), held_back, "webhook rejected: signature verification failed");
            }
            error(StatusCode::UNAUTHORIZED, "signature verification failed")
        }
        Err(Rejected::Invalid { error: e, body }) => {
            outcome(RequestOutcome::invalid);
            // Signed by the vendor, so worth naming: the vendor retries it
            // and then gives up, and this line is what says which one it was.
            match source.normalizer.event_id_of(&body) {
                Some(event_id) => {
                    if intake.rejections.invalid_ids.first(&event_id) {
                        tracing::warn!(source = %source.name, %event_id, %peer, error = %e, "webhook rejected: invalid event");
                    }
                }
                None => {
                    if let Some(held_back) = intake.rejections.invalid.pass_now() {
                        tracing::warn!(source = %source.name, %peer, error = %e, held_back, "webhook rejected: invalid event");
                    }
                }
            }
            error(StatusCode::BAD_REQUEST, &e.to_string())
        }
        Err(Rejected::Store(e)) => {
            outcome(RequestOutcome::unavailable);
            if let Some(held_back) = intake.rejections.unavailable.pass_now() {
                tracing::error!(source = %source.name, error = %e, held_back, "webhook not acknowledged: store unavailable");
            }
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable, retry later");
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            resp
        }
    }
}

/// `application/json`, `application/<anything>+json`, with parameters, in
/// any case (compared in place: this runs for every webhook).
fn is_json_content_type(value: &HeaderValue) -> bool {
    let Ok(v) = value.to_str() else { return false };
    let essence = v.split(';').next().unwrap_or("").trim().as_bytes();
    let starts = |prefix: &str| {
        essence
            .get(..prefix.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(prefix.as_bytes()))
    };
    let ends = |suffix: &str| {
        (essence.len() >= suffix.len())
            && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    essence.eq_ignore_ascii_case(b"application/json") || (starts("application/") && ends("+json"))
}

fn accepted(status: &str, id: &str) -> Response<Body> {
    #[derive(serde::Serialize)]
    struct Ack<'a> {
        status: &'a str,
        id: &'a str,
    }
    let body = serde_json::to_string(&Ack { status, id }).unwrap_or_default();
    json_response(StatusCode::OK, body)
}

pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, serde_json::json!({ "error": message }).to_string())
}

pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|n| n.trim() == "ingest")
            .count()
    }

    /// Connections run on the ingest runtime's own threads, timers work
    /// there, and `stop` (or a drop) ends those threads. (The only test that
    /// starts any: it counts them.)
    #[tokio::test]
    async fn workers_serve_on_their_own_threads_until_stopped() {
        let workers = Workers::start(2).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        workers
            .run(async move {
                // Spawned from a task that runs there, as connections are.
                for i in 0..8 {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        tx.send((i, std::thread::current().name().map(str::to_string))).unwrap();
                    });
                }
            })
            .await;
        let mut ran = Vec::new();
        while let Some(r) = rx.recv().await {
            ran.push(r);
        }
        ran.sort();
        assert_eq!(
            ran.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        assert!(ran.iter().all(|(_, name)| name.as_deref() == Some("ingest")), "{ran:?}");
        // A thread names itself once it runs, and its entry goes a moment
        // after it has been joined: the count is read until it settles.
        let settles_at = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while ingest_threads() != n && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            ingest_threads() == n
        };
        assert!(settles_at(2), "a worker per thread asked for");

        // An adopted listener accepts there, and what it accepts is served there.
        let listener = workers
            .adopt(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(tokio::net::TcpStream::connect(addr));
        let (tx, rx) = tokio::sync::oneshot::channel();
        workers
            .run(async move {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let _ = tx.send((
                        stream.peer_addr().ok(),
                        std::thread::current().name().map(str::to_string),
                    ));
                });
            })
            .await;
        let peer = client.await.unwrap().unwrap().local_addr().unwrap();
        assert_eq!(rx.await.unwrap(), (Some(peer), Some("ingest".to_string())));

        workers.stop().await;
        assert!(settles_at(0), "the ingest threads have ended");

        // Dropped on an async worker without `stop` (its task was): no
        // panic, and the threads end all the same, a task still there or not.
        let workers = Workers::start(1).unwrap();
        let (running, started) = tokio::sync::oneshot::channel();
        workers
            .run(async move {
                tokio::spawn(async move {
                    let _ = running.send(());
                    std::future::pending::<()>().await
                });
            })
            .await;
        started.await.unwrap();
        assert!(settles_at(1));
        drop(workers);
        assert!(settles_at(0), "the ingest threads have ended after a drop");
    }

    /// A connection waiting on its stop signal is woken by `stop_all`; one
    /// opened after it is stopped at once; a closed one leaves the registry.
    #[tokio::test]
    async fn stop_signals_reach_every_open_connection() {
        let stops = Stops::default();
        let (first, second) = (stops.open(), stops.open());
        let closed = stops.open();
        drop(closed);
        assert_eq!(stops.lock().signals.len(), 2, "a closed connection is forgotten");
        let waiting = tokio::spawn(async move {
            tokio::join!(first.requested(), second.requested());
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "nothing asked them to stop yet");
        stops.stop_all();
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("both woken")
            .unwrap();
        let late = stops.open();
        tokio::time::timeout(Duration::from_millis(100), late.requested())
            .await
            .expect("a connection opened while stopping is stopped at once");
        drop(late);
        assert!(stops.lock().signals.is_empty());

        // A connection's task dropped before it ends (its runtime stopping)
        // leaves the registry too.
        let stops = Stops::default();
        let stop = stops.open();
        let task = tokio::spawn(async move { stop.requested().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(stops.lock().signals.len(), 1);
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(stops.lock().signals.is_empty(), "an aborted connection is forgotten");
    }

    /// Without a runtime of their own, tasks run on the caller's.
    #[tokio::test]
    async fn no_workers_serve_on_the_calling_runtime() {
        let workers = Workers::none();
        let (tx, rx) = tokio::sync::oneshot::channel();
        workers
            .run(async move {
                tx.send(std::thread::current().name().map(str::to_string)).unwrap();
            })
            .await;
        assert_ne!(rx.await.unwrap().as_deref(), Some("ingest"));
        workers.stop().await;
    }

    #[test]
    fn json_content_types() {
        let ok = |s: &'static str| is_json_content_type(&HeaderValue::from_static(s));
        assert!(ok("application/json"));
        assert!(ok("application/json; charset=utf-8"));
        assert!(ok("Application/JSON"));
        assert!(ok("application/vnd.crumb+json"));
        assert!(!ok("text/html"));
        assert!(!ok("application/x-www-form-urlencoded"));
        assert!(!ok("text/json+html"));
    }
}
