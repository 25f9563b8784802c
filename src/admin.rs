//! The admin listener: health, and the JSON API behind the CLI's listing and
//! replay commands. When a token is configured every request but `/healthz`
//! must carry it as a bearer token.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ingest::{Body, error, json_response};
use crate::state::Shared;
use crate::store::{DeliveryFilter, EventFilter, ReplayTarget, Status, StoreError, now_ms};

/// How long the API waits for the store: less than its clients' own waits
/// (the CLI's 30 s), so a store that hangs gets them a 503, not silence.
const STORE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
/// The same for `/metrics`' queue gauges, within a scrape's usual 10 s:
/// without them the rest is still served, as an outage is when it is most
/// wanted. A large backlog's count takes well under a second.
const QUEUES_LIMIT: std::time::Duration = std::time::Duration::from_secs(8);

/// A store call within `limit`.
async fn bounded<T>(
    limit: std::time::Duration,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(StoreError::TimedOut(limit)))
}

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 10_000;

/// Admin connections open at once. Past it the listener accepts no more
/// until one closes: clients that open sockets and send nothing (the
/// listener may be off loopback, with a token) then wait in the kernel's
/// backlog, rather than taking file descriptors the webhook listener and
/// the sinks need.
const MAX_ADMIN_CONNECTIONS: usize = 64;

pub async fn serve(listener: TcpListener, admin: Arc<Shared>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let room = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            permit = room.clone().acquire_owned() => match permit {
                Ok(permit) => tokio::select! {
                    r = listener.accept() => r.map(|(s, _)| (s, permit)),
                    _ = shutdown.cancelled() => break,
                },
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, permit) = match accepted {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(req, &admin).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => { conn.as_mut().graceful_shutdown(); let _ = conn.await; }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// The credentials of an `Authorization: Bearer ...` header; the scheme's
/// case does not matter (RFC 9110, section 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim_matches(' '))
}

async fn handle(req: Request<Incoming>, admin: &Shared) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok\n");
    }
    let current = admin.current.load_full();
    if path == "/readyz" {
        return readyz(admin, &current).await;
    }
    // Everything else may reveal operational data: it needs the token when
    // one is configured (always, off loopback).
    if let Some(token) = &current.config.admin.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        // Digests of equal length: comparing the tokens themselves would
        // answer a wrong length sooner than a wrong byte.
        let (given, token) = (Sha256::digest(given.as_bytes()), Sha256::digest(token.expose()));
        if !bool::from(given.as_slice().ct_eq(token.as_slice())) {
            let mut resp = error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    let Some(query) = parse_query(req.uri().query().unwrap_or("")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the query is not valid percent-encoded UTF-8 (or holds a NUL)",
        );
    };
    // A filter a listing does not take is refused, not ignored: ignoring
    // it would list more than was asked for (`/api/events?sink=kds`).
    if req.method() == Method::GET
        && let Some(takes) = listing_filters(&path)
        && let Some(unknown) = query.keys().find(|k| !takes.contains(&k.as_str()))
    {
        return error(
            StatusCode::BAD_REQUEST,
            &format!(
                "this listing does not filter by {}; it takes {}",
                quoted(unknown),
                takes.join(", ")
            ),
        );
    }
    // Larger than the most is the most; anything but a count is refused,
    // as a bad `since` or `status` is, not read as the default. Zero rows
    // would be an empty page without a cursor, which reads as "none".
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        // All digits: too many for a usize is more than the most too.
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) && l.bytes().any(|b| b != b'0') => {
            l.parse::<usize>().map_or(MAX_LIMIT, |n| n.min(MAX_LIMIT))
        }
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "limit must be a count of rows, at least 1, e.g. 50",
            );
        }
    };
    let since = match query.get("since").map(|s| parse_since(s)) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let before = query.get("before").map(String::as_str);
    let source = query.get("source").cloned();
    let event_type = query.get("type").cloned();
    let sink = query.get("sink").cloned();
    let result = match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            let queues = match bounded(QUEUES_LIMIT, admin.store.queue_stats()).await {
                Ok(queues) => Some(queues),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: cannot read the queues from the store; serving the rest");
                    None
                }
            };
            let sinks: Vec<String> = current.config.sinks.keys().cloned().collect();
            let limits = current.engine.concurrency_limits();
            let body = admin.metrics.render(queues.as_deref(), &sinks, &limits, now_ms());
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            return resp;
        }
        (&Method::GET, "/api/events") => {
            let Some(before) = cursor(before, |b| b.parse::<i64>().ok()) else {
                return error(StatusCode::BAD_REQUEST, BAD_CURSOR);
            };
            let events = admin.store.events(EventFilter {
                source,
                event_type,
                since,
                before,
                limit,
            });
            bounded(STORE_LIMIT, events).await.map(|events| {
                let next = next_cursor(&events, limit, |e| e.seq.to_string());
                serde_json::json!({ "events": events, "next": next })
            })
        }
        (&Method::GET, p) if p.starts_with("/api/events/") => {
            let rest = &p["/api/events/".len()..];
            let Some((source, id)) = rest
                .split_once('/')
                .and_then(|(s, i)| Some((path_decode(s)?, path_decode(i)?)))
            else {
                return error(StatusCode::NOT_FOUND, "use /api/events/SOURCE/ID");
            };
            bounded(STORE_LIMIT, admin.store.event_detail(&source, &id))
                .await
                .map(|d| serde_json::json!({ "event": d }))
        }
        (&Method::GET, "/api/deliveries") | (&Method::GET, "/api/dead-letters") => {
            let status = if path == "/api/dead-letters" {
                Some(Status::Dead)
            } else {
                match query.get("status").map(|s| s.parse::<Status>()) {
                    None => None,
                    Some(Ok(s)) => Some(s),
                    Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
                }
            };
            let Some(before) = cursor(before, delivery_cursor) else {
                return error(StatusCode::BAD_REQUEST, BAD_CURSOR);
            };
            let deliveries = admin.store.deliveries(DeliveryFilter {
                sink,
                status,
                source,
                event_type,
                since,
                before,
                limit,
            });
            bounded(STORE_LIMIT, deliveries).await.map(|d| {
                let next = next_cursor(&d, limit, |r| format!("{}.{}", r.updated_at, r.id));
                serde_json::json!({ "deliveries": d, "next": next })
            })
        }
        (&Method::POST, "/api/replay") => return replay(req, admin, &current).await,
        (_, "/metrics" | "/api/events" | "/api/deliveries" | "/api/dead-letters" | "/api/replay") => {
            return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        _ => return error(StatusCode::NOT_FOUND, "not found"),
    };
    match result {
        Ok(v) => json_response(StatusCode::OK, v.to_string()),
        Err(e) => store_error(e),
    }
}

