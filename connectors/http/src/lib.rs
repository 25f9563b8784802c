//! The `http` sink: one templated JSON request per delivery, for a kitchen
//! display, a loyalty program or any API.
//!
//! # Layout
//! - `config`: [`HttpSinkConfig`], what the daemon's config module hands over
//!   once it has validated the sink and compiled its templates.
//! - `request`: renders a delivery into a request (URL, headers, JSON body,
//!   `Idempotency-Key`).
//! - `outcome`: what a response or a transport failure means for the engine:
//!   success, retryable (with `Retry-After`) or permanent.
//! - `client`: [`Client`], how requests leave (hyper's pooled client, or
//!   reqwest when the environment names a proxy).
//! - `sink`: [`HttpSink`], the [`expeditor_api::Sink`] that ties them together.

mod client;
mod config;
mod outcome;
mod request;
mod sink;

#[cfg(test)]
mod tests;

pub use client::{Client, proxy_problems, tls_problems};
pub use config::{HttpSinkConfig, RESERVED_HEADERS, header_name};
pub use sink::HttpSink;
