//! What a `slack` sink is built from.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use expeditor_api::{Structured, TemplateId, Templates};
use url::Url;

/// Where the Web API lives; `api_url` overrides it (tests, proxies).
pub const DEFAULT_API_URL: &str = "https://slack.com/api";

/// One `[sinks.NAME]` with `type = "slack"`, validated and compiled by the
/// daemon's config module; building the sink trusts it.
#[derive(Clone)]
pub struct SlackSinkConfig {
    /// The sink name, for logs and error messages (`sinks.NAME.text`).
    pub name: String,
    pub target: SlackTarget,
    /// A text template: the message, or with `blocks` the notification
    /// fallback. `None` only when `blocks` is set.
    pub text: Option<TemplateId>,
    /// A structured template that renders to a JSON array of Block Kit blocks.
    pub blocks: Option<Structured>,
    /// For the whole exchange: connecting, sending and reading the answer.
    pub timeout: Duration,
    /// Where `text`, `blocks` and `channel` were compiled.
    pub templates: Arc<Templates>,
}

/// How the sink reaches Slack.
#[derive(Clone)]
pub enum SlackTarget {
    /// `chat.postMessage` at `{api_url}/chat.postMessage`.
    Api {
        /// A bot token (`xoxb-...`), sent as `Authorization: Bearer`.
        token: String,
        /// A text template: a channel id (`C0123ABCD`) or name (`#alerts`).
        channel: TemplateId,
        /// Checked by [`check_url`]; no trailing slash.
        api_url: Url,
    },
    /// An incoming webhook (`https://hooks.slack.com/services/...`).
    Webhook { url: Url },
}

// Hand-written: the token and the webhook URL are credentials.
impl fmt::Debug for SlackSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackSinkConfig")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("text", &self.text.is_some())
            .field("blocks", &self.blocks.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for SlackTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlackTarget::Api { api_url, .. } => f
                .debug_struct("Api")
                .field("api_url", &api_url.as_str())
                .finish_non_exhaustive(),
            SlackTarget::Webhook { .. } => f.write_str("Webhook"),
        }
    }
}

/// Checks a configured bot token, for the config module, so a pasted signing
/// secret or webhook URL is a `check` error rather than `invalid_auth` at the
/// first delivery. The message never quotes the token.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.trim().is_empty() {
        return Err("is empty".into());
    }
    if token.trim() != token || token.contains(char::is_whitespace) {
        return Err("contains whitespace".into());
    }
    // xoxb- (bot), xoxp- (user): both start with "xox". With token rotation
    // on, Slack hands out xoxe.xoxb- tokens that expire after 12 hours, and
    // xoxe- refresh tokens to get the next: a sink has no way to refresh, so
    // it would work for half a day and then dead-letter every message.
    if token.starts_with("xoxe") {
        return Err(
            "is a rotating Slack token (xoxe), which expires after 12 hours and is not refreshed here: \
             use a bot token (`xoxb-`) of an app without token rotation"
                .into(),
        );
    }
    if !token.starts_with("xox") {
        return Err("is not a Slack token: bot tokens start with `xoxb-` (OAuth & Permissions page of the app)".into());
    }
    Ok(())
}

/// Checks `api_url` or `webhook_url`: `https://`, or plain `http://` to a
/// loopback address only (a local test server), since the token or the
/// webhook URL itself would otherwise cross the network in clear. The message
/// never quotes the URL: a webhook URL is a credential.
pub fn check_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("is not a valid URL ({e})"))?;
    match parsed.scheme() {
        "https" => {}
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if !loopback {
                return Err("must use https:// (plain http:// is allowed only to a loopback address)".into());
            }
        }
        _ => return Err("must start with https://".into()),
    }
    if parsed.host().is_none() {
        return Err("has no host".into());
    }
    Ok(parsed)
}
