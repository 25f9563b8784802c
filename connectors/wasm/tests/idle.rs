//! Instances left idle are let go, so the memory a rush took is given back.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{delivery, misbehave_sink};
use expeditor_api::Sink;
use expeditor_wasm::{Plugin, WasmSink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_idle_past_their_time_are_let_go() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = misbehave_sink("idle", cache.path());
    let plugin = Arc::new(tokio::task::block_in_place(|| Plugin::load(&cfg)).unwrap());
    let retire_after = Duration::from_millis(800);
    let sink = Arc::new(WasmSink::retiring_after(plugin, retire_after));

    // A rush: four deliveries at once take four instances.
    let rush: Vec<_> = (0..4)
        .map(|i| {
            let sink = sink.clone();
            tokio::spawn(async move {
                let batch = [delivery(i)];
                // Each holds its instance a while, so they overlap.
                let mut event = (*batch[0].event).clone();
                event.payload["behave"] = "sleep".into();
                event.payload["sleep_ms"] = 300.into();
                let batch = [expeditor_api::Delivery {
                    event: Arc::new(event),
                    ..batch[0].clone()
                }];
                sink.deliver(&batch).await
            })
        })
        .collect();
    for delivered in rush {
        assert_eq!(delivered.await.unwrap(), vec![Ok(())]);
    }
    assert_eq!(sink.idle_instances(), 4, "each kept for the next delivery");

    // A quiet trickle keeps one warm, the others grow old and go.
    for i in 0..6 {
        tokio::time::sleep(retire_after / 4).await;
        assert_eq!(sink.deliver(&[delivery(10 + i)]).await, vec![Ok(())]);
    }
    wait_for(&sink, 1, retire_after * 3).await;
    // Then, with nothing more to deliver, the last one goes too.
    wait_for(&sink, 0, retire_after * 3).await;
    // And a delivery after that makes a fresh one.
    assert_eq!(sink.deliver(&[delivery(99)]).await, vec![Ok(())]);
    assert_eq!(sink.idle_instances(), 1);
    sink.close().await;
    assert_eq!(sink.idle_instances(), 0);
}

async fn wait_for(sink: &WasmSink, idle: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while sink.idle_instances() != idle {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} idle instances, expected {idle}",
            sink.idle_instances()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
