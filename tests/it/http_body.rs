//! What the `http` sink puts on the wire: method, templated URL and headers,
//! a structured body whose single-expression leaves keep their JSON type, and
//! by default the whole event.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_sink::{FakeSink, Recorded};
use crate::harness::{Daemon, base_config};
use crate::vendor::{SOURCES, crave_order, crumb_order, crumb_payment};

fn config(sink: &FakeSink) -> String {
    format!(
        r#"{base}
{SOURCES}
[sinks.kds]
type = "http"
method = "PUT"
url = "{kds}/{{{{ order.id }}}}"
headers = {{ Authorization = "Bearer tok-123", X-Source = "{{{{ event.source }}}}" }}
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms" }}

[sinks.kds.body]
items = "{{{{ order.items }}}}"
total = "{{{{ order.total_cents }}}}"
label = "Order {{{{ order.id }}}}"
external_id = "{{{{ order.id }}}}"
priority = "{{{{ 'high' if order.channel == 'delivery' else 'normal' }}}}"
fixed = 7
flag = true
nested = {{ count = "{{{{ order.items | length }}}}", source = "{{{{ event.source }}}}" }}
list = ["{{{{ order.id }}}}", "static"]

[sinks.whole]
type = "http"
url = "{whole}"
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms" }}

[[routes]]
name = "kitchen"
events = ["order.created"]
sinks = ["kds"]

[[routes]]
name = "archive"
sinks = ["whole"]
"#,
        base = base_config(""),
        kds = sink.url("/tickets"),
        whole = sink.url("/whole"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_body_keeps_types_and_templates_url_and_headers() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&config(&sink)).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_body_crumb", 4250)).await.status, 200);
    assert_eq!(d.post_crave(&crave_order("evt_body_crave", "27.98")).await.status, 200);

    // 2 to kds, 2 to whole.
    let got = sink.wait_for(4, Duration::from_secs(10)).await;
    let kds: Vec<&Recorded> = got.iter().filter(|r| r.path.starts_with("/tickets")).collect();
    assert_eq!(kds.len(), 2, "{got:#?}");

    let crumb = kds
        .iter()
        .find(|r| r.header("x-source") == Some("crumb"))
        .expect("crumb ticket");
    assert_eq!(crumb.method, "PUT");
    assert_eq!(crumb.path, "/tickets/ord_xyz789", "templated url");
    assert_eq!(crumb.header("authorization"), Some("Bearer tok-123"));
    assert!(
        crumb
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "content-type: {:?}",
        crumb.header("content-type")
    );
    let body = crumb.json();
    assert!(body["items"].is_array(), "items keeps its type (array): {body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["items"][0]["name"], "Burger Deluxe", "{body}");
    assert_eq!(body["items"][0]["quantity"], 2, "{body}");
    assert_eq!(body["total"], json!(4250), "total keeps its type (number): {body}");
    assert_eq!(
        body["label"],
        json!("Order ord_xyz789"),
        "interpolation is a string: {body}"
    );
    assert_eq!(body["external_id"], json!("ord_xyz789"), "{body}");
    assert_eq!(
        body["priority"],
        json!("normal"),
        "a pos order is not high priority: {body}"
    );
    assert_eq!(body["fixed"], json!(7), "non-string leaves are kept: {body}");
    assert_eq!(body["flag"], json!(true), "{body}");
    assert_eq!(body["nested"], json!({"count": 1, "source": "crumb"}), "{body}");
    assert_eq!(body["list"], json!(["ord_xyz789", "static"]), "{body}");

    let crave = kds
        .iter()
        .find(|r| r.header("x-source") == Some("crave"))
        .expect("crave ticket");
    assert_eq!(crave.path, "/tickets/ord_456");
    let body = crave.json();
    assert_eq!(body["total"], json!(2798), "\"27.98\" is 2798 cents: {body}");
    assert_eq!(
        body["priority"],
        json!("high"),
        "a Crave delivery order is high priority: {body}"
    );
    assert_eq!(body["items"][0]["name"], "Margherita Pizza", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn default_body_is_the_whole_event() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&config(&sink)).await;
    let crumb = crumb_order("evt_whole_crumb", 4250);
    let crave = crave_order("evt_whole_crave", "27.98");
    let payment = crumb_payment("evt_whole_pay");
    assert_eq!(d.post_crumb(&crumb).await.status, 200);
    assert_eq!(d.post_crave(&crave).await.status, 200);
    assert_eq!(d.post_crumb(&payment).await.status, 200);

    let got = sink.wait_for(5, Duration::from_secs(10)).await;
    let whole = |id: &str| -> Value {
        got.iter()
            .filter(|r| r.path == "/whole")
            .map(Recorded::json)
            .find(|b| b["event"]["id"] == id)
            .unwrap_or_else(|| panic!("{id} not delivered to /whole: {got:#?}"))
    };

    let body = whole("evt_whole_crumb");
    assert_eq!(body["event"]["source"], "crumb", "{body}");
    assert_eq!(body["event"]["kind"], "crumbpos", "{body}");
    assert_eq!(body["event"]["type"], "order.created", "{body}");
    assert!(body["event"]["received_at"].is_string(), "{body}");
    assert_eq!(body["payload"], crumb, "payload is the vendor's JSON as sent");
    assert_eq!(body["order"]["id"], "ord_xyz789", "{body}");
    assert_eq!(body["order"]["total_cents"], 4250, "{body}");
    assert_eq!(body["order"]["tax_cents"], 340, "{body}");
    assert_eq!(body["order"]["location_id"], "loc_main", "{body}");
    assert_eq!(body["order"]["items"][0]["quantity"], 2, "{body}");

    let body = whole("evt_whole_crave");
    assert_eq!(body["event"]["kind"], "crave", "{body}");
    assert_eq!(body["payload"], crave, "payload is the vendor's JSON as sent");
    assert_eq!(body["order"]["id"], "ord_456", "{body}");
    assert_eq!(body["order"]["total_cents"], 2798, "{body}");
    assert_eq!(body["order"]["currency"], "usd", "{body}");
    assert_eq!(body["order"]["channel"], "delivery", "{body}");
    assert_eq!(body["order"]["customer"]["name"], "Alex Johnson", "{body}");
    assert_eq!(body["order"]["customer"]["email"], "alex@example.com", "{body}");
    assert_eq!(body["order"]["items"][0]["total_cents"], 2598, "{body}");

    let body = whole("evt_whole_pay");
    assert_eq!(body["payment"]["id"], "pay_ghi789", "{body}");
    assert_eq!(body["payment"]["order_id"], "ord_xyz789", "{body}");
    assert_eq!(body["payment"]["amount_cents"], 4250, "{body}");
    assert_eq!(body["payment"]["tip_cents"], 850, "{body}");
    assert_eq!(body["payment"]["card_last_four"], "4242", "{body}");
}

/// A retried delivery is claimed from the store and its event rebuilt with
/// only what the sink's templates read: nothing parsed for `event.*` alone,
/// the payload without views for `payload.*`, the views without the payload
/// for a view, everything for both. Each
/// retry must put the same body on the wire as the first attempt, which
/// went out with the event ingest had just normalized.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_delivery_renders_as_the_first_attempt_did() {
    let sink = FakeSink::start().await;
    // The four first attempts fail; every retry is claimed and rebuilt.
    sink.script(&[503, 503, 503, 503], 200);
    let mut config = format!("{}\n{SOURCES}\n", base_config(""));
    for (name, body) in [
        (
            "meta",
            r#"id = "{{ event.id }}"
type = "{{ event.type }}""#,
        ),
        (
            "payload",
            r#"id = "{{ event.id }}"
total = "{{ payload.data.attributes.total }}""#,
        ),
        (
            "views",
            r#"id = "{{ event.id }}"
total = "{{ order.total_cents }}""#,
        ),
        (
            "both",
            r#"id = "{{ event.id }}"
total = "{{ order.total_cents }}"
sent = "{{ payload.data.attributes.total }}""#,
        ),
    ] {
        config.push_str(&format!(
            r#"
[sinks.{name}]
type = "http"
url = "{url}"
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms" }}

[sinks.{name}.body]
{body}
"#,
            url = sink.url(&format!("/{name}")),
        ));
    }
    config.push_str(
        r#"
[[routes]]
name = "all"
sinks = ["meta", "payload", "views", "both"]
"#,
    );
    let d = Daemon::start(&config).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_rebuilt", 4250)).await.status, 200);

    let got = sink.wait_for(8, Duration::from_secs(10)).await;
    let bodies = |path: &str| -> Vec<Value> { got.iter().filter(|r| r.path == path).map(|r| r.json()).collect() };
    let expected = [
        ("/meta", json!({ "id": "evt_rebuilt", "type": "order.created" })),
        ("/payload", json!({ "id": "evt_rebuilt", "total": 4250 })),
        ("/views", json!({ "id": "evt_rebuilt", "total": 4250 })),
        ("/both", json!({ "id": "evt_rebuilt", "total": 4250, "sent": 4250 })),
    ];
    for (path, want) in expected {
        assert_eq!(
            bodies(path),
            [want.clone(), want],
            "{path}: first attempt, then the retry"
        );
    }
    for sink in ["meta", "payload", "views", "both"] {
        d.wait_delivery("crumb", "evt_rebuilt", sink, "delivered").await;
    }
}

/// A secret from the environment that holds template syntax (`{{`, `{%`)
/// is sent as it is, in a header and in a body leaf around a template, and
/// is neither run nor shown in an error.
#[tokio::test(flavor = "multi_thread")]
async fn an_env_secret_with_template_syntax_is_sent_verbatim() {
    let sink = FakeSink::start().await;
    let config = format!(
        r#"{base}
{SOURCES}
[sinks.kds]
type = "http"
url = "{url}"
headers = {{ Authorization = "Bearer ${{KDS_TOKEN}}" }}
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms" }}

[sinks.kds.body]
signed = "${{KDS_TOKEN}}:{{{{ order.id }}}}"

[[routes]]
name = "kitchen"
sinks = ["kds"]
"#,
        base = base_config(""),
        url = sink.url("/tickets"),
    );
    let token = "ab{{cd}}e{%f%}g{#h";
    let d = Daemon::start_with_env(&config, &[("KDS_TOKEN", token)]).await;
    assert_eq!(d.post_crumb(&crumb_order("evt_raw_token", 4250)).await.status, 200);
    let got = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].header("authorization"), Some(format!("Bearer {token}").as_str()));
    let body = got[0].json();
    let order_id = body["signed"]
        .as_str()
        .unwrap_or_default()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(!order_id.is_empty(), "{body}");
    assert_eq!(body["signed"], format!("{token}:{order_id}"), "{body}");
}
