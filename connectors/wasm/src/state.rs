//! What one instance's store holds, and what the host does for the plugin.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::bindings::{self, Level};
use crate::egress::Egress;
use crate::runtime::TICK;
use crate::{Limits, WasmSinkConfig};

/// Longest log line a plugin may write; the rest is cut.
const MAX_LOG: usize = 4096;
/// Most log lines one call (an `init`, a `deliver`, a `shutdown`) may
/// write: a plugin logging in a loop would otherwise flood the journal
/// for as long as its CPU budget lasts. What is over is counted, and said
/// once.
const MAX_LOG_LINES_PER_CALL: u32 = 100;

/// Most bytes one call may hand the host: all of a `deliver`'s results
/// together, or one host call's arguments (a log line, an HTTP body write of
/// at most 1 MiB, headers). wasmtime copies what a plugin returns out of its
/// memory before we see it; without this bound a plugin could answer a
/// million results that all point at one large string, and the host would
/// copy it a million times (wasmtime's default bound is 128 MiB per call).
pub(crate) const MAX_CALL_DATA: usize = 8 << 20;

/// Most host resources (WASI streams and pollables, HTTP requests, headers
/// and bodies) an instance may hold at once. They live in the daemon's
/// memory, not the plugin's, so its `memory` limit does not count them; a
/// plugin that leaks them is stopped here, and its instance goes with them.
pub(crate) const MAX_HOST_RESOURCES: usize = 1000;

/// Most bytes the headers of one HTTP request or response may take (as the
/// host holds them): real ones are a few KiB.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// Why the last call was stopped, when the host stopped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    Cpu,
    Timeout,
    Memory,
}

pub(crate) struct State {
    sink: Arc<str>,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    egress: Egress,
    limits: Limits,
    /// Epoch ticks the current call may still run.
    ticks_left: u64,
    /// When the current call runs out of wall-clock time.
    deadline: Instant,
    /// Bytes of all the instance's linear memories together: the memory
    /// limit is the instance's, however many memories a component has.
    memory_used: usize,
    /// Log lines the current call may still write, plus one: at one, the
    /// next is the warning that the rest are dropped.
    log_lines_left: u32,
    pub stopped: Option<Stopped>,
}

impl State {
    pub fn new(cfg: &WasmSinkConfig, sink: Arc<str>) -> Self {
        // Nothing inherited: no environment, arguments, preopened
        // directories or stdio; no sockets or name lookups.
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(MAX_HEADER_BYTES);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        Self {
            egress: Egress::new(sink.clone(), cfg.allow_http.clone(), cfg.limits.timeout),
            sink,
            wasi,
            http,
            table,
            limits: cfg.limits,
            ticks_left: 0,
            deadline: Instant::now(),
            memory_used: 0,
            log_lines_left: MAX_LOG_LINES_PER_CALL + 1,
            stopped: None,
        }
    }

    /// A store with the limits and the epoch callback in place.
    pub fn store(engine: &wasmtime::Engine, state: State) -> Store<State> {
        let mut store = Store::new(engine, state);
        store.limiter(|s| s);
        store.set_hostcall_fuel(MAX_CALL_DATA);
        store.epoch_deadline_callback(on_tick);
        store
    }

    /// Arms the CPU budget for one call, and the time it must end by.
    pub fn start_call(store: &mut Store<State>, deadline: Instant) {
        let s = store.data_mut();
        s.ticks_left = (s.limits.cpu.as_nanos() / TICK.as_nanos()).max(1) as u64;
        s.deadline = deadline;
        s.log_lines_left = MAX_LOG_LINES_PER_CALL + 1;
        s.stopped = None;
        store.set_epoch_deadline(1);
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

/// Called when the epoch passes the store's deadline while the plugin runs:
/// once per tick of guest execution (time in host calls, such as waiting for
/// an HTTP answer, is not counted against the CPU budget).
fn on_tick(mut cx: StoreContextMut<'_, State>) -> wasmtime::Result<UpdateDeadline> {
    let s = cx.data_mut();
    if Instant::now() >= s.deadline {
        s.stopped = Some(Stopped::Timeout);
        return Ok(UpdateDeadline::Interrupt);
    }
    if s.ticks_left == 0 {
        s.stopped = Some(Stopped::Cpu);
        return Ok(UpdateDeadline::Interrupt);
    }
    s.ticks_left -= 1;
    Ok(UpdateDeadline::Continue(1))
}

impl ResourceLimiter for State {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.memory_used.saturating_sub(current).saturating_add(desired);
        if total > self.limits.memory {
            self.stopped = Some(Stopped::Memory);
            // An error traps at once with a readable reason; returning false
            // would make a Rust guest abort with a bare `unreachable`.
            return Err(wasmtime::format_err!(
                "plugin memory limit of {} reached (it asked for {total} bytes in all)",
                human_bytes(self.limits.memory)
            ));
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A plugin's log message as one line (breaks written as `\n`), so it
/// cannot write lines that look like the daemon's or another sink's.
fn one_line(message: String) -> String {
    if message.contains(['\n', '\r']) {
        message.replace('\n', "\\n").replace('\r', "\\r")
    } else {
        message
    }
}

pub(crate) fn human_bytes(n: usize) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{}GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

pub(crate) fn human_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}

impl bindings::expeditor::sink::types::Host for State {}

impl bindings::expeditor::sink::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        let sink = &*self.sink;
        match self.log_lines_left {
            0 => return,
            1 => {
                self.log_lines_left = 0;
                tracing::warn!(
                    target: "expeditor::plugin",
                    sink = %sink,
                    "the plugin reached its limit of {MAX_LOG_LINES_PER_CALL} log lines in one call; the rest of this call's are dropped"
                );
                return;
            }
            _ => self.log_lines_left -= 1,
        }
        let mut message = one_line(message);
        if message.len() > MAX_LOG {
            let mut cut = MAX_LOG;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        match level {
            Level::Trace => tracing::trace!(target: "expeditor::plugin", sink = %sink, "{message}"),
            Level::Debug => tracing::debug!(target: "expeditor::plugin", sink = %sink, "{message}"),
            Level::Info => tracing::info!(target: "expeditor::plugin", sink = %sink, "{message}"),
            Level::Warn => tracing::warn!(target: "expeditor::plugin", sink = %sink, "{message}"),
            Level::Error => tracing::error!(target: "expeditor::plugin", sink = %sink, "{message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_message_is_one_line() {
        assert_eq!(one_line("a\nb\r\nc".into()), "a\\nb\\r\\nc");
        assert_eq!(one_line("plain".into()), "plain");
    }

    /// The memory limit is the instance's: two memories of a component
    /// count together, and what one gives up is not counted twice.
    #[test]
    fn memories_count_together() {
        let cfg = WasmSinkConfig {
            name: "s".into(),
            plugin: "s.wasm".into(),
            config: "{}".into(),
            allow_http: Vec::new(),
            limits: Limits {
                memory: 32 << 20,
                ..Limits::default()
            },
            max_batch: 1,
            cache_dir: None,
            secrets: Vec::new(),
        };
        let mut s = State::new(&cfg, "s".into());
        assert!(s.memory_growing(0, 16 << 20, None).unwrap(), "the first memory");
        assert!(s.memory_growing(16 << 20, 20 << 20, None).unwrap(), "it grows");
        let second = s.memory_growing(0, 16 << 20, None).unwrap_err();
        assert!(second.to_string().contains("32MiB"), "{second}");
        assert_eq!(s.stopped, Some(Stopped::Memory));
        assert!(s.memory_growing(0, 12 << 20, None).unwrap(), "within what is left");
    }
}
