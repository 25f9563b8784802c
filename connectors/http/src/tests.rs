//! Against a real HTTP server on 127.0.0.1:0, inside the test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use expeditor_api::{Delivery, DeliveryError, Event, EventMeta, Item, Order, Reads, Sink, TemplateSet, Views};
use http::{HeaderMap, HeaderName, Method};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::outcome::{one_line, retry_after};
use super::*;

/// What the test server answers.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

fn reply(status: u16) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: String::new(),
        delay: Duration::ZERO,
    }
}

/// What the test server received.
struct Seen {
    method: Method,
    path: String,
    /// As the request line had it: absolute (`http://host/path`) when it
    /// came through a proxy.
    uri: http::Uri,
    headers: HeaderMap,
    body: Json,
}

async fn serve(reply: Reply) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (reply, tx) = (reply.clone(), tx.clone());
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (reply, tx) = (reply.clone(), tx.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let body = serde_json::from_slice(&body).unwrap_or(Json::Null);
                    let path = parts.uri.path().to_owned();
                    let _ = tx.send(Seen {
                        method: parts.method,
                        path,
                        uri: parts.uri,
                        headers: parts.headers,
                        body,
                    });
                    tokio::time::sleep(reply.delay).await;
                    let mut response = Response::builder().status(reply.status);
                    for (name, value) in &reply.headers {
                        response = response.header(*name, value);
                    }
                    Ok::<_, Infallible>(response.body(Full::new(Bytes::from(reply.body))).unwrap())
                }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// reqwest is built with `rustls-no-provider`: a client cannot be built
/// until a crypto provider is installed, even for plain http.
fn install_provider() {
    // Err when another test installed it first.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn direct() -> Client {
    install_provider();
    Client::direct().unwrap()
}

/// Through reqwest, as when the environment names a proxy; this one has none.
fn proxied() -> Client {
    install_provider();
    Client::proxied(reqwest::Client::builder().no_proxy()).unwrap()
}

