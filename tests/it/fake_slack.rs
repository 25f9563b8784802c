//! A local Slack: the Web API's `chat.postMessage` and an incoming webhook,
//! answering as Slack documents them, so the daemon's real client
//! (slack-morphism) is tested against the real wire protocol.
//!
//! Web API (`POST /api/chat.postMessage`, JSON body):
//! - `Authorization: Bearer <token>` is checked: missing is `not_authed`,
//!   another token `invalid_auth` (HTTP 200, `{"ok": false, "error": ...}`);
//! - the body must be JSON (`Content-Type: application/json`) with a
//!   `channel` (else `channel_not_found`), `text` and/or `blocks` (else
//!   `no_text`), and `blocks` an array of objects with a `type` (else
//!   `invalid_blocks`);
//! - success is `{"ok": true, "channel", "ts", "message": {...}}`.
//!
//! Incoming webhook (`POST /services/T.../B.../SECRET`): the same JSON
//! message without `channel`; success is `200 text/plain "ok"`, errors an
//! HTTP status with a plain-text code (`404 no_service`, `500 rollup_error`).
//!
//! A script of answers (`ratelimited` as HTTP 429 with `Retry-After`, an
//! `ok: false` code, an HTTP status) is played before the default success.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The secret part of the fake's incoming-webhook URL.
pub const WEBHOOK_PATH: &str = "/services/T0EXPEDIT/B0ALERTS/xhookSecret42";

/// A scripted answer, played once instead of success.
#[derive(Debug, Clone, Copy)]
pub enum SlackAnswer {
    /// Web API: HTTP 200 `{"ok": false, "error": CODE}`.
    Error(&'static str),
    /// HTTP 429 with `Retry-After: SECONDS` (Web API: `{"ok": false,
    /// "error": "ratelimited"}`; webhook: `rate_limited` as plain text).
    RateLimited(u64),
    /// This HTTP status with a plain-text body (webhook error codes, or an
    /// outage in front of the Web API).
    Status(u16, &'static str),
}

/// One request as the fake saw it, and what it answered.
#[derive(Debug, Clone)]
pub struct SlackRequest {
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
    pub at: Instant,
    /// `ok`, or the error code / status answered.
    pub answered: String,
}

struct State {
    token: String,
    requests: Mutex<Vec<SlackRequest>>,
    script: Mutex<VecDeque<SlackAnswer>>,
    ts: Mutex<u64>,
}

pub struct FakeSlack {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
    tls: bool,
}

impl FakeSlack {
    /// Listening now; `token` is the one bot token it accepts.
    pub async fn start(token: &str) -> FakeSlack {
        Self::listen(token, None).await
    }

    /// [`FakeSlack::start`] over https, with the certificate for `127.0.0.1`
    /// that `tests/it/tls/ca.pem` signed.
    pub async fn start_tls(token: &str) -> FakeSlack {
        Self::listen(token, Some(crate::fake_sink::test_tls_acceptor())).await
    }

    async fn listen(token: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeSlack {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake slack");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            token: token.to_owned(),
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            ts: Mutex::new(1_503_435_956_000_247),
        });
        let shared = state.clone();
        let is_tls = tls.is_some();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                let tls = tls.clone();
                tokio::spawn(crate::fake_sink::serve(
                    stream,
                    tls,
                    service_fn(move |req| handle(state.clone(), req)),
                ));
            }
        });
        FakeSlack {
            addr,
            state,
            server,
            tls: is_tls,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// For `api_url`: `http://127.0.0.1:PORT/api` (`https` for [`FakeSlack::start_tls`]).
    pub fn api_url(&self) -> String {
        format!("{}://{}/api", self.scheme(), self.addr)
    }

    /// For `webhook_url`.
    pub fn webhook_url(&self) -> String {
        format!("{}://{}{WEBHOOK_PATH}", self.scheme(), self.addr)
    }

    /// `127.0.0.1:PORT`, as a CONNECT names it.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// Answers the next requests with `answers`, in order, then succeeds.
    pub fn script(&self, answers: &[SlackAnswer]) {
        *self.state.script.lock().unwrap() = answers.iter().copied().collect();
    }

    pub fn requests(&self) -> Vec<SlackRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits a quiet moment, then returns everything received.
    pub async fn settle(&self) -> Vec<SlackRequest> {
        tokio::time::sleep(Duration::from_millis(400)).await;
        self.requests()
    }
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: u16, content_type: &str, body: String, retry_after: Option<u64>) -> Reply {
    let mut response = Response::builder().status(status).header("content-type", content_type);
    if let Some(secs) = retry_after {
        response = response.header("retry-after", secs.to_string());
    }
    response.body(Full::new(Bytes::from(body))).expect("valid response")
}

