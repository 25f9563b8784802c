//! Against a real HTTP server on 127.0.0.1:0, inside the test, answering as
//! Slack documents it (the end-to-end tests with the daemon are in
//! `tests/it/slack.rs`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use expeditor_api::{Delivery, Event, EventMeta, Sink, Stock, TemplateSet, Views};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;

use super::*;

/// One scripted answer: status, content type, body, extra headers.
type Answer = (u16, &'static str, String, Vec<(&'static str, &'static str)>);

/// What the server saw: path, `Authorization`, JSON body.
type Seen = (String, Option<String>, Json);

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn serve(answers: Vec<Answer>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (answers, seen) = (answers.clone(), recorded.clone());
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (answers, seen) = (answers.clone(), seen.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    let auth = parts
                        .headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let json = serde_json::from_slice(&body).unwrap_or(Json::Null);
                    seen.lock().unwrap().push((parts.uri.path().to_owned(), auth, json));
                    let (status, ctype, body, headers) =
                        answers.lock().unwrap().pop_front().expect("a scripted answer");
                    let mut response = Response::builder().status(status).header("content-type", ctype);
                    for (k, v) in headers {
                        response = response.header(k, v);
                    }
                    Ok::<_, Infallible>(response.body(Full::new(Bytes::from(body))).unwrap())
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server { addr, seen }
}

fn json_answer(status: u16, body: Json) -> Answer {
    (status, "application/json; charset=utf-8", body.to_string(), Vec::new())
}

/// `chat.postMessage`'s documented success answer.
fn posted(channel: &str, text: &str) -> Answer {
    json_answer(
        200,
        json!({
            "ok": true,
            "channel": channel,
            "ts": "1503435956.000247",
            "message": {
                "text": text,
                "username": "expeditor",
                "bot_id": "B123ABC456",
                "type": "message",
                "subtype": "bot_message",
                "ts": "1503435956.000247"
            }
        }),
    )
}

fn event() -> Event {
    Event {
        event: EventMeta {
            id: "evt_9".into(),
            source: "crumb".into(),
            kind: "crumbpos".into(),
            event_type: "inventory.low_stock".into(),
            occurred_at: None,
            received_at: "2026-11-23T10:00:00Z".into(),
        },
        payload: json!({"data": {"attributes": {"location_name": "Main St"}}}),
        views: Views {
            stock: Some(Stock {
                item_id: Some("inv_1".into()),
                name: Some("Mozzarella".into()),
                location_id: Some("loc_main".into()),
                quantity: Some(12),
                reorder_point: Some(20),
            }),
            ..Default::default()
        },
    }
}

fn delivery() -> Delivery {
    Delivery {
        key: "0123456789abcdef0123456789abcdef".into(),
        attempt: 1,
        event: Arc::new(event()),
    }
}

const TEXT: &str = "Low stock: {{ stock.name }} at {{ payload.data.attributes.location_name }}";

fn blocks_template() -> Json {
    json!([
        {"type": "section", "text": {"type": "mrkdwn", "text": "*Low stock:* {{ stock.name }}"},
         "fields": [{"type": "mrkdwn", "text": "*Current level*\n{{ stock.quantity }}"},
                    {"type": "mrkdwn", "text": "*Reorder point*\n{{ stock.reorder_point }}"}]},
        {"type": "context", "elements": [{"type": "plain_text", "text": "{{ stock.location_id }}"}]}
    ])
}

fn api_sink(url: &str, blocks: Option<Json>) -> SlackSink {
    api_sink_to(url, blocks, "#inventory-alerts")
}

fn api_sink_to(url: &str, blocks: Option<Json>, channel: &str) -> SlackSink {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut set = TemplateSet::new();
    let text = set.text("sinks.alerts.text", TEXT).unwrap();
    let channel = set.text("sinks.alerts.channel", channel).unwrap();
    let blocks = blocks.map(|b| set.structured("sinks.alerts.blocks", &b).unwrap());
    SlackSink::new(SlackSinkConfig {
        name: "alerts".into(),
        target: SlackTarget::Api {
            token: "xoxb-test-token".into(),
            channel,
            api_url: check_url(url).unwrap(),
        },
        text: Some(text),
        blocks,
        timeout: Duration::from_secs(2),
        templates: set.finish(),
    })
    .unwrap()
}

fn webhook_sink(url: &str) -> SlackSink {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut set = TemplateSet::new();
    let text = set.text("sinks.alerts.text", TEXT).unwrap();
    SlackSink::new(SlackSinkConfig {
        name: "alerts".into(),
        target: SlackTarget::Webhook {
            url: check_url(url).unwrap(),
        },
        text: Some(text),
        blocks: None,
        timeout: Duration::from_secs(2),
        templates: set.finish(),
    })
    .unwrap()
}

async fn deliver(sink: &SlackSink) -> expeditor_api::Outcome {
    sink.deliver(&[delivery()]).await.pop().unwrap()
}

#[tokio::test]
async fn posts_text_and_blocks_with_the_bot_token() {
    let server = serve(vec![posted("C024BE91L", "Low stock")]).await;
    let sink = api_sink(&format!("http://{}/api", server.addr), Some(blocks_template()));
    assert_eq!(deliver(&sink).await, Ok(()));
    let seen = server.seen.lock().unwrap();
    let (path, auth, body) = &seen[0];
    assert_eq!(path, "/api/chat.postMessage");
    assert_eq!(auth.as_deref(), Some("Bearer xoxb-test-token"));
    assert_eq!(body["channel"], "#inventory-alerts");
    assert_eq!(body["text"], "Low stock: Mozzarella at Main St");
    // Blocks go out exactly as rendered, no field dropped or added.
    assert_eq!(
        body["blocks"],
        json!([
            {"type": "section", "text": {"type": "mrkdwn", "text": "*Low stock:* Mozzarella"},
             "fields": [{"type": "mrkdwn", "text": "*Current level*\n12"},
                        {"type": "mrkdwn", "text": "*Reorder point*\n20"}]},
            {"type": "context", "elements": [{"type": "plain_text", "text": "loc_main"}]}
        ])
    );
}

#[tokio::test]
async fn api_errors_are_classified() {
    let cases: Vec<(Answer, bool, Option<Duration>, &str)> = vec![
        (
            json_answer(200, json!({"ok": false, "error": "channel_not_found"})),
            false,
            None,
            "channel_not_found",
        ),
        (
            json_answer(200, json!({"ok": false, "error": "invalid_auth"})),
            false,
            None,
            "invalid_auth",
        ),
        (
            json_answer(200, json!({"ok": false, "error": "not_in_channel"})),
            false,
            None,
            "not_in_channel",
        ),
        (
            json_answer(200, json!({"ok": false, "error": "is_archived"})),
            false,
            None,
            "is_archived",
        ),
        (
            json_answer(200, json!({"ok": false, "error": "internal_error"})),
            true,
            None,
            "internal_error",
        ),
        (
            (
                429,
                "application/json; charset=utf-8",
                json!({"ok": false, "error": "ratelimited"}).to_string(),
                vec![("retry-after", "7")],
            ),
            true,
            Some(Duration::from_secs(7)),
            "429",
        ),
        (
            (503, "text/html", "<html>Service Unavailable</html>".into(), Vec::new()),
            true,
            None,
            "HTTP 503",
        ),
    ];
    for (answer, retryable, retry_after, needle) in cases {
        let server = serve(vec![answer]).await;
        let sink = api_sink(&format!("http://{}/api", server.addr), None);
        let err = deliver(&sink).await.unwrap_err();
        assert_eq!(err.retryable, retryable, "{err:?}");
        assert_eq!(err.retry_after, retry_after, "{err:?}");
        assert!(err.message.contains(needle), "{err:?} should mention {needle}");
        assert!(!err.message.contains("xoxb"), "{err:?}");
    }
}

#[tokio::test]
async fn no_server_is_retryable() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sink = api_sink(&format!("http://{addr}/api"), None);
    let err = deliver(&sink).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("refused"), "{err:?}");
}

