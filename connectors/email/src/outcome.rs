//! What an SMTP failure means for the engine.
//!
//! RFC 5321 says it: a 4xx reply is transient ("try again later": greylisting,
//! a full queue, a rate limit, a temporary auth failure), a 5xx reply is
//! permanent (unknown mailbox, relaying denied, authentication failed). No
//! reply at all (connection refused, reset, TLS handshake, timeout) is
//! retried; a message lettre refuses to send is not. Messages are stored and
//! shown by the CLI: one line, never a password.

use expeditor_api::DeliveryError;
use lettre::transport::smtp::Error;

pub(crate) fn classify(err: &Error) -> DeliveryError {
    let message = one_line(&err.to_string());
    if err.is_permanent() {
        DeliveryError::permanent(format!("SMTP {message}"))
    } else if err.is_transient() {
        DeliveryError::retryable(format!("SMTP {message}"))
    } else if err.is_timeout() {
        DeliveryError::retryable(format!("SMTP timed out: {message}"))
    } else if err.is_client() {
        // Our side refused: e.g. STARTTLS required but not offered by the server.
        DeliveryError::permanent(format!("SMTP {message}"))
    } else {
        DeliveryError::retryable(format!("SMTP {message}"))
    }
}

/// Text as one line of at most 300 characters.
fn one_line(text: &str) -> String {
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
