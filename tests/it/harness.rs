//! The daemon under test: the real binary, on free loopback ports, with its
//! store in a temp dir that lives as long as the [`Daemon`].
//!
//! A test writes its whole config with three placeholders, which
//! [`Daemon::start`] fills in: `{INGEST}` and `{ADMIN}` (free `127.0.0.1`
//! ports) and `{DIR}` (the temp dir). [`base_config`] writes the usual
//! `[server]`, `[admin]` and `[store]` sections with them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::Value;
use tempfile::TempDir;

use crate::vendor;

pub const BIN: &str = env!("CARGO_BIN_EXE_expeditor");
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `[server]`, `[admin]` and `[store]` on the placeholders; `server_extra` is
/// appended to `[server]` (e.g. `max_body = "1KiB"`).
pub fn base_config(server_extra: &str) -> String {
    format!(
        r#"[server]
listen = "{{INGEST}}"
{server_extra}

[admin]
listen = "{{ADMIN}}"

[store]
path = "{{DIR}}/store"
"#
    )
}

/// The usual sources plus one `http` sink `hook` at `url` that every event
/// is routed to, with fast retries; `server_extra` as in [`base_config`].
pub fn one_sink_config(server_extra: &str, url: &str) -> String {
    format!(
        r#"{base}
{sources}
[sinks.hook]
type = "http"
url = "{url}"
timeout = "2s"
retry = {{ max_attempts = 3, initial = "50ms", max = "200ms" }}

[[routes]]
name = "everything"
sinks = ["hook"]
"#,
        base = base_config(server_extra),
        sources = vendor::SOURCES,
    )
}

/// A free `127.0.0.1` port for a process this test starts to bind.
///
/// Found by binding and releasing it, so another socket can take it before
/// the daemon binds. A port the kernel handed out for `bind(0)` can be handed
/// again at once to any outgoing connection or `bind(0)` of the parallel
/// tests (seen in CI: "Address already in use"). Ports below the kernel's
/// ephemeral range are never handed out that way, and a process-wide counter
/// keeps this suite's own picks apart; where the range leaves no room below
/// it, the kernel's pick it is.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if let Some(span) = ephemeral_low.checked_sub(LOWEST).filter(|&s| s > 1_000) {
        // Apart from another suite running at the same time, most likely.
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let port = LOWEST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
                return listener.local_addr().expect("local addr");
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

pub fn http_client() -> reqwest::Client {
    static PROVIDER: Once = Once::new();
    // reqwest is built with `rustls-no-provider`; plain http never uses it,
    // but building a client requires one.
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// An HTTP answer from the daemon.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("reply body is not JSON ({e}): {:?}", self.body))
    }
}

pub struct Daemon {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
    /// `[admin] token`, sent as a bearer token by [`Daemon::api`].
    pub admin_token: Option<String>,
    child: Option<Child>,
    runs: usize,
    http: reqwest::Client,
    /// Extra environment for the daemon (`NOTIFY_SOCKET`, `EXPEDITOR_LOG`, ...).
    env: Vec<(String, String)>,
    /// A limit on the size of any file the daemon writes (`RLIMIT_FSIZE`,
    /// soft; `SIGXFSZ` ignored): a write past it fails as on a full disk.
    file_size_limit: Option<u64>,
}

impl Daemon {
    /// Writes the config (placeholders filled in), runs `expeditor run`, and
    /// waits until `/healthz` answers 200 and the ingest port accepts.
    pub async fn start(config: &str) -> Daemon {
        Self::start_with_env(config, &[]).await
    }

