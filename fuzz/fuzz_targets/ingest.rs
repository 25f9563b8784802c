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
use expeditor_api::Views;
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
            // The plain source has two secrets (rotation): either verifies.
            let secret: &[u8] = match (name, which & 0x40 != 0) {
                ("hook", _) => b"hook-secret",
                (_, false) => b"plain-secret",
                (_, true) => b"plain-secret-next",
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
    // Routing evaluates every matching route's `when`; an error there is
    // the route not taken, not a panic.
    let _ = cfg
        .router
        .route(&source.name, &n.event_type, || cfg.router.context(&event));
    // Every sink's templates, taken or not: a dead letter is not a panic.
    for sink in cfg.sinks.values() {
        if let Some(templates) = sink.kind.templates() {
            let _ = templates.render_all(&event);
        }
    }
    // What a delivery rebuilds from the stored body must be what was routed,
    // as much of it as the sink reads: the payload parsed by serde_json
    // (`MetaAndPayload`) as by the normalizer's own parser, the views
    // normalized again.
    let stored = StoredEvent {
        source: source.name.clone(),
        event_id: n.id.clone(),
        kind: source.kind().to_string(),
        event_type: n.event_type.clone(),
        occurred_at,
        received_at,
        body: body.to_vec(),
    };
    let rebuild = |reads| pipeline::rebuild(&stored, reads).expect("a stored body that normalized rebuilds");
    let meta = rebuild(Reads::Meta);
    assert!(meta.payload.is_null());
    assert_eq!(meta.views, Views::default());
    assert_eq!(rebuild(Reads::MetaAndPayload).payload, event.payload);
    assert_eq!(rebuild(Reads::MetaAndViews).views, event.views);
    let all = rebuild(Reads::All);
    assert_eq!(all.payload, event.payload);
    assert_eq!(all.views, event.views);
});
