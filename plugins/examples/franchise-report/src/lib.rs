//! Franchise reporting: every order event becomes one report, POSTed as JSON
//! to the franchisor's reporting API over `wasi:http`.
//!
//! The host lets a plugin reach only the hosts its sink grants, so the config
//! names the endpoint and `allow_http` grants its `host:port`:
//!
//! ```toml
//! [sinks.franchise]
//! type = "wasm"
//! plugin = "franchise_report"
//! allow_http = ["reports.franchisor.example:443"]
//!
//! [sinks.franchise.config]
//! endpoint = "https://reports.franchisor.example/v1/sales"
//! franchise_id = "FR-0042"
//! api_key = "${FRANCHISE_API_KEY}"    # optional: sent as a bearer token
//! ```
//!
//! What the answer means, as for expeditor's own `http` sink: 2xx delivered;
//! 408, 429 and 5xx, or no answer at all (also a request the host denied),
//! retried (with `Retry-After` when given); any other status dead-lettered.

use std::cell::RefCell;
use std::io::Read as _;

use serde_json::{Value, json};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

wit_bindgen::generate!({
    path: "../../wit",
    world: "sink",
});

use expeditor::sink::host::log;
use expeditor::sink::types::{Level, RetryHint};

struct Settings {
    https: bool,
    /// `host[:port]`.
    authority: String,
    path: String,
    franchise_id: String,
    api_key: Option<String>,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    fn init(config: String) -> Result<(), String> {
        let config: Value = serde_json::from_str(&config).map_err(|e| format!("config is not JSON: {e}"))?;
        let endpoint = config["endpoint"]
            .as_str()
            .ok_or("`endpoint` is required: the reporting API's URL, e.g. \"https://reports.example/v1/sales\"")?;
        let (https, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = endpoint.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("endpoint {endpoint:?} must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("endpoint {endpoint:?} has no host"));
        }
        let franchise_id = config["franchise_id"]
            .as_str()
            .ok_or("`franchise_id` is required (a string)")?;
        let api_key = config["api_key"].as_str().map(str::to_owned);
        log(
            Level::Info,
            &format!("reporting to {authority}{path} as {franchise_id}"),
        );
        SETTINGS.with(|s| {
            *s.borrow_mut() = Some(Settings {
                https,
                authority: authority.to_owned(),
                path: path.to_owned(),
                franchise_id: franchise_id.to_owned(),
                api_key,
            })
        });
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
            events.iter().map(|e| report(settings, e)).collect()
        })
    }

    fn shutdown() {}
}

/// The report the franchisor's API takes: one per order event.
fn transform(settings: &Settings, event: &Event, order: &Value) -> Value {
    let items = order["items"].as_array().map_or(0, |items| {
        items.iter().map(|i| i["quantity"].as_i64().unwrap_or(0)).sum::<i64>()
    });
    json!({
        "franchise_id": settings.franchise_id,
        "report_id": event.delivery_key,
        "store": order["location_id"],
        "order_id": order["id"],
        "event": event.event_type,
        "status": order["status"],
        "channel": order["channel"],
        "sales_cents": order["total_cents"],
        "tax_cents": order["tax_cents"],
        "tip_cents": order["tip_cents"],
        "currency": order["currency"],
        "item_count": items,
        "occurred_at": event.occurred_at.as_deref().unwrap_or(&event.received_at),
        "source": event.source,
    })
}

