//! Authentication: what `expeditor check` requires, and the client the sink
//! builds. Tokens themselves are the client crate's business (gcloud-auth:
//! the service-account JWT grant, gcloud user credentials, the metadata
//! server); nothing here speaks OAuth.
//!
//! # The rule `check` applies
//! A sink passes only when one way to authenticate is there to use:
//! - `auth = "none"`: needs `endpoint` (an emulator, a test server).
//! - `credentials = "PATH"`: the file must be readable and a service-account
//!   key (`client_email`, `private_key`) or gcloud user credentials
//!   (`client_id`, `client_secret`, `refresh_token`).
//! - otherwise application-default credentials, in the order the client
//!   looks for them: `GOOGLE_APPLICATION_CREDENTIALS_JSON`; the file named by
//!   `GOOGLE_APPLICATION_CREDENTIALS` (checked like `credentials`: when it is
//!   set but broken that is an error, even though the client would fall back
//!   to the metadata server); gcloud's
//!   `$HOME/.config/gcloud/application_default_credentials.json`; the
//!   metadata server, accepted when `GCE_METADATA_HOST` is set or the machine
//!   shows it is on Google Cloud (`K_SERVICE` or `CLOUD_RUN_JOB` on Cloud
//!   Run, `FUNCTION_TARGET` on Cloud Functions, `GAE_SERVICE` on App Engine,
//!   a DMI product name starting with "Google" on Compute Engine and GKE).
//!
//! `check` reads files but makes no network call, so it cannot tell whether
//! Google accepts the key; the first delivery does.

use std::io;
use std::path::Path;

use base64::Engine as _;
use serde_json::Value;

use crate::Auth;

/// Where Compute Engine (and GKE nodes) say what they are.
pub const DMI_PRODUCT_NAME: &str = "/sys/class/dmi/id/product_name";

const ADC_FILE: &str = ".config/gcloud/application_default_credentials.json";

/// Decides whether a sink can authenticate (see the module docs). `env` reads
/// the environment and `read` reads a file, so tests can stand in for both.
/// On success, says how it will authenticate (for the log, never a secret).
pub fn check_auth(
    auth: &Auth,
    endpoint: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    read: &dyn Fn(&Path) -> io::Result<Vec<u8>>,
) -> Result<String, String> {
    match auth {
        Auth::None => match endpoint {
            Some(e) => Ok(format!("no authentication (emulator at {e})")),
            None => Err(
                "auth = \"none\" sends no credentials, which only an emulator accepts: set endpoint to the emulator's URL as well"
                    .into(),
            ),
        },
        Auth::File(path) => {
            let bytes = read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            credentials_kind(&bytes).map_err(|e| format!("{}: {e}", path.display()))
        }
        Auth::ApplicationDefault => application_default(env, read),
    }
}

