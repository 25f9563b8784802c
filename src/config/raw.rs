//! The file as written: serde structs with spans, before `${VAR}`s are
//! resolved and values are checked. Every table denies unknown keys, so a typo
//! is an error that points at its line instead of a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use toml::Spanned;

pub type Str = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<Spanned<RawServer>>,
    pub admin: Option<Spanned<RawAdmin>>,
    pub store: Option<Spanned<RawStore>>,
    #[serde(default)]
    pub sources: BTreeMap<String, Spanned<RawSource>>,
    /// Read separately: each sink's keys depend on its `type`.
    #[allow(dead_code)]
    pub sinks: Option<IgnoredAny>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Str>,
    pub max_body: Option<Str>,
    pub header_timeout: Option<Str>,
    pub body_timeout: Option<Str>,
    pub max_connections: Option<Spanned<i64>>,
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

/// Keys every sink type accepts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpSink {
    #[serde(rename = "type")]
    pub _type: Str,
    pub concurrency: Option<Spanned<i64>>,
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
    pub concurrency: Option<Spanned<i64>>,
    pub timeout: Option<Str>,
    pub retry: Option<Spanned<RawRetry>>,
    pub path: Str,
    #[allow(dead_code)]
    pub body: Option<IgnoredAny>,
}
