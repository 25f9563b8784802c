//! Running as a service (issue 5): systemd notifications, SIGTERM and SIGHUP
//! under load, `/metrics`, admin auth on the operational endpoints, the
//! CLI's filters and `events show`, and logs free of secrets.

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Mutex;

use crate::fake_sink::{Answer, FakeSink};
use crate::harness::{Daemon, base_config, http_client, one_sink_config};
use crate::vendor::{self, crumb_order};

/// Reads datagrams from a notify socket until one contains `needle`.
pub(crate) fn wait_for_notification(sock: &UnixDatagram, needle: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == needle);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {needle:?} within {timeout:?}; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_ready_status_watchdog_reloading_and_stopping() {
    let sink = FakeSink::start().await;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock_path = sock_dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config = one_sink_config("", &sink.url("/hook"));
    let mut d = Daemon::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .await;

    let first = wait_for_notification(&sock, "READY=1", Duration::from_secs(5));
    // While the store opens (minutes, once, for a big store's upgrade) it asks
    // for more start time, so systemd does not kill the start half way.
    assert!(
        first[0].lines().any(|l| l == "EXTEND_TIMEOUT_USEC=30000000")
            && first[0].lines().any(|l| l == "STATUS=opening the store"),
        "{first:?}"
    );
    let ready = first.last().unwrap();
    assert!(
        ready.contains("STATUS=serving 2 sources, 1 sinks, 1 routes"),
        "{ready:?}"
    );
    // Pings at half the interval: several within a second.
    let mut pings = 0;
    for _ in 0..3 {
        wait_for_notification(&sock, "WATCHDOG=1", Duration::from_secs(1));
        pings += 1;
    }
    assert_eq!(pings, 3);

    d.signal("HUP");
    let reload = wait_for_notification(&sock, "READY=1", Duration::from_secs(5));
    assert!(
        reload.iter().any(|m| m.lines().any(|l| l == "RELOADING=1")),
        "{reload:?}"
    );
    assert!(
        reload.iter().any(|m| m.contains("MONOTONIC_USEC=")),
        "RELOADING carries MONOTONIC_USEC: {reload:?}"
    );
    // A refusal stays in the status line, not overwritten by the summary.
    d.rewrite_config(&format!("{config}\nnot_a_section = 1\n"));
    d.signal("HUP");
    let refused = wait_for_notification(&sock, "READY=1", Duration::from_secs(5));
    let status = refused.last().unwrap();
    assert!(
        status.contains("STATUS=serving 2 sources") && status.contains("; reload refused: "),
        "{refused:?}"
    );
    // So does a key that waits for a restart.
    d.rewrite_config(&config.replace("[server]", "[server]\nmax_body = \"2KiB\""));
    d.signal("HUP");
    let partly = wait_for_notification(&sock, "READY=1", Duration::from_secs(5));
    let status = partly.last().unwrap();
    assert!(
        status.contains("; server.max_body changed: applied at the next restart"),
        "{partly:?}"
    );

    d.signal("TERM");
    wait_for_notification(&sock, "STOPPING=1", Duration::from_secs(5));
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}\n{}", d.log());
}

