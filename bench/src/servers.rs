//! The servers of the bench: the baseline (a bare hyper server that reads
//! the body and answers 200, run as a separate process like expeditor), the
//! durable baseline (the same, but it answers only once the body is on disk),
//! and the sink server (in this process) that expeditor's `http` sinks
//! deliver to and that records when each event arrived.

use std::convert::Infallible;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::load::{index_of, now_ns};
use crate::proc::{self, ProcStats};

/// Accepts connections until the task is aborted; dropping the `JoinSet`
/// aborts the connections too.
async fn serve<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}

// ---------------------------------------------------------------------------
// Baseline

/// The hidden `baseline-server` subcommand: binds 127.0.0.1:0, prints the
/// address on stdout, serves until killed. With a journal directory it is the
/// durable baseline: each body is on disk before its 200.
pub fn baseline_main(journal_dir: Option<&Path>, sync_interval: Duration) -> ExitCode {
    let journal = match journal_dir.map(|dir| Journal::start(dir, sync_interval)).transpose() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("baseline-server: cannot prepare the journal: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The same runtime expeditor uses: multi-threaded, one worker per core.
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baseline-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("baseline-server: cannot bind: {e}");
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => println!("{addr}"),
            Err(_) => return ExitCode::FAILURE,
        }
        let served = async move {
            match journal {
                None => serve(listener, |req| baseline_handle(req, None)).await,
                Some(j) => serve(listener, move |req| baseline_handle(req, Some(j.clone()))).await,
            }
        };
        tokio::select! {
            _ = served => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated() => {}
        }
        ExitCode::SUCCESS
    })
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

