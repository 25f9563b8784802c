//! Micro-benchmarks of the steps every webhook goes through, on realistic
//! sample payloads: verify, parse + normalize, route (with a `when`),
//! template render (a KDS ticket), and the store's group commit.
//!
//! `cargo bench -p expeditor-bench --bench hot_path`; one group:
//! `cargo bench -p expeditor-bench --bench hot_path -- store`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use expeditor::normalize::{Normalized, Normalizer};
use expeditor::store::sqlite::SqliteStore;
use expeditor::store::{NewEvent, Store};
use expeditor::verify::{
    CRAVE_SIGNATURE, CRUMB_SIGNATURE, CraveVerifier, CrumbPosVerifier, DEFAULT_TOLERANCE, Secret, Verify, sign_crave,
    sign_crumbpos,
};
use expeditor_api::{Event, EventMeta, Reads, TemplateSet, Templates};
use http::{HeaderMap, HeaderValue};

const SECRET: &str = "bench-secret";

/// A sample order of a customer with a few items: the `when` below holds
/// for it, and the KDS ticket has something to render.
fn body(kind: &str, event_type: &str) -> Vec<u8> {
    let normalizer = if kind == "crave" {
        Normalizer::Crave
    } else {
        Normalizer::CrumbPos
    };
    (0..1000)
        .map(|seq| {
            let value = expeditor::sample::sample_event(kind, event_type, &format!("evt_bench_{seq:08}"), seq)
                .expect("a sample event");
            serde_json::to_vec(&value).expect("JSON")
        })
        .find(|body| {
            let n = normalizer.normalize(body).expect("normalizes");
            n.views.order.is_some_and(|o| {
                // Crave sends a customer's name, not an id.
                o.items.len() >= 2
                    && o.customer
                        .is_some_and(|c| c.name.is_some() && (kind == "crave" || c.id.is_some()))
            })
        })
        .expect("some sample order has a customer and two items")
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What the pipeline builds before routing and rendering (see `pipeline.rs`).
fn event(source: &str, kind: &str, n: &Normalized) -> Event {
    event_reading(source, kind, n, Reads::All)
}

/// The same with the payload converted only if `reads` says so, as the
/// pipeline builds it for its routes' `when`s.
fn event_reading(source: &str, kind: &str, n: &Normalized, reads: Reads) -> Event {
    Event {
        event: EventMeta {
            id: n.id.clone(),
            source: source.to_string(),
            kind: kind.to_string(),
            event_type: n.event_type.clone(),
            occurred_at: n.occurred_at.map(|t| t.to_string()),
            received_at: "2025-01-01T12:00:00Z".to_string(),
        },
        payload: match reads.payload() {
            true => n.payload(),
            false => serde_json::Value::Null,
        },
        views: n.views.clone(),
    }
}

fn verify(c: &mut Criterion) {
    let mut g = c.benchmark_group("verify");
    let crumb = body("crumbpos", "order.created");
    let t = now_unix();
    let mut headers = HeaderMap::new();
    let sig = sign_crumbpos(SECRET.as_bytes(), t, &crumb);
    headers.insert(CRUMB_SIGNATURE, HeaderValue::try_from(sig).expect("ASCII"));
    let v = CrumbPosVerifier::new(vec![Secret::new(SECRET.into())], DEFAULT_TOLERANCE);
    g.throughput(Throughput::Bytes(crumb.len() as u64));
    g.bench_function(format!("crumbpos/{}B", crumb.len()), |b| {
        b.iter(|| v.verify(black_box(&headers), black_box(&crumb), t).expect("verifies"))
    });

    let crave = body("crave", "order.created");
    let mut headers = HeaderMap::new();
    let sig = sign_crave(SECRET.as_bytes(), &crave);
    headers.insert(CRAVE_SIGNATURE, HeaderValue::try_from(sig).expect("ASCII"));
    let v = CraveVerifier::new(vec![Secret::new(SECRET.into())]);
    g.throughput(Throughput::Bytes(crave.len() as u64));
    g.bench_function(format!("crave/{}B", crave.len()), |b| {
        b.iter(|| v.verify(black_box(&headers), black_box(&crave), t).expect("verifies"))
    });
    g.finish();
}

fn normalize(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse+normalize");
    for (kind, normalizer) in [("crumbpos", Normalizer::CrumbPos), ("crave", Normalizer::Crave)] {
        let body = body(kind, "order.created");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("{kind}/{}B", body.len()), |b| {
            b.iter(|| normalizer.normalize(black_box(&body)).expect("normalizes"))
        });
        // What a `when` route or a held delivery adds: the payload as a `Value`.
        g.bench_function(format!("{kind}/{}B, and the payload as a Value", body.len()), |b| {
            b.iter(|| {
                let n = normalizer.normalize(black_box(&body)).expect("normalizes");
                (n.document.into_value(), n.views)
            })
        });
    }
    g.finish();
}

const ROUTES: &str = r#"
[sources.crumb]
kind = "crumbpos"
secrets = ["s"]

[sources.crave]
kind = "crave"
secrets = ["s"]

[sinks.kds]
type = "http"
url = "http://127.0.0.1:9/kds"

[sinks.loyalty]
type = "http"
url = "http://127.0.0.1:9/loyalty"

[[routes]]
name = "kitchen"
sources = ["crumb", "crave"]
events = ["order.created", "order.updated"]
sinks = ["kds"]

