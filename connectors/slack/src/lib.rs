//! The `slack` sink: one message per delivery, through `slack-morphism`.
//!
//! Two ways to reach Slack:
//! - **Web API** (`token` + `channel`): `chat.postMessage` with a bot token,
//!   to a channel the bot has been invited to.
//! - **Incoming webhook** (`webhook_url`): the URL is the credential and
//!   fixes the channel.
//!
//! Either way the message is `text` and optional Block Kit `blocks`, both
//! templates. Slack has no idempotency key: a retry after a lost answer may
//! post twice (at least once), see the README.
//!
//! # Layout
//! - `config`: [`SlackSinkConfig`], handed over by the daemon's config module
//!   once validated and compiled, and the checks it uses for tokens and URLs.
//! - `message`: renders a delivery into channel, text and blocks.
//! - `outcome`: what Slack's answer means for the engine: success, retryable
//!   (`ratelimited`, 429 `Retry-After`, 5xx, network) or permanent
//!   (`channel_not_found`, `invalid_auth`, ...).
//! - `egress`: how the client reaches Slack: direct, or through the proxy
//!   the environment names.
//! - `sink`: [`SlackSink`], the [`expeditor_api::Sink`] that ties them together.

mod config;
mod egress;
mod message;
mod outcome;
mod sink;

#[cfg(test)]
mod tests;

pub use config::{DEFAULT_API_URL, SlackSinkConfig, SlackTarget, check_token, check_url};
pub use sink::SlackSink;