    /// [`Daemon::start`] with extra environment variables for the daemon.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Daemon {
        Self::launch(config, env, None).await
    }

    /// Starts like [`Daemon::start`], with every file the daemon writes
    /// limited to `bytes` ([`Daemon::lift_file_size_limit`] lifts it).
    pub async fn start_with_file_size_limit(config: &str, bytes: u64) -> Daemon {
        Self::launch(config, &[], Some(bytes)).await
    }

    async fn launch(config: &str, env: &[(&str, &str)], file_size_limit: Option<u64>) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let ingest = free_addr();
        let admin = free_addr();
        let config = config
            .replace("{INGEST}", &ingest.to_string())
            .replace("{ADMIN}", &admin.to_string())
            .replace("{DIR}", dir.path().to_str().expect("utf-8 temp dir"));
        let admin_token = config
            .lines()
            .find_map(|line| line.strip_prefix("token = \"")?.split('"').next())
            .map(str::to_owned);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut daemon = Daemon {
            dir,
            config_path,
            ingest,
            admin,
            admin_token,
            child: None,
            runs: 0,
            http: http_client(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            file_size_limit,
        };
        daemon.spawn();
        daemon.wait_ready().await;
        daemon
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.runs += 1;
        let out = std::fs::File::create(self.dir.path().join(format!("run-{}.out", self.runs))).expect("log");
        let err = std::fs::File::create(self.dir.path().join(format!("run-{}.err", self.runs))).expect("log");
        let mut command = match self.file_size_limit {
            None => Command::new(BIN),
            // The shell leaves SIGXFSZ ignored, which exec keeps, so a write
            // past the limit fails with EFBIG instead of killing the daemon;
            // the hard limit stays unlimited so the test can lift the soft one.
            Some(bytes) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"trap '' XFSZ; exec prlimit --fsize="$0":unlimited -- "$@""#)
                    .arg(bytes.to_string())
                    .arg(BIN);
                c
            }
        };
        let child = command
            .arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn expeditor run");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("try_wait") {
                self.child = None;
                panic!("expeditor run exited early with {status}\n{}", self.log());
            }
            let healthy = self
                .http
                .get(format!("http://{}/healthz", self.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if healthy && tokio::net::TcpStream::connect(self.ingest).await.is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!("expeditor not ready within {READY_TIMEOUT:?}\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends a signal by name (`TERM`, `HUP`, ...) to the running daemon.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("daemon running").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Waits for the daemon to exit by itself and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("daemon running")
                .try_wait()
                .expect("try_wait")
            {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("expeditor did not exit within {timeout:?}\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replaces the config file (same placeholders as [`Daemon::start`]).
    pub fn rewrite_config(&self, config: &str) {
        let config = config
            .replace("{INGEST}", &self.ingest.to_string())
            .replace("{ADMIN}", &self.admin.to_string())
            .replace("{DIR}", self.dir.path().to_str().expect("utf-8 temp dir"));
        std::fs::write(&self.config_path, config).expect("rewrite config");
    }

    /// Starts the daemon again after it exited (same config, ports, store).
    pub async fn start_again(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// Lets the running daemon write again (`prlimit --pid`).
    pub fn lift_file_size_limit(&mut self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let out = Command::new("prlimit")
            .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
            .output()
            .expect("run prlimit");
        assert!(
            out.status.success(),
            "prlimit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.file_size_limit = None;
    }

    /// Same config, same ports, same store.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready().await;
    }

    /// Everything the daemon wrote to stdout and stderr, every run.
    pub fn log(&self) -> String {
        let mut log = String::new();
        for run in 1..=self.runs {
            for stream in ["out", "err"] {
                let path = self.dir.path().join(format!("run-{run}.{stream}"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                log.push_str(&format!("--- run {run} std{stream} ---\n{text}"));
            }
        }
        log
    }

    // ---- ingest ----------------------------------------------------------

    /// Any request to the ingest listener.
    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(method, format!("http://{}{path}", self.ingest))
            .body(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", self.log()));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.expect("reply body");
        Reply { status, headers, body }
    }

    /// `POST /webhooks/{source}` with exactly these headers and bytes.
    pub async fn post(&self, source: &str, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Reply {
        self.request("POST", &format!("/webhooks/{source}"), headers, body.into())
            .await
    }

    /// A CrumbPOS event, signed now, as JSON.
    pub async fn post_crumb(&self, event: &Value) -> Reply {
        let body = serde_json::to_vec(event).expect("json");
        let sig = vendor::crumb_signature(vendor::CRUMB_SECRET, vendor::now(), &body);
        self.post(
            "crumb",
            &[("content-type", "application/json"), ("crumb-signature", &sig)],
            body,
        )
        .await
    }

    /// A Crave event, signed, as JSON.
    pub async fn post_crave(&self, event: &Value) -> Reply {
        let body = serde_json::to_vec(event).expect("json");
        let sig = vendor::crave_signature(vendor::CRAVE_SECRET, &body);
        self.post(
            "crave",
            &[("content-type", "application/json"), ("x-crave-signature", &sig)],
            body,
        )
        .await
    }

    // ---- admin API: what the store holds --------------------------------

    pub async fn api(&self, path_and_query: &str) -> Value {
        let mut req = self.http.get(format!("http://{}{path_and_query}", self.admin));
        if let Some(token) = &self.admin_token {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("admin {path_and_query}: {e}"));
        let status = resp.status();
        let body = resp.text().await.expect("admin body");
        assert_eq!(status, 200, "admin {path_and_query} answered {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin {path_and_query}: not JSON ({e}): {body}"))
    }

    /// `GET /api/events`: every stored event.
    /// A GET on the admin listener (with the token), as text.
    pub async fn api_text(&self, path: &str) -> String {
        let mut req = self.http.get(format!("http://{}{path}", self.admin));
        if let Some(t) = &self.admin_token {
            req = req.bearer_auth(t);
        }
        req.send()
            .await
            .expect("admin request")
            .text()
            .await
            .expect("admin body")
    }

    pub async fn events(&self) -> Vec<Value> {
        list(self.api("/api/events?limit=1000").await, "events")
    }

    /// `GET /api/deliveries`: every delivery.
    pub async fn deliveries(&self) -> Vec<Value> {
        list(self.api("/api/deliveries?limit=1000").await, "deliveries")
    }

    /// Waits (up to 15 s) until the delivery of `source:event_id` to `sink`
    /// has `status`; returns it.
    pub async fn wait_delivery(&self, source: &str, event_id: &str, sink: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mine = self
                .deliveries()
                .await
                .into_iter()
                .find(|d| d["source"] == source && d["event_id"] == event_id && d["sink"] == sink);
            match mine {
                Some(d) if d["status"] == status => return d,
                _ if Instant::now() > deadline => {
                    panic!("delivery {source}:{event_id} -> {sink} never became {status}; last seen: {mine:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }

    // ---- CLI ---------------------------------------------------------------

    /// `expeditor --config <this daemon's config> ARGS...`.
    /// It runs with the daemon's extra environment: the CLI loads the same
    /// config, `${VAR}`s included.
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        tokio::task::spawn_blocking(move || cmd.output().expect("run expeditor"))
            .await
            .expect("cli task")
    }

    /// `cli(args)`, asserting success and parsing stdout as JSON.
    pub async fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args).await;
        assert_success(&out, args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "expeditor {args:?}: stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "==== expeditor log ({}) ====\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
    }
}

fn list(mut body: Value, key: &str) -> Vec<Value> {
    match body[key].take() {
        Value::Array(items) => items,
        other => panic!("expected {{\"{key}\": [...]}}, got {key} = {other}"),
    }
}

/// Runs the binary off the async runtime so the fake sink keeps serving.
pub async fn run_cli(config: &Path, cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output().expect("run expeditor"))
        .await
        .expect("cli task")
}

pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "expeditor {args:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// stdout and stderr together, for messages whichever stream they use.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The ports handed to daemons are distinct, bindable, and never from the
/// kernel's ephemeral range (which any outgoing connection may take).
#[test]
fn free_addrs_are_distinct_and_below_the_ephemeral_range() {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read the ephemeral port range")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("its low end");
    let addrs: Vec<SocketAddr> = (0..200).map(|_| free_addr()).collect();
    let distinct: std::collections::HashSet<_> = addrs.iter().collect();
    assert_eq!(distinct.len(), addrs.len(), "a port handed out twice: {addrs:?}");
    if low > 11_000 {
        let ephemeral: Vec<_> = addrs.iter().filter(|a| a.port() >= low).collect();
        assert!(
            ephemeral.is_empty(),
            "ports from the ephemeral range (from {low}): {ephemeral:?}"
        );
    }
    for a in &addrs[..5] {
        std::net::TcpListener::bind(a).unwrap_or_else(|e| panic!("{a} is not free: {e}"));
    }
}
