//! Realistic sample events, shaped like the vendors' documented payloads, for
//! `expeditor send` and the benchmark's load generator.
//!
//! `seq` varies the content deterministically (items, quantities, modifiers,
//! totals, channel, location, with or without a customer), so a benchmark's
//! events differ from one another while any one `seq` is reproducible. Only
//! `created_at` depends on the clock.

use serde_json::{Value, json};

use crate::normalize::Normalizer;

/// CrumbPOS event types `sample_event` knows.
pub const CRUMBPOS_EVENTS: &[&str] = &[
    "order.created",
    "order.updated",
    "payment.completed",
    "inventory.low_stock",
];

/// Crave event types `sample_event` knows.
pub const CRAVE_EVENTS: &[&str] = &[
    "order.created",
    "order.confirmed",
    "order.ready",
    "order.completed",
    "order.cancelled",
    "cart.abandoned",
];

/// The event types for a source kind (`hmac` accepts any type: empty here).
pub fn event_types(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "crumbpos" => Some(CRUMBPOS_EVENTS),
        "crave" => Some(CRAVE_EVENTS),
        "hmac" => Some(&[]),
        _ => None,
    }
}

/// A sample body of `event_type` for source `kind` (`crumbpos`, `crave` or
/// `hmac`), with event id `event_id`, varied by `seq`. `None` for an unknown
/// kind, or a type the kind does not send (`hmac` takes any non-empty type
/// and returns a generic `{id, type, created_at, data}` event).
pub fn sample_event(kind: &str, event_type: &str, event_id: &str, seq: u64) -> Option<Value> {
    let now = now_rfc3339();
    let o = SampleOrder::new(seq);
    match kind {
        "crumbpos" => crumbpos(event_type, event_id, seq, &o, &now),
        "crave" => crave(event_type, event_id, seq, &o, &now),
        "hmac" if !event_type.is_empty() => Some(json!({
            "id": event_id,
            "type": event_type,
            "created_at": now,
            "data": {
                "id": format!("obj_{seq:06}"),
                "sequence": seq,
                "location_id": o.location,
                "amount": o.total,
                "note": "sample event from expeditor",
            },
        })),
        _ => None,
    }
}

/// A sample body for `source` (its kind's vendor shape, `None` as
/// [`sample_event`]), with the id, type and time where the source reads them:
/// what `expeditor send` posts and what `expeditor test` routes.
pub fn for_source(source: &crate::config::Source, event_type: &str, event_id: &str, seq: u64) -> Option<Value> {
    let mut sample = sample_event(source.kind(), event_type, event_id, seq)?;
    place_fields(&mut sample, &source.normalizer);
    Some(sample)
}

/// Moves an `hmac` sample's top-level `id`, `type` and `created_at` to where
/// the source reads them (`id_field`, `type_field`, `time_field`), so its own
/// test webhook is one it accepts. Without a `time_field` the time stays at
/// `created_at`, as a vendor's would. Other kinds are left as they are.
fn place_fields(sample: &mut Value, normalizer: &Normalizer) {
    let Normalizer::Hmac {
        id_field,
        type_field,
        time_field,
    } = normalizer
    else {
        return;
    };
    let Some(top) = sample.as_object_mut() else { return };
    let mut take = |key: &str| top.remove(key).unwrap_or(Value::Null);
    let (id, event_type, at) = (take("id"), take("type"), take("created_at"));
    match time_field {
        Some(field) => field.set(sample, at),
        None => {
            if let Some(top) = sample.as_object_mut() {
                top.insert("created_at".to_owned(), at);
            }
        }
    }
    type_field.set(sample, event_type);
    id_field.set(sample, id);
}

fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second()).unwrap_or(now).to_string()
}

struct MenuItem {
    id: &'static str,
    name: &'static str,
    price: i64,
    modifiers: &'static [(&'static str, &'static str, i64)],
}

