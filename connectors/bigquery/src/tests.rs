//! The sink, through the production client crate, against the fake BigQuery
//! of `expeditor-bigquery-fake` on 127.0.0.1 (insertAll against a declared
//! schema, Google's token endpoint, the metadata server).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use expeditor_api::{Delivery, Event, EventMeta, Item, Order, Outcome, Sink, TemplateSet, Views, delivery_key};
use expeditor_bigquery_fake::{self as fake, Auth as FakeAuth, FakeBigQuery, Fault};
use serde_json::{Value as Json, json};

use super::*;

fn provider() {
    // Err when another test installed it first.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn event(id: &str, total: i64) -> Event {
    Event {
        event: EventMeta {
            id: id.into(),
            source: "crave".into(),
            kind: "crave".into(),
            event_type: "order.created".into(),
            occurred_at: Some("2026-11-23T09:59:58Z".into()),
            received_at: "2026-11-23T10:00:00Z".into(),
        },
        payload: json!({"data": {"orderId": id}}),
        views: Views {
            order: Some(Order {
                id: Some(format!("ord_{id}")),
                channel: Some("delivery".into()),
                total_cents: Some(total),
                currency: Some("usd".into()),
                items: vec![Item {
                    name: Some("Pizza".into()),
                    quantity: 2,
                    total_cents: Some(total),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

fn delivery(id: &str, total: i64) -> Delivery {
    Delivery {
        key: delivery_key("crave", id, "warehouse"),
        attempt: 1,
        event: Arc::new(event(id, total)),
    }
}

/// The orders row of the README example.
fn row_template() -> Json {
    json!({
        "event_id": "{{ event.id }}",
        "order_id": "{{ order.id }}",
        "source": "{{ event.source }}",
        "event_type": "{{ event.type }}",
        "channel": "{{ order.channel }}",
        "total_cents": "{{ order.total_cents }}",
        "currency": "{{ order.currency | upper }}",
        "is_delivery": "{{ order.channel == 'delivery' and order.total_cents > 0 }}",
        "occurred_at": "{{ event.occurred_at }}",
        "received_at": "{{ event.received_at }}",
        "items": "{{ order.items }}",
    })
}

struct Build {
    row: Json,
    endpoint: Option<String>,
    auth: Auth,
    table: String,
    max_rows: usize,
    max_bytes: usize,
    timeout: Duration,
    skip_invalid_rows: bool,
}

fn build(server: &FakeBigQuery) -> Build {
    Build {
        row: row_template(),
        endpoint: Some(server.url()),
        auth: Auth::None,
        table: "orders".into(),
        max_rows: DEFAULT_MAX_ROWS,
        max_bytes: DEFAULT_MAX_BYTES,
        timeout: Duration::from_secs(5),
        skip_invalid_rows: true,
    }
}

impl Build {
    fn sink(self) -> BigQuerySink {
        provider();
        let mut set = TemplateSet::new();
        let row = set.structured("sinks.warehouse.row", &self.row).unwrap();
        BigQuerySink::new(BigQuerySinkConfig {
            name: "warehouse".into(),
            project: "fake-project".into(),
            dataset: "restaurant".into(),
            table: self.table,
            row,
            templates: set.finish(),
            max_rows: self.max_rows,
            max_bytes: self.max_bytes,
            linger: Duration::ZERO,
            endpoint: self.endpoint,
            auth: self.auth,
            timeout: self.timeout,
            skip_invalid_rows: self.skip_invalid_rows,
        })
        .unwrap()
    }
}

async fn server() -> FakeBigQuery {
    FakeBigQuery::start(fake::orders_table(), FakeAuth::None).await
}

fn assert_ok(outcomes: &[Outcome]) {
    for (i, o) in outcomes.iter().enumerate() {
        assert!(o.is_ok(), "row {i}: {o:?}");
    }
}

#[tokio::test]
async fn typed_rows_reach_the_table_with_delivery_keys_as_insert_ids() {
    let server = server().await;
    let sink = build(&server).sink();
    let batch = [delivery("e1", 2798), delivery("e2", 1500), delivery("e3", 0)];
    let outcomes = sink.deliver(&batch).await;
    assert_ok(&outcomes);

    let calls = server.calls();
    assert_eq!(calls.len(), 1, "one request for the batch: {calls:#?}");
    let call = &calls[0];
    assert_eq!(
        call.path,
        "/bigquery/v2/projects/fake-project/datasets/restaurant/tables/orders/insertAll"
    );
    assert!(
        call.content_type
            .as_deref()
            .unwrap_or("")
            .starts_with("application/json")
    );
    assert_eq!(call.body["skipInvalidRows"], true);
    let keys: Vec<String> = batch.iter().map(|d| d.key.clone()).collect();
    assert_eq!(call.insert_ids(), keys);

    let rows = server.rows();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].insert_id.as_deref(), Some(keys[0].as_str()));
    // Typed leaves keep their JSON type; text leaves are strings.
    assert_eq!(
        rows[0].json,
        json!({
            "event_id": "e1",
            "order_id": "ord_e1",
            "source": "crave",
            "event_type": "order.created",
            "channel": "delivery",
            "total_cents": 2798,
            "currency": "USD",
            "is_delivery": true,
            "occurred_at": "2026-11-23T09:59:58Z",
            "received_at": "2026-11-23T10:00:00Z",
            "items": [{"name": "Pizza", "quantity": 2, "unit_price_cents": null, "total_cents": 2798, "modifiers": []}],
        })
    );
    assert_eq!(rows[2].json["is_delivery"], false);
    assert_eq!(rows[2].json["total_cents"], 0);
}

#[tokio::test]
async fn a_bad_row_is_permanent_and_the_others_are_inserted_once() {
    let server = server().await;
    let mut b = build(&server);
    b.row["total_cents"] = json!("{{ 'n/a' if event.id == 'bad' else order.total_cents }}");
    let sink = b.sink();
    let batch = [delivery("good1", 100), delivery("bad", 200), delivery("good2", 300)];
    let outcomes = sink.deliver(&batch).await;
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    let err = outcomes[1].as_ref().unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(
        err.message.contains("total_cents") && err.message.contains("Cannot convert value to integer"),
        "{}",
        err.message
    );
    let rows = server.rows();
    let ids: Vec<_> = rows.iter().map(|r| r.insert_id.clone().unwrap()).collect();
    assert_eq!(ids, [batch[0].key.clone(), batch[2].key.clone()]);
    // The engine dead-letters the bad one; nothing else is sent.
    assert_eq!(server.calls().len(), 1);
}

#[tokio::test]
async fn without_skip_invalid_rows_the_stopped_rows_are_retried_at_once() {
    let server = server().await;
    let mut b = build(&server);
    b.skip_invalid_rows = false;
    b.row["total_cents"] = json!("{{ 'n/a' if event.id == 'bad' else order.total_cents }}");
    let sink = b.sink();
    let batch = [delivery("a", 1), delivery("bad", 2), delivery("b", 3)];
    let outcomes = sink.deliver(&batch).await;
    let bad = outcomes[1].as_ref().unwrap_err();
    assert!(
        !bad.retryable
            && bad
                .message
                .contains("total_cents: Cannot convert value to integer (bad value): n/a"),
        "{bad:?}"
    );
    for i in [0, 2] {
        let e = outcomes[i].as_ref().unwrap_err();
        assert!(e.retryable, "{e:?}");
        assert_eq!(e.retry_after, Some(Duration::ZERO), "{e:?}");
        assert!(e.message.contains("stopped"), "{e:?}");
    }
    assert!(server.rows().is_empty(), "nothing of a stopped request is inserted");

    // The engine's next attempt has the good rows only.
    let again = [batch[0].clone(), batch[2].clone()];
    assert_ok(&sink.deliver(&again).await);
    let rows = server.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].insert_id.as_deref(), Some(batch[0].key.as_str()));
    assert_eq!(server.duplicates_dropped(), 0);
}

#[tokio::test]
async fn a_retry_sends_the_same_insert_ids_and_bigquery_drops_repeats() {
    let server = server().await;
    server.fail_next(&[Fault::backend_error()]);
    let sink = build(&server).sink();
    let batch = [delivery("r1", 10), delivery("r2", 20)];
    let first = sink.deliver(&batch).await;
    for o in &first {
        let e = o.as_ref().unwrap_err();
        assert!(e.retryable, "{e:?}");
        assert!(e.message.contains("503") && e.message.contains("backendError"), "{e:?}");
    }
    assert_ok(&sink.deliver(&batch).await);
    // A retry after a lost answer: BigQuery had the rows, drops them.
    assert_ok(&sink.deliver(&batch).await);
    let calls = server.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.insert_ids() == calls[0].insert_ids()));
    assert_eq!(server.rows().len(), 2);
    assert_eq!(server.duplicates_dropped(), 2);
}

#[tokio::test]
async fn quota_and_server_errors_are_retried_other_client_errors_are_not() {
    let server = server().await;
    let sink = build(&server).sink();
    let cases = [
        (Fault::quota_exceeded(), true, "403 quotaExceeded"),
        (Fault::rate_limit_exceeded(), true, "403 rateLimitExceeded"),
        (Fault::too_many_requests(), true, "429"),
        (Fault::internal_error(), true, "500 internalError"),
        (Fault::bad_gateway_html(), true, "502 Bad Gateway"),
        (Fault::access_denied(), false, "403 accessDenied"),
        (
            Fault::new(400, "invalid", "INVALID_ARGUMENT", "No rows present in the request."),
            false,
            "400 invalid",
        ),
    ];
    for (fault, retryable, needle) in cases {
        server.fail_next(&[fault]);
        let outcomes = sink.deliver(&[delivery("q", 1), delivery("q2", 2)]).await;
        for o in &outcomes {
            let e = o.as_ref().unwrap_err();
            assert_eq!(e.retryable, retryable, "{needle}: {e:?}");
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
            assert!(e.retry_after.is_none(), "{e:?}");
        }
    }
    assert!(server.rows().is_empty());
}

#[tokio::test]
async fn a_missing_table_is_permanent() {
    let server = server().await;
    let mut b = build(&server);
    b.table = "ordrs".into();
    let outcomes = b.sink().deliver(&[delivery("t", 1)]).await;
    let e = outcomes[0].as_ref().unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(
        e.message.contains("404 notFound") && e.message.contains("Not found: Table fake-project:restaurant.ordrs"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn no_answer_is_retried() {
    // Connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let server = server().await;
    let mut b = build(&server);
    b.endpoint = Some(format!("http://{addr}"));
    let e = b.sink().deliver(&[delivery("c", 1)]).await.remove(0).unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(e.message.contains("refused"), "{}", e.message);

    // Accepted, never answered.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut b = build(&server);
    b.endpoint = Some(format!("http://{}", silent.local_addr().unwrap()));
    b.timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let e = b.sink().deliver(&[delivery("s", 1)]).await.remove(0).unwrap_err();
    assert!(e.retryable && e.message.contains("timed out"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn batches_are_split_by_max_bytes_and_an_oversized_row_is_permanent() {
    let server = server().await;
    let mut b = build(&server);
    b.max_bytes = 1200;
    let sink = b.sink();
    let batch: Vec<Delivery> = (0..5).map(|i| delivery(&format!("m{i}"), i)).collect();
    assert_ok(&sink.deliver(&batch).await);
    let calls = server.calls();
    assert!(calls.len() > 1, "split into several requests: {}", calls.len());
    for c in &calls {
        assert!(
            serde_json::to_vec(&c.body).unwrap().len() <= 1200,
            "request over max_bytes"
        );
    }
    let mut ids: Vec<String> = calls.iter().flat_map(|c| c.insert_ids()).collect();
    ids.sort();
    let mut keys: Vec<String> = batch.iter().map(|d| d.key.clone()).collect();
    keys.sort();
    assert_eq!(ids, keys, "every row once");

    let mut b = build(&server);
    b.max_bytes = 300;
    let before = server.calls().len();
    let e = b.sink().deliver(&[delivery("big", 1)]).await.remove(0).unwrap_err();
    assert!(!e.retryable && e.message.contains("max_bytes"), "{e:?}");
    assert_eq!(server.calls().len(), before, "nothing sent");
}

#[tokio::test]
async fn a_row_that_cannot_render_is_permanent_and_not_sent() {
    let server = server().await;
    let mut b = build(&server);
    b.row["total_cents"] = json!("{{ order.total_cents + 'x' }}");
    let outcomes = b.sink().deliver(&[delivery("r", 1)]).await;
    let e = outcomes[0].as_ref().unwrap_err();
    assert!(!e.retryable, "{e:?}");
    assert!(
        e.message.starts_with("sinks.warehouse.row.total_cents"),
        "{}",
        e.message
    );
    assert!(server.calls().is_empty());
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_service_account_key_gets_a_token_and_refreshes_it() {
    let server = FakeBigQuery::start(fake::orders_table(), FakeAuth::Bearer).await;
    // Lives 11 s; the client renews 10 s early, so after a second.
    server.set_token_lifetime(11);
    let dir = tempfile::tempdir().unwrap();
    let key = write(dir.path(), "sa.json", &server.service_account_json());
    let mut b = build(&server);
    b.auth = Auth::File(key);
    let sink = b.sink();

    assert_ok(&sink.deliver(&[delivery("a1", 1)]).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_ok(&sink.deliver(&[delivery("a2", 2)]).await);

    let grants = server.token_grants();
    assert_eq!(grants.len(), 2, "{grants:#?}");
    assert_eq!(grants[0]["iss"], fake::SERVICE_ACCOUNT_EMAIL);
    assert!(
        grants[0]["scope"].as_str().unwrap().contains(fake::INSERT_SCOPE),
        "{grants:#?}"
    );
    let auth: Vec<_> = server.calls().into_iter().map(|c| c.authorization).collect();
    assert_eq!(
        auth,
        [Some("Bearer ya29.sa-1".to_owned()), Some("Bearer ya29.sa-2".to_owned())]
    );
    assert_eq!(server.rows().len(), 2);
}

#[tokio::test]
async fn without_credentials_bigquery_answers_401_and_it_is_retried() {
    let server = FakeBigQuery::start(fake::orders_table(), FakeAuth::Bearer).await;
    let sink = build(&server).sink();
    let e = sink.deliver(&[delivery("u", 1)]).await.remove(0).unwrap_err();
    assert!(e.retryable, "a refused token may be an expired one: {e:?}");
    assert!(e.message.contains("401"), "{}", e.message);
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_retried() {
    let server = FakeBigQuery::start(fake::orders_table(), FakeAuth::Bearer).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut key: Json = serde_json::from_str(&server.service_account_json()).unwrap();
    key["token_uri"] = json!(format!("http://{addr}/token"));
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "sa.json", &key.to_string());
    let mut b = build(&server);
    b.auth = Auth::File(path);
    let e = b.sink().deliver(&[delivery("t", 1)]).await.remove(0).unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(e.message.contains("cannot get Google credentials"), "{}", e.message);
    assert!(server.calls().is_empty());
}

// ---- unit: packing, answers, config checks, the auth rule ------------------

#[test]
fn rows_are_packed_in_order_within_both_limits() {
    use gcloud_bigquery::http::tabledata::insert_all::Row;
    let r = |index, bytes| rows::Rendered {
        index,
        row: Row {
            insert_id: None,
            json: Default::default(),
        },
        bytes,
    };
    let packed = rows::pack(
        vec![r(0, 100), r(1, 100), r(2, 100), r(3, 100)],
        3,
        rows::ENVELOPE_BYTES + 200,
    );
    let shape: Vec<Vec<usize>> = packed.iter().map(|p| p.iter().map(|r| r.index).collect()).collect();
    assert_eq!(shape, [vec![0, 1], vec![2, 3]]);
    let packed = rows::pack(vec![r(0, 1), r(1, 1), r(2, 1), r(3, 1)], 3, 10_000);
    let shape: Vec<usize> = packed.iter().map(Vec::len).collect();
    assert_eq!(shape, [3, 1]);
}

#[test]
fn row_errors_are_classified_by_reason() {
    use gcloud_bigquery::http::tabledata::insert_all::{Error, ErrorMessage, InsertAllResponse};
    let e = |reason: &str, location: &str, message: &str| ErrorMessage {
        reason: reason.into(),
        location: location.into(),
        debug_info: String::new(),
        message: message.into(),
    };
    let response = InsertAllResponse {
        kind: "bigquery#tableDataInsertAllResponse".into(),
        insert_errors: Some(vec![
            Error {
                index: 1,
                errors: vec![e("invalid", "amount", "no such field: amount.")],
            },
            Error {
                index: 2,
                errors: vec![e("stopped", "", "")],
            },
            Error {
                index: 3,
                errors: vec![e("timeout", "", "Deadline exceeded")],
            },
            Error {
                index: 9,
                errors: vec![e("invalid", "", "out of range")],
            },
        ]),
    };
    let out = outcome::rows(4, response);
    assert!(out[0].is_ok());
    let invalid = out[1].as_ref().unwrap_err();
    assert!(!invalid.retryable);
    assert_eq!(invalid.message, "BigQuery rejected the row: no such field: amount.");
    let stopped = out[2].as_ref().unwrap_err();
    assert!(stopped.retryable && stopped.retry_after == Some(Duration::ZERO));
    let timeout = out[3].as_ref().unwrap_err();
    assert!(timeout.retryable && timeout.retry_after.is_none());
    assert!(
        timeout.message.contains("timeout: Deadline exceeded"),
        "{}",
        timeout.message
    );
}

#[test]
fn ids_and_endpoints_are_checked() {
    assert!(check_project("crumb-analytics").is_ok());
    assert!(check_project("example.com:crumb-analytics").is_ok());
    for bad in ["", "Crumb", "1crumb", "crumb-", "crumb/analytics", "crumb analytics"] {
        assert!(check_project(bad).is_err(), "{bad:?}");
    }
    assert!(check_dataset("restaurant_01").is_ok());
    for bad in ["", "rest-aurant", "a/b", "a.b"] {
        assert!(check_dataset(bad).is_err(), "{bad:?}");
    }
    assert!(check_table("orders").is_ok());
    assert!(check_table("orders-2026_v2").is_ok());
    assert!(check_table("orders$20261123").is_ok());
    for bad in ["", "orders$", "orders$abc", "a/b", "a?b", "a b", "$1"] {
        assert!(check_table(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        check_endpoint("http://127.0.0.1:9050/").unwrap(),
        "http://127.0.0.1:9050"
    );
    assert!(check_endpoint("https://bigquery.googleapis.com").is_ok());
    for bad in [
        "127.0.0.1:9050",
        "ftp://x",
        "http://",
        "http://x/bigquery/v2",
        "http://u@x",
    ] {
        assert!(check_endpoint(bad).is_err(), "{bad:?}");
    }
}

/// `check_auth` with this environment and these files (nothing else exists).
fn auth_check(
    auth: &Auth,
    endpoint: Option<&str>,
    env: &[(&str, &str)],
    files: &[(&str, &str)],
) -> Result<String, String> {
    let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let files: HashMap<PathBuf, Vec<u8>> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.as_bytes().to_vec()))
        .collect();
    check_auth(auth, endpoint, &|k| env.get(k).cloned(), &|p| {
        files
            .get(p)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "No such file or directory"))
    })
}

#[test]
fn the_auth_rule() {
    let sa_key = expeditor_bigquery_fake::service_account_key(
        "w@p.iam.gserviceaccount.com",
        expeditor_bigquery_fake::TEST_PRIVATE_KEY,
    );
    let sa = sa_key.as_str();
    let user = r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#;
    let adc = Auth::ApplicationDefault;
    let home = ("HOME", "/home/cook");
    let gcloud = "/home/cook/.config/gcloud/application_default_credentials.json";

    // Nothing at all.
    let err = auth_check(&adc, None, &[home], &[]).unwrap_err();
    assert!(err.starts_with("no way to authenticate to BigQuery"), "{err}");
    assert!(
        err.contains("GOOGLE_APPLICATION_CREDENTIALS") && err.contains("auth = \"none\""),
        "{err}"
    );

    // GOOGLE_APPLICATION_CREDENTIALS: used, and checked.
    let ok = auth_check(
        &adc,
        None,
        &[home, ("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")],
        &[("/k.json", sa)],
    );
    assert_eq!(
        ok.unwrap(),
        "service account w@p.iam.gserviceaccount.com from GOOGLE_APPLICATION_CREDENTIALS"
    );
    let err = auth_check(
        &adc,
        None,
        &[home, ("GOOGLE_APPLICATION_CREDENTIALS", "/gone.json")],
        &[],
    )
    .unwrap_err();
    assert!(err.contains("/gone.json") && err.contains("cannot be read"), "{err}");
    let err = auth_check(
        &adc,
        None,
        &[home, ("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")],
        &[("/k.json", r#"{"type":"service_account","client_email":"w@p"}"#)],
    )
    .unwrap_err();
    assert!(err.contains("without private_key"), "{err}");
    let err = auth_check(
        &adc,
        None,
        &[("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")],
        &[("/k.json", "not json")],
    )
    .unwrap_err();
    assert!(err.contains("not a Google credentials JSON file"), "{err}");
    let err = auth_check(
        &adc,
        None,
        &[("GOOGLE_APPLICATION_CREDENTIALS", "/k.json")],
        &[("/k.json", r#"{"type":"external_account"}"#)],
    )
    .unwrap_err();
    assert!(err.contains("\"external_account\" are not supported"), "{err}");

    // The JSON variable, raw or base64.
    let b64 = base64::engine::general_purpose::STANDARD.encode(user);
    use base64::Engine as _;
    for value in [user.to_owned(), b64] {
        let ok = auth_check(&adc, None, &[("GOOGLE_APPLICATION_CREDENTIALS_JSON", &value)], &[]);
        assert_eq!(
            ok.unwrap(),
            "gcloud user credentials from GOOGLE_APPLICATION_CREDENTIALS_JSON"
        );
    }

    // gcloud's file under HOME.
    let ok = auth_check(&adc, None, &[home], &[(gcloud, user)]);
    assert!(
        ok.unwrap()
            .starts_with("gcloud user credentials from /home/cook/.config/gcloud/")
    );

    // The metadata server.
    for var in [
        "GCE_METADATA_HOST",
        "K_SERVICE",
        "CLOUD_RUN_JOB",
        "FUNCTION_TARGET",
        "GAE_SERVICE",
    ] {
        let ok = auth_check(&adc, None, &[home, (var, "x")], &[]);
        assert!(ok.unwrap().starts_with("the metadata server"), "{var}");
    }
    let ok = auth_check(&adc, None, &[], &[(DMI_PRODUCT_NAME, "Google Compute Engine\n")]);
    assert_eq!(ok.unwrap(), "the metadata server (Compute Engine)");
    assert!(
        auth_check(
            &adc,
            None,
            &[],
            &[(DMI_PRODUCT_NAME, "Standard PC (Q35 + ICH9, 2009)\n")]
        )
        .is_err()
    );

    // An explicit file, and none.
    let file = Auth::File(PathBuf::from("/etc/expeditor/bq.json"));
    assert!(auth_check(&file, None, &[], &[("/etc/expeditor/bq.json", sa)]).is_ok());
    let err = auth_check(&file, None, &[], &[]).unwrap_err();
    assert!(err.starts_with("cannot read /etc/expeditor/bq.json"), "{err}");
    // A key that looks like PEM but cannot sign is found now, not at the
    // first delivery; the error never shows the key.
    for pem in [
        "-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYDATA\n-----END PRIVATE KEY-----\n",
        &expeditor_bigquery_fake::TEST_PRIVATE_KEY[..200],
    ] {
        let mangled = expeditor_bigquery_fake::service_account_key("w@p.iam.gserviceaccount.com", pem);
        let err = auth_check(&file, None, &[], &[("/etc/expeditor/bq.json", &mangled)]).unwrap_err();
        assert!(err.contains("private_key cannot sign"), "{err}");
        assert!(!err.contains("TOPSECRET") && !err.contains(&pem[30..60]), "{err}");
    }
    assert!(auth_check(&Auth::None, Some("http://127.0.0.1:9050"), &[], &[]).is_ok());
    let err = auth_check(&Auth::None, None, &[], &[]).unwrap_err();
    assert!(err.contains("set endpoint"), "{err}");
}

/// The row template decides what the sink reads.
#[tokio::test]
async fn reads_what_its_row_reads() {
    use expeditor_api::Reads;
    let server = server().await;
    assert_eq!(
        build(&server).sink().reads(),
        Reads::MetaAndViews,
        "the row names `order`, not `payload`"
    );
    let mut b = build(&server);
    b.row = json!({ "event_id": "{{ event.id }}", "raw": "{{ payload }}" });
    assert_eq!(b.sink().reads(), Reads::MetaAndPayload);
    let mut b = build(&server);
    b.row = json!({ "order_id": "{{ order.id }}", "raw": "{{ payload }}" });
    assert_eq!(b.sink().reads(), Reads::All);
}
