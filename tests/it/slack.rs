//! `type = "slack"`: the daemon's slack-morphism client against a local
//! Slack (`fake_slack`) that checks the token, the channel, the text and the
//! blocks, and answers with Slack's own error shapes.
//!
//! Slack has no idempotency key: what is stable across a retry is the
//! delivery (one per event and sink, the same key in the store) and the
//! message itself, which the tests check is the same on every attempt.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_slack::{FakeSlack, SlackAnswer, WEBHOOK_PATH};
use crate::harness::{Daemon, assert_success, base_config, output_text};
use crate::vendor;

const TOKEN: &str = "xoxb-17-4242-expeditorTestToken";

/// CrumbPOS `inventory.low_stock`, with the fields the vendor guide's Slack
/// example reads (`name`, `location_name`, `quantity`, `reorder_point`).
fn low_stock(event_id: &str) -> Value {
    json!({
        "id": event_id,
        "type": "inventory.low_stock",
        "created_at": "2024-10-05T15:00:00Z",
        "data": {
            "id": "inv_1",
            "type": "inventory_item",
            "attributes": {
                "menu_item_id": "mi_burger",
                "name": "Burger buns",
                "location_id": "loc_main",
                "location_name": "Main St",
                "quantity": 12,
                "reorder_point": 20
            }
        }
    })
}

/// The shipped example's message: text plus a section with two fields.
const MESSAGE: &str = r##"
text = "⚠️ Low stock: {{ stock.name }} at {{ payload.data.attributes.location_name }}"

[[sinks.alerts.blocks]]
type = "section"
text = { type = "mrkdwn", text = "*Low stock:* {{ stock.name }} at {{ payload.data.attributes.location_name }}" }
fields = [
  { type = "mrkdwn", text = "*Current level*\n{{ stock.quantity }}" },
  { type = "mrkdwn", text = "*Reorder point*\n{{ stock.reorder_point }}" },
]
"##;

fn expected_blocks() -> Value {
    json!([{
        "type": "section",
        "text": {"type": "mrkdwn", "text": "*Low stock:* Burger buns at Main St"},
        "fields": [
            {"type": "mrkdwn", "text": "*Current level*\n12"},
            {"type": "mrkdwn", "text": "*Reorder point*\n20"}
        ]
    }])
}

/// A daemon whose `alerts` slack sink (keys `target`, then [`MESSAGE`])
/// takes CrumbPOS `inventory.low_stock`, with fast retries.
fn config(target: &str) -> String {
    let sink = r#"
[sinks.alerts]
type = "slack"
timeout = "2s"
retry = { max_attempts = 4, initial = "50ms", max = "3s" }
"#;
    format!(
        "{}{}{sink}{target}\n{MESSAGE}\n[[routes]]\nname = \"low-stock\"\nsources = [\"crumb\"]\nevents = [\"inventory.low_stock\"]\nsinks = [\"alerts\"]\n",
        base_config(""),
        vendor::SOURCES,
    )
}

/// Web API mode. (`token` is indented: the harness reads a line starting
/// `token = "` as the admin token.)
fn api_target(slack: &FakeSlack) -> String {
    format!(
        "  token = \"${{SLACK_BOT_TOKEN}}\"\nchannel = \"#inventory-alerts\"\napi_url = \"{}\"\n",
        slack.api_url()
    )
}

async fn api_daemon(slack: &FakeSlack, token: &str) -> Daemon {
    Daemon::start_with_env(&config(&api_target(slack)), &[("SLACK_BOT_TOKEN", token)]).await
}