/// The query parameters each listing takes; `None` for other paths.
fn listing_filters(path: &str) -> Option<&'static [&'static str]> {
    const PAGE: [&str; 3] = ["limit", "since", "before"];
    Some(match path {
        "/api/events" => &[PAGE[0], PAGE[1], PAGE[2], "source", "type"],
        "/api/deliveries" => &[PAGE[0], PAGE[1], PAGE[2], "source", "type", "sink", "status"],
        "/api/dead-letters" => &[PAGE[0], PAGE[1], PAGE[2], "source", "type", "sink"],
        _ => return None,
    })
}

/// A client's text in an error: one short line, quoted.
fn quoted(text: &str) -> String {
    format!("{:?}", expeditor_api::message::one_line(text, 64))
}

const BAD_CURSOR: &str = "before must be the `next` of an earlier page of the same listing";

/// A page as long as its limit may have more rows behind it: it gets a
/// `next` cursor, its last row's, which `before` takes to list them.
fn next_cursor<T>(rows: &[T], limit: usize, cursor: impl Fn(&T) -> String) -> Option<String> {
    rows.last().filter(|_| rows.len() >= limit).map(cursor)
}

/// `before`, read by `parse`: `Some(None)` without one, `None` for one
/// that does not read.
fn cursor<T>(before: Option<&str>, parse: impl Fn(&str) -> Option<T>) -> Option<Option<T>> {
    match before {
        None => Some(None),
        Some(b) => parse(b).map(Some),
    }
}

