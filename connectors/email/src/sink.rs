//! The sink: one message per delivery, each over a connection of its own
//! (see the `lettre` entry of Cargo.toml for why not a pool).
//!
//! The connection is lettre's, driven step by step rather than through its
//! transport: the transport ends every send with a `QUIT` and waits for the
//! answer with no time limit, so a server slow to say goodbye after it took
//! the message (its `250`) would have the attempt time out, and the
//! message sent again. Here the `250` decides, and the goodbye is said on
//! the side, briefly.

use std::time::{Duration, Instant};

use expeditor_api::{Delivery, DeliveryError, Outcome, Reads, Sink};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;

use crate::{EmailSinkConfig, TlsMode, message, outcome};

/// How long a `QUIT` after a delivered message may wait for its answer.
const GOODBYE: Duration = Duration::from_secs(2);

pub struct EmailSink {
    cfg: EmailSinkConfig,
    /// For `Tls` (from the first byte) and `StartTls`.
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
}

impl std::fmt::Debug for EmailSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSink")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl EmailSink {
    /// Prepares TLS and credentials; each delivery opens its own
    /// connection. Fails only on TLS setup (a CA file lettre cannot use).
    pub fn new(cfg: EmailSinkConfig) -> Result<Self, String> {
        let smtp = &cfg.smtp;
        let tls = if smtp.tls != TlsMode::None {
            let mut params = TlsParameters::builder(smtp.host.clone());
            if let Some(pem) = &smtp.ca_pem {
                let cert = Certificate::from_pem(pem).map_err(|e| format!("ca_file: {e}"))?;
                params = params.add_root_certificate(cert);
            }
            Some(params.build_rustls().map_err(|e| format!("TLS setup: {e}"))?)
        } else {
            None
        };
        let credentials = smtp
            .credentials
            .as_ref()
            .map(|(user, password)| Credentials::new(user.clone(), password.clone()));
        Ok(Self {
            tls,
            credentials,
            hello: ClientId::default(),
            cfg,
        })
    }

    /// Connects (TLS, STARTTLS, AUTH as configured) and sends the message:
    /// the connection, once the server has taken it.
    async fn exchange(&self, message: &lettre::Message) -> Result<AsyncSmtpConnection, lettre::transport::smtp::Error> {
        let smtp = &self.cfg.smtp;
        let wrapper = match smtp.tls {
            TlsMode::Tls => self.tls.clone(),
            _ => None,
        };
        // The timeout here is per command; the whole exchange is bounded in `send`.
        let mut conn = AsyncSmtpConnection::connect_tokio1(
            (smtp.host.as_str(), smtp.port),
            Some(self.cfg.timeout),
            &self.hello,
            wrapper,
            None,
        )
        .await?;
        if smtp.tls == TlsMode::StartTls
            && let Some(params) = &self.tls
        {
            // Refused, with an error, by a server that does not offer it.
            conn.starttls(params.clone(), &self.hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials).await?;
        }
        conn.send(message.envelope(), &message.formatted()).await?;
        Ok(conn)
    }

    async fn send(&self, delivery: &Delivery) -> Outcome {
        let message = message::render(&self.cfg, delivery)?;
        let started = Instant::now();
        let outcome = match tokio::time::timeout(self.cfg.timeout, self.exchange(&message)).await {
            Ok(Ok(mut conn)) => {
                // Delivered: a goodbye that is slow or lost changes nothing.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(GOODBYE, conn.abort()).await;
                });
                Ok(())
            }
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
}
