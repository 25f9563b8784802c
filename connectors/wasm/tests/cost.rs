//! What a delivery costs, measured on the `misbehave` test plugin's happy
//! path (parse the payload, log through the host, answer ok). Prints the
//! numbers and asserts nothing about time: CI machines vary. For the figures
//! in plugins/README.md run it optimized:
//!
//! ```sh
//! cargo test -p expeditor-wasm --release --test cost -- --nocapture
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{delivery, misbehave_sink};
use expeditor_api::{Delivery, Sink};
use expeditor_wasm::{Plugin, WasmSink};

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
    let cfg = misbehave_sink("bench", cache.path());

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
