//! A real SMTP server process for the email tests: Python's aiosmtpd, driven
//! by `smtp_server.py` (plain SMTP, STARTTLS or implicit TLS with the test
//! CA of `tls/`, AUTH, scripted 4xx/5xx replies, every message parsed by
//! Python's `email` package and written as JSON).
//!
//! aiosmtpd comes from `.ci/run`; when it is missing, [`SmtpServer::start`]
//! installs it with pip into the test target directory, so `cargo test`
//! alone works too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{free_addr, output_text};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/smtp_server.py");
pub const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/tls");

/// `PYTHONPATH` under which `import aiosmtpd` works ("" when it already does).
fn python_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let importable = |path: &str| {
            Command::new("python3")
                .args(["-c", "import aiosmtpd"])
                .env("PYTHONPATH", path)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if importable("") {
            return String::new();
        }
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pydeps");
        let target = target.to_str().expect("utf-8 path").to_owned();
        if !importable(&target) {
            let out = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(&target)
                .arg("aiosmtpd")
                .output()
                .expect("run python3 -m pip");
            assert!(
                out.status.success() && importable(&target),
                "the email tests need Python's aiosmtpd (`python3 -m pip install aiosmtpd`): {}",
                output_text(&out)
            );
        }
        target
    })
}

/// How the test server secures its port.
#[derive(Clone, Copy, PartialEq)]
pub enum Security {
    Plain,
    StartTls,
    Implicit,
}

/// The SMTP server process, its port and its mail directory.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl SmtpServer {
    pub async fn start(tls: Security, auth: Option<(&str, &str)>) -> SmtpServer {
        let pythonpath = python_path();
        let dir = tempfile::tempdir().unwrap();
        let port = free_addr().port();
        let mut cmd = Command::new("python3");
        cmd.arg(SCRIPT)
            .args(["--port", &port.to_string()])
            .arg("--dir")
            .arg(dir.path())
            .env("PYTHONPATH", pythonpath)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap());
        match tls {
            Security::Plain => {}
            Security::StartTls | Security::Implicit => {
                cmd.args(["--tls", if tls == Security::StartTls { "starttls" } else { "tls" }])
                    .args(["--cert", &format!("{TLS_DIR}/server.pem")])
                    .args(["--key", &format!("{TLS_DIR}/server.key")]);
            }
        }
        if let Some((user, password)) = auth {
            cmd.args(["--auth", &format!("{user}:{password}")]);
        }
        let mut child = cmd.spawn().expect("start python3 smtp_server.py");
        let stdout = child.stdout.take().unwrap();
        // "ready" once it accepts connections.
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(20), ready)
            .await
            .expect("smtp server ready within 20 s")
            .unwrap()
            .unwrap();
        let server = SmtpServer { child, port, dir };
        assert_eq!(line.trim(), "ready", "smtp server: {}", server.log());
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Scripted replies, each `RCPT <reply>` or `DATA <reply>`, used once.
    pub fn script(&self, lines: &[&str]) {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(self.dir.path().join("script"), text).unwrap();
    }

    /// Messages that reached the end of DATA: `accepted` or `refused`, in order.
    pub fn messages(&self, folder: &str) -> Vec<Value> {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join(folder)) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }

    pub async fn wait_accepted(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.messages("accepted");
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} accepted messages, got {got:#?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
