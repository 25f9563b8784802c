//! Renders deliveries into insertAll rows and packs them into requests.

use expeditor_api::{Delivery, DeliveryError};
use gcloud_bigquery::http::tabledata::insert_all::Row;
use serde_json::{Map, Value};

use crate::BigQuerySinkConfig;

/// The request body around the rows: `{"skipInvalidRows":true,
/// "ignoreUnknownValues":null,"templateSuffix":null,"rows":[...],
/// "traceId":null}` is under 100 bytes.
pub(crate) const ENVELOPE_BYTES: usize = 128;

/// One rendered row, with the index of its delivery in the batch.
#[derive(Debug)]
pub(crate) struct Rendered {
    pub index: usize,
    pub row: Row<Map<String, Value>>,
    /// Its size in the request body, the separating comma included.
    pub bytes: usize,
}

/// The row of one delivery; every failure is in the config or the event, so
/// permanent.
pub(crate) fn render(cfg: &BigQuerySinkConfig, index: usize, delivery: &Delivery) -> Result<Rendered, DeliveryError> {
    let ctx = cfg.templates.context_for(&delivery.event);
    // The message starts with the leaf's key path (`sinks.NAME.row.total`).
    let json = cfg
        .templates
        .render_json(&cfg.row, &ctx)
        .map_err(|e| DeliveryError::permanent(e.message))?;
    let Value::Object(json) = json else {
        return Err(DeliveryError::permanent(format!(
            "sinks.{}.row: rendered to {}, not a JSON object",
            cfg.name,
            kind(&json)
        )));
    };
    let row = Row {
        insert_id: Some(delivery.key.clone()),
        json,
    };
    let bytes = serde_json::to_vec(&row)
        .map_err(|e| DeliveryError::permanent(format!("row cannot be written as JSON: {e}")))?
        .len()
        + 1;
    if bytes + ENVELOPE_BYTES > cfg.max_bytes {
        return Err(DeliveryError::permanent(format!(
            "the row is {bytes} bytes, over sinks.{}.batch.max_bytes ({} bytes with the request around it)",
            cfg.name, cfg.max_bytes
        )));
    }
    Ok(Rendered { index, row, bytes })
}

/// Packs rows, in order, into requests of at most `max_rows` rows and
/// `max_bytes` bytes. Each row fits on its own ([`render`] checked).
pub(crate) fn pack(rows: Vec<Rendered>, max_rows: usize, max_bytes: usize) -> Vec<Vec<Rendered>> {
    let mut requests: Vec<Vec<Rendered>> = Vec::new();
    let mut size = ENVELOPE_BYTES;
    for row in rows {
        let fits = requests
            .last()
            .is_some_and(|last| last.len() < max_rows && size + row.bytes <= max_bytes);
        if !fits {
            requests.push(Vec::new());
            size = ENVELOPE_BYTES;
        }
        size += row.bytes;
        requests.last_mut().expect("just pushed").push(row);
    }
    requests
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
