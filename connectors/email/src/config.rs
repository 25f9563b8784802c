//! What an `email` sink is built from.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use expeditor_api::{TemplateId, Templates};
use lettre::message::Mailbox;
use lettre::transport::smtp::client::Certificate;

/// One `[sinks.NAME]` with `type = "email"`, validated and compiled by the
/// daemon's config module; building the sink trusts it.
#[derive(Clone)]
pub struct EmailSinkConfig {
    /// The sink name, for logs and error messages (`sinks.NAME.to`).
    pub name: String,
    pub smtp: SmtpConfig,
    /// The sender, e.g. `Crave Pizza <orders@example.com>`.
    pub from: Mailbox,
    /// A text template: one address, or several separated by commas, each
    /// either `a@b.c` or `Name <a@b.c>`.
    pub to: TemplateId,
    /// A text template naming a single recipient (`{{ order.customer.name }}`);
    /// any characters, encoded as needed.
    pub to_name: Option<TemplateId>,
    /// With a templated `to`, the most addresses it may render
    /// ([`most_recipients`]): more means event data held a list.
    pub to_most: Option<usize>,
    pub subject: TemplateId,
    /// The plain text body.
    pub text: TemplateId,
    /// An HTML alternative to `text`.
    pub html: Option<TemplateId>,
    /// For one whole SMTP exchange, connecting included.
    pub timeout: Duration,
    /// Where `to`, `to_name`, `subject`, `text` and `html` were compiled.
    pub templates: Arc<Templates>,
}

/// `smtp = { host, port, tls, username, password, ca_file }`.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Username and password, sent only over TLS (config refuses `tls = "none"`
    /// with credentials).
    pub credentials: Option<(String, String)>,
    /// PEM certificates trusted besides Mozilla's roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
}

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain connection upgraded with `STARTTLS`, which must succeed (port 587).
    StartTls,
    /// TLS from the first byte, "implicit TLS" or SMTPS (port 465).
    Tls,
    /// No encryption: only for a relay on the same host or a trusted network.
    None,
}

impl TlsMode {
    pub const CHOICES: &str = "\"starttls\" (port 587), \"tls\" (port 465) or \"none\" (port 25)";

    /// The usual port for the mode.
    pub fn default_port(self) -> u16 {
        match self {
            TlsMode::StartTls => 587,
            TlsMode::Tls => 465,
            TlsMode::None => 25,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::StartTls => "starttls",
            TlsMode::Tls => "tls",
            TlsMode::None => "none",
        }
    }
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "starttls" => Ok(TlsMode::StartTls),
            "tls" => Ok(TlsMode::Tls),
            "none" => Ok(TlsMode::None),
            other => Err(format!("unknown TLS mode {other:?}; expected {}", TlsMode::CHOICES)),
        }
    }
}

// Hand-written: the password must not show.
impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .field("ca_file", &self.ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for EmailSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailSinkConfig")
            .field("name", &self.name)
            .field("smtp", &self.smtp)
            .field("from", &self.from.to_string())
            .field("html", &self.html.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Parses `from` (`orders@example.com` or `Crave Pizza <orders@example.com>`),
/// for the config module, so a bad sender is a `check` error.
/// How many addresses a templated `to` may render: one, and one more for
/// each `,` in its own text outside `{{ }}`, `{% %}` and `{# #}`.
/// Its expressions each name one address: a customer's email typed as
/// `me@x.com, someone@else.com` must not add a recipient of the order's
/// details. `None` for a `to` without template syntax (nothing to inject).
pub fn most_recipients(source: &str) -> Option<usize> {
    let mut separators = 0;
    let mut tagged = false;
    let mut rest = source;
    while let Some(c) = rest.chars().next() {
        let close = ["{{", "{%", "{#"]
            .iter()
            .position(|open| rest.starts_with(open))
            .map(|i| ["}}", "%}", "#}"][i]);
        if let Some(close) = close {
            tagged = true;
            rest = rest[2..].find(close).map_or("", |end| &rest[2 + end + 2..]);
            continue;
        }
        separators += usize::from(c == ',');
        rest = &rest[c.len_utf8()..];
    }
    tagged.then_some(separators + 1)
}

pub fn parse_mailbox(s: &str) -> Result<Mailbox, String> {
    Mailbox::from_str(s.trim())
        .map_err(|e| format!("{s:?} is not an email address ({e}); write e.g. \"Crave Pizza <orders@example.com>\""))
}

/// Checks a `to` with no template in it, as a delivery would read it: one
/// address or several, comma-separated.
pub fn parse_recipients(s: &str) -> Result<(), String> {
    lettre::message::Mailboxes::from_str(s.trim())
        .map(drop)
        .map_err(|e| format!("{s:?} is not a list of email addresses ({e}); write e.g. \"kitchen@example.com\""))
}

/// Checks a `ca_file`'s content: at least one PEM certificate.
pub fn parse_ca(pem: &[u8]) -> Result<(), String> {
    if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Certificate::from_pem(pem)
        .map(drop)
        .map_err(|e| format!("is not a valid PEM certificate ({e})"))
}
