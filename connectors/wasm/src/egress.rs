//! `allow_http`: the hosts a plugin may send HTTP requests to.
//!
//! Every request a plugin makes through `wasi:http/outgoing-handler` passes
//! [`Egress::send_request`]. A request is allowed when its `host:port` (the
//! port defaulting from the scheme) is granted: a name by a grant of that
//! name (never by what it resolves to: see [`allowed`]), an IP address by a
//! grant of that address. A grant by name trusts that name's DNS answers.
//! Anything else is denied and logged; the plugin sees `HttpRequestDenied`, an ordinary
//! error it can report (as retryable, so a fixed grant lets the delivery
//! through).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::config::{Grant, GrantHost};

pub(crate) struct Egress {
    sink: Arc<str>,
    grants: Arc<[Grant]>,
    /// Bounds every phase of a request (connect, first byte, between bytes).
    timeout: Duration,
}

impl Egress {
    pub fn new(sink: Arc<str>, grants: Vec<Grant>, timeout: Duration) -> Self {
        Self {
            sink,
            grants: grants.into(),
            timeout,
        }
    }
}

/// Whether `host:port` may be reached: a name by a grant of that name, an
/// address by a grant of that address. A name is never checked by what it
/// resolves to: the request resolves it again to connect, and a name whose
/// answer changes in between (DNS rebinding) would reach any address on a
/// granted port. No lookup happens here either, so a plugin cannot send
/// data out through DNS queries for names of its own making.
fn allowed(grants: &[Grant], host: &str, port: u16) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let literal: Option<IpAddr> = host.parse().ok();
    grants.iter().any(|g| {
        g.port == port
            && match (&g.host, literal) {
                (GrantHost::Name(n), None) => *n == host,
                (GrantHost::Ip(ip), Some(lit)) => *ip == lit,
                _ => false,
            }
    })
}

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), Error>> + Send>,
                    ),
                    Error,
                >,
            > + Send,
    > {
        _ = fut;
        let sink = self.sink.clone();
        let grants = self.grants.clone();
        let timeout = self.timeout;
        Box::new(async move {
            use http_body_util::BodyExt;

            let uri = request.uri().clone();
            let Some(authority) = uri.authority() else {
                return Err(Error::HttpRequestUriInvalid);
            };
            let port = authority
                .port_u16()
                .unwrap_or(if uri.scheme() == Some(&Scheme::HTTPS) { 443 } else { 80 });
            if !allowed(&grants, authority.host(), port) {
                tracing::warn!(
                    sink = %sink,
                    host = authority.host(),
                    port,
                    "plugin HTTP request denied: {}:{port} is not in the sink's allow_http",
                    authority.host()
                );
                return Err(Error::HttpRequestDenied);
            }
            let cap = |t: Option<Duration>| Some(t.map_or(timeout, |t| t.min(timeout)));
            let options = RequestOptions {
                connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
                first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
                between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
            };
            // Host and port only: a path, a query or user info may carry a
            // key (a Slack webhook's path is its secret).
            tracing::debug!(
                sink = %sink,
                method = %request.method(),
                host = authority.host(),
                port,
                "plugin HTTP request",
            );
            let (response, io) = wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_grant;

    fn grants(list: &[&str]) -> Vec<Grant> {
        list.iter().map(|g| parse_grant(g).unwrap()).collect()
    }

    #[test]
    fn names_ports_and_addresses() {
        let g = grants(&["Reports.Example.com:443", "127.0.0.1:8080", "[::1]:9000"]);
        assert!(allowed(&g, "reports.example.com", 443));
        assert!(allowed(&g, "REPORTS.example.com", 443));
        assert!(!allowed(&g, "reports.example.com", 80));
        assert!(!allowed(&g, "evil.example.com", 443));
        assert!(allowed(&g, "127.0.0.1", 8080));
        assert!(!allowed(&g, "127.0.0.1", 9090));
        assert!(allowed(&g, "[::1]", 9000));
        // An address grant is not a name's: not even one that resolves to it.
        assert!(!allowed(&g, "localhost", 8080));
        assert!(!allowed(&g, "localhost", 9090));
        assert!(!allowed(&[], "127.0.0.1", 8080));
    }
}
