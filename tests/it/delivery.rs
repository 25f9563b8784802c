//! Delivery: a vendor's retries are deduped, a sink's failures are retried
//! with one `Idempotency-Key`, permanent failures become dead letters that
//! `replay` brings back.

use std::time::Duration;

use serde_json::Value;

use crate::fake_sink::{Answer, FakeSink};
use crate::harness::{Daemon, assert_success, one_sink_config, output_text};
use crate::vendor::{CRUMB_SECRET, crumb_order, crumb_signature, now};

const SECS_10: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn vendor_retries_of_one_event_are_delivered_once() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    let body = serde_json::to_vec(&crumb_order("evt_dup", 4250)).unwrap();

    // The vendor signs each retry afresh: a new `t`, so a new header.
    let mut statuses = Vec::new();
    for age in [0, 30, 60] {
        let sig = crumb_signature(CRUMB_SECRET, now() - age, &body);
        let reply = d
            .post(
                "crumb",
                &[("content-type", "application/json"), ("crumb-signature", &sig)],
                body.clone(),
            )
            .await;
        assert_eq!(reply.status, 200, "attempt with t = now - {age}: {}", reply.body);
        statuses.push(reply.json()["status"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(statuses, ["accepted", "duplicate", "duplicate"]);

    d.wait_delivery("crumb", "evt_dup", "hook", "delivered").await;
    let got = sink.settle().await;
    assert_eq!(got.len(), 1, "the sink must see the event once: {got:#?}");
    assert_eq!(got[0].event_id(), "evt_dup");
    assert_eq!(d.events().await.len(), 1);
    assert_eq!(d.deliveries().await.len(), 1);
}

/// An https sink is verified against the roots the daemon's system gives it
/// (here `SSL_CERT_FILE`, as OpenSSL and rustls read it) and delivered to
/// over TLS; a certificate no root vouches for is refused, the delivery
/// retried and dead-lettered, and nothing is sent in the clear.
#[tokio::test(flavor = "multi_thread")]
async fn an_https_sink_is_verified_and_delivered_over_tls() {
    let sink = FakeSink::start_tls().await;
    let config = one_sink_config("", &sink.url("/hook"));
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls/ca.pem");
    let d = Daemon::start_with_env(&config, &[("SSL_CERT_FILE", ca)]).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_tls", 4250)).await.status, 200);
    d.wait_delivery("crumb", "evt_tls", "hook", "delivered").await;
    let got = sink.settle().await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].event_id(), "evt_tls");

    // The same sink, to a daemon whose roots do not include the test CA.
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_untrusted", 4250)).await.status, 200);
    let dead = d.wait_delivery("crumb", "evt_untrusted", "hook", "dead").await;
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("certificate"), "last_error: {dead}");
    assert_eq!(sink.settle().await.len(), 1, "nothing more reached the sink");
}

