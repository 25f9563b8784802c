//! What the wasm sink's own tests share: the test plugin, and a delivery.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use expeditor_api::{Delivery, Event, EventMeta, Order, Views};
use expeditor_wasm::{Limits, WasmSinkConfig};

/// Builds `plugins/` for wasm32-wasip2 (a no-op when CI already did) and
/// returns the misbehave plugin.
pub fn misbehave() -> PathBuf {
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

pub fn delivery(i: usize) -> Delivery {
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

/// A sink `name` on the misbehave plugin, default limits, one event per
/// call, compiled plugins cached in `cache`.
pub fn misbehave_sink(name: &str, cache: &Path) -> WasmSinkConfig {
    WasmSinkConfig {
        name: name.into(),
        plugin: misbehave(),
        config: "{}".into(),
        allow_http: Vec::new(),
        limits: Limits::default(),
        max_batch: 1,
        cache_dir: Some(cache.to_path_buf()),
        secrets: Vec::new(),
    }
}