/// Posts crumb orders `prefix-0..n` from `tasks` concurrent senders and
/// returns the ids acknowledged with 2xx. Connection errors (the daemon is
/// stopping) are not acknowledgements and are skipped.
async fn post_load(d_ingest: std::net::SocketAddr, prefix: &str, n: usize, tasks: usize) -> BTreeSet<String> {
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let client = http_client();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (client, acked, prefix) = (client.clone(), acked.clone(), prefix.to_string());
        handles.push(tokio::spawn(async move {
            for i in (t..n).step_by(tasks) {
                let id = format!("{prefix}-{i}");
                let body = serde_json::to_vec(&crumb_order(&id, 1000 + i as i64)).unwrap();
                let sig = vendor::crumb_signature(vendor::CRUMB_SECRET, vendor::now(), &body);
                let resp = client
                    .post(format!("http://{d_ingest}/webhooks/crumb"))
                    .header("content-type", "application/json")
                    .header("crumb-signature", sig)
                    .body(body)
                    .send()
                    .await;
                if let Ok(r) = resp
                    && r.status().is_success()
                {
                    acked.lock().await.insert(id);
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    Arc::try_unwrap(acked).unwrap().into_inner()
}

fn keys_and_ids(sink: &FakeSink) -> (BTreeSet<String>, BTreeSet<String>) {
    let reqs = sink.requests();
    (
        reqs.iter().map(|r| r.idempotency_key()).collect(),
        reqs.iter().map(|r| r.event_id()).collect(),
    )
}

async fn wait_ids(sink: &FakeSink, want: &BTreeSet<String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, ids) = keys_and_ids(sink);
        let missing: Vec<_> = want.difference(&ids).collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{} acknowledged events never reached the sink, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_loses_no_acknowledged_event() {
    let sink = FakeSink::start().await;
    let config = one_sink_config("", &sink.url("/hook"))
        .replace("retry = { max_attempts = 3,", "retry = { max_attempts = 1000,");
    let mut d = Daemon::start(&config).await;
    let ingest = d.ingest;
    let load = tokio::spawn(async move { post_load(ingest, "term", 400, 16).await });
    // Stop in the middle of the burst.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.requests().len() < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}\n{}", d.log());
    let acked = load.await.unwrap();
    assert!(acked.len() >= 50, "only {} acknowledged before the stop", acked.len());
    assert!(d.log().contains("stopped"), "{}", d.log());

    // Whatever was acknowledged is delivered, after a restart if need be.
    d.start_again().await;
    wait_ids(&sink, &acked, Duration::from_secs(20)).await;
    let events = d.api("/api/events?limit=10000").await;
    let stored: BTreeSet<String> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        acked.is_subset(&stored),
        "acknowledged but not stored: {:?}",
        acked.difference(&stored).next()
    );
}

/// A vendor's client keeps its connection open between webhooks. At a stop,
/// such an idle connection is closed at once, not left to its header
/// timeout nor to the stop's own bound (a minute each here), so the daemon
/// exits promptly.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_idle_keep_alive_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = "header_timeout = \"60s\"\nshutdown_timeout = \"60s\"";
    let config = format!("{}\n{}", base_config(server), vendor::SOURCES);
    let mut d = Daemon::start(&config).await;
    let mut idle = tokio::net::TcpStream::connect(d.ingest).await.unwrap();
    idle.write_all(b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("not found") {
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let asked = Instant::now();
    d.signal("TERM");
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut buf))
        .await
        .expect("the idle connection was not closed at the stop");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let status = d.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}\n{}", d.log());
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    assert!(!d.log().contains("stop bound reached"), "{}", d.log());
}

/// A worker claims deliveries ahead of its attempts. At a stop, those it
/// never started are given back: after the restart they go out at once, as
/// their first attempt (not counted as a failed one), and the one in flight
/// at the stop finished before the exit.
#[tokio::test(flavor = "multi_thread")]
async fn stop_gives_back_claims_it_never_attempted() {
    let sink = FakeSink::start().await;
    sink.script_answers(&[], Answer::status(200).after(Duration::from_millis(1500)));
    let config =
        one_sink_config("", &sink.url("/hook")).replace("timeout = \"2s\"", "timeout = \"5s\"\nconcurrency = 1");
    assert!(config.contains("concurrency = 1"), "{config}");
    let mut d = Daemon::start(&config).await;
    let ids: Vec<String> = (0..5).map(|i| format!("evt_release_{i}")).collect();
    for id in &ids {
        let reply = d.post_crumb(&crumb_order(id, 1000)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    // One attempt in flight (the sink holds it 1.5 s), four claimed behind it.
    sink.wait_for(1, Duration::from_secs(10)).await;
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}\n{}", d.log());
    assert_eq!(sink.requests().len(), 1, "nothing new started after the stop");

    sink.script_answers(&[], Answer::status(200));
    d.start_again().await;
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    wait_ids(&sink, &want, Duration::from_secs(20)).await;
    for id in &ids {
        let delivery = d.wait_delivery("crumb", id, "hook", "delivered").await;
        assert_eq!(delivery["attempts"], 1, "{id}: {delivery}");
    }
}

/// A stop right after a reload keeps the stop bound: the engine the reload
/// replaced finishes its attempt in flight in the background, and the stop
/// signal is heard at once, not once that attempt ends (here 15 s, past
/// the 3 s bound).
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_right_after_a_reload_keeps_the_stop_bound() {
    let sink = FakeSink::start().await;
    sink.script_answers(&[], Answer::status(200).after(Duration::from_secs(15)));
    let config = one_sink_config("shutdown_timeout = \"3s\"", &sink.url("/hook"))
        .replace("\ntimeout = \"2s\"", "\ntimeout = \"20s\"");
    assert!(
        config.contains("shutdown_timeout = \"3s\"") && config.contains("\ntimeout = \"20s\""),
        "{config}"
    );
    let mut d = Daemon::start(&config).await;
    let reply = d.post_crumb(&crumb_order("evt_reload_then_stop", 1000)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The attempt is in flight: the sink holds it 15 s.
    sink.wait_for(1, Duration::from_secs(10)).await;
    d.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    d.signal("TERM");
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}\n{}", d.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "the stop waited for the retired engine's attempt: {:?}",
        stopping.elapsed()
    );
    let log = d.log();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        log.contains("stop bound reached"),
        "the attempt was cut off at the bound: {log}"
    );
}

/// A reload does not double a sink's concurrency: the new engine's worker
/// for a sink starts once the old one's attempt in flight has ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_a_sink_within_its_concurrency() {
    let sink = FakeSink::start().await;
    sink.script_answers(&[], Answer::status(200).after(Duration::from_millis(1500)));
    let config =
        one_sink_config("", &sink.url("/hook")).replace("\ntimeout = \"2s\"", "\ntimeout = \"5s\"\nconcurrency = 1");
    assert!(config.contains("concurrency = 1"), "{config}");
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_before_reload", 1000)).await.status, 200);
    // The first attempt is in flight for 1.5 s.
    sink.wait_for(1, Duration::from_secs(10)).await;
    d.signal("HUP");
    wait_log(&d, "configuration reloaded", 1).await;
    for id in ["evt_after_reload_1", "evt_after_reload_2"] {
        assert_eq!(d.post_crumb(&crumb_order(id, 1000)).await.status, 200);
    }
    for id in ["evt_before_reload", "evt_after_reload_1", "evt_after_reload_2"] {
        d.wait_delivery("crumb", id, "hook", "delivered").await;
    }
    assert_eq!(
        sink.most_in_flight(),
        1,
        "the old and the new engine attempted at once\n{}",
        d.log()
    );
}

