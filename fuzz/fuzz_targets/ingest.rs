//! A webhook body, signed with the source's own scheme, through what a
//! verified request reaches before the store: verification (which must pass),
//! normalization, routing with `when`s, every sink's templates, and the
//! rebuild a delivery makes from the stored body. Nothing may panic; a body
//! a source refuses must be refused with an error.

#![no_main]

mod common;

use std::sync::Arc;

use expeditor::config::Scheme;
use expeditor::store::StoredEvent;
use expeditor::{pipeline, verify};
use expeditor_api::template::Reads;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let cfg = &*common::FUZZ_CONFIG;
    let name = common::SOURCES[usize::from(which) % common::SOURCES.len()];
    let source = &cfg.sources[name];
    let now = 1_780_000_000;
    let mut headers = HeaderMap::new();
    match &source.scheme {
        Scheme::CrumbPos(_) => {
            let value = verify::sign_crumbpos(b"crumb-secret", now, body);
            headers.insert(verify::CRUMB_SIGNATURE, HeaderValue::from_str(&value).unwrap());
        }
        Scheme::Crave(_) => {
            let value = verify::sign_crave(b"crave-secret", body);
            headers.insert(verify::CRAVE_SIGNATURE, HeaderValue::from_str(&value).unwrap());
        }
        Scheme::Hmac(v) => {
            // The plain source's second secret: either verifies (rotation).
            let secret: &[u8] = if name == "hook" {
                b"hook-secret"
            } else {
                b"plain-secret-next"
            };
            for (header, value) in v.sign(secret, Some(now), body) {
                headers.insert(header, HeaderValue::from_str(&value).unwrap());
            }
        }
    }
    let verified = source
        .verifier()
        .verify(&headers, body, now)
        .expect("a body signed with the source's secret verifies");
    let Ok(n) = source.normalizer.normalize(verified.body()) else {
        return;
    };
    let received_at = now * 1000;
    let occurred_at = n.occurred_at.map(|t| t.as_millisecond());
    let event = Arc::new(pipeline::event(
        &source.name,
        source.kind(),
        &n.id,
        &n.event_type,
        occurred_at,
        received_at,
        n.payload(),
        n.views.clone(),
    ));
    let decision = cfg
        .router
        .route(&source.name, &n.event_type, || cfg.router.context(&event));
    assert!(decision.sinks.iter().all(|s| cfg.sinks.contains_key(s)));
    // Every sink's templates, taken or not: a dead letter is not a panic.
    for sink in cfg.sinks.values() {
        if let Some(templates) = sink.kind.templates() {
            let _ = templates.render_all(&event);
        }
    }
    // What a delivery rebuilds from the stored body must be what was routed.
    let stored = StoredEvent {
        source: source.name.clone(),
        event_id: n.id.clone(),
        kind: source.kind().to_string(),
        event_type: n.event_type.clone(),
        occurred_at,
        received_at,
        body: body.to_vec(),
    };
    for reads in [Reads::Meta, Reads::MetaAndPayload, Reads::MetaAndViews, Reads::All] {
        let rebuilt = pipeline::rebuild(&stored, reads).expect("a stored body that normalized rebuilds");
        assert_eq!(rebuilt.event, event.event);
    }
    let all = pipeline::rebuild(&stored, Reads::All).unwrap();
    assert_eq!(all.payload, event.payload);
    assert_eq!(all.views, event.views);
});