[[routes]]
name = "loyalty"
events = ["order.*"]
when = "order.total_cents > 0 and order.customer.id"
sinks = ["loyalty"]
"#;

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    let config = expeditor::config::parse(Path::new("bench.toml"), ROUTES, &|_| None).expect("a valid config");
    let router = &config.router;
    let raw = body("crumbpos", "order.created");
    let n = Normalizer::CrumbPos.normalize(&raw).expect("normalizes");
    // As in the pipeline: the context (what the `when`s read, converted for
    // MiniJinja) is built only because a route with a `when` matched, and
    // the payload only if a `when` reads it (these read the order view).
    g.bench_function("when, with context", |b| {
        b.iter(|| {
            let d = router.route("crumb", black_box(&n.event_type), || {
                router.context(&Arc::new(event_reading("crumb", "crumbpos", &n, router.reads())))
            });
            assert_eq!(d.sinks.len(), 2);
            d
        })
    });
    let ctx = Templates::context(&event("crumb", "crumbpos", &n));
    g.bench_function("when, context prebuilt", |b| {
        b.iter(|| router.route("crumb", black_box(&n.event_type), || ctx.clone()))
    });
    g.bench_function("globs only, no route matches", |b| {
        b.iter(|| router.route("crumb", black_box("inventory.low_stock"), || ctx.clone()))
    });
    g.finish();
}

fn template(c: &mut Criterion) {
    let mut g = c.benchmark_group("template");
    // A KDS ticket, as in README's `[sinks.kds.body]`, plus a little more.
    let kds = serde_json::json!({
        "external_id": "{{ order.id }}",
        "location": "{{ order.location_id }}",
        "items": "{{ order.items }}",
        "total_cents": "{{ order.total_cents }}",
        "total": "{{ order.total_cents | money }}",
        "label": "Order {{ order.id }} for {{ order.customer.name or 'walk-in' }}",
        "priority": "{{ 'high' if order.channel == 'delivery' else 'normal' }}",
        "source": "{{ event.source }}",
    });
    let mut set = TemplateSet::new();
    let structured = set.structured("sinks.kds.body", &kds).expect("compiles");
    let templates = set.finish();
    for (kind, normalizer) in [("crumbpos", Normalizer::CrumbPos), ("crave", Normalizer::Crave)] {
        let raw = body(kind, "order.created");
        let n = normalizer.normalize(&raw).expect("normalizes");
        let ev = Arc::new(event(kind, kind, &n));
        // As the http sink does per delivery: context, then the body
        // written as JSON text as it renders.
        g.bench_function(format!("kds ticket/{kind}"), |b| {
            b.iter(|| {
                let ctx = templates.context_for(black_box(&ev));
                let mut body = Vec::with_capacity(512);
                templates.write_json(&structured, &ctx, &mut body).expect("renders");
                body
            })
        });
        // As a JSON value first (Slack's blocks and BigQuery's rows need
        // one), then written: what the http sink did before session 28.
        g.bench_function(format!("kds ticket as a value/{kind}"), |b| {
            b.iter(|| {
                let ctx = templates.context_for(black_box(&ev));
                let json = templates.render_json(&structured, &ctx).expect("renders");
                serde_json::to_vec(&json).expect("JSON")
            })
        });
    }
    // A body that reads only the event's envelope, as the benchmark's http
    // sinks: the whole context against only what the template reads.
    let mut set = TemplateSet::new();
    let id_only = set
        .structured("sinks.s1.body", &serde_json::json!({ "id": "{{ event.id }}" }))
        .expect("compiles");
    let templates = set.finish();
    let raw = body("crumbpos", "order.created");
    let n = Normalizer::CrumbPos.normalize(&raw).expect("normalizes");
    let ev = Arc::new(event("crumb", "crumbpos", &n));
    g.bench_function("event id only/whole context", |b| {
        b.iter(|| {
            let ctx = Templates::context(black_box(&ev));
            templates.render_json(&id_only, &ctx).expect("renders")
        })
    });
    g.bench_function("event id only/context_for", |b| {
        b.iter(|| {
            let ctx = templates.context_for(black_box(&ev));
            templates.render_json(&id_only, &ctx).expect("renders")
        })
    });
    g.finish();
}

/// Group commit: `batch` concurrent inserts share one transaction and fsync
/// when they arrive together.
fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store insert");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("store"));
    let body = Bytes::from(body("crumbpos", "order.created"));
    let seq = Arc::new(AtomicU64::new(0));
    for batch in [1usize, 10, 100] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("{batch} concurrent"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let mut inserts = tokio::task::JoinSet::new();
                        for _ in 0..batch {
                            let store = store.clone();
                            let id = seq.fetch_add(1, Ordering::Relaxed);
                            let event = NewEvent {
                                source: "crumb".into(),
                                // Spread over the key space (consecutive ids 0.618 of it
                                // apart), so each insert lands on its own index page, as
                                // vendors' opaque ids do (the load tool's are random-looking).
                                event_id: format!("evt_{:016x}", id.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                                kind: "crumbpos".into(),
                                event_type: "order.created".into(),
                                occurred_at: None,
                                received_at: 1_700_000_000_000,
                                body: body.clone(),
                                sinks: vec!["kds".into()],
                                dead: vec![],
                                held: vec![],
                            };
                            inserts.spawn(async move { store.insert(event).await });
                        }
                        while let Some(r) = inserts.join_next().await {
                            r.expect("insert task").expect("inserted");
                        }
                    }
                    started.elapsed()
                })
            })
        });
    }
    g.finish();
    runtime.block_on(store.close());
}

criterion_group!(benches, verify, normalize, route, template, store);
criterion_main!(benches);
