//! The event as sinks and templates see it.
//!
//! Field names are the user-facing contract (`../shared/PRODUCT.md`, "What
//! rules and templates see"): templates say `order.total_cents`, so renaming a
//! field here breaks configs. Money is always integer minor units.

use serde::{Deserialize, Serialize};

/// Identity and timing of one received event (`event` in templates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMeta {
    /// The vendor's event id, the dedupe key within a source.
    pub id: String,
    /// The configured source name (`[sources.NAME]`).
    pub source: String,
    /// The source kind: `crumbpos`, `crave` or `hmac`.
    pub kind: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the vendor says it happened (RFC 3339), when it says so.
    pub occurred_at: Option<String>,
    /// When expeditor acknowledged it (RFC 3339, UTC).
    pub received_at: String,
}

/// One event with its payload and normalized views.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: EventMeta,
    /// The vendor's JSON exactly as sent.
    pub payload: serde_json::Value,
    #[serde(flatten)]
    pub views: Views,
}

/// The vendor-independent views; each is present when the event is about it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Views {
    pub order: Option<Order>,
    pub payment: Option<Payment>,
    pub stock: Option<Stock>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: Option<String>,
    pub location_id: Option<String>,
    pub status: Option<String>,
    /// How the order came in or leaves: `pos`, `online`, `delivery`, `pickup`, ...
    pub channel: Option<String>,
    pub total_cents: Option<i64>,
    pub tax_cents: Option<i64>,
    pub tip_cents: Option<i64>,
    /// ISO 4217 code, lower case, as the vendor sends it.
    pub currency: Option<String>,
    pub customer: Option<Customer>,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: Option<String>,
    pub name: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub name: Option<String>,
    pub quantity: i64,
    pub unit_price_cents: Option<i64>,
    pub total_cents: Option<i64>,
    pub modifiers: Vec<Modifier>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Modifier {
    pub id: Option<String>,
    pub name: Option<String>,
    pub price_cents: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub id: Option<String>,
    pub order_id: Option<String>,
    pub amount_cents: Option<i64>,
    pub tip_cents: Option<i64>,
    pub method: Option<String>,
    pub card_brand: Option<String>,
    pub card_last_four: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub item_id: Option<String>,
    pub name: Option<String>,
    pub location_id: Option<String>,
    pub quantity: Option<i64>,
    pub reorder_point: Option<i64>,
}

/// Decimal places of the minor unit of `currency` (ISO 4217, any case): 0
/// for BIF, CLP, DJF, GNF, ISK, JPY, KMF, KRW, PYG, RWF, UGX, UYI, VND, VUV,
/// XAF, XOF and XPF; 3 for BHD, IQD, JOD, KWD, LYD, OMR and TND; 4 for CLF
/// and UYW; 2 otherwise, and when unknown or absent. Shared by the parse of
/// a vendor's amount and the `money` filter that prints it back.
pub fn currency_exponent(currency: Option<&str>) -> u32 {
    const ZERO: &[&str] = &[
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF",
        "XPF",
    ];
    const THREE: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
    const FOUR: &[&str] = &["CLF", "UYW"];
    let Some(code) = currency.map(str::trim) else {
        return 2;
    };
    let is = |list: &[&str]| list.iter().any(|c| c.eq_ignore_ascii_case(code));
    if is(ZERO) {
        0
    } else if is(THREE) {
        3
    } else if is(FOUR) {
        4
    } else {
        2
    }
}
