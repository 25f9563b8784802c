//! The commented-out examples at the end of the shipped `config.toml` (KDS
//! ticket, loyalty points, Slack low-stock alert, Crave order confirmation),
//! uncommented: `expeditor check` accepts them once their variables are set,
//! and the daemon runs them against local fakes, so they cannot rot. (The
//! shipped file itself runs with no credentials: `check::the_shipped_config_passes`.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_sink::FakeSink;
use crate::fake_slack::FakeSlack;
use crate::harness::{BIN, Daemon, output_text};
use crate::smtp::{Security, SmtpServer};
use crate::vendor;

/// The sink names of the examples, each a `# [sinks.NAME]` block.
const EXAMPLES: [&str; 4] = ["kds", "loyalty", "inventory_alerts", "order_confirmation"];
const SLACK_TOKEN: &str = "xoxb-1-2-examplesToken";
const SMTP_USER: &str = "orders@example.com";
const SMTP_PASSWORD: &str = "smtp-examples-pw";

fn shipped() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).expect("config.toml")
}

/// The `# [sinks.NAME]` block of `text` (up to the first line that is not a
/// comment), uncommented.
fn example(text: &str, name: &str) -> String {
    let header = format!("# [sinks.{name}]");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == header)
        .unwrap_or_else(|| panic!("config.toml has no commented `{header}` example"));
    lines[start..]
        .iter()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.strip_prefix("# ").or_else(|| l.strip_prefix('#')).unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The shipped config with every example uncommented after it.
fn with_examples() -> String {
    let text = shipped();
    let mut out = text.clone();
    for name in EXAMPLES {
        out.push('\n');
        out.push_str(&example(&text, name));
    }
    out
}

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KDS_TOKEN", "kds-examples-token"),
        ("LOYALTY_TOKEN", "loyalty-examples-token"),
        ("SLACK_BOT_TOKEN", SLACK_TOKEN),
        ("SMTP_USERNAME", SMTP_USER),
        ("SMTP_PASSWORD", SMTP_PASSWORD),
    ]
}

#[test]
fn the_examples_pass_check_once_their_variables_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, with_examples()).unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(&path).arg("check").current_dir(dir.path());
        for (k, _) in self::env() {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied());
        cmd.output().unwrap()
    };
    let out = check(&env());
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("5 sinks, 5 routes"),
        "every example is loaded: {}",
        output_text(&out)
    );
    // Without credentials each example says which variable it needs.
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    for (var, _) in env() {
        assert!(
            output_text(&out).contains(&format!("{var} is not set")),
            "{}",
            output_text(&out)
        );
    }
}

/// A CrumbPOS order as in the vendor guide, with a channel and maybe a customer.
fn crumb_order(event_id: &str, channel: &str, customer: Option<&str>) -> Value {
    let mut event = vendor::crumb_order(event_id, 4250);
    event["data"]["attributes"]["source"] = channel.into();
    if let Some(id) = customer {
        event["data"]["attributes"]["customer_id"] = id.into();
    }
    event
}

fn low_stock(event_id: &str) -> Value {
    json!({
        "id": event_id,
        "type": "inventory.low_stock",
        "created_at": "2024-10-05T15:00:00Z",
        "data": {"id": "inv_7", "type": "inventory_item", "attributes": {
            "menu_item_id": "mi_mozz", "name": "Mozzarella", "location_id": "loc_main",
            "location_name": "Main St", "quantity": 3, "reorder_point": 10}}
    })
}

