//! How the client reaches Slack: straight to it, or, when the daemon's
//! environment names a proxy (`HTTPS_PROXY`, `ALL_PROXY`, either case, with
//! `NO_PROXY` for exceptions, read as curl and reqwest read them), through
//! that proxy, so a Slack sink works on a host whose only way out is the
//! proxy, as the http and bigquery sinks do: an `http://` proxy by an HTTP
//! CONNECT tunnel, a `socks5://` (or `socks5h://`, names resolved by the
//! proxy) one by SOCKS5. TLS runs inside, end to end with Slack: the proxy
//! sees only the host and port. A proxy of another scheme (`https://`,
//! `socks4://`) fails each connection with a message that says so, rather
//! than going around the proxy. Plain http (a loopback test server only)
//! always goes direct.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Egress {
    direct: HttpConnector,
    /// `None` when the environment names no proxy: every connection is direct.
    proxy: Option<Arc<Matcher>>,
}

impl Egress {
    /// Reads the proxy variables now, once: a sink is built at each start
    /// and reload.
    pub(crate) fn from_env() -> Self {
        let first = |names: [&str; 2]| names.iter().find_map(|n| std::env::var(n).ok()).unwrap_or_default();
        let (all, https) = (first(["ALL_PROXY", "all_proxy"]), first(["HTTPS_PROXY", "https_proxy"]));
        if all.is_empty() && https.is_empty() {
            return Self::new(None);
        }
        // The same values without NO_PROXY: nothing intercepted then means
        // the value is not a proxy URL at all (never shown: it may hold a
        // password).
        let alone = Matcher::builder().all(all).https(https).build();
        match alone.intercept(&Uri::from_static("https://slack.com/")) {
            None => tracing::warn!(
                "HTTPS_PROXY / ALL_PROXY is set but is not a proxy URL (check the scheme and the escaping of its \
                 user and password); the slack sink connects to Slack directly"
            ),
            Some(proxy) if !supported(proxy.uri()) => tracing::warn!(
                scheme = proxy.uri().scheme_str().unwrap_or(""),
                "the slack sink reaches a proxy only over http:// or socks5://; its connections will fail"
            ),
            Some(_) => {}
        }
        Self::new(Some(Matcher::from_env()))
    }

    pub(crate) fn new(proxy: Option<Matcher>) -> Self {
        let mut direct = HttpConnector::new();
        // The https layer above hands this https URIs to connect to.
        direct.enforce_http(false);
        Self {
            direct,
            proxy: proxy.map(Arc::new),
        }
    }
}

impl Service<Uri> for Egress {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = match &self.proxy {
            Some(matcher) if dst.scheme_str() == Some("https") => matcher.intercept(&dst),
            _ => None,
        };
        let Some(proxy) = intercept else {
            let connecting = self.direct.call(dst);
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        };
        let proxy_uri = proxy.uri().clone();
        let scheme = proxy_uri.scheme_str().unwrap_or("").to_owned();
        match scheme.as_str() {
            "http" => {
                let mut tunnel = Tunnel::new(proxy_uri, self.direct.clone());
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(through(tunnel, dst))
            }
            "socks5" | "socks5h" => {
                let proxy_uri = with_port(proxy_uri, SOCKS_PORT);
                let auth = proxy.raw_auth().map(|(u, p)| (u.to_owned(), p.to_owned()));
                let direct = self.direct.clone();
                Box::pin(async move {
                    // socks5: we resolve the name, off the async workers
                    // (hyper-util's own lookup would block one), and hand
                    // the proxy an address; socks5h: the proxy resolves it.
                    let dst = if scheme == "socks5" { resolved(dst).await? } else { dst };
                    let mut socks = SocksV5::new(proxy_uri, direct).local_dns(false);
                    if let Some((user, pass)) = auth {
                        socks = socks.with_auth(user, pass);
                    }
                    through(socks, dst).await
                })
            }
            other => {
                let message =
                    format!("through the proxy: a {other}:// proxy is not supported (use http:// or socks5://)");
                Box::pin(async move { Err(message.into()) })
            }
        }
    }
}

/// A SOCKS proxy's port when its URL names none, as curl and reqwest take it.
const SOCKS_PORT: u16 = 1080;

fn with_port(uri: Uri, port: u16) -> Uri {
    match uri.authority() {
        Some(a) if a.port().is_none() => {
            let authority = format!("{}:{port}", a.as_str());
            Uri::builder()
                .scheme(uri.scheme_str().unwrap_or("socks5"))
                .authority(authority.as_str())
                .path_and_query("/")
                .build()
                .unwrap_or(uri)
        }
        _ => uri,
    }
}

/// `dst` with its host looked up (without blocking), for a proxy that is
/// to be handed an address.
async fn resolved(dst: Uri) -> Result<Uri, BoxError> {
    let host = dst
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = dst.port_u16().unwrap_or(443);
    let addr = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("cannot resolve {host}"))?;
    let authority = addr.to_string();
    Ok(Uri::builder()
        .scheme(dst.scheme_str().unwrap_or("https"))
        .authority(authority.as_str())
        .path_and_query(dst.path_and_query().map_or("/", |p| p.as_str()))
        .build()?)
}

/// Whether [`Egress`] speaks to a proxy at `uri`.
fn supported(uri: &Uri) -> bool {
    matches!(uri.scheme_str(), Some("http" | "socks5" | "socks5h"))
}

/// Connects to `dst` through a proxy connector.
async fn through<P>(mut proxy: P, dst: Uri) -> Result<TokioIo<TcpStream>, BoxError>
where
    P: Service<Uri, Response = TokioIo<TcpStream>>,
    P::Error: std::error::Error + 'static,
{
    std::future::poll_fn(|cx| proxy.poll_ready(cx))
        .await
        .map_err(proxy_error)?;
    proxy.call(dst).await.map_err(proxy_error)
}

/// The proxy's failure as one message that says a proxy was in the way,
/// never its address (it may carry credentials).
fn proxy_error(e: impl std::error::Error + 'static) -> BoxError {
    let mut message = format!("through the proxy: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socks_proxy_without_a_port_is_on_1080() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(
            with_port(uri("socks5://proxy.corp"), SOCKS_PORT),
            uri("socks5://proxy.corp:1080/")
        );
        assert_eq!(
            with_port(uri("socks5h://10.0.0.1:9050"), SOCKS_PORT),
            uri("socks5h://10.0.0.1:9050")
        );
    }

    #[tokio::test]
    async fn resolved_keeps_the_port_and_path() {
        let dst: Uri = "https://localhost:8443/api/chat.postMessage".parse().unwrap();
        let ip = resolved(dst).await.unwrap();
        assert!(
            [
                "https://127.0.0.1:8443/api/chat.postMessage",
                "https://[::1]:8443/api/chat.postMessage"
            ]
            .contains(&ip.to_string().as_str()),
            "{ip}"
        );
    }
}
