//! The `wasm` sink: a plugin, written in any language that compiles to a
//! WebAssembly component against `plugins/wit` (`expeditor:sink@0.1.0`), run
//! in wasmtime's sandbox.
//!
//! # Layout
//! - `config`: [`WasmSinkConfig`], what the daemon's config module hands over:
//!   the plugin file, its `[sinks.X.config]` as JSON, `allow_http` grants and
//!   [`Limits`].
//! - `runtime`: the one wasmtime engine of the process (pooling allocator,
//!   epoch interruption and its ticker thread) and the two linkers: WASI with
//!   an empty context plus our `host` interface, and that plus `wasi:http`.
//! - `cache`: compiled components on disk, keyed by the file's hash and the
//!   engine's compatibility hash, so a restart does not recompile.
//! - `plugin`: [`Plugin::load`] reads, compiles (or loads from the cache) and
//!   checks a plugin, and calls its `init` once: everything `expeditor check`
//!   reports. Loading again is how a reload picks up a replaced `.wasm`.
//! - `state`: what a store holds: WASI and HTTP contexts, the memory limiter,
//!   the CPU budget of the current call, and the host's `log`.
//! - `egress`: `allow_http`: the only hosts a plugin may reach.
//! - `sink`: [`WasmSink`], the [`expeditor_api::Sink`]: reused instances,
//!   calls off the async runtime, a fresh instance after any trap.

mod bindings;
mod cache;
mod config;
mod egress;
mod plugin;
mod runtime;
mod sink;
mod state;

#[cfg(test)]
mod tests;

pub use config::{Grant, Limits, WasmSinkConfig, parse_grant};
pub use plugin::{Plugin, PluginError, PluginErrorKind, WIT_PACKAGE};
pub use sink::WasmSink;

/// The most instances one config's wasm sinks may keep together (one per
/// delivery in flight). Half the process's pool: during a reload the old
/// sinks finish their deliveries while the new ones start theirs, and each
/// load of a plugin also makes an instance to run `init` on.
pub const MAX_SINK_INSTANCES: usize = runtime::MAX_INSTANCES as usize / 2 - 50;