#[tokio::test]
async fn bot_token_posts_text_and_blocks_to_the_channel() {
    let slack = FakeSlack::start(TOKEN).await;
    let d = api_daemon(&slack, TOKEN).await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_1")).await.status, 200);
    // Another event type is not routed to Slack.
    assert_eq!(
        d.post_crumb(&vendor::crumb_order("evt_order_1", 4250)).await.status,
        200
    );

    let delivered = d.wait_delivery("crumb", "evt_low_1", "alerts", "delivered").await;
    assert_eq!(delivered["attempts"], 1, "{delivered}");
    let got = slack.settle().await;
    assert_eq!(got.len(), 1, "{got:#?}");
    let r = &got[0];
    assert_eq!(r.path, "/api/chat.postMessage");
    assert_eq!(r.authorization.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
    assert!(
        r.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "{r:?}"
    );
    assert_eq!(r.body["channel"], "#inventory-alerts");
    assert_eq!(r.body["text"], "⚠️ Low stock: Burger buns at Main St");
    assert_eq!(r.body["blocks"], expected_blocks());
    assert_eq!(r.answered, "ok");
    assert!(
        !d.log().contains(TOKEN),
        "the token never reaches the logs:\n{}",
        d.log()
    );
}

#[tokio::test]
async fn outage_and_rate_limit_are_retried_with_the_same_message() {
    let slack = FakeSlack::start(TOKEN).await;
    slack.script(&[
        SlackAnswer::Status(503, "upstream unavailable"),
        SlackAnswer::RateLimited(1),
    ]);
    let d = api_daemon(&slack, TOKEN).await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_retry")).await.status, 200);

    let delivered = d.wait_delivery("crumb", "evt_low_retry", "alerts", "delivered").await;
    assert_eq!(delivered["attempts"], 3, "{delivered}");
    let got = slack.settle().await;
    assert_eq!(got.len(), 3, "{got:#?}");
    assert_eq!(got[0].answered, "503 upstream unavailable");
    assert_eq!(got[1].answered, "429 ratelimited");
    assert_eq!(got[2].answered, "ok");
    // Retry-After: 1 was honoured (the backoff alone would be ~100 ms).
    let waited = got[2].at - got[1].at;
    assert!(waited >= Duration::from_millis(950), "retried after {waited:?}");
    // Every attempt is the same message for the same delivery.
    for r in &got[1..] {
        assert_eq!(r.body, got[0].body);
    }
    let deliveries: Vec<Value> = d
        .deliveries()
        .await
        .into_iter()
        .filter(|x| x["sink"] == "alerts")
        .collect();
    assert_eq!(deliveries.len(), 1, "one delivery, one key: {deliveries:#?}");
    assert_eq!(deliveries[0]["key"], delivered["key"]);
}

#[tokio::test]
async fn channel_not_found_is_dead_lettered_then_replayed() {
    let slack = FakeSlack::start(TOKEN).await;
    slack.script(&[SlackAnswer::Error("channel_not_found")]);
    let d = api_daemon(&slack, TOKEN).await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_dead")).await.status, 200);

    let dead = d.wait_delivery("crumb", "evt_low_dead", "alerts", "dead").await;
    assert_eq!(dead["attempts"], 1, "permanent: not retried: {dead}");
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("channel_not_found"), "{dead}");
    assert_eq!(slack.settle().await.len(), 1);

    // The bot was invited to the channel: replay.
    let args = ["replay", "--dead-letters", "--sink", "alerts"];
    let out = d.cli(&args).await;
    assert_success(&out, &args);
    assert!(output_text(&out).contains("replayed 1"), "{}", output_text(&out));
    let delivered = d.wait_delivery("crumb", "evt_low_dead", "alerts", "delivered").await;
    assert_eq!(delivered["key"], dead["key"]);
    let got = slack.settle().await;
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[1].answered, "ok");
    assert_eq!(got[1].body, got[0].body);
}

#[tokio::test]
async fn a_wrong_token_is_invalid_auth_and_permanent() {
    let slack = FakeSlack::start(TOKEN).await;
    let d = api_daemon(&slack, "xoxb-17-4242-revokedToken").await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_auth")).await.status, 200);
    let dead = d.wait_delivery("crumb", "evt_low_auth", "alerts", "dead").await;
    assert_eq!(dead["attempts"], 1, "{dead}");
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("invalid_auth"), "{dead}");
    assert!(!error.contains("revokedToken"), "the token is not in the error: {dead}");
    let got = slack.settle().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].answered, "invalid_auth");
}

#[tokio::test]
async fn incoming_webhook_posts_retries_5xx_and_dead_letters_4xx() {
    let slack = FakeSlack::start(TOKEN).await;
    slack.script(&[SlackAnswer::Status(500, "rollup_error")]);
    let target = format!("webhook_url = \"{}\"\n", slack.webhook_url());
    let d = Daemon::start(&config(&target)).await;
    assert_eq!(d.post_crumb(&low_stock("evt_hook_1")).await.status, 200);

    let delivered = d.wait_delivery("crumb", "evt_hook_1", "alerts", "delivered").await;
    assert_eq!(delivered["attempts"], 2, "{delivered}");
    let got = slack.settle().await;
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0].answered, "500 rollup_error");
    assert_eq!(got[1].answered, "ok");
    for r in &got {
        assert_eq!(r.path, WEBHOOK_PATH);
        assert_eq!(r.authorization, None, "the URL is the credential");
        assert_eq!(
            r.body,
            json!({"text": "⚠️ Low stock: Burger buns at Main St", "blocks": expected_blocks()}),
            "no channel: the webhook fixes it"
        );
    }
    assert!(
        !d.log().contains("xhookSecret42"),
        "the webhook URL never reaches the logs:\n{}",
        d.log()
    );

    // Slack answers a deleted webhook with 404 no_service: permanent.
    slack.script(&[SlackAnswer::Status(404, "no_service")]);
    assert_eq!(d.post_crumb(&low_stock("evt_hook_2")).await.status, 200);
    let dead = d.wait_delivery("crumb", "evt_hook_2", "alerts", "dead").await;
    assert_eq!(dead["attempts"], 1, "{dead}");
    assert!(
        dead["last_error"].as_str().unwrap_or_default().contains("no_service"),
        "{dead}"
    );
    let last_error = dead["last_error"].as_str().unwrap_or_default();
    assert!(!last_error.contains("xhookSecret42"), "{dead}");
}

