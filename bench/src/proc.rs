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
    let v = machine_ticks()?;
    // user nice system idle iowait irq softirq steal (guest time is already
    // counted in user).
    Some(ticks(
        v.get(0..3)?.iter().sum::<u64>() + v.get(5..8)?.iter().sum::<u64>(),
    ))
}

/// CPU time the host took from this VM so far (`steal` in `/proc/stat`).
fn machine_steal() -> Option<Duration> {
    Some(ticks(*machine_ticks()?.get(7)?))
}

/// The machine's CPU time so far by kind, in clock ticks (`cpu` in `/proc/stat`).
fn machine_ticks() -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    Some(line.split_whitespace().filter_map(|x| x.parse().ok()).collect())
}

fn ticks(n: u64) -> Duration {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_nanos(n.saturating_mul(1_000_000_000) / hz)
}

/// A wake-up this much later than asked is a stall of the whole machine (or
/// of this bench), not a scheduling delay: a CFS slice is a few ms.
pub const STALL: Duration = Duration::from_millis(20);

/// Moments the machine stopped during a row, seen from outside the target:
/// a thread of this bench that sleeps 1 ms at a time and notes each wake-up
/// [`STALL`] or more late, and the CPU time the host took meanwhile. When
/// the generator's open loop sends late, this says whether everything stood
/// still or only the target.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stalls {
    pub count: u32,
    pub longest: Duration,
    /// Host steal, in cores over the row.
    pub steal_cores: f64,
}

pub struct StallWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watcher: std::thread::JoinHandle<(u32, Duration)>,
    steal: Option<Duration>,
    started: Instant,
}

impl StallWatch {
    pub fn start() -> std::io::Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            std::thread::Builder::new().name("stall-watch".into()).spawn(move || {
                let (mut count, mut longest) = (0, Duration::ZERO);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let asked = Instant::now();
                    std::thread::sleep(Duration::from_millis(1));
                    let late = asked.elapsed().saturating_sub(Duration::from_millis(1));
                    if late >= STALL {
                        count += 1;
                        longest = longest.max(late);
                    }
                }
                (count, longest)
            })?
        };
        Ok(Self {
            stop,
            watcher,
            steal: machine_steal(),
            started: Instant::now(),
        })
    }

    pub fn stop(self) -> Stalls {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let steal = match (self.steal, machine_steal()) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() / wall,
            _ => 0.0,
        };
        let (count, longest) = self.watcher.join().unwrap_or_default();
        Stalls {
            count,
            longest,
            steal_cores: steal,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole process frozen for 150 ms (SIGSTOP from a child, then
    /// SIGCONT), as a paused VM freezes everything: the watch sees it.
    #[test]
    fn a_frozen_process_is_one_stall_of_about_that_long() {
        let watch = StallWatch::start().expect("start the watch");
        std::thread::sleep(Duration::from_millis(50));
        let me = std::process::id();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("kill -STOP {me}; sleep 0.15; kill -CONT {me}"))
            .status()
            .expect("run sh");
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(50));
        let stalls = watch.stop();
        assert!(stalls.count >= 1, "{stalls:?}");
        assert!(
            stalls.longest >= Duration::from_millis(120) && stalls.longest < Duration::from_secs(2),
            "{stalls:?}"
        );
    }
}
