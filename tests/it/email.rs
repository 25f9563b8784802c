//! `type = "email"`: the daemon's lettre client against a real SMTP server
//! process (Python's aiosmtpd, `smtp_server.py`): plain SMTP, STARTTLS and
//! implicit TLS, AUTH, scripted 4xx/5xx replies. Every received message is
//! parsed by Python's `email` package, an independent MIME and RFC 2047
//! decoder, and checked here: envelope, headers, both bodies, encoding.
//!
//! The server process is [`crate::smtp::SmtpServer`].

use std::process::Command;

use serde_json::Value;

use crate::harness::{Daemon, assert_success, base_config, output_text};
use crate::smtp::{Security, SmtpServer, TLS_DIR};
use crate::vendor;

const PASSWORD: &str = "smtp-pa55-Zoë";

/// A daemon whose `confirm` email sink (the order confirmation of
/// `examples/full-stack.toml`, `smtp` given) takes Crave `order.created`.
fn email_config(smtp: &str) -> String {
    let sink_and_route = r#"
[sinks.confirm]
type = "email"
timeout = "5s"
retry = { max_attempts = 4, initial = "100ms", max = "2s" }
smtp = @SMTP@
from = "Crêperie Zoë <orders@crave.example>"
to = "{{ order.customer.email }}"
to_name = "{{ order.customer.name }}"
subject = "Commande confirmée — {{ order.id }}"
text = """
Merci {{ order.customer.name }} !
Your order {{ order.id }} of {{ order.items | length }} item(s) is being prepared.
Total: {{ order.total_cents | money(order.currency) }} {{ order.currency | upper }}
"""
html = """<p>Merci <strong>{{ order.customer.name }}</strong> !</p>
<p>Total: {{ order.total_cents | money(order.currency) }} {{ order.currency | upper }}</p>"""

[[routes]]
name = "confirmations"
sources = ["crave"]
events = ["order.created"]
sinks = ["confirm"]
"#
    .replace("@SMTP@", smtp);
    format!("{}{}{sink_and_route}", base_config(""), vendor::SOURCES)
}

fn plain(server: &SmtpServer) -> String {
    format!("{{ host = \"127.0.0.1\", port = {}, tls = \"none\" }}", server.port)
}

fn secured(server: &SmtpServer, tls: &str) -> String {
    format!(
        "{{ host = \"127.0.0.1\", port = {}, tls = \"{tls}\", username = \"orders@crave.example\", \
         password = \"${{SMTP_PASSWORD}}\", ca_file = \"{TLS_DIR}/ca.pem\" }}",
        server.port
    )
}

/// Crave `order.created` from a customer whose name is not ASCII.
fn order(event_id: &str) -> Value {
    let mut event = vendor::crave_order(event_id, "27.98");
    event["data"]["customerName"] = "Zoë Ångström".into();
    event["data"]["customerEmail"] = "zoe@example.com".into();
    event
}

fn message_id(delivery: &Value) -> String {
    format!("<{}@crave.example>", delivery["key"].as_str().expect("a delivery key"))
}

#[tokio::test]
async fn order_confirmation_is_encoded_and_carries_the_delivery_key() {
    let smtp = SmtpServer::start(Security::Plain, None).await;
    let d = Daemon::start(&email_config(&plain(&smtp))).await;
    assert_eq!(d.post_crave(&order("evt_mail_1")).await.status, 200);

    let delivered = d.wait_delivery("crave", "evt_mail_1", "confirm", "delivered").await;
    let got = smtp.wait_accepted(1).await;
    let m = &got[0];
    // The envelope.
    assert_eq!(m["mail_from"], "orders@crave.example");
    assert_eq!(m["rcpt_tos"], serde_json::json!(["zoe@example.com"]));
    assert_eq!(m["tls"], false);
    // Headers as a mail client reads them.
    assert_eq!(m["message_id"], message_id(&delivered), "{m}");
    assert_eq!(m["subject"], "Commande confirmée — ord_456");
    assert_eq!(m["from_name"], "Crêperie Zoë");
    assert_eq!(m["from_addr"], "orders@crave.example");
    assert_eq!(
        m["to"],
        serde_json::json!([{"name": "Zoë Ångström", "addr": "zoe@example.com"}])
    );
    assert_eq!(m["defects"], serde_json::json!([]), "{m}");
    // ... and as they crossed the wire: 7-bit, RFC 2047 encoded-words.
    let raw = m["raw"].as_str().unwrap();
    let head = raw.split("\r\n\r\n").next().unwrap();
    assert!(!raw.contains("\\x"), "non-ASCII bytes on the wire: {raw}");
    for name in ["Subject:", "From:", "To:"] {
        let line = head
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{head}"));
        assert!(line.contains("=?utf-8?"), "{name} is not RFC 2047 encoded: {line}");
    }
    // Both bodies.
    assert_eq!(m["content_type"], "multipart/alternative");
    let text = m["text"].as_str().unwrap();
    assert!(text.contains("Merci Zoë Ångström !"), "{text}");
    assert!(
        text.contains("1 item(s)") && text.contains("Total: 27.98 USD"),
        "{text}"
    );
    let html = m["html"].as_str().unwrap();
    assert!(html.contains("<strong>Zoë Ångström</strong>"), "{html}");
    assert!(html.contains("Total: 27.98 USD"), "{html}");
}

