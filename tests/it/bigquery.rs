//! The `bigquery` sink, end to end: the daemon streams rows with the
//! production client crate into the fake BigQuery of
//! `expeditor-bigquery-fake` (insertAll against the `orders` schema of the
//! warehouse example, per-row errors, faults in Google's error shape,
//! `insertId` dedupe, the OAuth token endpoint and the metadata server).
//!
//! The sink under test is the commented warehouse example of the shipped
//! `config.toml`, uncommented, so the example cannot rot: its row must fit
//! the documented table, and `check` must accept it when credentials exist.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use expeditor_bigquery_fake::{self as fake, Auth, FakeBigQuery, Fault};
use serde_json::json;

use crate::harness::{BIN, Daemon, assert_success, base_config, output_text};
use crate::vendor::{SOURCES, crave_order, crumb_order, crumb_payment};

const SECS_10: Duration = Duration::from_secs(10);

/// The `# [sinks.warehouse]` block at the end of `config.toml`, uncommented.
fn shipped_example() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let text = std::fs::read_to_string(path).expect("config.toml");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "# [sinks.warehouse]")
        .expect("config.toml has a commented `# [sinks.warehouse]` example");
    let block: Vec<&str> = lines[start..]
        .iter()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
        .collect();
    block.join("\n") + "\n"
}

/// `text` with `from` replaced by `to`, which must be there.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the example no longer has {from:?}:\n{text}");
    text.replacen(from, to, 1)
}

/// The example pointed at `server`: its project, fast retries, and
/// `sink_extra` lines (endpoint, auth, ...) added to the sink.
fn example_for(server: &FakeBigQuery, sink_extra: &str) -> String {
    let block = edit(
        &shipped_example(),
        "project = \"crumb-analytics\"",
        "project = \"fake-project\"",
    );
    let block = edit(
        &block,
        "retry = { max_attempts = 10, initial = \"1s\", max = \"5m\" }",
        &format!(
            "retry = {{ max_attempts = 3, initial = \"50ms\", max = \"200ms\" }}\nendpoint = \"{}\"\n{sink_extra}",
            server.url()
        ),
    );
    format!("{base}\n{SOURCES}\n{block}", base = base_config(""))
}

/// The deliveries to the warehouse, by event id.
async fn delivery_key(d: &Daemon, source: &str, event_id: &str) -> String {
    let delivery = d.wait_delivery(source, event_id, "warehouse", "delivered").await;
    delivery["key"].as_str().expect("delivery key").to_owned()
}

