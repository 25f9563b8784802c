//! The sink: one request per delivery, classified by `outcome`.

use std::time::Instant;

use expeditor_api::{Delivery, Outcome, Reads, Sink};
use http::Uri;

use crate::{Client, HttpSinkConfig, request};

#[derive(Debug)]
pub struct HttpSink {
    cfg: HttpSinkConfig,
    client: Client,
    /// `url`, parsed once when it is not a template; an invalid one is left
    /// for each delivery to report.
    url: Option<Uri>,
}

impl HttpSink {
    /// `client` is shared by all http sinks, so they share one connection
    /// pool.
    pub fn new(cfg: HttpSinkConfig, client: Client) -> Self {
        let url = cfg.url.literal().and_then(|u| request::parse_url(&cfg, u).ok());
        Self { cfg, client, url }
    }

    async fn send(&self, delivery: &Delivery) -> Outcome {
        let request = request::build(&self.cfg, self.url.as_ref(), delivery)?;
        let started = Instant::now();
        let mut outcome = self.client.send(request, self.cfg.timeout).await;
        // A templated URL may name many hosts: one host's Retry-After holds
        // only its own delivery, not the others'.
        if let Err(e) = &mut outcome
            && self.cfg.url.literal().is_none()
        {
            e.holds_sink = false;
        }
        tracing::debug!(
            sink = %self.cfg.name,
            key = %delivery.key,
            attempt = delivery.attempt,
            elapsed_ms = started.elapsed().as_millis() as u64,
            error = outcome.as_ref().err().map(|e| e.message.as_str()),
            "http delivery",
        );
        outcome
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    /// One request per event: the APIs behind this sink take one at a time.
    fn max_batch(&self) -> usize {
        1
    }

    /// What its url, headers and body templates read; the whole event when
    /// there is no body template (the event is the body).
    fn reads(&self) -> Reads {
        match self.cfg.body {
            Some(_) => self.cfg.templates.reads(),
            None => Reads::All,
        }
    }

    async fn deliver(&self, batch: &[Delivery]) -> Vec<Outcome> {
        expeditor_api::one_by_one(batch, |d| self.send(d)).await
    }
}
