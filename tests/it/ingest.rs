//! `POST /webhooks/{source}`: every status code of the contract, and that
//! nothing rejected is stored or delivered.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake_sink::FakeSink;
use crate::harness::{Daemon, Reply, base_config, one_sink_config};
use crate::vendor::{CRAVE_SECRET, CRUMB_SECRET, crave_order, crave_signature, crumb_order, crumb_signature, now};

/// Signs a body: the `Crumb-Signature` a test case sends.
type Signer = fn(&[u8]) -> String;

const JSON: (&str, &str) = ("content-type", "application/json");

fn bytes(event: &Value) -> Vec<u8> {
    serde_json::to_vec(event).expect("json")
}

/// A rejection: the status, a JSON `{"error": "..."}` body, and nothing of
/// the secrets or the posted body in it.
fn assert_rejected(case: &str, reply: &Reply, status: u16) {
    assert_eq!(
        reply.status, status,
        "{case}: expected {status}, got {} {:?}",
        reply.status, reply.body
    );
    let body: Value = serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("{case}: error body is not JSON ({e}): {:?}", reply.body));
    assert!(
        body["error"].is_string(),
        "{case}: error body without \"error\": {body}"
    );
    for leak in [CRUMB_SECRET, CRAVE_SECRET, "Burger Deluxe", "Margherita", "ord_xyz789"] {
        assert!(
            !reply.body.contains(leak),
            "{case}: error body leaks {leak:?}: {}",
            reply.body
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_status_code_and_nothing_rejected_is_stored() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config(r#"max_body = "1KiB""#, &sink.url("/hook"))).await;

    // 200 accepted, then 200 duplicate.
    let accepted = crumb_order("evt_ok", 4250);
    let reply = d.post_crumb(&accepted).await;
    assert_eq!(reply.status, 200, "accepted: {}", reply.body);
    assert_eq!(reply.json(), json!({"status": "accepted", "id": "evt_ok"}));
    let reply = d.post_crumb(&accepted).await;
    assert_eq!(reply.status, 200, "duplicate: {}", reply.body);
    assert_eq!(reply.json(), json!({"status": "duplicate", "id": "evt_ok"}));

    // 404: unknown source or path, even when otherwise well-formed and signed.
    let body = bytes(&crumb_order("evt_404", 4250));
    let sig = crumb_signature(CRUMB_SECRET, now(), &body);
    let signed = [JSON, ("crumb-signature", sig.as_str())];
    assert_rejected("unknown source", &d.post("nope", &signed, body.clone()).await, 404);
    for path in ["/webhooks/", "/webhooks/crumb/extra", "/hooks/crumb", "/"] {
        let reply = d.request("POST", path, &signed, body.clone()).await;
        assert_eq!(reply.status, 404, "POST {path}: {}", reply.body);
    }

    // 405 with Allow: POST.
    for method in ["GET", "PUT", "DELETE"] {
        let reply = d.request(method, "/webhooks/crumb", &signed, body.clone()).await;
        assert_rejected(&format!("{method} /webhooks/crumb"), &reply, 405);
        let allow = reply.headers.get("allow").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(allow.contains("POST"), "{method}: Allow header is {allow:?}");
    }

    // 413: over max_body (1 KiB), properly signed.
    let mut big = crumb_order("evt_413", 4250);
    big["padding"] = json!("x".repeat(2048));
    let big = bytes(&big);
    let sig = crumb_signature(CRUMB_SECRET, now(), &big);
    let reply = d.post("crumb", &[JSON, ("crumb-signature", &sig)], big).await;
    assert_rejected("body over max_body", &reply, 413);

    // 415: a content type that is not JSON, properly signed.
    let html = bytes(&crumb_order("evt_415", 4250));
    let sig = crumb_signature(CRUMB_SECRET, now(), &html);
    let reply = d
        .post(
            "crumb",
            &[("content-type", "text/html"), ("crumb-signature", &sig)],
            html,
        )
        .await;
    assert_rejected("text/html", &reply, 415);
    let twice = bytes(&crumb_order("evt_415_twice", 4250));
    let sig = crumb_signature(CRUMB_SECRET, now(), &twice);
    let reply = d
        .post(
            "crumb",
            &[
                JSON,
                ("content-type", "application/x-www-form-urlencoded"),
                ("crumb-signature", &sig),
            ],
            twice,
        )
        .await;
    assert_rejected("JSON, then a form type", &reply, 415);
    // 415 too for a content coding: the signature is over the bytes as sent,
    // so a body labelled compressed is refused, not stored as it came.
    for (id, coding) in [
        ("evt_415_gzip", vec!["gzip"]),
        ("evt_415_br", vec!["br"]),
        ("evt_415_list", vec!["identity, gzip"]),
        ("evt_415_second", vec!["identity", "deflate"]),
    ] {
        let body = bytes(&crumb_order(id, 4250));
        let sig = crumb_signature(CRUMB_SECRET, now(), &body);
        let mut headers = vec![JSON, ("crumb-signature", sig.as_str())];
        headers.extend(coding.iter().map(|c| ("content-encoding", *c)));
        let reply = d.post("crumb", &headers, body).await;
        assert_rejected(&format!("content-encoding {coding:?}"), &reply, 415);
        assert!(reply.body.contains("content encoding"), "{id}: {}", reply.body);
        let accepts = reply.headers.get("accept-encoding").and_then(|v| v.to_str().ok());
        assert_eq!(accepts, Some("identity"), "{id}");
    }

    // 401: every way a CrumbPOS signature can be wrong.
    let body = bytes(&crumb_order("evt_401", 4250));
    let good_t = now();
    let good_mac = crumb_signature(CRUMB_SECRET, good_t, &body);
    let good_hex = good_mac.split("v1=").nth(1).unwrap().to_owned();
    let tampered = bytes(&crumb_order("evt_401", 1));
    let bad_headers: Vec<(&str, String)> = vec![
        ("garbage", "garbage".into()),
        ("empty", String::new()),
        ("no t", format!("v1={good_hex}")),
        ("no v1", format!("t={good_t}")),
        ("t not a number", format!("t=abc,v1={good_hex}")),
        ("v1 not hex", format!("t={good_t},v1=zz{}", &good_hex[2..])),
        ("v1 truncated", format!("t={good_t},v1={}", &good_hex[..32])),
        ("wrong secret", crumb_signature("not-the-secret", good_t, &body)),
        ("mac of another body", crumb_signature(CRUMB_SECRET, good_t, &tampered)),
        (
            "stale, t = now - 600",
            crumb_signature(CRUMB_SECRET, now() - 600, &body),
        ),
        (
            "future, t = now + 600",
            crumb_signature(CRUMB_SECRET, now() + 600, &body),
        ),
        ("t moved, mac kept", format!("t={},v1={good_hex}", good_t - 1)),
    ];
    let reply = d.post("crumb", &[JSON], body.clone()).await;
    assert_rejected("crumbpos: missing Crumb-Signature", &reply, 401);
    for (case, header) in &bad_headers {
        let reply = d
            .post("crumb", &[JSON, ("crumb-signature", header)], body.clone())
            .await;
        assert_rejected(&format!("crumbpos: {case}"), &reply, 401);
    }
    let reply = d
        .post("crumb", &[JSON, ("crumb-signature", &good_mac)], tampered.clone())
        .await;
    assert_rejected("crumbpos: tampered body", &reply, 401);

    // 401: Crave.
    let body = bytes(&crave_order("evt_401_crave", "27.98"));
    let good = crave_signature(CRAVE_SECRET, &body);
    let tampered = bytes(&crave_order("evt_401_crave", "0.01"));
    let reply = d.post("crave", &[JSON], body.clone()).await;
    assert_rejected("crave: missing X-Crave-Signature", &reply, 401);
    for (case, header) in [
        ("garbage", "garbage".to_owned()),
        ("wrong secret", crave_signature("not-the-secret", &body)),
        ("crumbpos-style header", crumb_signature(CRAVE_SECRET, now(), &body)),
    ] {
        let reply = d
            .post("crave", &[JSON, ("x-crave-signature", &header)], body.clone())
            .await;
        assert_rejected(&format!("crave: {case}"), &reply, 401);
    }
    let reply = d.post("crave", &[JSON, ("x-crave-signature", &good)], tampered).await;
    assert_rejected("crave: tampered body", &reply, 401);
    // A valid CrumbPOS signature is no signature for Crave.
    let crumb_sig = crumb_signature(CRUMB_SECRET, now(), &body);
    let reply = d.post("crave", &[JSON, ("crumb-signature", &crumb_sig)], body).await;
    assert_rejected("crave: only a Crumb-Signature", &reply, 401);

    // 400: verified, but not an event we can take.
    let mut no_id = crumb_order("evt_unused", 4250);
    no_id.as_object_mut().unwrap().remove("id");
    let mut no_type = crumb_order("evt_400_no_type", 4250);
    no_type.as_object_mut().unwrap().remove("type");
    let crumb_400: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"this is not json {".to_vec()),
        (
            "a JSON array",
            b"[{\"id\":\"evt_400_array\",\"type\":\"order.created\"}]".to_vec(),
        ),
        ("no id", bytes(&no_id)),
        ("no type", bytes(&no_type)),
        // Shown in a terminal as "evt_ok1" (the override reverses what follows).
        (
            "an id with a bidirectional override",
            bytes(&crumb_order("evt_\u{202E}1ko", 4250)),
        ),
        (
            "an id with a control character",
            bytes(&crumb_order("evt_\u{1b}[2Jok", 4250)),
        ),
    ];
    for (case, body) in crumb_400 {
        let sig = crumb_signature(CRUMB_SECRET, now(), &body);
        let reply = d.post("crumb", &[JSON, ("crumb-signature", &sig)], body).await;
        assert_rejected(&format!("crumbpos: {case}"), &reply, 400);
    }
    let junk_total = bytes(&crave_order("evt_400_money", "abc"));
    let sig = crave_signature(CRAVE_SECRET, &junk_total);
    // Sent three times (Crave signs no time: a captured body stays valid).
    for _ in 0..3 {
        let reply = d
            .post("crave", &[JSON, ("x-crave-signature", &sig)], junk_total.clone())
            .await;
        assert_rejected("crave: total \"abc\"", &reply, 400);
    }
    // The vendor signed it, will retry it and then give up: the log line
    // says which event it was (the body is not kept).
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("webhook rejected: invalid event") && l.contains("crave"))
        .unwrap_or_else(|| panic!("no line for the refused Crave event:\n{log}"));
    assert!(
        line.contains("evt_400_money") && line.contains("invalid amount in data.total"),
        "{line}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("webhook rejected: invalid event") && l.contains("evt_400_money"))
            .count(),
        1,
        "one line for one event sent again and again:\n{log}"
    );
    // Each one, however close together: none is held back.
    assert!(
        log.lines()
            .any(|l| l.contains("webhook rejected: invalid event") && l.contains("evt_400_no_type")),
        "no line for the CrumbPOS event without a type:\n{log}"
    );

    // The refused ids are not written out raw either.
    let log = d.log();
    assert!(!log.contains('\u{202E}') && !log.contains('\u{1b}'), "{log}");

    // Only the accepted event is stored, with one delivery, delivered once.
    d.wait_delivery("crumb", "evt_ok", "hook", "delivered").await;
    let got = sink.settle().await;
    assert_eq!(got.len(), 1, "sink requests: {got:#?}");
    assert_eq!(got[0].event_id(), "evt_ok");
    let events = d.events().await;
    let ids: Vec<_> = events.iter().map(|e| (e["source"].clone(), e["id"].clone())).collect();
    assert_eq!(
        ids,
        vec![(json!("crumb"), json!("evt_ok"))],
        "stored events: {events:#?}"
    );
    let deliveries = d.deliveries().await;
    assert_eq!(deliveries.len(), 1, "deliveries: {deliveries:#?}");
    // The CLI sees the same store.
    let listed = d.cli_json(&["events", "--json"]).await;
    assert_eq!(
        listed["events"].as_array().map(Vec::len),
        Some(1),
        "events --json: {listed}"
    );
    assert_eq!(listed["events"][0]["id"], "evt_ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_content_types_are_accepted() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    let cases = [
        ("evt_ct_charset", Some("application/json; charset=utf-8")),
        ("evt_ct_vendor", Some("application/vnd.crumb+json")),
        ("evt_ct_upper", Some("Application/JSON")),
        ("evt_ct_absent", None),
    ];
    for (id, content_type) in cases {
        let body = bytes(&crumb_order(id, 4250));
        let sig = crumb_signature(CRUMB_SECRET, now(), &body);
        let mut headers = vec![("crumb-signature", sig.as_str())];
        headers.extend(content_type.map(|ct| ("content-type", ct)));
        // `identity` is no coding at all.
        if id == "evt_ct_upper" {
            headers.push(("content-encoding", "Identity"));
        }
        let reply = d.post("crumb", &headers, body).await;
        assert_eq!(
            reply.status, 200,
            "{id} with content type {content_type:?}: {}",
            reply.body
        );
    }
    let got = sink.wait_for(cases.len(), Duration::from_secs(10)).await;
    let mut ids: Vec<_> = got.iter().map(|r| r.event_id()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["evt_ct_absent", "evt_ct_charset", "evt_ct_upper", "evt_ct_vendor"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crumbpos_rotation_several_v1_and_tolerance() {
    let config = format!(
        r#"{base}
[sources.crumb]
kind = "crumbpos"
secrets = ["old-secret", "new-secret"]
tolerance = "5m"

[sources.tight]
kind = "crumbpos"
secrets = ["tight-secret"]
tolerance = "30s"
"#,
        base = base_config("")
    );
    let d = Daemon::start(&config).await;
    let post = |source: &'static str, id: &str, header: Signer| {
        let body = bytes(&crumb_order(id, 4250));
        let sig = header(&body);
        let d = &d;
        async move { d.post(source, &[JSON, ("crumb-signature", &sig)], body).await }
    };

    let cases: [(&str, &str, Signer, u16); 7] = [
        (
            "either secret: old",
            "evt_rot_old",
            |b| crumb_signature("old-secret", now(), b),
            200,
        ),
        (
            "either secret: new",
            "evt_rot_new",
            |b| crumb_signature("new-secret", now(), b),
            200,
        ),
        (
            "a wrong v1 before the right one",
            "evt_rot_multi",
            |b| {
                let t = now();
                let right = crumb_signature("new-secret", t, b);
                let wrong = crumb_signature("retired-secret", t, b);
                format!("{wrong},{}", right.split(',').nth(1).unwrap())
            },
            200,
        ),
        (
            "4 minutes old, tolerance 5m",
            "evt_rot_240",
            |b| crumb_signature("new-secret", now() - 240, b),
            200,
        ),
        (
            "only wrong v1s",
            "evt_rot_wrong",
            |b| {
                let t = now();
                let a = crumb_signature("x", t, b);
                let c = crumb_signature("y", t, b);
                format!("{a},{}", c.split(',').nth(1).unwrap())
            },
            401,
        ),
        (
            "a secret of another source",
            "evt_rot_other",
            |b| crumb_signature("tight-secret", now(), b),
            401,
        ),
        ("empty secret", "evt_rot_empty", |b| crumb_signature("", now(), b), 401),
    ];
    for (case, id, header, status) in cases {
        let reply = post("crumb", id, header).await;
        assert_eq!(reply.status, status, "{case}: {}", reply.body);
    }
    let reply = post("tight", "evt_tight_ok", |b| {
        crumb_signature("tight-secret", now() - 5, b)
    })
    .await;
    assert_eq!(reply.status, 200, "5 s old, tolerance 30s: {}", reply.body);
    let reply = post("tight", "evt_tight_old", |b| {
        crumb_signature("tight-secret", now() - 90, b)
    })
    .await;
    assert_eq!(reply.status, 401, "90 s old, tolerance 30s: {}", reply.body);

    let mut stored: Vec<String> = d
        .events()
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            "evt_rot_240",
            "evt_rot_multi",
            "evt_rot_new",
            "evt_rot_old",
            "evt_tight_ok"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_body_over_max_body_is_413() {
    let d = Daemon::start(&format!(
        "{}{}",
        base_config(r#"max_body = "1KiB""#),
        crate::vendor::SOURCES
    ))
    .await;
    let mut event = crumb_order("evt_413_chunked", 4250);
    event["padding"] = json!("x".repeat(4096));
    let body = bytes(&event);
    let sig = crumb_signature(CRUMB_SECRET, now(), &body);
    let mut request = format!(
        "POST /webhooks/crumb HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         crumb-signature: {sig}\r\ntransfer-encoding: chunked\r\n\r\n",
        d.ingest
    )
    .into_bytes();
    for chunk in body.chunks(512) {
        request.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    let status = raw_status(d.ingest, &request, Duration::from_secs(10)).await;
    assert_eq!(status, 413, "chunked body of {} bytes, max_body 1KiB", body.len());
    assert!(d.events().await.is_empty(), "nothing may be stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn body_not_read_in_body_timeout_is_408() {
    let d = Daemon::start(&format!(
        "{}{}",
        base_config(r#"body_timeout = "1s""#),
        crate::vendor::SOURCES
    ))
    .await;
    let body = bytes(&crumb_order("evt_408", 4250));
    let sig = crumb_signature(CRUMB_SECRET, now(), &body);
    let mut request = format!(
        "POST /webhooks/crumb HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         crumb-signature: {sig}\r\ncontent-length: {}\r\n\r\n",
        d.ingest,
        body.len()
    )
    .into_bytes();
    request.extend(&body[..body.len() / 2]); // and then nothing more
    let started = std::time::Instant::now();
    let status = raw_status(d.ingest, &request, Duration::from_secs(8)).await;
    assert_eq!(status, 408, "half a body, then silence");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "408 took {:?} with body_timeout 1s",
        started.elapsed()
    );
    assert!(d.events().await.is_empty(), "nothing may be stored");
}

/// Writes raw bytes to `addr` and returns the status code of the answer.
async fn raw_status(addr: SocketAddr, request: &[u8], timeout: Duration) -> u16 {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect ingest");
        // The server may answer and close before reading everything.
        let _ = stream.write_all(request).await;
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend(&buf[..n]),
            }
            if response.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        response
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer within {timeout:?}"));
    let text = String::from_utf8_lossy(&response);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn hmac_sources_are_configured_not_coded() {
    use base64::Engine as _;
    let config = format!(
        r#"{base}
[sources.generic]
kind = "hmac"
secrets = ["generic-secret"]
header = "X-Signature"
encoding = "base64"
prefix = "sha256="
timestamp_header = "X-Timestamp"
tolerance = "5m"
id_field = "meta.event_id"
type_field = "meta.kind"

[sources.plain]
kind = "hmac"
secrets = ["plain-secret"]
header = "X-Hub-Signature"
"#,
        base = base_config("")
    );
    let d = Daemon::start(&config).await;
    let b64 = |mac: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(mac);

    // generic: base64 of HMAC("<t>.<body>"), with a prefix and a timestamp header.
    let body = bytes(&json!({"meta": {"event_id": "gen_1", "kind": "thing.happened"}, "value": 1}));
    let sign = |t: i64, body: &[u8]| {
        let t = t.to_string();
        format!(
            "sha256={}",
            b64(crate::vendor::hmac_sha256(
                "generic-secret",
                &[t.as_bytes(), b".", body]
            ))
        )
    };
    // One timestamp for the header and the signature: a second may tick
    // between two calls of now() on a busy machine.
    let signed_at = now();
    let t = signed_at.to_string();
    let reply = d
        .post(
            "generic",
            &[JSON, ("x-timestamp", &t), ("x-signature", &sign(signed_at, &body))],
            body.clone(),
        )
        .await;
    assert_eq!(reply.status, 200, "generic, well signed: {}", reply.body);
    assert_eq!(reply.json(), json!({"status": "accepted", "id": "gen_1"}));

    // Each case signs the same new event, with one thing wrong.
    let body = bytes(&json!({"meta": {"event_id": "gen_2", "kind": "thing.happened"}}));
    let mac = |parts: &[&[u8]]| crate::vendor::hmac_sha256("generic-secret", parts);
    let hex_mac = format!("sha256={}", hex::encode(mac(&[t.as_bytes(), b".", &body])));
    let body_only = format!("sha256={}", b64(mac(&[&body])));
    let old = (signed_at - 600).to_string();
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "hex instead of base64",
            vec![("x-timestamp", t.clone()), ("x-signature", hex_mac)],
        ),
        (
            "stale timestamp",
            vec![("x-timestamp", old), ("x-signature", sign(signed_at - 600, &body))],
        ),
        (
            "timestamp not the signed one",
            vec![
                ("x-timestamp", (now() - 1).to_string()),
                ("x-signature", sign(now() + 1, &body)),
            ],
        ),
        ("no timestamp header", vec![("x-signature", sign(now(), &body))]),
        ("no signature header", vec![("x-timestamp", t.clone())]),
        (
            "MAC of the body alone",
            vec![("x-timestamp", t.clone()), ("x-signature", body_only)],
        ),
    ];
    for (case, headers) in cases {
        let mut all: Vec<(&str, &str)> = vec![JSON];
        all.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
        let reply = d.post("generic", &all, body.clone()).await;
        assert_rejected(&format!("hmac generic: {case}"), &reply, 401);
    }
    let no_id = bytes(&json!({"meta": {"kind": "thing.happened"}}));
    let reply = d
        .post(
            "generic",
            &[JSON, ("x-timestamp", &t), ("x-signature", &sign(signed_at, &no_id))],
            no_id,
        )
        .await;
    assert_rejected("hmac generic: no meta.event_id", &reply, 400);

    // plain: hex HMAC of the body, defaults id / type.
    let body = bytes(&json!({"id": "plain_1", "type": "ping"}));
    let good = hex::encode(crate::vendor::hmac_sha256("plain-secret", &[&body]));
    let reply = d.post("plain", &[JSON, ("x-hub-signature", &good)], body.clone()).await;
    assert_eq!(reply.status, 200, "plain, well signed: {}", reply.body);
    let bad = hex::encode(crate::vendor::hmac_sha256("other", &[&body]));
    assert_rejected(
        "hmac plain: wrong secret",
        &d.post("plain", &[JSON, ("x-hub-signature", &bad)], body).await,
        401,
    );

    let mut stored: Vec<(String, String)> = d
        .events()
        .await
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_owned(),
                e["type"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            ("gen_1".to_owned(), "thing.happened".to_owned()),
            ("plain_1".to_owned(), "ping".to_owned())
        ]
    );
}

/// While another process holds the SQLite write lock, the daemon cannot
/// commit: it must answer 503 and acknowledge nothing, so the vendor's retry
/// is accepted as new once the store is back.
#[tokio::test(flavor = "multi_thread")]
async fn store_that_cannot_commit_is_503_and_nothing_is_acknowledged() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config("", &sink.url("/hook"))).await;
    let db = d.dir.path().join("store").join("expeditor.db");
    assert!(db.exists(), "the store is <store.path>/expeditor.db");

    let locker = rusqlite::Connection::open(&db).expect("open the daemon's database");
    locker.execute_batch("BEGIN EXCLUSIVE").expect("take the write lock");
    let event = crumb_order("evt_503", 4250);
    let reply = d.post_crumb(&event).await;
    assert_rejected("store locked", &reply, 503);
    locker.execute_batch("ROLLBACK").expect("release the write lock");
    drop(locker);

    let reply = d.post_crumb(&event).await;
    assert_eq!(reply.status, 200, "store back: {}", reply.body);
    assert_eq!(
        reply.json()["status"],
        "accepted",
        "the 503 must not have stored it: {}",
        reply.body
    );
    d.wait_delivery("crumb", "evt_503", "hook", "delivered").await;
    assert_eq!(sink.settle().await.len(), 1);
}

/// A client that sends requests and never reads the answers stalls our
/// writes once its window is full; such a connection is cut off after
/// `header_timeout`, so it cannot hold a connection slot (here the only one)
/// for ever, nor a stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_its_answers_is_cut_off() {
    let sink = FakeSink::start().await;
    let d = Daemon::start(&one_sink_config(
        "max_connections = 1\nheader_timeout = \"1s\"",
        &sink.url("/hook"),
    ))
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(d.ingest).await.unwrap();
    // Enough pipelined requests that their answers fill both socket buffers.
    let requests = b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n".repeat(40_000);
    let writer = tokio::spawn(async move {
        let _ = stuck.write_all(&requests).await;
        // Holds the connection open, reading nothing.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stuck);
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let reply = tokio::time::timeout(
        Duration::from_secs(15),
        d.post_crumb(&crumb_order("evt_after_a_stuck_client", 100)),
    )
    .await
    .expect("the only connection slot was never given back");
    assert_eq!(reply.status, 200, "{}", reply.body);
    writer.abort();
}
