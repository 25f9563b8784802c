//! Loading a plugin: read, compile (or take from the cache), check that it is
//! built against our world, and call `init` once with its config.
//!
//! [`Plugin::load`] is everything `expeditor check` reports about a plugin,
//! and also the reload path: it always reads the file anew, so building the
//! sink again from a reloaded config picks up a replaced `.wasm`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Component, ResourceTableError};
use wasmtime::{Store, Trap};

use crate::bindings::{self, Event, SinkPre};
use crate::cache;
use crate::runtime::runtime;
use crate::state::{MAX_CALL_DATA, MAX_HOST_RESOURCES, State, Stopped, human_bytes, human_duration};
use crate::{Limits, WasmSinkConfig};

/// The WIT package (and version) this host implements: `plugins/wit`.
pub const WIT_PACKAGE: &str = "expeditor:sink@0.1.0";
const WIT_NAME: &str = "expeditor:sink";
const WIT_VERSION: (u64, u64, u64) = (0, 1, 0);

/// Why a plugin cannot be used; the message names the file and says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub kind: PluginErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginErrorKind {
    /// The file does not exist or cannot be read.
    Missing,
    /// Not WebAssembly, a core module instead of a component, or does not compile.
    NotComponent,
    /// Built against another version of `expeditor:sink`, or another world.
    WrongWorld,
    /// Imports `wasi:http` but the sink grants no hosts.
    HttpNotGranted,
    /// `init` returned an error, or trapped.
    Init,
    /// The WebAssembly runtime could not be started.
    Runtime,
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

fn err(kind: PluginErrorKind, message: impl Into<String>) -> PluginError {
    PluginError {
        kind,
        message: message.into(),
    }
}

