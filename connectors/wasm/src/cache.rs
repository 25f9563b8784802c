//! Compiled components on disk.
//!
//! Compiling a plugin takes a few hundred milliseconds; loading the compiled
//! form takes a fraction of one. The file name is the key: the SHA-256 of the
//! `.wasm`, the wasmtime version and a hash of the engine's compilation
//! settings (`Engine::precompile_compatibility_hash`), so a changed plugin, a
//! new expeditor or different settings never load a stale file.
//!
//! Loading a compiled file is `unsafe` in wasmtime: it trusts that the file is
//! its own output. So only files in our cache directory, under exactly the
//! key we computed, written by us (created with a temporary name, then
//! renamed in), are ever loaded. The directory lives under `store.path`,
//! which only the daemon's user may write.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::runtime::WASMTIME_VERSION;

/// Feeds `std::hash::Hash` into SHA-256, for a key that is stable across
/// runs (the std hashers promise no such thing).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        // Only `write` is used; the digest is taken from the inner state.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The cache file name for a component with SHA-256 `wasm_hash`.
pub(crate) fn key(engine: &Engine, wasm_hash: &str) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
    let engine_hash = hex::encode(&hasher.0.finalize()[..8]);
    format!("{wasm_hash}-wasmtime{WASMTIME_VERSION}-{engine_hash}.cwasm")
}

/// How a component was obtained, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Cache,
    Compiled,
}

/// The component for `bytes`: from the cache when it holds it, else compiled
/// (and stored, best effort).
pub(crate) fn component(
    engine: &Engine,
    dir: Option<&Path>,
    wasm_hash: &str,
    bytes: &[u8],
) -> wasmtime::Result<(Component, Source)> {
    let Some(dir) = dir else {
        return Ok((Component::new(engine, bytes)?, Source::Compiled));
    };
    let path = dir.join(key(engine, wasm_hash));
    if path.is_file() {
        match load(engine, &path) {
            Ok(c) => return Ok((c, Source::Cache)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "compiled plugin in the cache is unusable; compiling again")
            }
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    if let Err(e) = store(dir, &path, &compiled) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot cache the compiled plugin; it will be compiled again at the next start");
    }
    // From the bytes just compiled, not from the file: nothing on disk is
    // trusted that this call did not produce.
    Ok((load_bytes(engine, &compiled)?, Source::Compiled))
}

#[allow(unsafe_code)]
fn load(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: `path` is in our cache directory under the exact key of this
    // engine and this `.wasm`, and only `store` below writes such files (see
    // the module docs). wasmtime checks the engine compatibility itself.
    unsafe { Component::deserialize_file(engine, path) }
}

#[allow(unsafe_code)]
fn load_bytes(engine: &Engine, compiled: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `compiled` was produced by `engine.precompile_component` in
    // this process, moments ago.
    unsafe { Component::deserialize(engine, compiled) }
}

fn store(dir: &Path, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
    create_private_dir(dir)?;
    let tmp: PathBuf = dir.join(format!(".tmp-{}-{}", std::process::id(), fastrand_suffix()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(compiled)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Distinct per call within a process (two sinks of one plugin may compile
/// at the same time).
fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// SHA-256 of a plugin file, hex.
pub(crate) fn hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