const MENU: &[MenuItem] = &[
    MenuItem {
        id: "mi_burger",
        name: "Burger Deluxe",
        price: 1500,
        modifiers: &[
            ("mod_no_onions", "No Onions", 0),
            ("mod_bacon", "Add Bacon", 250),
            ("mod_cheddar", "Extra Cheddar", 150),
        ],
    },
    MenuItem {
        id: "mi_margherita",
        name: "Margherita Pizza",
        price: 1299,
        modifiers: &[
            ("mod_basil", "Extra Basil", 50),
            ("mod_gf_crust", "Gluten-Free Crust", 300),
        ],
    },
    MenuItem {
        id: "mi_caesar",
        name: "Caesar Salad",
        price: 1095,
        modifiers: &[("mod_chicken", "Add Chicken", 400)],
    },
    MenuItem {
        id: "mi_fries",
        name: "Truffle Fries",
        price: 695,
        modifiers: &[],
    },
    MenuItem {
        id: "mi_lemonade",
        name: "Fresh Lemonade",
        price: 450,
        modifiers: &[("mod_no_ice", "No Ice", 0)],
    },
    MenuItem {
        id: "mi_tiramisu",
        name: "Tiramisu",
        price: 850,
        modifiers: &[],
    },
];

const LOCATIONS: &[&str] = &["loc_main", "loc_downtown", "loc_airport"];
const LOCATION_NAMES: &[&str] = &["Main St", "Downtown", "Airport T2"];
const CUSTOMERS: &[(&str, &str, &str)] = &[
    ("cus_alex", "Alex Johnson", "alex@example.com"),
    ("cus_sam", "Sam Rivera", "sam.rivera@example.com"),
    ("cus_priya", "Priya Patel", "priya@example.net"),
    ("cus_kim", "Jordan Kim", "jordan.kim@example.org"),
];

