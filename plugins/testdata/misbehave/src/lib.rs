//! A plugin that misbehaves on request, for expeditor's tests: each event's
//! payload may carry `"behave": "..."`:
//!
//! - `"panic"`: panics (a trap);
//! - `"loop"`: spins forever (stopped by the CPU limit);
//! - `"oom"`: allocates until the memory limit stops it;
//! - `"sleep"`: sleeps for `sleep_ms` from the payload (default an hour)
//!   in a WASI host call, where no CPU is used (stopped by the sink timeout);
//! - `"retry"`: a retryable error, with `retry_after_ms` from the payload
//!   when given;
//! - `"permanent"`: a permanent error;
//! - `"chatter"`: logs `lines` numbered lines from the payload (default
//!   a million), then is delivered;
//! - `"alias"`: the whole call answers `results` permanent errors (default
//!   100) whose messages all point at one string of `mib` MiB (default 2)
//!   in the plugin's memory: a few MiB here, hundreds if the host copied
//!   each one out;
//! - `"hoard"`: makes `count` (default 10,000) timers in the host and keeps
//!   them all (a plugin leaking host resources), then is delivered;
//! - anything else, or nothing: delivered, and logged through the host.
//!
//! The config may say `{"reject": "why"}`: `init` then fails with that text.
//! `{"fail_shutdown": true}` makes `shutdown` panic, to test that a failing
//! shutdown does not stop the daemon's. `{"init_sleep_ms": N}` makes `init`
//! take that long (a slow start, such as fetching a token), and
//! `{"shutdown_sleep_ms": N}` does the same to `shutdown` (a slow flush).

use std::cell::Cell;

use serde_json::Value;

wit_bindgen::generate!({
    path: "../../wit",
    world: "sink",
});

use expeditor::sink::host::log;
use expeditor::sink::types::{Level, RetryHint};

thread_local! {
    static FAIL_SHUTDOWN: Cell<bool> = const { Cell::new(false) };
    static SHUTDOWN_SLEEP_MS: Cell<u64> = const { Cell::new(0) };
    static DELIVERED: Cell<u64> = const { Cell::new(0) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| format!("config is not JSON: {e}"))?;
        if let Some(why) = config["reject"].as_str() {
            return Err(why.to_owned());
        }
        FAIL_SHUTDOWN.with(|f| f.set(config["fail_shutdown"].as_bool().unwrap_or(false)));
        SHUTDOWN_SLEEP_MS.with(|s| s.set(config["shutdown_sleep_ms"].as_u64().unwrap_or(0)));
        if let Some(ms) = config["init_sleep_ms"].as_u64() {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Ok(())
    }

    fn deliver(events: Vec<Event>) -> Vec<Result<(), DeliveryError>> {
        for event in &events {
            let payload: Value = serde_json::from_str(&event.payload).unwrap_or(Value::Null);
            if payload["behave"] == "alias" {
                return aliased(&payload);
            }
        }
        events.iter().map(behave).collect()
    }

    fn shutdown() {
        let delivered = DELIVERED.with(Cell::get);
        log(
            Level::Info,
            &format!("misbehave shutting down after {delivered} deliveries"),
        );
        let ms = SHUTDOWN_SLEEP_MS.with(Cell::get);
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if FAIL_SHUTDOWN.with(Cell::get) {
            panic!("asked to fail at shutdown");
        }
    }
}

/// Many results sharing one big message: each `String` below owns the same
/// bytes. Only the host reads them (a lift it must bound); the plugin's own
/// cleanup after the call would free them more than once, so an instance
/// that gets this far is not fit for another call, which is the point.
fn aliased(payload: &Value) -> Vec<Result<(), DeliveryError>> {
    let results = payload["results"].as_u64().unwrap_or(100) as usize;
    let mib = payload["mib"].as_u64().unwrap_or(2) as usize;
    let mut big = std::mem::ManuallyDrop::new("x".repeat(mib << 20));
    let (ptr, len, cap) = (big.as_mut_ptr(), big.len(), big.capacity());
    (0..results)
        // SAFETY: not sound, on purpose (see above): the host only reads
        // these bytes, and this plugin never touches them again.
        .map(|_| {
            Err(DeliveryError::Permanent(unsafe {
                String::from_raw_parts(ptr, len, cap)
            }))
        })
        .collect()
}

fn behave(event: &Event) -> Result<(), DeliveryError> {
    let payload: Value = serde_json::from_str(&event.payload).unwrap_or(Value::Null);
    match payload["behave"].as_str().unwrap_or("") {
        "panic" => panic!("asked to panic by event {}", event.id),
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch every page so the memory is really used.
                hoard.push(vec![1u8; 16 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "sleep" => {
            let ms = payload["sleep_ms"].as_u64().unwrap_or(3_600_000);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            DELIVERED.with(|d| d.set(d.get() + 1));
            log(Level::Info, &format!("misbehave slept {ms}ms for {}", event.id));
            Ok(())
        }
        "hoard" => {
            let count = payload["count"].as_u64().unwrap_or(10_000);
            for _ in 0..count {
                std::mem::forget(wasip2::clocks::monotonic_clock::subscribe_duration(1_000_000_000));
            }
            DELIVERED.with(|d| d.set(d.get() + 1));
            log(
                Level::Info,
                &format!("misbehave hoarded {count} timers for {}", event.id),
            );
            Ok(())
        }
        "retry" => Err(DeliveryError::Retryable(RetryHint {
            message: format!("asked to retry by event {}", event.id),
            retry_after_ms: payload["retry_after_ms"].as_u64(),
        })),
        "permanent" => Err(DeliveryError::Permanent(format!("asked to fail by event {}", event.id))),
        "chatter" => {
            let lines = payload["lines"].as_u64().unwrap_or(1_000_000);
            for n in 1..=lines {
                log(Level::Info, &format!("misbehave chatter {n} for {}", event.id));
            }
            DELIVERED.with(|d| d.set(d.get() + 1));
            log(Level::Info, &format!("misbehave chattered for {}", event.id));
            Ok(())
        }
        _ => {
            DELIVERED.with(|d| d.set(d.get() + 1));
            log(
                Level::Info,
                &format!(
                    "misbehave delivered {} (attempt {}, key {})",
                    event.id, event.attempt, event.delivery_key
                ),
            );
            Ok(())
        }
    }
}

export!(Plugin);
