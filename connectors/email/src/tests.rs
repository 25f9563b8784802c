//! Rendering and encoding, and one exchange with a scripted server (a late
//! reply after a timeout); the SMTP exchanges themselves are tested end to
//! end against a real SMTP server in `tests/it/email.rs`.

use std::sync::Arc;
use std::time::Duration;

use expeditor_api::{Customer, Delivery, Event, EventMeta, Order, Sink, TemplateSet, Views};
use serde_json::json;

use super::*;

fn event(email: Option<&str>) -> Event {
    Event {
        event: EventMeta {
            id: "evt_1".into(),
            source: "crave".into(),
            kind: "crave".into(),
            event_type: "order.created".into(),
            occurred_at: None,
            received_at: "2026-11-23T10:00:00Z".into(),
        },
        payload: json!({}),
        views: Views {
            order: Some(Order {
                id: Some("ord_456".into()),
                total_cents: Some(2798),
                customer: Some(Customer {
                    id: None,
                    name: Some("Zoë Ångström".into()),
                    email: email.map(Into::into),
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

fn delivery(email: Option<&str>) -> Delivery {
    Delivery {
        key: "0123456789abcdef0123456789abcdef".into(),
        attempt: 1,
        event: Arc::new(event(email)),
    }
}

fn config(to: &str, to_name: Option<&str>, html: Option<&str>) -> EmailSinkConfig {
    let mut set = TemplateSet::new();
    let to_most = crate::most_recipients(to);
    let to = set.text("sinks.confirm.to", to).unwrap();
    let to_name = to_name.map(|n| set.text("sinks.confirm.to_name", n).unwrap());
    let subject = set
        .text("sinks.confirm.subject", "Commande confirmée — {{ order.id }}")
        .unwrap();
    let text = set
        .text(
            "sinks.confirm.text",
            "Merci {{ order.customer.name }}! Total {{ order.total_cents | money }}",
        )
        .unwrap();
    let html = html.map(|h| set.text("sinks.confirm.html", h).unwrap());
    EmailSinkConfig {
        name: "confirm".into(),
        smtp: SmtpConfig {
            host: "127.0.0.1".into(),
            port: 2525,
            tls: TlsMode::None,
            credentials: None,
            ca_pem: None,
        },
        from: parse_mailbox("Crêperie Zoë <orders@crave.example>").unwrap(),
        to,
        to_name,
        to_most,
        subject,
        text,
        html,
        timeout: Duration::from_secs(5),
        templates: set.finish(),
    }
}

fn formatted(cfg: &EmailSinkConfig, d: &Delivery) -> String {
    String::from_utf8(message::render(cfg, d).unwrap().formatted()).unwrap()
}

#[test]
fn headers_are_encoded_and_the_message_id_is_the_delivery_key() {
    let cfg = config("{{ order.customer.email }}", Some("{{ order.customer.name }}"), None);
    let raw = formatted(&cfg, &delivery(Some("zoe@example.com")));
    assert!(raw.is_ascii(), "a message on the wire is 7-bit: {raw}");
    assert!(
        raw.contains("Message-ID: <0123456789abcdef0123456789abcdef@crave.example>\r\n"),
        "{raw}"
    );
    // RFC 2047 encoded-words, never raw UTF-8 in a header.
    assert!(raw.contains("Subject: Commande =?utf-8?"), "{raw}");
    assert!(raw.contains("From: =?utf-8?"), "{raw}");
    assert!(raw.contains("<orders@crave.example>"), "{raw}");
    assert!(raw.contains("To: =?utf-8?"), "{raw}");
    assert!(raw.contains("<zoe@example.com>"), "{raw}");
    assert!(raw.contains("Content-Type: text/plain; charset=utf-8"), "{raw}");
}

#[test]
fn the_same_delivery_renders_the_same_message_id() {
    let cfg = config("{{ order.customer.email }}", None, Some("<p>Merci</p>"));
    let a = message::render(&cfg, &delivery(Some("zoe@example.com"))).unwrap();
    let b = message::render(&cfg, &delivery(Some("zoe@example.com"))).unwrap();
    let id = |m: &lettre::Message| {
        m.headers()
            .get_raw("Message-ID")
            .map(str::to_owned)
            .expect("a Message-ID")
    };
    assert_eq!(id(&a), id(&b));
    let raw = String::from_utf8(a.formatted()).unwrap();
    assert!(raw.contains("multipart/alternative"), "{raw}");
    assert!(raw.contains("text/html"), "{raw}");
}

#[test]
fn an_empty_or_invalid_recipient_is_permanent() {
    let cfg = config("{{ order.customer.email }}", None, None);
    let err = message::render(&cfg, &delivery(None)).unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(
        err.message.contains("sinks.confirm.to") && err.message.contains("empty"),
        "{err:?}"
    );
    let err = message::render(&cfg, &delivery(Some("not-an-address"))).unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(
        !err.message.contains("not-an-address"),
        "the address is not quoted: {err:?}"
    );
    let cfg = config("a@example.com, b@example.com", Some("x"), None);
    let err = message::render(&cfg, &delivery(None)).unwrap_err();
    assert!(err.message.contains("to_name"), "{err:?}");
}

#[test]
fn several_recipients() {
    let cfg = config("a@example.com, Kitchen <kitchen@example.com>", None, None);
    let m = message::render(&cfg, &delivery(None)).unwrap();
    let to: Vec<String> = m.envelope().to().iter().map(ToString::to_string).collect();
    assert_eq!(to, ["a@example.com", "kitchen@example.com"]);
}

/// A customer's email field holding a list adds no recipient: each
/// expression of a templated `to` names one address.
#[test]
fn event_data_cannot_add_recipients() {
    let injected = Some("priya@example.net, attacker@evil.test");
    let cfg = config("{{ order.customer.email }}", None, None);
    let err = message::render(&cfg, &delivery(injected)).unwrap_err();
    assert!(!err.retryable && err.message.contains("at most 1"), "{err:?}");
    assert!(!err.message.contains("evil.test"), "{err:?}");
    assert!(message::render(&cfg, &delivery(Some("priya@example.net"))).is_ok());
    let cfg = config("Ops <ops@example.com>, {{ order.customer.email }}", None, None);
    let m = message::render(&cfg, &delivery(Some("priya@example.net"))).unwrap();
    assert_eq!(m.envelope().to().len(), 2);
    assert!(message::render(&cfg, &delivery(injected)).is_err());
    assert_eq!(crate::most_recipients("a@x.com, b@x.com"), None);
    assert_eq!(crate::most_recipients("{{ a }}, {{ b | default('x,y') }}"), Some(2));
    assert_eq!(crate::most_recipients("{# a, b #}{{ c }}"), Some(1));
}

#[test]
fn config_helpers() {
    assert!(parse_mailbox("orders@example.com").is_ok());
    assert!(parse_mailbox("Crave <orders@example.com>").is_ok());
    assert!(parse_mailbox("orders").is_err());
    assert_eq!("starttls".parse(), Ok(TlsMode::StartTls));
    assert_eq!("tls".parse(), Ok(TlsMode::Tls));
    assert_eq!("none".parse(), Ok(TlsMode::None));
    assert!("ssl".parse::<TlsMode>().unwrap_err().contains("starttls"));
    assert!(parse_ca(b"hello").is_err());
}

#[test]
fn debug_hides_the_password() {
    let mut cfg = config("a@example.com", None, None);
    cfg.smtp.credentials = Some(("user".into(), "hunter2-secret".into()));
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("hunter2-secret"), "{debug}");
    assert!(debug.contains("user"), "{debug}");
}

/// A server that takes the first message, but answers its final dot only
/// after 1.5 s, past the sink's 1 s timeout, and rejects every later
/// message at once with a 554. With `silent_quit`, it takes every message
/// at once and never answers `QUIT`.
async fn slow_then_rejecting_server() -> u16 {
    scripted_server(false).await
}

async fn scripted_server(silent_quit: bool) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let messages = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let messages = messages.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 test ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let command = line.to_ascii_uppercase();
                    let reply: &[u8] = if command.starts_with("EHLO") {
                        b"250-test\r\n250 8BITMIME\r\n"
                    } else if command.starts_with("MAIL") || command.starts_with("RCPT") || command.starts_with("NOOP")
                    {
                        b"250 ok\r\n"
                    } else if command == "DATA" {
                        let _ = write.write_all(b"354 go\r\n").await;
                        while let Ok(Some(data)) = lines.next_line().await {
                            if data == "." {
                                break;
                            }
                        }
                        if silent_quit {
                            b"250 queued\r\n"
                        } else if messages.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                            b"250 queued\r\n"
                        } else {
                            b"554 rejected\r\n"
                        }
                    } else if command.starts_with("QUIT") {
                        if silent_quit {
                            // Holds the connection open, and says nothing.
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"500 what\r\n"
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A send cut off by the timeout leaves its connection waiting for a reply
/// that is still to come; used again, every reply on it would answer the
/// command before (a 554 for the next message read as a 2xx, the message
/// recorded as delivered and lost). Each message has a connection of its own.
#[tokio::test]
async fn a_timed_out_send_does_not_leave_its_connection_to_the_next() {
    let port = slow_then_rejecting_server().await;
    let mut cfg = config("{{ order.customer.email }}", None, None);
    cfg.smtp.port = port;
    cfg.timeout = Duration::from_secs(1);
    let sink = EmailSink::new(cfg).unwrap();

    let first = sink.deliver(&[delivery(Some("ada@example.com"))]).await;
    let err = first[0].clone().unwrap_err();
    assert!(err.retryable && err.message.contains("timed out"), "{err:?}");
    // Long enough for the first message's late answer to have come.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = sink.deliver(&[delivery(Some("bob@example.com"))]).await;
    let err = second[0]
        .clone()
        .expect_err("the server rejected the second message: it was not delivered");
    assert!(!err.retryable && err.message.contains("554"), "{err:?}");
}

/// The server's `250` for the message decides: a goodbye (`QUIT`) that is
/// never answered does not turn a delivered message into a timeout, which
/// would send it again.
#[tokio::test]
async fn a_message_taken_is_delivered_however_the_goodbye_goes() {
    let port = scripted_server(true).await;
    let mut cfg = config("{{ order.customer.email }}", None, None);
    cfg.smtp.port = port;
    cfg.timeout = Duration::from_secs(1);
    let sink = EmailSink::new(cfg).unwrap();
    for to in ["ada@example.com", "bob@example.com"] {
        let out = sink.deliver(&[delivery(Some(to))]).await;
        assert_eq!(out, vec![Ok(())]);
    }
}

#[test]
fn a_reply_quoting_an_address_is_stored_without_it() {
    use crate::outcome::without_addresses;
    assert_eq!(
        without_addresses("550 5.1.1 <jane@example.com>: Recipient address rejected"),
        "550 5.1.1 <address>: Recipient address rejected"
    );
    assert_eq!(
        without_addresses("452 4.2.2 jane@example.com, bob@example.org. over quota"),
        "452 4.2.2 <address>, <address>. over quota"
    );
    assert_eq!(
        without_addresses("421 4.7.0 try again later"),
        "421 4.7.0 try again later"
    );
}
