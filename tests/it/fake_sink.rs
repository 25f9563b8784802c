//! A fake downstream HTTP server: records every request, answers from a script.
//!
//! ```ignore
//! let sink = FakeSink::start().await;          // answers 200
//! sink.script(&[503, 503], 200);               // then 503, 503, then 200 forever
//! sink.script_answers(&[Answer::status(429).retry_after("1")], Answer::status(200));
//! let got = sink.wait_for(3, SECS_10).await;   // polls until 3 requests arrived
//! ```
//! `FakeSink::down()` reserves a port without listening on it (the daemon gets
//! "connection refused"); `up()` later starts listening on that same port.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// One request as the sink saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the request arrived.
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn idempotency_key(&self) -> String {
        self.header("idempotency-key")
            .unwrap_or_else(|| panic!("request without Idempotency-Key: {self:?}"))
            .to_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "sink got a non-JSON body ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `event.id` of the default body (the whole event JSON).
    pub fn event_id(&self) -> String {
        let body = self.json();
        body["event"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no event.id in sink body: {body}"))
            .to_owned()
    }
}

/// How the sink answers one request.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    status: u16,
    delay: Duration,
    retry_after: Option<&'static str>,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            delay: Duration::ZERO,
            retry_after: None,
        }
    }

    /// Answer only after `delay` (to make the daemon's request time out).
    pub fn after(self, delay: Duration) -> Answer {
        Answer { delay, ..self }
    }

    /// With a `Retry-After` header.
    pub fn retry_after(self, value: &'static str) -> Answer {
        Answer {
            retry_after: Some(value),
            ..self
        }
    }
}

struct Script {
    queue: VecDeque<Answer>,
    default: Answer,
}

struct State {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<Script>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: Mutex<(usize, usize)>,
}

pub struct FakeSink {
    addr: SocketAddr,
    state: Arc<State>,
    server: Mutex<Option<JoinHandle<()>>>,
    /// Serves https with `tests/it/tls/server.pem` when set.
    tls: Option<TlsAcceptor>,
}

impl FakeSink {
    /// A sink listening now, answering 200.
    pub async fn start() -> FakeSink {
        let sink = FakeSink::down();
        sink.up().await;
        sink
    }

    /// A sink whose port is reserved but closed: connections are refused.
    pub fn down() -> FakeSink {
        let addr = crate::harness::free_addr();
        let state = State {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(Script {
                queue: VecDeque::new(),
                default: Answer::status(200),
            }),
            in_flight: Mutex::new((0, 0)),
        };
        FakeSink {
            addr,
            state: Arc::new(state),
            server: Mutex::new(None),
            tls: None,
        }
    }

    /// A sink answering 200 over https, with the certificate for
    /// `127.0.0.1` that `tests/it/tls/ca.pem` signed.
    pub async fn start_tls() -> FakeSink {
        let mut sink = FakeSink::down();
        sink.tls = Some(test_tls_acceptor());
        sink.up().await;
        sink
    }

    /// Starts listening on the reserved port.
    pub async fn up(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("fake sink cannot bind {}: {e}", self.addr));
        let state = self.state.clone();
        let tls = self.tls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                let tls = tls.clone();
                tokio::spawn(serve(stream, tls, service_fn(move |req| handle(state.clone(), req))));
            }
        });
        let previous = self.server.lock().unwrap().replace(task);
        assert!(previous.is_none(), "fake sink started twice");
    }

    /// `http://127.0.0.1:PORT{path}` (`https` for [`FakeSink::start_tls`]).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Answer the next requests with `first` in order, then `default` forever.
    pub fn script(&self, first: &[u16], default: u16) {
        let first: Vec<Answer> = first.iter().map(|&s| Answer::status(s)).collect();
        self.script_answers(&first, Answer::status(default));
    }

    /// Like [`FakeSink::script`], with delays and headers.
    pub fn script_answers(&self, first: &[Answer], default: Answer) {
        let mut script = self.state.script.lock().unwrap();
        script.queue = first.iter().copied().collect();
        script.default = default;
    }

    /// The most requests this sink was answering at once.
    pub fn most_in_flight(&self) -> usize {
        self.state.in_flight.lock().unwrap().1
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Polls until at least `n` requests have arrived; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake sink: expected {n} requests within {timeout:?}, got {}: {got:#?}",
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits a short quiet period, then returns everything received; used to
    /// assert that nothing *more* arrives (no duplicate delivery).
    pub async fn settle(&self) -> Vec<Recorded> {
        tokio::time::sleep(Duration::from_millis(400)).await;
        self.requests()
    }
}

impl Drop for FakeSink {
    fn drop(&mut self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let answer = {
        let mut script = state.script.lock().unwrap();
        let default = script.default;
        script.queue.pop_front().unwrap_or(default)
    };
    state.requests.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
        at,
    });
    /// Counts a request as answered when its answer is sent, or the
    /// daemon gives up on it (the future is dropped).
    struct Answering<'a>(&'a State);
    impl Drop for Answering<'_> {
        fn drop(&mut self) {
            self.0.in_flight.lock().unwrap().0 -= 1;
        }
    }
    let answering = {
        let mut n = state.in_flight.lock().unwrap();
        n.0 += 1;
        n.1 = n.1.max(n.0);
        Answering(&state)
    };
    tokio::time::sleep(answer.delay).await;
    drop(answering);
    let mut response = Response::builder()
        .status(answer.status)
        .header("content-type", "application/json");
    if let Some(after) = answer.retry_after {
        response = response.header("retry-after", after);
    }
    Ok(response
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("valid response"))
}

/// A TLS server side with `tests/it/tls/server.pem`, the certificate for
/// `127.0.0.1` that `tests/it/tls/ca.pem` signed.
pub fn test_tls_acceptor() -> TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls");
    let certs = CertificateDer::pem_file_iter(format!("{dir}/server.pem"))
        .expect("server.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("server.pem certificates");
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/server.key")).expect("server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    TlsAcceptor::from(Arc::new(config))
}

/// Serves one accepted connection, over TLS if `tls` is set. A connection
/// the daemon drops mid-request (or a handshake it refuses) is not our
/// concern.
pub async fn serve<S>(stream: tokio::net::TcpStream, tls: Option<TlsAcceptor>, service: S)
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http1::Builder::new();
    let _ = match tls {
        Some(tls) => match tls.accept(stream).await {
            Ok(stream) => conn.serve_connection(TokioIo::new(stream), service).await,
            Err(_) => return,
        },
        None => conn.serve_connection(TokioIo::new(stream), service).await,
    };
}
