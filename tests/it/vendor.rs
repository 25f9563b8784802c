//! Vendor payloads and signatures, written from the vendor docs alone.
//!
//! The tests sign with their own HMAC code rather than the daemon's
//! `verify` module, so a bug in our signer cannot hide a bug in our verifier.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

pub const CRUMB_SECRET: &str = "whsec_crumb_it_3f9a";
pub const CRAVE_SECRET: &str = "crave_it_secret_77c1";

/// `[sources.crumb]` and `[sources.crave]` as most tests configure them.
pub const SOURCES: &str = r#"
[sources.crumb]
kind = "crumbpos"
secrets = ["whsec_crumb_it_3f9a"]
tolerance = "5m"

[sources.crave]
kind = "crave"
secrets = ["crave_it_secret_77c1"]
"#;

pub fn hmac_sha256(secret: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// `Crumb-Signature: t=<unix>,v1=<hex of HMAC(secret, "<t>.<body>")>`.
pub fn crumb_signature(secret: &str, t: i64, body: &[u8]) -> String {
    let t_str = t.to_string();
    let mac = hmac_sha256(secret, &[t_str.as_bytes(), b".", body]);
    format!("t={t},v1={}", hex::encode(mac))
}

/// `X-Crave-Signature: <hex of HMAC(secret, body)>`.
pub fn crave_signature(secret: &str, body: &[u8]) -> String {
    hex::encode(hmac_sha256(secret, &[body]))
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// CrumbPOS `order.created` as in the vendor guide, with our id and total.
pub fn crumb_order(event_id: &str, total_cents: i64) -> Value {
    crumb_order_typed(event_id, "order.created", total_cents)
}

pub fn crumb_order_typed(event_id: &str, event_type: &str, total_cents: i64) -> Value {
    json!({
        "id": event_id,
        "type": event_type,
        "created_at": "2024-10-05T14:30:00Z",
        "data": {
            "id": "ord_xyz789",
            "type": "order",
            "attributes": {
                "status": "open",
                "source": "pos",
                "total": total_cents,
                "tax": 340,
                "items": [{
                    "id": "oi_111",
                    "menu_item_id": "mi_burger",
                    "name": "Burger Deluxe",
                    "quantity": 2,
                    "price": 1500,
                    "modifiers": [{ "id": "mod_no_onions", "name": "No Onions", "price": 0 }]
                }],
                "location_id": "loc_main",
                "created_at": "2024-10-05T14:30:00Z"
            }
        }
    })
}

/// CrumbPOS `payment.completed` as in the vendor guide.
pub fn crumb_payment(event_id: &str) -> Value {
    json!({
        "id": event_id,
        "type": "payment.completed",
        "created_at": "2024-10-05T14:32:00Z",
        "data": {
            "id": "pay_ghi789",
            "type": "payment",
            "attributes": {
                "order_id": "ord_xyz789",
                "amount": 4250,
                "tip": 850,
                "method": "card",
                "card_brand": "visa",
                "card_last_four": "4242",
                "status": "completed"
            }
        }
    })
}

/// Crave `order.created` as in the vendor docs, with our id and total.
pub fn crave_order(event_id: &str, total: &str) -> Value {
    json!({
        "id": event_id,
        "type": "order.created",
        "createdAt": "2025-03-15T18:30:00Z",
        "data": {
            "orderId": "ord_456",
            "cartId": "cart_789",
            "locationId": "loc_123",
            "customerName": "Alex Johnson",
            "customerEmail": "alex@example.com",
            "total": total,
            "currency": "usd",
            "fulfillmentMethod": "delivery",
            "items": [{ "name": "Margherita Pizza", "quantity": 2, "total": "25.98" }]
        }
    })
}