fn event() -> Event {
    Event {
        event: EventMeta {
            id: "evt_1".into(),
            source: "crave".into(),
            kind: "crave".into(),
            event_type: "order.created".into(),
            occurred_at: None,
            received_at: "2026-11-23T10:00:00Z".into(),
        },
        payload: json!({"data": {"orderId": "ord_456"}}),
        views: Views {
            order: Some(Order {
                id: Some("ord_456".into()),
                channel: Some("delivery".into()),
                total_cents: Some(2798),
                items: vec![Item {
                    name: Some("Pizza".into()),
                    quantity: 2,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

fn delivery(attempt: u32) -> Delivery {
    Delivery {
        key: expeditor_api::delivery_key("crave", "evt_1", "kds"),
        attempt,
        event: Arc::new(event()),
    }
}

struct Build {
    url: String,
    headers: Vec<(HeaderName, &'static str)>,
    body: Option<Json>,
    timeout: Duration,
    client: Client,
}

fn build(addr: SocketAddr) -> Build {
    Build {
        url: format!("http://{addr}/tickets/{{{{ order.id }}}}"),
        headers: vec![(
            header_name("Authorization").unwrap(),
            "Bearer s3cret-{{ event.source }}",
        )],
        body: None,
        timeout: Duration::from_secs(5),
        client: direct(),
    }
}

impl Build {
    /// Sends through `client` instead of the direct one.
    fn via(self, client: Client) -> Self {
        Self { client, ..self }
    }

    fn sink(self) -> HttpSink {
        let mut set = TemplateSet::new();
        let url = set.text("sinks.kds.url", &self.url).unwrap();
        let headers = self
            .headers
            .into_iter()
            .map(|(name, source)| {
                let id = set.text(&format!("sinks.kds.headers.{name}"), source).unwrap();
                (name, id)
            })
            .collect();
        let body = self.body.map(|b| set.structured("sinks.kds.body", &b).unwrap());
        let cfg = HttpSinkConfig {
            name: "kds".into(),
            method: Method::POST,
            url,
            headers,
            body,
            timeout: self.timeout,
            templates: set.finish(),
        };
        HttpSink::new(cfg, self.client)
    }
}

async fn deliver_one(sink: &HttpSink, attempt: u32) -> Result<(), DeliveryError> {
    let mut outcomes = sink.deliver(&[delivery(attempt)]).await;
    assert_eq!(outcomes.len(), 1);
    outcomes.pop().unwrap()
}

/// The outcome of one answer, through both transports: they must agree on
/// everything but `retry_after`, which the caller checks (an HTTP-date is
/// relative to the moment it is read).
async fn status_outcome(reply: Reply) -> DeliveryError {
    let (addr, _seen) = serve(reply).await;
    let mut outcomes = Vec::new();
    for client in [direct(), proxied()] {
        outcomes.push(deliver_one(&build(addr).via(client).sink(), 1).await.unwrap_err());
    }
    let (via_reqwest, direct) = (outcomes.pop().unwrap(), outcomes.pop().unwrap());
    assert_eq!(direct.message, via_reqwest.message);
    assert_eq!(direct.retryable, via_reqwest.retryable);
    assert_eq!(direct.retry_after.is_some(), via_reqwest.retry_after.is_some());
    direct
}

#[tokio::test]
async fn sends_the_rendered_body_and_headers() {
    for client in [direct(), proxied()] {
        sends_the_rendered_body_and_headers_with(client).await;
    }
}

async fn sends_the_rendered_body_and_headers_with(client: Client) {
    let (addr, mut seen) = serve(reply(201)).await;
    let mut b = build(addr).via(client);
    b.body = Some(json!({
        "external_id": "{{ order.id }}",
        "total": "{{ order.total_cents }}",
        "items": "{{ order.items }}",
        "label": "Order {{ order.id }}",
        "fixed": 7,
    }));
    let sink = b.sink();
    assert_eq!(sink.max_batch(), 1);
    deliver_one(&sink, 3).await.unwrap();

    let req = seen.recv().await.unwrap();
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, "/tickets/ord_456");
    assert_eq!(
        req.body,
        json!({
            "external_id": "ord_456",
            "total": 2798,
            "items": [{"name": "Pizza", "quantity": 2, "unit_price_cents": null, "total_cents": null, "modifiers": []}],
            "label": "Order ord_456",
            "fixed": 7,
        })
    );
    let h = &req.headers;
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["idempotency-key"], delivery(3).key.as_str());
    assert_eq!(h["x-expeditor-attempt"], "3");
    assert_eq!(h["authorization"], "Bearer s3cret-crave");
    assert!(h["user-agent"].to_str().unwrap().starts_with("expeditor/"));
}

/// What the sink reads decides what a delivery's event is rebuilt with:
/// its url, headers and body templates together, or everything when the
/// whole event is the body.
#[test]
fn reads_what_its_templates_read() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let with = |url: &str, body: Option<Json>| {
        let mut b = build(addr);
        b.url = url.to_string();
        b.body = body;
        b.sink().reads()
    };
    let meta_url = "http://127.0.0.1:9/{{ event.source }}";
    assert_eq!(
        with(meta_url, Some(json!({ "id": "{{ event.id }}", "n": 1 }))),
        Reads::Meta
    );
    assert_eq!(
        with(meta_url, Some(json!({ "total": "{{ payload.data.total }}" }))),
        Reads::MetaAndPayload
    );
    assert_eq!(
        with(meta_url, Some(json!({ "total": "{{ order.total_cents }}" }))),
        Reads::MetaAndViews
    );
    // The url reads a view and the body the payload: both.
    assert_eq!(
        with(
            "http://127.0.0.1:9/{{ order.id }}",
            Some(json!({ "total": "{{ payload.data.total }}" }))
        ),
        Reads::All
    );
    // No body template: the whole event is the body.
    assert_eq!(with(meta_url, None), Reads::All);
}

#[tokio::test]
async fn default_body_is_the_whole_event() {
    let (addr, mut seen) = serve(reply(200)).await;
    deliver_one(&build(addr).sink(), 1).await.unwrap();
    assert_eq!(seen.recv().await.unwrap().body, serde_json::to_value(event()).unwrap());
}

#[tokio::test]
async fn configured_headers_cannot_replace_the_idempotency_key() {
    let (addr, mut seen) = serve(reply(200)).await;
    let mut b = build(addr);
    // Past `header_name`, which refuses these at `check`.
    b.headers.push((HeaderName::from_static("idempotency-key"), "mine"));
    b.headers.push((HeaderName::from_static("x-expeditor-attempt"), "99"));
    deliver_one(&b.sink(), 2).await.unwrap();
    let req = seen.recv().await.unwrap();
    assert_eq!(req.headers["idempotency-key"], delivery(2).key.as_str());
    assert_eq!(req.headers["x-expeditor-attempt"], "2");
    assert_eq!(req.headers.get_all("idempotency-key").iter().count(), 1);
}

#[test]
fn header_names_are_checked() {
    assert_eq!(header_name("X-Api-Key").unwrap().as_str(), "x-api-key");
    assert!(header_name("Idempotency-Key").unwrap_err().contains("set by expeditor"));
    assert!(header_name("Content-Length").is_err());
    assert!(
        header_name("bad header")
            .unwrap_err()
            .contains("not a valid header name")
    );
}

#[tokio::test]
async fn unavailable_with_retry_after_is_retryable() {
    let mut r = reply(503);
    r.headers.push(("retry-after", "7".into()));
    r.body = "upstream\n  down\t(maintenance)".into();
    let err = status_outcome(r.clone()).await;
    assert!(err.retryable);
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(err.message, "HTTP 503 Service Unavailable: upstream down (maintenance)");
    // The service's own wait holds the whole sink, where the sink is one
    // service: a templated URL (as `build`'s) may name many hosts.
    assert!(!err.holds_sink, "a templated URL holds only this delivery");
    let (addr, _seen) = serve(r).await;
    let literal = Build {
        url: format!("http://{addr}/tickets"),
        ..build(addr)
    };
    let err = deliver_one(&literal.sink(), 1).await.unwrap_err();
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    assert!(err.holds_sink, "a literal URL's service holds the sink");
    // Without a Retry-After there is nothing to hold for.
    let (addr, _seen) = serve(reply(503)).await;
    let literal = Build {
        url: format!("http://{addr}/tickets"),
        ..build(addr)
    };
    assert!(!deliver_one(&literal.sink(), 1).await.unwrap_err().holds_sink);
}

#[tokio::test]
async fn too_many_requests_honours_an_http_date() {
    let mut r = reply(429);
    let at = SystemTime::now() + Duration::from_secs(120);
    r.headers.push(("retry-after", httpdate::fmt_http_date(at)));
    let err = status_outcome(r).await;
    assert!(err.retryable);
    let after = err.retry_after.unwrap();
    assert!(
        after > Duration::from_secs(100) && after <= Duration::from_secs(120),
        "{after:?}"
    );
    assert_eq!(err.message, "HTTP 429 Too Many Requests");
}

#[tokio::test]
async fn timeouts_and_server_errors_are_retryable() {
    for status in [408, 500, 502, 504, 599] {
        let err = status_outcome(reply(status)).await;
        assert!(err.retryable, "{status}");
        assert_eq!(err.retry_after, None, "{status}");
    }
    assert_eq!(status_outcome(reply(599)).await.message, "HTTP 599");
}

#[tokio::test]
async fn bad_request_is_permanent_with_a_short_body() {
    let mut r = reply(400);
    r.body = format!("{{\"error\":\n\"bad ticket\"}}{}", "x".repeat(500));
    let err = status_outcome(r).await;
    assert!(!err.retryable);
    assert!(
        err.message
            .starts_with("HTTP 400 Bad Request: {\"error\": \"bad ticket\"}xxx"),
        "{}",
        err.message
    );
    assert!(
        err.message.len() <= "HTTP 400 Bad Request: ".len() + 200,
        "{}",
        err.message
    );
}

#[tokio::test]
async fn not_found_is_permanent() {
    let err = status_outcome(reply(404)).await;
    assert!(!err.retryable);
    assert_eq!(err.message, "HTTP 404 Not Found");
}

#[tokio::test]
async fn redirects_are_permanent_and_not_followed() {
    for client in [direct(), proxied()] {
        redirects_are_permanent_and_not_followed_with(client).await;
    }
}

async fn redirects_are_permanent_and_not_followed_with(client: Client) {
    let mut r = reply(302);
    r.headers.push(("location", "/elsewhere".into()));
    let (addr, mut seen) = serve(r).await;
    let err = deliver_one(&build(addr).via(client).sink(), 1).await.unwrap_err();
    assert!(!err.retryable);
    assert_eq!(err.message, "HTTP 302 Found (redirects are not followed)");
    assert_eq!(seen.recv().await.unwrap().path, "/tickets/ord_456");
    assert!(seen.try_recv().is_err(), "the redirect was followed");
}

#[tokio::test]
async fn a_slow_server_times_out_retryably() {
    for client in [direct(), proxied()] {
        a_slow_server_times_out_retryably_with(client).await;
    }
}

async fn a_slow_server_times_out_retryably_with(client: Client) {
    let mut r = reply(200);
    r.delay = Duration::from_secs(5);
    let (addr, _seen) = serve(r).await;
    let mut b = build(addr).via(client);
    b.timeout = Duration::from_millis(200);
    let err = deliver_one(&b.sink(), 1).await.unwrap_err();
    assert!(err.retryable);
    assert_eq!(err.message, "timed out after 200ms");
}

/// A server that answers `status` with a body it never finishes: the head
/// and 5 of the 100 bytes it announces, then nothing, with the connection
/// held open.
async fn serve_a_stalled_body(status: u16) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!("HTTP/1.1 {status} Whatever\r\ncontent-length: 100\r\n\r\nhello");
                let _ = stream.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_status_decides_even_when_the_body_never_ends() {
    for client in [direct(), proxied()] {
        let proxied = client.is_proxied();
        let mut b = build(serve_a_stalled_body(200).await).via(client.clone());
        b.timeout = Duration::from_millis(300);
        let delivered = deliver_one(&b.sink(), 1).await;
        assert!(
            delivered.is_ok(),
            "a 200 whose body stalls is delivered (proxied: {proxied}): {delivered:?}"
        );

        let mut b = build(serve_a_stalled_body(503).await).via(client);
        b.timeout = Duration::from_millis(300);
        let err = deliver_one(&b.sink(), 1).await.unwrap_err();
        assert!(err.retryable, "proxied: {proxied}");
        assert!(
            err.message.starts_with("HTTP 503 Service Unavailable"),
            "the status, not a timeout (proxied: {proxied}): {}",
            err.message
        );
    }
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    for client in [direct(), proxied()] {
        connection_refused_is_retryable_with(client).await;
    }
}

async fn connection_refused_is_retryable_with(client: Client) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = deliver_one(&build(addr).via(client).sink(), 1).await.unwrap_err();
    assert!(err.retryable);
    assert_eq!(err.message, "connection refused");
}

#[tokio::test]
async fn a_template_error_is_permanent_and_names_the_key() {
    let (addr, mut seen) = serve(reply(200)).await;
    let mut b = build(addr);
    b.body = Some(json!({"points": "{{ order.id + 1 }}"}));
    let err = deliver_one(&b.sink(), 1).await.unwrap_err();
    assert!(!err.retryable);
    assert!(err.message.starts_with("sinks.kds.body.points: "), "{}", err.message);
    assert!(seen.try_recv().is_err(), "nothing should have been sent");
}

#[tokio::test]
async fn bad_rendered_url_or_header_is_permanent_and_quotes_neither() {
    let (addr, _seen) = serve(reply(200)).await;
    let mut b = build(addr);
    b.url = "{{ order.customer.id }}/tickets?token=s3cret".into();
    let err = deliver_one(&b.sink(), 1).await.unwrap_err();
    assert!(!err.retryable);
    assert_eq!(
        err.message,
        "sinks.kds.url: not a valid URL (relative URL without a base)"
    );

    let mut b = build(addr);
    b.headers = vec![(header_name("X-Token").unwrap(), "s3cret\n{{ order.id }}")];
    let err = deliver_one(&b.sink(), 1).await.unwrap_err();
    assert!(!err.retryable);
    assert_eq!(
        err.message,
        "sinks.kds.headers.x-token: rendered value is not a valid header value"
    );
}

#[test]
fn retry_after_forms() {
    let now = SystemTime::now();
    let header = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert("retry-after", v.parse().unwrap());
        h
    };
    assert_eq!(retry_after(&header(" 30 "), now), Some(Duration::from_secs(30)));
    let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
    assert_eq!(retry_after(&header(&past), now), Some(Duration::ZERO));
    let soon = httpdate::fmt_http_date(now + Duration::from_secs(61));
    let d = retry_after(&header(&soon), now).unwrap();
    assert!(d > Duration::from_secs(59) && d <= Duration::from_secs(61), "{d:?}");
    assert_eq!(retry_after(&header("soon"), now), None);
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}

#[test]
fn one_line_flattens_control_characters() {
    assert_eq!(one_line(b"a\r\nb\t\x1b[31mc  "), "a b [31mc");
    assert_eq!(one_line(b""), "");
}

/// With a proxy from the environment, requests go through reqwest to it (an
/// absolute URI in the request line names the sink's host), not straight to
/// the sink.
#[tokio::test]
async fn a_configured_proxy_gets_the_request() {
    let (proxy, mut seen) = serve(reply(200)).await;
    install_provider();
    let via = reqwest::Proxy::http(format!("http://{proxy}")).unwrap();
    let client = Client::proxied(reqwest::Client::builder().proxy(via)).unwrap();
    assert!(client.is_proxied());
    // Nothing listens on the sink's own address.
    let sink_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    deliver_one(&build(sink_addr).via(client).sink(), 1).await.unwrap();
    let req = seen.recv().await.unwrap();
    assert_eq!(req.uri.to_string(), format!("http://{sink_addr}/tickets/ord_456"));
    assert_eq!(req.headers["idempotency-key"], delivery(1).key.as_str());
}

#[test]
fn a_proxy_variable_sends_through_reqwest() {
    use std::ffi::OsString;
    let configured = |set: &[(&str, &str)]| {
        client::proxy_configured(|name| set.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v)))
    };
    assert!(!configured(&[]));
    assert!(!configured(&[("NO_PROXY", "*"), ("HTTPS_PROXY", "")]));
    // Each of reqwest's three, in either case.
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]
        .into_iter()
        .flat_map(|n| [n.to_owned(), n.to_lowercase()])
    {
        assert!(configured(&[(&name, "http://proxy.internal:3128")]), "{name}");
    }
    assert!(!direct().is_proxied());
}

