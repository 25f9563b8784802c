//! How a request leaves: hyper's pooled client directly, or reqwest when the
//! environment names a proxy.
//!
//! reqwest is that same hyper client inside layers expeditor does not use
//! (redirects, which a sink never follows; its own retries, which the engine
//! owns; the URL parsed again per request) but which every request pays for:
//! about 20 µs of CPU per delivery in the bench's e2e row. The one layer of
//! its that expeditor does use is proxies from the environment, so a process
//! started with one (`HTTPS_PROXY` and the rest, as reqwest reads them) sends
//! through reqwest, and everything else goes direct.

use std::ffi::OsString;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use expeditor_api::{DeliveryError, Outcome};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::outcome::{self, Drain, root_cause};

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// How long an answer's body is read once its status is in: the status has
/// said what happened, and a body that trickles would otherwise hold the
/// attempt's slot until its timeout.
const BODY_GRACE: Duration = Duration::from_secs(1);

/// The variables reqwest takes a proxy from (either case).
const PROXY_VARIABLES: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Shared by all http sinks, so they share one connection pool. Redirects are
/// never followed: one would replay the request (or turn a POST into a GET)
/// somewhere the config never named, so a 3xx is a permanent error.
#[derive(Clone, Debug)]
pub struct Client(Transport);

#[derive(Clone, Debug)]
enum Transport {
    Direct(Box<hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>>),
    Proxied(reqwest::Client),
}

impl Client {
    /// Direct, unless the environment names a proxy (reqwest then applies it,
    /// `NO_PROXY` included). Fails only when no TLS root certificates can be
    /// loaded at all.
    pub fn from_env() -> io::Result<Self> {
        if proxy_configured(|name| std::env::var_os(name)) {
            Self::proxied(reqwest::Client::builder())
        } else {
            Self::direct()
        }
    }

    /// hyper's client: HTTP/1.1, or HTTP/2 where TLS negotiates it.
    pub fn direct() -> io::Result<Self> {
        // The process-wide provider the daemon installed (ring), or ring.
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        // The system's roots (corporate proxies add theirs there); Mozilla's
        // when the system has none.
        let builder = match HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
            Ok(b) => b,
            Err(_) => HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(provider)
                .map_err(io::Error::other)?,
        };
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        let https = builder.https_or_http().enable_all_versions().wrap_connector(tcp);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self(Transport::Direct(Box::new(client))))
    }

    /// reqwest, built from `builder` (proxies from the environment unless
    /// the builder names its own).
    pub fn proxied(builder: reqwest::ClientBuilder) -> io::Result<Self> {
        let client = builder
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(POOL_IDLE)
            .build()
            .map_err(|e| io::Error::other(root_cause(&e)))?;
        Ok(Self(Transport::Proxied(client)))
    }

    /// Whether requests go through reqwest (and so any proxy).
    pub fn is_proxied(&self) -> bool {
        matches!(self.0, Transport::Proxied(_))
    }

    /// Sends `request` and judges the answer. `timeout` covers connecting,
    /// sending and the answer's status and headers: past it, the attempt
    /// timed out. The body is read (for an error's snippet, and so the
    /// connection can be reused) for at most [`BODY_GRACE`] more, within
    /// the same deadline, and a body still arriving then changes nothing:
    /// the status has said what happened, so a 200 whose body is slow is
    /// delivered, not retried.
    ///
    /// A pooled connection the server closed as the request went out (many
    /// close idle ones after a few seconds: gunicorn 2, node 5) fails it
    /// with nothing answered; it is sent once more at once, on a fresh
    /// connection, as the same attempt (the `Idempotency-Key` makes a
    /// repeat harmless), instead of costing an attempt and its backoff.
    pub(crate) async fn send(&self, request: Request<Bytes>, timeout: Duration) -> Outcome {
        // For a second send, and for the configured headers' values (marked
        // sensitive) a server may echo in the body an error quotes.
        let kept = copy(&request);
        self.send_once(request, &kept, timeout).await.map_err(|mut e| {
            e.message = redacted(&e.message, kept.headers());
            e
        })
    }

    async fn send_once(&self, request: Request<Bytes>, kept: &Request<Bytes>, timeout: Duration) -> Outcome {
        let deadline = tokio::time::Instant::now() + timeout;
        match &self.0 {
            Transport::Direct(client) => {
                let sent = tokio::time::timeout_at(deadline, async {
                    match client.request(request.map(Full::new)).await {
                        Err(e) if closed_unanswered(&e) => client.request(copy(kept).map(Full::new)).await,
                        other => other,
                    }
                });
                let response = sent
                    .await
                    .map_err(|_| DeliveryError::timed_out(timeout))?
                    .map_err(|e| DeliveryError::retryable(root_cause(&e)))?;
                judge_direct(response, deadline.min(tokio::time::Instant::now() + BODY_GRACE)).await
            }
            Transport::Proxied(client) => {
                let request = reqwest::Request::try_from(request)
                    .map_err(|e| DeliveryError::permanent(format!("invalid request: {}", root_cause(&e))))?;
                match tokio::time::timeout_at(deadline, client.execute(request))
                    .await
                    .map_err(|_| DeliveryError::timed_out(timeout))?
                {
                    Ok(response) => {
                        judge_reqwest(response, deadline.min(tokio::time::Instant::now() + BODY_GRACE)).await
                    }
                    Err(err) => Err(reqwest_error(&err, timeout)),
                }
            }
        }
    }
}