#[tokio::test]
async fn the_examples_run_against_local_services() {
    let kds = FakeSink::start().await;
    let loyalty = FakeSink::start().await;
    let slack = FakeSlack::start(SLACK_TOKEN).await;
    let smtp = SmtpServer::start(Security::StartTls, Some((SMTP_USER, SMTP_PASSWORD))).await;

    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls/ca.pem");
    let config = with_examples()
        // Free ports, a temp dir, the tests' signing secrets.
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"{INGEST}\"")
        .replace("listen = \"127.0.0.1:9090\"", "listen = \"{ADMIN}\"")
        .replace("path = \"data\"", "path = \"{DIR}/store\"")
        .replace("path = \"data/events.jsonl\"", "path = \"{DIR}/events.jsonl\"")
        .replace("\"dev-crumb-secret\"", &format!("\"{}\"", vendor::CRUMB_SECRET))
        .replace("\"dev-crave-secret\"", &format!("\"{}\"", vendor::CRAVE_SECRET))
        // The services, local.
        .replace("https://kds.example.com/api/tickets", &kds.url("/api/tickets"))
        .replace("https://loyalty.example.com/api/points", &loyalty.url("/api/points"))
        .replace(
            "\ntype = \"slack\"\n",
            &format!("\ntype = \"slack\"\napi_url = \"{}\"\n", slack.api_url()),
        )
        // (Indented: the harness takes a line starting `token = "` for the admin token.)
        .replace("\ntoken = \"${SLACK_BOT_TOKEN}\"", "\n  token = \"${SLACK_BOT_TOKEN}\"")
        .replace(
            "host = \"smtp.example.com\", port = 587",
            &format!("host = \"127.0.0.1\", port = {}", smtp.port),
        )
        .replace(
            "password = \"${SMTP_PASSWORD}\" }",
            &format!("password = \"${{SMTP_PASSWORD}}\", ca_file = \"{ca}\" }}"),
        );
    let d = Daemon::start_with_env(&config, &env()).await;

    // A delivery order of a known customer: a high-priority ticket and points.
    assert_eq!(
        d.post_crumb(&crumb_order("evt_ex_1", "delivery", Some("cus_9")))
            .await
            .status,
        200
    );
    // A walk-in order at the counter: a normal ticket, no points.
    assert_eq!(d.post_crumb(&crumb_order("evt_ex_2", "pos", None)).await.status, 200);
    // Low stock: Slack.
    assert_eq!(d.post_crumb(&low_stock("evt_ex_3")).await.status, 200);
    // A Crave order: a ticket and a confirmation email.
    let mut crave = vendor::crave_order("evt_ex_4", "27.98");
    crave["data"]["items"][0]["name"] = "Margherita & Basil".into();
    assert_eq!(d.post_crave(&crave).await.status, 200);
    // A Crave order without an email address: no confirmation.
    let mut no_email = vendor::crave_order("evt_ex_5", "12.00");
    no_email["data"]["customerEmail"] = Value::Null;
    assert_eq!(d.post_crave(&no_email).await.status, 200);

    for (source, id) in [
        ("crumb", "evt_ex_1"),
        ("crumb", "evt_ex_2"),
        ("crave", "evt_ex_4"),
        ("crave", "evt_ex_5"),
    ] {
        d.wait_delivery(source, id, "kds", "delivered").await;
    }
    let first = d.wait_delivery("crumb", "evt_ex_1", "loyalty", "delivered").await;
    d.wait_delivery("crumb", "evt_ex_3", "inventory_alerts", "delivered")
        .await;
    d.wait_delivery("crave", "evt_ex_4", "order_confirmation", "delivered")
        .await;

    // KDS: one ticket per order, items with their modifiers.
    let tickets = kds.wait_for(4, Duration::from_secs(10)).await;
    let ticket = |order: &str, channel: &str| {
        tickets
            .iter()
            .map(|r| r.json())
            .find(|t| t["external_id"] == order && t["channel"] == channel)
            .unwrap_or_else(|| panic!("no ticket for {order}/{channel}: {tickets:#?}"))
    };
    let t = ticket("ord_xyz789", "delivery");
    assert_eq!(t["priority"], "high");
    assert_eq!(t["location_id"], "loc_main");
    assert_eq!(t["placed_at"], "2024-10-05T14:30:00Z");
    assert_eq!(t["items"][0]["name"], "Burger Deluxe");
    assert_eq!(t["items"][0]["quantity"], 2);
    assert_eq!(t["items"][0]["modifiers"][0]["name"], "No Onions");
    assert_eq!(ticket("ord_xyz789", "pos")["priority"], "normal");
    assert_eq!(ticket("ord_456", "delivery")["priority"], "high");
    assert!(
        tickets
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer kds-examples-token"))
    );

    // Loyalty: a point per whole currency unit, only for the order with a customer.
    let points = loyalty.settle().await;
    assert_eq!(points.len(), 1, "walk-in and guest orders earn nothing: {points:#?}");
    assert_eq!(
        points[0].json(),
        json!({"customer_id": "cus_9", "points": 42, "order_id": "ord_xyz789", "reason": "order ord_xyz789 at loc_main"})
    );
    assert_eq!(points[0].idempotency_key(), first["key"].as_str().unwrap());

    // Slack: the CrumbPOS guide's alert, as text and Block Kit.
    let posted = slack.settle().await;
    assert_eq!(posted.len(), 1, "{posted:#?}");
    assert_eq!(posted[0].body["channel"], "#inventory-alerts");
    assert_eq!(posted[0].body["text"], "⚠️ Low stock: Mozzarella at Main St");
    assert_eq!(
        posted[0].body["blocks"][0]["fields"],
        json!([{"type": "mrkdwn", "text": "*Current level*\n3"}, {"type": "mrkdwn", "text": "*Reorder point*\n10"}])
    );

    // Email: the Crave guide's confirmation, over STARTTLS with AUTH.
    let mail = smtp.wait_accepted(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.messages("accepted").len(), 1, "no email without an address");
    let m = &mail[0];
    assert_eq!((&m["tls"], &m["auth_user"]), (&json!(true), &json!(SMTP_USER)));
    assert_eq!(m["to"], json!([{"name": "Alex Johnson", "addr": "alex@example.com"}]));
    assert_eq!(m["from"], "Crave Pizza <orders@example.com>");
    assert_eq!(m["subject"], "Order confirmed — ord_456");
    let text = m["text"].as_str().unwrap();
    assert!(text.contains("Hi Alex Johnson,"), "{text}");
    assert!(text.contains("Your order of 1 items is being prepared."), "{text}");
    assert!(text.contains("2 × Margherita & Basil"), "{text}");
    assert!(text.contains("Total: 27.98 USD"), "{text}");
    let html = m["html"].as_str().unwrap();
    assert!(
        html.contains("<li>2 × Margherita &amp; Basil</li>"),
        "HTML-escaped: {html}"
    );
    assert!(html.contains("<strong>27.98 USD</strong>"), "{html}");
}
