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

/// Slack's control characters in event data are escaped where Slack parses
/// them (the text, `mrkdwn` text objects), so an item named `<!channel>`
/// mentions no one; a `plain_text` header shows them as they are.
#[tokio::test]
async fn event_data_cannot_mention_or_link_in_a_message() {
    let slack = FakeSlack::start(TOKEN).await;
    let message = r##"
text = "Low stock: {{ stock.name }}"

[[sinks.alerts.blocks]]
type = "header"
text = { type = "plain_text", text = "{{ stock.name }}" }

[[sinks.alerts.blocks]]
type = "section"
text = { type = "mrkdwn", text = "{{ stock.name }}" }
"##;
    let config = config(&api_target(&slack)).replace(MESSAGE, message);
    let d = Daemon::start_with_env(&config, &[("SLACK_BOT_TOKEN", TOKEN)]).await;
    let mut event = low_stock("evt_low_esc");
    event["data"]["attributes"]["name"] = json!("Fish & Chips <!channel> <https://evil.example|verify>");
    assert_eq!(d.post_crumb(&event).await.status, 200);
    d.wait_delivery("crumb", "evt_low_esc", "alerts", "delivered").await;
    let got = slack.settle().await;
    let escaped = "Fish &amp; Chips &lt;!channel&gt; &lt;https://evil.example|verify&gt;";
    assert_eq!(got[0].body["text"], format!("Low stock: {escaped}"));
    assert_eq!(got[0].body["blocks"][1]["text"]["text"], escaped);
    assert_eq!(
        got[0].body["blocks"][0]["text"]["text"],
        "Fish & Chips <!channel> <https://evil.example|verify>"
    );
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

/// What the proxy saw of one tunnel request.
#[derive(Debug, Clone)]
struct Connect {
    /// `CONNECT` or `SOCKS5`.
    protocol: &'static str,
    /// `host:port`, as the client named it.
    target: String,
    /// `Proxy-Authorization`, or SOCKS5's `user:password`.
    credentials: Option<String>,
}

const PROXY_USER: &str = "user";
const PROXY_PASSWORD: &str = "proxy-pass-31";

/// An egress proxy for https, as corporate networks run them: HTTP CONNECT
/// and SOCKS5 (told apart by the first byte), each asking for
/// `user:proxy-pass-31` (HTTP 407, or SOCKS5's failed sub-negotiation,
/// without them). It records each request, then relays bytes both ways
/// untouched.
async fn egress_proxy() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Connect>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if client.peek(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = if first[0] == 5 {
                    socks5(client, log).await
                } else {
                    http_connect(client, log).await
                };
            });
        }
    });
    (addr, seen)
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<Connect>>>;

async fn http_connect(mut client: tokio::net::TcpStream, log: Seen) -> std::io::Result<()> {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        client.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let credentials = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_owned())
    });
    if request.first() != Some(&"CONNECT") || request.len() < 2 {
        return client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n").await;
    }
    let target = request[1].to_owned();
    log.lock().unwrap().push(Connect {
        protocol: "CONNECT",
        target: target.clone(),
        credentials: credentials.clone(),
    });
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{PROXY_PASSWORD}"))
    );
    if credentials.as_deref() != Some(want.as_str()) {
        return client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            .await;
    }
    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
        return client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
    };
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map(drop)
}

/// RFC 1928 with RFC 1929's username/password method, CONNECT only.
async fn socks5(mut client: tokio::net::TcpStream, log: Seen) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut greeting = [0u8; 2];
    client.read_exact(&mut greeting).await?;
    let mut methods = vec![0u8; greeting[1] as usize];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&2) {
        return client.write_all(&[5, 0xff]).await;
    }
    client.write_all(&[5, 2]).await?;
    let field = |len: usize| vec![0u8; len];
    let mut version_len = [0u8; 2];
    client.read_exact(&mut version_len).await?;
    let mut user = field(version_len[1] as usize);
    client.read_exact(&mut user).await?;
    let mut len = [0u8; 1];
    client.read_exact(&mut len).await?;
    let mut pass = field(len[0] as usize);
    client.read_exact(&mut pass).await?;
    let credentials = format!("{}:{}", String::from_utf8_lossy(&user), String::from_utf8_lossy(&pass));
    let accepted = credentials == format!("{PROXY_USER}:{PROXY_PASSWORD}");
    client.write_all(&[1, if accepted { 0 } else { 1 }]).await?;
    if !accepted {
        log.lock().unwrap().push(Connect {
            protocol: "SOCKS5",
            target: String::new(),
            credentials: Some(credentials),
        });
        return Ok(());
    }
    let mut request = [0u8; 4];
    client.read_exact(&mut request).await?;
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            client.read_exact(&mut len).await?;
            let mut name = field(len[0] as usize);
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => return client.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]).await,
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    log.lock().unwrap().push(Connect {
        protocol: "SOCKS5",
        target: target.clone(),
        credentials: Some(credentials),
    });
    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
        return client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await;
    };
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map(drop)
}

