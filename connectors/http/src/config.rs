//! What an `http` sink is built from.

use std::sync::Arc;
use std::time::Duration;

use expeditor_api::{Structured, TemplateId, Templates};
use http::{HeaderName, Method};

/// One `[sinks.NAME]` with `type = "http"`, validated and compiled by the
/// daemon's config module; building the sink trusts it.
#[derive(Debug, Clone)]
pub struct HttpSinkConfig {
    /// The sink name, for logs and error messages (`sinks.NAME.url`).
    pub name: String,
    pub method: Method,
    /// A text template.
    pub url: TemplateId,
    /// Names from [`header_name`]; values are text templates that may carry
    /// secrets, so they are sent as sensitive and never logged.
    pub headers: Vec<(HeaderName, TemplateId)>,
    /// A structured template; `None` sends the whole event JSON.
    pub body: Option<Structured>,
    /// For the whole exchange: connecting, sending and reading the response.
    pub timeout: Duration,
    /// Where `url`, `headers` and `body` were compiled.
    pub templates: Arc<Templates>,
}

/// Headers a config may not set: expeditor sets the first two on every
/// request (they are the receiver's dedupe handle), the HTTP client the rest.
pub const RESERVED_HEADERS: [&str; 5] = [
    "idempotency-key",
    "x-expeditor-attempt",
    "content-length",
    "host",
    "transfer-encoding",
];

/// Parses a configured header name, for the config module's validation, so a
/// bad one is a `check` error rather than a failed delivery.
pub fn header_name(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::try_from(name)
        .map_err(|_| format!("`{name}` is not a valid header name (example: `X-Api-Key`)"))?;
    if RESERVED_HEADERS.contains(&parsed.as_str()) {
        return Err(format!(
            "`{name}` is set by expeditor on every request and cannot be configured"
        ));
    }
    Ok(parsed)
}
