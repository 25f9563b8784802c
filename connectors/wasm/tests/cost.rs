//! What a delivery costs, measured on the `misbehave` test plugin's happy
//! path (parse the payload, log through the host, answer ok). Prints the
//! numbers and asserts nothing about time: CI machines vary. For the figures
//! in plugins/README.md run it optimized:
//!
//! ```sh
//! cargo test -p expeditor-wasm --release --test cost -- --nocapture
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use expeditor_api::{Delivery, Event, EventMeta, Order, Sink, Views};
use expeditor_wasm::{Limits, Plugin, WasmSink, WasmSinkConfig};

/// Builds `plugins/` for wasm32-wasip2 (a no-op when CI already did) and
/// returns the misbehave plugin.
fn misbehave() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = match std::env::var_os("EXPEDITOR_PLUGIN_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join("../plugins"),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(root.join("plugins/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building plugins/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("wasm32-wasip2/release/misbehave.wasm")
}

fn delivery(i: usize) -> Delivery {
    let payload = serde_json::json!({
        "id": format!("evt_{i}"),
        "type": "order.created",
        "created_at": "2024-10-05T14:30:00Z",
        "data": {"id": "ord_xyz789", "type": "order", "attributes": {
            "status": "open", "total": 4250, "tax": 340, "location_id": "loc_main",
            "items": [{"name": "Burger Deluxe", "quantity": 2, "price": 1500}]
        }}
    });
    Delivery {
        key: format!("{i:032x}"),
        attempt: 1,
        event: Arc::new(Event {
            event: EventMeta {
                id: format!("evt_{i}"),
                source: "crumb".into(),
                kind: "crumbpos".into(),
                event_type: "order.created".into(),
                occurred_at: Some("2024-10-05T14:30:00Z".into()),
                received_at: "2026-11-23T10:00:00Z".into(),
            },
            payload,
            views: Views {
                order: Some(Order {
                    id: Some("ord_xyz789".into()),
                    total_cents: Some(4250),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }),
    }
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{what:<58} median {:>9.1?}  p99 {:>9.1?}  (n = {})",
        at(0.5),
        at(0.99),
        samples.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_delivery_cost() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = WasmSinkConfig {
        name: "bench".into(),
        plugin: misbehave(),
        config: "{}".into(),
        allow_http: Vec::new(),
        limits: Limits::default(),
        max_batch: 1,
        cache_dir: Some(cache.path().to_path_buf()),
    };

    let started = Instant::now();
    let plugin = Arc::new(tokio::task::block_in_place(|| Plugin::load(&cfg)).unwrap());
    println!(
        "{:<58} {:>9.1?}",
        "load: compile + check + init (cold cache)",
        started.elapsed()
    );
    let started = Instant::now();
    let _again = tokio::task::block_in_place(|| Plugin::load(&cfg)).unwrap();
    println!(
        "{:<58} {:>9.1?}",
        "load: from the on-disk cache + check + init",
        started.elapsed()
    );

    // A reused instance: the steady state of a busy sink.
    let sink = WasmSink::new(plugin.clone());
    let batch = [delivery(0)];
    assert_eq!(sink.deliver(&batch).await, vec![Ok(())]);
    let mut samples = Vec::new();
    for i in 0..5000 {
        let batch = [delivery(i)];
        let t = Instant::now();
        let out = sink.deliver(&batch).await;
        samples.push(t.elapsed());
        assert_eq!(out, vec![Ok(())]);
    }
    report("deliver, reused instance (spawn_blocking included)", samples);

    // A fresh instance per delivery: what a delivery after a trap costs.
    let mut samples = Vec::new();
    for i in 0..500 {
        let sink = WasmSink::new(plugin.clone());
        let batch = [delivery(i)];
        let t = Instant::now();
        let out = sink.deliver(&batch).await;
        samples.push(t.elapsed());
        assert_eq!(out, vec![Ok(())]);
    }
    report("deliver, fresh instance + init (after a trap)", samples);

    // Batches of 50 on a reused instance, per event.
    let mut samples = Vec::new();
    for round in 0..100 {
        let batch: Vec<Delivery> = (0..50).map(|i| delivery(round * 50 + i)).collect();
        let t = Instant::now();
        let out = sink.deliver(&batch).await;
        samples.push(t.elapsed() / 50);
        assert!(out.iter().all(Result::is_ok));
    }
    report("deliver, batches of 50, per event", samples);
    sink.close().await;
}