#[tokio::test]
async fn webhook_posts_and_classifies_plain_text_answers() {
    let server = serve(vec![
        (200, "text/plain", "ok".into(), Vec::new()),
        (404, "text/plain", "no_service".into(), Vec::new()),
        (410, "text/plain", "channel_is_archived".into(), Vec::new()),
        (500, "text/plain", "rollup_error".into(), Vec::new()),
        (429, "text/plain", "rate_limited".into(), vec![("retry-after", "3")]),
    ])
    .await;
    let sink = webhook_sink(&format!("http://{}/services/T000/B000/XXXX", server.addr));
    assert_eq!(deliver(&sink).await, Ok(()));
    let err = deliver(&sink).await.unwrap_err();
    assert!(!err.retryable && err.message.contains("no_service"), "{err:?}");
    let err = deliver(&sink).await.unwrap_err();
    assert!(!err.retryable && err.message.contains("channel_is_archived"), "{err:?}");
    let err = deliver(&sink).await.unwrap_err();
    assert!(err.retryable && err.message.contains("rollup_error"), "{err:?}");
    let err = deliver(&sink).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert_eq!(err.retry_after, Some(Duration::from_secs(3)));
    assert!(err.holds_sink, "a rate limit holds the whole sink: {err:?}");
    let seen = server.seen.lock().unwrap();
    let (path, auth, body) = &seen[0];
    assert_eq!(path, "/services/T000/B000/XXXX");
    assert_eq!(auth, &None, "a webhook carries no token");
    assert_eq!(body, &json!({"text": "Low stock: Mozzarella at Main St"}));
}

