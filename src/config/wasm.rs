//! `type = "wasm"` sinks: the keys, and loading the plugin itself, so that
//! `expeditor check` reports a missing file, something that is not a
//! component, a plugin built against another WIT world or version, and an
//! `init` that rejects its config, each naming the sink and the file.
//!
//! Loading reads the `.wasm` anew every time (compiled forms are cached by
//! content hash), so reloading the config and building the sinks again is
//! what picks up a replaced plugin. It is blocking (compiling a plugin takes
//! up to a few hundred milliseconds the first time): a reload running on the
//! async runtime should call [`super::load`] in `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use expeditor_wasm::{Limits, Plugin, PluginErrorKind, WasmSinkConfig};
use toml::Spanned;
use toml::de::DeValue;

use super::raw::RawWasmSink;
use super::{Cx, SinkKind, SinkSpec, StoreBackend, StoreConfig, valid_name};

/// `<store.path>/plugin-cache` for the embedded store. A PostgreSQL store has
/// no local directory of ours: plugins are compiled at each start.
pub(super) fn plugin_cache(store: &StoreConfig) -> Option<PathBuf> {
    match &store.backend {
        StoreBackend::Sqlite { path } => Some(path.join("plugin-cache")),
        StoreBackend::Postgres { .. } => None,
    }
}

/// `plugin = "NAME"` is `plugins/NAME.wasm` next to the config file; anything
/// else (`"./build/x.wasm"`, `"/opt/plugins/x.wasm"`) is a path, relative to
/// the config file's directory.
fn plugin_path(base: &Path, plugin: &str) -> PathBuf {
    if valid_name(plugin) {
        base.join("plugins").join(format!("{plugin}.wasm"))
    } else {
        base.join(plugin)
    }
}

impl Cx<'_> {
    pub(super) fn wasm_sink(
        &mut self,
        name: &str,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        base: &Path,
    ) -> Option<SinkSpec> {
        let r: RawWasmSink = self.typed(value, key)?;
        let common = sink_common!(self, key, r);
        let plugin = self.resolve(&r.plugin, &format!("{key}.plugin")).and_then(|p| {
            if p.trim().is_empty() {
                self.error_at(
                    r.plugin.span(),
                    &format!("{key}.plugin"),
                    "is empty; name a plugin (plugins/NAME.wasm) or give a path",
                );
                return None;
            }
            Some(plugin_path(base, p.trim()))
        });
        let mut grants = Some(Vec::new());
        if let Some(list) = &r.allow_http {
            for (i, entry) in list.get_ref().iter().enumerate() {
                let k = format!("{key}.allow_http[{i}]");
                let parsed = self
                    .resolve(entry, &k)
                    .and_then(|v| match expeditor_wasm::parse_grant(&v) {
                        Ok(g) => Some(g),
                        Err(msg) => {
                            self.error_at(entry.span(), &k, msg);
                            None
                        }
                    });
                match (parsed, grants.as_mut()) {
                    (Some(g), Some(list)) => list.push(g),
                    _ => grants = None,
                }
            }
        }
        let memory = self.size(r.memory.as_ref(), &format!("{key}.memory"), Limits::DEFAULT_MEMORY);
        if let (Some(m), Some(s)) = (memory, r.memory.as_ref())
            && !(1 << 20..=Limits::MAX_MEMORY).contains(&m)
        {
            self.error_at(
                s.span(),
                &format!("{key}.memory"),
                "must be between 1MiB and 4GiB (a plugin's memory is 32-bit)",
            );
        }
        let cpu = self.duration(r.cpu.as_ref(), &format!("{key}.cpu"), Limits::DEFAULT_CPU);
        if let (Some(c), Some(s)) = (cpu, r.cpu.as_ref())
            && !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&c)
        {
            self.error_at(s.span(), &format!("{key}.cpu"), "must be between 10ms and 10m");
        }
        let max_batch = self.int(r.max_batch.as_ref(), &format!("{key}.max_batch"), 1, 1..1001);
        let mut secrets = Vec::new();
        let config = match value.get_ref() {
            DeValue::Table(t) => match t.get("config") {
                Some(c) if matches!(c.get_ref(), DeValue::Table(_)) => {
                    secrets = self.secrets_in(c);
                    self.json_value(&format!("{key}.config"), c).map(|j| j.to_string())
                }
                Some(c) => {
                    self.error_at(
                        c.span(),
                        &format!("{key}.config"),
                        "must be a table: [sinks.NAME.config]",
                    );
                    None
                }
                None => Some("{}".to_owned()),
            },
            _ => None,
        };
        let common = common?;
        let cfg = WasmSinkConfig {
            name: name.to_string(),
            plugin: plugin?,
            config: config?,
            allow_http: grants?,
            limits: Limits {
                memory: memory.filter(|m| (1 << 20..=Limits::MAX_MEMORY).contains(m))?,
                cpu: cpu.filter(|c| (Duration::from_millis(10)..=Duration::from_secs(600)).contains(c))?,
                timeout: common.timeout,
            },
            max_batch: max_batch? as usize,
            cache_dir: self.plugin_cache.clone(),
            secrets,
        };
        // Only a sink whose keys are all valid gets its plugin loaded: one
        // problem at a time, and no `init` with a half-read config.
        match Plugin::load(&cfg) {
            Ok(plugin) => Some(SinkSpec {
                name: name.to_string(),
                common,
                kind: SinkKind::Wasm(Arc::new(plugin)),
            }),
            Err(e) => {
                let config_span = match value.get_ref() {
                    DeValue::Table(t) => t.get("config").map(|c| c.span()),
                    _ => None,
                };
                let (k, span) = match (e.kind, config_span) {
                    (PluginErrorKind::Init, Some(span)) => (format!("{key}.config"), span),
                    _ => (format!("{key}.plugin"), r.plugin.span()),
                };
                self.error_at(span, &k, e.message);
                None
            }
        }
    }
}