/// A loaded, checked plugin, ready to be instantiated for a sink.
pub struct Plugin {
    pub(crate) cfg: WasmSinkConfig,
    sink: Arc<str>,
    pre: SinkPre<State>,
    engine: wasmtime::Engine,
    /// SHA-256 of the `.wasm`, for logs.
    pub(crate) hash: String,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("cfg", &self.cfg)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// One instance of a plugin, `init` done: a store and the bindings into it.
pub(crate) struct Instance {
    store: Store<State>,
    bindings: bindings::Sink,
}

/// A call that did not return normally; the instance cannot be used again.
#[derive(Debug, Clone)]
pub(crate) struct CallFailed(pub String);

impl Plugin {
    /// Reads the plugin file, compiles it (or loads the compiled form from
    /// `cfg.cache_dir`), checks its imports and exports against
    /// `expeditor:sink@0.1.0` and the sink's grants, and runs `init` with the
    /// config once (then `shutdown`) in a throwaway instance.
    ///
    /// Blocking (compiling takes up to a few hundred milliseconds): call it
    /// off the async runtime (`spawn_blocking`) when one is running.
    pub fn load(cfg: &WasmSinkConfig) -> Result<Plugin, PluginError> {
        let path = cfg.plugin.as_path();
        let shown = path.display();
        let rt = runtime().map_err(|e| err(PluginErrorKind::Runtime, e))?;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err(
                    PluginErrorKind::Missing,
                    format!("plugin file {shown} does not exist"),
                ));
            }
            Err(e) => {
                return Err(err(
                    PluginErrorKind::Missing,
                    format!("cannot read plugin file {shown}: {e}"),
                ));
            }
        };
        check_header(path, &bytes)?;
        let hash = cache::hash(&bytes);
        let started = Instant::now();
        let (component, source) =
            cache::component(&rt.engine, cfg.cache_dir.as_deref(), &hash, &bytes).map_err(|e| {
                err(
                    PluginErrorKind::NotComponent,
                    format!("{shown} does not compile: {e:#}"),
                )
            })?;
        tracing::debug!(
            sink = %cfg.name,
            plugin = %shown,
            sha256 = %hash,
            from = ?source,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin compiled",
        );
        let uses_http = check_imports(&rt.engine, &component, cfg)?;
        let linker = if uses_http { &rt.http } else { &rt.plain };
        let pre = linker.instantiate_pre(&component).map_err(|e| {
            err(
                PluginErrorKind::WrongWorld,
                format!("{shown} needs something expeditor does not provide: {e:#}"),
            )
        })?;
        let pre = SinkPre::new(pre).map_err(|e| {
            err(
                PluginErrorKind::WrongWorld,
                format!("{shown} does not implement the world sink of {WIT_PACKAGE} (plugins/wit): {e:#}"),
            )
        })?;
        let plugin = Plugin {
            cfg: cfg.clone(),
            sink: cfg.name.as_str().into(),
            pre,
            engine: rt.engine.clone(),
            hash,
        };
        // `init` judges the config now, so `expeditor check` reports it.
        let instance = plugin.instantiate(plugin.deadline()).map_err(|e| match e {
            InitFailed::Rejected(msg) => err(
                PluginErrorKind::Init,
                format!("{shown}: init rejected the config: {msg}"),
            ),
            InitFailed::Failed(CallFailed(msg)) => err(PluginErrorKind::Init, format!("{shown}: init failed: {msg}")),
        })?;
        plugin.shutdown(instance, plugin.deadline());
        Ok(plugin)
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &WasmSinkConfig {
        &self.cfg
    }

    /// When a call starting now runs out of time: the sink timeout from now.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.limits.timeout
    }

    /// A fresh instance with `init` done, by `deadline`.
    pub(crate) fn instantiate(&self, deadline: Instant) -> Result<Instance, InitFailed> {
        let mut store = State::store(&self.engine, State::new(&self.cfg, self.sink.clone()));
        let bindings = bounded(&mut store, "instantiating", deadline, async |s| {
            self.pre.instantiate_async(s).await
        })
        .map_err(InitFailed::Failed)?;
        let config = &self.cfg.config;
        match bounded(&mut store, "init", deadline, async |s| {
            bindings.call_init(s, config).await
        }) {
            Ok(Ok(())) => Ok(Instance { store, bindings }),
            Ok(Err(msg)) => Err(InitFailed::Rejected(own_words(&msg, &self.cfg.secrets))),
            Err(failed) => Err(InitFailed::Failed(failed)),
        }
    }

    /// One `deliver` call, by `deadline`. An `Err` means the instance
    /// trapped (or was stopped) and must be dropped.
    pub(crate) fn deliver(
        &self,
        instance: &mut Instance,
        events: &[Event],
        deadline: Instant,
    ) -> Result<Vec<Result<(), bindings::DeliveryError>>, CallFailed> {
        let bindings = &instance.bindings;
        bounded(&mut instance.store, "deliver", deadline, async |s| {
            bindings.call_deliver(s, events).await
        })
    }

    /// The shutdown contract: `shutdown` under the usual limits, by
    /// `deadline`, then the instance is dropped. A failure is logged, never
    /// propagated: the sink is going away either way.
    pub(crate) fn shutdown(&self, mut instance: Instance, deadline: Instant) {
        let bindings = &instance.bindings;
        if let Err(CallFailed(msg)) = bounded(&mut instance.store, "shutdown", deadline, async |s| {
            bindings.call_shutdown(s).await
        }) {
            tracing::warn!(sink = %self.cfg.name, error = %msg, "plugin shutdown failed");
        }
    }
}

/// Runs one call into the plugin under its limits, blocking the thread until
/// it returns or is stopped (callers are off the async runtime's workers).
/// The calls of one delivery (a fresh instance's `init`, then `deliver`)
/// share one deadline, so together they end within the sink timeout.
///
/// Epoch interruption stops guest code that computes too long or past the
/// deadline, but it never sees a call that waits in the host (a WASI sleep,
/// an HTTP answer): the timer here cuts that off at the sink timeout. Dropping
/// the call unwinds the plugin's stack with an error, so the instance is
/// unusable afterwards and the caller drops it, as after any trap.
fn bounded<R>(
    store: &mut Store<State>,
    call: &str,
    deadline: Instant,
    run: impl AsyncFnOnce(&mut Store<State>) -> wasmtime::Result<R>,
) -> Result<R, CallFailed> {
    State::start_call(store, deadline);
    // The timer is made inside: outside a runtime (`expeditor check`) there
    // is no clock to make it with until `in_tokio` has entered one.
    let outcome =
        wasmtime_wasi::runtime::in_tokio(async { tokio::time::timeout_at(deadline.into(), run(store)).await });
    match outcome {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(describe(store, Some(&e), call)),
        Err(_) => {
            store.data_mut().stopped = Some(Stopped::Timeout);
            Err(describe(store, None, call))
        }
    }
}

