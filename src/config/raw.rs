//! The file as written: serde structs with spans, before `${VAR}`s are
//! resolved and values are checked. Every table denies unknown keys, so a typo
//! is an error that points at its line instead of a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use toml::Spanned;

pub type Str = Spanned<String>;

/// The sections, each read on its own (`Cx::sections`); the sinks are read
/// later, each by its `type`.
#[derive(Debug)]
pub struct RawConfig {
    pub server: Option<Spanned<RawServer>>,
    pub admin: Option<Spanned<RawAdmin>>,
    pub store: Option<Spanned<RawStore>>,
    pub sources: BTreeMap<String, Spanned<RawSource>>,
    pub routes: Vec<Spanned<RawRoute>>,
    pub tests: Vec<Spanned<RawTest>>,
}

/// `[[tests]]`: an event and the sinks the routes must choose for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTest {
    pub name: Str,
    pub source: Str,
    /// A sample event of this type, as `expeditor send` builds it.
    pub event: Option<Str>,
    /// Or a file with the vendor's JSON body (relative to the config file).
    pub body: Option<Str>,
    pub sinks: Spanned<Vec<Str>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Str>,
    pub max_body: Option<Str>,
    pub header_timeout: Option<Str>,
    pub body_timeout: Option<Str>,
    pub max_connections: Option<Spanned<i64>>,
    pub shutdown_timeout: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Str>,
    pub token: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub path: Option<Str>,
    pub url: Option<Str>,
    pub dedupe_window: Option<Str>,
    pub keep_delivered: Option<Str>,
    pub keep_dead_letters: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub kind: Str,
    pub secrets: Spanned<Vec<Str>>,
    pub tolerance: Option<Str>,
    // kind = "hmac" only
    pub header: Option<Str>,
    pub encoding: Option<Str>,
    pub prefix: Option<Str>,
    pub timestamp_header: Option<Str>,
    pub signed: Option<Str>,
    pub id_field: Option<Str>,
    pub type_field: Option<Str>,
    pub time_field: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Str>,
    pub sources: Option<Vec<Str>>,
    pub events: Option<Vec<Str>>,
    pub when: Option<Str>,
    pub sinks: Spanned<Vec<Str>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<Spanned<i64>>,
    pub initial: Option<Str>,
    pub max: Option<Str>,
}

/// A sink's `concurrency`: a number of attempts at once, or `"adaptive"`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "`concurrency` must be a whole number of attempts at once, or \"adaptive\""
)]
pub enum RawConcurrency {
    Fixed(i64),
    Named(String),
}

/// Keys every sink type accepts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpSink {
    #[serde(rename = "type")]
    pub _type: Str,
    pub concurrency: Option<Spanned<RawConcurrency>>,
    pub rate_limit: Option<Str>,
    pub timeout: Option<Str>,
    pub retry: Option<Spanned<RawRetry>>,
    pub method: Option<Str>,
    pub url: Str,
    #[serde(default)]
    pub headers: BTreeMap<String, Str>,
    /// Converted by hand (env, spans) from the document tree.
    #[allow(dead_code)]
    pub body: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileSink {
    #[serde(rename = "type")]
    pub _type: Str,
    pub concurrency: Option<Spanned<RawConcurrency>>,
    pub rate_limit: Option<Str>,
    pub timeout: Option<Str>,
    pub retry: Option<Spanned<RawRetry>>,
    pub path: Str,
    pub batch: Option<Spanned<RawFileBatch>>,
    #[allow(dead_code)]
    pub body: Option<IgnoredAny>,
}

/// A file sink's `batch`: no `max_bytes`, a line has no size limit to keep.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileBatch {
    pub max_rows: Option<Spanned<i64>>,
    pub linger: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWasmSink {
    #[serde(rename = "type")]
    pub _type: Str,
    pub concurrency: Option<Spanned<RawConcurrency>>,
    pub rate_limit: Option<Str>,
    pub timeout: Option<Str>,
    pub retry: Option<Spanned<RawRetry>>,
    /// `NAME` (`plugins/NAME.wasm` next to the config file) or a path.
    pub plugin: Str,
    /// `host:port` entries the plugin may send HTTP requests to.
    pub allow_http: Option<Spanned<Vec<Str>>>,
    /// Linear memory of one instance (`"64MiB"`).
    pub memory: Option<Str>,
    /// CPU time of one call (`"1s"`).
    pub cpu: Option<Str>,
    pub max_batch: Option<Spanned<i64>>,
    /// Converted by hand (env, spans) into the JSON handed to `init`.
    #[allow(dead_code)]
    pub config: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlackSink {
    #[serde(rename = "type")]
    pub _type: Str,
    pub concurrency: Option<Spanned<RawConcurrency>>,
    pub rate_limit: Option<Str>,
    pub timeout: Option<Str>,
    pub retry: Option<Spanned<RawRetry>>,
    /// A bot token (`xoxb-...`), with `channel`: `chat.postMessage`.
    pub token: Option<Str>,
    pub channel: Option<Str>,
    /// The Web API base URL (default `https://slack.com/api`).
    pub api_url: Option<Str>,
    /// An incoming webhook, instead of `token` and `channel`.
    pub webhook_url: Option<Str>,
    pub text: Option<Str>,
    /// Converted by hand (env, spans) from the document tree.
    #[allow(dead_code)]
    pub blocks: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmailSink {
    #[serde(rename = "type")]
    pub _type: Str,
    pub concurrency: Option<Spanned<RawConcurrency>>,
    pub rate_limit: Option<Str>,
    pub timeout: Option<Str>,
    pub retry: Option<Spanned<RawRetry>>,
    pub smtp: Spanned<RawSmtp>,
    pub from: Str,
    pub to: Str,
    pub to_name: Option<Str>,
    pub subject: Str,
    pub text: Str,
    pub html: Option<Str>,
}

/// `smtp = { host, port, tls, username, password, ca_file }` of an email sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    pub host: Str,
    pub port: Option<Spanned<i64>>,
    /// `starttls` (default), `tls` or `none`.
    pub tls: Option<Str>,
    pub username: Option<Str>,
    pub password: Option<Str>,
    /// PEM file of extra trusted root certificates (a private CA).
    pub ca_file: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBigQuerySink {
    #[serde(rename = "type")]
    pub _type: Str,
    pub concurrency: Option<Spanned<RawConcurrency>>,
    pub rate_limit: Option<Str>,
    pub timeout: Option<Str>,
    pub retry: Option<Spanned<RawRetry>>,
    pub project: Str,
    pub dataset: Str,
    pub table: Str,
    pub batch: Option<Spanned<RawBatch>>,
    /// Replaces `https://bigquery.googleapis.com` (an emulator, a test server).
    pub endpoint: Option<Str>,
    /// `application-default` (default) or `none` (only with `endpoint`).
    pub auth: Option<Str>,
    /// A credentials JSON file instead of the application-default chain.
    pub credentials: Option<Str>,
    /// Converted by hand (env, spans) from the document tree.
    #[allow(dead_code)]
    pub row: Option<IgnoredAny>,
}

/// `batch = { max_rows, max_bytes, linger }` of a bigquery sink.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    pub max_rows: Option<Spanned<i64>>,
    pub max_bytes: Option<Str>,
    pub linger: Option<Str>,
}