fn row_by_event<'a>(rows: &'a [fake::StoredRow], event_id: &str) -> &'a fake::StoredRow {
    rows.iter()
        .find(|r| r.json["event_id"] == event_id)
        .unwrap_or_else(|| panic!("no row for {event_id}: {rows:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_example_streams_typed_order_rows_keyed_by_delivery() {
    let server = FakeBigQuery::start(fake::orders_table(), Auth::None).await;
    let d = Daemon::start(&example_for(&server, "auth = \"none\"")).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_bq_crumb", 4250)).await.status, 200);
    assert_eq!(d.post_crave(&crave_order("evt_bq_crave", "27.98")).await.status, 200);

    let crumb_key = delivery_key(&d, "crumb", "evt_bq_crumb").await;
    let crave_key = delivery_key(&d, "crave", "evt_bq_crave").await;
    let rows = server.wait_rows(2, SECS_10).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");

    let crumb = row_by_event(&rows, "evt_bq_crumb");
    assert_eq!(
        crumb.insert_id.as_deref(),
        Some(crumb_key.as_str()),
        "insertId is the delivery key"
    );
    let j = &crumb.json;
    assert_eq!(j["order_id"], "ord_xyz789");
    assert_eq!(j["source"], "crumb");
    assert_eq!(j["event_type"], "order.created");
    assert_eq!(j["location_id"], "loc_main");
    assert_eq!(j["total_cents"], json!(4250), "an integer, not a string: {j}");
    assert_eq!(j["tax_cents"], json!(340));
    assert_eq!(j["is_delivery"], json!(false));
    assert_eq!(j["occurred_at"], "2024-10-05T14:30:00Z");
    assert!(j["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{j}");
    assert_eq!(j["items"][0]["name"], "Burger Deluxe");
    assert_eq!(j["items"][0]["quantity"], json!(2));
    assert_eq!(j["items"][0]["modifiers"][0]["name"], "No Onions");

    let crave = row_by_event(&rows, "evt_bq_crave");
    assert_eq!(crave.insert_id.as_deref(), Some(crave_key.as_str()));
    assert_eq!(crave.json["order_id"], "ord_456");
    assert_eq!(crave.json["total_cents"], json!(2798));
    assert_eq!(crave.json["currency"], "USD");
    assert_eq!(crave.json["is_delivery"], json!(true));

    for call in server.calls() {
        assert_eq!(
            call.path,
            "/bigquery/v2/projects/fake-project/datasets/restaurant/tables/orders/insertAll"
        );
        assert_eq!(call.status, 200, "{call:#?}");
        assert_eq!(call.body["skipInvalidRows"], true);
        // Emulator mode: no credentials are sent.
        assert!(
            !call.authorization.as_deref().unwrap_or("").starts_with("Bearer"),
            "{call:#?}"
        );
    }
    assert_eq!(server.duplicates_dropped(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_account_key_in_google_application_credentials_authenticates() {
    let server = FakeBigQuery::start(fake::orders_table(), Auth::Bearer).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("bq-writer.json");
    std::fs::write(&key, server.service_account_json()).unwrap();
    let d = Daemon::start_with_env(
        &example_for(&server, ""),
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap()),
            ("HOME", dir.path().to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(d.post_crumb(&crumb_order("evt_bq_sa", 4250)).await.status, 200);
    delivery_key(&d, "crumb", "evt_bq_sa").await;

    let grants = server.token_grants();
    assert_eq!(grants.len(), 1, "one token, fetched with the key's JWT: {grants:#?}");
    assert_eq!(grants[0]["iss"], fake::SERVICE_ACCOUNT_EMAIL);
    let calls = server.calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].authorization.as_deref(), Some("Bearer ya29.sa-1"));
    assert_eq!(server.rows().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn on_google_cloud_the_metadata_server_authenticates() {
    let server = FakeBigQuery::start(fake::orders_table(), Auth::Bearer).await;
    let home = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(
        &example_for(&server, ""),
        &[
            ("GCE_METADATA_HOST", &server.metadata_host()),
            ("HOME", home.path().to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(d.post_crumb(&crumb_order("evt_bq_md", 4250)).await.status, 200);
    delivery_key(&d, "crumb", "evt_bq_md").await;
    assert_eq!(server.metadata_grants(), 1);
    let calls = server.calls();
    assert_eq!(calls[0].authorization.as_deref(), Some("Bearer ya29.md-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_and_server_errors_are_retried_with_the_same_insert_id() {
    let server = FakeBigQuery::start(fake::orders_table(), Auth::None).await;
    server.fail_next(&[Fault::quota_exceeded(), Fault::backend_error()]);
    let d = Daemon::start(&example_for(&server, "auth = \"none\"")).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_bq_retry", 4250)).await.status, 200);

    let delivery = d.wait_delivery("crumb", "evt_bq_retry", "warehouse", "delivered").await;
    assert_eq!(delivery["attempts"], 3, "403 quotaExceeded, 503, then 200: {delivery}");
    let key = delivery["key"].as_str().unwrap();
    let calls = server.calls();
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [403, 503, 200]);
    assert_eq!(calls[0].response["error"]["errors"][0]["reason"], "quotaExceeded");
    for call in &calls {
        assert_eq!(call.insert_ids(), [key], "every attempt carries the delivery key");
    }
    assert_eq!(server.rows().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_row_is_dead_lettered_and_the_rest_of_its_batch_is_inserted_once() {
    let server = FakeBigQuery::start(fake::orders_table(), Auth::None).await;
    // A route that also sends payments: they have no order, so their row
    // lacks the REQUIRED order_id.
    let config = example_for(&server, "auth = \"none\"")
        + "\n[[routes]]\nname = \"misrouted\"\nevents = [\"payment.*\"]\nsinks = [\"warehouse\"]\n";
    // The example lingers 1 s; 2 s leaves room on a busy machine.
    let config = edit(&config, "linger = \"1s\"", "linger = \"2s\"");
    let d = Daemon::start(&config).await;
    // Within the linger: one batch, one request.
    assert_eq!(d.post_crumb(&crumb_order("evt_bq_a", 1000)).await.status, 200);
    assert_eq!(d.post_crumb(&crumb_payment("evt_bq_pay")).await.status, 200);
    assert_eq!(d.post_crave(&crave_order("evt_bq_b", "12.50")).await.status, 200);

    let dead = d.wait_delivery("crumb", "evt_bq_pay", "warehouse", "dead").await;
    assert_eq!(dead["attempts"], 1, "a schema violation is not retried: {dead}");
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("order_id") && error.contains("Missing required field"),
        "BigQuery's message is kept: {dead}"
    );
    delivery_key(&d, "crumb", "evt_bq_a").await;
    delivery_key(&d, "crave", "evt_bq_b").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = server.calls();
    assert_eq!(
        calls.len(),
        1,
        "one request for the batch, nothing sent again: {calls:#?}"
    );
    assert_eq!(calls[0].insert_ids().len(), 3);
    assert_eq!(calls[0].response["insertErrors"].as_array().map(Vec::len), Some(1));
    let rows = server.rows();
    let mut ids: Vec<&str> = rows.iter().map(|r| r.json["event_id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["evt_bq_a", "evt_bq_b"], "the good rows, once each");
    assert_eq!(server.duplicates_dropped(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_is_a_dead_letter_that_replay_delivers() {
    let server = FakeBigQuery::start(fake::orders_table(), Auth::None).await;
    server.set_table_missing(true);
    let d = Daemon::start(&example_for(&server, "auth = \"none\"")).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_bq_404", 4250)).await.status, 200);

    let dead = d.wait_delivery("crumb", "evt_bq_404", "warehouse", "dead").await;
    assert_eq!(dead["attempts"], 1, "{dead}");
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("404 notFound") && error.contains("Not found: Table fake-project:restaurant.orders"),
        "{dead}"
    );

    // `bq mk` the table, then replay.
    server.set_table_missing(false);
    let out = d.cli(&["replay", "--dead-letters"]).await;
    assert_success(&out, &["replay", "--dead-letters"]);
    let key = delivery_key(&d, "crumb", "evt_bq_404").await;
    let rows = server.wait_rows(1, SECS_10).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].insert_id.as_deref(), Some(key.as_str()));
    let calls = server.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(
        calls[0].insert_ids(),
        calls[1].insert_ids(),
        "replay keeps the insertId"
    );
}

// ---- expeditor check ---------------------------------------------------

/// Variables through which the daemon could find Google credentials.
const CREDENTIAL_VARS: [&str; 7] = [
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "GCE_METADATA_HOST",
    "K_SERVICE",
    "CLOUD_RUN_JOB",
    "FUNCTION_TARGET",
    "GAE_SERVICE",
];

/// `expeditor check` of `config` with no Google credentials in sight but `env`.
fn check(dir: &Path, config: &str, env: &[(&str, &str)]) -> Output {
    let path = dir.join("config.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&path).arg("check").current_dir(dir);
    for var in CREDENTIAL_VARS {
        cmd.env_remove(var);
    }
    cmd.env("HOME", dir);
    cmd.envs(env.iter().copied());
    cmd.output().expect("run expeditor check")
}

fn on_compute_engine() -> bool {
    std::fs::read(expeditor_bigquery::DMI_PRODUCT_NAME).is_ok_and(|n| n.starts_with(b"Google"))
}

/// A config with the shipped example as is (real endpoint, no auth override).
fn example_config() -> String {
    format!(
        "{base}\n{SOURCES}\n{block}",
        base = base_config(""),
        block = shipped_example()
    )
    .replace("{INGEST}", "127.0.0.1:18080")
    .replace("{ADMIN}", "127.0.0.1:19090")
    .replace("{DIR}", ".")
}

fn line_of(config: &str, line: &str) -> usize {
    config.lines().position(|l| l.starts_with(line)).expect("line") + 1
}

#[test]
fn check_accepts_the_shipped_example_only_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = example_config();
    let key = key_file(dir.path());
    let out = check(
        dir.path(),
        &config,
        &[("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));

    if on_compute_engine() {
        return; // The metadata server is a way to authenticate there.
    }
    let out = check(dir.path(), &config, &[]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = line_of(&config, "[sinks.warehouse]");
    assert!(
        text.contains(&format!(
            "config.toml:{line}:1: sinks.warehouse: no way to authenticate to BigQuery"
        )),
        "{text}"
    );
    assert!(
        text.contains("GOOGLE_APPLICATION_CREDENTIALS") && text.contains("auth = \"none\""),
        "{text}"
    );
}

#[test]
fn check_refuses_broken_bigquery_sinks() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let env = [("GOOGLE_APPLICATION_CREDENTIALS", key.to_str().unwrap())];
    let base = example_config();
    let cases: &[(&str, &str, &str)] = &[
        (
            "batch = {",
            "batch = { max_rows = 100000, linger = \"1s\" }",
            "sinks.warehouse.batch.max_rows: must be between 1 and 50000",
        ),
        (
            "batch = {",
            "batch = { max_bytes = \"64MiB\" }",
            "sinks.warehouse.batch.max_bytes: must be between 1KiB and 10MiB",
        ),
        (
            "table = ",
            "table = \"orders; drop\"",
            "sinks.warehouse.table: \"orders; drop\" is not a table id",
        ),
        (
            "project = ",
            "project = \"Crumb Analytics\"",
            "sinks.warehouse.project:",
        ),
        (
            "table = ",
            "table = \"orders\"\nauth = \"none\"",
            "sinks.warehouse.auth: auth = \"none\" sends no credentials",
        ),
        (
            "table = ",
            "table = \"orders\"\ncredentials = \"missing-key.json\"",
            "sinks.warehouse.credentials: cannot read",
        ),
        (
            "order_id = ",
            "order_id = \"{{ order.id \"",
            "sinks.warehouse.row.order_id: invalid template",
        ),
        (
            "table = ",
            "table = \"orders\"\nmax_rows = 10",
            "unknown field `max_rows`",
        ),
    ];
    for (prefix, replacement, needle) in cases {
        let mut found = false;
        let config: String = base
            .lines()
            .map(|l| {
                if !found && l.starts_with(prefix) {
                    found = true;
                    replacement.to_string()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(found, "{prefix}");
        let out = check(dir.path(), &config, &env);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{replacement}: {text}");
        assert!(text.contains(needle), "{replacement}: expected {needle:?} in\n{text}");
        let first = replacement.lines().last().unwrap();
        if !needle.starts_with("unknown field") {
            let line = line_of(&config, first);
            assert!(
                text.contains(&format!("config.toml:{line}:")),
                "{replacement}: line {line} in\n{text}"
            );
        }
    }
}

/// A service-account key file (`bq-writer.json`) in `dir`, with the fake's
/// real test key.
fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("bq-writer.json");
    let text = expeditor_bigquery_fake::service_account_key(
        "w@p.iam.gserviceaccount.com",
        expeditor_bigquery_fake::TEST_PRIVATE_KEY,
    );
    std::fs::write(&key, text).unwrap();
    key
}