/// SplitMix64: a well-mixed, deterministic value from `seq`.
fn mix(seq: u64, salt: u64) -> u64 {
    let mut z = seq
        .wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick<T>(list: &[T], seq: u64, salt: u64) -> &T {
    &list[(mix(seq, salt) % list.len() as u64) as usize]
}

struct Line {
    item: &'static MenuItem,
    quantity: i64,
    modifiers: Vec<(&'static str, &'static str, i64)>,
}

impl Line {
    fn unit(&self) -> i64 {
        self.item.price + self.modifiers.iter().map(|m| m.2).sum::<i64>()
    }

    fn total(&self) -> i64 {
        self.unit() * self.quantity
    }
}

/// One order's content, derived from `seq`.
struct SampleOrder {
    lines: Vec<Line>,
    tax: i64,
    tip: i64,
    total: i64,
    location: &'static str,
    location_name: &'static str,
    customer: Option<(&'static str, &'static str, &'static str)>,
}

impl SampleOrder {
    fn new(seq: u64) -> Self {
        let count = 1 + mix(seq, 1) % 3;
        let start = mix(seq, 2) as usize;
        let lines: Vec<Line> = (0..count as usize)
            .map(|j| {
                let item = &MENU[(start + j * 2) % MENU.len()];
                let quantity = 1 + (mix(seq, 10 + j as u64) % 3) as i64;
                let n_mods = if item.modifiers.is_empty() {
                    0
                } else {
                    (mix(seq, 20 + j as u64) % (item.modifiers.len() as u64 + 1)) as usize
                };
                Line {
                    item,
                    quantity,
                    modifiers: item.modifiers[..n_mods].to_vec(),
                }
            })
            .collect();
        let subtotal: i64 = lines.iter().map(Line::total).sum();
        // 8.875 % sales tax, rounded half up, in integer arithmetic.
        let tax = (subtotal * 8875 + 50_000) / 100_000;
        let tip = match mix(seq, 3) % 4 {
            0 => 0,
            n => subtotal * (10 + 5 * n as i64) / 100,
        };
        let idx = (mix(seq, 4) % LOCATIONS.len() as u64) as usize;
        SampleOrder {
            tax,
            tip,
            total: subtotal + tax + tip,
            lines,
            location: LOCATIONS[idx],
            location_name: LOCATION_NAMES[idx],
            customer: (!mix(seq, 5).is_multiple_of(3)).then(|| *pick(CUSTOMERS, seq, 6)),
        }
    }
}

/// `1299` -> `"12.99"`.
fn decimal(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}{}.{:02}", c / 100, c % 100)
}

// ---------------------------------------------------------------------------
// CrumbPOS: {id, type, created_at, data: {id, type, attributes}}

fn crumbpos(event_type: &str, event_id: &str, seq: u64, o: &SampleOrder, now: &str) -> Option<Value> {
    let order_id = format!("ord_{seq:06}");
    let data = match event_type {
        "order.created" | "order.updated" => {
            let status = if event_type == "order.created" {
                "open"
            } else {
                *pick(&["in_progress", "ready", "closed"], seq, 7)
            };
            let mut attributes = json!({
                "status": status,
                "source": pick(&["pos", "online", "delivery", "pickup"], seq, 8),
                "total": o.total,
                "tax": o.tax,
                "items": o.lines.iter().enumerate().map(|(j, line)| json!({
                    "id": format!("oi_{seq:06}_{j}"),
                    "menu_item_id": line.item.id,
                    "name": line.item.name,
                    "quantity": line.quantity,
                    "price": line.item.price,
                    "modifiers": line.modifiers.iter().map(|(id, name, price)| json!({
                        "id": id, "name": name, "price": price,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "location_id": o.location,
                "created_at": now,
            });
            if o.tip > 0 {
                attributes["tip"] = json!(o.tip);
            }
            if let Some((id, name, email)) = o.customer {
                attributes["customer_id"] = json!(id);
                attributes["customer_name"] = json!(name);
                attributes["customer_email"] = json!(email);
            }
            json!({"id": order_id, "type": "order", "attributes": attributes})
        }
        "payment.completed" => {
            let card = !mix(seq, 9).is_multiple_of(5);
            let mut attributes = json!({
                "order_id": order_id,
                "amount": o.total,
                "tip": o.tip,
                "method": if card { "card" } else { "cash" },
                "status": "completed",
            });
            if card {
                attributes["card_brand"] = json!(pick(&["visa", "mastercard", "amex"], seq, 10));
                attributes["card_last_four"] = json!(format!("{:04}", mix(seq, 11) % 10_000));
            }
            json!({"id": format!("pay_{seq:06}"), "type": "payment", "attributes": attributes})
        }
        "inventory.low_stock" => {
            let item = pick(MENU, seq, 12);
            let reorder_point = 10 + (mix(seq, 13) % 4) as i64 * 5;
            let quantity = (mix(seq, 14) % reorder_point as u64) as i64;
            json!({
                "id": format!("inv_{seq:06}"),
                "type": "inventory_item",
                "attributes": {
                    "menu_item_id": item.id,
                    "name": item.name,
                    "location_id": o.location,
                    "location_name": o.location_name,
                    "quantity": quantity,
                    "reorder_point": reorder_point,
                    "unit": "each",
                },
            })
        }
        _ => return None,
    };
    Some(json!({
        "id": event_id,
        "type": event_type,
        "created_at": now,
        "data": data,
    }))
}

// ---------------------------------------------------------------------------
// Crave: {id, type, createdAt, data: {orderId, cartId, locationId, ...}}

fn crave(event_type: &str, event_id: &str, seq: u64, o: &SampleOrder, now: &str) -> Option<Value> {
    if !CRAVE_EVENTS.contains(&event_type) {
        return None;
    }
    let mut data = json!({
        "orderId": format!("ord_{seq:06}"),
        "cartId": format!("cart_{seq:06}"),
        "locationId": o.location,
        "total": decimal(o.total),
        "currency": "usd",
        "fulfillmentMethod": pick(&["delivery", "pickup"], seq, 15),
        "items": o.lines.iter().map(|line| {
            let mut item = json!({
                "name": line.item.name,
                "quantity": line.quantity,
                "total": decimal(line.total()),
            });
            if !line.modifiers.is_empty() {
                item["modifiers"] = line.modifiers.iter().map(|(id, name, price)| json!({
                    "id": id, "name": name, "price": decimal(*price),
                })).collect();
            }
            item
        }).collect::<Vec<_>>(),
    });
    if let Some((_, name, email)) = o.customer {
        data["customerName"] = json!(name);
        data["customerEmail"] = json!(email);
    }
    if event_type == "cart.abandoned" {
        // A cart that never became an order.
        data.as_object_mut()?.remove("orderId");
    }
    Some(json!({
        "id": event_id,
        "type": event_type,
        "createdAt": now,
        "data": data,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::Normalizer;
    use std::collections::BTreeSet;

    const SEQS: std::ops::Range<u64> = 0..200;

    fn body(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn an_hmac_sample_puts_id_type_and_time_where_the_source_reads_them() {
        let path = |p: &str| crate::normalize::FieldPath::parse(p).unwrap();
        let source = Normalizer::Hmac {
            id_field: path("event.id"),
            type_field: path("event.kind"),
            time_field: Some(path("meta.at")),
        };
        let mut sample = sample_event("hmac", "thing.happened", "evt_moved", 3).unwrap();
        place_fields(&mut sample, &source);
        let raw = body(&sample);
        let got = source.normalize(&raw).unwrap();
        assert_eq!(got.id, "evt_moved");
        assert_eq!(got.event_type, "thing.happened");
        assert!(got.occurred_at.is_some(), "time read from meta.at: {sample}");
        for key in ["id", "type", "created_at"] {
            assert!(sample.get(key).is_none(), "{key} moved away: {sample}");
        }
        assert!(sample["data"].is_object(), "the rest stays: {sample}");

        // The default fields keep the generic sample as it was.
        let defaults = Normalizer::Hmac {
            id_field: path("id"),
            type_field: path("type"),
            time_field: None,
        };
        let generic = sample_event("hmac", "thing.happened", "evt_same", 3).unwrap();
        let mut placed = generic.clone();
        place_fields(&mut placed, &defaults);
        assert_eq!(placed, generic);

        // Vendors' samples are already what their kinds read.
        let crumb = sample_event("crumbpos", "order.created", "evt_c", 3).unwrap();
        let mut placed = crumb.clone();
        place_fields(&mut placed, &Normalizer::CrumbPos);
        assert_eq!(placed, crumb);
    }

    #[test]
    fn unknown_kinds_and_types_are_none() {
        assert!(sample_event("square", "order.created", "e", 0).is_none());
        assert!(sample_event("crumbpos", "order.ready", "e", 0).is_none());
        assert!(sample_event("crumbpos", "cart.abandoned", "e", 0).is_none());
        assert!(sample_event("crave", "payment.completed", "e", 0).is_none());
        assert!(sample_event("crave", "", "e", 0).is_none());
        assert!(sample_event("hmac", "", "e", 0).is_none());
        assert_eq!(event_types("crave"), Some(CRAVE_EVENTS));
        assert_eq!(event_types("nope"), None);
    }

    #[test]
    fn every_crumbpos_sample_normalizes_with_its_view() {
        for &ty in CRUMBPOS_EVENTS {
            for seq in SEQS {
                let id = format!("evt_{seq}");
                let v = sample_event("crumbpos", ty, &id, seq).unwrap();
                let raw = body(&v);
                let n = Normalizer::CrumbPos.normalize(&raw).unwrap();
                assert_eq!(n.id, id);
                assert_eq!(n.event_type, ty);
                assert!(n.occurred_at.is_some());
                assert_eq!(n.payload(), v);
                let views = n.views;
                match ty {
                    "order.created" | "order.updated" => {
                        let o = views.order.expect("order view");
                        assert!(views.payment.is_none() && views.stock.is_none());
                        assert_eq!(o.id, Some(format!("ord_{seq:06}")));
                        assert!(!o.items.is_empty());
                        let items: i64 = o.items.iter().map(|i| i.total_cents.unwrap()).sum();
                        let tax = o.tax_cents.unwrap();
                        assert_eq!(o.total_cents.unwrap(), items + tax + o.tip_cents.unwrap_or(0));
                        assert!(o.location_id.is_some() && o.status.is_some());
                        if ty == "order.created" {
                            assert_eq!(o.status.as_deref(), Some("open"));
                        }
                    }
                    "payment.completed" => {
                        let p = views.payment.expect("payment view");
                        assert!(views.order.is_none() && views.stock.is_none());
                        assert_eq!(p.order_id, Some(format!("ord_{seq:06}")));
                        assert!(p.amount_cents.unwrap() > 0);
                        assert_eq!(p.status.as_deref(), Some("completed"));
                        assert_eq!(p.card_brand.is_some(), p.method.as_deref() == Some("card"));
                        // The payment is for the order of the same seq.
                        let ov = sample_event("crumbpos", "order.created", "x", seq).unwrap();
                        let raw = body(&ov);
                        let order = Normalizer::CrumbPos.normalize(&raw).unwrap();
                        assert_eq!(p.amount_cents, order.views.order.unwrap().total_cents);
                    }
                    "inventory.low_stock" => {
                        let s = views.stock.expect("stock view");
                        assert!(views.order.is_none() && views.payment.is_none());
                        assert!(s.item_id.unwrap().starts_with("mi_"));
                        assert!(s.name.is_some() && s.location_id.is_some());
                        assert!(s.quantity.unwrap() < s.reorder_point.unwrap());
                    }
                    _ => unreachable!(),
                }
            }
        }
    }

    #[test]
    fn every_crave_sample_normalizes_with_its_view() {
        for &ty in CRAVE_EVENTS {
            for seq in SEQS {
                let id = format!("evt_{seq}");
                let v = sample_event("crave", ty, &id, seq).unwrap();
                let raw = body(&v);
                let n = Normalizer::Crave.normalize(&raw).unwrap();
                assert_eq!(n.id, id);
                assert_eq!(n.event_type, ty);
                assert!(n.occurred_at.is_some());
                let o = n.views.order.expect("order view");
                assert!(n.views.payment.is_none() && n.views.stock.is_none());
                let status = ty.strip_prefix("order.").unwrap_or("abandoned");
                assert_eq!(o.status.as_deref(), Some(status));
                if ty == "cart.abandoned" {
                    assert_eq!(o.id, None);
                } else {
                    assert_eq!(o.id, Some(format!("ord_{seq:06}")));
                }
                assert_eq!(o.currency.as_deref(), Some("usd"));
                let items: i64 = o.items.iter().map(|i| i.total_cents.unwrap()).sum();
                assert!(o.total_cents.unwrap() >= items && items > 0);
                for item in &o.items {
                    let mods: i64 = item.modifiers.iter().map(|m| m.price_cents.unwrap()).sum();
                    // When the unit price was derivable it is consistent.
                    if let Some(unit) = item.unit_price_cents {
                        assert_eq!(unit * item.quantity, item.total_cents.unwrap());
                    }
                    assert!(item.total_cents.unwrap() >= mods * item.quantity);
                }
            }
        }
    }

    #[test]
    fn samples_vary_with_seq() {
        let mut channels = BTreeSet::new();
        let mut crave_channels = BTreeSet::new();
        let mut totals = BTreeSet::new();
        let (mut with_customer, mut without_customer, mut with_mods) = (0, 0, 0);
        for seq in SEQS {
            let v = sample_event("crumbpos", "order.created", "e", seq).unwrap();
            let o = Normalizer::CrumbPos.normalize(&body(&v)).unwrap().views.order.unwrap();
            channels.insert(o.channel.unwrap());
            totals.insert(o.total_cents.unwrap());
            if o.customer.is_some() {
                with_customer += 1;
            } else {
                without_customer += 1;
            }
            if o.items.iter().any(|i| !i.modifiers.is_empty()) {
                with_mods += 1;
            }
            let v = sample_event("crave", "order.created", "e", seq).unwrap();
            let o = Normalizer::Crave.normalize(&body(&v)).unwrap().views.order.unwrap();
            crave_channels.insert(o.channel.unwrap());
        }
        assert_eq!(
            channels,
            ["delivery", "online", "pickup", "pos"].map(String::from).into()
        );
        assert_eq!(crave_channels, ["delivery", "pickup"].map(String::from).into());
        assert!(totals.len() > 50, "{} distinct totals", totals.len());
        assert!(with_customer > 50 && without_customer > 20);
        assert!(with_mods > 50);
        // Deterministic per seq (apart from the clock).
        let strip = |mut v: Value| {
            v.as_object_mut().unwrap().remove("created_at");
            v["data"]["attributes"].as_object_mut().map(|a| a.remove("created_at"));
            v
        };
        assert_eq!(
            strip(sample_event("crumbpos", "order.created", "e", 7).unwrap()),
            strip(sample_event("crumbpos", "order.created", "e", 7).unwrap())
        );
    }

    #[test]
    fn hmac_samples_are_generic_events() {
        for ty in ["order.created", "ping", "invoice.paid"] {
            let v = sample_event("hmac", ty, "evt_h1", 3).unwrap();
            let raw = body(&v);
            let n = Normalizer::hmac_defaults().normalize(&raw).unwrap();
            assert_eq!(n.id, "evt_h1");
            assert_eq!(n.event_type, ty);
            assert!(n.occurred_at.is_some());
            assert!(n.views.order.is_none() && n.views.payment.is_none() && n.views.stock.is_none());
        }
    }

    #[test]
    fn samples_sign_and_verify() {
        use crate::verify::{self, Secret, Verify};
        let now = jiff::Timestamp::now().as_second();
        let v = sample_event("crumbpos", "order.created", "evt_s", 1).unwrap();
        let b = body(&v);
        let mut h = http::HeaderMap::new();
        h.insert(
            verify::CRUMB_SIGNATURE,
            verify::sign_crumbpos(b"sk", now, &b).parse().unwrap(),
        );
        let crumb = verify::CrumbPosVerifier::new(vec![Secret::new("sk".into())], verify::DEFAULT_TOLERANCE);
        let ok = crumb.verify(&h, &b, now).unwrap();
        assert!(Normalizer::CrumbPos.normalize(ok.body()).is_ok());

        let v = sample_event("crave", "order.ready", "evt_c", 2).unwrap();
        let b = body(&v);
        let mut h = http::HeaderMap::new();
        h.insert(verify::CRAVE_SIGNATURE, verify::sign_crave(b"sk", &b).parse().unwrap());
        let crave = verify::CraveVerifier::new(vec![Secret::new("sk".into())]);
        let ok = crave.verify(&h, &b, now).unwrap();
        assert!(Normalizer::Crave.normalize(ok.body()).is_ok());
    }

    #[test]
    fn created_at_is_now_in_rfc3339() {
        let before = jiff::Timestamp::now().as_second();
        let v = sample_event("crave", "order.created", "e", 0).unwrap();
        let at: jiff::Timestamp = v["createdAt"].as_str().unwrap().parse().unwrap();
        assert!(v["createdAt"].as_str().unwrap().ends_with('Z'));
        assert!((at.as_second() - before).abs() <= 2);
    }

    #[test]
    fn decimal_formats_cents() {
        assert_eq!(decimal(2798), "27.98");
        assert_eq!(decimal(5), "0.05");
        assert_eq!(decimal(100), "1.00");
        assert_eq!(decimal(-350), "-3.50");
    }
}
