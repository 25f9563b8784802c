//! The `email` sink: one message per delivery over SMTP, through `lettre`.
//!
//! `from` is fixed by the config; `to`, `subject`, `text` and the optional
//! `html` are templates, so the customer of an order can be the recipient.
//! Every message carries `Message-ID: <DELIVERY_KEY@FROM_DOMAIN>`, the same on
//! every attempt and replay: the handle a receiving system (or a person)
//! uses to drop a repeat. Non-ASCII names and subjects are RFC 2047 encoded
//! and bodies are quoted-printable or base64 as needed, by lettre.
//!
//! # Layout
//! - `config`: [`EmailSinkConfig`] and [`SmtpConfig`], handed over by the
//!   daemon's config module once validated, and the checks it uses for
//!   addresses, TLS modes and CA files.
//! - `message`: renders a delivery into a MIME message.
//! - `outcome`: what an SMTP failure means for the engine: 4xx and network
//!   failures are retried, 5xx are permanent.
//! - `sink`: [`EmailSink`], the [`expeditor_api::Sink`] that ties them together.

mod config;
mod message;
mod outcome;
mod sink;

#[cfg(test)]
mod tests;

pub use config::{EmailSinkConfig, SmtpConfig, TlsMode, most_recipients, parse_ca, parse_mailbox, parse_recipients};
pub use sink::EmailSink;