/// Starts a daemon whose Slack is `slack` (over https), with `env` added.
async fn proxied_daemon(slack: &FakeSlack, env: &[(&str, &str)]) -> Daemon {
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls/ca.pem");
    let mut all = vec![("SLACK_BOT_TOKEN", TOKEN), ("SSL_CERT_FILE", ca)];
    all.extend_from_slice(env);
    Daemon::start_with_env(&config(&api_target(slack)), &all).await
}

/// The alerts delivery once its first attempt has failed: it must be
/// pending (a retryable failure), with an error to show.
async fn first_failure(d: &Daemon) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let row = d.api("/api/deliveries?sink=alerts").await["deliveries"][0].clone();
        if row["last_error"].is_string() {
            assert_eq!(row["status"], "pending", "a proxy's refusal is retried: {row}");
            return row;
        }
        assert!(std::time::Instant::now() < deadline, "no attempt failed: {row}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `HTTPS_PROXY` (an http:// proxy, CONNECT) or `ALL_PROXY` (a
/// socks5h:// one) in its environment, and no `NO_PROXY` for the host, the
/// daemon reaches Slack through the proxy with its credentials, TLS inside
/// to Slack; with the host in `NO_PROXY` it goes direct. A refusal (wrong
/// credentials) and a proxy scheme it does not speak are retried failures
/// that name the proxy, never its password.
#[tokio::test(flavor = "multi_thread")]
async fn slack_goes_through_the_proxy_the_environment_names() {
    let slack = FakeSlack::start_tls(TOKEN).await;
    let (proxy, seen) = egress_proxy().await;
    let secret = format!("{PROXY_USER}:{PROXY_PASSWORD}");
    for (i, (var, url, protocol)) in [
        ("HTTPS_PROXY", format!("http://{secret}@{proxy}"), "CONNECT"),
        ("ALL_PROXY", format!("socks5h://{secret}@{proxy}"), "SOCKS5"),
        ("HTTPS_PROXY", format!("socks5://{secret}@{proxy}"), "SOCKS5"),
    ]
    .into_iter()
    .enumerate()
    {
        let d = proxied_daemon(&slack, &[(var, &url)]).await;
        let id = format!("evt_low_proxy_{i}");
        assert_eq!(d.post_crumb(&low_stock(&id)).await.status, 200);
        let delivered = d.wait_delivery("crumb", &id, "alerts", "delivered").await;
        assert_eq!(delivered["attempts"], 1, "{delivered}");
        let tunnels = seen.lock().unwrap().clone();
        assert_eq!(tunnels.len(), i + 1, "{tunnels:?}");
        let tunnel = &tunnels[i];
        assert_eq!(
            (tunnel.protocol, tunnel.target.as_str()),
            (protocol, slack.authority().as_str())
        );
        let sent = tunnel.credentials.as_deref().unwrap_or_default();
        assert!(
            sent.starts_with("Basic ") || sent == secret,
            "credentials sent: {tunnel:?}"
        );
        assert!(!d.log().contains(PROXY_PASSWORD), "{}", d.log());
    }
    let got = slack.settle().await;
    assert_eq!(got.len(), 3, "{got:#?}");
    assert!(got.iter().all(|r| r.body["channel"] == "#inventory-alerts"), "{got:#?}");

    // Wrong credentials, for either protocol: the proxy's refusal.
    for url in [
        format!("http://user:wrong@{proxy}"),
        format!("socks5://user:wrong@{proxy}"),
    ] {
        let d = proxied_daemon(&slack, &[("HTTPS_PROXY", &url)]).await;
        assert_eq!(d.post_crumb(&low_stock("evt_low_refused")).await.status, 200);
        let failing = first_failure(&d).await;
        let error = failing["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("proxy"), "{failing}");
        assert!(
            !error.contains("wrong") && !d.log().contains("user:wrong"),
            "{failing}\n{}",
            d.log()
        );
    }

    // A scheme it does not speak: refused, not sent around the proxy.
    let url = format!("https://{secret}@{proxy}");
    let d = proxied_daemon(&slack, &[("HTTPS_PROXY", &url)]).await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_https_proxy")).await.status, 200);
    let failing = first_failure(&d).await;
    assert!(
        failing["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("https:// proxy is not supported"),
        "{failing}"
    );
    assert!(
        d.log().contains("reaches a proxy only over"),
        "warned at start: {}",
        d.log()
    );
    assert!(!d.log().contains(PROXY_PASSWORD), "{}", d.log());
    assert_eq!(slack.requests().len(), 3, "nothing went around the proxy");
    drop(d);

    // The host in NO_PROXY: straight to Slack, no new tunnel.
    let before = seen.lock().unwrap().len();
    let url = format!("http://{secret}@{proxy}");
    let d = proxied_daemon(&slack, &[("HTTPS_PROXY", &url), ("NO_PROXY", "127.0.0.1")]).await;
    assert_eq!(d.post_crumb(&low_stock("evt_low_direct")).await.status, 200);
    d.wait_delivery("crumb", "evt_low_direct", "alerts", "delivered").await;
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "NO_PROXY's host went through the proxy"
    );
    assert_eq!(slack.settle().await.len(), 4);
}
