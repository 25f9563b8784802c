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
//! give each file sink its own path. A torn last line that a crash left
//! (a batch that was never confirmed, so it is written again) is cut off
//! when the file is opened.
//!
//! # Rotation
//! Before each batch the sink checks that its path still names the file it
//! has open. When logrotate (or anyone) has moved or removed it, the sink
//! opens the path afresh, creating it, so no confirmed line goes to a file
//! that is about to be compressed or deleted. No reload is needed after a
//! rotation. `copytruncate` empties the file in place: appending goes on
//! at its start, but lines written between logrotate's copy and its
//! truncation are lost (logrotate says so too), so the sink warns when it
//! finds the file shorter than it left it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
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
    file: Arc<Mutex<Open>>,
}

/// Every file a file sink of this process has open, by its configured path.
type OpenFiles = HashMap<PathBuf, Weak<Mutex<Open>>>;

fn open_files() -> MutexGuard<'static, OpenFiles> {
    static FILES: OnceLock<Mutex<OpenFiles>> = OnceLock::new();
    FILES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The file being appended to, and which file that is, to notice when its
/// path has come to name another (rotation) or none.
#[derive(Debug)]
struct Open {
    file: File,
    id: Option<(u64, u64)>,
    /// Its length after our last write: shorter at the next means it was
    /// truncated under us (logrotate's `copytruncate`).
    end: u64,
}

impl Open {
    /// Creates the parent directories and the file if missing, and cuts off
    /// a torn last line.
    fn at(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        // A new file holds customers' names and emails: readable by its owner
        // and group (a log shipper), not by every user, whatever the umask.
        // An existing file keeps the mode it was given.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o640)
            .open(path)?;
        cut_torn_line(&mut file, path)?;
        let meta = file.metadata()?;
        Ok(Self {
            id: identity(&meta),
            end: meta.len(),
            file,
        })
    }

    /// Whether `path` still names the open file.
    fn current(&self, path: &Path) -> bool {
        match std::fs::metadata(path) {
            Ok(meta) => identity(&meta) == self.id,
            Err(_) => false,
        }
    }
}

/// A file's device and inode, where the platform has them.
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

/// A file that does not end in a newline holds the start of a batch that a
/// crash cut short. That batch was never confirmed and will be written
/// again; the fragment is removed, so the next line is not glued to it.
fn cut_torn_line(file: &mut File, path: &Path) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut chunk = vec![0u8; 64 * 1024];
    let mut end = len;
    loop {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if end == len && part.last() == Some(&b'\n') {
            return Ok(());
        }
        if let Some(at) = part.iter().rposition(|&b| b == b'\n') {
            return cut(file, path, start + at as u64 + 1, len);
        }
        if start == 0 {
            return cut(file, path, 0, len);
        }
        end = start;
    }
}

fn cut(file: &File, path: &Path, keep: u64, len: u64) -> io::Result<()> {
    file.set_len(keep)?;
    file.sync_data()?;
    tracing::warn!(
        file = %path.display(),
        bytes = len - keep,
        "removed a torn last line (a write that did not finish); its batch is written again"
    );
    Ok(())
}

impl FileSink {
    /// Creates the parent directories and opens the file for appending. The
    /// error names the path.
    ///
    /// A path another file sink of this process has open (the engine a
    /// reload is replacing) shares that sink's file and its lock: the two
    /// never write at once, and the new one does not take the old one's
    /// batch, half written, for a crash's torn line.
    pub async fn open(cfg: FileSinkConfig) -> io::Result<Self> {
        if let Some(file) = open_files().get(&cfg.path).and_then(Weak::upgrade) {
            return Ok(Self { cfg, file });
        }
        let path = cfg.path.clone();
        let opened = tokio::task::spawn_blocking(move || Open::at(&path))
            .await
            .map_err(io::Error::other)?
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cfg.path.display())))?;
        let mut files = open_files();
        // Another open of the same path may have won meanwhile: share it.
        if let Some(file) = files.get(&cfg.path).and_then(Weak::upgrade) {
            return Ok(Self { cfg, file });
        }
        let file = Arc::new(Mutex::new(opened));
        files.retain(|_, f| f.strong_count() > 0);
        files.insert(cfg.path.clone(), Arc::downgrade(&file));
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

/// One write and one fsync, to the file `path` names now; on failure the
/// file is cut back to where it was.
fn append(open: &Mutex<Open>, path: &Path, buf: &[u8]) -> io::Result<()> {
    let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
    if !open.current(path) {
        *open = Open::at(path)?;
        tracing::info!(file = %path.display(), "the file was moved or removed (rotated); appending to a new one");
    }
    let start = open.file.metadata()?.len();
    if start < open.end {
        // Truncated in place: a copy was made first (logrotate's
        // `copytruncate`), and lines written between the copy and the
        // truncation are in neither file, though confirmed.
        tracing::warn!(
            file = %path.display(),
            was = open.end,
            now = start,
            "the file was truncated under the sink (copytruncate?): lines written between its copy and its truncation are lost; rotate with `create` instead"
        );
    }
    let file = &mut open.file;
    let written = file.write_all(buf).and_then(|()| file.sync_data());
    match &written {
        Ok(()) => open.end = start + buf.len() as u64,
        Err(_) => {
            // Also after a failed fsync: the engine retries the whole batch,
            // and the lines should then be there once.
            let _ = file.set_len(start);
            open.end = start;
        }
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
        let path = self.cfg.path.clone();
        let written = match tokio::task::spawn_blocking(move || append(&file, &path, &buf)).await {
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