/// A deliveries listing's cursor, `<updated_at ms>.<id>` (its order is by
/// both, newest first).
fn delivery_cursor(text: &str) -> Option<(i64, i64)> {
    let (at, id) = text.split_once('.')?;
    Some((at.parse().ok()?, id.parse().ok()?))
}

/// Ready: a write reaches the store's disk (not full, not failing) and
/// every sink worker runs.
async fn readyz(admin: &Shared, current: &crate::state::Current) -> Response<Body> {
    let store_ok = store_ready(admin).await;
    let workers_ok = current.engine.running();
    let body = serde_json::json!({ "store": if store_ok { "ok" } else { "unavailable" },
                                   "workers": if workers_ok { "ok" } else { "stopped" } });
    let status = if store_ok && workers_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, body.to_string())
}

/// How long a probe's answer stands: each commits a page to the store, so a
/// flood of `/readyz` (it needs no token) must not keep the writer busy.
const READY_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a write reaches the store's disk: probed at most once per
/// [`READY_PROBE_EVERY`], however many ask meanwhile (they wait for the one
/// probe in flight).
async fn store_ready(admin: &Shared) -> bool {
    let mut last = admin.ready_probe.lock().await;
    if let Some((at, ok)) = *last
        && at.elapsed() < READY_PROBE_EVERY
    {
        return ok;
    }
    let probe = tokio::time::timeout(std::time::Duration::from_secs(5), admin.store.writable()).await;
    let ok = matches!(probe, Ok(Ok(())));
    *last = Some((std::time::Instant::now(), ok));
    ok
}

/// `since=1h` (that long ago) or `since=2026-11-23T10:00:00Z`.
fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return i64::try_from(d.as_millis())
            .map(|ago| now_ms().saturating_sub(ago))
            .map_err(|_| format!("invalid since {s:?}: too long ago"));
    }
    let parsed = s.parse::<jiff::Timestamp>().or_else(|e| {
        // A `+01:00` offset typed into a URL unencoded arrives as ` 01:00`
        // (a query's `+` is a space): read it as the offset it was.
        match s.rfind(' ') {
            Some(i) if s.len() - i == 6 => format!("{}+{}", &s[..i], &s[i + 1..]).parse(),
            _ => Err(e),
        }
    });
    parsed
        .map(|t| t.as_millisecond())
        .map_err(|_| format!("invalid since {s:?}: write a duration (\"1h\") or an RFC 3339 time"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    dead_letters: bool,
    event: Option<EventRef>,
    sink: Option<String>,
    /// Dead-letter filters.
    source: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    since: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRef {
    source: String,
    id: String,
}

/// A replay request is a few filters: far below this.
const REPLAY_MAX_BODY: usize = 64 * 1024;

async fn replay(req: Request<Incoming>, admin: &Shared, current: &crate::state::Current) -> Response<Body> {
    let body = match Limited::new(req.into_body(), REPLAY_MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "a replay request is at most 64 KiB");
        }
        Err(_) => return error(StatusCode::BAD_REQUEST, "body could not be read"),
    };
    let r: ReplayRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid replay request: {e}")),
    };
    if let Some(sink) = &r.sink
        && !current.config.sinks.contains_key(sink)
    {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("no sink named {sink:?} in the running config"),
        );
    }
    let since = match r.since.as_deref().map(parse_since) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let target = match (r.dead_letters, r.event) {
        (true, None) => ReplayTarget::DeadLetters {
            sink: r.sink.clone(),
            source: r.source,
            event_type: r.event_type,
            since,
        },
        (false, Some(e)) if r.source.is_none() && r.event_type.is_none() && since.is_none() => ReplayTarget::Event {
            source: e.source,
            id: e.id,
            sink: r.sink.clone(),
        },
        (false, Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "source, type and since filter dead letters only",
            );
        }
        _ => return error(StatusCode::BAD_REQUEST, "give either dead_letters: true or an event"),
    };
    // A bulk replay after a long outage may outlast the client's wait: it
    // runs to its end on its own task (tracked, so a stop lets it finish),
    // and the answer says whether it is done or still running.
    let sinks: Vec<String> = match &r.sink {
        Some(s) => vec![s.clone()],
        None => current.config.sinks.keys().cloned().collect(),
    };
    let (store, handoff) = (admin.store.clone(), current.handoff.clone());
    let mut replaying = admin.detached.spawn(async move {
        let replayed = store.replay(target.clone(), now_ms()).await;
        match &replayed {
            Ok(n) => {
                tracing::info!(replay = %target, deliveries = n, "replay done");
                handoff.wake(&sinks);
            }
            Err(e) => tracing::warn!(replay = %target, error = %e, "replay failed"),
        }
        replayed
    });
    match tokio::time::timeout(STORE_LIMIT, &mut replaying).await {
        Ok(Ok(Ok(n))) => json_response(StatusCode::OK, serde_json::json!({ "replayed": n }).to_string()),
        Ok(Ok(Err(e))) => store_error(e),
        Ok(Err(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, "the replay stopped unexpectedly"),
        Err(_) => json_response(
            StatusCode::ACCEPTED,
            serde_json::json!({ "replayed": null, "running": true }).to_string(),
        ),
    }
}

