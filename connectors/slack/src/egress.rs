//! How the client reaches Slack: straight to it, or, when the daemon's
//! environment names a proxy (`HTTPS_PROXY`, `ALL_PROXY`, either case, with
//! `NO_PROXY` for exceptions, read as curl and reqwest read them), through
//! an HTTP CONNECT tunnel to that proxy, so a Slack sink works on a host
//! whose only way out is the proxy, as the http and bigquery sinks do.
//! TLS runs inside the tunnel, end to end with Slack: the proxy sees only
//! the host and port. Plain http (a loopback test server only) always goes
//! direct.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
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
        let named = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        Self::new(named.then(Matcher::from_env))
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
        let through = match &self.proxy {
            Some(matcher) if dst.scheme_str() == Some("https") => matcher.intercept(&dst),
            _ => None,
        };
        let Some(proxy) = through else {
            let connecting = self.direct.call(dst);
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        };
        let mut tunnel = Tunnel::new(proxy.uri().clone(), self.direct.clone());
        if let Some(auth) = proxy.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        Box::pin(async move {
            std::future::poll_fn(|cx| tunnel.poll_ready(cx))
                .await
                .map_err(tunnel_error)?;
            tunnel.call(dst).await.map_err(tunnel_error)
        })
    }
}

/// The tunnel's failure as one message that says a proxy was in the way,
/// never its address (it may carry credentials).
fn tunnel_error(e: impl std::error::Error + 'static) -> BoxError {
    let mut message = format!("through the proxy: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message.into()
}
