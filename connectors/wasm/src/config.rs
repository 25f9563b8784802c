//! What a `wasm` sink is built from.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// One `[sinks.NAME]` with `type = "wasm"`, validated by the daemon's config
/// module.
#[derive(Clone)]
pub struct WasmSinkConfig {
    /// The sink name, for logs and error messages.
    pub name: String,
    /// The component file (`plugins/NAME.wasm`, or the path the config gave).
    pub plugin: PathBuf,
    /// `[sinks.NAME.config]` as a JSON object, handed to the plugin's `init`.
    /// May hold resolved secrets: never logged.
    pub config: String,
    /// `allow_http`: where the plugin may send HTTP requests. Empty means no
    /// `wasi:http` at all: a plugin that imports it is refused at load.
    pub allow_http: Vec<Grant>,
    pub limits: Limits,
    /// Most events per `deliver` call.
    pub max_batch: usize,
    /// Where compiled components are kept (`<store.path>/plugin-cache`);
    /// `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// The values `${VAR}`s in `config` resolved to: a plugin's own words
    /// (its `init`'s refusal, a delivery's error) show none of them, as a
    /// plugin may echo the config it was given.
    pub secrets: Vec<String>,
}

impl fmt::Debug for WasmSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `config` may carry secrets (`api_key = "${KEY}"`).
        f.debug_struct("WasmSinkConfig")
            .field("name", &self.name)
            .field("plugin", &self.plugin)
            .field("allow_http", &self.allow_http)
            .field("limits", &self.limits)
            .field("max_batch", &self.max_batch)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// What one plugin call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory of one instance, in bytes (`memory = "64MiB"`).
    pub memory: usize,
    /// CPU time of one call (`init`, `deliver`, `shutdown`), measured in
    /// epoch ticks while the plugin runs: time spent waiting for an HTTP
    /// answer does not count (`cpu = "1s"`).
    pub cpu: Duration,
    /// Wall-clock time of one call, waits in host calls (HTTP, sleep)
    /// included (the sink's `timeout`).
    pub timeout: Duration,
}

impl Limits {
    pub const DEFAULT_MEMORY: usize = 64 << 20;
    pub const DEFAULT_CPU: Duration = Duration::from_secs(1);
    /// wasm32 cannot address more.
    pub const MAX_MEMORY: usize = 4 << 30;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: Self::DEFAULT_MEMORY,
            cpu: Self::DEFAULT_CPU,
            timeout: Duration::from_secs(10),
        }
    }
}

/// One `allow_http` entry: `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub host: GrantHost,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantHost {
    /// Lower case.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            GrantHost::Name(n) => write!(f, "{n}:{}", self.port),
            GrantHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            GrantHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
        }
    }
}

/// Parses an `allow_http` entry: `"api.example.com:443"`, `"10.0.0.5:8080"`,
/// `"[::1]:8080"`. The port is required: a grant is for one service.
pub fn parse_grant(s: &str) -> Result<Grant, String> {
    let example = "write \"host:port\", e.g. \"reports.example.com:443\"";
    let s = s.trim();
    if s.contains("://") || s.contains('/') {
        return Err(format!("{s:?} is not host:port (no scheme or path); {example}"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?} has no port; {example}"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
        (GrantHost::Ip(ip), port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port; {example}"))?;
        if host.contains(':') {
            return Err(format!("{s:?}: write IPv6 addresses in brackets, e.g. \"[::1]:8080\""));
        }
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return Err(format!("{s:?}: {host:?} is not a host name or IP address; {example}"));
        }
        match host.parse::<IpAddr>() {
            Ok(ip) => (GrantHost::Ip(ip), port),
            Err(_) => (GrantHost::Name(host.to_ascii_lowercase()), port),
        }
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s:?}: {port:?} is not a port (1-65535); {example}"))?;
    Ok(Grant { host, port })
}
