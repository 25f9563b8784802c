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
//! which only the daemon's user may write; a directory or file that another
//! user owns or could write is not trusted, and the plugin is compiled
//! afresh instead.
//!
//! A file is touched each time it is loaded, and when a plugin is compiled
//! the files nothing has loaded for [`UNUSED_FOR`] (older plugins, older
//! expeditors) are removed, so the directory does not grow with every
//! plugin ever deployed.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::runtime::WASMTIME_VERSION;

/// How long a compiled file may go unloaded before a compile removes it.
const UNUSED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// How old a temporary file must be to be a crashed write's leftover, not
/// another process's write in progress.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

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
        if let Err(why) = trusted(dir).and_then(|()| trusted(&path)) {
            tracing::warn!(file = %path.display(), "compiled plugin in the cache is not trusted ({why}); compiling it afresh, and not caching it");
            return Ok((Component::new(engine, bytes)?, Source::Compiled));
        }
        match load(engine, &path) {
            Ok(c) => {
                touch(&path);
                return Ok((c, Source::Cache));
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "compiled plugin in the cache is unusable; compiling again")
            }
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    match store(dir, &path, &compiled) {
        Ok(()) => prune(dir, &path, SystemTime::now()),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot cache the compiled plugin; it will be compiled again at the next start")
        }
    }
    // From the bytes just compiled, not from the file: nothing on disk is
    // trusted that this call did not produce.
    Ok((load_bytes(engine, &compiled)?, Source::Compiled))
}

/// Whether a cache directory or file may be loaded from: ours, and
/// writable by nobody else.
fn trusted(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(format!("owned by uid {}, not this process's {me}", meta.uid()));
        }
        if meta.file_type().is_symlink() {
            return Err("a symbolic link".into());
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!("mode {:o} lets others write it", meta.mode() & 0o777));
        }
    }
    Ok(())
}

/// Marks a file as used now, so pruning keeps it (best effort).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Removes compiled files unused for [`UNUSED_FOR`] and temporary files a
/// crashed write left, other than `keep` (best effort: what cannot be read
/// or removed stays).
fn prune(dir: &Path, keep: &Path, now: SystemTime) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let limit = if name.starts_with(".tmp-") {
            ABANDONED_AFTER
        } else if name.ends_with(".cwasm") {
            UNUSED_FOR
        } else {
            continue;
        };
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        let idle = now.duration_since(modified).unwrap_or_default();
        if path != keep && idle > limit && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed compiled plugins unused for 30 days");
    }
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
        // Private whatever the umask: a file others may write is never
        // trusted (see `trusted`), so it would be compiled afresh for ever.
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn aged(path: &Path, age: Duration, now: SystemTime) {
        std::fs::write(path, b"x").unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(now - age).unwrap();
    }

    #[test]
    fn prune_removes_only_what_went_unused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        aged(&d.join("old-wasmtime48-a.cwasm"), 31 * day, now);
        aged(&d.join("recent-wasmtime48-a.cwasm"), 29 * day, now);
        aged(&d.join("kept-wasmtime48-a.cwasm"), 40 * day, now);
        aged(&d.join(".tmp-1-0"), 2 * Duration::from_secs(3600), now);
        aged(&d.join(".tmp-2-0"), Duration::from_secs(60), now);
        aged(&d.join("notes.txt"), 400 * day, now);

        prune(d, &d.join("kept-wasmtime48-a.cwasm"), now);

        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".tmp-2-0",
                "kept-wasmtime48-a.cwasm",
                "notes.txt",
                "recent-wasmtime48-a.cwasm"
            ]
        );
    }

    #[test]
    fn a_load_marks_the_file_used() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.cwasm");
        let now = SystemTime::now();
        aged(&file, Duration::from_secs(90 * 24 * 3600), now);
        touch(&file);
        prune(dir.path(), Path::new("/nothing"), SystemTime::now());
        assert!(file.exists(), "a file just loaded is not pruned");
    }

    /// Written private whatever the umask, so it is trusted when read back.
    #[cfg(unix)]
    #[test]
    fn a_stored_file_is_ours_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("plugin-cache");
        let file = cache.join("k.cwasm");
        store(&cache, &file, b"compiled").unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(trusted(&cache).and_then(|()| trusted(&file)), Ok(()));
    }

    #[cfg(unix)]
    #[test]
    fn only_our_own_unshared_files_are_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("plugin-cache");
        create_private_dir(&cache).unwrap();
        assert_eq!(trusted(&cache), Ok(()));

        let file = cache.join("k.cwasm");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(trusted(&file), Ok(()));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(trusted(&file).unwrap_err().contains("mode 666"));

        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(trusted(&cache).unwrap_err().contains("lets others write it"));

        let link = dir.path().join("link.cwasm");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(trusted(&link).unwrap_err().contains("symbolic link"));
        // Root owns "/": not this test's user unless it runs as root.
        if rustix::process::geteuid().as_raw() != 0 {
            assert!(trusted(Path::new("/")).unwrap_err().contains("owned by uid 0"));
        }
    }
}