pub(crate) enum InitFailed {
    /// `init` returned an error: the config is wrong.
    Rejected(String),
    Failed(CallFailed),
}

impl InitFailed {
    pub fn message(&self) -> String {
        match self {
            InitFailed::Rejected(msg) => format!("plugin init rejected the config: {msg}"),
            InitFailed::Failed(CallFailed(msg)) => msg.clone(),
        }
    }
}

/// What stopped a call, in words for the delivery's error and the log.
fn describe(store: &Store<State>, e: Option<&wasmtime::Error>, call: &str) -> CallFailed {
    let limits: Limits = store.data().limits();
    let msg = match store.data().stopped {
        Some(Stopped::Cpu) => format!(
            "plugin {call} used more than its CPU limit of {} and was stopped",
            human_duration(limits.cpu)
        ),
        Some(Stopped::Timeout) => format!(
            "plugin {call} ran past the sink timeout of {} and was stopped",
            human_duration(limits.timeout)
        ),
        Some(Stopped::Memory) => format!(
            "plugin {call} reached its memory limit of {} and was stopped",
            human_bytes(limits.memory)
        ),
        None => match e {
            None => format!("plugin {call} was stopped"),
            Some(e) => match e.downcast_ref::<Trap>() {
                Some(Trap::UnreachableCodeReached) => format!("plugin {call} trapped (a panic or abort): {e}"),
                Some(trap) => format!("plugin {call} trapped: {trap}"),
                None => match host_limit(e) {
                    Some(limit) => format!("plugin {call} {limit} and was stopped"),
                    None => format!("plugin {call} failed: {e:#}"),
                },
            },
        },
    };
    CallFailed(msg)
}

/// The host-side limit an error says a plugin reached, in words.
fn host_limit(e: &wasmtime::Error) -> Option<String> {
    if e.chain()
        .any(|c| matches!(c.downcast_ref(), Some(ResourceTableError::Full)))
    {
        return Some(format!(
            "held more than {MAX_HOST_RESOURCES} host resources (streams, pollables, HTTP requests, headers, bodies) at once"
        ));
    }
    // wasmtime's own error type for it is private: its words are the mark.
    format!("{e:#}")
        .contains("fuel allocated for hostcalls has been exhausted")
        .then(|| {
            format!(
                "passed more than {} to the host in one call (its results, or one host call's arguments)",
                human_bytes(MAX_CALL_DATA)
            )
        })
}

/// Tells a component from a core module or something else entirely by the
/// header, for a clear message before the compiler's.
fn check_header(path: &Path, bytes: &[u8]) -> Result<(), PluginError> {
    let shown = path.display();
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(err(
            PluginErrorKind::NotComponent,
            format!("{shown} is not a WebAssembly file"),
        ));
    }
    // Version 1 with layer 0 is a core module; components are layer 1.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(err(
            PluginErrorKind::NotComponent,
            format!(
                "{shown} is a core WebAssembly module, not a component: build the plugin for the \
                 wasm32-wasip2 target (see plugins/README.md)"
            ),
        ));
    }
    Ok(())
}

/// Checks the component's imports: our package at a version we implement,
/// and `wasi:http` only when the sink grants hosts. Returns whether it
/// imports `wasi:http`.
fn check_imports(engine: &wasmtime::Engine, component: &Component, cfg: &WasmSinkConfig) -> Result<bool, PluginError> {
    let shown = cfg.plugin.display();
    let ty = component.component_type();
    let mut ours = false;
    let mut uses_http = false;
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix(WIT_NAME).and_then(|r| r.strip_prefix('/')) {
            ours = true;
            let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("");
            if !compatible(version) {
                return Err(err(
                    PluginErrorKind::WrongWorld,
                    format!(
                        "{shown} was built against {WIT_NAME}@{}, but this expeditor implements {WIT_PACKAGE}: \
                         rebuild the plugin against plugins/wit from this release",
                        if version.is_empty() { "(no version)" } else { version }
                    ),
                ));
            }
        } else if name.starts_with("wasi:http/") {
            uses_http = true;
        }
    }
    if !ours {
        return Err(err(
            PluginErrorKind::WrongWorld,
            format!("{shown} is not an expeditor plugin: it does not use {WIT_PACKAGE} (build it against plugins/wit)"),
        ));
    }
    if uses_http && cfg.allow_http.is_empty() {
        return Err(err(
            PluginErrorKind::HttpNotGranted,
            format!(
                "{shown} makes outbound HTTP requests (it imports wasi:http), but the sink grants no hosts: \
                 add allow_http = [\"host:port\", ...]"
            ),
        ));
    }
    Ok(uses_http)
}