#[test]
fn blocks_must_render_to_an_array_of_typed_objects() {
    assert!(message::blocks("s", Json::Null).unwrap().is_none());
    assert!(message::blocks("s", json!([])).unwrap().is_none());
    let err = message::blocks("s", json!({"type": "section"})).unwrap_err();
    assert!(!err.retryable && err.message.contains("sinks.s.blocks"), "{err:?}");
    let err = message::blocks("s", json!([{"type": "divider"}, {"text": "x"}])).unwrap_err();
    assert!(err.message.contains("sinks.s.blocks[1]"), "{err:?}");
    let blocks = message::blocks("s", json!([{"type": "future_block", "x": 1}])).unwrap();
    assert_eq!(
        serde_json::to_value(blocks).unwrap(),
        json!([{"type": "future_block", "x": 1}])
    );
}

#[test]
fn tokens_and_urls_are_checked() {
    assert!(check_token("xoxb-1-2-abc").is_ok());
    assert!(check_token("").is_err());
    assert!(check_token("8f14e45fceea167a5a36dedd4bea2543").is_err());
    assert!(check_token("xoxb-1 2").is_err());
    for rotating in ["xoxe.xoxb-1-MS0yLTIy", "xoxe-1-My0xLTIyMTA"] {
        let why = check_token(rotating).unwrap_err();
        assert!(why.contains("rotating") && !why.contains(rotating), "{why}");
    }
    assert!(check_url("https://slack.com/api").is_ok());
    assert!(check_url("http://127.0.0.1:9/api").is_ok());
    assert!(check_url("http://localhost:9/api").is_ok());
    let err = check_url("http://hooks.slack.com/services/T/B/secret").unwrap_err();
    assert!(err.contains("https") && !err.contains("secret"), "{err}");
    assert!(check_url("ftp://x").is_err());
    assert!(check_url("not a url").is_err());
}

#[test]
fn debug_hides_the_token_and_the_webhook_url() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sink = api_sink("https://slack.com/api", None);
    let debug = format!("{sink:?}");
    assert!(!debug.contains("xoxb-test-token"), "{debug}");
    let sink = webhook_sink("https://hooks.slack.com/services/T000/B000/sekrit");
    let debug = format!("{sink:?}");
    assert!(!debug.contains("sekrit"), "{debug}");
}

/// The message's templates decide what the sink reads: the channel, text
/// and blocks together.
#[test]
fn reads_what_its_templates_read() {
    use expeditor_api::Reads;
    // TEXT names a view (`stock`) and the payload.
    assert_eq!(webhook_sink("http://127.0.0.1:9/hook").reads(), Reads::All);
    let mut set = TemplateSet::new();
    let text = set
        .text("sinks.alerts.text", "{{ event.type }} from {{ event.source }}")
        .unwrap();
    let sink = SlackSink::new(SlackSinkConfig {
        name: "alerts".into(),
        target: SlackTarget::Webhook {
            url: check_url("http://127.0.0.1:9/hook").unwrap(),
        },
        text: Some(text),
        blocks: None,
        timeout: Duration::from_secs(2),
        templates: set.finish(),
    })
    .unwrap();
    assert_eq!(sink.reads(), Reads::Meta);
}

/// Slack limits posting per channel: a 429 holds the whole sink when its
/// channel is fixed, and only the told delivery when the channel is a
/// template (one sink, many channels).
#[tokio::test]
async fn a_templated_channel_holds_only_its_delivery_on_a_429() {
    let ratelimited = || {
        (
            429,
            "application/json; charset=utf-8",
            json!({"ok": false, "error": "ratelimited"}).to_string(),
            vec![("retry-after", "3")],
        )
    };
    let server = serve(vec![ratelimited()]).await;
    let fixed = api_sink(&format!("http://{}/api", server.addr), None);
    let err = deliver(&fixed).await.unwrap_err();
    assert!(
        err.holds_sink && err.retry_after == Some(Duration::from_secs(3)),
        "{err:?}"
    );

    let server = serve(vec![ratelimited()]).await;
    let per_location = api_sink_to(
        &format!("http://{}/api", server.addr),
        None,
        "#stock-{{ stock.location_id }}",
    );
    let err = deliver(&per_location).await.unwrap_err();
    assert_eq!(err.retry_after, Some(Duration::from_secs(3)), "{err:?}");
    assert!(!err.holds_sink, "{err:?}");
}
