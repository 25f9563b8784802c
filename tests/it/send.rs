//! `expeditor send`: a signed sample event, posted to the running daemon.

use std::time::Duration;

use crate::fake_sink::FakeSink;
use crate::harness::{Daemon, assert_success, one_sink_config, output_text};

#[tokio::test(flavor = "multi_thread")]
async fn send_posts_a_signed_sample_that_reaches_the_sink() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;

    let args = ["send", "crumb", "order.created", "--id", "evt_sent_crumb"];
    let out = d.cli(&args).await;
    assert_success(&out, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("HTTP 200"), "send output: {}", output_text(&out));
    assert!(
        stdout.contains("accepted"),
        "send prints the body: {}",
        output_text(&out)
    );

    let args = ["send", "crave", "order.created", "--id", "evt_sent_crave"];
    let out = d.cli(&args).await;
    assert_success(&out, &args);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("HTTP 200"),
        "{}",
        output_text(&out)
    );

    let got = sink.wait_for(2, Duration::from_secs(10)).await;
    let mut seen: Vec<(String, String, String)> = got
        .iter()
        .map(|r| {
            let body = r.json();
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&body["event"]["source"]),
                s(&body["event"]["id"]),
                s(&body["event"]["type"]),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "crave".to_owned(),
                "evt_sent_crave".to_owned(),
                "order.created".to_owned()
            ),
            (
                "crumb".to_owned(),
                "evt_sent_crumb".to_owned(),
                "order.created".to_owned()
            ),
        ]
    );
    // A realistic sample: it normalizes into an order with money and items.
    for request in &got {
        let body = request.json();
        assert!(
            body["order"]["total_cents"].as_i64().is_some_and(|c| c > 0),
            "sample order: {body}"
        );
        assert!(
            body["order"]["items"].as_array().is_some_and(|i| !i.is_empty()),
            "sample order: {body}"
        );
    }

    // Sending the same id again is the vendor retrying: a duplicate, still 2xx.
    let args = ["send", "crumb", "order.created", "--id", "evt_sent_crumb"];
    let out = d.cli(&args).await;
    assert_success(&out, &args);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("duplicate"),
        "{}",
        output_text(&out)
    );
    assert_eq!(sink.settle().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_without_id_uses_a_fresh_one_and_other_types_work() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    for event_type in ["order.created", "payment.completed", "inventory.low_stock"] {
        let args = ["send", "crumb", event_type];
        let out = d.cli(&args).await;
        assert_success(&out, &args);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("HTTP 200"),
            "{event_type}: {}",
            output_text(&out)
        );
    }
    let out = d.cli(&["send", "crumb", "order.created"]).await;
    assert_success(&out, &["send", "crumb", "order.created"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("accepted"),
        "a second send is a new event: {}",
        output_text(&out)
    );
    let got = sink.wait_for(4, Duration::from_secs(10)).await;
    let ids: std::collections::BTreeSet<String> = got.iter().map(|r| r.event_id()).collect();
    assert_eq!(ids.len(), 4, "four sends, four event ids: {ids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_fails_clearly() {
    let d = Daemon::start(&one_sink_config("", "http://127.0.0.1:9/unused")).await;

    let out = d.cli(&["send", "nope", "order.created"]).await;
    assert!(
        !out.status.success(),
        "send to an unknown source succeeded: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("nope"),
        "the message names the source: {}",
        output_text(&out)
    );

    let out = d.cli(&["send", "crumb", "order.exploded"]).await;
    assert!(
        !out.status.success(),
        "send of an unknown event type succeeded: {}",
        output_text(&out)
    );
    assert!(
        output_text(&out).contains("order.exploded"),
        "the message names the type: {}",
        output_text(&out)
    );

    // A non-2xx answer is a failure: exit code non-zero, status printed.
    let url = format!("http://{}/webhooks/missing", d.ingest);
    let out = d.cli(&["send", "crumb", "order.created", "--url", &url]).await;
    assert!(
        !out.status.success(),
        "a 404 answer is not success: {}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("HTTP 404"),
        "{}",
        output_text(&out)
    );
    assert!(d.events().await.is_empty(), "nothing was accepted");
}