/// Whether a plugin's `expeditor:sink` version is one we implement: the same
/// major version, or for 0.x the same minor (semver), and not newer.
fn compatible(version: &str) -> bool {
    let mut parts = version.split(['.', '-', '+']).map(|p| p.parse::<u64>());
    let (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch))) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let (our_major, our_minor, our_patch) = WIT_VERSION;
    if major != our_major {
        return false;
    }
    if major == 0 {
        minor == our_minor && patch <= our_patch
    } else {
        (minor, patch) <= (our_minor, our_patch)
    }
}

/// The most of a plugin's own message (an error it returns) the host keeps.
const OWN_WORDS_CHARS: usize = 1000;

/// A plugin's message as the host passes it on, to logs, the CLI and the
/// store: one line of at most [`OWN_WORDS_CHARS`] characters, so it cannot
/// forge log lines or flood the journal.
pub(crate) fn own_words(message: &str, secrets: &[String]) -> String {
    let secrets = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| s.len() >= MIN_SECRET_CHARS);
    let message = expeditor_api::message::redact(message, secrets);
    expeditor_api::message::one_line(&message, OWN_WORDS_CHARS).into_owned()
}

/// Shorter `${VAR}` values (a port, a flag) are not hidden: they would
/// blank out ordinary words of the message.
const MIN_SECRET_CHARS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    /// A plugin that echoes its config shows none of the `${VAR}` values in
    /// it (a newline in one does not split it past finding either).
    #[test]
    fn a_plugins_words_hide_the_configs_secrets() {
        let secrets = [
            "ftp://u:TOPSECRET@h/x".to_owned(),
            "TOPSECRET".to_owned(),
            "80".to_owned(),
        ];
        assert_eq!(
            own_words("endpoint \"ftp://u:TOPSECRET@h/x\" on port 80; key TOPSECRET", &secrets),
            "endpoint \"[redacted]\" on port 80; key [redacted]"
        );
        let multi = ["line1\nline2".to_owned()];
        assert_eq!(own_words("bad token line1\nline2!", &multi), "bad token [redacted]!");
    }

    /// A plugin's message cannot forge log lines or flood the journal.
    #[test]
    fn a_plugins_words_are_one_bounded_line() {
        assert_eq!(
            own_words("bad\n2026-12-07T00:00:00Z INFO forged", &[]),
            "bad 2026-12-07T00:00:00Z INFO forged"
        );
        let long = own_words(&"é".repeat(5000), &[]);
        assert_eq!(long.chars().count(), OWN_WORDS_CHARS + 3);
        assert!(long.ends_with("..."));
        assert_eq!(
            own_words(&"x".repeat(OWN_WORDS_CHARS), &[]),
            "x".repeat(OWN_WORDS_CHARS)
        );
    }

    #[test]
    fn versions() {
        assert!(compatible("0.1.0"));
        assert!(!compatible("0.2.0"));
        assert!(!compatible("0.1.1"), "newer than what we implement");
        assert!(!compatible("1.0.0"));
        assert!(!compatible(""));
    }

    #[test]
    fn headers() {
        let p = Path::new("x.wasm");
        assert_eq!(
            check_header(p, b"hello world").unwrap_err().kind,
            PluginErrorKind::NotComponent
        );
        let core = check_header(p, b"\0asm\x01\0\0\0").unwrap_err();
        assert!(core.message.contains("core WebAssembly module"), "{core}");
        assert!(check_header(p, b"\0asm\x0d\0\x01\0").is_ok());
    }
}
