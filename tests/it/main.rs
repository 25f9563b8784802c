//! Integration tests: the real `expeditor` binary against real sockets.
//!
//! Layout
//! - [`harness`]: start the daemon on free ports in a temp dir, post to it,
//!   read its store through the admin API, run its CLI, kill and restart it.
//! - [`fake_sink`]: an HTTP server in the test process that records every
//!   request and answers from a script; it can start "down".
//! - [`smtp`]: a real SMTP server process (aiosmtpd) for the email tests.
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
//! - [`postgres`]: two instances on one PostgreSQL store (dedupe, shared queue,
//!   `kill -9` takeover, the database going away); needs
//!   `EXPEDITOR_TEST_POSTGRES_URL`, skipped with a message without it.
//! - [`ops`]: systemd notifications, SIGTERM/SIGHUP under load, metrics,
//!   the CLI's filters and `events show`, logs without secrets.
//! - [`wasm`]: `type = "wasm"` sinks with the plugins of `plugins/` built from
//!   source: egress grants, traps contained, the retry policy, `check`.
//! - [`slack`]: `type = "slack"` against a local Slack ([`fake_slack`]: the
//!   Web API's `chat.postMessage` and an incoming webhook, token, channel and
//!   blocks checked, Slack's error shapes and 429 `Retry-After`), `check`.
//! - [`email`]: `type = "email"` against a real SMTP server process
//!   (aiosmtpd): STARTTLS, implicit TLS, AUTH, 4xx/5xx replies, the received
//!   message parsed (headers, RFC 2047, both bodies, `Message-ID`), `check`.
//! - [`examples`]: the commented-out KDS, loyalty, Slack and email examples
//!   of the shipped `config.toml`, uncommented: `check`ed, and run against
//!   local services.
//! - [`bigquery`]: `type = "bigquery"` against a fake BigQuery (insertAll
//!   with a schema, per-row errors, quota and 5xx, the OAuth token endpoint
//!   and metadata server), the `config.toml` warehouse example, `check`.

mod fake_sink;
mod fake_slack;
mod harness;
mod smtp;
mod vendor;

mod admin;
mod bigquery;
mod check;
mod delivery;
mod durability;
mod email;
mod examples;
mod file_sink;
mod http_body;
mod ingest;
mod ops;
mod postgres;
mod routing;
mod send;
mod slack;
mod wasm;
