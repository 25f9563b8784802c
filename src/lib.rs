//! expeditor: receives signed webhooks from restaurant POS and ordering
//! platforms, verifies them, stores them durably and fans each event out to
//! sinks by the routing rules in `config.toml`.
//!
//! # Layout
//!
//! - [`config`]: loading and validating `config.toml` (`expeditor check`).
//! - [`ingest`]: the HTTP listener for `POST /webhooks/{source}`: limits, then
//!   [`pipeline`]: [`verify`] the signature on the raw bytes, [`normalize`]
//!   into the shared views, [`route`], and one durable insert in the [`store`].
//! - [`deliver`]: per-sink workers that claim due deliveries (leases), call the
//!   sink, and apply the shared retry policy; dead letters when it runs out.
//! - [`admin`]: health and the JSON API behind the CLI's listings and replay.
//! - [`cli`] and [`daemon`]: the commands and the `run` lifecycle.
//! - [`sample`]: realistic vendor events for `expeditor send` and benchmarks.
//!
//! Sinks live in their own crates under `connectors/`, on the contract of
//! `expeditor-api`.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod ingest;
pub mod metrics;
pub mod normalize;
pub mod pipeline;
pub mod route;
pub mod sample;
pub mod state;
pub mod store;
pub mod systemd;
pub mod throttle;
pub mod verify;
