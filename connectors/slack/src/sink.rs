//! The sink: one message per delivery, classified by `outcome`.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use expeditor_api::{Delivery, DeliveryError, Outcome, Reads, Sink};
use hyper_rustls::HttpsConnectorBuilder;
use slack_morphism::prelude::*;

use crate::egress::Egress;
use crate::{SlackSinkConfig, SlackTarget, message, outcome};

type Client = SlackClient<SlackClientHyperConnector<hyper_rustls::HttpsConnector<Egress>>>;

pub struct SlackSink {
    cfg: SlackSinkConfig,
    client: Client,
    /// The bot token in slack-morphism's form (Web API mode only).
    token: Option<SlackApiToken>,
}

impl std::fmt::Debug for SlackSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackSink")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl SlackSink {
    /// Builds the HTTPS client. Fails only when no TLS root certificates can
    /// be loaded at all.
    pub fn new(cfg: SlackSinkConfig) -> io::Result<Self> {
        // The process-wide provider the daemon installed (ring), or ring.
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let builder = HttpsConnectorBuilder::new();
        // The system's roots (corporate proxies add theirs there); Mozilla's
        // when the system has none.
        let builder = match builder.with_provider_and_native_roots(provider.clone()) {
            Ok(b) => b,
            Err(_) => HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(provider)
                .map_err(io::Error::other)?,
        };
        // Plain http only reaches a loopback test server: config refuses it
        // for any other host (`check_url`).
        let https = builder
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(Egress::from_env());
        let mut connector = SlackClientHyperConnector::with_connector(https);
        let token = match &cfg.target {
            SlackTarget::Api { token, api_url, .. } => {
                connector = connector.with_slack_api_url(api_url.as_str().trim_end_matches('/'));
                Some(SlackApiToken::new(SlackApiTokenValue::new(token.clone())))
            }
            SlackTarget::Webhook { .. } => None,
        };
        Ok(Self {
            cfg,
            client: SlackClient::new(connector),
            token,
        })
    }

    async fn send(&self, delivery: &Delivery) -> Outcome {
        let message = message::render(&self.cfg, delivery)?;
        let started = Instant::now();
        let post = self.post(message);
        let mut outcome = match tokio::time::timeout(self.cfg.timeout, post).await {
            Ok(outcome) => outcome,
            Err(_) => Err(DeliveryError::timed_out(self.cfg.timeout)),
        };
        // Slack limits posting per channel: with a templated channel, one
        // channel's 429 holds only its own delivery, not the others'.
        if let Err(e) = &mut outcome
            && matches!(&self.cfg.target, SlackTarget::Api { channel, .. } if channel.literal().is_none())
        {
            e.holds_sink = false;
        }
        tracing::debug!(
            sink = %self.cfg.name,
            key = %delivery.key,
            attempt = delivery.attempt,
            elapsed_ms = started.elapsed().as_millis() as u64,
            error = outcome.as_ref().err().map(|e| e.message.as_str()),
            "slack delivery",
        );
        outcome
    }

    async fn post(&self, message: message::Message) -> Outcome {
        let content = SlackMessageContent::new()
            .opt_text(message.text)
            .opt_blocks(message.blocks);
        let result = match (&self.cfg.target, &self.token, message.channel) {
            (SlackTarget::Api { .. }, Some(token), Some(channel)) => {
                let request = SlackApiChatPostMessageRequest::new(SlackChannelId::new(channel), content);
                self.client
                    .open_session(token)
                    .chat_post_message(&request)
                    .await
                    .map(drop)
            }
            (SlackTarget::Webhook { url }, _, _) => self
                .client
                .post_webhook_message(url, &SlackApiPostWebhookMessageRequest::new(content))
                .await
                .map(drop),
            _ => return Err(DeliveryError::permanent("slack sink has no token or channel")),
        };
        match result {
            Ok(()) => Ok(()),
            Err(err) => outcome::classify(err),
        }
    }
}

#[async_trait::async_trait]
impl Sink for SlackSink {
    /// One message per event: Slack posts one message per call.
    fn max_batch(&self) -> usize {
        1
    }

    /// What its templates read: every part of the message is one.
    fn reads(&self) -> Reads {
        self.cfg.templates.reads()
    }

    async fn deliver(&self, batch: &[Delivery]) -> Vec<Outcome> {
        expeditor_api::one_by_one(batch, |d| self.send(d)).await
    }
}