/// The sink receives its url's host as `Host`, once, by either transport.
#[tokio::test]
async fn a_literal_url_sends_its_host() {
    let (addr, mut seen) = serve(reply(200)).await;
    for client in [direct(), proxied()] {
        let mut b = build(addr).via(client);
        b.url = format!("http://{addr}/tickets");
        deliver_one(&b.sink(), 1).await.unwrap();
        let req = seen.recv().await.unwrap();
        assert_eq!(req.path, "/tickets");
        assert_eq!(req.headers["host"], addr.to_string().as_str());
        assert_eq!(req.headers.get_all("host").iter().count(), 1);
    }
}

/// Reads one HTTP/1.1 request (head and a `content-length` body) off a raw
/// connection; `false` when the client closed it first.
async fn read_request(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                return true;
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A server that closes a kept-alive connection as the next request on it
/// arrives (as servers that close idle connections race a client reusing
/// one): the request is sent again at once on a fresh connection, as the
/// same attempt, not failed.
#[tokio::test]
async fn a_pooled_connection_closed_under_a_request_is_not_a_failed_attempt() {
    use tokio::io::AsyncWriteExt;
    install_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                // The first request on a connection is answered; the next is
                // read and the connection closed without an answer.
                if read_request(&mut stream).await {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                }
                if read_request(&mut stream).await {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let sink = build(addr).sink();
    assert_eq!(deliver_one(&sink, 1).await, Ok(()));
    assert_eq!(deliver_one(&sink, 1).await, Ok(()), "sent again on a fresh connection");
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// A 2xx whose body trickles is delivered once its status is in and a
/// moment of its body read, not at the end of the attempt's timeout.
#[tokio::test]
async fn a_trickling_body_does_not_hold_the_attempt() {
    use tokio::io::AsyncWriteExt;
    install_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request(&mut stream).await {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                        .await;
                    for _ in 0..100 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if stream.write_all(b"x").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    for client in [direct(), proxied()] {
        let sink = Build {
            timeout: Duration::from_secs(20),
            ..build(addr)
        }
        .via(client)
        .sink();
        let started = std::time::Instant::now();
        assert_eq!(deliver_one(&sink, 1).await, Ok(()));
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
}

/// A proxy http sinks cannot use is said at start, not first seen as
/// dead letters; the value itself (it may hold credentials) is not quoted.
#[test]
fn unusable_proxies_are_named() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).into())
    };
    assert!(client::proxy_problems(env(&[("HTTPS_PROXY", "http://u:p@proxy:3128")])).is_empty());
    assert!(client::proxy_problems(env(&[("HTTP_PROXY", "proxy.internal:3128")])).is_empty());
    let socks = client::proxy_problems(env(&[("ALL_PROXY", "socks5://u:secret@proxy:1080")]));
    assert_eq!(socks.len(), 1);
    assert!(
        socks[0].contains("ALL_PROXY names a socks5 proxy") && !socks[0].contains("secret"),
        "{socks:?}"
    );
    let broken = client::proxy_problems(env(&[("HTTP_PROXY", "http://[::1")]));
    assert!(broken[0].contains("HTTP_PROXY is not a proxy URL"), "{broken:?}");
}

/// A server that echoes a configured header's value (a token) in the body of
/// an error: the stored error says `[redacted]` instead.
#[tokio::test]
async fn an_echoed_secret_is_not_stored() {
    install_provider();
    let mut answer = reply(401);
    answer.body = "invalid credentials: Bearer s3cret-crave".into();
    let (addr, _seen) = serve(answer).await;
    let err = deliver_one(&build(addr).sink(), 1).await.unwrap_err();
    assert!(!err.message.contains("s3cret"), "{}", err.message);
    assert!(
        err.message.contains("invalid credentials: Bearer [redacted]"),
        "{}",
        err.message
    );
}

/// Root certificates named but unreadable are said at start.
#[test]
fn unreadable_root_certificates_are_named() {
    let dir = std::env::temp_dir().join(format!("expeditor-http-roots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ca.pem");
    std::fs::write(&file, "x").unwrap();
    let (file, missing) = (file.into_os_string(), dir.join("nope.pem").into_os_string());
    let with = |name: &'static str, value: std::ffi::OsString| move |n: &str| (n == name).then(|| value.clone());
    assert!(client::tls_problems(with("SSL_CERT_FILE", file)).is_empty());
    assert!(client::tls_problems(with("SSL_CERT_DIR", dir.clone().into())).is_empty());
    let problems = client::tls_problems(with("SSL_CERT_FILE", missing));
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].starts_with("SSL_CERT_FILE names ") && problems[0].contains("nope.pem"),
        "{problems:?}"
    );
    assert_eq!(
        client::tls_problems(with("SSL_CERT_DIR", dir.join("none").into())).len(),
        1
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
