//! What a `bigquery` sink is built from, BigQuery's limits, and the checks the
//! daemon's config module runs on it at load time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use expeditor_api::{Structured, Templates};

/// BigQuery accepts at most 50,000 rows in one insertAll request and
/// recommends no more than 500.
pub const MAX_ROWS_LIMIT: usize = 50_000;
pub const DEFAULT_MAX_ROWS: usize = 500;
/// BigQuery refuses an insertAll request over 10 MB ("Request payload size
/// exceeds the limit: 10485760 bytes").
pub const MAX_BYTES_LIMIT: usize = 10 * 1024 * 1024;
pub const DEFAULT_MAX_BYTES: usize = 5 * 1024 * 1024;

/// One `[sinks.NAME]` with `type = "bigquery"`, validated and compiled by the
/// daemon's config module; building the sink trusts it.
#[derive(Debug, Clone)]
pub struct BigQuerySinkConfig {
    /// The sink name, for logs and error messages.
    pub name: String,
    pub project: String,
    pub dataset: String,
    pub table: String,
    /// The row template (`[sinks.NAME.row]`): one JSON object per delivery.
    pub row: Structured,
    /// Where `row` was compiled.
    pub templates: Arc<Templates>,
    /// Rows per insertAll request: the sink's `max_batch`.
    pub max_rows: usize,
    /// Bytes per insertAll request body; a batch over it is split.
    pub max_bytes: usize,
    /// How long the engine may wait for more due deliveries to fill a batch.
    pub linger: Duration,
    /// Replaces `https://bigquery.googleapis.com` (an emulator, a test server).
    pub endpoint: Option<String>,
    pub auth: Auth,
    /// Per insertAll request (and per token fetch).
    pub timeout: Duration,
    /// `skipInvalidRows` of each request. The config module always sets
    /// `true` (see the crate docs); `false` is BigQuery's default and kept
    /// working (rows answered `stopped` are retried at once).
    pub skip_invalid_rows: bool,
}

/// How requests are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Google's application-default credentials, found by the client crate:
    /// `GOOGLE_APPLICATION_CREDENTIALS_JSON`, `GOOGLE_APPLICATION_CREDENTIALS`,
    /// gcloud's `application_default_credentials.json`, then the metadata server.
    ApplicationDefault,
    /// This credentials file (`credentials = "..."`) and nothing else.
    File(PathBuf),
    /// No `Authorization` at all: only with `endpoint` (an emulator).
    None,
}

/// `project`: a Google Cloud project id (`crumb-analytics`), optionally
/// domain-scoped (`example.com:crumb-analytics`).
pub fn check_project(project: &str) -> Result<(), String> {
    let (domain, id) = project.rsplit_once(':').unwrap_or(("", project));
    let domain_ok = domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let id_ok = (1..=63).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && !id.ends_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if domain_ok && id_ok {
        Ok(())
    } else {
        Err(format!(
            "{project:?} is not a Google Cloud project id (lowercase letters, digits and hyphens, starting with a letter, e.g. \"crumb-analytics\")"
        ))
    }
}

/// `dataset`: letters, digits and underscores, at most 1024.
pub fn check_dataset(dataset: &str) -> Result<(), String> {
    if (1..=1024).contains(&dataset.len()) && dataset.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(format!(
            "{dataset:?} is not a BigQuery dataset id (letters, digits and underscores, e.g. \"restaurant\")"
        ))
    }
}

/// `table`: letters, digits, `_` and `-` (BigQuery allows a few more, such
/// as spaces, which a URL path would have to escape; the client does not),
/// optionally a partition decorator (`orders$20261123`); at most 1024 bytes.
pub fn check_table(table: &str) -> Result<(), String> {
    let (name, decorator) = table.split_once('$').unwrap_or((table, ""));
    let name_ok =
        !name.is_empty() && table.len() <= 1024 && name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-');
    let decorator_ok = !table.contains('$') || (!decorator.is_empty() && decorator.bytes().all(|b| b.is_ascii_digit()));
    if name_ok && decorator_ok {
        Ok(())
    } else {
        Err(format!(
            "{table:?} is not a table id this sink can address (letters, digits, '_' and '-', optionally a partition decorator such as \"orders$20261123\")"
        ))
    }
}

/// `endpoint`: `http(s)://host[:port]`, no path (the client appends
/// `/bigquery/v2/...`), no trailing slash kept.
pub fn check_endpoint(endpoint: &str) -> Result<String, String> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(|| format!("{endpoint:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!(
            "{endpoint:?} must be a scheme and host only, e.g. \"http://127.0.0.1:9050\" (the client adds /bigquery/v2/...)"
        ));
    }
    Ok(trimmed.to_owned())
}
