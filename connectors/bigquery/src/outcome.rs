//! What BigQuery's answer means for each row.
//!
//! - HTTP 200 without `insertErrors`: every row is in.
//! - HTTP 200 with `insertErrors`: each listed row failed, the others are in.
//!   Reason `invalid` (the row breaks the schema) is permanent: the row goes
//!   to the dead letters with BigQuery's message. Reason `stopped` (the row
//!   was fine but not inserted because another row of the request was
//!   invalid, with `skipInvalidRows: false`) is retried at once. Anything
//!   else (`timeout`, `backendError`, ...) is retried with the usual backoff.
//! - An error status is the same for every row of the request: 5xx, 408,
//!   429, 403 `quotaExceeded`/`rateLimitExceeded` and 401 are retried; other
//!   4xx (400 `invalid`, 403 `accessDenied`, 404 `notFound`) are permanent.
//!   A 401 says the token was refused: one that expired on the way is
//!   replaced by the next attempt's, and credentials that are wrong get the
//!   retry window to be fixed in before the rows become dead letters.
//! - No answer (timeout, connection refused, an unreadable body) and a failed
//!   token fetch are retried.
//!
//! A retried row carries the same `insertId`, so a row BigQuery already took
//! is dropped by its dedupe (best-effort, about a minute).

use std::time::Duration;

use expeditor_api::{DeliveryError, Outcome};
use gcloud_bigquery::http::error::Error as BqError;
use gcloud_bigquery::http::tabledata::insert_all::{Error as RowError, InsertAllResponse};

/// How much of one of BigQuery's messages is kept.
const MESSAGE_CHARS: usize = 300;

/// Reasons of a 403 that mean "slow down", not "forbidden".
const QUOTA_REASONS: [&str; 2] = ["quotaExceeded", "rateLimitExceeded"];

/// One outcome per row of a request that got HTTP 200.
pub(crate) fn rows(n: usize, response: InsertAllResponse) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> = vec![Ok(()); n];
    for error in response.insert_errors.unwrap_or_default() {
        match usize::try_from(error.index).ok().filter(|&i| i < n) {
            Some(i) => outcomes[i] = Err(row_error(&error)),
            None => tracing::warn!(
                index = error.index,
                rows = n,
                "BigQuery reported an error for a row index not in the request"
            ),
        }
    }
    outcomes
}

fn row_error(error: &RowError) -> DeliveryError {
    let describe = |e: &gcloud_bigquery::http::tabledata::insert_all::ErrorMessage| {
        let text = if e.message.is_empty() {
            e.reason.as_str()
        } else {
            e.message.as_str()
        };
        if e.location.is_empty() || text.contains(&e.location) {
            text.to_owned()
        } else {
            format!("{}: {text}", e.location)
        }
    };
    let invalid: Vec<String> = error
        .errors
        .iter()
        .filter(|e| e.reason == "invalid")
        .map(describe)
        .collect();
    if !invalid.is_empty() {
        return DeliveryError::permanent(one_line(&format!("BigQuery rejected the row: {}", invalid.join("; "))));
    }
    if !error.errors.is_empty() && error.errors.iter().all(|e| e.reason == "stopped") {
        return DeliveryError::retryable(
            "not inserted because another row of the same request was invalid (stopped); retrying at once",
        )
        .with_retry_after(Some(Duration::ZERO));
    }
    let reasons: Vec<String> = error
        .errors
        .iter()
        .map(|e| {
            if e.message.is_empty() {
                e.reason.clone()
            } else {
                format!("{}: {}", e.reason, e.message)
            }
        })
        .collect();
    let reasons = if reasons.is_empty() {
        "no reason given".to_owned()
    } else {
        reasons.join("; ")
    };
    DeliveryError::retryable(one_line(&format!("BigQuery did not insert the row ({reasons})")))
}

/// The one outcome of every row of a request that failed as a whole.
pub(crate) fn request_error(err: &BqError, timeout: Duration) -> DeliveryError {
    match err {
        BqError::Response(r) => {
            let reasons: Vec<&str> = r.errors.iter().flatten().map(|e| e.reason.as_str()).collect();
            let retryable = retryable_status(r.code) || reasons.iter().any(|r| QUOTA_REASONS.contains(r));
            let reason = reasons.first().map(|r| format!(" {r}")).unwrap_or_default();
            let message = one_line(&format!("BigQuery answered HTTP {}{reason}: {}", r.code, r.message));
            classify(retryable, message)
        }
        BqError::HttpClient(e) => {
            if let Some(status) = e.status() {
                let message = match status.canonical_reason() {
                    Some(text) => format!("BigQuery answered HTTP {} {text}", status.as_u16()),
                    None => format!("BigQuery answered HTTP {}", status.as_u16()),
                };
                classify(retryable_status(status.as_u16()), message)
            } else if e.is_timeout() {
                DeliveryError::timed_out(timeout)
            } else if e.is_decode() {
                // Rows may or may not be in; retrying is safe (insertId).
                DeliveryError::retryable(one_line(&format!("cannot read BigQuery's answer: {}", root_cause(e))))
            } else if e.is_builder() {
                DeliveryError::permanent(one_line(&format!("invalid request: {}", root_cause(e))))
            } else {
                DeliveryError::retryable(one_line(&root_cause(e)))
            }
        }
        BqError::HttpMiddleware(e) => DeliveryError::retryable(one_line(&e.to_string())),
        BqError::TokenSource(e) => {
            DeliveryError::retryable(one_line(&format!("cannot get a Google access token: {e}")))
        }
    }
}

fn retryable_status(code: u16) -> bool {
    code >= 500 || code == 401 || code == 408 || code == 429
}

fn classify(retryable: bool, message: String) -> DeliveryError {
    if retryable {
        DeliveryError::retryable(message)
    } else {
        DeliveryError::permanent(message)
    }
}

/// The innermost cause, not the client's message (which quotes the URL).
pub(crate) use expeditor_api::message::root_cause;

/// One line, at most [`MESSAGE_CHARS`] characters: stored and shown by the CLI.
pub(crate) fn one_line(text: &str) -> String {
    let text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() <= MESSAGE_CHARS {
        text
    } else {
        let cut: String = text.chars().take(MESSAGE_CHARS).collect();
        format!("{cut}…")
    }
}
