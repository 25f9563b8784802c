//! What a response or a transport failure means for the engine.
//!
//! 2xx is success; 408, 429, 5xx, timeouts and connection failures are worth
//! another attempt; anything else (other 4xx, 3xx) will not get better by
//! itself and goes to the dead letters. Messages are stored and shown by the
//! CLI: short, one line, never the URL or a request header.

use std::time::{Duration, SystemTime};

use expeditor_api::{DeliveryError, Outcome};
use http::StatusCode;
use http::header::{HeaderMap, RETRY_AFTER};
use reqwest::Response;

/// How much of an error response body goes into the message.
const SNIPPET_BYTES: usize = 200;
/// How much of any response body is read, so the connection can go back to the
/// pool; a longer body costs a new connection rather than memory.
const DRAIN_BYTES: usize = 64 * 1024;

pub(crate) async fn from_response(response: Response) -> Outcome {
    let status = response.status();
    if status.is_success() {
        drain(response, 0).await;
        return Ok(());
    }
    let retryable =
        matches!(status, StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS) || status.is_server_error();
    let retry_after = match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            retry_after(response.headers(), SystemTime::now())
        }
        _ => None,
    };
    // Not `{status}`: that spells an unknown code as "599 <unknown status code>".
    let mut message = match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    };
    if status.is_redirection() {
        message.push_str(" (redirects are not followed)");
    }
    let snippet = one_line(&drain(response, SNIPPET_BYTES).await);
    if !snippet.is_empty() {
        message = format!("{message}: {snippet}");
    }
    let err = if retryable {
        DeliveryError::retryable(message)
    } else {
        DeliveryError::permanent(message)
    };
    Err(err.with_retry_after(retry_after))
}

/// Nothing was answered: a timeout or a network failure is worth retrying; a
/// request reqwest refused to build is not.
pub(crate) fn transport_error(err: &reqwest::Error, timeout: Duration) -> DeliveryError {
    if err.is_timeout() {
        return DeliveryError::timed_out(timeout);
    }
    let cause = root_cause(err);
    if err.is_builder() {
        DeliveryError::permanent(format!("invalid request: {cause}"))
    } else {
        DeliveryError::retryable(cause)
    }
}

/// The innermost cause, not the client's message (which quotes the URL).
pub(crate) use expeditor_api::message::root_cause;

/// `Retry-After` as delta-seconds or an HTTP-date; a date in the past means now.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Reads at most [`DRAIN_BYTES`] of the body and returns its first `keep`
/// bytes. A read error changes nothing: the status already decided.
async fn drain(mut response: Response, keep: usize) -> Vec<u8> {
    let mut head = Vec::new();
    let mut read = 0;
    while read < DRAIN_BYTES {
        let Ok(Some(chunk)) = response.chunk().await else {
            break;
        };
        read += chunk.len();
        let room = keep.saturating_sub(head.len()).min(chunk.len());
        head.extend_from_slice(&chunk[..room]);
    }
    head
}

/// Bytes as one line of text: control characters and runs of whitespace
/// become one space, so a stored message never spans lines.
pub(crate) fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
