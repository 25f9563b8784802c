//! The `file` sink: one JSON line per delivery, appended to a local file.
//!
//! It is the sink the shipped config uses, so a new user sees events flow with
//! no credentials, and a cheap durable log for anyone else.
//!
//! # Line format
//! Each line is the rendered `body` (default: the whole event JSON). When that
//! is a JSON object, a top-level `"delivery_key"` is set on it (replacing one
//! the body may have): a batch the engine retries after a failed fsync may
//! be written twice, and the key lets a reader drop the copy. A body that is
//! not an object is written as is.
//!
//! # Durability
//! A batch is serialized into one buffer and written with one `write_all` and
//! one `sync_data`, by one writer at a time, so lines never interleave. A
//! failed write is cut back off the file, so no torn line is left for the
//! next one to be glued to. Both assume the sink is the file's only writer:
//! give each file sink its own path.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use expeditor_api::{Delivery, DeliveryError, Outcome, Reads, Sink, Structured, Templates};

/// One `[sinks.NAME]` with `type = "file"`, validated and compiled by the
/// daemon's config module.
#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    /// The sink name, for error messages.
    pub name: String,
    /// Created with its parent directories if missing; appended to otherwise.
    pub path: PathBuf,
    /// A structured template per line; `None` writes the whole event JSON.
    pub body: Option<Structured>,
    /// Where `body` was compiled.
    pub templates: Arc<Templates>,
    /// Lines per write-and-sync (`batch.max_rows`).
    pub max_batch: usize,
    /// How long a smaller batch may wait for more (`batch.linger`).
    pub linger: Duration,
}

impl FileSinkConfig {
    /// Lines per write-and-sync unless `batch.max_rows` says otherwise: one
    /// modest write.
    pub const DEFAULT_MAX_BATCH: usize = 100;
    /// The most `batch.max_rows` may be.
    pub const MAX_BATCH_LIMIT: usize = 10_000;
}

#[derive(Debug)]
pub struct FileSink {
    cfg: FileSinkConfig,
    /// A std mutex taken inside the blocking write task, not across an
    /// `.await`: a `deliver` cancelled mid-write cannot stop the task, so a
    /// batch is always written and synced (or cut off) whole.
    file: Arc<Mutex<File>>,
}

impl FileSink {
    /// Creates the parent directories and opens the file for appending. The
    /// error names the path.
    pub async fn open(cfg: FileSinkConfig) -> io::Result<Self> {
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", cfg.path.display()));
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(with_path)?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)
            .await
            .map_err(with_path)?;
        let file = Arc::new(Mutex::new(file.into_std().await));
        Ok(Self { cfg, file })
    }

    /// Appends one delivery's line to `buf`, or nothing if it cannot render.
    fn line(&self, delivery: &Delivery, buf: &mut Vec<u8>) -> Result<(), DeliveryError> {
        let mut value = match &self.cfg.body {
            Some(body) => {
                let ctx = self.cfg.templates.context_for(&delivery.event);
                // The message starts with the key path (`sinks.NAME.body.x`).
                self.cfg
                    .templates
                    .render_json(body, &ctx)
                    .map_err(|e| DeliveryError::permanent(e.message))?
            }
            None => serde_json::to_value(&*delivery.event)
                .map_err(|e| DeliveryError::permanent(format!("event cannot be written as JSON: {e}")))?,
        };
        if let Some(object) = value.as_object_mut() {
            object.insert("delivery_key".into(), delivery.key.clone().into());
        }
        // JSON escapes newlines inside strings, so a line stays one line.
        serde_json::to_writer(&mut *buf, &value)
            .map_err(|e| DeliveryError::permanent(format!("line cannot be written as JSON: {e}")))?;
        buf.push(b'\n');
        Ok(())
    }
}

/// One write and one fsync; on failure the file is cut back to where it was.
fn append(file: &Mutex<File>, buf: &[u8]) -> io::Result<()> {
    let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
    let start = file.metadata()?.len();
    let written = file.write_all(buf).and_then(|()| file.sync_data());
    if written.is_err() {
        // Also after a failed fsync: the engine retries the whole batch, and
        // the lines should then be there once.
        let _ = file.set_len(start);
    }
    written
}

#[async_trait::async_trait]
impl Sink for FileSink {
    fn max_batch(&self) -> usize {
        self.cfg.max_batch
    }

    fn linger(&self) -> Duration {
        self.cfg.linger
    }

    /// What its body template reads; the whole event when there is none
    /// (the event is the line).
    fn reads(&self) -> Reads {
        match self.cfg.body {
            Some(_) => self.cfg.templates.reads(),
            None => Reads::All,
        }
    }

    async fn deliver(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let mut buf = Vec::new();
        let mut outcomes: Vec<Outcome> = batch.iter().map(|d| self.line(d, &mut buf)).collect();
        if buf.is_empty() {
            return outcomes;
        }
        let file = Arc::clone(&self.file);
        let written = match tokio::task::spawn_blocking(move || append(&file, &buf)).await {
            Ok(result) => result,
            Err(join) => Err(io::Error::other(join)),
        };
        if let Err(e) = written {
            // Disk full or a flaky mount may clear: worth another attempt.
            let message = format!("cannot append to {}: {e}", self.cfg.path.display());
            for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
                *outcome = Err(DeliveryError::retryable(message.clone()));
            }
        }
        outcomes
    }
}

#[cfg(test)]
mod tests;