fn api_error(code: &str) -> Reply {
    reply(
        200,
        "application/json; charset=utf-8",
        json!({"ok": false, "error": code}).to_string(),
        None,
    )
}

/// What Slack checks before doing anything: the message has something to
/// post, and blocks are blocks.
fn message_error(body: &Value) -> Option<&'static str> {
    let text = body.get("text").and_then(Value::as_str).is_some_and(|t| !t.is_empty());
    let blocks = body.get("blocks");
    if let Some(blocks) = blocks {
        let ok = blocks
            .as_array()
            .is_some_and(|items| items.iter().all(|b| b.get("type").and_then(Value::as_str).is_some()));
        if !ok {
            return Some("invalid_blocks");
        }
    }
    if !text && blocks.and_then(Value::as_array).is_none_or(Vec::is_empty) {
        return Some("no_text");
    }
    None
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let path = parts.uri.path().to_owned();
    let authorization = header("authorization");
    let content_type = header("content-type");
    let json_body = content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/json"));
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();

    let (response, answered) = if path == "/api/chat.postMessage" && parts.method == "POST" {
        let expected = format!("Bearer {}", state.token);
        let check = match (&authorization, &parsed) {
            (None, _) => Some("not_authed"),
            (Some(a), _) if *a != expected => Some("invalid_auth"),
            (_, None) => Some("invalid_json"),
            _ if !json_body => Some("invalid_arguments"),
            (_, Some(b)) if b.get("channel").and_then(Value::as_str).is_none_or(str::is_empty) => {
                Some("channel_not_found")
            }
            (_, Some(b)) => message_error(b),
        };
        match check {
            Some(code) => (api_error(code), code.to_owned()),
            None => match state.script.lock().unwrap().pop_front() {
                Some(SlackAnswer::Error(code)) => (api_error(code), code.to_owned()),
                Some(SlackAnswer::RateLimited(secs)) => (
                    reply(
                        429,
                        "application/json; charset=utf-8",
                        json!({"ok": false, "error": "ratelimited"}).to_string(),
                        Some(secs),
                    ),
                    "429 ratelimited".to_owned(),
                ),
                Some(SlackAnswer::Status(status, text)) => (
                    reply(status, "text/plain", text.to_owned(), None),
                    format!("{status} {text}"),
                ),
                None => {
                    let body = parsed.as_ref().expect("checked above");
                    let ts = {
                        let mut ts = state.ts.lock().unwrap();
                        *ts += 1;
                        format!("{}.{:06}", *ts / 1_000_000, *ts % 1_000_000)
                    };
                    let mut message = json!({
                        "type": "message",
                        "subtype": "bot_message",
                        "text": body.get("text").cloned().unwrap_or(Value::String(String::new())),
                        "ts": ts,
                        "username": "expeditor",
                        "bot_id": "B0EXPEDIT",
                    });
                    if let Some(blocks) = body.get("blocks") {
                        message["blocks"] = blocks.clone();
                    }
                    let answer = json!({
                        "ok": true,
                        "channel": "C0INVENTORY",
                        "ts": ts,
                        "message": message,
                    });
                    (
                        reply(200, "application/json; charset=utf-8", answer.to_string(), None),
                        "ok".to_owned(),
                    )
                }
            },
        }
    } else if path.starts_with("/services/") && parts.method == "POST" {
        let check = if path != WEBHOOK_PATH {
            Some((404, "no_service"))
        } else if !json_body || parsed.is_none() {
            Some((400, "invalid_payload"))
        } else {
            message_error(parsed.as_ref().unwrap()).map(|code| (400, code))
        };
        match check {
            Some((status, code)) => (reply(status, "text/plain", code.to_owned(), None), code.to_owned()),
            None => match state.script.lock().unwrap().pop_front() {
                Some(SlackAnswer::RateLimited(secs)) => (
                    reply(429, "text/plain", "rate_limited".to_owned(), Some(secs)),
                    "429 rate_limited".to_owned(),
                ),
                Some(SlackAnswer::Status(status, text)) => (
                    reply(status, "text/plain", text.to_owned(), None),
                    format!("{status} {text}"),
                ),
                Some(SlackAnswer::Error(code)) => (reply(400, "text/plain", code.to_owned(), None), code.to_owned()),
                // Slack answers a posted webhook with the two letters "ok".
                None => (reply(200, "text/plain", "ok".to_owned(), None), "ok".to_owned()),
            },
        }
    } else {
        (api_error("unknown_method"), "unknown_method".to_owned())
    };

    state.requests.lock().unwrap().push(SlackRequest {
        path,
        authorization,
        content_type,
        body: parsed.unwrap_or(Value::Null),
        at,
        answered,
    });
    Ok(response)
}
