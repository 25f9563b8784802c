//! The sink: one message per delivery, each over a connection of its own
//! (see the `lettre` entry of Cargo.toml for why not a pool).

use std::time::Instant;

use expeditor_api::{Delivery, DeliveryError, Outcome, Reads, Sink};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::{EmailSinkConfig, TlsMode, message, outcome};

pub struct EmailSink {
    cfg: EmailSinkConfig,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl std::fmt::Debug for EmailSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSink")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl EmailSink {
    /// Builds the transport; each delivery opens its own connection. Fails
    /// only on TLS setup (a CA file lettre cannot use).
    pub fn new(cfg: EmailSinkConfig) -> Result<Self, String> {
        let smtp = &cfg.smtp;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.host.clone())
            .port(smtp.port)
            // Per SMTP command; the whole exchange is bounded in `send`.
            .timeout(Some(cfg.timeout));
        if smtp.tls != TlsMode::None {
            let mut params = TlsParameters::builder(smtp.host.clone());
            if let Some(pem) = &smtp.ca_pem {
                let cert = Certificate::from_pem(pem).map_err(|e| format!("ca_file: {e}"))?;
                params = params.add_root_certificate(cert);
            }
            let params = params.build_rustls().map_err(|e| format!("TLS setup: {e}"))?;
            builder = builder.tls(match smtp.tls {
                TlsMode::StartTls => Tls::Required(params),
                _ => Tls::Wrapper(params),
            });
        } else {
            builder = builder.tls(Tls::None);
        }
        if let Some((user, password)) = &smtp.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Self {
            transport: builder.build(),
            cfg,
        })
    }

    async fn send(&self, delivery: &Delivery) -> Outcome {
        let message = message::render(&self.cfg, delivery)?;
        let started = Instant::now();
        let outcome = match tokio::time::timeout(self.cfg.timeout, self.transport.send(message)).await {
            Ok(Ok(_response)) => Ok(()),
            Ok(Err(err)) => Err(outcome::classify(&err)),
            Err(_) => Err(DeliveryError::timed_out(self.cfg.timeout)),
        };
        tracing::debug!(
            sink = %self.cfg.name,
            key = %delivery.key,
            attempt = delivery.attempt,
            elapsed_ms = started.elapsed().as_millis() as u64,
            error = outcome.as_ref().err().map(|e| e.message.as_str()),
            "email delivery",
        );
        outcome
    }
}

#[async_trait::async_trait]
impl Sink for EmailSink {
    /// One message per event: each has its own recipient and Message-ID.
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

    async fn close(&self) {
        self.transport.shutdown().await;
    }
}
