//! Integration tests: the real `expeditor` binary against real sockets.
//!
//! Layout
//! - [`harness`]: start the daemon on free ports in a temp dir, post to it,
//!   read its store through the admin API, run its CLI, kill and restart it.
//! - [`fake_sink`]: an HTTP server in the test process that records every
//!   request and answers from a script; it can start "down".
//! - [`vendor`]: vendor payloads (from `shared/vendor-docs`) and our own
//!   signing, independent of the code under test.
//!
//! Tests, one module per promise:
//! - [`ingest`]: every status code of `POST /webhooks/{source}`, and that
//!   nothing rejected is stored or delivered.
//! - [`delivery`]: vendor retries deduped, sink retries with a stable
//!   `Idempotency-Key`, dead letters and replay.
//! - [`durability`]: acknowledged events survive `kill -9` and a sink outage.
//! - [`routing`]: by source, glob and `when`; one delivery per sink.
//! - [`check`]: `expeditor check` on the shipped and on broken configs.
//! - [`send`]: `expeditor send` against a running daemon.
//! - [`http_body`]: what the `http` sink puts on the wire.
//! - [`file_sink`]: what the `file` sink appends.
//! - [`admin`]: the admin API's token, filters and replay errors.

mod fake_sink;
mod harness;
mod vendor;

mod admin;
mod check;
mod delivery;
mod durability;
mod file_sink;
mod http_body;
mod ingest;
mod routing;
mod send;