/// `message` with every word of 8 or more characters of the sensitive
/// (configured) header values (a token with or without its `Bearer `)
/// written as `[redacted]`: it is stored and shown (`expeditor
/// deliveries`, the log).
fn redacted(message: &str, headers: &http::HeaderMap) -> String {
    let words = headers
        .values()
        .filter(|v| v.is_sensitive())
        .filter_map(|v| v.to_str().ok())
        .flat_map(str::split_whitespace)
        .filter(|w| w.len() >= 8);
    expeditor_api::message::redact(message, words)
}

/// `request` again, for a second send.
fn copy(request: &Request<Bytes>) -> Request<Bytes> {
    let mut again = Request::new(request.body().clone());
    *again.method_mut() = request.method().clone();
    *again.uri_mut() = request.uri().clone();
    *again.version_mut() = request.version();
    *again.headers_mut() = request.headers().clone();
    again
}

/// Whether the connection closed before any answer came: hyper's
/// "connection closed before message completed".
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_incomplete_message)
}

/// What is wrong with the proxy variables for http sinks, one line each:
/// reqwest takes only http:// and https:// proxies here (a socks one fails
/// every delivery), and ignores a value that is not a URL (requests then go
/// direct). Said at start, so it is not first seen as dead letters.
pub fn proxy_problems(var: impl Fn(&str) -> Option<OsString>) -> Vec<String> {
    let mut problems = Vec::new();
    for name in PROXY_VARIABLES {
        let Some(value) = var(name).filter(|v| !v.is_empty()) else {
            continue;
        };
        let value = value.to_string_lossy();
        // Without a scheme reqwest reads it as http://.
        let url = if value.contains("://") {
            value.to_string()
        } else {
            format!("http://{value}")
        };
        match url::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => problems.push(format!(
                "{name} names a {} proxy, which http sinks cannot use (only http:// or https://): their deliveries will fail",
                u.scheme()
            )),
            Err(_) => problems.push(format!("{name} is not a proxy URL; http sinks ignore it and connect directly")),
        }
    }
    problems
}

/// What is wrong with the variables that name other root certificates:
/// one naming a file or directory that cannot be read is passed over (the
/// system's roots, or Mozilla's, are used), so a sink behind a private CA
/// fails each delivery with "UnknownIssuer" and nothing says why.
pub fn tls_problems(var: impl Fn(&str) -> Option<OsString>) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, want_dir) in [("SSL_CERT_FILE", false), ("SSL_CERT_DIR", true)] {
        let Some(value) = var(name).filter(|v| !v.is_empty()) else {
            continue;
        };
        // SSL_CERT_DIR may list several, as OpenSSL's does.
        let paths: Vec<std::path::PathBuf> = if want_dir {
            std::env::split_paths(&value).collect()
        } else {
            vec![value.into()]
        };
        for path in paths {
            let readable = if want_dir {
                std::fs::read_dir(&path).is_ok()
            } else {
                std::fs::File::open(&path).is_ok()
            };
            if !readable {
                problems.push(format!(
                    "{name} names {}, which cannot be read: https sinks use the system's root certificates without it",
                    path.display()
                ));
            }
        }
    }
    problems
}

/// Whether any variable reqwest takes a proxy from is set (and not empty).
pub(crate) fn proxy_configured(var: impl Fn(&str) -> Option<OsString>) -> bool {
    PROXY_VARIABLES
        .iter()
        .any(|name| var(name).is_some_and(|v| !v.is_empty()))
}

/// Judges an answer by its status and headers, with as much of its body as
/// arrives by `deadline` (see [`Client::send`]).
async fn judge_direct(response: Response<hyper::body::Incoming>, deadline: tokio::time::Instant) -> Outcome {
    let (parts, mut body) = response.into_parts();
    let mut drain = Drain::new(parts.status);
    let read = async {
        while drain.wants_more() {
            let Some(Ok(frame)) = body.frame().await else { break };
            if let Ok(chunk) = frame.into_data() {
                drain.take(&chunk);
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, read).await;
    outcome::judge(parts.status, &parts.headers, &drain.head)
}

async fn judge_reqwest(mut response: reqwest::Response, deadline: tokio::time::Instant) -> Outcome {
    let mut drain = Drain::new(response.status());
    let read = async {
        while drain.wants_more() {
            let Ok(Some(chunk)) = response.chunk().await else { break };
            drain.take(&chunk);
        }
    };
    let _ = tokio::time::timeout_at(deadline, read).await;
    outcome::judge(response.status(), response.headers(), &drain.head)
}

/// Nothing was answered: a timeout or a network failure is worth retrying; a
/// request reqwest refused to build is not.
fn reqwest_error(err: &reqwest::Error, timeout: Duration) -> DeliveryError {
    if err.is_timeout() {
        return DeliveryError::timed_out(timeout);
    }
    let cause = root_cause(err);
    if err.is_builder() {
        DeliveryError::permanent(format!("invalid request: {cause}"))
    } else {
        DeliveryError::retryable(cause)
    }
}