fn application_default(
    env: &dyn Fn(&str) -> Option<String>,
    read: &dyn Fn(&Path) -> io::Result<Vec<u8>>,
) -> Result<String, String> {
    if let Some(json) = env("GOOGLE_APPLICATION_CREDENTIALS_JSON").filter(|v| !v.trim().is_empty()) {
        // The client takes it base64-encoded or as is.
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(json.trim())
            .unwrap_or_else(|_| json.into_bytes());
        let kind = credentials_kind(&bytes).map_err(|e| format!("GOOGLE_APPLICATION_CREDENTIALS_JSON: {e}"))?;
        return Ok(format!("{kind} from GOOGLE_APPLICATION_CREDENTIALS_JSON"));
    }
    if let Some(path) = env("GOOGLE_APPLICATION_CREDENTIALS") {
        if path.trim().is_empty() {
            return Err("GOOGLE_APPLICATION_CREDENTIALS is set but empty".into());
        }
        let bytes = read(Path::new(&path))
            .map_err(|e| format!("GOOGLE_APPLICATION_CREDENTIALS names {path}, which cannot be read: {e}"))?;
        let kind = credentials_kind(&bytes).map_err(|e| format!("GOOGLE_APPLICATION_CREDENTIALS names {path}: {e}"))?;
        return Ok(format!("{kind} from GOOGLE_APPLICATION_CREDENTIALS"));
    }
    if let Some(home) = env("HOME").filter(|h| !h.is_empty()) {
        let path = Path::new(&home).join(ADC_FILE);
        match read(&path) {
            Ok(bytes) => {
                let kind = credentials_kind(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
                return Ok(format!("{kind} from {}", path.display()));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    if let Some(host) = env("GCE_METADATA_HOST").filter(|h| !h.is_empty()) {
        return Ok(format!("the metadata server at {host} (GCE_METADATA_HOST)"));
    }
    for (var, platform) in [
        ("K_SERVICE", "Cloud Run"),
        ("CLOUD_RUN_JOB", "Cloud Run"),
        ("FUNCTION_TARGET", "Cloud Functions"),
        ("GAE_SERVICE", "App Engine"),
    ] {
        if env(var).is_some_and(|v| !v.is_empty()) {
            return Ok(format!("the metadata server ({platform}: {var} is set)"));
        }
    }
    if read(Path::new(DMI_PRODUCT_NAME)).is_ok_and(|name| name.starts_with(b"Google")) {
        return Ok("the metadata server (Compute Engine)".into());
    }
    Err(
        "no way to authenticate to BigQuery: GOOGLE_APPLICATION_CREDENTIALS is not set, there is no gcloud \
         application-default credentials file (~/.config/gcloud/application_default_credentials.json), and this \
         is not Google Cloud (no GCE_METADATA_HOST, K_SERVICE or Compute Engine). Set credentials = \
         \"/path/to/service-account.json\" or GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth \
         application-default login`, or for a local emulator set endpoint and auth = \"none\""
            .into(),
    )
}

/// What kind of credentials a JSON file holds, if the client can use it.
fn credentials_kind(bytes: &[u8]) -> Result<String, String> {
    let json: Value = serde_json::from_slice(bytes).map_err(|e| format!("not a Google credentials JSON file ({e})"))?;
    let field = |name: &str| json.get(name).and_then(Value::as_str).filter(|v| !v.is_empty());
    let missing = |what: &str, names: &[&str]| {
        let absent: Vec<&str> = names.iter().copied().filter(|n| field(n).is_none()).collect();
        if absent.is_empty() {
            Ok(())
        } else {
            Err(format!("{what} without {}", absent.join(", ")))
        }
    };
    match field("type") {
        Some("service_account") => {
            missing("a service-account key", &["client_email", "private_key"])?;
            if !field("private_key").is_some_and(|k| k.contains("-----BEGIN")) {
                return Err("a service-account key whose private_key is not a PEM key".into());
            }
            // Signed with as the client will sign its token requests: a key
            // that is cut short or mangled fails here, not at the first
            // delivery. The error names the kind of fault, never the key.
            let key = field("private_key").unwrap_or_default();
            jsonwebtoken::EncodingKey::from_rsa_pem(key.as_bytes())
                .and_then(|k| {
                    jsonwebtoken::encode(
                        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
                        &serde_json::json!({ "check": true }),
                        &k,
                    )
                })
                .map_err(|e| format!("a service-account key whose private_key cannot sign ({:?})", e.kind()))?;
            Ok(format!("service account {}", field("client_email").unwrap_or_default()))
        }
        Some("authorized_user") => {
            missing(
                "gcloud user credentials",
                &["client_id", "client_secret", "refresh_token"],
            )?;
            Ok("gcloud user credentials".into())
        }
        Some(other) => Err(format!(
            "credentials of type {other:?} are not supported; use a service-account key (\"service_account\") or gcloud user credentials (\"authorized_user\"), or run on Google Cloud"
        )),
        None => Err("not a Google credentials file (no \"type\")".into()),
    }
}
