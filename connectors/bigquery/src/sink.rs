//! The sink: renders a batch into rows, sends them with insertAll (split by
//! `max_bytes`, the parts in parallel), and maps BigQuery's answer back to
//! one outcome per delivery.

use std::time::{Duration, Instant};

use expeditor_api::{Delivery, DeliveryError, Outcome, Reads, Sink};
use gcloud_bigquery::client::HttpClientConfig;
use gcloud_bigquery::client::google_cloud_auth::credentials::CredentialsFile;
use gcloud_bigquery::http::bigquery_tabledata_client::BigqueryTabledataClient;
use gcloud_bigquery::http::tabledata::insert_all::InsertAllRequest;
use tokio::sync::OnceCell;

use crate::rows::{Rendered, pack, render};
use crate::{Auth, BigQuerySinkConfig, outcome};

#[derive(Debug)]
pub struct BigQuerySink {
    cfg: BigQuerySinkConfig,
    http: reqwest::Client,
    /// Made at the first delivery, not at start: finding credentials fetches
    /// a first token, and a network blip at start must not stop the daemon.
    client: OnceCell<BigqueryTabledataClient>,
}

impl BigQuerySink {
    /// Needs a rustls crypto provider installed (the daemon's `main` does).
    pub fn new(cfg: BigQuerySinkConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", outcome::root_cause(&e)))?;
        Ok(Self {
            cfg,
            http,
            client: OnceCell::new(),
        })
    }

    async fn client(&self) -> Result<&BigqueryTabledataClient, DeliveryError> {
        self.client
            .get_or_try_init(|| async {
                let config = match &self.cfg.auth {
                    Auth::None => HttpClientConfig::new_with_emulator(self.cfg.endpoint.clone().unwrap_or_default()),
                    Auth::ApplicationDefault => {
                        let provider = HttpClientConfig::default_token_provider()
                            .await
                            .map_err(|e| credentials_error(&e))?;
                        HttpClientConfig::new(Box::new(provider))
                    }
                    Auth::File(path) => {
                        let file = CredentialsFile::new_from_file(path.display().to_string())
                            .await
                            .map_err(|e| {
                                DeliveryError::retryable(outcome::one_line(&format!(
                                    "cannot read credentials {}: {e}",
                                    path.display()
                                )))
                            })?;
                        let provider = HttpClientConfig::default_token_provider_with(file)
                            .await
                            .map_err(|e| credentials_error(&e))?;
                        HttpClientConfig::new(Box::new(provider))
                    }
                };
                let mut config =
                    config.with_http_client(reqwest_middleware::ClientBuilder::new(self.http.clone()).build());
                if let Some(endpoint) = &self.cfg.endpoint {
                    config = config.with_endpoint(endpoint.clone());
                }
                Ok(BigqueryTabledataClient::new(config.create_client()))
            })
            .await
    }

    /// One insertAll request; outcomes by batch index.
    async fn insert(
        &self,
        client: &BigqueryTabledataClient,
        rows: Vec<Rendered>,
        deadline: tokio::time::Instant,
    ) -> Vec<(usize, Outcome)> {
        let indices: Vec<usize> = rows.iter().map(|r| r.index).collect();
        let request = InsertAllRequest {
            skip_invalid_rows: Some(self.cfg.skip_invalid_rows),
            rows: rows.into_iter().map(|r| r.row).collect(),
            ..Default::default()
        };
        let started = Instant::now();
        let cfg = &self.cfg;
        let answer = tokio::time::timeout_at(
            deadline,
            client.insert(&cfg.project, &cfg.dataset, &cfg.table, &request),
        )
        .await;
        let outcomes = match answer {
            Ok(Ok(response)) => outcome::rows(indices.len(), response),
            Ok(Err(e)) => vec![Err(outcome::request_error(&e, cfg.timeout)); indices.len()],
            Err(_) => vec![Err(DeliveryError::timed_out(cfg.timeout)); indices.len()],
        };
        let failed = outcomes.iter().filter(|o| o.is_err()).count();
        tracing::debug!(
            sink = %cfg.name,
            rows = indices.len(),
            failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            error = outcomes.iter().find_map(|o| o.as_ref().err()).map(|e| e.message.as_str()),
            "bigquery insertAll",
        );
        indices.into_iter().zip(outcomes).collect()
    }
}

fn credentials_error(err: &dyn std::fmt::Display) -> DeliveryError {
    // Retried: the metadata server or the token endpoint may be back soon; a
    // key Google refuses uses up the attempts and is dead-lettered.
    DeliveryError::retryable(outcome::one_line(&format!("cannot get Google credentials: {err}")))
}

#[async_trait::async_trait]
impl Sink for BigQuerySink {
    fn max_batch(&self) -> usize {
        self.cfg.max_rows
    }

    fn linger(&self) -> Duration {
        self.cfg.linger
    }

    /// What the row's templates read.
    fn reads(&self) -> Reads {
        self.cfg.templates.reads()
    }

    async fn deliver(&self, batch: &[Delivery]) -> Vec<Outcome> {
        // Everything, a first token fetch included, within one timeout, so
        // the engine's backstop never has to cut a call short.
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut rows = Vec::with_capacity(batch.len());
        for (index, delivery) in batch.iter().enumerate() {
            match render(&self.cfg, index, delivery) {
                Ok(row) => rows.push(row),
                Err(e) => outcomes[index] = Some(Err(e)),
            }
        }
        if !rows.is_empty() {
            match tokio::time::timeout_at(deadline, self.client()).await {
                Ok(Ok(client)) => {
                    let requests = pack(rows, self.cfg.max_rows, self.cfg.max_bytes);
                    let answers = futures_util::future::join_all(
                        requests
                            .into_iter()
                            .map(|request| self.insert(client, request, deadline)),
                    )
                    .await;
                    for (index, outcome) in answers.into_iter().flatten() {
                        outcomes[index] = Some(outcome);
                    }
                }
                Ok(Err(e)) => rows.iter().for_each(|r| outcomes[r.index] = Some(Err(e.clone()))),
                Err(_) => rows
                    .iter()
                    .for_each(|r| outcomes[r.index] = Some(Err(DeliveryError::timed_out(self.cfg.timeout)))),
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(DeliveryError::retryable("no outcome"))))
            .collect()
    }
}
