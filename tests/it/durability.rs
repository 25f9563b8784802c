//! Nothing acknowledged is lost: not to a sink outage, not to `kill -9`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fake_sink::{Answer, FakeSink};
use crate::harness::{Daemon, base_config};
use crate::vendor::{SOURCES, crumb_order};

const EVENTS: usize = 200;
const TASKS: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_events_survive_kill_9_and_a_sink_outage() {
    let sink = FakeSink::down();
    // Generous retries: nothing may dead-letter while the sink is down.
    let config = format!(
        r#"{base}
{SOURCES}
[sinks.hook]
type = "http"
url = "{url}"
timeout = "2s"
concurrency = 8
retry = {{ max_attempts = 1000, initial = "50ms", max = "500ms" }}

[[routes]]
name = "everything"
sinks = ["hook"]
"#,
        base = base_config(""),
        url = sink.url("/hook"),
    );
    let mut d = Daemon::start(&config).await;

    // 200 distinct events from 20 concurrent senders, every one acknowledged.
    let daemon = Arc::new(d);
    let mut senders = Vec::new();
    for task in 0..TASKS {
        let daemon = daemon.clone();
        senders.push(tokio::spawn(async move {
            for i in (task..EVENTS).step_by(TASKS) {
                let id = format!("evt_durable_{i:03}");
                let reply = daemon.post_crumb(&crumb_order(&id, 1000 + i as i64)).await;
                assert_eq!(reply.status, 200, "{id}: {}", reply.body);
                assert_eq!(reply.json()["status"], "accepted", "{id}: {}", reply.body);
            }
        }));
    }
    for sender in senders {
        sender.await.expect("sender task");
    }
    d = Arc::into_inner(daemon).expect("senders are done");
    let sent: BTreeSet<String> = (0..EVENTS).map(|i| format!("evt_durable_{i:03}")).collect();

    // Crash, come back, and only then let the sink up.
    d.kill9();
    d.restart().await;
    sink.up().await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let (keys, ids) = loop {
        let got = sink.requests();
        let keys: BTreeSet<String> = got.iter().map(|r| r.idempotency_key()).collect();
        let ids: BTreeSet<String> = got.iter().map(|r| r.event_id()).collect();
        if ids.len() >= EVENTS || Instant::now() > deadline {
            break (keys, ids);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let missing: Vec<_> = sent.difference(&ids).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events never arrived: {missing:?}",
        missing.len()
    );
    assert_eq!(ids, sent, "the sink got events nobody sent");
    assert_eq!(keys.len(), EVENTS, "one Idempotency-Key per (event, sink)");

    // And the store agrees: every delivery done, none dead.
    let deliveries = d.deliveries().await;
    assert_eq!(deliveries.len(), EVENTS);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending: Vec<_> = d
            .deliveries()
            .await
            .into_iter()
            .filter(|x| x["status"] != "delivered")
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "deliveries not delivered: {pending:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Dedupe keys survived the crash too: the vendor retrying is a duplicate.
    let reply = d.post_crumb(&crumb_order("evt_durable_007", 1007)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["status"], "duplicate", "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_in_flight_at_kill_9_runs_again_after_restart() {
    let sink = FakeSink::start().await;
    // The first attempt hangs; the daemon is killed while it waits.
    sink.script_answers(
        &[Answer::status(200).after(Duration::from_secs(30))],
        Answer::status(200),
    );
    let config = format!(
        r#"{base}
{SOURCES}
[sinks.hook]
type = "http"
url = "{url}"
timeout = "60s"
retry = {{ max_attempts = 5, initial = "50ms", max = "200ms" }}

[[routes]]
name = "everything"
sinks = ["hook"]
"#,
        base = base_config(""),
        url = sink.url("/hook"),
    );
    let mut d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_in_flight", 4250)).await.status, 200);
    let first = sink.wait_for(1, Duration::from_secs(10)).await;

    d.kill9();
    d.restart().await;
    let got = sink.wait_for(2, Duration::from_secs(15)).await;
    assert_eq!(got[1].idempotency_key(), first[0].idempotency_key());
    assert_eq!(got[1].event_id(), "evt_in_flight");
    d.wait_delivery("crumb", "evt_in_flight", "hook", "delivered").await;
}

/// One process per embedded store: a second `expeditor run` on the same
/// store directory (other ports) exits with a clear error instead of
/// serving beside the first, whose dedupe it would not see.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_the_same_store_is_refused() {
    let d = Daemon::start(&format!("{}\n{SOURCES}", base_config(""))).await;
    let reply = d.post_crumb(&crumb_order("evt_owned", 1000)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let config = std::fs::read_to_string(&d.config_path)
        .expect("read the first daemon's config")
        .replace(&d.ingest.to_string(), &crate::harness::free_addr().to_string())
        .replace(&d.admin.to_string(), &crate::harness::free_addr().to_string());
    let second = d.dir.path().join("second.toml");
    std::fs::write(&second, config).expect("write the second config");
    let out = crate::harness::run_cli(&second, d.dir.path(), &["run"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon ran: {stderr}");
    assert!(stderr.contains("is in use by another expeditor process"), "{stderr}");

    // The first is untouched and still dedupes.
    let reply = d.post_crumb(&crumb_order("evt_owned", 1000)).await;
    assert_eq!(reply.json()["status"], "duplicate", "{}", reply.body);
}

/// A disk that takes no more writes (every file the daemon writes is limited
/// in size, so a write past the limit fails as on a full disk): webhooks get
/// 503 with `Retry-After`, `/readyz` says the store is unavailable, nothing
/// acknowledged is lost, and once writes succeed again the same process is
/// ready and takes webhooks, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_takes_no_more_writes_gets_503_and_recovers_without_a_restart() {
    const LIMIT: u64 = 256 * 1024;
    let config = format!("{}\n{SOURCES}", base_config(""));
    let mut d = Daemon::start_with_file_size_limit(&config, LIMIT).await;
    let database = d.dir.path().join("store/expeditor.db");
    let database_full = || std::fs::metadata(&database).map(|m| m.len()).ok() == Some(LIMIT);
    assert_eq!(ready(&d).await, (200, "ok".to_string()));

    // Until every write fails: while only the WAL is at the limit, a
    // checkpoint lets it start over and writes succeed again; once the
    // database file is too (a checkpoint can then copy no new page into it),
    // nothing does.
    let (mut acked, mut refused_in_a_row) = (Vec::new(), 0);
    let started = Instant::now();
    for i in 0..5_000 {
        let id = format!("evt_full_{i:04}");
        let reply = d.post_crumb(&crumb_order(&id, 1000)).await;
        match reply.status {
            200 => {
                acked.push(id);
                refused_in_a_row = 0;
            }
            503 => {
                assert_eq!(reply.json()["error"], "temporarily unavailable, retry later");
                assert_eq!(reply.headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"5"[..]));
                refused_in_a_row += 1;
                if refused_in_a_row >= 20 && database_full() {
                    break;
                }
            }
            other => panic!("{id}: {other} {}\n{}", reply.body, d.log()),
        }
    }
    assert!(database_full(), "5,000 webhooks fit in 256 KiB files?\n{}", d.log());
    assert!(acked.len() >= 10, "only {} acknowledged before the limit", acked.len());

    // Readiness tells: a write that changes nothing still has to reach the
    // disk (an empty transaction would pass on a full one).
    wait_for_ready(&d, (503, "unavailable")).await;
    let reply = d.post_crumb(&crumb_order("evt_full_while_full", 1000)).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    // A line a second at most for what fails at every webhook, however many.
    let refusing = started.elapsed().as_secs() + 2;
    let log = d.log();
    for line in ["webhook not acknowledged: store unavailable", "store commit failed"] {
        let n = log.matches(line).count() as u64;
        assert!(
            (1..=refusing).contains(&n),
            "{n} lines of {line:?} in {refusing} s:\n{log}"
        );
    }

    d.lift_file_size_limit();
    wait_for_ready(&d, (200, "ok")).await;
    let reply = d.post_crumb(&crumb_order("evt_full_after", 1000)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["status"], "accepted");

    let stored: BTreeSet<String> = d.api("/api/events?limit=10000").await["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    assert!(stored.contains("evt_full_after"));
}

/// `/readyz`: its status and what it says of the store.
async fn ready(d: &Daemon) -> (u16, String) {
    let reply = reqwest::get(format!("http://{}/readyz", d.admin))
        .await
        .expect("readyz");
    let status = reply.status().as_u16();
    let body: serde_json::Value = reply.json().await.expect("readyz JSON");
    (status, body["store"].as_str().unwrap_or_default().to_string())
}

async fn wait_for_ready(d: &Daemon, want: (u16, &str)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = ready(d).await;
        if (got.0, got.1.as_str()) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz: {got:?}, want {want:?}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