/// A proxy named in the daemon's environment carries the http sinks'
/// requests: the sink's host (`.invalid`, which never resolves) is reached
/// only through it.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_from_the_environment_carries_deliveries() {
    let proxy = FakeSink::start().await;
    let config = one_sink_config("", "http://kds.invalid/api/tickets");
    let d = Daemon::start_with_env(&config, &[("HTTP_PROXY", &proxy.url(""))]).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_proxied", 4250)).await.status, 200);

    d.wait_delivery("crumb", "evt_proxied", "hook", "delivered").await;
    let got = proxy.settle().await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].path, "/api/tickets");
    assert_eq!(got[0].header("host"), Some("kds.invalid"));
    assert_eq!(got[0].event_id(), "evt_proxied");
    assert!(d.log().contains("through the proxy"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn sink_503_twice_then_200_is_three_attempts_with_one_key() {
    let sink = FakeSink::start().await;
    sink.script(&[503, 503], 200);
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_retry", 4250)).await.status, 200);

    let delivery = d.wait_delivery("crumb", "evt_retry", "hook", "delivered").await;
    let got = sink.settle().await;
    assert_eq!(got.len(), 3, "503, 503, 200: {got:#?}");
    let key = got[0].idempotency_key();
    assert!(!key.is_empty());
    for (i, request) in got.iter().enumerate() {
        assert_eq!(
            request.idempotency_key(),
            key,
            "attempt {} changed the Idempotency-Key",
            i + 1
        );
        assert_eq!(request.event_id(), "evt_retry");
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/hook");
    }
    assert_eq!(delivery["attempts"], 3, "delivery: {delivery}");
    assert_eq!(
        delivery["key"],
        key.as_str(),
        "the stored key is the header: {delivery}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sink_408_and_429_are_retried() {
    let sink = FakeSink::start().await;
    sink.script(&[408, 429, 500], 200);
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    // max_attempts = 3 in one_sink_config: 408, 429 and 500 use them all up.
    assert_eq!(d.post_crumb(&crumb_order("evt_4xx_retry", 4250)).await.status, 200);
    let dead = d.wait_delivery("crumb", "evt_4xx_retry", "hook", "dead").await;
    let got = sink.settle().await;
    assert_eq!(
        got.len(),
        3,
        "408, 429 and 500 are each retried until attempts run out: {got:#?}"
    );
    assert_eq!(dead["attempts"], 3, "{dead}");
    assert!(
        dead["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "last_error: {dead}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sink_400_is_a_dead_letter_that_replay_brings_back() {
    let sink = FakeSink::start().await;
    sink.script(&[], 400);
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_dead", 4250)).await.status, 200);

    // A 400 is permanent: one attempt, then a dead letter.
    let dead = d.wait_delivery("crumb", "evt_dead", "hook", "dead").await;
    let got = sink.settle().await;
    assert_eq!(got.len(), 1, "a 400 is not retried: {got:#?}");
    let key = got[0].idempotency_key();
    assert_eq!(dead["attempts"], 1, "{dead}");
    let listed = dead_letters(&d).await;
    assert_eq!(listed.len(), 1, "dead-letters --json: {listed:#?}");
    assert_eq!(listed[0]["event_id"], "evt_dead");
    assert_eq!(listed[0]["sink"], "hook");
    assert_eq!(listed[0]["status"], "dead");
    let table = d.cli(&["dead-letters"]).await;
    assert_success(&table, &["dead-letters"]);
    assert!(
        output_text(&table).contains("evt_dead"),
        "dead-letters table: {}",
        output_text(&table)
    );

    // The sink is fixed; replaying the dead letters delivers it once more.
    sink.script(&[], 200);
    let out = d.cli(&["replay", "--dead-letters"]).await;
    assert_success(&out, &["replay", "--dead-letters"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replayed 1 deliveries"),
        "replay output: {}",
        output_text(&out)
    );
    d.wait_delivery("crumb", "evt_dead", "hook", "delivered").await;
    let got = sink.settle().await;
    assert_eq!(got.len(), 2, "one more delivery after replay: {got:#?}");
    assert_eq!(got[1].idempotency_key(), key, "replay keeps the Idempotency-Key");
    assert_eq!(got[1].event_id(), "evt_dead");
    assert!(
        dead_letters(&d).await.is_empty(),
        "no dead letters after a successful replay"
    );

    // Nothing is dead now: replaying dead letters again does nothing.
    let out = d.cli(&["replay", "--dead-letters"]).await;
    assert_success(&out, &["replay", "--dead-letters"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replayed 0 deliveries"),
        "{}",
        output_text(&out)
    );

    // Replaying one event re-sends it, with the same key, even if delivered.
    let out = d.cli(&["replay", "--event", "crumb:evt_dead"]).await;
    assert_success(&out, &["replay", "--event", "crumb:evt_dead"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replayed 1 deliveries"),
        "{}",
        output_text(&out)
    );
    let got = sink.wait_for(3, SECS_10).await;
    assert_eq!(got[2].idempotency_key(), key);
    assert_eq!(got[2].event_id(), "evt_dead");
    d.wait_delivery("crumb", "evt_dead", "hook", "delivered").await;
    assert_eq!(sink.settle().await.len(), 3, "replay --event delivers once");

    // An event that does not exist is an error or zero, never a delivery.
    let out = d.cli(&["replay", "--event", "crumb:evt_never_seen"]).await;
    let text = output_text(&out);
    assert!(
        !out.status.success() || text.contains("replayed 0"),
        "replay of an unknown event: {text}"
    );
    assert_eq!(sink.settle().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_dead_letters_of_one_sink_only() {
    let sink_a = FakeSink::start().await;
    let sink_b = FakeSink::start().await;
    sink_a.script(&[], 400);
    sink_b.script(&[], 422);
    let config = format!(
        r#"{base}
{sources}
[sinks.a]
type = "http"
url = "{a}"
retry = {{ max_attempts = 2, initial = "50ms", max = "200ms" }}

[sinks.b]
type = "http"
url = "{b}"
retry = {{ max_attempts = 2, initial = "50ms", max = "200ms" }}

[[routes]]
name = "both"
sinks = ["a", "b"]
"#,
        base = crate::harness::base_config(""),
        sources = crate::vendor::SOURCES,
        a = sink_a.url("/a"),
        b = sink_b.url("/b"),
    );
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_two_dead", 4250)).await.status, 200);
    d.wait_delivery("crumb", "evt_two_dead", "a", "dead").await;
    d.wait_delivery("crumb", "evt_two_dead", "b", "dead").await;
    assert_eq!(dead_letters(&d).await.len(), 2);

    sink_a.script(&[], 200);
    let out = d.cli(&["replay", "--dead-letters", "--sink", "a"]).await;
    assert_success(&out, &["replay", "--dead-letters", "--sink", "a"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replayed 1 deliveries"),
        "{}",
        output_text(&out)
    );
    d.wait_delivery("crumb", "evt_two_dead", "a", "delivered").await;
    let left = dead_letters(&d).await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0]["sink"], "b");
    assert_eq!(sink_b.settle().await.len(), 1, "sink b is not replayed");
    assert_eq!(sink_a.requests().len(), 2);
}

async fn dead_letters(d: &Daemon) -> Vec<Value> {
    let listed = d.cli_json(&["dead-letters", "--json"]).await;
    // "Same shape as deliveries"; the key may name either.
    match (&listed["deliveries"], &listed["dead_letters"]) {
        (Value::Array(items), _) | (_, Value::Array(items)) => items.clone(),
        _ => panic!("dead-letters --json is not {{\"deliveries\": [...]}}: {listed}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_honoured_within_the_retry_max() {
    let patient = FakeSink::start().await;
    let capped = FakeSink::start().await;
    patient.script_answers(&[Answer::status(429).retry_after("1")], Answer::status(200));
    capped.script_answers(&[Answer::status(503).retry_after("3600")], Answer::status(200));
    let config = format!(
        r#"{base}
{sources}
[sinks.patient]
type = "http"
url = "{patient}"
retry = {{ max_attempts = 3, initial = "50ms", max = "5s" }}

[sinks.capped]
type = "http"
url = "{capped}"
retry = {{ max_attempts = 3, initial = "50ms", max = "300ms" }}

[[routes]]
name = "both"
sinks = ["patient", "capped"]
"#,
        base = crate::harness::base_config(""),
        sources = crate::vendor::SOURCES,
        patient = patient.url("/p"),
        capped = capped.url("/c"),
    );
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_retry_after", 4250)).await.status, 200);

    // Retry-After: 1 waits about a second, far beyond the 50 ms backoff.
    let got = patient.wait_for(2, SECS_10).await;
    let waited = got[1].at - got[0].at;
    assert!(
        waited >= Duration::from_millis(900),
        "Retry-After: 1 not honoured: retried after {waited:?}"
    );
    // Retry-After: 3600 is capped by retry.max (300 ms).
    let got = capped.wait_for(2, SECS_10).await;
    let waited = got[1].at - got[0].at;
    assert!(
        waited < Duration::from_secs(3),
        "Retry-After beyond retry.max not capped: {waited:?}"
    );
    d.wait_delivery("crumb", "evt_retry_after", "patient", "delivered")
        .await;
    d.wait_delivery("crumb", "evt_retry_after", "capped", "delivered").await;
}

/// A daemon with one http sink, `busy` (one attempt at a time, and
/// `sink_extra`), whose service answers its first request after `answer_in`
/// with a 429 and `Retry-After: retry_after`, then 200s; and `ids`, order
/// events routed to it, posted.
async fn events_to_a_busy_sink(
    ids: &[&str],
    retry_after: &'static str,
    answer_in: Duration,
    sink_extra: &str,
) -> (Daemon, FakeSink) {
    let sink = FakeSink::start().await;
    sink.script_answers(
        &[Answer::status(429).retry_after(retry_after).after(answer_in)],
        Answer::status(200),
    );
    let config = format!(
        r#"{base}
{sources}
[sinks.busy]
type = "http"
url = "{url}"
concurrency = 1
{sink_extra}

[[routes]]
name = "all"
sinks = ["busy"]
"#,
        base = crate::harness::base_config(""),
        sources = crate::vendor::SOURCES,
        url = sink.url("/busy"),
    );
    let d = Daemon::start(&config).await;
    for id in ids {
        assert_eq!(d.post_crumb(&crumb_order(id, 4250)).await.status, 200);
    }
    (d, sink)
}

/// A `Retry-After` is the service's own load: the sink's other deliveries
/// wait it out too, instead of each spending an attempt on the same 429.
#[tokio::test(flavor = "multi_thread")]
async fn retry_after_holds_the_whole_sink() {
    let ids = ["evt_busy_1", "evt_busy_2", "evt_busy_3"];
    // Slow enough that all three events are queued when the 429 comes.
    let answer_in = Duration::from_millis(500);
    let retry = r#"retry = { max_attempts = 2, initial = "50ms", max = "10s" }"#;
    let (d, sink) = events_to_a_busy_sink(&ids, "2", answer_in, retry).await;
    let got = sink.wait_for(4, SECS_10).await;
    let answered = got[0].at + answer_in;
    for later in &got[1..] {
        let after = later.at.saturating_duration_since(answered);
        assert!(
            after >= Duration::from_millis(1900),
            "{} was sent {after:?} after the 429, inside its Retry-After: 2",
            later.event_id()
        );
    }
    for id in ids {
        d.wait_delivery("crumb", id, "busy", "delivered").await;
    }
}

/// A hold longer than a claim's lease (twice the timeout, plus 30 s): the
/// claims waiting for it are given back before their lease lapses, and
/// taken again once it ends. Left waiting, they would lapse, be claimed
/// again, and each lapse would count an attempt never made.
#[tokio::test(flavor = "multi_thread")]
async fn claims_waiting_out_a_long_hold_keep_their_attempts() {
    let ids = ["evt_hold_1", "evt_hold_2", "evt_hold_3"];
    let answer_in = Duration::from_millis(300);
    let extra = "timeout = \"500ms\"\nretry = { max_attempts = 3, initial = \"50ms\", max = \"60s\" }";
    let (d, sink) = events_to_a_busy_sink(&ids, "32", answer_in, extra).await;
    let got = sink.wait_for(4, Duration::from_secs(60)).await;
    let answered = got[0].at + answer_in;
    for later in &got[1..] {
        assert!(later.at >= answered + Duration::from_secs(31), "sent inside the hold");
    }
    for id in ["evt_hold_2", "evt_hold_3"] {
        let row = d.wait_delivery("crumb", id, "busy", "delivered").await;
        assert_eq!(row["attempts"], 1, "one attempt was made: {row}");
    }
    let row = d.wait_delivery("crumb", "evt_hold_1", "busy", "delivered").await;
    assert_eq!(row["attempts"], 2, "{row}");
    assert_eq!(sink.settle().await.len(), 4, "each event sent once more at most");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sink_that_times_out_is_retried() {
    let sink = FakeSink::start().await;
    sink.script_answers(
        &[Answer::status(200).after(Duration::from_secs(3))],
        Answer::status(200),
    );
    let config = format!(
        r#"{base}
{sources}
[sinks.slow]
type = "http"
url = "{url}"
timeout = "300ms"
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms" }}

[[routes]]
name = "all"
sinks = ["slow"]
"#,
        base = crate::harness::base_config(""),
        sources = crate::vendor::SOURCES,
        url = sink.url("/slow"),
    );
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_slow", 4250)).await.status, 200);
    let delivery = d.wait_delivery("crumb", "evt_slow", "slow", "delivered").await;
    let got = sink.requests();
    assert_eq!(got.len(), 2, "one timed-out attempt, one success: {got:#?}");
    assert_eq!(got[0].idempotency_key(), got[1].idempotency_key());
    assert!(
        got[1].at - got[0].at < Duration::from_secs(2),
        "the timeout (300ms) did not cut the first attempt short"
    );
    assert_eq!(delivery["attempts"], 2, "{delivery}");
}

/// `expeditor_sink_concurrency_limit{sink="hook"}` from `/metrics`.
async fn concurrency_limit(d: &Daemon) -> usize {
    let metrics = d.api_text("/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("expeditor_sink_concurrency_limit{sink=\"hook\"} "))
        .unwrap_or_else(|| panic!("no concurrency limit for hook in:\n{metrics}"))
        .trim()
        .parse()
        .expect("a whole number")
}

/// Posts `n` events, four at a time: faster than a sink answering in
/// 50 ms at 8 at once takes them, so deliveries queue.
async fn backlog(d: &Daemon, prefix: &str, n: usize) {
    let post = |part: usize| async move {
        for i in (part..n).step_by(4) {
            let event = crumb_order(&format!("{prefix}_{i}"), 100);
            assert_eq!(d.post_crumb(&event).await.status, 200);
        }
    };
    tokio::join!(post(0), post(1), post(2), post(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn adaptive_concurrency_climbs_for_a_sink_that_keeps_up_and_stops_at_its_most() {
    let sink = FakeSink::start().await;
    sink.script_answers(&[], Answer::status(200).after(Duration::from_millis(50)));
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    assert_eq!(concurrency_limit(&d).await, 8, "an adaptive limit starts at 8");
    backlog(&d, "evt_arc", 600).await;
    let got = sink.wait_for(600, Duration::from_secs(60)).await;
    let most = sink.most_in_flight();
    // A sink that answers in 50 ms whatever the load: each round trip at
    // the limit earns one more, up to the most (32).
    assert!(most > 8, "the limit never rose past its start: {most} at once");
    assert!(most <= 32, "{most} at once, past the adaptive most of 32");
    let limit = concurrency_limit(&d).await;
    assert!((9..=32).contains(&limit), "limit {limit}");
    let ids: std::collections::HashSet<String> = got.iter().map(|r| r.event_id()).collect();
    assert_eq!(ids.len(), 600, "every event delivered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_concurrency_holds_however_well_the_sink_keeps_up() {
    let sink = FakeSink::start().await;
    sink.script_answers(&[], Answer::status(200).after(Duration::from_millis(50)));
    let config =
        one_sink_config("", &sink.url("/hook")).replace("timeout = \"2s\"", "timeout = \"2s\"\nconcurrency = 4");
    let d = Daemon::start(&config).await;
    backlog(&d, "evt_fixed", 200).await;
    sink.wait_for(200, Duration::from_secs(60)).await;
    assert_eq!(
        sink.most_in_flight(),
        4,
        "a backlog fills a fixed limit of 4 and never passes it"
    );
    assert_eq!(concurrency_limit(&d).await, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sink_that_pushes_back_gets_fewer_attempts_at_once() {
    let sink = FakeSink::start().await;
    sink.script(&[], 503);
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    backlog(&d, "evt_busy", 60).await;
    // Every first attempt answered 503 (retries come 50 ms later).
    sink.wait_for(60, SECS_10).await;
    let deadline = std::time::Instant::now() + SECS_10;
    loop {
        let limit = concurrency_limit(&d).await;
        if limit <= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {limit} at once after {} answers of 503",
            sink.requests().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And climbs back once the sink recovers.
    sink.script_answers(&[], Answer::status(200).after(Duration::from_millis(20)));
    backlog(&d, "evt_recovered", 300).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while concurrency_limit(&d).await <= 2 {
        assert!(std::time::Instant::now() < deadline, "the limit stayed down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_spaces_a_sinks_attempts() {
    let sink = FakeSink::start().await;
    let config =
        one_sink_config("", &sink.url("/hook")).replace("timeout = \"2s\"", "timeout = \"2s\"\nrate_limit = \"20/s\"");
    let d = Daemon::start(&config).await;
    backlog(&d, "evt_paced", 10).await;
    let got = sink.wait_for(10, SECS_10).await;
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    // 20 a second is one start per 50 ms or more. Arrival times at the sink
    // add each request's own delay (the first one's includes connecting), so
    // measure from the second: eight gaps of 50 ms, less some jitter, and
    // none close to a burst.
    let span = got[9].at - got[1].at;
    assert!(span >= Duration::from_millis(8 * 50 - 25), "{span:?}: {gaps:?}");
    assert!(gaps[1..].iter().all(|g| *g >= Duration::from_millis(25)), "{gaps:?}");
    assert_eq!(sink.settle().await.len(), 10);
}
