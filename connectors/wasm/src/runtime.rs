//! The process's one wasmtime engine and its linkers.
//!
//! One engine for every wasm sink, made on first use: a compiled component
//! belongs to the engine that compiled it, the pooling allocator reserves its
//! address space once, and one ticker thread drives epoch interruption for
//! all stores. A reload builds new plugins on the same engine.

use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings;
use crate::state::State;

/// How often the epoch advances: the granularity of the CPU limit.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// The wasmtime version the cache key names (pinned in Cargo.toml).
pub(crate) const WASMTIME_VERSION: &str = "48.0.8";

/// Instances that may exist at once, all wasm sinks together (each sink keeps
/// up to `concurrency` of them). Past this, a delivery fails as retryable;
/// `expeditor check` keeps a config's sinks to half of it
/// ([`crate::MAX_SINK_INSTANCES`]).
pub(crate) const MAX_INSTANCES: u32 = 1000;

pub(crate) struct Runtime {
    pub engine: Engine,
    /// WASI (empty context) and the `host` interface.
    pub plain: Linker<State>,
    /// `plain` plus `wasi:http`, for sinks with `allow_http` grants.
    pub http: Linker<State>,
}

/// The runtime, made on first use. An error (the engine cannot be made, e.g.
/// no address space for the pool) is remembered and reported by every load.
pub(crate) fn runtime() -> Result<&'static Runtime, String> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| build().map_err(|e| format!("cannot start the WebAssembly runtime: {e:#}")))
        .as_ref()
        .map_err(Clone::clone)
}

fn build() -> wasmtime::Result<Runtime> {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.parallel_compilation(true);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(MAX_INSTANCES);
    // Rust guests are one core module (plus small shims) with one memory.
    pool.total_core_instances(MAX_INSTANCES * 4);
    pool.total_memories(MAX_INSTANCES);
    pool.total_tables(MAX_INSTANCES * 2);
    // Per component, so one crafted plugin cannot take the shared pool's
    // slots (or memories: the limiter counts their bytes together).
    pool.max_core_instances_per_component(16);
    pool.max_memories_per_component(4);
    pool.max_tables_per_component(16);
    pool.max_memory_size(crate::Limits::MAX_MEMORY);
    // An idle pooled slot keeps no more than this of a plugin's memory.
    pool.linear_memory_keep_resident(1 << 20);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config)?;

    let mut plain = Linker::new(&engine);
    // Rust's std imports WASI (cli, io, clocks, random, filesystem, sockets)
    // even when a plugin uses none of it; the context is empty, so there are
    // no files, environment, arguments or sockets behind those imports. The
    // async flavour, so a call waiting in WASI can be cut off (`bounded`).
    wasmtime_wasi::p2::add_to_linker_async(&mut plain)?;
    bindings::expeditor::sink::host::add_to_linker::<State, HasSelf<State>>(&mut plain, |s| s)?;
    bindings::expeditor::sink::types::add_to_linker::<State, HasSelf<State>>(&mut plain, |s| s)?;
    let mut http = plain.clone();
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut http)?;

    let ticker = engine.clone();
    std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
        // Lives as long as the process: the engine is shared by every
        // wasm sink, old and reloaded, and a tick costs nothing.
        loop {
            std::thread::sleep(TICK);
            ticker.increment_epoch();
        }
    })?;
    Ok(Runtime { engine, plain, http })
}
