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
    let message = without_addresses(&one_line(&err.to_string()));
    if err.is_permanent() {
        DeliveryError::permanent(format!("SMTP {message}"))
    } else if err.is_transient() {
        DeliveryError::retryable(format!("SMTP {message}"))
    } else if err.is_timeout() {
        DeliveryError::retryable(format!("SMTP timed out: {message}"))
    } else if err.is_client() {
        // Our side refused: STARTTLS required but not offered, no AUTH
        // mechanism in common. Retried, as a failed TLS handshake is: a
        // relay restarting without its certificate, or a middlebox
        // stripping STARTTLS, gets better by itself; a misconfigured one
        // runs out of attempts.
        DeliveryError::retryable(format!("SMTP {message}"))
    } else {
        DeliveryError::retryable(format!("SMTP {message}"))
    }
}

/// The server's reply often quotes the recipient (`550 5.1.1
/// <jane@example.com>: Recipient address rejected`): a customer's address,
/// which the stored error (listed by the CLI, logged with a dead letter)
/// must not carry. Each word with an `@` becomes `<address>`, keeping the
/// punctuation after it.
pub(crate) fn without_addresses(text: &str) -> String {
    text.split(' ')
        .map(|word| {
            if !word.contains('@') {
                return word.to_owned();
            }
            let tail = word.trim_end_matches([':', ',', ';', '.', ')']);
            format!("<address>{}", &word[tail.len()..])
        })
        .collect::<Vec<_>>()
        .join(" ")
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