async fn baseline_handle(req: Request<Incoming>, journal: Option<Arc<Journal>>) -> Response<Full<Bytes>> {
    // Reads the whole body, like any receiver must before it can verify.
    let status = match (req.into_body().collect().await, journal) {
        (Err(_), _) => StatusCode::BAD_REQUEST,
        (Ok(_), None) => StatusCode::OK,
        (Ok(body), Some(journal)) => match journal.append(&body.to_bytes()).await {
            true => StatusCode::OK,
            false => StatusCode::INTERNAL_SERVER_ERROR,
        },
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(br#"{"status":"accepted"}"#)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

/// The durable baseline's store: the least a receiver can do and still mean
/// "on disk" by its 200. Each body (length-prefixed) goes into one group; a
/// syncer thread writes the group into a preallocated file, wrapping around,
/// and fdatasyncs it once for all of the group; whatever arrives meanwhile
/// forms the next group. No parsing, no index, no database: the floor of
/// what this disk allows a durable ack.
struct Journal {
    pending: Mutex<Group>,
    arrived: Condvar,
    /// The least time from one fsync's start to the next's.
    interval: Duration,
}

#[derive(Default)]
struct Group {
    bytes: Vec<u8>,
    /// Told whether the group reached the disk.
    waiters: Vec<oneshot::Sender<bool>>,
}

/// Preallocated and written once, so a group's fdatasync never has to
/// change the file's size or allocate blocks (as a reused SQLite WAL).
const JOURNAL_BYTES: u64 = 16 << 20;

impl Journal {
    fn start(dir: &Path, interval: Duration) -> std::io::Result<Arc<Self>> {
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("journal"))?;
        let zeros = vec![0u8; 1 << 20];
        for i in 0..JOURNAL_BYTES / zeros.len() as u64 {
            file.write_all_at(&zeros, i * zeros.len() as u64)?;
        }
        file.sync_all()?;
        let journal = Arc::new(Self {
            pending: Mutex::new(Group::default()),
            arrived: Condvar::new(),
            interval,
        });
        let j = journal.clone();
        std::thread::Builder::new()
            .name("journal-sync".into())
            .spawn(move || j.sync_loop(file))?;
        Ok(journal)
    }

    /// Resolves once `body` is on disk (true) or could not be put there.
    async fn append(&self, body: &[u8]) -> bool {
        let (tx, rx) = oneshot::channel();
        {
            let mut group = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            group.bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
            group.bytes.extend_from_slice(body);
            group.waiters.push(tx);
        }
        self.arrived.notify_one();
        rx.await.unwrap_or(false)
    }

    fn sync_loop(&self, file: File) {
        let mut at = 0u64;
        let mut started = std::time::Instant::now();
        loop {
            if let Some(rest) = self.interval.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
            let group = {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                while pending.waiters.is_empty() {
                    pending = self.arrived.wait(pending).unwrap_or_else(PoisonError::into_inner);
                }
                std::mem::take(&mut *pending)
            };
            started = std::time::Instant::now();
            let mut write = || -> std::io::Result<()> {
                let mut rest = &group.bytes[..];
                while !rest.is_empty() {
                    let n = rest.len().min((JOURNAL_BYTES - at) as usize);
                    file.write_all_at(&rest[..n], at)?;
                    rest = &rest[n..];
                    at = (at + n as u64) % JOURNAL_BYTES;
                }
                file.sync_data()
            };
            let ok = write().is_ok();
            for w in group.waiters {
                let _ = w.send(ok);
            }
        }
    }
}

/// The baseline server, running as a child process (re-executed bench binary).
pub struct Baseline {
    /// `None` once stopped; dropping a running baseline kills it.
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The durable baseline's journal, removed when this is dropped.
    _journal: Option<tempfile::TempDir>,
}

impl Baseline {
    /// `durable`: the durable baseline, its journal in a temp dir inside
    /// `parent` (the system's temp dir if `None`), where expeditor's store
    /// would go.
    /// `sync_interval`: the least time between its fsyncs' starts.
    pub fn start(durable: bool, parent: Option<&Path>, sync_interval: Duration) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the bench binary to re-run")?;
        let journal = durable
            .then(|| {
                let mut builder = tempfile::Builder::new();
                builder.prefix("expeditor-bench-journal-");
                match parent {
                    Some(p) => builder.tempdir_in(p),
                    None => builder.tempdir(),
                }
            })
            .transpose()
            .context("cannot create the durable baseline's directory")?;
        let mut command = Command::new(exe);
        command.arg("baseline-server");
        if let Some(j) = &journal {
            command.arg("--journal").arg(j.path());
            command
                .arg("--sync-interval")
                .arg(humantime::format_duration(sync_interval).to_string());
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the baseline server")?;
        let stdout = child.stdout.take().context("baseline stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("cannot read the baseline server's address")?;
        let addr = match line.trim().parse() {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the baseline server did not print its address (got {line:?})");
            }
        };
        Ok(Self {
            child: Some(child),
            addr,
            _journal: journal,
        })
    }

    pub fn stats(&self) -> Option<ProcStats> {
        ProcStats::read(self.child.as_ref()?.id())
    }

    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = proc::terminate(&child);
            let _ = proc::wait_for(&mut child, Duration::from_secs(5)).await;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Sink server

/// What one sink (one path) received.
pub struct Receipts {
    /// Per corpus index: first receipt (ns, [`now_ns`], +1 so 0 means none).
    first_ns: Vec<AtomicU64>,
    duplicates: AtomicU64,
}

impl Receipts {
    pub fn first(&self, i: usize) -> Option<u64> {
        match self.first_ns.get(i)?.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t - 1),
        }
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

pub struct SinkState {
    pub sinks: Vec<Receipts>,
    /// Requests to an unknown path or with an id not from the corpus.
    pub unknown: AtomicU64,
}

/// The local sink: `POST /s1` .. `/sK`, a body `{"id": "<event id>"}`.
///
/// It runs on a thread and runtime of its own, as a sink is a service of its
/// own: its answers do not wait behind the load generator's tasks. (On the
/// bench's runtime, the sustained delivery rates came out the same within
/// the noise, session 13; the separation keeps it that way.)
pub struct SinkServer {
    pub addr: SocketAddr,
    pub state: Arc<SinkState>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl SinkServer {
    pub async fn start(sinks: usize, corpus_len: usize) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SinkState {
            sinks: (0..sinks)
                .map(|_| Receipts {
                    first_ns: (0..corpus_len).map(|_| AtomicU64::new(0)).collect(),
                    duplicates: AtomicU64::new(0),
                })
                .collect(),
            unknown: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        std::thread::Builder::new().name("sink-server".into()).spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    _ = serve(listener, move |req| sink_handle(s.clone(), req)) => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime here closes every connection.
        })?;
        Ok(Self { addr, state, stop })
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

async fn sink_handle(state: Arc<SinkState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let sink = req
        .uri()
        .path()
        .strip_prefix("/s")
        .and_then(|k| k.parse::<usize>().ok())
        .and_then(|k| k.checked_sub(1))
        .filter(|k| *k < state.sinks.len());
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let index = body
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("id")?.as_str().and_then(index_of));
    let at = now_ns();
    match (sink, index) {
        (Some(k), Some(i)) if i < state.sinks[k].first_ns.len() => {
            let r = &state.sinks[k];
            if r.first_ns[i]
                .compare_exchange(0, at + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                r.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {
            state.unknown.fetch_add(1, Ordering::Relaxed);
        }
    }
    Response::new(Full::new(Bytes::new()))
}
