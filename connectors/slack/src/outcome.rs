//! What Slack's answer means for the engine.
//!
//! The Web API answers HTTP 200 with `{"ok": false, "error": "<code>"}` for
//! almost every failure; a few codes say "later" (`ratelimited`,
//! `internal_error`, `service_unavailable`, ...) and are retried, every other
//! one (`channel_not_found`, `invalid_auth`, `not_in_channel`, `is_archived`,
//! `invalid_blocks`, ...) will not get better by itself and goes to the dead
//! letters. Rate limits come as HTTP 429 with `Retry-After`, which the engine
//! honours. Incoming webhooks answer errors as an HTTP status with a plain
//! text code (`404 no_service`, `410 channel_is_archived`): 5xx retries,
//! other 4xx are permanent. No answer at all (connection refused, reset,
//! timeout) is retried.
//!
//! Messages are stored and shown by the CLI: short, one line, never the
//! token or the webhook URL.

use expeditor_api::{DeliveryError, Outcome};
use slack_morphism::errors::SlackClientError;

/// Error codes of `chat.postMessage` (and the Web API in general) that say
/// "try again later". Everything else Slack names is a permanent error.
const RETRYABLE_CODES: [&str; 8] = [
    "ratelimited",
    "rate_limited",
    // "Members on this team are sending too many messages."
    "message_limit_exceeded",
    "internal_error",
    "fatal_error",
    "request_timeout",
    "service_unavailable",
    // The workspace is migrating to an Enterprise org: "intermittently unavailable".
    "team_added_to_org",
];

/// How much of an unexpected answer goes into the message.
const SNIPPET_CHARS: usize = 200;

pub(crate) fn classify(err: SlackClientError) -> Outcome {
    Err(match err {
        SlackClientError::ApiError(e) => {
            let mut message = format!("Slack error {}", e.code);
            // `invalid_blocks` and friends say what is wrong in `errors`.
            if let Some(detail) = e.errors.as_ref().and_then(|v| v.first()) {
                message = format!("{message}: {}", one_line(detail));
            }
            if RETRYABLE_CODES.contains(&e.code.as_str()) {
                DeliveryError::retryable(message)
            } else {
                DeliveryError::permanent(message)
            }
        }
        SlackClientError::RateLimitError(e) => {
            let code = e.code.as_deref().unwrap_or("ratelimited");
            DeliveryError::retryable(format!("Slack rate limit (HTTP 429 {code})")).holding_sink(e.retry_after)
        }
        SlackClientError::HttpError(e) => {
            let status = e.status_code;
            let mut message = match status.canonical_reason() {
                Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
                None => format!("HTTP {}", status.as_u16()),
            };
            let body = e.http_response_body.as_deref().map(one_line).unwrap_or_default();
            if !body.is_empty() {
                message = format!("{message}: {body}");
            }
            if status.is_server_error() || status.as_u16() == 408 {
                DeliveryError::retryable(message)
            } else {
                DeliveryError::permanent(message)
            }
        }
        SlackClientError::ProtocolError(e) => {
            // A 2xx whose body slack-morphism's models could not read. If
            // Slack said `"ok": true` the message is posted: retrying would
            // post it twice.
            let body = e.json_body.as_deref().unwrap_or_default();
            let ok = serde_json::from_str::<serde_json::Value>(body)
                .is_ok_and(|v| v.get("ok") == Some(&serde_json::Value::Bool(true)));
            if ok {
                tracing::warn!(error = %e.json_error, "Slack accepted the message; its answer did not match the client's model");
                return Ok(());
            }
            DeliveryError::retryable(format!("unreadable answer from Slack: {}", one_line(body)))
        }
        // Nothing usable was answered: connection refused or reset, TLS, DNS.
        SlackClientError::HttpProtocolError(e) => DeliveryError::retryable(match &e.cause {
            Some(cause) => root_cause(cause.as_ref()),
            None => "connection failed".to_owned(),
        }),
        SlackClientError::EndOfStream(_) => DeliveryError::retryable("connection closed before an answer"),
        SlackClientError::SystemError(e) => {
            DeliveryError::retryable(one_line(e.message.as_deref().unwrap_or("Slack client error")))
        }
        SlackClientError::SocketModeProtocolError(e) => DeliveryError::retryable(one_line(&e.message)),
    })
}

/// The innermost cause, not the client's message (which quotes the URL).
pub(crate) use expeditor_api::message::root_cause;

/// Text as one short line: control characters and runs of whitespace become
/// one space, and it is cut at [`SNIPPET_CHARS`].
pub(crate) fn one_line(text: &str) -> String {
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(SNIPPET_CHARS)
        .collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
