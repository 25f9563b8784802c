//! `expeditor send`: a signed sample event, posted to the running daemon.

use std::time::Duration;

use crate::fake_sink::FakeSink;
use crate::harness::{BIN, Daemon, assert_success, one_sink_config, output_text};

/// Runs `expeditor send ARGS`, which must succeed with `HTTP 200`; its stdout.
async fn send_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args).await;
    assert_success(&out, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("HTTP 200"), "{args:?}: {}", output_text(&out));
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn send_posts_a_signed_sample_that_reaches_the_sink() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;

    let stdout = send_ok(&d, &["send", "crumb", "order.created", "--id", "evt_sent_crumb"]).await;
    assert!(stdout.contains("accepted"), "send prints the body: {stdout}");

    send_ok(&d, &["send", "crave", "order.created", "--id", "evt_sent_crave"]).await;

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
        send_ok(&d, &["send", "crumb", event_type]).await;
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
    // On stderr, as an error, with the answer's body; stdout stays empty.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error:") && stderr.contains("answered HTTP 404") && stderr.contains("unknown source"),
        "{}",
        output_text(&out)
    );
    assert!(out.stdout.is_empty(), "{}", output_text(&out));
    assert!(d.events().await.is_empty(), "nothing was accepted");

    // An id the source refuses (too long) is said as the source's reason,
    // with no word of the hmac-only field keys a vendor source has not.
    let long = "x".repeat(1100);
    let out = d.cli(&["send", "crave", "order.created", "--id", &long]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot build a sample event"), "{stderr}");
    assert!(!stderr.contains("id_field"), "{stderr}");

    // An empty --id is the command's mistake, said as such.
    let out = d.cli(&["send", "crumb", "order.created", "--id", ""]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--id must not be empty"),
        "{}",
        output_text(&out)
    );
    assert!(d.events().await.is_empty(), "nothing was accepted");
}

/// An `hmac` source reads its id, type and time where its config says; its
/// own test webhook puts them there, and a config whose fields cannot all
/// be in one body is refused before anything runs.
#[tokio::test(flavor = "multi_thread")]
async fn send_to_an_hmac_source_puts_the_fields_where_it_reads_them() {
    let sink = FakeSink::start().await;
    let config = format!(
        r#"{base}
[sources.generic]
kind = "hmac"
secrets = ["generic-secret"]
header = "X-Signature"
timestamp_header = "X-Timestamp"
id_field = "event.id"
type_field = "event.kind"
time_field = "meta.at"

[sinks.hook]
type = "http"
url = "{url}"

[[routes]]
name = "everything"
sinks = ["hook"]
"#,
        base = crate::harness::base_config(""),
        url = sink.url("/hook"),
    );
    let d = Daemon::start(&config).await;

    send_ok(&d, &["send", "generic", "thing.happened", "--id", "evt_generic_1"]).await;
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    let body = got[0].json();
    assert_eq!(body["event"]["id"], "evt_generic_1", "{body}");
    assert_eq!(body["event"]["type"], "thing.happened", "{body}");
    assert!(
        body["event"]["occurred_at"].is_string(),
        "the time is read from meta.at: {body}"
    );

    // Fields one inside another: no body has both, so `send` has nothing
    // to post and the daemon would answer every webhook 400. `check` says so.
    let dir = tempfile::tempdir().unwrap();
    let overlapping = dir.path().join("config.toml");
    std::fs::write(
        &overlapping,
        r#"[sources.overlapping]
kind = "hmac"
secrets = ["overlapping-secret"]
header = "X-Signature"
id_field = "event"
type_field = "event.kind"
"#,
    )
    .unwrap();
    for args in [&["check"][..], &["send", "overlapping", "thing.happened"][..]] {
        let out = crate::harness::run_cli(&overlapping, dir.path(), args).await;
        assert!(!out.status.success(), "{args:?}: {}", output_text(&out));
        let text = output_text(&out);
        assert!(
            text.contains("sources.overlapping.type_field") && text.contains("inside id_field"),
            "{args:?}: the message names the source and its fields: {text}"
        );
        assert!(!text.contains("HTTP "), "nothing was posted: {text}");
    }
    assert_eq!(d.events().await.len(), 1, "only the first event is in the store");
}

/// `send` reads only where the daemon listens and the sources: a
/// developer's shell holds the source's secret, not every sink's token or
/// the store's password.
#[tokio::test(flavor = "multi_thread")]
async fn send_needs_no_secret_but_the_sources() {
    let sink = FakeSink::start().await;
    let config = one_sink_config("", &sink.url("/hook")).replace(
        "timeout = \"2s\"",
        "timeout = \"2s\"\nheaders = { Authorization = \"Bearer ${EXPEDITOR_IT_SINK_TOKEN}\" }",
    );
    let d = Daemon::start_with_env(&config, &[("EXPEDITOR_IT_SINK_TOKEN", "sink-token-41")]).await;
    let path = d.config_path.clone();
    let dir = d.dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .args(["send", "crumb", "order.created", "--id", "evt_no_sink_secret"])
            .env_remove("EXPEDITOR_IT_SINK_TOKEN")
            .current_dir(dir)
            .output()
            .expect("run expeditor send")
    })
    .await
    .unwrap();
    assert_success(&out, &["send", "without the sink's token"]);
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["event"]["id"], "evt_no_sink_secret");
    assert_eq!(got[0].header("authorization"), Some("Bearer sink-token-41"));

    // A source's own secret is still required, and named.
    let unset = config.replace("secrets = [\"", "secrets = [\"${EXPEDITOR_IT_UNSET_SECRET}\", \"");
    std::fs::write(&d.config_path, unset).unwrap();
    let out = d.cli(&["send", "crumb", "order.created"]).await;
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("EXPEDITOR_IT_UNSET_SECRET"),
        "{}",
        output_text(&out)
    );
}
