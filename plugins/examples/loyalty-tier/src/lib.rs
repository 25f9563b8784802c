//! Loyalty tiers: for each order with a customer, compute the points it earns
//! and the tier its total reaches, and report both through the host's log.
//!
//! A plugin that needs no network: it only computes and calls the host. A
//! real one would hand the result to a loyalty database; this one shows the
//! shape: parse the config once in `init`, read the normalized `order` view,
//! answer one result per event.
//!
//! ```toml
//! [sinks.loyalty]
//! type = "wasm"
//! plugin = "loyalty_tier"
//!
//! [sinks.loyalty.config]
//! points_per_dollar = 1
//! tiers = [
//!   { name = "gold", min_cents = 10000 },
//!   { name = "silver", min_cents = 5000 },
//!   { name = "bronze", min_cents = 0 },
//! ]
//! ```

use std::cell::RefCell;

use serde_json::Value;

wit_bindgen::generate!({
    path: "../../wit",
    world: "sink",
});

use expeditor::sink::host::log;
use expeditor::sink::types::Level;

struct Tier {
    name: String,
    min_cents: i64,
}

struct Settings {
    points_per_dollar: i64,
    /// Highest threshold first.
    tiers: Vec<Tier>,
}

thread_local! {
    // A component instance is single-threaded; `init` runs before `deliver`.
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(config: String) -> Result<(), String> {
        let settings = parse_settings(&config)?;
        log(
            Level::Info,
            &format!(
                "loyalty tiers ready: {} tiers, {} point(s) per dollar",
                settings.tiers.len(),
                settings.points_per_dollar
            ),
        );
        SETTINGS.with(|s| *s.borrow_mut() = Some(settings));
        Ok(())
    }

    fn deliver(events: Vec<Event>) -> Vec<Result<(), DeliveryError>> {
        SETTINGS.with(|s| {
            let settings = s.borrow();
            let Some(settings) = settings.as_ref() else {
                return events
                    .iter()
                    .map(|_| Err(DeliveryError::Permanent("init was not called".into())))
                    .collect();
            };
            events.iter().map(|e| award(settings, e)).collect()
        })
    }

    fn shutdown() {}
}

fn award(settings: &Settings, event: &Event) -> Result<(), DeliveryError> {
    let Some(order) = event.order.as_deref() else {
        log(
            Level::Debug,
            &format!("event {} is not about an order; skipped", event.id),
        );
        return Ok(());
    };
    let order: Value =
        serde_json::from_str(order).map_err(|e| DeliveryError::Permanent(format!("order view is not JSON: {e}")))?;
    let Some(customer) = order["customer"]["id"].as_str() else {
        log(
            Level::Debug,
            &format!("order in event {} has no customer; no points", event.id),
        );
        return Ok(());
    };
    let Some(total) = order["total_cents"].as_i64() else {
        // Retrying cannot make a total appear.
        return Err(DeliveryError::Permanent(format!(
            "order in event {} has no total",
            event.id
        )));
    };
    let points = total.max(0) / 100 * settings.points_per_dollar;
    let tier = settings
        .tiers
        .iter()
        .find(|t| total >= t.min_cents)
        .map_or("none", |t| t.name.as_str());
    log(
        Level::Info,
        &format!(
            "loyalty: customer {customer} earns {points} points, tier {tier} (order {}, key {})",
            order["id"].as_str().unwrap_or("?"),
            event.delivery_key
        ),
    );
    Ok(())
}

fn parse_settings(config: &str) -> Result<Settings, String> {
    let config: Value = serde_json::from_str(config).map_err(|e| format!("config is not JSON: {e}"))?;
    let points_per_dollar = match &config["points_per_dollar"] {
        Value::Null => 1,
        v => v
            .as_i64()
            .filter(|p| *p >= 0)
            .ok_or("points_per_dollar must be a whole number, 0 or more")?,
    };
    let mut tiers = Vec::new();
    match &config["tiers"] {
        Value::Null => {
            for (name, min_cents) in [("gold", 10_000), ("silver", 5_000), ("bronze", 0)] {
                tiers.push(Tier {
                    name: name.into(),
                    min_cents,
                });
            }
        }
        Value::Array(list) => {
            for (i, t) in list.iter().enumerate() {
                let name = t["name"].as_str().ok_or(format!("tiers[{i}].name must be a string"))?;
                let min_cents = t["min_cents"]
                    .as_i64()
                    .ok_or(format!("tiers[{i}].min_cents must be a whole number of cents"))?;
                tiers.push(Tier {
                    name: name.into(),
                    min_cents,
                });
            }
        }
        _ => return Err("tiers must be a list of { name, min_cents }".into()),
    }
    tiers.sort_by_key(|t| std::cmp::Reverse(t.min_cents));
    Ok(Settings {
        points_per_dollar,
        tiers,
    })
}

export!(Plugin);
