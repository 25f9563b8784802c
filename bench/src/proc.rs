//! What Linux says about a process: memory (`/proc/PID/status`), CPU time
//! (`/proc/PID/stat`), bytes written to storage (`/proc/PID/io`), and
//! stopping it with SIGTERM.

use std::collections::BTreeMap;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// Resident set size now, bytes (`VmRSS`).
    pub rss: u64,
    /// Peak resident set size so far, bytes (`VmHWM`).
    pub peak_rss: u64,
    /// User + system CPU time so far.
    pub cpu: Duration,
}

impl ProcStats {
    pub fn read(pid: u32) -> Option<Self> {
        Self::read_path(&pid.to_string())
    }

    /// This process.
    pub fn me() -> Option<Self> {
        Self::read_path("self")
    }

    fn read_path(pid: &str) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            let n: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(n * 1024)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold spaces: fields are
        // counted from after its closing parenthesis (field 3 is the state).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let hz = rustix::param::clock_ticks_per_second().max(1);
        Some(Self {
            rss: kib("VmRSS:")?,
            peak_rss: kib("VmHWM:")?,
            cpu: Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz),
        })
    }
}

/// Bytes `pid` has caused to be written to storage so far (`write_bytes` in
/// `/proc/PID/io`: pages it dirtied, counted again each time it dirties a
/// page already written back; socket writes are not in it).
pub fn written(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:")?.trim().parse().ok())
}

/// CPU time so far of each thread of `pid`, summed by thread name
/// (`tokio-rt-worker`, `store-writer`, ...), from `/proc/PID/task/*/schedstat`.
pub fn threads(pid: u32) -> BTreeMap<String, Duration> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            *out.entry(comm.trim().to_string()).or_default() += Duration::from_nanos(ns);
        }
    }
    out
}

/// Sends SIGTERM.
pub fn terminate(child: &Child) -> std::io::Result<()> {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).map_err(std::io::Error::from)
}

/// Waits up to `limit` for the child to exit (polling, so the runtime keeps
/// serving meanwhile: a stopping expeditor still delivers to our sink server).
pub async fn wait_for(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// CPU time all cores spent busy since boot (`/proc/stat`: everything but
/// idle and iowait), to see what else ran during a row.
pub fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already
    // counted in user).
    let busy = v.get(0..3)?.iter().sum::<u64>() + v.get(5..8)?.iter().sum::<u64>();
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_nanos(busy.saturating_mul(1_000_000_000) / hz))
}

/// One line about the machine: cores, CPU model, kernel, load average.
pub fn machine_summary() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cores} cores, {model}, Linux {}, load average {}",
        kernel.trim(),
        load.join(" ")
    )
}