#[test]
fn check_refuses_a_broken_slack_sink() {
    let dir = tempfile::tempdir().unwrap();
    let broken = config("  token = \"xoxb-1-2-3\"\napi_url = \"http://127.0.0.1:9/api\"\n")
        .replace("{INGEST}", "127.0.0.1:18080")
        .replace("{ADMIN}", "127.0.0.1:19090")
        .replace("{DIR}", dir.path().to_str().unwrap());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &broken).unwrap();
    let out = std::process::Command::new(crate::harness::BIN)
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = broken.lines().position(|l| l == "[sinks.alerts]").unwrap() + 1;
    assert!(
        text.contains(&format!("config.toml:{line}:")) && text.contains("sinks.alerts.channel"),
        "names the sink's line and the missing key: {text}"
    );
}

/// What a CONNECT proxy saw of one tunnel request.
#[derive(Debug, Clone)]
struct Connect {
    target: String,
    authorization: Option<String>,
}

/// An HTTP proxy that serves only CONNECT, as an egress proxy for https
/// does: it asks for `user:secret` basic credentials (407 without them),
/// records each request, then relays bytes both ways untouched.
async fn connect_proxy() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Connect>>>) {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("user:proxy-pass-31")
    );
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let (log, want) = (log.clone(), want.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let mut lines = head.lines();
                let request: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
                let authorization = lines.find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("proxy-authorization")
                        .then(|| value.trim().to_owned())
                });
                if request.first() != Some(&"CONNECT") || request.len() < 2 {
                    let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n").await;
                    return;
                }
                let target = request[1].to_owned();
                log.lock().unwrap().push(Connect {
                    target: target.clone(),
                    authorization: authorization.clone(),
                });
                if authorization.as_deref() != Some(want.as_str()) {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

/// With `HTTPS_PROXY` in its environment (and no `NO_PROXY` for the host),
/// the daemon reaches Slack through a CONNECT tunnel with the proxy's
/// credentials, TLS inside it to Slack; with the host in `NO_PROXY` it goes
/// direct. The proxy's password never reaches the log.
#[tokio::test(flavor = "multi_thread")]
async fn slack_goes_through_the_proxy_the_environment_names() {
    let slack = FakeSlack::start_tls(TOKEN).await;
    let (proxy, seen) = connect_proxy().await;
    let proxy_url = format!("http://user:proxy-pass-31@{proxy}");
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls/ca.pem");
    let cfg = config(&api_target(&slack));
    let d = Daemon::start_with_env(
        &cfg,
        &[
            ("SLACK_BOT_TOKEN", TOKEN),
            ("SSL_CERT_FILE", ca),
            ("HTTPS_PROXY", &proxy_url),
        ],
    )
    .await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_proxy")).await.status, 200);
    let delivered = d.wait_delivery("crumb", "evt_low_proxy", "alerts", "delivered").await;
    assert_eq!(delivered["attempts"], 1, "{delivered}");
    let tunnels = seen.lock().unwrap().clone();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0].target, slack.authority());
    assert!(
        tunnels[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "the proxy's credentials were sent: {tunnels:?}"
    );
    let got = slack.settle().await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].body["channel"], "#inventory-alerts");
    assert!(!d.log().contains("proxy-pass-31"), "{}", d.log());
    drop(d);

    // Wrong credentials: the proxy's 407 is a retryable failure that says so.
    let wrong = format!("http://user:wrong@{proxy}");
    let d = Daemon::start_with_env(
        &cfg,
        &[
            ("SLACK_BOT_TOKEN", TOKEN),
            ("SSL_CERT_FILE", ca),
            ("HTTPS_PROXY", &wrong),
        ],
    )
    .await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_proxy_407")).await.status, 200);
    let failing = loop {
        let rows = d.api("/api/deliveries?sink=alerts").await;
        let row = rows["deliveries"][0].clone();
        if row["last_error"].is_string() {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = failing["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("proxy"), "{failing}");
    assert!(
        !error.contains("wrong") && !d.log().contains("user:wrong"),
        "{failing}\n{}",
        d.log()
    );
    drop(d);

    // The host in NO_PROXY: straight to Slack, no new tunnel.
    let before = seen.lock().unwrap().len();
    let d = Daemon::start_with_env(
        &cfg,
        &[
            ("SLACK_BOT_TOKEN", TOKEN),
            ("SSL_CERT_FILE", ca),
            ("HTTPS_PROXY", &proxy_url),
            ("NO_PROXY", "127.0.0.1"),
        ],
    )
    .await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_direct")).await.status, 200);
    d.wait_delivery("crumb", "evt_low_direct", "alerts", "delivered").await;
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "NO_PROXY's host went through the proxy"
    );
    assert_eq!(slack.settle().await.len(), 2);
}