#[tokio::test]
async fn a_4xx_reply_is_retried_with_the_same_message_id() {
    let smtp = SmtpServer::start(Security::Plain, None).await;
    smtp.script(&["DATA 451 4.3.0 Mailbox temporarily unavailable, try again"]);
    let d = Daemon::start(&email_config(&plain(&smtp))).await;
    assert_eq!(d.post_crave(&order("evt_mail_retry")).await.status, 200);

    let delivered = d.wait_delivery("crave", "evt_mail_retry", "confirm", "delivered").await;
    assert_eq!(delivered["attempts"], 2, "{delivered}");
    let refused = smtp.messages("refused");
    let accepted = smtp.wait_accepted(1).await;
    assert_eq!((refused.len(), accepted.len()), (1, 1), "{refused:#?} {accepted:#?}");
    assert_eq!(refused[0]["message_id"], message_id(&delivered));
    assert_eq!(
        accepted[0]["message_id"], refused[0]["message_id"],
        "the retry is the same message: a receiver can drop the repeat"
    );
    assert_eq!(accepted[0]["text"], refused[0]["text"]);
}

#[tokio::test]
async fn a_5xx_reply_is_dead_lettered_and_replayed() {
    let smtp = SmtpServer::start(Security::Plain, None).await;
    smtp.script(&["RCPT 550 5.1.1 <zoe@example.com>: Recipient address rejected: User unknown"]);
    let d = Daemon::start(&email_config(&plain(&smtp))).await;
    assert_eq!(d.post_crave(&order("evt_mail_dead")).await.status, 200);

    let dead = d.wait_delivery("crave", "evt_mail_dead", "confirm", "dead").await;
    assert_eq!(dead["attempts"], 1, "permanent: not retried: {dead}");
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("550") && error.contains("User unknown"), "{dead}");
    // The customer's address the server quoted is neither stored nor logged.
    assert!(error.contains("<address>:") && !error.contains("zoe@"), "{dead}");
    assert!(!d.log().contains("zoe@example.com"), "{}", d.log());
    assert!(smtp.messages("accepted").is_empty());

    // The mailbox exists now: replay.
    let args = ["replay", "--dead-letters", "--sink", "confirm"];
    let out = d.cli(&args).await;
    assert_success(&out, &args);
    let delivered = d.wait_delivery("crave", "evt_mail_dead", "confirm", "delivered").await;
    let got = smtp.wait_accepted(1).await;
    assert_eq!(got[0]["message_id"], message_id(&delivered));
    assert_eq!(delivered["key"], dead["key"]);

    // An order without a customer email has no recipient: permanent too.
    let mut walk_in = order("evt_mail_noaddr");
    walk_in["data"]["customerEmail"] = Value::Null;
    assert_eq!(d.post_crave(&walk_in).await.status, 200);
    let dead = d.wait_delivery("crave", "evt_mail_noaddr", "confirm", "dead").await;
    assert_eq!(dead["attempts"], 1, "{dead}");
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("sinks.confirm.to") && error.contains("empty"), "{dead}");
}

#[tokio::test]
async fn starttls_with_authentication() {
    let smtp = SmtpServer::start(Security::StartTls, Some(("orders@crave.example", PASSWORD))).await;
    let d = Daemon::start_with_env(
        &email_config(&secured(&smtp, "starttls")),
        &[("SMTP_PASSWORD", PASSWORD)],
    )
    .await;
    assert_eq!(d.post_crave(&order("evt_mail_starttls")).await.status, 200);
    let delivered = d
        .wait_delivery("crave", "evt_mail_starttls", "confirm", "delivered")
        .await;
    let got = smtp.wait_accepted(1).await;
    assert_eq!(got[0]["tls"], true, "STARTTLS before AUTH and DATA");
    assert_eq!(got[0]["auth_user"], "orders@crave.example");
    assert_eq!(got[0]["message_id"], message_id(&delivered));
    assert!(!d.log().contains(PASSWORD), "the password never reaches the logs");
}

#[tokio::test]
async fn implicit_tls_with_authentication_and_a_wrong_password() {
    let smtp = SmtpServer::start(Security::Implicit, Some(("orders@crave.example", PASSWORD))).await;
    let d = Daemon::start_with_env(&email_config(&secured(&smtp, "tls")), &[("SMTP_PASSWORD", PASSWORD)]).await;
    assert_eq!(d.post_crave(&order("evt_mail_tls")).await.status, 200);
    d.wait_delivery("crave", "evt_mail_tls", "confirm", "delivered").await;
    let got = smtp.wait_accepted(1).await;
    assert_eq!(got[0]["tls"], true);
    assert_eq!(got[0]["auth_user"], "orders@crave.example");
    drop(d);

    // 535 Authentication credentials invalid: permanent.
    let d = Daemon::start_with_env(
        &email_config(&secured(&smtp, "tls")),
        &[("SMTP_PASSWORD", "not-the-password")],
    )
    .await;
    assert_eq!(d.post_crave(&order("evt_mail_badpw")).await.status, 200);
    let dead = d.wait_delivery("crave", "evt_mail_badpw", "confirm", "dead").await;
    assert_eq!(dead["attempts"], 1, "{dead}");
    let error = dead["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("535"), "{dead}");
    assert!(!error.contains("not-the-password"), "{dead}");
    assert_eq!(smtp.messages("accepted").len(), 1);
}

#[test]
fn check_refuses_a_broken_email_sink() {
    let dir = tempfile::tempdir().unwrap();
    let broken = email_config("{ host = \"smtp.example.com\", tls = \"ssl\" }")
        .replace("{INGEST}", "127.0.0.1:18080")
        .replace("{ADMIN}", "127.0.0.1:19090")
        .replace("{DIR}", dir.path().to_str().unwrap());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &broken).unwrap();
    let out = Command::new(crate::harness::BIN)
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = broken.lines().position(|l| l.starts_with("smtp = ")).unwrap() + 1;
    assert!(
        text.contains(&format!("config.toml:{line}:"))
            && text.contains("sinks.confirm.smtp.tls")
            && text.contains("\"ssl\""),
        "names the line, the key and the bad value: {text}"
    );
}
