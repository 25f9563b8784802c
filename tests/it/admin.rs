//! The admin listener: bearer token, listing filters, replay errors.

use serde_json::json;

use crate::fake_sink::FakeSink;
use crate::harness::{Daemon, assert_success, http_client, output_text};
use crate::vendor::{SOURCES, crave_order, crumb_order, crumb_payment};

#[tokio::test(flavor = "multi_thread")]
async fn the_api_needs_the_token_and_the_cli_sends_it() {
    let sink = FakeSink::start().await;
    sink.script(&[], 400);
    let config = format!(
        r#"[server]
listen = "{{INGEST}}"

[admin]
listen = "{{ADMIN}}"
token = "it-admin-token"

[store]
path = "{{DIR}}/store"

{SOURCES}
[sinks.hook]
type = "http"
url = "{url}"
retry = {{ max_attempts = 2, initial = "50ms", max = "200ms" }}

[[routes]]
name = "orders"
events = ["order.*"]
sinks = ["hook"]
"#,
        url = sink.url("/hook"),
    );
    let d = Daemon::start(&config).await;
    assert_eq!(
        d.admin_token.as_deref(),
        Some("it-admin-token"),
        "harness reads the token"
    );

    let http = http_client();
    let url = format!("http://{}/api/events", d.admin);
    for (case, token) in [
        ("no token", None),
        ("wrong token", Some("nope")),
        ("prefix of it", Some("it-admin")),
        ("longer than it", Some("it-admin-token-2")),
    ] {
        let mut req = http.get(&url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{case}");
    }
    let resp = http
        .get(&url)
        .header("authorization", "bearer it-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the scheme's case does not matter");
    let resp = http.get(format!("http://{}/healthz", d.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "/healthz is for probes: no token");
    assert_eq!(resp.text().await.unwrap().trim(), "ok");

    assert_eq!(d.post_crumb(&crumb_order("evt_adm_1", 4250)).await.status, 200);
    assert_eq!(d.post_crumb(&crumb_payment("evt_adm_pay")).await.status, 200);
    assert_eq!(d.post_crave(&crave_order("evt_adm_crave", "27.98")).await.status, 200);
    d.wait_delivery("crumb", "evt_adm_1", "hook", "dead").await;
    d.wait_delivery("crave", "evt_adm_crave", "hook", "dead").await;

    // Filters.
    // The event ids in a listing, sorted.
    let ids = |listing: serde_json::Value, key: &str| -> Vec<String> {
        let id_field = if key == "events" { "id" } else { "event_id" };
        let items = listing[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key}: {listing}"))
            .clone();
        let mut ids: Vec<String> = items
            .iter()
            .map(|e| e[id_field].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        ids(d.api("/api/events?source=crave").await, "events"),
        ["evt_adm_crave"]
    );
    assert_eq!(
        ids(d.api("/api/events?type=payment.completed").await, "events"),
        ["evt_adm_pay"]
    );
    assert_eq!(
        d.api("/api/events?limit=1").await["events"].as_array().map(Vec::len),
        Some(1)
    );
    // A limit that is not a count is refused, as a bad `since` is; one past
    // any number is the most.
    // Zero rows is refused too: an empty page without a cursor reads as "none".
    for (limit, status) in [
        ("abc", 400),
        ("-1", 400),
        ("0", 400),
        ("000", 400),
        ("010", 200),
        ("99999999999999999999999", 200),
    ] {
        let resp = http
            .get(format!("{url}?limit={limit}"))
            .bearer_auth("it-admin-token")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "limit={limit}");
    }
    // So is a cursor that is not one of the listing's own.
    for (path, before, status) in [
        ("/api/events", "yesterday", 400),
        ("/api/events", "1.2", 400),
        ("/api/events", "12", 200),
        ("/api/deliveries", "12", 400),
        ("/api/dead-letters", "1.x", 400),
        ("/api/dead-letters", "1700000000000.12", 200),
    ] {
        let resp = http
            .get(format!("http://{}{path}?before={before}", d.admin))
            .bearer_auth("it-admin-token")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path}?before={before}");
    }
    // A filter the listing does not take is refused rather than ignored,
    // which would list more than was asked for; the ones it takes are fine.
    for (query, status) in [
        ("/api/events?sink=kds", 400),
        ("/api/events?status=dead", 400),
        ("/api/events?source=crumb&foo=bar", 400),
        ("/api/dead-letters?status=delivered", 400),
        ("/api/deliveries?event=evt_adm_1", 400),
        (
            "/api/events?source=crumb&type=order.created&since=1h&limit=5&before=12",
            200,
        ),
        (
            "/api/deliveries?sink=kds&status=dead&source=crumb&type=order.created&since=1h&limit=5",
            200,
        ),
        (
            "/api/dead-letters?sink=kds&source=crumb&type=order.created&since=1h&limit=5",
            200,
        ),
    ] {
        let resp = http
            .get(format!("http://{}{query}", d.admin))
            .bearer_auth("it-admin-token")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{query}");
        if status == 400 {
            let body: serde_json::Value = resp.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap().contains("does not filter by"),
                "{query}: {body}"
            );
        }
    }
    // Another method is still 405, whatever its query.
    let resp = http
        .post(format!("http://{}/api/events?sink=kds", d.admin))
        .bearer_auth("it-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    // The CLI refuses a limit of 0 itself.
    let out = d.cli(&["events", "--limit", "0"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert_eq!(
        ids(d.api("/api/deliveries?status=dead").await, "deliveries"),
        ["evt_adm_1", "evt_adm_crave"]
    );
    assert_eq!(
        ids(d.api("/api/deliveries?status=delivered").await, "deliveries"),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(d.api("/api/deliveries?sink=nosuch").await, "deliveries"),
        Vec::<String>::new()
    );
    let events = d.api("/api/events?source=crumb").await;
    let crumb = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "evt_adm_1")
        .unwrap()
        .clone();
    assert_eq!(
        crumb["deliveries"],
        json!([{"sink": "hook", "status": "dead", "attempts": 1}]),
        "{crumb}"
    );

    // The CLI reads the token from the config.
    let listed = d.cli_json(&["deliveries", "--json"]).await;
    assert_eq!(listed["deliveries"].as_array().map(Vec::len), Some(2), "{listed}");

    // Replay errors are errors.
    let out = d.cli(&["replay", "--dead-letters", "--sink", "nosuch"]).await;
    assert!(
        !out.status.success(),
        "replay to a sink that does not exist: {}",
        output_text(&out)
    );
    assert!(output_text(&out).contains("nosuch"), "{}", output_text(&out));
    let out = d.cli(&["replay", "--event", "not-a-source-and-id"]).await;
    assert!(
        !out.status.success(),
        "replay --event without SOURCE:ID: {}",
        output_text(&out)
    );
    // Dead-letter filters do not apply to one event: refused, not dropped.
    for filter in [["--source", "crave"], ["--type", "order.created"], ["--since", "1h"]] {
        let mut args = vec!["replay", "--event", "crumb:evt_1"];
        args.extend(filter);
        let out = d.cli(&args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", output_text(&out));
        assert!(output_text(&out).contains(filter[0]), "{args:?}: {}", output_text(&out));
    }

    // A replay request far over its size is 413, as a webhook's would be.
    let resp = http
        .post(format!("http://{}/api/replay", d.admin))
        .bearer_auth("it-admin-token")
        .header("content-type", "application/json")
        .body(format!(r#"{{"dead_letters":true,"type":"{}"}}"#, "x".repeat(70 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert!(resp.text().await.unwrap().contains("64 KiB"));

    // Replaying one sink's dead letters via the API directly.
    sink.script(&[], 200);
    let resp = http
        .post(format!("http://{}/api/replay", d.admin))
        .bearer_auth("it-admin-token")
        .header("content-type", "application/json")
        .body(json!({"dead_letters": true, "sink": "hook"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(body, json!({"replayed": 2}));
    d.wait_delivery("crumb", "evt_adm_1", "hook", "delivered").await;
    d.wait_delivery("crave", "evt_adm_crave", "hook", "delivered").await;
    let out = d.cli(&["dead-letters", "--json"]).await;
    assert_success(&out, &["dead-letters", "--json"]);
}

/// A proxy in the operator's environment is not the admin API's way: the
/// CLI talks to this machine directly, and its token never goes to a proxy.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_ignores_proxies_from_the_environment() {
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let config = sources_only("token = \"it-admin-token\"\n");
    let env = [
        ("http_proxy", proxy_url.as_str()),
        ("HTTP_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
    ];
    let d = Daemon::start_with_env(&config, &env).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_proxy", 100)).await.status, 200);
    let listed = d.cli_json(&["events", "--json"]).await;
    assert_eq!(listed["events"][0]["id"], "evt_proxy", "{listed}");
    // Nothing reached the proxy.
    let accepted = tokio::time::timeout(std::time::Duration::from_millis(200), proxy.accept()).await;
    assert!(accepted.is_err(), "the CLI connected to the proxy");
}

/// `send` goes direct to a loopback address (the daemon's own listener, by
/// default), whatever proxy the environment names, and through that proxy
/// to any other host.
#[tokio::test(flavor = "multi_thread")]
async fn send_skips_the_proxy_only_for_loopback() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = proxy.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            log.lock().unwrap().push(head.lines().next().unwrap_or("").to_owned());
            let _ = conn
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    let env = [("http_proxy", proxy_url.as_str()), ("HTTP_PROXY", proxy_url.as_str())];
    let d = Daemon::start_with_env(&sources_only(""), &env).await;
    let out = d
        .cli(&["send", "crumb", "order.created", "--id", "evt_send_direct"])
        .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("HTTP 200"),
        "{}",
        output_text(&out)
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "went to the proxy: {:?}",
        seen.lock().unwrap()
    );

    let out = d
        .cli(&[
            "send",
            "crumb",
            "order.created",
            "--url",
            "http://kitchen.example/webhooks/crumb",
        ])
        .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("answered HTTP 502"),
        "{}",
        output_text(&out)
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("http://kitchen.example/webhooks/crumb"), "{seen:?}");
}

/// A listing as long as `--limit` says, on stderr, that more may be behind
/// it and the cursor of the next page, which lists the rest; a shorter one
/// says nothing. A cursor that is not one is a 400.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_cut_at_its_limit_says_so() {
    let config = sources_only("");
    let d = Daemon::start(&config).await;
    for id in ["evt_l1", "evt_l2", "evt_l3"] {
        assert_eq!(d.post_crumb(&crumb_order(id, 100)).await.status, 200);
    }
    let cut = d.cli(&["events", "--limit", "2"]).await;
    assert_success(&cut, &["events"]);
    let stdout = String::from_utf8_lossy(&cut.stdout);
    assert!(stdout.contains("evt_l3") && !stdout.contains("evt_l1"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&cut.stderr).contains("2 shown"),
        "{}",
        output_text(&cut)
    );
    // The cursor it names lists the rest.
    let said = String::from_utf8_lossy(&cut.stderr).into_owned();
    let cursor = said
        .split("--before ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| c == ')' || c.is_whitespace()).next())
        .unwrap_or_else(|| panic!("no cursor in {said:?}"));
    let rest = d.cli(&["events", "--limit", "2", "--before", cursor]).await;
    assert_success(&rest, &["events", "--before"]);
    let stdout = String::from_utf8_lossy(&rest.stdout);
    assert!(
        stdout.contains("evt_l1") && !stdout.contains("evt_l2") && !stdout.contains("evt_l3"),
        "{stdout}"
    );
    assert!(
        !String::from_utf8_lossy(&rest.stderr).contains("shown"),
        "{}",
        output_text(&rest)
    );
    let whole = d.cli(&["events", "--limit", "10"]).await;
    assert_success(&whole, &["events"]);
    assert!(
        !String::from_utf8_lossy(&whole.stderr).contains("shown"),
        "{}",
        output_text(&whole)
    );
}

/// The sources and no sink, with `admin_extra` under `[admin]`.
fn sources_only(admin_extra: &str) -> String {
    format!(
        r#"[server]
listen = "{{INGEST}}"

[admin]
listen = "{{ADMIN}}"
{admin_extra}
[store]
path = "{{DIR}}/store"

{SOURCES}
"#
    )
}

/// The admin listener serves at most 64 connections at once: sockets that
/// send nothing do not take every file descriptor, and clients are served
/// again once they go. Webhooks are answered meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn idle_admin_connections_are_capped_and_webhooks_go_on() {
    let d = Daemon::start(&sources_only("")).await;
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(d.admin).await.unwrap());
    }
    // Let the listener take all 64 before the next one knocks.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let healthz = || {
        let url = format!("http://{}/healthz", d.admin);
        async move {
            crate::harness::http_client()
                .get(url)
                .timeout(std::time::Duration::from_millis(700))
                .send()
                .await
        }
    };
    assert!(healthz().await.is_err(), "a 65th connection was served");
    assert_eq!(
        d.post_crumb(&crumb_order("evt_while_admin_full", 100)).await.status,
        200
    );
    // (The harness's own pooled connection may hold a place too, so the
    // last of these may still be in the kernel's backlog: close them all.)
    idle.clear();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = healthz().await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not served after a connection closed"
        );
    }
}

/// `/readyz` needs no token, and each probe commits a page to the store: a
/// flood of them probes at most about once a second.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_readyz_probes_the_store_about_once_a_second() {
    let d = Daemon::start(&sources_only("")).await;
    let synced = |text: String| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("expeditor_store_synced_operations_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no synced operations in {text}"))
    };
    let before = synced(d.api_text("/metrics").await);
    let started = std::time::Instant::now();
    let mut probes = Vec::new();
    for _ in 0..100 {
        let url = format!("http://{}/readyz", d.admin);
        probes.push(tokio::spawn(async move {
            crate::harness::http_client()
                .get(url)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for p in probes {
        assert_eq!(p.await.unwrap(), 200);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let wrote = synced(d.api_text("/metrics").await) - before;
    assert!(
        wrote <= seconds + 1,
        "{wrote} store writes for 100 probes in {seconds} s"
    );
}
