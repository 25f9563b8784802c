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

/// How much of an error response body goes into the message.
const SNIPPET_BYTES: usize = 200;
/// How much of any response body is read, so the connection can go back to the
/// pool; a longer body costs a new connection rather than memory.
const DRAIN_BYTES: usize = 64 * 1024;

/// A response body as it is read: at most [`DRAIN_BYTES`] of it, so the
/// connection can go back to the pool, and the first [`SNIPPET_BYTES`] of an
/// error's kept for its message. Read errors just end it: the status
/// already decided.
pub(crate) struct Drain {
    keep: usize,
    read: usize,
    pub(crate) head: Vec<u8>,
}

impl Drain {
    pub(crate) fn new(status: StatusCode) -> Self {
        let keep = if status.is_success() { 0 } else { SNIPPET_BYTES };
        Self {
            keep,
            read: 0,
            head: Vec::new(),
        }
    }

    pub(crate) fn wants_more(&self) -> bool {
        self.read < DRAIN_BYTES
    }

    pub(crate) fn take(&mut self, chunk: &[u8]) {
        self.read += chunk.len();
        let room = self.keep.saturating_sub(self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..room]);
    }
}

/// What an answer means, from its status, headers and the head of its body
/// ([`Drain`]).
pub(crate) fn judge(status: StatusCode, headers: &HeaderMap, head: &[u8]) -> Outcome {
    if status.is_success() {
        return Ok(());
    }
    let retryable =
        matches!(status, StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS) || status.is_server_error();
    let retry_after = match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => retry_after(headers, SystemTime::now()),
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
    let snippet = one_line(head);
    if !snippet.is_empty() {
        message = format!("{message}: {snippet}");
    }
    let err = if retryable {
        DeliveryError::retryable(message)
    } else {
        DeliveryError::permanent(message)
    };
    // Only 429 and 503 read it: the service's own load, so the whole sink waits.
    Err(err.holding_sink(retry_after))
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

/// Bytes as one line of text: control characters and runs of whitespace
/// become one space, so a stored message never spans lines.
pub(crate) fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