fn store_error(e: StoreError) -> Response<Body> {
    match e {
        StoreError::NotFound => error(StatusCode::NOT_FOUND, "no such event"),
        StoreError::Pruned => error(
            StatusCode::GONE,
            "the event's payload has been pruned; it cannot be replayed",
        ),
        StoreError::Unavailable(detail) => {
            tracing::error!(error = %detail, "admin request failed: store unavailable");
            error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
        }
        StoreError::TimedOut(limit) => {
            tracing::warn!(?limit, "admin request: no answer from the store in time");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the store did not answer within {} s", limit.as_secs()),
            )
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    resp
}

/// `a=1&b=x%20y` -> {a: "1", b: "x y"}; an empty value is no value. `None`
/// when a key or value does not decode: dropping it would widen a filter
/// (`source=crumb%ZZ` listing every source) rather than refuse it.
fn parse_query(q: &str) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (query_decode(k)?, query_decode(v)?);
        if !v.is_empty() {
            out.insert(k, v);
        }
    }
    Some(out)
}

/// A query's key or value: `%XX` escapes, and `+` for a space.
fn query_decode(s: &str) -> Option<String> {
    percent_decode(s, true)
}

/// A path segment: `%XX` escapes; `+` is itself (an event id may hold one).
fn path_decode(s: &str) -> Option<String> {
    percent_decode(s, false)
}

fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // No store keeps a NUL in text (PostgreSQL refuses it): not a name.
    if out.contains(&0) {
        return None;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = parse_query("source=crumb&type=order.created&limit=5&x=&y=a%20b+c").unwrap();
        assert_eq!(q["source"], "crumb");
        assert_eq!(q["type"], "order.created");
        assert_eq!(q["limit"], "5");
        assert!(!q.contains_key("x"));
        assert_eq!(q["y"], "a b c");
        assert!(parse_query("a=%zz").is_none(), "refused, not dropped");
        assert!(parse_query("sink=kds&source=crumb%ZZ").is_none());
        assert!(parse_query("source=a%00b").is_none());
        assert_eq!(path_decode("evt+1%2F2").as_deref(), Some("evt+1/2"));
        assert_eq!(path_decode("evt%00"), None);
        assert!(parse_since("300000000y").unwrap_err().contains("too long ago"));
    }

    #[test]
    fn since_reads_an_offset_whose_plus_became_a_space() {
        let utc = parse_since("2026-11-23T09:00:00Z").unwrap();
        assert_eq!(parse_since("2026-11-23T10:00:00+01:00"), Ok(utc));
        let q = parse_query("since=2026-11-23T10:00:00+01:00").unwrap();
        assert_eq!(parse_since(&q["since"]), Ok(utc));
        assert!(parse_since("2026-11-23T10:00:00 1:00").is_err());
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"), "the scheme is case-insensitive");
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert_eq!(bearer(""), None);
    }
}
