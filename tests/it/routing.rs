//! `[[routes]]`: by source, by event glob, by `when`; a sink chosen by several
//! routes gets the event once; an event no route takes is kept, not sent.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::fake_sink::FakeSink;
use crate::harness::{Daemon, assert_success, base_config};
use crate::vendor::{SOURCES, crave_order, crumb_order, crumb_order_typed, crumb_payment};

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_source_glob_and_when() {
    let sink = FakeSink::start().await;
    let sinks: String = ["crave_only", "orders", "big", "shared"]
        .iter()
        .map(|name| {
            format!(
                "[sinks.{name}]\ntype = \"http\"\nurl = \"{}\"\n\
                 retry = {{ max_attempts = 3, initial = \"50ms\", max = \"200ms\" }}\n\n",
                sink.url(&format!("/{name}"))
            )
        })
        .collect();
    let config = format!(
        r#"{base}
{SOURCES}
{sinks}
[[routes]]
name = "by-source"
sources = ["crave"]
sinks = ["crave_only"]

[[routes]]
name = "by-glob"
events = ["order.*"]
sinks = ["orders"]

[[routes]]
name = "by-when"
sources = ["crumb"]
events = ["order.created"]
when = "order.total_cents > 3000"
sinks = ["big"]

[[routes]]
name = "shared-1"
sources = ["crumb"]
events = ["order.created"]
sinks = ["shared"]

[[routes]]
name = "shared-2"
sources = ["crumb"]
events = ["order.c*", "order.upd?ted"]
sinks = ["shared"]
"#,
        base = base_config(""),
    );
    let d = Daemon::start(&config).await;

    let posts = [
        ("crumb", "evt_big", d.post_crumb(&crumb_order("evt_big", 4250)).await),
        (
            "crumb",
            "evt_small",
            d.post_crumb(&crumb_order("evt_small", 2798)).await,
        ),
        (
            "crumb",
            "evt_updated",
            d.post_crumb(&crumb_order_typed("evt_updated", "order.updated", 5000))
                .await,
        ),
        ("crumb", "evt_pay", d.post_crumb(&crumb_payment("evt_pay")).await),
        (
            "crave",
            "evt_crave",
            d.post_crave(&crave_order("evt_crave", "27.98")).await,
        ),
    ];
    for (source, id, reply) in &posts {
        assert_eq!(reply.status, 200, "{source}:{id}: {}", reply.body);
    }

    let expected: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("/crave_only", vec!["evt_crave"]),
        ("/orders", vec!["evt_big", "evt_crave", "evt_small", "evt_updated"]),
        ("/big", vec!["evt_big"]),
        ("/shared", vec!["evt_big", "evt_small", "evt_updated"]),
    ]);
    let total: usize = expected.values().map(Vec::len).sum();
    sink.wait_for(total, Duration::from_secs(10)).await;
    let got = sink.settle().await;
    let mut by_path: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for request in &got {
        by_path
            .entry(request.path.as_str())
            .or_default()
            .push(request.event_id());
    }
    for ids in by_path.values_mut() {
        ids.sort();
    }
    let expected: BTreeMap<&str, Vec<String>> = expected
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(by_path, expected, "which sink got which event");

    // Keys are per (event, sink): distinct across everything delivered.
    let keys: BTreeSet<String> = got.iter().map(|r| r.idempotency_key()).collect();
    assert_eq!(
        keys.len(),
        got.len(),
        "an Idempotency-Key was reused across (event, sink)"
    );

    // The payment no route takes is stored, with no delivery.
    let events = d.events().await;
    let pay = events
        .iter()
        .find(|e| e["id"] == "evt_pay")
        .unwrap_or_else(|| panic!("unrouted event not stored: {events:#?}"));
    assert_eq!(pay["source"], "crumb");
    assert_eq!(pay["type"], "payment.completed");
    assert!(
        pay["deliveries"].as_array().is_some_and(Vec::is_empty),
        "unrouted event has deliveries: {pay}"
    );
    assert_eq!(events.len(), posts.len(), "every accepted event is stored: {events:#?}");
    let deliveries = d.deliveries().await;
    assert!(deliveries.iter().all(|x| x["event_id"] != "evt_pay"), "{deliveries:#?}");
    assert_eq!(
        deliveries.len(),
        total,
        "one delivery per (event, chosen sink): {deliveries:#?}"
    );
}

/// A `when` that fails to evaluate is logged with the event it failed on,
/// once: the vendor's retry of that event is a duplicate, dropped before it
/// counts, so it is not logged again. The route is not taken, and its sink
/// gets a dead letter that says why, so the event can be replayed to it
/// once the condition is fixed.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_when_is_logged_once_not_again_for_a_retry() {
    let sink = FakeSink::start().await;
    let config = format!(
        r#"{base}
{SOURCES}
[sinks.hook]
type = "http"
url = "{url}"

[[routes]]
name = "broken"
when = "order.total_cents > 'x' + 1"
sinks = ["hook"]
"#,
        base = base_config(""),
        url = sink.url("/hook"),
    );
    let d = Daemon::start(&config).await;
    for _ in 0..3 {
        assert_eq!(d.post_crumb(&crumb_order("evt_when", 4250)).await.status, 200);
    }
    assert_eq!(d.post_crumb(&crumb_order("evt_when_2", 4250)).await.status, 200);
    let log = d.log();
    let said = |id: &str| {
        log.lines()
            .filter(|l| l.contains("route condition failed to evaluate") && l.contains(id))
            .count()
    };
    assert_eq!(said("evt_when_2"), 1, "{log}");
    let first = log
        .lines()
        .filter(|l| l.contains("route condition failed to evaluate"))
        .filter(|l| !l.contains("evt_when_2"))
        .count();
    assert_eq!(first, 1, "evt_when and its two retries: said once\n{log}");
    assert!(sink.settle().await.is_empty(), "the route is not taken");

    for id in ["evt_when", "evt_when_2"] {
        let dead = d.wait_delivery("crumb", id, "hook", "dead").await;
        assert_eq!(dead["attempts"], 0, "{dead}");
        let error = dead["last_error"].as_str().unwrap_or_default();
        assert!(error.starts_with("route \"broken\" could not decide: "), "{dead}");
    }
    let out = d.cli(&["replay", "--dead-letters", "--sink", "hook"]).await;
    assert_success(&out, &["replay", "--dead-letters", "--sink", "hook"]);
    let received = sink.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 2);
}