/// The new worker keeps the old one's `rate_limit` spacing across a reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_a_sinks_rate_limit_spacing() {
    let sink = FakeSink::start().await;
    let config = one_sink_config("", &sink.url("/hook"))
        .replace("\ntimeout = \"2s\"", "\ntimeout = \"2s\"\nrate_limit = \"1/2s\"");
    assert!(config.contains("rate_limit = \"1/2s\""), "{config}");
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_paced_before", 1000)).await.status, 200);
    d.wait_delivery("crumb", "evt_paced_before", "hook", "delivered").await;
    d.signal("HUP");
    wait_log(&d, "configuration reloaded", 1).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_paced_after", 1000)).await.status, 200);
    let got = sink.wait_for(2, Duration::from_secs(10)).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1800),
        "one attempt per 2 s, across the reload: {gap:?}"
    );
    d.wait_delivery("crumb", "evt_paced_after", "hook", "delivered").await;
}

/// A reload that also changes what only a restart can (here the body
/// limit) applies the rest, keeps the running limit, and says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_the_rest_when_a_key_needs_a_restart() {
    let a = FakeSink::start().await;
    let b = FakeSink::start().await;
    let d = Daemon::start(&two_sink_config(&a.url("/a"), None, "")).await;
    d.rewrite_config(
        &two_sink_config(
            &a.url("/a"),
            Some(&b.url("/b")),
            "\n[[routes]]\nname = \"to-b\"\nsinks = [\"b\"]\n",
        )
        .replace("[server]", "[server]\nmax_body = \"1KiB\""),
    );
    d.signal("HUP");
    wait_log(&d, "configuration reloaded", 1).await;
    let log = d.log();
    assert!(
        log.contains("server.max_body") && log.contains("applied at the next restart"),
        "{log}"
    );
    assert!(!log.contains("reload refused"), "{log}");
    // Over the new limit, within the running one: still taken.
    let mut big = crumb_order("evt_big_after_reload", 1000);
    big["note"] = serde_json::json!("x".repeat(2000));
    let reply = d.post_crumb(&big).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The new route and sink are in.
    d.wait_delivery("crumb", "evt_big_after_reload", "b", "delivered").await;
    d.wait_delivery("crumb", "evt_big_after_reload", "a", "delivered").await;
}

