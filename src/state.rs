//! What the listeners share, and what a reload swaps.
//!
//! Requests and admin calls read [`Shared::current`] once and use that
//! snapshot to the end, so a SIGHUP reload is atomic for each of them: a
//! request is handled entirely by the old config or entirely by the new.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::deliver::{EngineHealth, Handoff};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::store::Store;

/// The running configuration and what was built from it.
pub struct Current {
    pub config: Arc<Config>,
    pub pipeline: Arc<Pipeline>,
    /// Wakes sink workers after a replay put deliveries back in the queue.
    pub handoff: Arc<Handoff>,
    pub engine: EngineHealth,
}

pub struct Shared {
    pub current: ArcSwap<Current>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// Work a request starts that must finish even if the request is
    /// dropped (held deliveries' hand-off): the ingest listener waits for it
    /// before its threads stop.
    pub detached: TaskTracker,
    /// The last `/readyz` probe of the store, and when it ran (`admin`).
    pub ready_probe: tokio::sync::Mutex<Option<(std::time::Instant, bool)>>,
}