fn report(settings: &Settings, event: &Event) -> Result<(), DeliveryError> {
    let Some(order) = event.order.as_deref() else {
        log(
            Level::Debug,
            &format!("event {} is not about an order; nothing to report", event.id),
        );
        return Ok(());
    };
    let order: Value =
        serde_json::from_str(order).map_err(|e| DeliveryError::Permanent(format!("order view is not JSON: {e}")))?;
    let body = serde_json::to_vec(&transform(settings, event, &order)).expect("JSON values serialize");
    let status = post(settings, &event.delivery_key, &body).map_err(|e| {
        let message = match e {
            ErrorCode::HttpRequestDenied => format!(
                "request to {} denied by the host: grant it in the sink's allow_http",
                settings.authority
            ),
            other => format!("reporting API unreachable: {other:?}"),
        };
        log(Level::Warn, &message);
        retry(message, None)
    })?;
    match status.code {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(retry(
            format!("reporting API answered {}", status.code),
            status.retry_after_ms,
        )),
        code => Err(DeliveryError::Permanent(format!(
            "reporting API refused the report with {code}: {}",
            status.body.chars().take(200).collect::<String>()
        ))),
    }
}

fn retry(message: String, retry_after_ms: Option<u64>) -> DeliveryError {
    DeliveryError::Retryable(RetryHint {
        message,
        retry_after_ms,
    })
}

struct Status {
    code: u16,
    retry_after_ms: Option<u64>,
    body: String,
}

/// One POST through the host's `wasi:http/outgoing-handler`.
fn post(settings: &Settings, key: &str, body: &[u8]) -> Result<Status, ErrorCode> {
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        ("content-type".into(), b"application/json".to_vec()),
        ("content-length".into(), body.len().to_string().into_bytes()),
        // The franchisor drops a repeated report by this key.
        ("idempotency-key".into(), key.as_bytes().to_vec()),
    ];
    if let Some(api_key) = &settings.api_key {
        headers.push(("authorization".into(), format!("Bearer {api_key}").into_bytes()));
    }
    let fields = Fields::from_list(&headers).map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
    let request = OutgoingRequest::new(fields);
    let bad = |what: &str| ErrorCode::InternalError(Some(format!("invalid {what}")));
    request.set_method(&Method::Post).map_err(|()| bad("method"))?;
    let scheme = if settings.https { Scheme::Https } else { Scheme::Http };
    request.set_scheme(Some(&scheme)).map_err(|()| bad("scheme"))?;
    request
        .set_authority(Some(&settings.authority))
        .map_err(|()| bad("authority"))?;
    request
        .set_path_with_query(Some(&settings.path))
        .map_err(|()| bad("path"))?;
    let outgoing = request.body().map_err(|()| bad("body"))?;

    // Send first, then stream the body: the host buffers only a little of it.
    let pending = outgoing_handler::handle(request, None)?;
    let written = {
        let stream = outgoing.write().map_err(|()| bad("body stream"))?;
        // `blocking_write_and_flush` waits until the host can take the bytes
        // (at most 4096 per call, by the wasi:io contract); a plain `write`
        // may take none while the connection is still being set up.
        body.chunks(4096)
            .try_for_each(|chunk| stream.blocking_write_and_flush(chunk))
    };
    if written.is_ok() {
        OutgoingBody::finish(outgoing, None)?;
    } else {
        // Unfinished: dropping it tells the host the request is abandoned.
        drop(outgoing);
    }

    // The response carries the real reason when sending failed (a denied
    // host, a refused connection): prefer it over "the body stream closed".
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(result)) => result?,
        _ => return Err(ErrorCode::InternalError(Some("no response".into()))),
    };
    if let Err(e) = written {
        return Err(ErrorCode::InternalError(Some(format!("writing the body: {e:?}"))));
    }
    let code = response.status();
    let retry_after_ms = response
        .headers()
        .get("retry-after")
        .first()
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
        .map(|secs| secs.saturating_mul(1000));
    // Read a little of the body, for the error message of a refusal.
    let mut text = String::new();
    if !(200..300).contains(&code)
        && let Ok(incoming) = response.consume()
        && let Ok(mut stream) = incoming.stream()
    {
        let mut buf = Vec::new();
        let _ = (&mut stream).take(4096).read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    Ok(Status {
        code,
        retry_after_ms,
        body: text,
    })
}

export!(Plugin);