fn two_sink_config(a: &str, b: Option<&str>, extra_route: &str) -> String {
    let mut c = format!(
        "{}{}\n[sinks.a]\ntype = \"http\"\nurl = \"{a}\"\ntimeout = \"2s\"\nretry = {{ max_attempts = 1000, initial = \"50ms\", max = \"200ms\" }}\n",
        base_config(""),
        vendor::SOURCES
    );
    if let Some(b) = b {
        c.push_str(&format!(
            "\n[sinks.b]\ntype = \"http\"\nurl = \"{b}\"\ntimeout = \"2s\"\nretry = {{ max_attempts = 1000, initial = \"50ms\", max = \"200ms\" }}\n"
        ));
    }
    c.push_str("\n[[routes]]\nname = \"to-a\"\nsinks = [\"a\"]\n");
    c.push_str(extra_route);
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_valid_config_and_refuses_an_invalid_one_under_load() {
    let a = FakeSink::start().await;
    let b = FakeSink::start().await;
    let mut d = Daemon::start(&two_sink_config(&a.url("/a"), None, "")).await;
    let ingest = d.ingest;
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                acked.extend(post_load(ingest, &format!("hup{round}"), 20, 4).await);
                round += 1;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Valid: adds sink b and a route of order events to it.
    d.rewrite_config(&two_sink_config(
        &a.url("/a"),
        Some(&b.url("/b")),
        "\n[[routes]]\nname = \"to-b\"\nevents = [\"order.*\"]\nsinks = [\"b\"]\n",
    ));
    d.signal("HUP");
    wait_log(&d, "configuration reloaded", 1).await;
    b.wait_for(5, Duration::from_secs(10)).await;

    // Invalid: refused; the config with sink b keeps running.
    d.rewrite_config(&format!(
        "{}\nnot_a_section = 1\n",
        two_sink_config(&a.url("/a"), None, "")
    ));
    d.signal("HUP");
    wait_log(&d, "reload refused", 1).await;
    let before = b.requests().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(
        b.requests().len() > before,
        "sink b stopped receiving after a refused reload"
    );
    assert!(
        d.log().contains("not_a_section"),
        "the refusal names the problem\n{}",
        d.log()
    );

    // Nothing acknowledged was lost across both reloads.
    wait_ids(&a, &acked, Duration::from_secs(20)).await;
    let metrics = d.api_text("/metrics").await;
    assert!(
        metrics.contains("expeditor_config_reloads_total{outcome=\"applied\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("expeditor_config_reloads_total{outcome=\"refused\"} 1"),
        "{metrics}"
    );
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(20)).await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_keeps_and_reports_pending_deliveries_of_a_removed_sink() {
    let a = FakeSink::start().await;
    let b = FakeSink::down();
    let mut d = Daemon::start(&two_sink_config(
        &a.url("/a"),
        Some(&b.url("/b")),
        "\n[[routes]]\nsinks = [\"b\"]\n",
    ))
    .await;
    for i in 0..3 {
        assert_eq!(
            d.post_crumb(&crumb_order(&format!("orphan-{i}"), 1200)).await.status,
            200
        );
    }
    a.wait_for(3, Duration::from_secs(10)).await;
    d.rewrite_config(&two_sink_config(&a.url("/a"), None, ""));
    d.signal("HUP");
    wait_log(&d, "no longer configured", 1).await;
    let pending = d.api("/api/deliveries?sink=b&status=pending").await;
    assert_eq!(pending["deliveries"].as_array().unwrap().len(), 3, "kept, not dropped");
    // Bring b back in the config and online: they are delivered.
    b.up().await;
    d.rewrite_config(&two_sink_config(
        &a.url("/a"),
        Some(&b.url("/b")),
        "\n[[routes]]\nsinks = [\"b\"]\n",
    ));
    d.signal("HUP");
    b.wait_for(3, Duration::from_secs(10)).await;
    d.kill9();
}

async fn wait_log(d: &Daemon, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.log().matches(needle).count() < times {
        assert!(Instant::now() < deadline, "log never said {needle:?}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `name{labels} value` samples of a Prometheus/OpenMetrics text body; every
/// non-comment line must parse.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        out.push((series.to_string(), value));
    }
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    out
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples.iter().find(|(s, _)| s == series).map_or(0.0, |(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_move_as_events_flow() {
    let sink = FakeSink::start().await;
    sink.script(&[503], 200);
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    let before = parse_metrics(&d.api_text("/metrics").await);
    assert_eq!(sample(&before, "expeditor_deliveries_pending{sink=\"hook\"}"), 0.0);

    assert_eq!(d.post_crumb(&crumb_order("m-1", 1000)).await.status, 200);
    assert_eq!(d.post_crumb(&crumb_order("m-1", 1000)).await.status, 200);
    let bad = d.post("crumb", &[("crumb-signature", "t=1,v1=00")], "{}").await;
    assert_eq!(bad.status, 401);
    d.wait_delivery("crumb", "m-1", "hook", "delivered").await;

    let after = parse_metrics(&d.api_text("/metrics").await);
    for (series, want) in [
        (
            "expeditor_webhook_requests_total{source=\"crumb\",outcome=\"accepted\"}",
            1.0,
        ),
        (
            "expeditor_webhook_requests_total{source=\"crumb\",outcome=\"duplicate\"}",
            1.0,
        ),
        (
            "expeditor_webhook_requests_total{source=\"crumb\",outcome=\"unauthorized\"}",
            1.0,
        ),
        ("expeditor_events_routed_total{source=\"crumb\"}", 1.0),
        (
            "expeditor_delivery_attempts_total{sink=\"hook\",outcome=\"retry\"}",
            1.0,
        ),
        (
            "expeditor_delivery_attempts_total{sink=\"hook\",outcome=\"delivered\"}",
            1.0,
        ),
        ("expeditor_ack_duration_seconds_count{source=\"crumb\"}", 2.0),
        ("expeditor_deliveries_pending{sink=\"hook\"}", 0.0),
    ] {
        assert_eq!(sample(&after, series), want, "{series}");
    }
    // A stale timestamp is verified as a mismatch first (wrong MAC).
    let reasons: f64 = after
        .iter()
        .filter(|(s, _)| s.starts_with("expeditor_verification_failures_total{source=\"crumb\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(reasons, 1.0);
    // The SQLite store's own fsyncs: the insert, and the delivery's claim
    // and outcomes, each waited for one (several may share one).
    let syncs = sample(&after, "expeditor_store_sync_duration_seconds_count");
    let synced = sample(&after, "expeditor_store_synced_operations_total");
    assert!(syncs >= 1.0, "{syncs} fsyncs");
    assert!(synced >= 3.0 && synced >= syncs, "{synced} writes in {syncs} fsyncs");
    assert!(sample(&after, "expeditor_store_sync_duration_seconds_sum") > 0.0);
    // And its checkpoints: a passive one follows the commits within about
    // 25 ms; this little log is never long enough to restart.
    let passive = "expeditor_store_checkpoint_duration_seconds_count{mode=\"passive\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let checkpointed = loop {
        let now = parse_metrics(&d.api_text("/metrics").await);
        if sample(&now, passive) >= 1.0 || std::time::Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(sample(&checkpointed, passive) >= 1.0, "no passive checkpoint in 10 s");
    assert_eq!(
        sample(
            &checkpointed,
            "expeditor_store_checkpoint_duration_seconds_count{mode=\"restart\"}"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operational_endpoints_and_the_token() {
    let config = format!(
        "{}\n{}\n[sinks.f]\ntype = \"file\"\npath = \"{{DIR}}/out.jsonl\"\n[[routes]]\nsinks = [\"f\"]\n",
        base_config("").replace("[admin]\n", "[admin]\ntoken = \"adm-tok-5e1\"\n"),
        vendor::SOURCES
    );
    let d = Daemon::start(&config).await;
    let http = http_client();
    let get = |path: &'static str, token: Option<&'static str>| {
        let mut req = http.get(format!("http://{}{path}", d.admin));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get("/healthz", None).await, 200);
    assert_eq!(get("/readyz", None).await, 200);
    assert_eq!(get("/metrics", None).await, 401);
    assert_eq!(get("/metrics", Some("wrong")).await, 401);
    assert_eq!(get("/metrics", Some("adm-tok-5e1")).await, 200);
    assert_eq!(get("/api/events/crumb/nope", Some("adm-tok-5e1")).await, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_filters_and_events_show() {
    let sink = FakeSink::start().await;
    sink.script(&[503], 200);
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    // show-1 alone first, so the scripted 503 is surely its first attempt's
    // answer: two events in flight at once reach the sink in either order.
    assert_eq!(d.post_crumb(&crumb_order("show-1", 4250)).await.status, 200);
    d.wait_delivery("crumb", "show-1", "hook", "delivered").await;
    assert_eq!(d.post_crave(&vendor::crave_order("show-2", "27.98")).await.status, 200);
    d.wait_delivery("crave", "show-2", "hook", "delivered").await;

    let only_crave = d.cli_json(&["deliveries", "--json", "--source", "crave"]).await;
    let rows = only_crave["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["event_id"], "show-2");
    let by_type = d
        .cli_json(&["events", "--json", "--type", "order.created", "--since", "1h"])
        .await;
    assert_eq!(by_type["events"].as_array().unwrap().len(), 2);
    let future = d
        .cli_json(&["events", "--json", "--since", "2999-01-01T00:00:00Z"])
        .await;
    assert!(future["events"].as_array().unwrap().is_empty());

    let out = d.cli(&["events", "show", "crumb:show-1"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("event     crumb:show-1"), "{text}");
    let sent = serde_json::to_string(&crumb_order("show-1", 4250)).unwrap();
    assert!(text.contains(&sent), "the body is shown as sent: {text}");
    assert!(
        text.contains("delivery to hook: delivered after 2 attempt(s)"),
        "{text}"
    );
    assert!(
        text.contains("#1") && text.contains("retry: HTTP 503"),
        "each attempt with its error: {text}"
    );
    let json: Value =
        serde_json::from_slice(&d.cli(&["events", "show", "crumb:show-1", "--json"]).await.stdout).unwrap();
    assert_eq!(
        json["event"]["deliveries"][0]["attempt_log"].as_array().unwrap().len(),
        2
    );
    // Byte for byte: numbers a JSON parser would read otherwise, spacing.
    let raw = r#"{ "id": "show-3", "type": "order.created", "createdAt": "2024-10-05T14:30:00Z",
  "data": {"orderId": "o-3", "total": "27.98", "score": 1.10, "ref": 123456789012345678901234} }"#;
    let sig = vendor::crave_signature(vendor::CRAVE_SECRET, raw.as_bytes());
    let reply = d
        .post(
            "crave",
            &[("content-type", "application/json"), ("x-crave-signature", &sig)],
            raw,
        )
        .await;
    assert_eq!(reply.status, 200);
    let out = d.cli(&["events", "show", "crave:show-3"]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains(raw), "{text}");

    let missing = d.cli(&["events", "show", "crumb:nope"]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such event"));
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_never_contain_secrets() {
    let sink = FakeSink::start().await;
    sink.script(&[503, 400], 200);
    let token = "kds-bearer-9d2c1f";
    let config = format!(
        "{}\n{}\n[sinks.kds]\ntype = \"http\"\nurl = \"{}\"\nheaders = {{ Authorization = \"Bearer ${{KDS_TOKEN}}\" }}\nretry = {{ max_attempts = 2, initial = \"50ms\", max = \"100ms\" }}\n[[routes]]\nsinks = [\"kds\"]\n",
        base_config("").replace("[admin]\n", "[admin]\ntoken = \"adm-secret-77aa\"\n"),
        vendor::SOURCES,
        sink.url("/kds"),
    );
    let mut d = Daemon::start_with_env(&config, &[("KDS_TOKEN", token), ("EXPEDITOR_LOG", "debug")]).await;
    for i in 0..3 {
        d.post_crumb(&crumb_order(&format!("sec-{i}"), 1000)).await;
    }
    d.post("crumb", &[("crumb-signature", "t=1,v1=abc")], "{}").await;
    d.post("crave", &[("x-crave-signature", "00")], "{\"id\":\"x\"}").await;
    sink.wait_for(4, Duration::from_secs(10)).await;
    d.signal("HUP");
    wait_log(&d, "configuration reloaded", 1).await;
    d.signal("TERM");
    d.wait_exit(Duration::from_secs(10)).await;
    let log = d.log();
    assert!(log.contains("delivery failed"), "the capture covers failures: {log}");
    // stderr is a file here, as under systemd: plain text, no colour codes,
    // so a search for the level finds the line.
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log that is not a terminal:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" WARN ") && l.contains("signature verification failed")),
        "{log}"
    );
    for secret in [vendor::CRUMB_SECRET, vendor::CRAVE_SECRET, token, "adm-secret-77aa"] {
        assert!(!log.contains(secret), "secret {secret:?} in the log:\n{log}");
    }
}

/// Anyone who reaches the port can send bad signatures: the log gets a line
/// a second per source for them, each saying how many it held back, and the
/// metrics count every one.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_bad_signatures_logs_a_line_a_second_and_counts_every_one() {
    let d = Daemon::start(&format!("{}\n{}", base_config(""), vendor::SOURCES)).await;
    let headers = [("content-type", "application/json"), ("x-crave-signature", "00")];
    let started = Instant::now();
    for i in 0..50 {
        let reply = d.post("crave", &headers, format!("{{\"id\":\"evt_flood_{i}\"}}")).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
    }
    let flood = started.elapsed();
    // A period later the next one goes out, with the count of the rest.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        d.post("crave", &headers, "{\"id\":\"evt_flood_last\"}").await.status,
        401
    );
    wait_log(&d, "held_back=", 2).await;

    let log = d.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("signature verification failed"))
        .collect();
    let held_back: u64 = lines
        .iter()
        .map(|l| {
            let n = l.split("held_back=").nth(1).unwrap_or_else(|| panic!("no count: {l}"));
            n.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        lines.len() as u64 + held_back,
        51,
        "each rejection a line or counted in one:\n{lines:#?}"
    );
    assert!(
        lines.len() as u64 <= flood.as_secs() + 2,
        "{} lines for a flood of {flood:?} and one more:\n{lines:#?}",
        lines.len()
    );
    let failures: f64 = parse_metrics(&d.api_text("/metrics").await)
        .iter()
        .filter(|(series, _)| {
            series.starts_with("expeditor_verification_failures_total{") && series.contains("source=\"crave\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failures, 51.0);
}

/// The shipped unit's `ExecReload=` lines, run in order as systemd runs
/// them (the first to fail fails the reload and the rest are not run), with
/// this test's binary, config and daemon in place of the unit's.
fn systemctl_reload(d: &Daemon) -> std::process::Output {
    let unit = include_str!("../../packaging/expeditor.service");
    let lines: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("ExecReload=")).collect();
    assert!(!lines.is_empty(), "the unit has no ExecReload");
    let mut last = None;
    for line in lines {
        let line = line
            .replace("/usr/local/bin/expeditor", crate::harness::BIN)
            .replace(
                "${CONFIGURATION_DIRECTORY}/config.toml",
                d.config_path.to_str().unwrap(),
            )
            .replace("$MAINPID", &d.pid().to_string());
        assert!(!line.contains('$'), "a variable left to expand: {line}");
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = std::process::Command::new(words[0])
            .args(&words[1..])
            .output()
            .expect("run an ExecReload line");
        let failed = !out.status.success();
        last = Some(out);
        if failed {
            break;
        }
    }
    last.expect("one line ran")
}

/// `systemctl reload` answers whether the config was taken: with a config
/// that does not pass `check`, the unit's reload fails, says why, and sends
/// no signal (the daemon keeps its config and never sees the bad one); a
/// valid one is checked, then applied.
#[tokio::test(flavor = "multi_thread")]
async fn the_units_reload_fails_on_a_bad_config_and_applies_a_good_one() {
    let a = FakeSink::start().await;
    let b = FakeSink::start().await;
    let d = Daemon::start(&two_sink_config(&a.url("/a"), None, "")).await;

    d.rewrite_config(&format!(
        "{}\nnot_a_section = 1\n",
        two_sink_config(&a.url("/a"), None, "")
    ));
    let out = systemctl_reload(&d);
    assert!(!out.status.success(), "the reload of a bad config must fail");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("not_a_section"), "the failure names the problem: {said}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = d.log();
    assert!(!log.contains("reload refused"), "no signal was sent: {log}");
    assert_eq!(
        d.post_crumb(&crumb_order("evt_after_bad_reload", 1000)).await.status,
        200
    );
    d.wait_delivery("crumb", "evt_after_bad_reload", "a", "delivered").await;

    d.rewrite_config(&two_sink_config(
        &a.url("/a"),
        Some(&b.url("/b")),
        "\n[[routes]]\nname = \"to-b\"\nevents = [\"order.*\"]\nsinks = [\"b\"]\n",
    ));
    let out = systemctl_reload(&d);
    assert!(out.status.success(), "{out:?}");
    wait_log(&d, "configuration reloaded", 1).await;
    assert_eq!(
        d.post_crumb(&crumb_order("evt_after_good_reload", 1000)).await.status,
        200
    );
    d.wait_delivery("crumb", "evt_after_good_reload", "b", "delivered")
        .await;
}
